"""Faults during training: a Ray Train worker SIGKILLed mid-run, a process killed in the middle of an
asynchronous checkpoint save, a worker and then the driver sent SIGTERM (a preemption, `ray job stop`), the
MLflow server stopped and started again, a loss that diverges to NaN/Inf."""

from __future__ import annotations

import os
import re
import signal
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


WORKER_GROUP_STARTED = "Started training worker group"  # Ray Train's controller, once per attempt


@pytest.fixture(scope="module")
def worker_killed(packed, ray_head, tmp_path_factory) -> dict:
    """`openllama train` on the session's Ray head (FailureConfig max_failures=1); once the step-2 checkpoint
    is complete the worker process is SIGKILLed from outside, and Ray Train restarts the worker group. The
    driver's output (Ray forwards the workers' and the controller's) is read as it comes."""
    out = tmp_path_factory.mktemp("worker_killed")
    tracking = f"sqlite:///{out}/mlruns.db"
    command = [str(Path(sys.executable).parent / "openllama"), "train", "tiny-cpu",
               *overrides(packed, out, "scaling.max_failures=1", f"tracking.uri={tracking}")]
    driver = faults.Watched(command, faults.clean_env(**ray_head.env), cwd=REPO)
    run_dir = out / "tiny-cpu"
    try:
        faults.wait_for(lambda: (run_dir / "checkpoints" / "step_00000002" / "state.json").is_file(), 400,
                        "the step-2 checkpoint", driver.proc)
        (victim,) = faults.wait_for(lambda: faults.train_workers(ray_head), 30, "the train worker process",
                                    driver.proc)
        victim.send_signal(signal.SIGKILL)
        killed_at = time.time()
        newest = checkpoint_steps(run_dir)[-1]
        returncode = driver.wait(timeout=500)
    except BaseException:
        faults.kill_group(driver.proc)
        raise
    reached = max(driver.reached(killed_at), newest)  # its log line may still be on its way; the save is not
    return {"returncode": returncode, "stderr": driver.text(), "run_dir": run_dir, "tracking": tracking,
            "victim": victim.pid, "newest_at_kill": newest, "reached": reached,
            "attempts": driver.count(WORKER_GROUP_STARTED), "resumed": driver.resumes(after=killed_at),
            "recovery_s": driver.whole_again_at(killed_at, reached) - killed_at}


def test_killed_worker_run_resumes_and_ends_with_the_uninterrupted_parameters(worker_killed, baseline,
                                                                               fault_report):
    """Read from the driver's output during the fault: two worker groups started (Ray Train's restart), the
    second one's worker resumed from the newest checkpoint complete at the kill, not from scratch."""
    killed = worker_killed
    assert killed["returncode"] == 0, killed["stderr"][-4000:]
    assert not psutil.pid_exists(killed["victim"]) or \
        psutil.Process(killed["victim"]).status() == psutil.STATUS_ZOMBIE
    assert killed["attempts"] == 2, killed["stderr"][-4000:]
    (_, checkpoint, resumed), = killed["resumed"]
    assert resumed == killed["newest_at_kill"] >= 2
    assert checkpoint == str(killed["run_dir"] / "checkpoints" / f"step_{resumed:08d}")
    assert_same_params(final_params(killed["run_dir"]), baseline["params"])
    test_killed_worker_run_logs_every_step_once_in_mlflow(killed)
    run_id = (killed["run_dir"] / "mlflow_run_id").read_text().strip()
    assert loss_history(killed["tracking"], run_id)[STEPS][0] == pytest.approx(baseline["loss"], abs=1e-5)
    fault_report.fault = "train worker SIGKILLed mid-run (Ray Train)"
    fault_report.happened = (f"killed at step {killed['reached']}; Ray Train started a second worker group, "
                             f"whose worker resumed from step {resumed} (the newest checkpoint at the kill); "
                             "final loss and parameters equal an uninterrupted run's (atol 1e-5), each step "
                             "logged once")
    fault_report.lost = faults.steps_lost(resumed, killed["reached"])
    fault_report.recovery_s = killed["recovery_s"]


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
    first = faults.Watched(args, faults.clean_env(), cwd=REPO)
    proc = first.proc
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
    killed_at = time.time()
    saving_step = int(partial.name.split("_")[1])
    reached = max(first.reached(killed_at), saving_step)
    complete_before = checkpoint_steps(tmp_path / "tiny-cpu")
    assert partial.exists() and saving_step > complete_before[-1]
    rerun = faults.Watched(args, faults.clean_env(), cwd=REPO)
    assert rerun.wait(timeout=300) == 0, rerun.text()[-4000:]
    assert f"resuming from {checkpoints / f'step_{complete_before[-1]:08d}'}" in rerun.text()
    assert f"removing partial checkpoint {partial}" in rerun.text()
    assert not partial.exists() or (partial / "state.json").exists()  # deleted, or saved again whole
    assert_same_params(final_params(tmp_path / "tiny-cpu"), baseline["params"])
    fault_report.fault = "process SIGKILLed during an asynchronous checkpoint save"
    fault_report.happened = (f"killed at step {reached} while step {saving_step} was being saved (no state.json); "
                             f"the rerun deleted the partial save, resumed from step {complete_before[-1]} and "
                             "ended on the uninterrupted parameters")
    fault_report.lost = faults.steps_lost(complete_before[-1], reached)
    fault_report.recovery_s = rerun.whole_again_at(killed_at, reached) - killed_at


# --- preempted: SIGTERM to a worker, then to the driver ------------------------------------------------------


PREEMPT_STEPS = 300


class Driver(faults.Watched):
    """`openllama train`, its output read as it comes."""

    def __init__(self, command: list[str], env: dict[str, str]):
        super().__init__(command, env, cwd=REPO)

    def last_step(self, after: float = 0.0) -> int:
        """The newest `step N/M` line rank 0 logged (after the time `after`)."""
        return max((step for t, step in self.steps() if t > after), default=0)

    def resumed_at(self) -> list[int]:
        return [step for _, _, step in self.resumes()]


@pytest.fixture(scope="module")
def preempted(packed, ray_head, tmp_path_factory) -> dict:
    """`openllama train` with 2 workers on the session's Ray head (scaling.max_failures=1), milestones every
    100 steps. Past step 110, one worker is sent SIGTERM: both save the step they reached, the attempt fails,
    Ray Train starts another, which resumes there. Once it has logged a step, the driver is sent SIGTERM (what `ray job
    stop` and Ctrl-C deliver): the workers save again and the driver exits. The same command then finishes."""
    out = tmp_path_factory.mktemp("preempted")
    tracking = f"sqlite:///{out}/mlruns.db"
    command = [str(Path(sys.executable).parent / "openllama"), "train", "tiny-cpu",
               *overrides(packed, out, f"train.steps={PREEMPT_STEPS}", "checkpoint.every_steps=100",
                          "checkpoint.keep=5", "scaling.num_workers=2", "scaling.max_failures=1",
                          f"tracking.uri={tracking}")]
    env = faults.clean_env(**ray_head.env)
    run_dir = out / "tiny-cpu"
    first = Driver(command, env)
    try:
        faults.wait_for(lambda: 100 in checkpoint_steps(run_dir) and first.last_step() >= 110, 400,
                        "step 110, past the step-100 checkpoint", first.proc, poll=0.05)
        victim = faults.wait_for(lambda: faults.train_workers(ray_head), 30, "the train workers", first.proc)[-1]
        victim.send_signal(signal.SIGTERM)
        signalled_at = time.time()
        worker_reached = first.reached(signalled_at)
        faults.wait_for(lambda: len(first.resumed_at()) >= 2, 300, "the restarted workers resuming", first.proc)
        resumed_t, resumed_from, worker_saved = first.resumes()[-1]  # the restarted attempt restored this save
        checkpoints_at_restart = checkpoint_steps(run_dir)  # it may have pruned that save already, at step 200
        # as soon as the restarted attempt has logged a step: Ray forwards the workers' lines a second or
        # more late, and this run's steps take milliseconds, so "ten steps in" could be past the run's end
        faults.wait_for(lambda: first.last_step(after=resumed_t) > worker_saved, 300,
                        "a step of the restarted attempt", first.proc, poll=0.02)
        worker_whole_s = first.whole_again_at(signalled_at, worker_reached) - signalled_at
        attempts_at_stop = first.count(WORKER_GROUP_STARTED)
        first.proc.send_signal(signal.SIGTERM)
        stopped_at = time.time()
        driver_reached = first.reached(stopped_at)
        first.wait(timeout=300)
    except BaseException:
        faults.kill_group(first.proc)
        raise
    stopped_text = first.text()
    stopped_checkpoints = checkpoint_steps(run_dir)
    rerun = Driver(command, env)
    rerun.wait(timeout=400)
    return {"run_dir": run_dir, "tracking": tracking, "worker_reached": worker_reached, "worker_saved": worker_saved,
            "checkpoints_at_restart": checkpoints_at_restart, "resumed_from": resumed_from,
            "worker_whole_s": worker_whole_s, "attempts_at_stop": attempts_at_stop,
            "driver_reached": driver_reached, "driver_exit": first.proc.returncode, "stopped_text": stopped_text,
            "stopped_checkpoints": stopped_checkpoints, "rerun": rerun,
            "driver_whole_s": rerun.whole_again_at(stopped_at, driver_reached) - stopped_at}


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
    assert preempted["attempts_at_stop"] == 2  # one restart, by Ray Train
    fault_report.fault = "SIGTERM to one of 2 train workers (a preempted host), Ray Train max_failures=1"
    fault_report.happened = (f"signalled at step {reached} (or later): both workers saved step {saved} and ended "
                             f"the attempt; Ray Train started a second worker group, which resumed from step {saved}")
    fault_report.lost = f"0 steps (saved {saved} >= reached {reached})"
    fault_report.recovery_s = preempted["worker_whole_s"]


def test_the_driver_sent_sigterm_has_the_workers_save_then_exits_naming_the_step(preempted, request, fault_report):
    reached = preempted["driver_reached"]
    saved = max(preempted["stopped_checkpoints"])
    assert preempted["driver_exit"] == 1
    assert saved >= reached > preempted["worker_saved"], (saved, reached)
    lines = [line for line in preempted["stopped_text"].splitlines() if line.startswith("openllama train:")]
    assert lines == [f"openllama train: stopped by SIGTERM: saved step {saved} "
                     f"({preempted['run_dir'] / 'checkpoints' / f'step_{saved:08d}'}); running the same command "
                     "again resumes from it"]
    rerun = preempted["rerun"]
    assert rerun.proc.returncode == 0, rerun.text()[-4000:]
    assert [step for _, _, step in rerun.resumes()][:1] == [saved]
    test_a_twice_preempted_run_ends_on_the_uninterrupted_parameters_each_step_logged_once(
        preempted, request.getfixturevalue("preempt_baseline"))
    fault_report.fault = "SIGTERM to the driver (`ray job stop`, Ctrl-C)"
    fault_report.happened = (f"signalled at step {reached}: the workers saved step {saved}, the driver exited 1 "
                             f"naming it; the same command resumed from step {saved} and ended on the uninterrupted "
                             "run's parameters (atol 1e-5), each step logged once")
    fault_report.lost = f"0 steps (saved {saved} >= reached {reached})"
    fault_report.recovery_s = preempted["driver_whole_s"]


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
    stdout = preempted["rerun"].text("out")
    assert re.search(r"tiny-cpu: goodput \d+\.\d% \(", stdout), stdout[-2000:]


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

    with pytest.raises(NonFiniteLoss, match=r"step \d+: loss=\S+ .*is not finite.*last good checkpoint") as error:
        Trainer(cfg, [Checkpoints()]).fit()
    bad_step = int(str(error.value).split()[1].rstrip(":"))
    assert checkpoint_steps(cfg.run_dir)[-1] == bad_step - 1
    assert all(np.isfinite(m["loss"]) for m in logged)
    from openllama.train.checkpoint import RunDir, checkpoint_step

    assert checkpoint_step(RunDir(cfg.run_dir).step_dir(bad_step - 1)) == bad_step - 1
    fault_report.fault = "loss diverges to NaN/Inf (lr 1e9)"
    fault_report.happened = f"NonFiniteLoss at step {bad_step}; newest checkpoint is step {bad_step - 1} (finite)"
    fault_report.lost = "0 good steps"  # detected, not recovered from: no recovery time
