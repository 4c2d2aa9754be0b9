"""`openllama train CONFIG [key=value ...]`: pretraining under Ray Train's JaxTrainer.

The driver (this process) validates the config, builds the tiny dataset when asked, opens the MLflow run
and starts N workers; each worker is one process of one `jax.distributed` system and runs `train_loop`.

A run lives in `<output_dir>/<name>/`:

    checkpoints/step_00000100/   params/ + model.json + tokenizer.model (a model checkpoint, so eval,
                                 export and generate accept it) + opt_state/ + state.json (step, tokens)
    mlflow_run_id                the MLflow run every attempt of this run logs to
    (Ray Train's own files)

Checkpoints are written under `.step_XXXXXXXX.tmp` and renamed when complete; a restart (Ray Train's
FailureConfig, or running the same command again) resumes from the newest complete one, whatever the
number of workers, and deletes partial ones. The data position is the step (see loader.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from openllama.config import ConfigError, build, redact_tree, to_dict
from openllama.train.config import TrainConfig, load_config, mesh_shape, validate

log = logging.getLogger("openllama.train")

CHECKPOINTS = "checkpoints"
RUN_ID_FILE = "mlflow_run_id"
STATE_JSON = "state.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")

# Dense peak FLOP/s per device (bf16) for MFU; CPUs are measured instead.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/Inf and train.on_nonfinite is `stop`."""


# ----------------------------------------------------------------------------------------------------------
# checkpoints


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step_{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete step checkpoint, oldest first; temporary ones are never listed."""
    root = run_dir / CHECKPOINTS
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        match = STEP_DIR.match(path.name)
        if match and (path / STATE_JSON).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Temporary directories left by a crash mid-save: never loaded, removed before training resumes."""
    root = run_dir / CHECKPOINTS
    for path in root.glob(".step_*.tmp") if root.is_dir() else []:
        log.warning("removing partial checkpoint %s (a save that did not finish)", path)
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(run_dir: Path, state: dict, config: TrainConfig, tokenizer: Path | None,
                    extra: dict[str, Any]) -> Path:
    """Write the train state of `state['step']` atomically; every process calls this, rank 0 commits."""
    import jax
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils

    from openllama.train.checkpoint import write_metadata

    step = int(state["step"])
    final = step_dir(run_dir, step)
    tmp = final.parent / f".{final.name}.tmp"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp / "params", state["params"])
        checkpointer.save(tmp / "opt_state", state["opt_state"])
    if jax.process_index() == 0:
        write_metadata(tmp, config.llama(), tokenizer)
        (tmp / STATE_JSON).write_text(json.dumps({"step": step, "seed": config.train.seed, **extra}, indent=2))
        if final.exists():  # a save of this step that completed before a crash: replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in complete_checkpoints(run_dir)[: -config.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)
    multihost_utils.sync_global_devices(f"checkpoint {step}")
    return final


def restore_checkpoint(path: Path, abstract_state: dict) -> tuple[dict, dict]:
    """(train state placed as `abstract_state`'s shardings, state.json) of a step checkpoint."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(path / "params", abstract_state["params"])
        opt_state = checkpointer.restore(path / "opt_state", abstract_state["opt_state"])
    info = json.loads((path / STATE_JSON).read_text())
    state = {"params": params, "opt_state": opt_state, "step": info["step"]}
    return state, info


# ----------------------------------------------------------------------------------------------------------
# worker


def peak_flops_per_device(config: TrainConfig) -> float:
    """Declared peak of this device kind, the config's value, or (CPU) a float32 matmul measured now."""
    import jax
    import jax.numpy as jnp

    if config.device.peak_flops:
        return config.device.peak_flops
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops
    n = 1024
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    start, reps = time.perf_counter(), 5
    for _ in range(reps):
        out = matmul(a)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def open_datasets(config: TrainConfig):
    """(train, validation or None) packed datasets; an unfinished dataset is refused by the reader."""
    from openllama.data.shards import PackedDataset

    train = PackedDataset.open(config.data.path, split="train")
    if train.seq_len != config.train.seq_len:
        raise ConfigError(
            f"train.seq_len={config.train.seq_len} but the dataset {config.data.path} was packed with "
            f"seq_len={train.seq_len}; set train.seq_len={train.seq_len} or repack the data"
        )
    try:
        validation = PackedDataset.open(config.data.path, split="validation")
    except ValueError:
        log.warning("%s has no validation split; held-out perplexity is skipped", config.data.path)
        validation = None
    return train, validation


def tokenizer_path(config: TrainConfig, manifest: dict) -> Path | None:
    """data.tokenizer, else the tokenizer the dataset's manifest names, when the file is there."""
    path = config.data.tokenizer or manifest.get("tokenizer", {}).get("path")
    return Path(path) if path and Path(path).is_file() else None


class Trainer:
    """Everything one worker process holds for a run: mesh, jitted steps, data plan, tracking."""

    def __init__(self, config: TrainConfig, tracking_run_id: str | None):
        import jax

        from openllama.train import sharding, step
        from openllama.train.loader import GlobalBatches, local_rows
        from openllama.train.model import init_params

        if config.compilation_cache_dir is not None:  # a restarted worker then skips recompiling its step
            jax.config.update("jax_compilation_cache_dir", str(config.compilation_cache_dir))
        self.config = config
        self.llama = config.llama()
        self.run_dir = config.run_dir
        self.rank = jax.process_index()
        validate(config, jax.device_count())
        self.mesh = sharding.make_mesh(mesh_shape(config, jax.device_count()))
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        train_data, self.validation = open_datasets(config)
        self.batches = GlobalBatches(train_data, config.train.global_batch_size, config.train.seed,
                                     config.data.weights)
        self.local_rows = local_rows(self.batch_sharding, config.train.global_batch_size)
        self.tokenizer = tokenizer_path(config, train_data.manifest)

        o = config.optimizer
        self.schedule = step.learning_rate(o.peak_lr, o.end_lr, o.warmup_steps, config.decay_steps())
        optimizer = step.make_optimizer(
            self.schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, clip_norm=o.clip_norm,
            decay_embeddings=o.decay_embeddings,
        )
        params_shape = jax.eval_shape(lambda: init_params(self.llama, config.train.seed))
        param_shardings = sharding.param_shardings(params_shape, self.mesh)
        opt_shape = jax.eval_shape(optimizer.init, params_shape)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.state_shardings = {
            "params": param_shardings,
            "opt_state": sharding.state_shardings(opt_shape, params_shape, self.mesh),
            "step": replicated,
        }
        self.abstract_state = jax.tree.map(
            lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
            {"params": params_shape, "opt_state": opt_shape, "step": jax.ShapeDtypeStruct((), np.int32)},
            self.state_shardings,
        )

        def fresh_state() -> dict:
            params = init_params(self.llama, config.train.seed)
            return {"params": params, "opt_state": optimizer.init(params), "step": np.int32(0)}

        self.init_state = jax.jit(fresh_state, out_shardings=self.state_shardings)
        train_step = step.make_train_step(
            self.llama, optimizer, self.schedule, config.train.micro_batches,
            skip_nonfinite=config.train.on_nonfinite == "skip", batch_sharding=self.batch_sharding,
        )
        self.train_step = jax.jit(
            train_step, in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated), donate_argnums=0,
        )
        self.eval_step = jax.jit(
            step.make_eval_step(self.llama), in_shardings=(param_shardings, self.batch_sharding,
                                                             self.batch_sharding),
            out_shardings=replicated,
        )
        self.tracking_run_id = tracking_run_id
        self.peak_flops = peak_flops_per_device(config) * jax.device_count()
        self.flops_per_step = self.llama.flops_per_token(config.train.seq_len) * self.tokens_per_step

    @property
    def tokens_per_step(self) -> int:
        return self.config.train.global_batch_size * self.config.train.seq_len

    def global_batch(self, tokens: np.ndarray):
        import jax

        shape = (self.config.train.global_batch_size, tokens.shape[1])
        return jax.make_array_from_process_local_data(self.batch_sharding, tokens, shape)

    def start(self) -> dict:
        """A fresh train state, or the newest complete checkpoint's (any worker count wrote it)."""
        from jax.experimental import multihost_utils

        if self.rank == 0:
            remove_partial_checkpoints(self.run_dir)
        multihost_utils.sync_global_devices("partial checkpoints removed")
        found = complete_checkpoints(self.run_dir)
        if not found:
            return self.init_state()
        step, path = found[-1]
        log.info("resuming from %s (step %d)", path, step)
        state, _ = restore_checkpoint(path, self.abstract_state)
        import jax

        state["step"] = jax.device_put(np.int32(step), self.state_shardings["step"])
        return state

    def evaluate(self, params) -> dict[str, float]:
        """Held-out loss and perplexity per validation subset, on the same rows every time."""
        from openllama.train.loader import validation_rows

        if self.validation is None or not self.config.eval.every_steps:
            return {}
        batch = self.config.train.global_batch_size
        results = {}
        for subset in self.validation.subsets:
            rows = validation_rows(self.validation, subset, self.config.eval.batches * batch)
            if not len(rows):
                continue
            loss_sum = count = 0.0
            for first in range(0, len(rows), batch):
                chunk = rows[first:first + batch]
                weight = np.zeros(batch, np.float32)
                weight[: len(chunk)] = 1.0
                padded = np.concatenate([chunk, np.full(batch - len(chunk), chunk[0])])
                local = padded[self.local_rows]
                tokens = self.validation.read(subset, local)
                total, n = self.eval_step(params, self.global_batch(tokens), self.global_weights(weight))
                loss_sum += float(total)
                count += float(n)
            loss = loss_sum / max(count, 1.0)
            results[f"val/{subset}/loss"] = loss
            results[f"val/{subset}/ppl"] = math.exp(min(loss, 50.0))
        return results

    def global_weights(self, weight: np.ndarray):
        import jax

        return jax.make_array_from_process_local_data(self.batch_sharding, weight[self.local_rows], weight.shape)

    def save(self, state: dict) -> Path:
        step = int(state["step"])
        extra = {"tokens_seen": step * self.tokens_per_step, "data_position": {"step": step}}
        return save_checkpoint(self.run_dir, state, self.config, self.tokenizer, extra)

    def fit(self, report) -> dict:
        """Train to `train.steps`; `report(metrics, checkpoint_dir or None)` is called by every worker."""
        from openllama import tracking

        config = self.config
        state = self.start()
        first = int(state["step"])
        logger = None
        system_metrics = None
        if self.rank == 0 and self.tracking_run_id:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            logger = tracking.MetricsLogger.resume(self.tracking_run_id, flush_every=config.train.log_every)
            if config.tracking.system_metrics_every_s > 0:  # sampled by a background thread of MLflow's
                system_metrics = SystemMetricsMonitor(self.tracking_run_id, resume_logging=first > 0,
                                                      sampling_interval=config.tracking.system_metrics_every_s)
                system_metrics.start()
        last_saved = first
        metrics: dict[str, float] = {}
        for step in range(first, config.train.steps):
            started = time.perf_counter()
            if config.fault.nan_at_step == step + 1:
                state["params"] = poisoned(state["params"])
            tokens = self.batches.read(step, self.local_rows)
            state, device_metrics = self.train_step(state, self.global_batch(tokens))
            values = {k: float(v) for k, v in device_metrics.items()}
            seconds = time.perf_counter() - started
            done = step + 1
            if not values["finite"]:
                message = (f"step {done}: loss={values['loss']} grad_norm={values['grad_norm']} is not finite; "
                           f"the last good checkpoint is kept in {self.run_dir / CHECKPOINTS}")
                if config.train.on_nonfinite == "stop":
                    if logger:
                        logger.flush(retries=2)
                    raise NonFiniteLoss(message + " (set train.on_nonfinite=skip to skip such updates)")
                log.warning("%s; update skipped", message)
            metrics = {
                "loss": values["loss"], "learning_rate": values["learning_rate"], "grad_norm": values["grad_norm"],
                "tokens_seen": float(done * self.tokens_per_step), "step_time_s": seconds,
                "tokens_per_s": self.tokens_per_step / seconds,
                "mfu": self.flops_per_step / seconds / self.peak_flops,
            }
            if config.eval.every_steps and (done % config.eval.every_steps == 0 or done == config.train.steps):
                metrics.update(self.evaluate(state["params"]))
            if self.rank == 0:
                if logger:
                    logger.log(done, metrics)
                if done % config.train.log_every == 0 or done == config.train.steps:
                    log.info("step %d/%d loss %.4f lr %.2e %.0f tokens/s mfu %.1f%%", done, config.train.steps,
                             metrics["loss"], metrics["learning_rate"], metrics["tokens_per_s"], 100 * metrics["mfu"])
            if done % config.checkpoint.every_steps == 0 or done == config.train.steps:
                path = self.save(state)
                last_saved = done
                if logger:
                    logger.flush(retries=1)
                report({"step": done, "loss": metrics["loss"]}, path if self.rank == 0 else None)
            if config.fault.kill_at_step == done and self.rank == 0:
                marker = self.run_dir / f"fault_killed_at_{done}"
                if not marker.exists():
                    marker.touch()
                    log.error("fault.kill_at_step=%d: this worker exits now (test-only fault injection)", done)
                    os._exit(1)
        if logger:  # the last metrics: wait up to ~5 minutes for a tracking server that is down
            logger.flush(retries=30, wait_s=10.0)
        if system_metrics:
            system_metrics.finish()
        return {"step": last_saved, **metrics}


def poisoned(params: Any) -> Any:
    """`params` with the final norm's gain set to NaN (fault.nan_at_step)."""
    import jax

    from openllama.train.sharding import path_name

    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * float("nan") if path_name(path) == "norm/weight" else x, params
    )


def configure_logging() -> None:
    """Our progress at INFO; orbax (through absl) logs every file of every save at INFO, so only its warnings."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)


def train_loop(loop_config: dict) -> None:
    """The per-worker function JaxTrainer runs (jax.distributed is already initialized by the backend)."""
    import ray.train
    from ray.train import Checkpoint
    from ray.train.v2.api.report_config import CheckpointUploadMode

    configure_logging()
    if loop_config.get("tracking_uri"):
        os.environ["MLFLOW_TRACKING_URI"] = loop_config["tracking_uri"]
    # MetricsLogger keeps what fails to send and retries at its next flush; MLflow's own HTTP retries (7, with
    # backoff: about 4 minutes against a server that is down) would stall the training loop instead.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    config = build(TrainConfig, loop_config["config"])

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    Trainer(config, loop_config.get("tracking_run_id")).fit(report)


# ----------------------------------------------------------------------------------------------------------
# driver


def ensure_dataset(config: TrainConfig) -> None:
    """Build the packed dataset named by data.path from data.build_from when it is missing (tiny runs).

    Both steps reuse finished work, so an interrupted build is completed by running the command again.
    """
    from openllama.data.shards import DatasetNotFinished, PackedDataset

    try:
        PackedDataset.open(config.data.path)
        return
    except (FileNotFoundError, DatasetNotFinished):
        if not config.data.build_from:
            raise
    from openllama.data import pipeline, tokenizer

    out = Path(config.data.path)
    log.info("building %s from %s (data.build_from)", out, config.data.build_from)
    model = Path(config.data.tokenizer) if config.data.tokenizer else None
    if model is None or not model.is_file():
        model = tokenizer.train_tokenizer([config.data.build_from], out.parent / f"{out.name}-tokenizer",
                                          vocab_size=config.llama().vocab_size)
    pipeline.tokenize_dataset([config.data.build_from], str(model), str(out), seq_len=config.train.seq_len)


def open_tracking_run(config: TrainConfig) -> str | None:
    """The MLflow run of this training run: reused from the run dir on resume, else created (None if down)."""
    from openllama import tracking

    if not config.tracking.enabled:
        return None
    id_file = config.run_dir / RUN_ID_FILE
    if id_file.is_file():
        return id_file.read_text().strip()
    try:
        run_id = tracking.start_run(config.tracking.experiment, run_name=config.name,
                                    tags={"openllama.stage": "train"}, params=to_dict(config))
    except Exception as error:  # a tracking server that is down must not stop training
        log.warning("MLflow unreachable (%s); training without tracking", error)
        return None
    config.run_dir.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id)
    return run_id


def finish_tracking_run(config: TrainConfig, run_id: str | None, succeeded: bool) -> None:
    """Artifacts of a finished run (config, tokenizer, checkpoint location, HF export) and its status."""
    from openllama import tracking

    if run_id is None:
        return
    try:
        client = tracking.client()
        config_file = config.run_dir / "train_config.json"
        config_file.write_text(json.dumps(redact_tree(to_dict(config)), indent=2))
        client.log_artifact(run_id, str(config_file), "config")
        final = complete_checkpoints(config.run_dir)
        if succeeded and final:
            checkpoint = final[-1][1]
            client.set_tag(run_id, "checkpoint", str(checkpoint))
            client.log_artifact(run_id, str(checkpoint / "model.json"), "checkpoint")
            if (checkpoint / "tokenizer.model").is_file():
                client.log_artifact(run_id, str(checkpoint / "tokenizer.model"), "tokenizer")
            try:
                client.log_artifacts(run_id, str(export_hf(checkpoint, config.run_dir / "hf")), "hf")
            except Exception as error:  # the checkpoint is what matters; an export can be redone by hand
                log.warning("Hugging Face export of %s failed (%s); run `openllama export-hf` on it", checkpoint,
                            error)
        client.set_terminated(run_id, "FINISHED" if succeeded else "FAILED")
    except Exception as error:
        log.warning("MLflow: could not record the end of run %s (%s)", run_id, error)


def export_hf(checkpoint: Path, out: Path) -> Path:
    """The final model in Hugging Face format, replacing an older export of this run."""
    from openllama.train.convert.hf import export_hf as exporter

    if out.exists():
        shutil.rmtree(out)
    exporter(checkpoint, out)
    return out


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """The config with local paths made absolute: workers do not run in the driver's directory."""

    def absolute(path: str | None) -> str | None:
        return path if path is None or "://" in path else str(Path(path).absolute())

    data = dataclasses.replace(config.data, path=absolute(config.data.path),
                               tokenizer=absolute(config.data.tokenizer), build_from=absolute(config.data.build_from))
    device = dataclasses.replace(config.device, compilation_cache_dir=absolute(config.device.compilation_cache_dir))
    return dataclasses.replace(config, output_dir=absolute(config.output_dir), data=data, device=device)


def fit(config: TrainConfig, address: str | None = None):
    """Run training under JaxTrainer on the Ray cluster at `address` (or RAY_ADDRESS, else in-process).

    Returns Ray Train's Result; raises the training error (after recording it in MLflow) on failure.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.jax import JaxTrainer

    from openllama import ray_jobs, tracking
    from openllama.train.ray_backend import JaxConfigWithCpu

    validate(config)
    config = absolute_paths(config)
    ray_jobs.connect(address)
    s = config.scaling
    resources = None if (s.use_tpu or s.use_gpu) else {"CPU": s.cpus_per_worker}
    scaling = ScalingConfig(
        num_workers=s.num_workers, use_tpu=s.use_tpu, use_gpu=s.use_gpu, topology=s.topology,
        accelerator_type=s.accelerator_type, resources_per_worker=resources,
    )
    run_id = open_tracking_run(config)
    trainer = JaxTrainer(
        train_loop,
        train_loop_config={"config": to_dict(config), "tracking_run_id": run_id,
                           "tracking_uri": config.tracking.uri or tracking.tracking_uri()},
        jax_config=JaxConfigWithCpu(use_tpu=s.use_tpu, use_gpu=s.use_gpu),
        scaling_config=scaling,
        run_config=RunConfig(
            name=config.name, storage_path=str(config.run_dir.parent),
            failure_config=FailureConfig(max_failures=s.max_failures),
        ),
    )
    result = None
    try:
        result = trainer.fit()
    finally:
        finish_tracking_run(config, run_id, succeeded=result is not None and result.error is None)
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="openllama train",
        description="Pretrain LLaMA under Ray Train's JaxTrainer. Rerunning the same command resumes the run.",
    )
    parser.add_argument("config", help="a YAML file or a preset name: tiny-cpu, openllama-3b, openllama-7b, ...")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. train.steps=100 scaling.num_workers=2")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an in-process Ray)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"openllama train: {error}", file=sys.stderr)
        return 2
    if config.tracking.uri:
        os.environ["MLFLOW_TRACKING_URI"] = config.tracking.uri
    if args.print_config:
        print(json.dumps(to_dict(config), indent=2))
        return 0
    from openllama import ray_jobs

    ray_jobs.connect(args.address)
    ensure_dataset(config)
    try:
        result = fit(config, args.address)
    except Exception as error:
        print(f"openllama train: {config.name} failed: {error}", file=sys.stderr)
        return 1
    print(f"trained {config.name}: {result.metrics} checkpoints in {config.run_dir / CHECKPOINTS}")
    return 0
