"""lm-eval tasks scored on checkpoints while training goes on (`eval.tasks`): Ray Train's asynchronous
validation, one Ray task per checkpoint, the scores in the training run's own MLflow record at the step.

One real `openllama train tiny-cpu` on the session's Ray head (10 steps, checkpoints at 5 and 10, the local
task pack), then resumed to 15; a third run whose evaluations time out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import harness
from openllama import cli, files
from openllama.eval.task_texts import TASK_PACK
from openllama.train.checkpoint import RunDir
from openllama.train.config import load_config

TASKS = "[local_arc,local_boolq]"
LIMIT = 4


def train(ray_head, dataset: Path, out: Path, steps: int, *extra: str) -> list[str]:
    overrides = [f"output_dir={out}", f"data.path={dataset}", "data.build_from=null", f"train.steps={steps}",
                 "train.seq_len=32", "train.global_batch_size=8",
                 "train.log_every=1", "optimizer.warmup_steps=2", "checkpoint.every_steps=5", "eval.every_steps=0",
                 f"eval.tasks={TASKS}", f"eval.tasks_limit={LIMIT}", f"tracking.uri=sqlite:///{out}/mlruns.db",
                 *extra]
    harness.on_cluster(ray_head, sys.executable, "-m", "openllama.cli", "train", "tiny-cpu", *overrides,
                       tracking_uri=f"sqlite:///{out}/mlruns.db")
    return overrides


def history(out: Path, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlruns.db")
    run_id = RunDir(out / "tiny-cpu").tracking_run_id()
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def dataset(packed_sample) -> Path:
    return packed_sample


@pytest.fixture(scope="module")
def trained(ray_head, dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scored")
    train(ray_head, dataset, out, 10)
    return out


def test_each_checkpoint_of_the_run_is_scored_in_the_training_runs_record_at_its_step(trained):
    """The command returns once the last evaluation finished: the record is complete when it exits."""
    assert [step for step, _ in history(trained, "eval/local_arc/acc")] == [5, 10]
    assert [step for step, _ in history(trained, "eval/average")] == [5, 10]
    assert [step for step, _ in history(trained, "loss")][-1] == 10  # beside the loss, in the same run


def test_the_scores_are_those_openllama_eval_gives_the_same_checkpoint(trained, monkeypatch):
    """...and that eval run records the task data it read as its MLflow dataset inputs."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{trained}/mlruns.db")
    checkpoint = RunDir(trained / "tiny-cpu").checkpoints / "step_00000005"
    assert cli.main(["eval", str(checkpoint), "--tasks", "local_arc,local_boolq", "--limit", str(LIMIT),
                     "--output", str(trained / "eval5")]) == 0
    results = json.loads((trained / "eval5" / "results.json").read_text())["results"]
    for task in ("local_arc", "local_boolq"):
        assert dict(history(trained, f"eval/{task}/acc"))[5] == pytest.approx(results[task]["acc,none"], abs=1e-9)
    client = MlflowClient(f"sqlite:///{trained}/mlruns.db")
    (run,) = client.search_runs([client.get_experiment_by_name("eval").experiment_id])
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    arc = TASK_PACK / "data" / "arc.jsonl"
    assert set(inputs) == {"local_arc", "local_boolq"}
    assert inputs["local_arc"].dataset.digest == files.sha256_of(arc)[:36]
    assert json.loads(inputs["local_arc"].dataset.source)["uri"] == str(arc)
    assert [t.value for t in inputs["local_arc"].tags if t.key == "mlflow.data.context"] == ["evaluation"]


def test_the_training_run_records_its_dataset_as_an_mlflow_dataset(trained, dataset):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{trained}/mlruns.db")
    run = client.get_run(RunDir(trained / "tiny-cpu").tracking_run_id())
    (data,) = run.inputs.dataset_inputs
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert data.dataset.digest == files.sha256_of(dataset / "manifest.json")[:36]
    assert json.loads(data.dataset.source)["uri"] == str(dataset)
    profile = json.loads(data.dataset.profile)
    for subset in {s["subset"] for s in manifest["shards"]}:
        assert profile["train"][subset]["tokens"] == sum(
            s["tokens"] for s in manifest["shards"] if (s["split"], s["subset"]) == ("train", subset))
    assert [t.value for t in data.tags if t.key == "mlflow.data.context"] == ["training"]


def test_a_resumed_run_scores_only_the_steps_it_adds(ray_head, dataset, trained):
    train(ray_head, dataset, trained, 15)
    assert [step for step, _ in history(trained, "eval/average")] == [5, 10, 15]


def test_an_evaluation_that_runs_out_of_time_is_logged_and_training_finishes(ray_head, dataset, tmp_path):
    train(ray_head, dataset, tmp_path, 5, "eval.tasks_timeout_s=0.5")
    assert RunDir(tmp_path / "tiny-cpu").latest()[0] == 5
    assert history(tmp_path, "eval/average") == []


def test_an_unknown_task_is_refused_before_training(tmp_path, capsys):
    overrides = [f"output_dir={tmp_path}", "eval.tasks=[local_arcc]", "data.build_from=null",
                 f"data.path={tmp_path}/none"]
    assert cli.main(["train", "tiny-cpu", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("openllama train: eval.tasks: unknown task 'local_arcc'") and len(err.splitlines()) == 1


def test_tasks_are_scored_only_on_saved_checkpoints():
    with pytest.raises(ValueError, match="eval.tasks_every_steps=7 must be a multiple of checkpoint.every_steps=5"):
        load_config("tiny-cpu", ["checkpoint.every_steps=5", "eval.tasks=[local_arc]", "eval.tasks_every_steps=7"])
