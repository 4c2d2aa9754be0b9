"""The train step of a config on a mesh: what every worker runs, and exactly what `openllama plan` compiles.

One function builds it for both, so the plan of a TPU slice is the program the slice will run: the same
optimizer, parameter layout, state shardings, batch sharding and jitted step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from openllama.train import sharding, step
from openllama.train.config import TrainConfig, mesh_shape
from openllama.train.model import LlamaConfig, ModelRuntime, init_params


@dataclass
class Program:
    """The jitted pieces of a run on one mesh, and the layout of its state (the blocks' parameters stacked when
    the runtime scans them; checkpoints hold them per layer whatever the run's layout)."""

    llama: LlamaConfig
    runtime: ModelRuntime
    mesh: Mesh
    schedule: optax.Schedule
    state_shardings: dict
    abstract_state: dict  # ShapeDtypeStructs with their shardings, for restoring and compiling
    batch_sharding: NamedSharding
    init_state: Callable[[], dict]
    step_function: Callable  # (state, tokens [B, seq+1]) -> (state, metrics), before jit: its jaxpr is counted
    train_step: Callable  # step_function jitted with the shardings above, donating the state
    eval_step: Callable  # (params, tokens, row weight) -> (summed loss, tokens)

    def abstract_batch(self, config: TrainConfig) -> jax.ShapeDtypeStruct:
        shape = (config.train.global_batch_size, config.train.seq_len + 1)
        return jax.ShapeDtypeStruct(shape, np.int32, sharding=self.batch_sharding)


def make_program(config: TrainConfig, devices: list, runtime: ModelRuntime | None = None) -> Program:
    """The run's program on `devices` (a worker's `jax.devices()`, or a TPU slice's compile-only devices), run
    as `runtime` says (default: the config's)."""
    llama, runtime = config.llama(), runtime or config.runtime()
    mesh = sharding.make_mesh(mesh_shape(config, len(devices)), devices)
    o = config.optimizer
    schedule = step.learning_rate(o.peak_lr, o.end_lr, o.warmup_steps, config.decay_steps())
    optimizer = step.make_optimizer(
        schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, clip_norm=o.clip_norm,
        decay=o.decay,
    )
    params_shape = jax.eval_shape(lambda: init_params(llama, config.train.seed, runtime))
    sharding.check_divisible(params_shape, dict(mesh.shape))
    param_shardings = sharding.param_shardings(params_shape, mesh)
    opt_shape = jax.eval_shape(optimizer.init, params_shape)
    replicated = NamedSharding(mesh, PartitionSpec())
    state_shardings = {
        "params": param_shardings,
        "opt_state": sharding.state_shardings(opt_shape, params_shape, mesh),
        "step": replicated,
    }
    abstract_state = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
        {"params": params_shape, "opt_state": opt_shape, "step": jax.ShapeDtypeStruct((), np.int32)},
        state_shardings,
    )

    def fresh_state() -> dict:
        params = init_params(llama, config.train.seed, runtime)
        return {"params": params, "opt_state": optimizer.init(params), "step": np.int32(0)}

    batch_sharding = sharding.batch_sharding(mesh)
    step_function = step.make_train_step(
        llama, runtime, optimizer, schedule, config.train.micro_batches,
        skip_nonfinite=config.train.on_nonfinite == "skip", batch_sharding=batch_sharding,
    )
    return Program(
        llama=llama, runtime=runtime, mesh=mesh, schedule=schedule, state_shardings=state_shardings,
        abstract_state=abstract_state, batch_sharding=batch_sharding,
        init_state=jax.jit(fresh_state, out_shardings=state_shardings), step_function=step_function,
        train_step=jax.jit(step_function, in_shardings=(state_shardings, batch_sharding),
                           out_shardings=(state_shardings, replicated), donate_argnums=0),
        eval_step=jax.jit(step.make_eval_step(llama, runtime),
                          in_shardings=(param_shardings, batch_sharding, batch_sharding), out_shardings=replicated),
    )
