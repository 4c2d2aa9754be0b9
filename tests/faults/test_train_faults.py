"""Faults during training: a Ray Train worker SIGKILLed mid-run, a process killed in the middle of an
asynchronous checkpoint save, a worker and then the driver sent SIGTERM (a preemption, `ray job stop`), the
MLflow server stopped and started again, a loss that diverges to NaN/Inf."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import harness as faults

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
# The run every fault is compared with: tiny model, 6 steps of 8 x 32 tokens, a checkpoint every 2 steps.
TINY = [f"train.steps={STEPS}", "train.seq_len=32", "train.global_batch_size=8", "train.log_every=1",
        "optimizer.warmup_steps=2", "checkpoint.every_steps=2", "checkpoint.keep=2", "eval.every_steps=0",
        "eval.tasks=[]", "device.peak_flops=1e11"]
TRAIN_IN_PROCESS = (
    "import sys; from openllama.commands import quiet_libraries; from openllama.train.config import load_config; "
    "from openllama.train.trainer import Trainer; quiet_libraries(); "
    "Trainer(load_config('tiny-cpu', sys.argv[1:])).fit()"
)


def overrides(packed, out: Path, *extra: str) -> list[str]:
    return [f"data.path={packed.path}", f"output_dir={out}", *TINY, *extra]


def config(packed, out: Path, *extra: str):
    from openllama.train.config import load_config

    return load_config("tiny-cpu", overrides(packed, out, *extra))


def final_params(run_dir: Path):
    from openllama.train.checkpoint import load_model

    return load_model(run_dir)[1]


def assert_same_params(a, b) -> None:
    import jax

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def checkpoint_steps(run_dir: Path) -> list[int]:
    from openllama.train.checkpoint import RunDir

    return [step for step, _ in RunDir(run_dir).complete_checkpoints()]


@pytest.fixture(scope="module")
def baseline(packed, tmp_path_factory) -> dict:
    """The uninterrupted run, in this process (no Ray): final loss, parameters and wall time."""
    from openllama.train.trainer import Trainer

    cfg = config(packed, tmp_path_factory.mktemp("baseline"), "tracking.enabled=false")
    started = time.perf_counter()
    result = Trainer(cfg).fit()
    return {"loss": result["loss"], "params": final_params(cfg.run_dir), "seconds": time.perf_counter() - started}


def loss_history(tracking_uri: str, run_id: str) -> dict[int, list[float]]:
    from mlflow.tracking import MlflowClient

    history: dict[int, list[float]] = {}
    for metric in MlflowClient(tracking_uri).get_metric_history(run_id, "loss"):
        history.setdefault(metric.step, []).append(metric.value)
    return history


# --- a Ray Train worker SIGKILLed ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_killed(packed, ray_head, tmp_path_factory) -> dict:
    """`openllama train` on the session's Ray head (FailureConfig max_failures=1); once the step-2 checkpoint
    is complete the worker process is SIGKILLed from outside, and Ray Train restarts the worker group."""
    out = tmp_path_factory.mktemp("worker_killed")
    tracking = f"sqlite:///{out}/mlruns.db"
    command = [str(Path(sys.executable).parent / "openllama"), "train", "tiny-cpu",
               *overrides(packed, out, "scaling.max_failures=1", f"tracking.uri={tracking}")]
    proc = faults.start(command, faults.clean_env(**ray_head.env), cwd=REPO)
    run_dir = out / "tiny-cpu"
    try:
        faults.wait_for(lambda: (run_dir / "checkpoints" / "step_00000002" / "state.json").is_file(), 400,
                        "the step-2 checkpoint", proc)
        (victim,) = faults.wait_for(lambda: faults.train_workers(ray_head), 30, "the train worker process", proc)
        victim.send_signal(signal.SIGKILL)
        killed_at = time.perf_counter()
        resume_step = checkpoint_steps(run_dir)[-1]
        stdout, stderr = proc.communicate(timeout=500)
    except BaseException:
        faults.kill_group(proc)
        raise
    return {"returncode": proc.returncode, "stderr": stderr, "run_dir": run_dir, "tracking": tracking,
            "victim": victim.pid, "resume_step": resume_step, "recovery_s": time.perf_counter() - killed_at}


def test_killed_worker_run_resumes_and_ends_with_the_uninterrupted_parameters(worker_killed, baseline,
                                                                               fault_report):
    assert worker_killed["returncode"] == 0, worker_killed["stderr"][-4000:]
    assert not psutil.pid_exists(worker_killed["victim"]) or \
        psutil.Process(worker_killed["victim"]).status() == psutil.STATUS_ZOMBIE
    assert_same_params(final_params(worker_killed["run_dir"]), baseline["params"])
    run_id = (worker_killed["run_dir"] / "mlflow_run_id").read_text().strip()
    history = loss_history(worker_killed["tracking"], run_id)
    assert history[STEPS][0] == pytest.approx(baseline["loss"], abs=1e-5)
    fault_report.fault = "train worker SIGKILLed mid-run (Ray Train)"
    fault_report.happened = (f"Ray Train restarted the worker group; it resumed from step "
                             f"{worker_killed['resume_step']} and ended on the uninterrupted run's loss and "
                             "parameters (atol 1e-5)")
    fault_report.lost = "0 steps (steps after the checkpoint recomputed)"
    fault_report.recovery_s = worker_killed["recovery_s"]


def test_killed_worker_run_logs_every_step_once_in_mlflow(worker_killed):
    run_id = (worker_killed["run_dir"] / "mlflow_run_id").read_text().strip()
    history = loss_history(worker_killed["tracking"], run_id)
    assert sorted(history) == list(range(1, STEPS + 1))
    assert all(len(values) == 1 for values in history.values()), history


# --- killed in the middle of a checkpoint save --------------------------------------------------------------


def partial_steps(checkpoints: Path) -> list[Path]:
    """Step folders a save has begun to write and not yet marked complete (no state.json)."""
    return [p for p in checkpoints.glob("step_*") if p.is_dir() and not (p / "state.json").exists()]


def test_a_save_cut_short_by_sigkill_is_ignored_and_removed_on_resume(packed, baseline, tmp_path, fault_report):
    """The training process is frozen (SIGSTOP) while a step folder without state.json exists (an asynchronous
    save in flight, the loop training on meanwhile), then SIGKILLed."""
    args = [sys.executable, "-c", TRAIN_IN_PROCESS, *overrides(packed, tmp_path, "checkpoint.every_steps=1",
                                                                "tracking.enabled=false")]
    checkpoints = tmp_path / "tiny-cpu" / "checkpoints"
    proc = faults.start(args, faults.clean_env(), cwd=REPO)
    partial = None
    try:  # after the first complete checkpoint, so the rerun has one to resume from
        faults.wait_for(lambda: (checkpoints / "step_00000001" / "state.json").is_file(), 300, "step 1", proc)
        while partial is None:
            saving = faults.wait_for(lambda: partial_steps(checkpoints), 300, "a checkpoint save", proc, poll=0.002)
            os.kill(proc.pid, signal.SIGSTOP)
            if not (saving[0] / "state.json").exists():  # frozen mid-save; else it finished: try the next one
                partial = saving[0]
            else:
                os.kill(proc.pid, signal.SIGCONT)
    finally:
        faults.kill_group(proc)
    killed_at = time.perf_counter()
    complete_before = checkpoint_steps(tmp_path / "tiny-cpu")
    assert partial.exists() and int(partial.name.split("_")[1]) > complete_before[-1]
    resumed = faults.run(args, faults.clean_env(), timeout=300, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming from {checkpoints / f'step_{complete_before[-1]:08d}'}" in resumed.stderr
    assert f"removing partial checkpoint {partial}" in resumed.stderr
    assert_same_params(final_params(tmp_path / "tiny-cpu"), baseline["params"])
    fault_report.fault = "process SIGKILLed during an asynchronous checkpoint save"
    fault_report.happened = (f"{partial.name} left without state.json; the rerun resumed from step "
                             f"{complete_before[-1]}, deleted the partial save, ended on the uninterrupted parameters")
    fault_report.lost = "0 steps"
    fault_report.recovery_s = time.perf_counter() - killed_at


# --- preempted: SIGTERM to a worker, then to the driver ------------------------------------------------------


PREEMPT_STEPS = 300


class Driver:
    """`openllama train` with its output in files, read while it runs."""

    def __init__(self, command: list[str], env: dict[str, str], folder: Path, name: str):
        self.stderr = folder / f"{name}.err"
        with open(folder / f"{name}.out", "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=err, start_new_session=True)

    def text(self) -> str:
        return self.stderr.read_text(errors="replace")

    def last_step(self, after: str | None = None) -> int:
        """The newest `step N/M` line rank 0 logged (after the line `after`, when given)."""
        text = self.text()
        if after is not None:
            text = text[text.index(after):] if after in text else ""
        steps = [int(m) for m in re.findall(rf"step (\d+)/{PREEMPT_STEPS} loss", text)]
        return max(steps, default=0)

    def resumed_at(self) -> list[int]:
        return [int(step) for _, step in self.resumed_from()]

    def resumed_from(self) -> list[tuple[str, str]]:
        """(checkpoint, step) of each attempt's `resuming from CKPT (step N)` line, in order."""
        return re.findall(r"resuming from (\S+) \(step (\d+)\)", self.text())


@pytest.fixture(scope="module")
def preempted(packed, ray_head, tmp_path_factory) -> dict:
    """`openllama train` with 2 workers on the session's Ray head (scaling.max_failures=1), milestones every
    100 steps. Past step 110, one worker is sent SIGTERM: both save the step they reached, the attempt fails,
    Ray Train starts another, which resumes there. Ten steps into it, the driver is sent SIGTERM (what `ray job
    stop` and Ctrl-C deliver): the workers save again and the driver exits. The same command then finishes."""
    out = tmp_path_factory.mktemp("preempted")
    tracking = f"sqlite:///{out}/mlruns.db"
    command = [str(Path(sys.executable).parent / "openllama"), "train", "tiny-cpu",
               *overrides(packed, out, f"train.steps={PREEMPT_STEPS}", "checkpoint.every_steps=100",
                          "checkpoint.keep=5", "scaling.num_workers=2", "scaling.max_failures=1",
                          f"tracking.uri={tracking}")]
    env = faults.clean_env(**ray_head.env)
    run_dir = out / "tiny-cpu"
    first = Driver(command, env, out, "first")
    try:
        faults.wait_for(lambda: 100 in checkpoint_steps(run_dir) and first.last_step() >= 110, 400,
                        "step 110, past the step-100 checkpoint", first.proc, poll=0.05)
        victim = faults.wait_for(lambda: faults.train_workers(ray_head), 30, "the train workers", first.proc)[-1]
        worker_reached = first.last_step()
        victim.send_signal(signal.SIGTERM)
        signalled_at = time.perf_counter()
        faults.wait_for(lambda: len(first.resumed_at()) >= 2, 300, "the restarted workers resuming", first.proc)
        worker_saved = first.resumed_at()[-1]
        restarted_s = time.perf_counter() - signalled_at
        resumed_from = first.resumed_from()[-1][0]  # the restarted attempt restored this save
        checkpoints_at_restart = checkpoint_steps(run_dir)  # it may have pruned that save already, at step 200
        resume_line = f"(step {worker_saved})"
        faults.wait_for(lambda: first.last_step(after=resume_line) >= worker_saved + 10, 300,
                        "ten steps of the restarted attempt", first.proc, poll=0.05)
        driver_reached = first.last_step(after=resume_line)
        first.proc.send_signal(signal.SIGTERM)
        first.proc.wait(timeout=300)
    except BaseException:
        faults.kill_group(first.proc)
        raise
    stopped_text = first.text()
    stopped_checkpoints = checkpoint_steps(run_dir)
    rerun_started = time.perf_counter()
    rerun = faults.run(command, env, timeout=400, cwd=REPO)
    return {"run_dir": run_dir, "tracking": tracking, "worker_reached": worker_reached, "worker_saved": worker_saved,
            "checkpoints_at_restart": checkpoints_at_restart, "resumed_from": resumed_from, "restarted_s": restarted_s,
            "driver_reached": driver_reached, "driver_exit": first.proc.returncode, "stopped_text": stopped_text,
            "stopped_checkpoints": stopped_checkpoints, "rerun": rerun,
            "rerun_s": time.perf_counter() - rerun_started}


@pytest.fixture(scope="module")
def preempt_baseline(packed, tmp_path_factory):
    """The same run uninterrupted, in this process."""
    from openllama.train.trainer import Trainer

    cfg = config(packed, tmp_path_factory.mktemp("preempt_baseline"), f"train.steps={PREEMPT_STEPS}",
                 "checkpoint.every_steps=100", "tracking.enabled=false")
    Trainer(cfg).fit()
    return final_params(cfg.run_dir)


def test_a_worker_sent_sigterm_saves_the_step_it_reached_and_ray_train_resumes_there(preempted, fault_report):
    saved, reached = preempted["worker_saved"], preempted["worker_reached"]
    assert saved >= reached > 100, (saved, reached)  # the step reached when signalled, or just after: none lost
    assert saved % 100 != 0  # a save of its own, not a milestone
    assert preempted["resumed_from"] == str(preempted["run_dir"] / "checkpoints" / f"step_{saved:08d}")
    assert 100 in preempted["checkpoints_at_restart"]  # the milestone before the save is kept
    fault_report.fault = "SIGTERM to one of 2 train workers (a preempted host), Ray Train max_failures=1"
    fault_report.happened = (f"signalled at step {reached} (or later): both workers saved step {saved} and ended "
                             f"the attempt; Ray Train's next attempt resumed from step {saved}")
    fault_report.lost = f"0 steps (saved {saved} >= reached {reached})"
    fault_report.recovery_s = preempted["restarted_s"]


def test_the_driver_sent_sigterm_has_the_workers_save_then_exits_naming_the_step(preempted, fault_report):
    reached = preempted["driver_reached"]
    saved = max(preempted["stopped_checkpoints"])
    assert preempted["driver_exit"] == 1
    assert saved >= reached > preempted["worker_saved"], (saved, reached)
    lines = [line for line in preempted["stopped_text"].splitlines() if line.startswith("openllama train:")]
    assert lines == [f"openllama train: stopped by SIGTERM: saved step {saved} "
                     f"({preempted['run_dir'] / 'checkpoints' / f'step_{saved:08d}'}); running the same command "
                     "again resumes from it"]
    rerun = preempted["rerun"]
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"(step {saved})" in rerun.stderr and "resuming from" in rerun.stderr
    fault_report.fault = "SIGTERM to the driver (`ray job stop`, Ctrl-C)"
    fault_report.happened = (f"signalled at step {reached}: the workers saved step {saved}, the driver exited 1 "
                             f"naming it; the same command resumed from step {saved} and finished")
    fault_report.lost = f"0 steps (saved {saved} >= reached {reached})"
    fault_report.recovery_s = preempted["rerun_s"]


def test_a_twice_preempted_run_ends_on_the_uninterrupted_parameters_each_step_logged_once(preempted,
                                                                                        preempt_baseline):
    assert_same_params(final_params(preempted["run_dir"]), preempt_baseline)
    run_id = (preempted["run_dir"] / "mlflow_run_id").read_text().strip()
    history = loss_history(preempted["tracking"], run_id)
    assert sorted(history) == list(range(1, PREEMPT_STEPS + 1))
    assert all(len(values) == 1 for values in history.values())


def test_each_attempt_logs_where_its_time_went_and_the_driver_prints_the_whole_runs_goodput(preempted):
    from mlflow.tracking import MlflowClient

    run_id = (preempted["run_dir"] / "mlflow_run_id").read_text().strip()
    client = MlflowClient(preempted["tracking"])
    walls = client.get_metric_history(run_id, "goodput/wall_s")
    assert len(walls) == 3  # the attempt preempted on the worker, the one stopped by the driver, the rerun
    for key in ("productive_s", "restore_s", "compile_s", "checkpoint_s", "data_wait_s", "startup_s", "redone_s"):
        assert len(client.get_metric_history(run_id, f"goodput/{key}")) == 3, key
    parts = sum(client.get_metric_history(run_id, f"goodput/{key}")[0].value
                for key in ("productive_s", "restore_s", "compile_s", "checkpoint_s", "data_wait_s", "startup_s",
                            "eval_s", "redone_s"))
    assert parts == pytest.approx(walls[0].value, rel=1e-6)
    assert re.search(r"tiny-cpu: goodput \d+\.\d% \(", preempted["rerun"].stdout), preempted["rerun"].stdout[-2000:]


# --- the MLflow server stopped and started again ----------------------------------------------------------


OUTAGE_S = 10  # how long the MLflow server stays down


def test_training_continues_while_mlflow_is_down_and_every_step_reaches_it(packed, ray_head, mlflow_server, tmp_path,
                                                                          fault_report):
    """`openllama train` on the Ray head, so the metrics go out from a Ray Train worker with the HTTP settings
    only workers get; the server is stopped once the step-2 checkpoint is complete and started again
    OUTAGE_S later. Checkpoints completed meanwhile show that the steps went on while it was down."""
    from mlflow.tracking import MlflowClient

    from openllama.train.checkpoint import RunDir

    steps = 12
    command = [str(Path(sys.executable).parent / "openllama"), "train", "tiny-cpu",
               *overrides(packed, tmp_path, f"train.steps={steps}", "name=mlflow-outage")]
    run = RunDir(tmp_path / "mlflow-outage")
    proc = faults.start(command, faults.clean_env(**ray_head.env, MLFLOW_TRACKING_URI=mlflow_server.uri), cwd=REPO)
    try:
        faults.wait_for(lambda: 2 in checkpoint_steps(run.path), 400, "the step-2 checkpoint", proc)
        mlflow_server.stop()
        stopped = time.perf_counter()
        at_stop = max(checkpoint_steps(run.path))
        time.sleep(OUTAGE_S)
        during = [step for step in checkpoint_steps(run.path) if step > at_stop]
        mlflow_server.start()
        restarted = time.perf_counter()
        _, stderr = proc.communicate(timeout=400)
    except BaseException:
        faults.kill_group(proc)
        raise
    finally:
        if not mlflow_server.pids():
            mlflow_server.start()
    finished = time.perf_counter()
    assert proc.returncode == 0, stderr[-4000:]
    assert during, f"no checkpoint after step {at_stop} was completed in the {OUTAGE_S} s the server was down"
    run_id = run.tracking_run_id()
    history = loss_history(mlflow_server.uri, run_id)
    assert sorted(history) == list(range(1, steps + 1))
    assert all(len(values) == 1 for values in history.values()), history
    assert MlflowClient(mlflow_server.uri).get_run(run_id).info.status == "FINISHED"
    fault_report.fault = f"MLflow server stopped mid-run, restarted {OUTAGE_S} s later (metrics from a Ray worker)"
    fault_report.happened = (f"training went on while the server was down (checkpoints of steps {during} "
                             f"completed meanwhile); buffered metrics reached it after the restart, the run "
                             f"finished {finished - restarted:.0f} s after the server was back")
    fault_report.lost = f"0 of {steps} steps' metrics, none twice"
    fault_report.recovery_s = finished - stopped


# --- a diverging loss --------------------------------------------------------------------------------------


def test_a_loss_diverging_to_nan_stops_the_run_and_keeps_the_last_good_checkpoint(packed, tmp_path, fault_report):
    """No injection hook: a learning rate of 1e9 makes the second step's loss non-finite by itself."""
    from openllama.train.trainer import Hook, NonFiniteLoss, Trainer

    cfg = config(packed, tmp_path, "optimizer.peak_lr=1e9", "optimizer.warmup_steps=0", "checkpoint.every_steps=1",
                 "tracking.enabled=false")
    logged: list[dict] = []

    class Checkpoints(Hook):
        def on_checkpoint(self, step: int, path: Path, metrics: dict) -> None:
            logged.append(metrics)

    started = time.perf_counter()
    with pytest.raises(NonFiniteLoss, match=r"step \d+: loss=\S+ .*is not finite.*last good checkpoint") as error:
        Trainer(cfg, [Checkpoints()]).fit()
    bad_step = int(str(error.value).split()[1].rstrip(":"))
    assert checkpoint_steps(cfg.run_dir)[-1] == bad_step - 1
    assert all(np.isfinite(m["loss"]) for m in logged)
    from openllama.train.checkpoint import RunDir, checkpoint_step

    assert checkpoint_step(RunDir(cfg.run_dir).step_dir(bad_step - 1)) == bad_step - 1
    fault_report.fault = "loss diverges to NaN/Inf (lr 1e9)"
    fault_report.happened = f"NonFiniteLoss at step {bad_step}; newest checkpoint is step {bad_step - 1} (finite)"
    fault_report.lost = "0 good steps"
    fault_report.recovery_s = time.perf_counter() - started
