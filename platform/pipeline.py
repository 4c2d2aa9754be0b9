"""`openllama pipeline` (what `make demo` runs): every stage, as Ray jobs, on a local Ray head and MLflow.

    texts -> dedup -> tokenizer -> data -> train -> eval -> export -> generate, then the endpoint

`texts` (openllama eval texts) writes the item texts of the tasks the eval stage runs; `dedup` (openllama
data dedup) filters the corpus, decontaminates it against those texts and deduplicates it; the tokenizer
and data stages read its output (OUT/dedup, a RedPajama corpus) instead of the raw corpus; the data run is
tagged with what it kept (`dedup_kept`). So data learns what eval runs from a file, and imports nothing of eval.

Each stage is one `openllama ...` command submitted with `ray job submit`, so it runs exactly as a user
would run it on a cluster. A stage is skipped when its ledger entry (OUT/ledger/STAGE.json, the format of
`openllama.data.work`) says it already finished with the same key: a content hash of its inputs, its command
line and the code. A stage whose key changed starts from clean outputs; one that crashed with the same key is
resumed by its own command.

The endpoint: after the stages, `openllama serve RUN_DIR --detach` (a Ray job too) puts the trained model
behind OpenAI's completions API on the cluster's head, on 127.0.0.1 at the port it had before (OUT/services/
serve.json), and the pipeline's last line is a `curl` against it. `--down` (`make down`) deletes it first.

Lineage: after the stages ran, the pipeline ties their MLflow runs together with tags (see docs/platform.md):
data run (tokenizer and manifest as artifacts, their hashes) <- train run (dataset/tokenizer hashes, git
commit, preset, data run id) <- eval run (training run id and checkpoint step, set by `openllama eval`; the
registered model version it evaluated). The export stage registers the final model in MLflow's model
registry under the run's name (`export-hf --register`), so training itself does not export it a second time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow

from openllama import commands, files, ray_jobs, services, tracking
from openllama.config import FLAG, METAVAR
from openllama.data.shards import PackedDataset
from openllama.data.work import Ledger, settings_sha
from openllama.train.checkpoint import RunDir
from openllama.train.config import load_config

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CORPUS = REPO / "data" / "sample" / "redpajama"
PROMPT = r"Q: What is the largest animal?\nA:"  # `openllama generate` turns \n into a newline
CODE_DIRS = ("platform", "data", "train", "eval", "configs")
CODE_SUFFIXES = {".py", ".yaml", ".yml"}
RUN_NAME = "pipeline-tiny"
SERVE_STATE = "serve.json"  # the endpoint's port and the job API it was deployed through
EVAL_TASKS = "openllama_local"  # what the eval stage runs, and so what the corpus is decontaminated against


@dataclass
class Stage:
    """One `openllama` command run as a Ray job; `inputs` key its reuse, `outputs` are what it makes."""

    name: str
    command: list[str]
    inputs: list[Path]
    outputs: list[Path]
    facts: dict[str, Any] = field(default_factory=dict)  # recorded in the ledger (run ids, hashes)


def content_hash(paths: Iterable[Path], suffixes: set[str] | None = None, root: Path | None = None) -> str:
    """sha256 over the names (relative to `root`) and bytes of every file in `paths` (files, or folders)."""
    digest = hashlib.sha256()
    for path in paths:
        for found in map(Path, files.files_under(path) if path.is_dir() else [path] if path.is_file() else []):
            if suffixes is None or found.suffix in suffixes:
                digest.update(str(found.relative_to(root) if root else found).encode() + b"\0")
                digest.update(files.sha256_of(found).encode() + b"\0")
    return digest.hexdigest()


def code_version() -> str:
    """A hash of the project's code and configs: a change anywhere reruns every stage (safe, simple)."""
    return content_hash([REPO / d for d in CODE_DIRS if (REPO / d).is_dir()], CODE_SUFFIXES, root=REPO)


def git_commit() -> str:
    """HEAD's commit, with `-dirty` when the work tree has changes; `unknown` outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def stage_identity(stage: Stage, code: str) -> dict[str, Any]:
    """What a stage's result depends on; its hash is the stage's key (its ledger entry's settings hash)."""
    identity = {"command": stage.command, "inputs_sha256": content_hash(stage.inputs), "code": code}
    return {**identity, "key": settings_sha(identity)}


def rerun_reason(ledger: dict, identity: dict) -> str:
    if not ledger:
        return "first run"
    changed = [name for name in ("command", "inputs_sha256", "code") if ledger.get(name) != identity[name]]
    if changed:
        return "changed: " + ", ".join(changed)
    return "resuming an unfinished run" if ledger.get("status") == "running" else "outputs missing"


def new_submission_id(what: str) -> str:
    """A Ray job's submission id: what it runs, when, and a random suffix (ids are never reused)."""
    return f"openllama-{what}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


@dataclass
class Runner:
    """Runs stages in order on one cluster, reusing what the ledger says is done."""

    out: Path
    api_url: str
    client_env: dict[str, str]
    job_env: dict[str, str]  # env_vars of every job (tracking URI, offline switches)
    code: str
    ran: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    say: Any = print  # one line per stage for the person watching; the jobs' own output goes to their logs

    def run(self, stage: Stage) -> dict:
        """The stage's ledger entry after making sure it is done (run now, or reused)."""
        identity = stage_identity(stage, self.code)
        ledger = Ledger(str(self.out / "ledger"), identity["key"])
        previous = ledger.read(stage.name) or {}
        done = ledger.entry(stage.name) is not None and previous.get("status") == "done"
        if done and all(p.exists() for p in stage.outputs):
            self.say(f"  {stage.name:<9} reused (inputs, command and code unchanged)")
            self.reused.append(stage.name)
            return previous
        reason = rerun_reason(previous, identity)
        if previous.get("settings_sha") != identity["key"]:  # new inputs or settings: never resume on old outputs
            for path in stage.outputs:
                if path.is_dir():
                    files.remove_tree(path)
                else:
                    files.remove_file(path)
        submission_id = new_submission_id(stage.name)
        started = time.time()
        entry = {"stage": stage.name, **identity, "status": "running", "submission_id": submission_id,
                 "started": started}
        ledger.record(stage.name, entry)
        log_path = self.out / "logs" / f"{stage.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        output = ray_jobs.submit(stage.command, api_url=self.api_url, env=self.client_env, working_dir=REPO,
                                 submission_id=submission_id, env_vars=self.job_env, log_path=log_path, echo=None)
        missing = [str(p) for p in stage.outputs if not p.exists()]
        if missing:
            raise ray_jobs.JobFailed(f"stage {stage.name} succeeded but did not write {missing}; log {log_path}")
        entry.update(status="done", seconds=round(time.time() - started, 1), **stage.facts,
                     **facts_from_output(output))
        entry = ledger.record(stage.name, entry)
        self.say(f"  {stage.name:<9} done in {entry['seconds']:>5.1f} s   ({reason})")
        self.ran.append(stage.name)
        return entry


def facts_from_output(output: str) -> dict[str, str]:
    """What a stage printed that later stages need: `openllama eval` prints its MLflow run id, `export-hf
    --register` the model version it registered."""
    facts = {}
    if match := re.search(r"MLflow run (\w+) in experiment", output):
        facts["mlflow_run_id"] = match.group(1)
    if match := re.search(r"registered models:/(\S+)/(\d+) ", output):
        facts["model_name"], facts["model_version"] = match.groups()
    return facts


def dataset_hash(dataset: Path) -> str:
    """The packed dataset's identity: its shards' paths and sha256s, from the manifest."""
    manifest = PackedDataset.open(str(dataset)).manifest
    shards = sorted((s["path"], s["sha256"]) for s in manifest["shards"])
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()


def build_stages(out: Path, corpus: Path, train_config: str, train_overrides: list[str],
                 eval_limit: int | None, sample_docs: int, max_new_tokens: int) -> list[Stage]:
    tokenizer_dir, dataset, eval_dir, hf_dir = out / "tokenizer", out / "dataset", out / "eval", out / "hf"
    deduplicated, texts = out / "dedup", out / "eval_texts.json"
    overrides = [f"name={RUN_NAME}", f"output_dir={out / 'train'}", f"data.path={dataset}",
                 f"data.tokenizer={tokenizer_dir / 'tokenizer.model'}", "data.build_from=null",
                 "scaling.num_workers=2", "tracking.register_model=false", *train_overrides]  # export registers
    config = load_config(train_config, overrides)  # fails here, before any job, on a bad setting
    if Path(train_config).is_file():  # jobs run in an uploaded copy of the repo: name the file inside it
        path = Path(train_config).absolute()
        train_config = str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
    run_dir = config.run_dir
    generated = out / "generate" / "output.txt"
    eval_command = ["openllama", "eval", str(run_dir), "--tasks", EVAL_TASKS, "--output", str(eval_dir)]
    if eval_limit is not None:
        eval_command += ["--limit", str(eval_limit)]
    generate = ["openllama", "generate", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", str(max_new_tokens),
                "--output", str(generated)]
    model = tokenizer_dir / "tokenizer.model"
    vocab_size = config.llama().vocab_size
    return [
        Stage("texts", ["openllama", "eval", "texts", EVAL_TASKS, "--out", str(texts)],
              inputs=[*sorted((REPO / "eval" / "tasks").glob("*.yaml")), REPO / "eval" / "tasks" / "data"],
              outputs=[texts]),  # the task definitions and their data (not the __pycache__ lm-eval leaves there)
        Stage("dedup", ["openllama", "data", "dedup", str(corpus), "--out", str(deduplicated),
                        "--decontaminate", str(texts)],
              inputs=[corpus, texts], outputs=[deduplicated]),
        Stage("tokenizer", ["openllama", "tokenizer", "train", str(deduplicated), "--out", str(tokenizer_dir),
                            "--vocab-size", str(vocab_size), "--sample-docs", str(sample_docs)],
              inputs=[deduplicated], outputs=[tokenizer_dir]),
        Stage("data", ["openllama", "data", "tokenize", str(deduplicated), "--tokenizer", str(model),
                       "--out", str(dataset), "--seq-len", str(config.train.seq_len)],
              inputs=[deduplicated, model], outputs=[dataset], facts={"corpus": str(corpus)}),
        Stage("train", ["openllama", "train", train_config, *overrides], inputs=[dataset, model],
              outputs=[run_dir], facts={"preset": config.model.preset, "config": train_config}),
        Stage("eval", eval_command, inputs=[run_dir / "checkpoints"], outputs=[eval_dir / "results.json"]),
        Stage("export", ["openllama", "export-hf", str(run_dir), str(hf_dir), "--register", RUN_NAME],
              inputs=[run_dir / "checkpoints"], outputs=[hf_dir]),
        Stage("generate", generate, inputs=[run_dir / "checkpoints"], outputs=[generated]),
    ]


def record_lineage(client: Any, out: Path, ledgers: dict[str, dict], commit: str) -> dict[str, str]:
    """Tie the stages' MLflow runs together with tags and artifacts; returns {stage: run id}."""
    tokenizer = out / "tokenizer" / "tokenizer.model"
    dataset = out / "dataset"
    hashes = {"tokenizer_sha256": files.sha256_of(tokenizer), "dataset_sha256": dataset_hash(dataset)}
    runs: dict[str, str] = {}

    data_runs = client.search_runs(
        [client.get_experiment_by_name("data").experiment_id],
        filter_string=f"params.out_dir = '{dataset}'", order_by=["attributes.start_time DESC"], max_results=1,
    ) if client.get_experiment_by_name("data") else []
    if data_runs:
        runs["data"] = data_runs[0].info.run_id
        for key, value in hashes.items():
            client.set_tag(runs["data"], key, value)
        client.set_tag(runs["data"], "corpus", ledgers["data"]["corpus"])
        dedup_total = json.loads((out / "dedup" / "stats.json").read_text())["total"]
        client.set_tag(runs["data"], "dedup_kept", f"{dedup_total['kept']} of {dedup_total['documents']} documents")
        artifacts = client.list_artifacts(runs["data"], "tokenizer")
        if not artifacts:
            client.log_artifact(runs["data"], str(tokenizer), "tokenizer")
            client.log_artifact(runs["data"], str(out / "tokenizer" / "tokenizer_settings.json"), "tokenizer")
            client.log_artifact(runs["data"], str(dataset / "manifest.json"), "dataset")

    train_run_id = RunDir(out / "train" / RUN_NAME).tracking_run_id()  # recorded by `openllama train`
    if train_run_id:
        runs["train"] = train_run_id
        tags = {**hashes, "git_commit": commit, "preset": ledgers["train"]["preset"],
                "train_config": ledgers["train"]["config"]}
        if "data" in runs:
            tags["data_run_id"] = runs["data"]
        for key, value in tags.items():
            client.set_tag(runs["train"], key, value)

    if ledgers["eval"].get("mlflow_run_id"):
        runs["eval"] = ledgers["eval"]["mlflow_run_id"]  # `openllama eval` tags training run and step itself
        client.set_tag(runs["eval"], "git_commit", commit)
        if ledgers["export"].get("model_version"):  # the same newest checkpoint of the run, registered
            client.set_tag(runs["eval"], "model_name", ledgers["export"]["model_name"])
            client.set_tag(runs["eval"], "model_version", ledgers["export"]["model_version"])
    return runs


def start_endpoint(runner: Runner, state: Path, run_dir: Path) -> str:
    """Serve the run's newest checkpoint (`openllama serve --detach`, as a Ray job) at the port it had before,
    so that a rerun replaces it in place; returns the line to end with: its URL and the `curl` it printed."""
    record = files.read_json(state / SERVE_STATE) if (state / SERVE_STATE).exists() else {}
    port = record.get("port") or services.free_port()
    files.write_json(state / SERVE_STATE, {"port": port, "api_url": runner.api_url})
    # no CPU reserved: the endpoint idles between requests, and a rerun's training needs the head's CPUs
    command = ["openllama", "serve", str(run_dir), "--detach", "--port", str(port), "--name", RUN_NAME,
               "--num-cpus", "0"]
    output = ray_jobs.submit(command, api_url=runner.api_url, env=runner.client_env, working_dir=REPO,
                             submission_id=new_submission_id("serve"),
                             env_vars=runner.job_env, log_path=runner.out / "logs" / "serve.log", echo=None)
    started = next(line for line in reversed(output.splitlines()) if line.startswith("openllama serve:"))
    curl = started.split("try: ", 1)[1]
    return f"endpoint: {RUN_NAME} at http://127.0.0.1:{port}/v1 (make down ends it); try: {curl}"


def stop_endpoint(state: Path) -> str | None:
    """Delete the endpoint `start_endpoint` recorded (`openllama serve --stop`, as a Ray job on the cluster it
    was deployed through: the recorded local head, or an existing cluster); what was stopped."""
    if not (state / SERVE_STATE).exists():
        return None
    record = files.read_json(state / SERVE_STATE)
    head = services.read_ray_head(state)
    try:
        env = {**os.environ, **head.env} if head is not None and head.pids() else ray_jobs.client_env(record["api_url"])
        ray_jobs.submit(["openllama", "serve", "--stop"], api_url=record["api_url"], env=env, working_dir=REPO,
                        submission_id=new_submission_id("serve-stop"),
                        log_path=state.parent / "logs" / "serve.log", echo=None)
    except ray_jobs.RayAuthError as error:
        raise commands.WorkFailed(str(error)) from error
    except (ConnectionError, ray_jobs.JobFailed) as error:  # the cluster is gone, and the endpoint with it
        files.remove_file(state / SERVE_STATE)
        return f"endpoint on port {record['port']} (could not reach {record['api_url']}: record removed; {error})"
    files.remove_file(state / SERVE_STATE)
    return f"endpoint http://127.0.0.1:{record['port']}/v1"


def start_services(state: Path) -> tuple[services.RayHead, services.MlflowServer]:
    """The recorded local services when they still run, else new ones."""
    head = services.read_ray_head(state)
    if head is None or not head.pids():
        if head is not None:
            services.stop_ray_head(head)  # a stale record (machine restarted, processes killed)
        print(f"  starting a Ray head on 127.0.0.1 (state in {state})")
        head = services.start_ray_head(state)
    server = services.read_mlflow_server(state)
    if server is None or not server.pids():
        print(f"  starting an MLflow server on 127.0.0.1 (store in {state})")
        server = services.start_mlflow_server(state, port=server.port if server else None)
    return head, server


@dataclass
class PipelineConfig:
    """`openllama pipeline`: where its outputs go, what it runs on, and the settings of its stages."""

    out: str = ".demo"  # folder for services, outputs, ledgers and logs
    corpus: str = str(SAMPLE_CORPUS)  # RedPajama jsonl folder (the default is the shipped sample)
    train_config: str = "configs/train/tiny-cpu.yaml"  # the training config `openllama train` runs
    # extra `openllama train` setting, e.g. train.steps=50
    train_overrides: list[str] = field(default_factory=list,
                                       metadata={FLAG: "--train-override", METAVAR: "KEY=VALUE"})
    sample_docs: int = 2000  # documents the tokenizer trains on
    eval_limit: int | None = None  # documents per eval task (None: all)
    max_new_tokens: int = 32  # tokens the generate stage writes
    # an existing cluster's job API, e.g. http://127.0.0.1:8265, whose outputs folder this machine shares;
    # RAY_API_SERVER_ADDRESS when not given; None: start (or reuse) a Ray head on 127.0.0.1
    api_address: str | None = field(default_factory=lambda: os.environ.get("RAY_API_SERVER_ADDRESS"))
    down: bool = False  # stop the endpoint and the services recorded in `out`, and exit


def pipeline_command(config: PipelineConfig) -> int:
    """Run tokenizer -> data -> train -> eval -> export -> generate as Ray jobs, each reused when already done.
    Without --api-address it starts (or reuses) a Ray head and an MLflow server on 127.0.0.1."""
    return run_pipeline(config)


def run_pipeline(config: PipelineConfig) -> int:
    """Every stage, run or reused, then the lineage between their MLflow runs and a summary."""
    out = Path(config.out).absolute()
    state = out / "services"
    if config.down:
        stopped = [stop_endpoint(state), *services.stop_all(state)]
        stopped = [what for what in stopped if what]
        print("\n".join(f"stopped {s}" for s in stopped) or f"no services recorded in {state}")
        return 0
    corpus = Path(config.corpus).absolute()
    if not corpus.exists():
        raise commands.BadInput(f"corpus={corpus} does not exist")
    stages = build_stages(out, corpus, config.train_config, config.train_overrides, config.eval_limit,
                          config.sample_docs, config.max_new_tokens)  # a bad setting fails here, before any job

    started = time.time()
    head = None
    if config.api_address:
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
        if tracking_uri is None:
            raise commands.BadInput("with api_address, set MLFLOW_TRACKING_URI to a tracking server the cluster "
                                    "reaches")
        try:
            api_url, client_env = config.api_address, ray_jobs.client_env(config.api_address)
        except (ray_jobs.RayAuthError, ConnectionError) as error:
            raise commands.WorkFailed(str(error)) from error
    else:
        head, server = start_services(state)
        api_url, client_env = head.dashboard_url, {**os.environ, **head.env}
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or server.uri
    job_env = {"MLFLOW_TRACKING_URI": tracking_uri, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1"}
    runner = Runner(out, api_url, client_env, job_env, code_version())
    print(f"pipeline: {len(stages)} stages as Ray jobs on {api_url} (each job's output: {out}/logs/STAGE.log)")
    try:
        ledgers = {stage.name: runner.run(stage) for stage in stages}
    except ray_jobs.JobFailed as error:
        raise commands.WorkFailed(str(error)) from error

    runs = record_lineage(mlflow.MlflowClient(tracking_uri), out, ledgers, git_commit())
    files.write_json(out / "lineage.json", {"tracking_uri": tracking_uri, "runs": runs})
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # the links below are the UI of this store
    export = ledgers["export"]
    links = {"training run": tracking.run_link(runs["train"]) if "train" in runs else None,
             "eval run": tracking.run_link(runs["eval"]) if "eval" in runs else None,
             "model": tracking.model_link(export["model_name"], export["model_version"])
             if export.get("model_version") else None}
    summary = [
        f"\npipeline finished in {time.time() - started:.0f} s; ran: {', '.join(runner.ran) or 'nothing'}; "
        f"reused: {', '.join(runner.reused) or 'nothing'}",
        f"  MLflow UI      {tracking.experiment_link('openllama-train') or tracking_uri}   (model training view; "
        "experiments data, openllama-train, eval)",
        *(f"  {what:<14} {link}" for what, link in links.items() if link),
        f"  Ray dashboard  {api_url}" + (f"   (token: {head.token_path})" if head else ""),
        f"  outputs        {out}/tokenizer, dataset, train/{RUN_NAME}, eval, hf, generate/output.txt",
        f"  job logs       {out}/logs/STAGE.log   ledgers {out}/ledger/STAGE.json   runs {out}/lineage.json",
    ]
    api_flag = f" --api-address {config.api_address}" if config.api_address else ""
    summary.append(f"  stop           make down   (or: openllama pipeline --out {config.out} --down{api_flag}): the "
                   f"endpoint{', Ray and MLflow' if head else ''}")
    print("\n".join(summary))
    print("\ngenerated:\n" + (out / "generate" / "output.txt").read_text())
    try:
        endpoint = start_endpoint(runner, state, next(s for s in stages if s.name == "train").outputs[0])
    except ray_jobs.JobFailed as error:
        raise commands.WorkFailed(f"the endpoint did not start: {error}") from error
    print(endpoint)
    return 0
