"""Training end to end on a real packed dataset: in one process, and under Ray Train's JaxTrainer with
1 and 2 real worker processes (one jax.distributed system over gloo), a run resumed onto another mesh.
Faults come from outside the product: a train step wrapped by the test. (A worker SIGKILLed mid-run is in
tests/faults/test_train_faults.py; 2 workers against 1, on two hosts, in tests/test_multihost.py.)"""

from __future__ import annotations

import io
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import pytest

import harness
from openllama.train.checkpoint import RunDir, load_model
from openllama.train.config import TrainConfig, load_config
from openllama.train.trainer import NonFiniteLoss, Trainer

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 32
STEPS = 10


@pytest.fixture(scope="module")
def dataset(packed_sample) -> Path:
    return packed_sample


@pytest.fixture(scope="module")
def base(dataset, tmp_path_factory) -> list[str]:
    """Overrides every run here shares: the dataset, a short schedule, and one JAX compilation cache."""
    return harness.short_run(dataset, SEQ_LEN, STEPS, tmp_path_factory.mktemp("jax_cache"))


def tiny(base: list[str], out: Path, *overrides: str) -> TrainConfig:
    return load_config("tiny-cpu", [*base, f"output_dir={out}", *overrides])


@dataclass
class Finished:
    config: TrainConfig
    run_id: str | None
    tracking_uri: str

    def history(self, key: str = "loss") -> dict[int, list[float]]:
        from mlflow.tracking import MlflowClient

        steps: dict[int, list[float]] = {}
        for metric in MlflowClient(self.tracking_uri).get_metric_history(self.run_id, key):
            steps.setdefault(metric.step, []).append(metric.value)
        return steps

    def losses(self) -> dict[int, float]:
        return {step: values[0] for step, values in self.history().items()}

    def final_params(self):
        """The newest checkpoint's params on this process's one device (it was saved by 1 or 2 processes)."""
        return load_model(RunDir(self.config.run_dir).latest()[1])[1]


def train(ray_head, overrides: list[str], tracking_uri: str) -> Finished:
    """`openllama train tiny-cpu OVERRIDES` as a client of the Ray head, as a user runs it."""
    harness.on_cluster(ray_head, sys.executable, "-m", "openllama.cli", "train", "tiny-cpu", *overrides,
               tracking_uri=tracking_uri)
    config = load_config("tiny-cpu", overrides)
    return Finished(config, RunDir(config.run_dir).tracking_run_id(), tracking_uri)


@pytest.fixture(scope="module")
def one_worker(ray_head, base, tmp_path_factory) -> Finished:
    """One worker, submitted with `ray job submit --working-dir . -- openllama train ...`."""
    from openllama.ray_jobs import submit

    out = tmp_path_factory.mktemp("one_worker")
    tracking_uri = f"sqlite:///{out}/mlruns.db"
    overrides = [*base, f"output_dir={out}", f"tracking.uri={tracking_uri}", "tracking.system_metrics_every_s=1"]
    submit(["openllama", "train", "tiny-cpu", *overrides], api_url=ray_head.dashboard_url,
           env={**os.environ, **ray_head.env}, working_dir=REPO, submission_id=f"train-{out.name}",
           echo=io.StringIO(), log_path=out / "job.log")
    config = load_config("tiny-cpu", overrides)
    return Finished(config, RunDir(config.run_dir).tracking_run_id(), tracking_uri)


@pytest.fixture(scope="module")
def fsdp_resumed(ray_head, base, one_worker, tmp_path_factory) -> Finished:
    """fsdp=2 over 2 workers, resumed from the 1-worker run's step-5 checkpoint."""
    out = tmp_path_factory.mktemp("fsdp_resumed")
    overrides = [*base, f"output_dir={out}", "scaling.num_workers=2", "mesh.dp=1", "mesh.fsdp=2"]
    shutil.copytree(RunDir(one_worker.config.run_dir).step_dir(5), RunDir(tiny(base, out).run_dir).step_dir(5))
    return train(ray_head, overrides, f"sqlite:///{out}/mlruns.db")


def assert_same_params(a, b, atol: float) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol)


# --- in one process (the worker loop without Ray) ----------------------------------------------------------


def run_in_process(config: TrainConfig, trainer_hook=None) -> dict:
    trainer = Trainer(config)
    if trainer_hook is not None:
        trainer_hook(trainer)
    return trainer.fit()


def poison_before_step(step: int):
    """Wrap the trainer's step so that the parameters turn NaN just before step `step` (1-based)."""

    def install(trainer: Trainer) -> None:
        real_step = trainer.train_step

        def step_with_nan(state, batch):
            if int(state["step"]) == step - 1:
                state = {**state, "params": jax.tree.map(lambda x: x * float("nan"), state["params"])}
            return real_step(state, batch)

        trainer.train_step = step_with_nan

    return install


def test_loss_falls_on_the_sample_corpus(base, tmp_path):
    config = tiny(base, tmp_path, "train.steps=40", "tracking.enabled=false", "eval.every_steps=0",
                  "checkpoint.every_steps=40")
    final = run_in_process(config)
    initial_loss = float(np.log(config.llama().vocab_size))  # uniform prediction at init
    assert final["loss"] < initial_loss - 1.0


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(base, tmp_path):
    config = tiny(base, tmp_path, "checkpoint.every_steps=2", "tracking.enabled=false", "eval.every_steps=0")
    with pytest.raises(NonFiniteLoss, match=r"step 3: loss=nan .* last good checkpoint"):
        run_in_process(config, poison_before_step(3))
    assert [step for step, _ in RunDir(config.run_dir).complete_checkpoints()] == [2]


def test_nonfinite_loss_is_skipped_when_configured(base, tmp_path):
    config = tiny(base, tmp_path, "train.on_nonfinite=skip", "tracking.enabled=false", "eval.every_steps=0")
    assert run_in_process(config, poison_before_step(9))["step"] == STEPS


# --- under Ray Train -------------------------------------------------------------------------------------


def test_fsdp_run_resumed_from_a_one_worker_checkpoint_continues_the_same_curve(one_worker, fsdp_resumed):
    single, resumed = one_worker.losses(), fsdp_resumed.losses()
    assert sorted(resumed) == list(range(6, STEPS + 1))
    for step in resumed:
        assert abs(single[step] - resumed[step]) <= 1e-5, step
    assert_same_params(fsdp_resumed.final_params(), one_worker.final_params(), atol=1e-5)


def test_held_out_perplexity_is_logged_per_subset(one_worker):
    from openllama.data.shards import PackedDataset

    subsets = PackedDataset.open(one_worker.config.data.path, split="validation").subsets
    assert subsets
    for subset in subsets:
        ppl = one_worker.history(f"val/{subset}/ppl")
        loss = one_worker.history(f"val/{subset}/loss")
        assert sorted(ppl) == [5, 10]
        assert ppl[10][0] == pytest.approx(np.exp(loss[10][0]), rel=1e-5)


def test_run_records_throughput_and_mfu(one_worker):
    for key in ("tokens_per_s", "mfu", "grad_norm", "learning_rate", "tokens_seen", "step_time_s", "data_wait_s"):
        assert sorted(one_worker.history(key)) == list(range(1, STEPS + 1)), key
    assert one_worker.history("tokens_seen")[STEPS][0] == STEPS * 8 * SEQ_LEN


def test_run_records_system_metrics(one_worker):
    from mlflow.tracking import MlflowClient

    metrics = MlflowClient(one_worker.tracking_uri).get_run(one_worker.run_id).data.metrics
    assert metrics["system/cpu_utilization_percentage"] >= 0
    assert metrics["system/system_memory_usage_megabytes"] > 0


def test_step_checkpoint_is_a_model_checkpoint(one_worker):
    config, params, tokenizer = load_model(one_worker.config.run_dir)
    assert config == one_worker.config.llama()
    assert tokenizer is not None and tokenizer.is_file()
    assert params["embed_tokens"]["embedding"].shape == (512, 64)


def test_mlflow_run_has_the_config_and_finishes(one_worker):
    from mlflow.tracking import MlflowClient

    run = MlflowClient(one_worker.tracking_uri).get_run(one_worker.run_id)
    assert run.data.params["train.global_batch_size"] == "8"
    assert run.data.params["optimizer.b2"] == "0.95"
    assert run.info.status == "FINISHED"


def test_partial_checkpoint_is_removed_and_never_loaded(base, tmp_path):
    config = tiny(base, tmp_path, "tracking.enabled=false", "eval.every_steps=0")
    run = RunDir(config.run_dir)
    partial = run.step_dir(7) / "state" / "ocdbt.process_0"  # a save cut short: no state.json
    partial.mkdir(parents=True)
    (partial / "manifest.ocdbt").write_bytes(b"half")
    (run.step_dir(7) / "model.json").write_text("{}")
    earlier = run.checkpoints / ".step_00000005.tmp"  # what an earlier version's crashed save left
    (earlier / "params").mkdir(parents=True)
    assert run.complete_checkpoints() == []
    run_in_process(config)
    assert not run.step_dir(7).exists() and not earlier.exists()
    assert [step for step, _ in run.complete_checkpoints()] == [5, STEPS]


def test_openllama_train_runs_as_a_ray_job(one_worker):
    log = (Path(one_worker.config.output_dir) / "job.log").read_text()
    assert "trained tiny-cpu" in log
    assert RunDir(one_worker.config.run_dir).latest() == (STEPS, RunDir(one_worker.config.run_dir).step_dir(STEPS))


def test_rolling_saves_keep_only_the_newest_beside_the_milestones(base, tmp_path):
    """checkpoint.every_minutes (here 30 ms): saves between the milestones, of which only the newest is ever
    kept; the final step is a milestone and replaces it."""
    from openllama.train.trainer import Hook

    config = tiny(base, tmp_path, "tracking.enabled=false", "eval.every_steps=0", "checkpoint.every_steps=100",
                  "checkpoint.every_minutes=0.0005")
    run = RunDir(config.run_dir)
    seen: list[tuple[int, list[int]]] = []

    class Listings(Hook):
        def on_checkpoint(self, step: int, path, metrics: dict) -> None:
            seen.append((step, [s for s, _ in run.complete_checkpoints()]))

    Trainer(config, [Listings()]).fit()
    rolling = [step for step, _ in seen if step != STEPS]
    assert len(rolling) >= 2, seen  # saved more than once between milestones
    assert all(listed == [step] for step, listed in seen), seen  # each save, once complete, is the only one
    assert [s for s, _ in run.complete_checkpoints()] == [STEPS]


def test_sigterm_to_a_lone_training_process_saves_the_step_it_reached(base, tmp_path):
    """No Ray, no jax.distributed (a notebook's Trainer): Python's own handler notices, the step is saved."""
    run = RunDir(tmp_path / "tiny-cpu")
    code = ("import sys; from openllama.commands import quiet_libraries; from openllama.train.config import "
            "load_config; from openllama.train.trainer import Trainer, Hook; quiet_libraries()\n"
            "class Steps(Hook):\n    def after_step(self, step, metrics): print(step, flush=True)\n"
            "Trainer(load_config('tiny-cpu', sys.argv[1:]), [Steps()]).fit()")
    proc = harness.start([sys.executable, "-c", code, *base, f"output_dir={tmp_path}", "tracking.enabled=false",
                          "eval.every_steps=0", "train.steps=100000", "checkpoint.every_steps=100000"],
                         harness.clean_env(JAX_PLATFORMS="cpu"), cwd=REPO)
    try:
        reached = int(proc.stdout.readline())  # one step done: the loop runs
        for _ in range(20):
            reached = int(proc.stdout.readline())
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            harness.kill_group(proc)
    assert proc.returncode == 1, err[-3000:]
    (saved,) = [step for step, _ in run.complete_checkpoints()]
    assert saved >= reached
    assert f"preempted at step {saved}: saved as {run.step_dir(saved)}" in err
