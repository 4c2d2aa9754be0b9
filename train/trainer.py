"""The worker loop: what each process of one `jax.distributed` system does for a run, Ray or not.

`Trainer(config, hooks).fit()` builds the mesh, the jitted steps and the batch plan, resumes from the
newest complete checkpoint of the run directory (whatever number of processes wrote it) and trains to
`train.steps`. Checkpoints are saved while the following steps run (`CheckpointWriter`); a SIGTERM or SIGINT
to any process makes every process save the step it reached and stop (`Preempted`), so a rerun loses no
step. Everything that is not training attaches as a `Hook` (MLflow metrics, Ray Train reports, and in the
tests, faults), so the loop itself has one job; each attempt also accounts for its wall time (`goodput.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from openllama import files
from openllama.commands import WorkFailed
from openllama.config import ConfigError
from openllama.data.shards import PackedDataset
from openllama.data.tokenizer import load_for_model
from openllama.train.checkpoint import CheckpointWriter, RunDir, restore_step
from openllama.train.config import TrainConfig, validate
from openllama.train.goodput import Goodput, describe
from openllama.train.heldout import heldout_metrics
from openllama.train.init_from import check_architecture, load_params
from openllama.train.loader import GlobalBatches, local_rows
from openllama.train.preemption import PreemptionWatch
from openllama.train.program import make_program

log = logging.getLogger("openllama.train")

# Dense peak FLOP/s per device (bf16) for MFU; CPUs are measured instead.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


class NonFiniteLoss(WorkFailed):
    """The loss or gradient norm became NaN/Inf and train.on_nonfinite is `stop`."""


class Preempted(WorkFailed):
    """A process was sent SIGTERM or SIGINT; every process saved the step it reached (`step`) and stopped."""

    def __init__(self, step: int, path: Path | str):
        super().__init__(f"preempted at step {step}: saved as {path}; running the same command again resumes "
                         "from it")
        self.step, self.path = step, path

    def __reduce__(self):  # raised in a Ray worker, rebuilt in the driver
        return Preempted, (self.step, self.path)


class Hook:
    """Something that watches the loop; every method is called by every process, in loop order."""

    def on_start(self, step: int) -> None:
        """Before the first step of this attempt (`step` > 0 when resuming)."""

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        """After step `step` (1-based: the number of updates done) with its metrics."""

    def on_checkpoint(self, step: int, path: Path | str, metrics: dict[str, float]) -> None:
        """Once the checkpoint of `step` is complete on every process (`path` a URI for a bucket run). Saves
        finish in the background, so this comes when the loop next waits for one: at the next save, or at
        the end; `metrics` are those of the step saved."""

    def on_finish(self, result: dict[str, float] | None, error: BaseException | None,
                  goodput: dict[str, float]) -> None:
        """At the end of this attempt: the final result or the error that ended it, and where the attempt's
        wall time went (`goodput.Goodput.summary`)."""


def peak_flops_per_device(config: TrainConfig) -> float:
    """Declared peak of this device kind, the config's value, or (CPU) a float32 matmul measured now."""
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


def open_datasets(config: TrainConfig) -> tuple[PackedDataset, PackedDataset | None]:
    """(train, validation or None) packed datasets; an unfinished dataset is refused by the reader."""
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


def tokenizer_path(config: TrainConfig, manifest: dict) -> str | None:
    """data.tokenizer, else the tokenizer the dataset's manifest names, when the file is there (local or URI)."""
    path = config.data.tokenizer or manifest.get("tokenizer", {}).get("path")
    return path if path and files.is_file(path) else None


def check_start(config: TrainConfig, tokenizer: str | None) -> None:
    """Weights to start from fit the run's model, and the run's tokenizer fits them: before any work."""
    llama = config.llama()
    check_architecture(config.train.init_from, llama)
    if tokenizer is not None:
        load_for_model(tokenizer, llama.vocab_size, llama.bos_token_id, llama.eos_token_id)


class Trainer:
    """Everything one worker process holds for a run: mesh, jitted steps, data plan, hooks."""

    def __init__(self, config: TrainConfig, hooks: Sequence[Hook] = ()):
        self.goodput = Goodput()
        if config.compilation_cache_dir is not None:  # a restarted worker then skips recompiling its step
            jax.config.update("jax_compilation_cache_dir", str(config.compilation_cache_dir))
        self.config = config
        self.hooks = list(hooks)
        self.llama = config.llama()
        self.run = RunDir(config.run_dir, staging=config.staging_dir)
        self.rank = jax.process_index()
        validate(config, jax.device_count())
        self.program = make_program(config, jax.devices())
        self.train_step = self.program.train_step  # an attribute of its own: tests wrap it to inject faults
        train_data, self.validation = open_datasets(config)
        self.batches = GlobalBatches(train_data, config.train.global_batch_size, config.train.seed,
                                     config.data.weights)
        self.local_rows = local_rows(self.program.batch_sharding, config.train.global_batch_size)
        self.tokenizer = tokenizer_path(config, train_data.manifest)
        if config.train.init_from:
            check_start(config, self.tokenizer)
        self.peak_flops = peak_flops_per_device(config) * jax.device_count()
        self.flops_per_step = self.llama.flops_per_token(config.train.seq_len) * self.tokens_per_step
        self.writer = CheckpointWriter(self.run, self.llama, self.tokenizer, keep=config.checkpoint.keep,
                                       barrier_timeout_s=config.checkpoint.barrier_timeout_s)
        self.saving: tuple[int, dict[str, float]] = (0, {})  # the save in flight: its step and metrics
        self.goodput.add("startup_s", time.perf_counter() - self.goodput.started)

    @property
    def tokens_per_step(self) -> int:
        return self.config.train.global_batch_size * self.config.train.seq_len

    def global_array(self, local: np.ndarray, global_shape: tuple[int, ...]) -> jax.Array:
        """This process's rows of a global batch as one array sharded over the mesh's batch axes."""
        return jax.make_array_from_process_local_data(self.program.batch_sharding, local, global_shape)

    def start(self) -> dict:
        """A fresh train state, or the newest complete checkpoint's (any worker count wrote it)."""
        if self.rank == 0:
            for path in self.run.remove_partial_checkpoints():
                log.warning("removing partial checkpoint %s (a save that did not finish)", path)
        multihost_utils.sync_global_devices("partial checkpoints removed")
        latest = self.run.latest()
        if latest is None and self.config.train.init_from:
            log.info("starting from the weights of %s (train.init_from)", self.config.train.init_from)
            state = self.program.init_state()
            state["params"] = load_params(self.config.train.init_from, self.llama, self.program.runtime,
                                          self.program.abstract_state["params"])
            return state
        if latest is None:
            return self.program.init_state()
        step_number, path = latest
        log.info("resuming from %s (step %d)", path, step_number)
        state, _ = restore_step(path, self.program.abstract_state, staging=self.run.process_staging())
        state["step"] = jax.device_put(np.int32(step_number), self.program.state_shardings["step"])
        return state

    def evaluate(self, params: Any) -> dict[str, float]:
        """Held-out loss and perplexity per validation subset, on the same rows every time."""
        if self.validation is None or not self.config.eval.every_steps:
            return {}
        batch = self.config.train.global_batch_size

        def score(tokens: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
            total, count = self.program.eval_step(params, self.global_array(tokens[self.local_rows], tokens.shape),
                                          self.global_array(weight[self.local_rows], weight.shape))
            return float(total), float(count)

        metrics = heldout_metrics(score, self.validation, batch, rows_per_subset=self.config.eval.batches * batch)
        return {f"val/{name}": value for name, value in metrics.items()}

    def save(self, state: dict, metrics: dict[str, float], rolling: bool = False) -> None:
        """Start saving `state`; the hooks hear of the save before it (if one was in flight) now, complete."""
        done = int(state["step"])
        info = {"seed": self.config.train.seed, "tokens_seen": done * self.tokens_per_step,
                "data_position": {"step": done}}
        self.wait_for_save()
        self.goodput.add("checkpoint_s", self.writer.save(state, info, rolling=rolling))
        self.saving = (done, metrics)

    def rolling_save_due(self, done: int, every_s: float, saved_at: float) -> bool:
        """Whether `checkpoint.every_minutes` have passed since the last save, checked on logging steps
        (`train.log_every`) by process 0's clock and told to every process, so that all save the same step."""
        if every_s <= 0 or done % self.config.train.log_every:
            return False
        due = time.perf_counter() - saved_at >= every_s
        if jax.process_count() > 1:
            due = bool(multihost_utils.broadcast_one_to_all(np.bool_(due)))
        return due

    def report_saved(self, saved: tuple[int, Path | str] | None) -> None:
        if saved is None:
            return
        step, path = saved
        _, metrics = self.saving
        for hook in self.hooks:
            hook.on_checkpoint(step, path, metrics)

    def wait_for_save(self) -> None:
        """Wait for the save in flight, if any, and tell the hooks."""
        waited = time.perf_counter()
        saved = self.writer.wait()
        self.goodput.add("checkpoint_s", time.perf_counter() - waited)
        self.report_saved(saved)

    def fit(self) -> dict[str, float]:
        """Train to `train.steps`; returns the last step's metrics with `step`, the newest checkpoint's step."""
        error: BaseException | None = None
        result: dict[str, float] | None = None
        try:
            with jax.set_mesh(self.program.mesh), PreemptionWatch(self.config.checkpoint.save_on_preemption) as \
                    self.preemption:  # kernels that run per shard (splash) find the mesh there
                result = self._train()
            return result
        except BaseException as caught:
            error = caught
            raise
        finally:
            self.writer.close(wait=error is None)
            goodput = self.goodput.summary()
            if self.rank == 0:
                log.info("this attempt: %s", describe(goodput))
            if result is not None:
                result.update({f"goodput/{key}": value for key, value in goodput.items()})
            for hook in self.hooks:
                hook.on_finish(result, error, goodput)

    def _train(self) -> dict[str, float]:
        """The loop. The chips never wait for the host: the next batch is read by a background thread while
        a step runs, and a step's metrics are read only once the following step is queued (at once on
        steps that evaluate or save, which need them)."""
        config = self.config
        restoring = time.perf_counter()
        state = self.start()
        first = int(state["step"])
        self.goodput.add("restore_s", time.perf_counter() - restoring)
        for hook in self.hooks:
            hook.on_start(first)
        last_saved = first
        every_s = 60 * config.checkpoint.every_minutes
        saved_at = time.perf_counter()
        metrics: dict[str, float] = {}
        batch_shape = (config.train.global_batch_size, config.train.seq_len + 1)
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
        next_batch = reader.submit(self.batches.read, first, self.local_rows)
        pending: tuple[int, dict, float] | None = None  # the step queued last, its metrics not read yet
        self.last_finished = time.perf_counter()
        try:
            for index in range(first, config.train.steps):
                waited = time.perf_counter()
                tokens = next_batch.result()
                data_wait = time.perf_counter() - waited
                if index + 1 < config.train.steps:
                    next_batch = reader.submit(self.batches.read, index + 1, self.local_rows)
                state, device_metrics = self.train_step(state, self.global_array(tokens, batch_shape))
                if pending is not None:
                    self.finish_step(*pending)
                done = index + 1
                pending = (done, device_metrics, data_wait)
                evaluates = config.eval.every_steps and (done % config.eval.every_steps == 0
                                                         or done == config.train.steps)
                milestone = done % config.checkpoint.every_steps == 0 or done == config.train.steps
                preempted = self.preemption.reached(done)
                rolling = self.rolling_save_due(done, every_s, saved_at)
                if evaluates or milestone or preempted or rolling:
                    extra = {}
                    if evaluates:
                        evaluating = time.perf_counter()
                        extra = self.evaluate(state["params"])
                        self.goodput.add("eval_s", time.perf_counter() - evaluating)
                    metrics = self.finish_step(*pending, extra=extra)
                    pending = None
                if milestone or preempted or rolling:
                    self.save(state, metrics, rolling=not milestone)
                    last_saved, saved_at = done, time.perf_counter()
                if preempted:
                    self.wait_for_save()
                    raise Preempted(done, self.run.step_dir(done))
            self.wait_for_save()
        except NonFiniteLoss:  # every process stops at this step: the save in flight is of a good state
            self.wait_for_save()
            raise
        finally:
            reader.shutdown(wait=False, cancel_futures=True)
        return {**metrics, "step": last_saved}

    def finish_step(self, done: int, device_metrics: dict, data_wait: float,
                   extra: dict[str, float] | None = None) -> dict[str, float]:
        """Read step `done`'s metrics from the device (waiting for it), check them, log them, call the hooks."""
        config = self.config
        values = {k: float(v) for k, v in device_metrics.items()}
        now = time.perf_counter()
        seconds, self.last_finished = now - self.last_finished, now  # in steady state, one step of the pipeline
        self.goodput.step_times.append(seconds)
        self.goodput.add("data_wait_s", data_wait)
        if not values["finite"]:
            message = (f"step {done}: loss={values['loss']} grad_norm={values['grad_norm']} is not finite; "
                       f"the last good checkpoint is kept in {self.run.checkpoints}")
            if config.train.on_nonfinite == "stop":
                raise NonFiniteLoss(message + " (set train.on_nonfinite=skip to skip such updates)")
            log.warning("%s; update skipped", message)
        metrics = {
            "loss": values["loss"], "learning_rate": values["learning_rate"], "grad_norm": values["grad_norm"],
            "tokens_seen": float(done * self.tokens_per_step), "step_time_s": seconds,
            "tokens_per_s": self.tokens_per_step / seconds, "mfu": self.flops_per_step / seconds / self.peak_flops,
            "data_wait_s": data_wait, **(extra or {}),
        }
        if self.rank == 0 and (done % config.train.log_every == 0 or done == config.train.steps):
            log.info("step %d/%d loss %.4f lr %.2e %.0f tokens/s mfu %.1f%% data wait %.3f s", done,
                     config.train.steps, metrics["loss"], metrics["learning_rate"], metrics["tokens_per_s"],
                     100 * metrics["mfu"], data_wait)
        for hook in self.hooks:
            hook.after_step(done, metrics)
        return metrics
