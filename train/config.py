"""What `openllama train` reads: one typed config, loaded from `configs/train/<preset>.yaml` plus overrides.

Every check that can fail before a worker starts fails here, with the field named and what is allowed,
so a 7B job never dies on a TPU pod because of a typo.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from openllama import files
from openllama.config import ConfigError, load
from openllama.train.checkpoint import DEFAULT_STAGING
from openllama.train.model import LlamaConfig, ModelRuntime
from openllama.train.tpu import check_slice

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "train"
RUNTIME_FIELDS = {f.name for f in dataclasses.fields(ModelRuntime)}


@dataclass
class ModelSection:
    """The architecture (a `LlamaConfig` preset, any of its fields changed in `overrides`) and how this run
    runs it (`ModelRuntime`: dtypes, remat, kernels, scan), which checkpoints do not keep."""

    preset: str = "tiny"
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute
    remat_policy: str = "none"
    kernels: str = "auto"  # how products and attention run: auto (the backend's), reference, xla_cpu, splash, cudnn
    scan_layers: bool = False  # one scanned block body instead of one per layer (TPU presets: compile time)
    overrides: dict[str, Any] = field(default_factory=dict)  # architecture fields only, e.g. num_hidden_layers


@dataclass
class DataSection:
    path: str = "runs/data/tiny-cpu"  # packed dataset root (the output of `openllama data tokenize`)
    tokenizer: str | None = None  # default: the one the dataset's manifest names (the one that made its tokens)
    build_from: str | None = None  # jsonl corpus to tokenize into `path` when it is missing (tiny runs)
    weights: dict[str, float] | None = None  # subset -> sampling weight; None = LLaMA's mixture


@dataclass
class TrainSection:
    steps: int = 200
    seq_len: int = 128
    global_batch_size: int = 16  # sequences per optimizer step, over all workers
    micro_batches: int = 1  # gradient accumulation: the global batch is processed in this many pieces
    seed: int = 0
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/Inf loss stops the run, or its update is skipped
    log_every: int = 10  # steps between progress log lines and MLflow flushes
    # weights to start from instead of a fresh init: one of our checkpoints (or a run dir), a Hugging Face
    # LLaMA directory, or an EasyLM file (params::FILE); the optimizer, step and data position start fresh.
    # A run that has checkpoints of its own resumes from them instead.
    init_from: str | None = None


@dataclass
class OptimizerSection:
    """AdamW as OpenLLaMA/LLaMA: linear warmup, cosine decay to `end_lr`, global-norm clipping."""

    peak_lr: float = 3e-4
    end_lr: float = 3e-5
    warmup_steps: int = 2000
    decay_steps: int | None = None  # default: train.steps
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    # which parameters weight decay applies to: all (EasyLM's, so OpenLLaMA's and the presets'), kernels (the
    # matmul kernels: not the norm gains nor the embeddings), kernels_and_embeddings
    decay: Literal["all", "kernels", "kernels_and_embeddings"] = "kernels"


@dataclass
class MeshSection:
    """Device mesh (dp, fsdp, tp); -1 in one axis takes all devices the others leave."""

    dp: int = -1
    fsdp: int = 1
    tp: int = 1


@dataclass
class ScalingSection:
    num_workers: int = 1
    use_tpu: bool = False
    use_gpu: bool = False
    topology: str | None = None  # TPU slice topology, e.g. "4x4x4" (use_tpu only)
    accelerator_type: str | None = None  # e.g. "TPU-V4"
    cpus_per_worker: float = 1.0
    max_failures: int = 0  # worker-group restarts Ray Train makes, each resuming from the newest checkpoint


@dataclass
class CheckpointSection:
    every_steps: int = 100  # milestones, kept by `keep`; and always at the end
    keep: int = 3  # newest complete milestone checkpoints kept
    # also save every this many minutes of training (0 = off; checked every train.log_every steps); of these
    # rolling saves only the newest is kept, so a crash loses at most about this much, without filling the bucket
    every_minutes: float = 0.0
    # on SIGTERM or SIGINT (a preempted VM, `ray job stop`, Ctrl-C): save the step reached, then stop
    save_on_preemption: bool = True
    # how long a process may wait for the others at a save's barriers before the save fails
    barrier_timeout_s: float = 600.0
    # node-local scratch: model config and tokenizer fetched from a bucket run, registration exports, JAX's
    # cache for a bucket run; default <system temp>/openllama-staging (checkpoints never pass through it)
    staging_dir: str | None = None


@dataclass
class EvalSection:
    every_steps: int = 100  # held-out perplexity per subset; 0 disables it
    batches: int = 2  # validation batches of eval.batch_size per subset
    # lm-eval tasks scored on the checkpoints saved at eval.tasks_every_steps, each in a Ray task of its own
    # while training goes on (`openllama_local`: the offline local pack); empty: none
    tasks: list[str] = field(default_factory=list)
    tasks_every_steps: int = 0  # a multiple of checkpoint.every_steps (0: every milestone checkpoint)
    tasks_limit: int | None = None  # documents per task (None: all)
    tasks_cpus: float = 1.0  # CPUs each evaluation task holds, besides the training workers'
    tasks_timeout_s: float = 3600.0  # an evaluation running longer is cancelled (logged; training goes on)


@dataclass
class TrackingSection:
    enabled: bool = True
    experiment: str = "openllama-train"
    uri: str | None = None  # default: MLFLOW_TRACKING_URI, else ./mlruns.db
    system_metrics_every_s: float = 10.0  # CPU, memory, disk, network, GPU sampled into MLflow; 0 = off
    # after a success with MLFLOW_TRACKING_URI (or uri) set: the final checkpoint as the next version of model
    # <name> in MLflow's registry, linked to this run (an export and a transformers load: seconds to minutes)
    register_model: bool = True


@dataclass
class DeviceSection:
    peak_flops: float | None = None  # per device, for MFU; None = known table (TPU/GPU) or measured (CPU)
    compilation_cache: bool = True  # reuse compiled steps across restarts and runs (JAX persistent cache)
    compilation_cache_dir: str | None = None  # default: <output_dir>/jax_cache
    # LIBTPU_INIT_ARGS of the TPU workers, and of the compiler `openllama plan` runs (so it measures them)
    libtpu_flags: str = ""


@dataclass
class TrainConfig:
    name: str = "tiny-cpu"
    # the run lives in <output_dir>/<name>: checkpoints, Ray Train state, MLflow id. A folder every host mounts,
    # or a bucket (s3://..., gs://...; endpoint and credentials from the environment)
    output_dir: str = "runs"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    device: DeviceSection = field(default_factory=DeviceSection)

    @property
    def run_dir(self) -> Path | str:
        """The run's folder: a local Path, or a URI string when output_dir is a bucket."""
        if files.is_uri(self.output_dir):
            return files.join(self.output_dir, self.name)
        return Path(self.output_dir).absolute() / self.name

    @property
    def staging_dir(self) -> Path:
        return Path(self.checkpoint.staging_dir or DEFAULT_STAGING).absolute()

    @property
    def compilation_cache_dir(self) -> Path | None:
        """JAX's cache of compiled steps; beside the run's output, or in staging when that is a bucket (JAX
        writes its cache to local paths only)."""
        if not self.device.compilation_cache:
            return None
        default = self.staging_dir if files.is_uri(self.output_dir) else Path(self.output_dir)
        return Path(self.device.compilation_cache_dir or default / "jax_cache").absolute()

    def llama(self) -> LlamaConfig:
        """The architecture: what model.json keeps, and what weights to start from must share."""
        m = self.model
        for name in m.overrides:
            if name in RUNTIME_FIELDS:
                raise ConfigError(f"model.overrides.{name}: {name} is how the model runs, not its architecture; "
                                  f"set model.{name} instead")
        try:
            return LlamaConfig.preset(m.preset, **m.overrides)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"model: {error}") from error

    def runtime(self) -> ModelRuntime:
        """How this run runs the model; eval and export choose their own for the same weights."""
        m = self.model
        try:
            return ModelRuntime(param_dtype=m.param_dtype, dtype=m.dtype, remat_policy=m.remat_policy,
                                kernels=m.kernels, scan_layers=m.scan_layers)
        except ValueError as error:
            raise ConfigError(str(error)) from error

    def tasks_due(self, step: int) -> bool:
        """Whether the milestone checkpoint of `step` is scored on eval.tasks (the last step's always is)."""
        every = self.eval.tasks_every_steps or self.checkpoint.every_steps
        return bool(self.eval.tasks) and (step % every == 0 or step == self.train.steps)

    def decay_steps(self) -> int:
        return self.optimizer.decay_steps or self.train.steps


def mesh_shape(config: TrainConfig, device_count: int) -> tuple[int, int, int]:
    """(dp, fsdp, tp) for `device_count` devices, with a -1 axis filled in; errors name the mesh fields."""
    axes = {"dp": config.mesh.dp, "fsdp": config.mesh.fsdp, "tp": config.mesh.tp}
    free = [name for name, size in axes.items() if size == -1]
    if len(free) > 1 or any(size == 0 or size < -1 for size in axes.values()):
        raise ConfigError(f"mesh={axes}: sizes must be positive, with at most one -1 (fill the rest)")
    fixed = 1
    for size in axes.values():
        fixed *= size if size != -1 else 1
    if free:
        if device_count % fixed:
            raise ConfigError(f"mesh={axes} does not divide the {device_count} devices")
        axes[free[0]] = device_count // fixed
    elif fixed != device_count:
        raise ConfigError(f"mesh={axes} uses {fixed} devices but there are {device_count}; set one axis to -1")
    return axes["dp"], axes["fsdp"], axes["tp"]


def validate(config: TrainConfig, device_count: int | None = None) -> None:
    """Everything checkable before workers start; `device_count` defaults to one device per worker."""
    t, o = config.train, config.optimizer
    llama = config.llama()
    config.runtime()  # a dtype, remat policy or kernel set that does not exist fails here
    positive = {
        "train.steps": t.steps, "train.seq_len": t.seq_len, "train.global_batch_size": t.global_batch_size,
        "train.micro_batches": t.micro_batches, "train.log_every": t.log_every,
        "scaling.num_workers": config.scaling.num_workers, "checkpoint.every_steps": config.checkpoint.every_steps,
        "checkpoint.keep": config.checkpoint.keep, "checkpoint.barrier_timeout_s": config.checkpoint.barrier_timeout_s,
    }
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name}={value} must be at least 1")
    files.check_location(config.output_dir)
    local = {"checkpoint.staging_dir": config.checkpoint.staging_dir,
             "device.compilation_cache_dir": config.device.compilation_cache_dir}
    for name, value in local.items():
        if value is not None and files.is_uri(value):
            raise ConfigError(f"{name}={value} must be a local folder (node-local scratch), not a URI")
    if t.seq_len > llama.max_position_embeddings:
        raise ConfigError(
            f"train.seq_len={t.seq_len} exceeds model.max_position_embeddings={llama.max_position_embeddings}"
        )
    if not 0 <= o.warmup_steps < config.decay_steps():
        raise ConfigError(
            f"optimizer.warmup_steps={o.warmup_steps} must be at least 0 and below the decay steps "
            f"({config.decay_steps()}: optimizer.decay_steps, else train.steps)"
        )
    if config.scaling.use_tpu:
        check_slice(config.scaling.num_workers, config.scaling.accelerator_type, config.scaling.topology)
    if config.checkpoint.every_minutes < 0:
        raise ConfigError(f"checkpoint.every_minutes={config.checkpoint.every_minutes} must be >= 0 (0 = off)")
    if config.eval.every_steps < 0 or config.eval.batches < 1:
        raise ConfigError("eval.every_steps must be >= 0 and eval.batches >= 1")
    e = config.eval
    if e.tasks and (e.tasks_every_steps < 0 or e.tasks_every_steps % config.checkpoint.every_steps):
        raise ConfigError(f"eval.tasks_every_steps={e.tasks_every_steps} must be a multiple of "
                          f"checkpoint.every_steps={config.checkpoint.every_steps}: tasks score saved checkpoints")
    if e.tasks and (e.tasks_cpus <= 0 or e.tasks_timeout_s <= 0 or (e.tasks_limit is not None and e.tasks_limit < 1)):
        raise ConfigError("eval.tasks_cpus and eval.tasks_timeout_s must be positive, eval.tasks_limit at least 1")
    if device_count is None and (config.scaling.use_tpu or config.scaling.use_gpu):
        return  # accelerators per worker are known only on the workers, which call this again
    dp, fsdp, tp = mesh_shape(config, device_count or config.scaling.num_workers)
    batch_shards = dp * fsdp
    if t.global_batch_size % (batch_shards * t.micro_batches):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by {batch_shards} data-parallel "
            f"shards (mesh dp={dp} x fsdp={fsdp}) x train.micro_batches={t.micro_batches}"
        )
    if llama.num_attention_heads % tp or llama.num_key_value_heads % tp:
        raise ConfigError(f"mesh.tp={tp} must divide the model's attention and key/value heads")


def load_config(path_or_preset: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """A validated TrainConfig from a YAML path or a preset name (`tiny-cpu`, `openllama-7b`, ...)."""
    path = Path(path_or_preset)
    if not path.is_file() and (CONFIG_DIR / f"{path_or_preset}.yaml").is_file():
        path = CONFIG_DIR / f"{path_or_preset}.yaml"
    config = load(TrainConfig, path, overrides)
    validate(config)
    return config
