"""Pretraining under Ray Train's JaxTrainer (`fit`), what `openllama train CONFIG [key=value ...]` runs.

The driver (this process) validates the config, opens the MLflow run and starts N workers; each worker is one
process of one `jax.distributed` system (`ray_backend.py`) and runs `trainer.Trainer` with its hooks: Ray
Train's reports, the driver's stop requests and, on process 0, MLflow's metrics. Rerunning the same command
resumes the run from its newest complete checkpoint (see `checkpoint.py`). The command around it (a tiny
dataset built on first use, the final model registered) is the roof's: `platform/training.py`.

A SIGTERM or SIGINT to the driver (`ray job stop`, Ctrl-C) is passed to the workers, which save the step
they reached and stop; the driver then exits saying where the rerun resumes. A worker sent SIGTERM itself (a
preempted VM) saves the same way and fails its attempt, so Ray Train's restart (`scaling.max_failures`), or
the rerun, resumes from that step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from openllama import commands, files, ray_jobs, tracking
from openllama.config import build, redact_tree, to_dict
from openllama.data.shards import Manifest
from openllama.train.checkpoint import MODEL_JSON, STATE_JSON, TOKENIZER, RunDir, under
from openllama.train.config import TrainConfig, validate
from openllama.train.goodput import PHASES, combine, with_redone
from openllama.train.trainer import Hook, Preempted, Trainer

log = logging.getLogger("openllama.train")
# scores one saved checkpoint on lm-eval tasks, in a Ray task: (Ray's checkpoint, step=, location=, tasks=, limit=,
# run_id=, tracking_uri=) -> {metric: value}; eval's `score_checkpoint`, which the roof hands to `fit`
ScoreTasks = Callable[..., dict[str, float]]


class TrackingHook(Hook):
    """Per-step metrics and system metrics into the run's MLflow record (process 0 only).

    Steps MLflow already has (logged by an attempt that crashed) are skipped, so each step is there once;
    while the server is down metrics wait in memory and training goes on.
    """

    def __init__(self, run_id: str, config: TrainConfig):
        self.run_id = run_id
        self.config = config
        self.logger: tracking.MetricsLogger | None = None
        self.system: SystemMetricsMonitor | None = None
        self.redone_s = 0.0  # time spent on steps an earlier attempt had computed (MLflow has them)
        self.last_step = 0

    def on_start(self, step: int) -> None:
        self.logger = tracking.MetricsLogger.resume(self.run_id, flush_every=self.config.train.log_every)
        every = self.config.tracking.system_metrics_every_s
        if every > 0:  # sampled by a background thread of MLflow's
            self.system = SystemMetricsMonitor(self.run_id, resume_logging=step > 0, sampling_interval=every)
            self.system.start()

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        if step <= self.logger.skip_through:
            self.redone_s += metrics["step_time_s"]
        self.last_step = step
        self.logger.log(step, metrics)

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        self.logger.flush(retries=1)

    def on_finish(self, result: dict[str, float] | None, error: BaseException | None,
                  goodput: dict[str, float]) -> None:
        if self.logger is not None:
            # this attempt's goodput at its last step, one value per attempt; then the last metrics: after a
            # success, wait up to ~5 minutes for a server that is down
            figures = with_redone(goodput, self.redone_s)
            self.logger.pending += [tracking.Metric(f"goodput/{key}", float(value), int(time.time() * 1000),
                                                    self.last_step) for key, value in figures.items()]
            self.logger.flush(retries=30 if error is None else 2, wait_s=10.0)
        if self.system is not None:
            self.system.finish()


class RayReportHook(Hook):
    """Each checkpoint reported to Ray Train (every worker reports; process 0 names the folder of a milestone),
    a milestone of `eval.tasks_every_steps` with the request to score it (Ray Train's asynchronous validation:
    a Ray task of its own, which the loop does not wait for)."""

    def __init__(self, rank: int, config: TrainConfig, scores_tasks: bool):
        self.rank = rank
        self.config = config
        self.scores_tasks = scores_tasks

    def on_checkpoint(self, step: int, path: Path | str, metrics: dict[str, float]) -> None:
        # only ever called inside a Ray Train worker, where Ray is already set up
        import ray.train
        from ray.train.v2.api.report_config import CheckpointUploadMode

        checkpoint = None
        # a rolling or preemption save is deleted by the next one, and Ray Train refuses to start on a run whose
        # newest reported checkpoint is gone: only milestones are Ray Train's checkpoints
        milestone = self.rank == 0 and not files.read_json(under(path, STATE_JSON)).get("rolling")
        if milestone and files.is_uri(path):  # named on the filesystem of Ray Train's storage (`ray_storage`)
            filesystem, fs_path = files.filesystem(path)
            checkpoint = ray.train.Checkpoint(fs_path, filesystem=filesystem)
        elif milestone:
            checkpoint = ray.train.Checkpoint.from_directory(str(path))
        validation: bool | ray.train.ValidationTaskConfig = False
        if checkpoint is not None and self.scores_tasks and self.config.tasks_due(step):
            validation = ray.train.ValidationTaskConfig(fn_kwargs={"step": step, "location": str(path)},
                                                        timeout_s=self.config.eval.tasks_timeout_s)
        ray.train.report({"step": step, "loss": metrics["loss"]}, checkpoint=checkpoint,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD, validation=validation)


class StopRequests(Hook):
    """The driver's request to stop (its SIGTERM or SIGINT), turned into the SIGTERM that JAX's preemption
    notifier hears on this worker, so that every worker saves the same step. Looked up at most once a second."""

    def __init__(self, key: str):
        self.key = key
        self.checked = 0.0
        self.sent = False

    def requested(self) -> bool:
        from ray.experimental import internal_kv  # Ray's key-value store in the GCS, which the driver writes to

        return internal_kv._internal_kv_get(self.key) is not None

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.sent or time.monotonic() - self.checked < 1.0:
            return
        self.checked = time.monotonic()
        if self.requested():
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def train_loop(loop_config: dict) -> None:
    """The per-worker function JaxTrainer runs (jax.distributed is already initialized by the backend)."""
    import jax  # after the backend set JAX_PLATFORMS for this worker

    commands.quiet_libraries()
    if loop_config.get("tracking_uri"):
        os.environ["MLFLOW_TRACKING_URI"] = loop_config["tracking_uri"]
    # MetricsLogger keeps what fails to send and retries at its next flush; MLflow's own HTTP retries (7, with
    # backoff: about 4 minutes against a server that is down) would stall the training loop instead.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    config = build(TrainConfig, loop_config["config"])
    rank = jax.process_index()
    stops = StopRequests(loop_config["stop_key"])
    hooks: list[Hook] = [RayReportHook(rank, config, loop_config["scores_tasks"]), stops]
    if rank == 0 and loop_config.get("tracking_run_id"):
        hooks.insert(0, TrackingHook(loop_config["tracking_run_id"], config))
    try:
        Trainer(config, hooks).fit()
    except Preempted:
        if not stops.requested():  # this host's own SIGTERM: a failed attempt, for Ray Train to restart
            raise
        log.info("stopped as the driver asked; the step is saved")


def open_tracking_run(config: TrainConfig) -> str | None:
    """The MLflow run of this training run: reused from the run dir on resume, else created (None if down)."""
    if not config.tracking.enabled:
        return None
    run = RunDir(config.run_dir)
    recorded = run.tracking_run_id()
    if recorded and tracking.run_exists(recorded) is not False:  # reachable and there, or down: keep it
        return recorded
    if recorded:
        log.warning("the tracking server %s has no run %s, which %s recorded (another server, or its store was "
                    "deleted); logging this run to a new MLflow run", tracking.tracking_uri(), recorded, run.path)
    try:
        run_id = tracking.start_run(config.tracking.experiment, run_name=config.name,
                                    tags={"openllama.stage": "train", "openllama.run_dir": str(run.path),
                                          **({"openllama.replaces_run": recorded} if recorded else {})},
                                    params=to_dict(config))
    except Exception as error:  # a tracking server that is down must not stop training
        log.warning("MLflow unreachable (%s); training without tracking", error)
        return None
    run.record_tracking_run(run_id)
    log_training_dataset(config, run_id)
    return run_id


def log_training_dataset(config: TrainConfig, run_id: str) -> None:
    """The packed dataset as the run's MLflow dataset input: its path, its manifest's sha256 and, as its
    profile, the tokens and rows of each subset per split (what the mixture samples from)."""
    try:
        manifest = Manifest.read(config.data.path)
        profile: dict[str, dict[str, dict[str, int]]] = {}
        for shard in manifest["shards"]:
            entry = profile.setdefault(shard["split"], {}).setdefault(shard["subset"], {"tokens": 0, "rows": 0})
            entry["tokens"] += shard["tokens"]
            entry["rows"] += shard["rows"]
        tracking.log_dataset(run_id, Path(config.data.path.rstrip("/")).name, config.data.path,
                             files.sha256_of(Manifest.location(config.data.path)), "training",
                             {"seq_len": manifest["seq_len"], **profile})
    except Exception as error:  # the record is incomplete, the training is not
        log.warning("MLflow: could not log the dataset of run %s (%s)", run_id, error)


def finish_tracking_run(config: TrainConfig, run_id: str | None, succeeded: bool, status: str | None = None) -> None:
    """The run's config, its final checkpoint's location, model config and tokenizer, and its status."""
    if run_id is None:
        return
    latest = RunDir(config.run_dir).latest()
    try:
        client = tracking.client()
        with tempfile.TemporaryDirectory(prefix="openllama-artifacts-") as folder:  # MLflow logs local files
            config_file = Path(folder) / "train_config.json"
            config_file.write_text(json.dumps(redact_tree(to_dict(config)), indent=2))
            files.copy_file(config_file, under(config.run_dir, config_file.name))
            client.log_artifact(run_id, str(config_file), "config")
            if succeeded and latest:
                checkpoint = latest[1]
                client.set_tag(run_id, "checkpoint", str(checkpoint))
                for name, artifact_path in ((MODEL_JSON, "checkpoint"), (TOKENIZER, "tokenizer")):
                    if files.is_file(under(checkpoint, name)):
                        files.copy_file(under(checkpoint, name), Path(folder, artifact_path, name))
                        client.log_artifact(run_id, str(Path(folder, artifact_path, name)), artifact_path)
        client.set_terminated(run_id, status or ("FINISHED" if succeeded else "FAILED"))
    except Exception as error:
        log.warning("MLflow: could not record the end of run %s (%s)", run_id, error)


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """The config with local paths made absolute: workers do not run in the driver's directory."""

    def absolute(path: str | None) -> str | None:
        return path if path is None or "://" in path else str(Path(path).absolute())

    data = dataclasses.replace(config.data, path=absolute(config.data.path),
                               tokenizer=absolute(config.data.tokenizer), build_from=absolute(config.data.build_from))
    device = dataclasses.replace(config.device, compilation_cache_dir=absolute(config.device.compilation_cache_dir))
    return dataclasses.replace(config, output_dir=absolute(config.output_dir), data=data, device=device)


def fit(config: TrainConfig, address: str | None = None, score_tasks: ScoreTasks | None = None):
    """Run training under JaxTrainer on the Ray cluster at `address` (or RAY_ADDRESS, else in-process).

    With `eval.tasks` and `score_tasks` (eval's, handed in by the roof: train does not import eval), the
    checkpoints of `eval.tasks_every_steps` are scored as training goes on, each in a Ray task of
    `eval.tasks_cpus` CPUs (Ray Train's `ValidationConfig`); `fit` returns once the last one finished. A
    failed or timed-out evaluation is logged and training goes on.

    Returns Ray Train's Result; raises the training error (after recording it in MLflow) on failure, and a lost
    head as WorkFailed naming it and the checkpoint the same command resumes from on a new head.
    """
    validate(config)
    config = absolute_paths(config)
    ray_jobs.connect(address)
    # imported after `connect`, which decides how Ray binds before `ray` is first imported
    import ray
    from ray.exceptions import ActorUnavailableError
    from ray.train import FailureConfig, RunConfig, ScalingConfig, ValidationConfig, ValidationTaskConfig
    from ray.train.v2.jax import JaxTrainer

    from openllama.train.ray_backend import JaxConfigWithCpu

    s = config.scaling
    resources = None if (s.use_tpu or s.use_gpu) else {"CPU": s.cpus_per_worker}
    scaling = ScalingConfig(
        num_workers=s.num_workers, use_tpu=s.use_tpu, use_gpu=s.use_gpu, topology=s.topology,
        accelerator_type=s.accelerator_type, resources_per_worker=resources,
    )
    run_id = open_tracking_run(config)
    storage_path, storage_filesystem = ray_storage(config)
    stop_key = f"openllama-stop-{uuid.uuid4().hex}"
    validation = None
    if config.eval.tasks and score_tasks is not None:
        e = config.eval
        validation = ValidationConfig(
            # on the CPU: the accelerators of a slice are the training workers'
            fn=score_tasks, ray_remote_kwargs={"num_cpus": e.tasks_cpus, "max_retries": 0,
                                               "runtime_env": {"env_vars": {"JAX_PLATFORMS": "cpu"}}},
            task_config=ValidationTaskConfig(timeout_s=e.tasks_timeout_s, fn_kwargs={
                "tasks": e.tasks, "limit": e.tasks_limit, "run_id": run_id,
                "tracking_uri": config.tracking.uri or tracking.tracking_uri()}))
    trainer = JaxTrainer(
        train_loop,
        train_loop_config={"config": to_dict(config), "tracking_run_id": run_id, "stop_key": stop_key,
                           "tracking_uri": config.tracking.uri or tracking.tracking_uri(),
                           "scores_tasks": validation is not None},
        validation_config=validation,
        jax_config=JaxConfigWithCpu(use_tpu=s.use_tpu, use_gpu=s.use_gpu, libtpu_flags=config.device.libtpu_flags),
        scaling_config=scaling,
        run_config=RunConfig(
            name=config.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=s.max_failures),
        ),
    )
    head = ray.get_runtime_context().gcs_address
    result = None
    stop = DriverStop(stop_key) if config.checkpoint.save_on_preemption else None
    try:
        with stop or contextlib.nullcontext():
            result = trainer.fit()
    except ActorUnavailableError as error:
        # Ray Train's controller runs on the driver's node; what a killed head leaves the driver is this error
        # (`RpcError: Socket closed`) from the controller, and a GCS that no longer answers
        if gcs_answers(head):
            raise
        newest = RunDir(config.run_dir).latest()
        resume = (f"resumes from the newest checkpoint (step {newest[0]}, {newest[1]})" if newest
                  else "starts it again (no checkpoint was complete)")
        raise commands.WorkFailed(f"the Ray cluster (head at {head}) was lost: its GCS does not answer; running "
                                  f"the same command again on a new head {resume}") from error
    finally:
        stopped = stop is not None and stop.signal is not None
        finish_tracking_run(config, run_id, succeeded=result is not None and result.error is None and not stopped,
                            status="KILLED" if stopped else None)
    if stopped:
        newest = RunDir(config.run_dir).latest()
        where = f"saved step {newest[0]} ({newest[1]})" if newest else "no checkpoint was complete"
        raise Stopped(f"stopped by {stop.signal}: {where}; running the same command again resumes from it")
    return result


class Stopped(commands.WorkFailed):
    """The driver was asked to stop (SIGTERM, SIGINT) and the workers saved the step they reached."""


class DriverStop:
    """While training: the driver's SIGTERM or SIGINT asks the workers to save and stop (`StopRequests`)
    instead of ending the driver, which would take Ray Train's controller and the workers with it unsaved. A
    second signal stops at once."""

    def __init__(self, key: str):
        self.key = key
        self.signal: str | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> DriverStop:
        for number in (signal.SIGTERM, signal.SIGINT):
            self.previous[number] = signal.signal(number, self.request)
        return self

    def request(self, number: int, frame) -> None:
        from ray.experimental import internal_kv  # the store StopRequests reads; Ray is connected by now

        if self.signal is not None:
            self.__exit__()
            raise KeyboardInterrupt
        self.signal = signal.Signals(number).name
        internal_kv._internal_kv_put(self.key, self.signal)
        log.warning("%s: the workers save the step they reached, then stop (again to stop at once, unsaved)",
                    self.signal)

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous.clear()


def run_goodput(run_id: str | None) -> dict[str, float] | None:
    """The whole run's goodput from each attempt's figures in MLflow (None without them)."""
    if run_id is None:
        return None
    try:
        history = {key: tracking.client().get_metric_history(run_id, f"goodput/{key}")
                   for key in ("productive_s", "wall_s", *PHASES)}
    except Exception:
        return None
    attempts = len(history["wall_s"])
    if not attempts:
        return None
    return combine([{key: values[i].value for key, values in history.items() if i < len(values)}
                    for i in range(attempts)])


def ray_storage(config: TrainConfig) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: output_dir, and for a bucket the
    filesystem this project opens it with, so a checkpoint reported on it (`RayReportHook`) is Ray Train's own."""
    if not files.is_uri(config.output_dir):
        return str(Path(config.run_dir).parent), None
    filesystem, path = files.filesystem(config.output_dir)
    return path, filesystem


def gcs_answers(address: str, timeout: float = 5.0) -> bool:
    """Whether the GCS at `address` (HOST:PORT) accepts a connection: an unreachable controller whose GCS
    still answers is a lost actor, not a lost head, and keeps Ray's own error."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False
