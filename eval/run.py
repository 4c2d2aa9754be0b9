"""`openllama eval CKPT --tasks ...`: lm-evaluation-harness on a checkpoint, OpenLLaMA's table, MLflow.

Everything that can be wrong with the request (settings, checkpoint, tokenizer, task names, tasks without
documents) is checked before the model is loaded, and refused with exit 2 and one line. Results go to
`--output` (results.json, table.md) and to the MLflow experiment `eval`, tagged with the training run and
step the checkpoint came from when they are known. `--perplexity DATA_DIR` adds the held-out loss of a
packed dataset's validation split, computed by the code training uses (`train/heldout.py`).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

from openllama import commands, files
from openllama.commands import BadInput
from openllama.config import METAVAR, PARSE, POSITIONAL, ConfigError
from openllama.data.shards import DatasetNotFinished, PackedDataset
from openllama.data.tokenizer import load_for_model
from openllama.eval import published
from openllama.eval.decode import RUNTIME
from openllama.eval.task_texts import TASK_PACK
from openllama.train import checkpoint
from openllama.train.heldout import heldout_metrics
from openllama.train.model import LlamaConfig
from openllama.train.step import make_eval_step

EXPERIMENT = "eval"
LM_EVAL_MISSING = "lm-eval is not installed: pip install 'openllama-ray[eval]'"

# The zero-shot suite of OpenLLaMA's README table (cb and wsc are run but kept out of the Average).
OPENLLAMA_TASKS = (
    "anli_r1", "anli_r2", "anli_r3", "arc_challenge", "arc_easy", "boolq", "cb", "hellaswag", "openbookqa",
    "piqa", "record", "rte", "truthfulqa_mc1", "truthfulqa_mc2", "wic", "winogrande", "wsc",
)


class EvalInputError(BadInput):
    """A request that cannot be evaluated; raised before any model work."""


def task_list(text: str) -> list[str]:
    """`--tasks a,b` as ["a", "b"]."""
    return [task.strip() for task in text.split(",") if task.strip()]


@dataclass
class EvalConfig:
    """`openllama eval`'s settings (`--config YAML`, the flags, `--set KEY=VALUE`), checked before any work."""

    # a model checkpoint, or a training run directory (its newest checkpoint)
    checkpoint: str = field(metadata={POSITIONAL: True})
    # lm-eval tasks or groups, comma-separated on the command line; `openllama` = OpenLLaMA's zero-shot suite,
    # `openllama_local` = the offline task pack
    tasks: list[str] = field(default_factory=list, metadata={PARSE: task_list, METAVAR: "TASK,..."})
    limit: int | float | None = None  # documents per task (a whole number), or a fraction of each task below 1
    num_fewshot: int | None = None  # few-shot examples per request (None: each task's own)
    # another folder of lm-eval task YAMLs
    include_path: list[str] = field(default_factory=list, metadata={METAVAR: "DIR"})
    workers: int = 1  # Ray actors that each hold the model
    batch_size: int = 16  # packed rows scored together (a row holds several requests); also rows per perplexity batch
    tokenizer: str | None = None  # SentencePiece tokenizer.model (None: the checkpoint's own)
    compare: bool = False  # show the published GPT-J / LLaMA / OpenLLaMA columns beside ours
    # the published table compare shows: v1 (the 1T-token release; None: v1) or preview (OpenLLaMA 7B at 400B
    # and 3B at 350B tokens, GPT-J 6B, LLaMA 7B); implies compare
    compare_table: str | None = None
    output: str | None = None  # folder for results.json and table.md (None: none kept)
    # also the loss and perplexity per subset of this packed dataset's validation split
    perplexity: str | None = field(default=None, metadata={METAVAR: "DATA_DIR"})
    seed: int = 0  # seed of few-shot sampling
    mlflow: bool = True  # log the results to MLflow experiment `eval`

    def __post_init__(self) -> None:
        if self.limit is not None:
            if self.limit <= 0:
                raise ConfigError(f"--limit={self.limit:g} must be positive")
            if self.limit >= 1:
                if self.limit != int(self.limit):
                    raise ConfigError(
                        f"--limit={self.limit:g} must be a whole number of documents, or a fraction below 1"
                    )
                self.limit = int(self.limit)
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"--num-fewshot={self.num_fewshot} must be at least 0")
        if self.workers < 1:
            raise ConfigError(f"--workers={self.workers} must be at least 1")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size={self.batch_size} must be at least 1")
        if self.compare_table is not None:
            if self.compare_table not in published.COMPARE_TABLES:
                allowed = sorted(published.COMPARE_TABLES)
                raise ConfigError(f"--compare-table={self.compare_table!r}; allowed: {allowed}")
            self.compare = True

    def check_has_work(self) -> None:
        """Something to evaluate: tasks, a held-out set, or both. (Not in __post_init__, so that
        `openllama config show eval` can show the defaults, which name neither.)"""
        if not self.tasks and not self.perplexity:
            raise ConfigError("name --tasks, --perplexity DATA_DIR, or both")


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    task: str
    metric: str
    value: float
    averaged: bool  # counted in the Average row: a higher-is-better score of a task OpenLLaMA averaged


def require_lm_eval() -> None:
    """lm-eval is an install extra: without it, stop with the command that installs it."""
    try:
        import lm_eval  # noqa: F401  (imported here only to learn whether the extra is installed)
    except ImportError as error:
        raise EvalInputError(LM_EVAL_MISSING) from error


def expand_tasks(names: list[str]) -> list[str]:
    """Task names with the `openllama` alias replaced by OpenLLaMA's suite, duplicates dropped."""
    expanded: list[str] = []
    for name in names:
        for task in OPENLLAMA_TASKS if name == "openllama" else (name,):
            if task not in expanded:
                expanded.append(task)
    return expanded


def task_manager(names: list[str], include_paths: list[str]) -> Any:
    """lm-eval's TaskManager over our local pack, any `--include-path` folders, and lm-eval's own tasks.

    Indexing lm-eval's ~15k task files takes a while, so it is skipped when every name is found locally.
    """
    from lm_eval.tasks import TaskManager  # lm-eval is an install extra (see require_lm_eval)

    for path in include_paths:
        if not Path(path).is_dir():
            raise EvalInputError(f"--include-path {path} is not a directory of lm-eval task YAMLs")
    paths = [str(TASK_PACK), *include_paths]
    local = TaskManager(include_path=paths, include_defaults=False)
    if set(names) <= set(local.all_tasks):
        return local
    return TaskManager(include_path=paths)


def check_task_names(names: list[str], manager: Any) -> None:
    """An error naming every unknown task and the known names closest to it."""
    known = set(manager.all_tasks)
    problems = []
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            problems.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    if problems:
        raise EvalInputError(
            f"unknown task {', '.join(problems)}; list tasks with `lm_eval ls tasks`, "
            f"or add a folder of task YAMLs with --include-path"
        )


def check_tasks(names: list[str]) -> None:
    """The checks `openllama eval` makes of its tasks, for a caller that scores checkpoints later (training
    with `eval.tasks`): lm-eval is installed, every task is known and has documents."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # as `evaluate` sets them, before lm-eval is imported
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    require_lm_eval()
    expanded = expand_tasks(names)
    manager = task_manager(expanded, [])
    check_task_names(expanded, manager)
    check_tasks_have_documents(expanded, manager)


def check_tasks_have_documents(names: list[str], manager: Any) -> None:
    """Load each task's documents once, so an empty or unreadable task fails before the model loads."""
    for name in names:
        try:
            leaves = manager.load([name])["tasks"]
        except Exception as error:
            raise EvalInputError(
                f"task {name!r} could not load its documents ({type(error).__name__}: {error}); "
                "check its data files"
            ) from error
        for task_name, task in leaves.items():
            if not list(task.eval_docs):
                raise EvalInputError(
                    f"task {task_name!r} has no documents in its evaluation split; check its data files"
                )


def check_checkpoint(path: str, tokenizer: str | None) -> Path:
    """The resolved checkpoint dir, after checking that it is one and that its tokenizer fits it."""
    try:
        resolved = checkpoint.resolve(path)
    except FileNotFoundError as error:
        raise EvalInputError(str(error)) from error
    config = checkpoint.read_config(resolved)
    tokenizer_path = tokenizer or checkpoint.tokenizer_of(resolved)
    if tokenizer_path is None:
        raise EvalInputError(f"checkpoint {resolved} has no {checkpoint.TOKENIZER}; pass --tokenizer PATH")
    try:
        load_for_model(tokenizer_path, config.vocab_size, config.bos_token_id, config.eos_token_id)
    except (OSError, BadInput) as error:
        raise EvalInputError(str(error)) from error
    return resolved


def training_origin(ckpt: Path) -> dict[str, str]:
    """Tags naming where a checkpoint came from: the training step and the training run's MLflow id, when known.

    Both come from the run directory's own records (`train/checkpoint.py`); a checkpoint not saved by
    `openllama train` simply has neither.
    """
    tags: dict[str, str] = {}
    step = checkpoint.checkpoint_step(ckpt)
    if step is not None:
        tags["checkpoint_step"] = str(step)
    run = checkpoint.RunDir.of_checkpoint(ckpt)
    run_id = run.tracking_run_id() if run is not None else None
    if run_id:
        tags["training_run_id"] = run_id
    return tags


def table_rows(results: dict) -> list[Row]:
    """One row per (task, metric) lm-eval reported, stderr and group summaries left out."""
    rows = []
    for task, metrics in results["results"].items():
        better = results.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            metric, _, _ = key.partition(",")
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if not numeric or metric.endswith("_stderr") or metric == "sample_len":
                continue
            averaged = bool(better.get(metric)) and task not in published.EXCLUDED_FROM_AVERAGE
            rows.append(Row(task, metric, float(value), averaged))
    return rows


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"


def render_table(rows: list[Row], model_name: str, compare: bool, table: str = "v1") -> str:
    """OpenLLaMA's README table: Task/Metric rows, one column per model, and an Average row.

    Every column's Average is over the same rows (ours that count), so the columns stay comparable
    when only part of the suite was run.
    """
    columns = [model_name, *(published.COMPARE_TABLES[table] if compare else ())]
    values: list[dict[tuple[str, str], float]] = [{(r.task, r.metric): r.value for r in rows}]
    values += [published.published(model, table) for model in columns[1:]]
    lines = [
        "| Task/Metric | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    for row in rows:
        cells = [_format(column.get((row.task, row.metric))) for column in values]
        lines.append(f"| {published.readme_label(row.task, row.metric)} | " + " | ".join(cells) + " |")
    averaged = [(r.task, r.metric) for r in rows if r.averaged]
    if averaged:
        averages = []
        for column in values:
            present = [column[key] for key in averaged if key in column]
            averages.append(sum(present) / len(present) if len(present) == len(averaged) else None)
        lines.append("| Average | " + " | ".join(_format(a) for a in averages) + " |")
    return "\n".join(lines) + "\n"


def log_to_mlflow(rows: list[Row], results_path: Path, table_path: Path, tags: dict[str, str],
                  params: dict[str, Any]) -> str:
    """One run in experiment `eval`: every metric as `task/metric`, the results and table as artifacts."""
    # MLflow loads only when a run is logged (--no-mlflow skips it); importing it costs seconds
    from openllama import tracking

    metrics = {f"{r.task}/{r.metric}": r.value for r in rows if math.isfinite(r.value)}
    averaged = [r.value for r in rows if r.averaged]
    if averaged:
        metrics["average"] = sum(averaged) / len(averaged)
    return tracking.log_summary(EXPERIMENT, tags.get("checkpoint_name"), params, metrics, tags,
                                (results_path, table_path))


def log_task_data(run_id: str, results: dict) -> None:
    """Each task's documents as an MLflow dataset input of the eval run (context `evaluation`): a local task's
    data file with its sha256, an lm-eval task's Hugging Face dataset by name and version."""
    from openllama import tracking  # MLflow loads only when a run is logged (see log_to_mlflow)

    for task, config in results.get("configs", {}).items():
        split = config.get("test_split") or config.get("validation_split")
        data_files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
        local = data_files.get(split) if isinstance(data_files, dict) else None
        if isinstance(local, str) and (TASK_PACK / local).is_file():
            source, digest = str(TASK_PACK / local), files.sha256_of(TASK_PACK / local)
        else:
            name = "/".join(str(p) for p in (config.get("dataset_path"), config.get("dataset_name")) if p)
            source = f"hf://datasets/{name}"
            version = results.get("versions", {}).get(task)
            digest = hashlib.sha256(json.dumps([name, split, version]).encode()).hexdigest()
        counts = results.get("n-samples", {}).get(task, {})
        tracking.log_dataset(run_id, task, source, digest, "evaluation",
                             {"split": split, "documents": counts.get("effective"), "of": counts.get("original")})


def open_validation(data_dir: str, max_length: int) -> PackedDataset:
    """The validation split of a packed dataset, checked to fit the model's context."""
    try:
        dataset = PackedDataset.open(data_dir, split="validation")
    except (OSError, ValueError, DatasetNotFinished) as error:
        raise EvalInputError(f"--perplexity {data_dir}: {error}") from error
    if dataset.seq_len > max_length:
        raise EvalInputError(
            f"--perplexity {data_dir}: rows of {dataset.seq_len} tokens do not fit the model's "
            f"{max_length}-token context"
        )
    return dataset


def held_out_perplexity(config: LlamaConfig, params: Any, dataset: PackedDataset, batch_size: int) -> list[Row]:
    """Loss and perplexity per validation subset, by training's own held-out code on these weights.

    Every target of every packed row is scored as training scores it (no extra BOS), so the loss is
    training's `val/<subset>/loss` on the same rows.
    """
    evaluate_batch = jax.jit(make_eval_step(config, RUNTIME))  # on the params' device; one shape, one compile

    def score(tokens: Any, weight: Any) -> tuple[float, float]:
        loss_sum, count = evaluate_batch(params, tokens, weight)
        return float(loss_sum), float(count)

    metrics = heldout_metrics(score, dataset, batch_size)
    rows = []
    for subset in dataset.subsets:
        if f"{subset}/loss" in metrics:
            rows.append(Row(f"validation/{subset}", "loss", metrics[f"{subset}/loss"], False))
            rows.append(Row(f"validation/{subset}", "perplexity", metrics[f"{subset}/ppl"], False))
    return rows


def evaluate(settings: EvalConfig) -> tuple[Path, dict, list[Row], str]:
    """Check the request, run lm-eval; (checkpoint dir, lm-eval results, table rows, table markdown)."""
    # Datasets and tokenizers come from local files or the HF cache, never from a hub at run time;
    # set HF_DATASETS_OFFLINE=0 in the environment to let lm-eval download its real tasks. (Set before
    # lm-eval and `datasets` are first imported: they read these at import.)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    require_lm_eval()
    ckpt = check_checkpoint(settings.checkpoint, settings.tokenizer)
    names = expand_tasks(settings.tasks)
    manager = None
    if names:
        manager = task_manager(names, settings.include_path)
        check_task_names(names, manager)
        check_tasks_have_documents(names, manager)
    validation = None
    if settings.perplexity:
        validation = open_validation(settings.perplexity, checkpoint.read_config(ckpt).max_position_embeddings)

    # lm-eval is an install extra (checked above), and the backend is lm-eval's model class
    import lm_eval

    from openllama.eval.backend import OpenLlamaLM

    ray_started_here = settings.workers > 1 and not ray_is_running()
    try:
        results: dict = {"results": {}}
        lm = None
        if names:
            lm = OpenLlamaLM(str(ckpt), tokenizer=settings.tokenizer, batch_size=settings.batch_size,
                             workers=settings.workers)
            with jax_environment_report():
                results = lm_eval.simple_evaluate(
                    model=lm, tasks=names, num_fewshot=settings.num_fewshot, limit=settings.limit,
                    # no torch seed: the model is JAX's, and seeding torch would import it (seconds) for nothing
                    task_manager=manager, log_samples=False, random_seed=settings.seed,
                    numpy_random_seed=settings.seed, torch_random_seed=None, fewshot_random_seed=settings.seed,
                )
        rows = table_rows(results)
        if validation is not None:
            in_process = lm.in_process_model() if lm is not None else None
            model_config, params = in_process or checkpoint.load_model(ckpt)[:2]
            heldout = held_out_perplexity(model_config, params, validation, settings.batch_size)
            results["perplexity"] = {f"{r.task}/{r.metric}": r.value for r in heldout}
            rows += heldout
    finally:
        if ray_started_here and ray_is_running():
            import ray  # already loaded by the workers (ray_is_running says so): this only names it

            ray.shutdown()
    return ckpt, results, rows, render_table(rows, ckpt.name, settings.compare, settings.compare_table or "v1")


SCORED_TAG = "openllama.scored.step_{step:08d}"  # on the training run: that step's checkpoint was scored


def score_checkpoint(checkpoint_of_ray: Any, step: int, location: str, tasks: list[str], limit: int | None,
                     run_id: str | None, tracking_uri: str | None) -> dict[str, float]:
    """The lm-eval scores of a checkpoint saved during training, logged to the training run at its step as
    `eval/TASK/METRIC` (and `eval/average`, and `eval/seconds` it took), so MLflow plots them beside the loss.

    Ray Train runs this in a task of its own while training goes on (`train.launch.fit`'s validation, which
    hands Ray's checkpoint object as the first argument; `location` is our name for the same folder, local or in
    a bucket). A step the run already has scores of (a resumed run, a requeued validation) is not scored again.
    """
    # MLflow is imported only in the evaluation task, which logs (importing it costs seconds)
    from mlflow.entities import Metric

    from openllama import tracking

    commands.quiet_libraries()
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    tag = SCORED_TAG.format(step=step)
    if run_id:
        scored = tracking.client().get_run(run_id).data.tags.get(tag)
        if scored is not None:
            return json.loads(scored)
    started = time.perf_counter()
    _, _, rows, _ = evaluate(EvalConfig(checkpoint=location, tasks=tasks, limit=limit, mlflow=False))
    scores = {f"eval/{r.task}/{r.metric}": r.value for r in rows if math.isfinite(r.value)}
    averaged = [r.value for r in rows if r.averaged]
    if averaged:
        scores["eval/average"] = sum(averaged) / len(averaged)
    scores["eval/seconds"] = time.perf_counter() - started  # how long the scoring took, beside the training
    if run_id:
        now = int(time.time() * 1000)
        client = tracking.client()
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in scores.items()])
        client.set_tag(run_id, tag, json.dumps(scores))
    return scores


@contextlib.contextmanager
def jax_environment_report() -> Iterator[None]:
    """lm-eval ends every evaluation with torch's environment report (`torch.utils.collect_env`), which
    imports torch and probes the machine, a large share of a short evaluation's time; the model here is
    JAX's, so the results describe JAX's install instead, under lm-eval's own keys."""
    import lm_eval.evaluator  # lm-eval is an install extra, loaded when an evaluation runs

    def add_jax_env_info(storage: dict[str, Any]) -> None:
        devices = jax.devices()
        storage.update({
            "pretty_env_info": f"JAX {jax.__version__} (jaxlib {metadata.version('jaxlib')}), "
                               f"{len(devices)} {devices[0].platform} device(s); Python {platform.python_version()} "
                               f"on {platform.platform()}",
            "transformers_version": installed_version("transformers"),
            "lm_eval_version": installed_version("lm_eval"),
            "upper_git_hash": None,
        })

    original = lm_eval.evaluator.add_env_info
    lm_eval.evaluator.add_env_info = add_jax_env_info
    try:
        yield
    finally:
        lm_eval.evaluator.add_env_info = original


def installed_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "N/A"


def ray_is_running() -> bool:
    """Whether this process is connected to Ray; never imports it (that costs a second), as unimported
    means not started."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def write_outputs(out_dir: Path, results: dict, table: str) -> tuple[Path, Path]:
    """results.json and table.md in out_dir, each published whole (`files.write_text`)."""
    from lm_eval.utils import handle_non_serializable  # lm-eval is an install extra (see require_lm_eval)

    results_path, table_path = out_dir / "results.json", out_dir / "table.md"
    files.write_text(results_path, json.dumps(results, indent=2, default=handle_non_serializable))
    files.write_text(table_path, table)
    return results_path, table_path


def report(settings: EvalConfig) -> int:
    """Evaluate, print the table, write the outputs and log the MLflow run."""
    ckpt, results, rows, table = evaluate(settings)
    print(table)
    with tempfile.TemporaryDirectory() as scratch:
        results_path, table_path = write_outputs(Path(settings.output or scratch), results, table)
        if settings.mlflow:
            from openllama import tracking  # MLflow loads only when a run is logged (see log_to_mlflow)

            tags = {"checkpoint": str(ckpt), "checkpoint_name": ckpt.name, **training_origin(ckpt)}
            params = {"tasks": ",".join(settings.tasks), "limit": settings.limit,
                      "num_fewshot": settings.num_fewshot, "batch_size": settings.batch_size,
                      "workers": settings.workers, "seed": settings.seed,
                      "tokenizer": settings.tokenizer or "checkpoint"}
            run_id = log_to_mlflow(rows, results_path, table_path, tags, params)
            log_task_data(run_id, results)
            link = tracking.run_link(run_id)
            print(f"MLflow run {run_id} in experiment {EXPERIMENT!r}" + (f": {link}" if link else ""))
    if settings.output:
        print(f"wrote {results_path} and {table_path}")
    return 0


def eval_command(settings: EvalConfig) -> int:
    """Evaluate a checkpoint with lm-evaluation-harness tasks and print OpenLLaMA's table. Everything that can be
    wrong with the request is refused before the model loads. Results go to --output (results.json, table.md)
    and to the MLflow experiment `eval`; --perplexity DATA_DIR adds the held-out loss of a packed dataset."""
    settings.check_has_work()
    commands.quiet_libraries()
    return report(settings)
