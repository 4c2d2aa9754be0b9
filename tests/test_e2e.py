"""The whole pipeline as a user runs it: a real Ray head and MLflow server on loopback, every stage a Ray job.

One pipeline run (module fixture) on a reduced sample of the shipped corpus, then one assertion per test
on what it left: Ray jobs, MLflow runs with their lineage, the Hugging Face export, the generated text.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "redpajama"
RUN_NAME_SHOWN = "pipeline-tiny"  # the training run's name in the MLflow UI
STAGES = ["texts", "dedup", "tokenizer", "data", "train", "eval", "export", "generate"]
DOCS_PER_SUBSET = 12


def run_pipeline(out: Path, corpus: Path, ray_head, mlflow_server) -> subprocess.CompletedProcess:
    env = {**os.environ, **ray_head.env, "MLFLOW_TRACKING_URI": mlflow_server.uri,
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "openllama.cli", "pipeline", "--out", str(out), "--corpus", str(corpus),
        "--api-address", ray_head.dashboard_url, "--sample-docs", "200", "--eval-limit", "4", "--max-new-tokens", "8",
        "--train-override", "train.steps=8", "--train-override", "optimizer.warmup_steps=2",
        "--train-override", "train.log_every=2", "--train-override", "eval.every_steps=0",
    ]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The shipped sample, first DOCS_PER_SUBSET documents of each subset."""
    root = tmp_path_factory.mktemp("corpus")
    for path in sorted(SAMPLE.glob("*.jsonl")):
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)[:DOCS_PER_SUBSET]
        (root / path.name).write_text("".join(lines), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def demo(tmp_path_factory, corpus, ray_head, mlflow_server):
    """The pipeline's run; afterwards `--down` (what `make down` runs) deletes the endpoint it left up."""
    out = tmp_path_factory.mktemp("pipeline")
    result = run_pipeline(out, corpus, ray_head, mlflow_server)
    assert result.returncode == 0, f"pipeline failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    yield out, result
    url = endpoint_of(result)[0]
    down = subprocess.run([sys.executable, "-m", "openllama.cli", "pipeline", "--out", str(out), "--down"],
                          env={**os.environ, **ray_head.env}, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert down.returncode == 0 and f"stopped endpoint {url}" in down.stdout, down.stdout + down.stderr[-3000:]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/models", timeout=5)


def endpoint_of(result: subprocess.CompletedProcess) -> tuple[str, dict]:
    """The endpoint's URL and the body of the `curl` in the pipeline's last line."""
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("endpoint: pipeline-tiny at http://127.0.0.1:"), last
    url = re.search(r" at (http://127\.0\.0\.1:\d+/v1) ", last).group(1)
    assert f"curl {url}/completions -H 'Content-Type: application/json' -d '" in last
    return url, json.loads(last.rsplit(" -d ", 1)[1].strip("'"))


@pytest.fixture(scope="module")
def lineage(demo) -> dict[str, str]:
    out, _ = demo
    return json.loads((out / "lineage.json").read_text())["runs"]


@pytest.fixture(scope="module")
def client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(mlflow_server.uri)


def test_every_stage_ran_as_a_succeeded_ray_job(demo, ray_head):
    out, _ = demo
    ids = {stage: json.loads((out / "ledger" / f"{stage}.json").read_text())["submission_id"] for stage in STAGES}
    token = Path(ray_head.token_path).read_text().strip()
    request = urllib.request.Request(f"{ray_head.dashboard_url}/api/jobs/",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        jobs = {job["submission_id"]: job["status"] for job in json.loads(response.read())}
    assert {stage: jobs.get(job_id) for stage, job_id in ids.items()} == dict.fromkeys(STAGES, "SUCCEEDED")


def test_the_pipeline_prints_a_line_per_stage_and_where_to_look_not_the_jobs_logs(demo):
    out, result = demo
    printed = (result.stdout + result.stderr).splitlines()
    assert len(printed) <= 60, "\n".join(printed)
    for stage in STAGES:
        assert any(line.split()[:2] == [stage, "done"] for line in printed if line.strip()), stage
    assert any("MLflow UI" in line for line in printed)
    assert (out / "logs" / "train.log").read_text().count("step ") >= 2  # the job's own output is in its log


def test_the_pipeline_ends_with_the_trained_model_behind_an_endpoint_and_its_curl(demo):
    _, result = demo
    url, body = endpoint_of(result)
    answer = requests.post(f"{url}/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "pipeline-tiny" and answer.json()["usage"]["completion_tokens"] >= 1


def test_data_run_holds_the_tokenizer_and_manifest_with_their_hashes(demo, lineage, client):
    import hashlib

    out, _ = demo
    run = client.get_run(lineage["data"])
    tokenizer_sha = hashlib.sha256((out / "tokenizer" / "tokenizer.model").read_bytes()).hexdigest()
    assert run.data.tags["tokenizer_sha256"] == tokenizer_sha
    assert len(run.data.tags["dataset_sha256"]) == 64
    artifacts = {a.path for d in ("tokenizer", "dataset") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"tokenizer/tokenizer.model", "dataset/manifest.json"} <= artifacts


def test_training_run_is_tagged_with_data_lineage_and_logged_its_loss(lineage, client):
    run = client.get_run(lineage["train"])
    data = client.get_run(lineage["data"]).data.tags
    tags = run.data.tags
    assert tags["data_run_id"] == lineage["data"]
    assert (tags["dataset_sha256"], tags["tokenizer_sha256"]) == (data["dataset_sha256"], data["tokenizer_sha256"])
    assert tags["preset"] == "tiny" and tags["git_commit"]
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "loss")) >= 2


def test_training_scored_its_last_checkpoint_on_the_local_pack_while_it_ran(lineage, client):
    """tiny-cpu's `eval.tasks`: the final checkpoint (step 8) scored in the training run's own record."""
    history = client.get_metric_history(lineage["train"], "eval/local_arc/acc")
    assert [m.step for m in history] == [8]


def test_eval_run_names_the_training_run_and_checkpoint_step(lineage, client):
    tags = client.get_run(lineage["eval"]).data.tags
    assert tags["training_run_id"] == lineage["train"]
    assert tags["checkpoint_step"] == "8"


def test_eval_run_names_the_model_version_the_export_registered_from_the_training_run(lineage, client):
    tags = client.get_run(lineage["eval"]).data.tags
    version = client.get_model_version(tags["model_name"], tags["model_version"])
    assert tags["model_name"] == "pipeline-tiny"
    assert version.run_id == lineage["train"] and version.tags["checkpoint_step"] == tags["checkpoint_step"]


def test_export_loads_in_transformers(demo):
    import torch
    from transformers import LlamaForCausalLM

    out, _ = demo
    model = LlamaForCausalLM.from_pretrained(out / "hf", local_files_only=True)
    logits = model(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_generate_writes_the_prompt_and_a_continuation(demo):
    out, result = demo
    text = (out / "generate" / "output.txt").read_text()
    prompt = "Q: What is the largest animal?\nA:"
    assert text.startswith(prompt) and len(text) > len(prompt)
    assert prompt in result.stdout


def test_a_second_run_reuses_every_stage(demo, corpus, ray_head, mlflow_server):
    out, _ = demo
    ledgers = {s: (out / "ledger" / f"{s}.json").read_text() for s in STAGES}
    again = run_pipeline(out, corpus, ray_head, mlflow_server)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ran: nothing; reused: " + ", ".join(STAGES) in again.stdout, "\n".join(
        line for line in again.stdout.splitlines() if "ran:" in line or line.startswith("  "))[:3000]
    assert {s: (out / "ledger" / f"{s}.json").read_text() for s in STAGES} == ledgers


def test_runs_notebook_plots_loss_and_eval_results_from_mlflow(demo, mlflow_server, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "notebooks" / "runs.ipynb", as_version=4)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri, "MPLBACKEND": "Agg"}
    client = NotebookClient(notebook, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # the kernel's environment: given to execute(), NotebookClient() ignores it
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    text = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert len(images) >= 2
    assert "pipeline-tiny" in text


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (.ci/run installs it as root)")
def test_the_printed_mlflow_links_open_the_runs_in_the_model_training_view(demo):
    """The links the pipeline printed, in headless Chromium: the training run's charts hold the loss and the
    scores of evaluation during training, its experiment's runs table names its dataset, the registry lists the
    model the export registered."""
    from playwright.sync_api import sync_playwright

    _, result = demo
    links = dict(re.findall(r"^  (MLflow UI|training run|model)\s+(http\S+)", result.stdout, re.MULTILINE))
    assert set(links) == {"MLflow UI", "training run", "model"}, result.stdout
    assert all("workflowType=machine_learning" in link for link in links.values())
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1200})

        def shown(url: str, wanted: str) -> str:
            page.goto(url)
            page.get_by_text(wanted, exact=False).first.wait_for(timeout=30_000)
            return page.inner_text("body")

        def charts(pattern: str) -> tuple[str, int]:
            """The charts whose metric matches `pattern` (the page's own chart search: many sections start
            folded), as the page's text and the number of plots drawn."""
            page.get_by_placeholder("Search metric charts").fill(pattern)
            page.wait_for_timeout(2_000)
            return page.inner_text("body"), page.locator(".js-plotly-plot").count()

        runs = shown(links["MLflow UI"], RUN_NAME_SHOWN)
        assert "Dataset" in runs and "dataset (" in runs and "Usage" not in runs  # not the GenAI overview
        page.goto(links["training run"].replace("?", "/model-metrics?"))
        page.get_by_placeholder("Search metric charts").wait_for(timeout=30_000)
        text, plots = charts("^loss$")
        assert f"{RUN_NAME_SHOWN} (loss)" in text and plots == 1
        text, plots = charts("^eval/local_arc/acc$")
        assert f"{RUN_NAME_SHOWN} (eval/local_arc/acc)" in text and plots == 1
        model = shown(links["model"], "pipeline-tiny")
        assert "version 1" in model.lower()
        browser.close()
