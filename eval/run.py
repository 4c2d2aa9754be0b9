"""`openllama eval CKPT --tasks ...`: lm-evaluation-harness on a checkpoint, OpenLLaMA's table, MLflow.

Everything that can be wrong with the request (checkpoint, tokenizer, task names, tasks without documents)
is checked before the model is loaded. Results go to `--output` (results.json, table.md) and to the MLflow
experiment `eval`, tagged with the training run and step the checkpoint came from when they are known.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openllama.eval import published

TASK_PACK = Path(__file__).resolve().parent / "tasks"
EXPERIMENT = "eval"

# The zero-shot suite of OpenLLaMA's README table (cb and wsc are run but kept out of the Average).
OPENLLAMA_TASKS = (
    "anli_r1", "anli_r2", "anli_r3", "arc_challenge", "arc_easy", "boolq", "cb", "hellaswag", "openbookqa",
    "piqa", "record", "rte", "truthfulqa_mc1", "truthfulqa_mc2", "wic", "winogrande", "wsc",
)


class EvalInputError(ValueError):
    """A request that cannot be evaluated; raised before any model work."""


@dataclass(frozen=True)
class Row:
    task: str
    metric: str
    value: float
    averaged: bool  # counted in the Average row: a higher-is-better score of a task OpenLLaMA averaged


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
    from lm_eval.tasks import TaskManager

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
    from openllama.eval.backend import load_tokenizer
    from openllama.train import checkpoint
    from openllama.train.model import config_from_dict

    try:
        resolved = checkpoint.resolve(path)
    except FileNotFoundError as error:
        raise EvalInputError(str(error)) from error
    config = config_from_dict(json.loads((resolved / checkpoint.MODEL_JSON).read_text()))
    tokenizer_path = Path(tokenizer) if tokenizer else resolved / checkpoint.TOKENIZER
    if not tokenizer and not tokenizer_path.is_file():
        raise EvalInputError(f"checkpoint {resolved} has no {checkpoint.TOKENIZER}; pass --tokenizer PATH")
    try:
        load_tokenizer(tokenizer_path, config)
    except (OSError, ValueError) as error:
        raise EvalInputError(str(error)) from error
    return resolved


def training_origin(ckpt: Path) -> dict[str, str]:
    """Tags naming where a checkpoint came from: the training run's MLflow id and the step, when found.

    A training checkpoint sits at RUN/checkpoints/step_XXXXXXXX/ with a state.json ({"step": ...}) and
    RUN/mlflow_run_id; anything missing or unreadable is simply left out.
    """
    tags: dict[str, str] = {}
    try:
        state = json.loads((ckpt / "state.json").read_text())
        tags["checkpoint_step"] = str(int(state["step"]))
    except (OSError, ValueError, KeyError, TypeError):
        match = re.search(r"step_?(\d+)$", ckpt.name)
        if match:
            tags["checkpoint_step"] = str(int(match.group(1)))
    for parent in (ckpt, *list(ckpt.parents)[:3]):
        run_id_file = parent / "mlflow_run_id"
        if run_id_file.is_file():
            run_id = run_id_file.read_text().strip()
            if run_id:
                tags["training_run_id"] = run_id
            break
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


def render_table(rows: list[Row], model_name: str, compare: bool) -> str:
    """OpenLLaMA's README table: Task/Metric rows, one column per model, and an Average row.

    Every column's Average is over the same rows (ours that count), so the columns stay comparable
    when only part of the suite was run.
    """
    columns = [model_name, *(published.COMPARE_MODELS if compare else ())]
    values: list[dict[tuple[str, str], float]] = [{(r.task, r.metric): r.value for r in rows}]
    values += [published.published(model) for model in columns[1:]]
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
    from mlflow.entities import Metric

    from openllama import tracking

    with tracking.run(EXPERIMENT, run_name=tags.get("checkpoint_name"), tags=tags, params=params) as run_id:
        client = tracking.client()
        now = int(time.time() * 1000)
        metrics = [Metric(f"{r.task}/{r.metric}", r.value, now, 0) for r in rows if math.isfinite(r.value)]
        averaged = [r.value for r in rows if r.averaged]
        if averaged:
            metrics.append(Metric("average", sum(averaged) / len(averaged), now, 0))
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start : start + 1000])
        client.log_artifact(run_id, str(results_path))
        client.log_artifact(run_id, str(table_path))
    return run_id


def open_validation(data_dir: str, max_length: int) -> Any:
    """The validation split of a packed dataset, checked to fit the model's context."""
    from openllama.data.shards import DatasetNotFinished, PackedDataset

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


def held_out_perplexity(lm: Any, dataset: Any, rows_per_read: int = 256) -> list[Row]:
    """Loss and perplexity per validation subset: every target of every packed row, as training scores them.

    Rows are scored as they were trained on (no extra BOS): the first token is the context, the rest the
    continuation, so the loss matches training's `val/<subset>/loss` on the same rows.
    """
    import numpy as np

    rows = []
    for subset in dataset.subsets:
        total, count = 0.0, 0
        for start in range(0, dataset.rows(subset), rows_per_read):
            indices = np.arange(start, min(start + rows_per_read, dataset.rows(subset)))
            tokens = dataset.read(subset, indices).tolist()
            scored = lm._loglikelihood_tokens([(None, row[:1], row[1:]) for row in tokens])
            total -= sum(logprob for logprob, _ in scored)
            count += sum(len(row) - 1 for row in tokens)
        loss = total / max(count, 1)
        rows.append(Row(f"validation/{subset}", "loss", loss, False))
        rows.append(Row(f"validation/{subset}", "perplexity", math.exp(min(loss, 50.0)), False))
    return rows


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="openllama eval",
        description="Evaluate a checkpoint with lm-evaluation-harness tasks and print OpenLLaMA's table.",
    )
    parser.add_argument("checkpoint", help="a model checkpoint dir, or a training run dir (newest checkpoint)")
    parser.add_argument("--tasks", default="",
                        help="comma-separated lm-eval tasks or groups; `openllama` = OpenLLaMA's zero-shot "
                             "suite, `openllama_local` = the offline task pack")
    parser.add_argument("--limit", type=float, default=None,
                        help="documents per task (an integer), or a fraction of each task below 1")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: task's)")
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="another folder of lm-eval task YAMLs (repeatable)")
    parser.add_argument("--workers", type=int, default=1, help="Ray actors that each hold the model")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="packed rows scored together (a row holds several requests)")
    parser.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the checkpoint's)")
    parser.add_argument("--compare", action="store_true",
                        help="show the published GPT-J / LLaMA / OpenLLaMA columns beside ours")
    parser.add_argument("--output", default=None, help="folder for results.json and table.md")
    parser.add_argument("--perplexity", default=None, metavar="DATA_DIR",
                        help="also report loss and perplexity per subset of a packed dataset's validation split")
    parser.add_argument("--seed", type=int, default=0, help="seed for few-shot sampling")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    args = parser.parse_args(argv)
    if not args.tasks.strip() and not args.perplexity:
        parser.error("name --tasks, --perplexity DATA_DIR, or both")
    if args.limit is not None and args.limit <= 0:
        parser.error(f"--limit={args.limit} must be positive")
    if args.limit is not None and args.limit >= 1:
        if args.limit != int(args.limit):
            parser.error(f"--limit={args.limit} must be a whole number of documents, or a fraction below 1")
        args.limit = int(args.limit)
    if args.workers < 1:
        parser.error(f"--workers={args.workers} must be at least 1")
    if args.batch_size < 1:
        parser.error(f"--batch-size={args.batch_size} must be at least 1")
    return args


def evaluate(args: argparse.Namespace) -> tuple[Path, dict, list[Row], str]:
    """Check the request, run lm-eval; (checkpoint dir, lm-eval results, table rows, table markdown)."""
    # Datasets and tokenizers come from local files or the HF cache, never from a hub at run time;
    # set HF_DATASETS_OFFLINE=0 in the environment to let lm-eval download its real tasks.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ckpt = check_checkpoint(args.checkpoint, args.tokenizer)
    names = expand_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
    manager = None
    if names:
        manager = task_manager(names, args.include_path)
        check_task_names(names, manager)
        check_tasks_have_documents(names, manager)
    validation = None
    if args.perplexity:
        config = json.loads((ckpt / "model.json").read_text())
        validation = open_validation(args.perplexity, config["max_position_embeddings"])

    import lm_eval

    from openllama.eval.backend import OpenLlamaLM

    ray_started_here = args.workers > 1 and not _ray_running()
    try:
        lm = OpenLlamaLM(str(ckpt), tokenizer=args.tokenizer, batch_size=args.batch_size, workers=args.workers)
        results: dict = {"results": {}}
        if names:
            results = lm_eval.simple_evaluate(
                model=lm, tasks=names, num_fewshot=args.num_fewshot, limit=args.limit, task_manager=manager,
                log_samples=False, random_seed=args.seed, numpy_random_seed=args.seed,
                torch_random_seed=args.seed, fewshot_random_seed=args.seed,
            )
        rows = table_rows(results)
        if validation is not None:
            heldout = held_out_perplexity(lm, validation)
            results["perplexity"] = {f"{r.task}/{r.metric}": r.value for r in heldout}
            rows += heldout
    finally:
        if ray_started_here:
            import ray

            ray.shutdown()
    return ckpt, results, rows, render_table(rows, ckpt.name, args.compare)


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()


def write_outputs(out_dir: Path, results: dict, table: str) -> tuple[Path, Path]:
    """results.json and table.md in out_dir, each written under a temporary name and renamed."""
    from lm_eval.utils import handle_non_serializable

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in (("results.json", json.dumps(results, indent=2, default=handle_non_serializable)),
                       ("table.md", table)):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.rename(out_dir / name)
        paths.append(out_dir / name)
    return paths[0], paths[1]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        ckpt, results, rows, table = evaluate(args)
    except EvalInputError as error:
        print(f"openllama eval: {error}", file=sys.stderr)
        return 2
    print(table)
    with tempfile.TemporaryDirectory() as scratch:
        results_path, table_path = write_outputs(Path(args.output or scratch), results, table)
        if not args.no_mlflow:
            tags = {"checkpoint": str(ckpt), "checkpoint_name": ckpt.name, **training_origin(ckpt)}
            params = {"tasks": args.tasks, "limit": args.limit, "num_fewshot": args.num_fewshot,
                      "batch_size": args.batch_size, "workers": args.workers, "seed": args.seed,
                      "tokenizer": args.tokenizer or "checkpoint"}
            run_id = log_to_mlflow(rows, results_path, table_path, tags, params)
            print(f"MLflow run {run_id} in experiment {EXPERIMENT!r}")
    if args.output:
        print(f"wrote {results_path} and {table_path}")
    return 0
