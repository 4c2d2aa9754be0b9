"""Every mesh gives the single device's losses: tensor parallel (tp=2) and dp x fsdp x tp, on 8 host devices.

XLA makes the 8 devices of one CPU (`--xla_force_host_platform_device_count`), which has to be set before
JAX starts, so the meshes run in a subprocess of their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

MESHES = [(1, 1, 1, "reference"), (1, 1, 2, "reference"), (2, 2, 2, "reference"), (1, 4, 2, "reference"),
          (8, 1, 1, "reference"), (1, 1, 1, "splash"), (2, 2, 2, "splash"), (2, 2, 2, "reference-scan")]
STEPS = 3

TRAIN_ON_MESHES = f"""
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from openllama.train import sharding, step
from openllama.train.model import LlamaConfig, ModelRuntime, init_params

schedule = step.learning_rate(1e-2, 1e-3, 1, 10)
optimizer = step.make_optimizer(schedule, b1=0.9, b2=0.95, eps=1e-6, weight_decay=0.1, clip_norm=1.0)
batch = jax.random.randint(jax.random.PRNGKey(0), (8, 129), 0, 512, jnp.int32)  # splash: blocks of 128
losses = {{}}
for *shape, kernels in {MESHES!r}:
    config = LlamaConfig.preset("tiny")
    runtime = ModelRuntime(kernels=kernels.removesuffix("-scan"), scan_layers=kernels.endswith("-scan"))
    mesh = sharding.make_mesh(tuple(shape), jax.devices()[: int(np.prod(shape))])
    params = init_params(config, 0, runtime)
    state = {{"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}}
    shapes = jax.eval_shape(lambda: state)
    shardings = {{"params": sharding.param_shardings(shapes["params"], mesh),
                 "opt_state": sharding.state_shardings(shapes["opt_state"], shapes["params"], mesh),
                 "step": NamedSharding(mesh, P())}}
    data = sharding.batch_sharding(mesh)
    train_step = jax.jit(step.make_train_step(config, runtime, optimizer, schedule, 1, False, batch_sharding=data),
                         in_shardings=(shardings, data), out_shardings=(shardings, NamedSharding(mesh, P())))
    state = jax.device_put(state, shardings)
    per_step = []
    with jax.set_mesh(mesh):  # the kernels that run per shard (splash) find the mesh here
        for _ in range({STEPS}):
            state, metrics = train_step(state, jax.device_put(batch, data))
            per_step.append(float(metrics["loss"]))
    losses["x".join(map(str, shape)) + "-" + kernels] = per_step
print(json.dumps(losses))
"""


@pytest.fixture(scope="module")
def losses() -> dict[str, list[float]]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", TRAIN_ON_MESHES], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("mesh", ["1x1x2-reference", "2x2x2-reference", "1x4x2-reference", "8x1x1-reference",
                                  "1x1x1-splash", "2x2x2-splash", "2x2x2-reference-scan"])
def test_a_mesh_gives_the_losses_of_one_device(losses, mesh):
    """(dp, fsdp, tp): tensor parallel alone, all three axes at once, fsdp with tp, data parallel alone;
    the splash kernels, alone and run per shard of a dp x fsdp x tp mesh; and the scanned blocks, whose
    stacked parameters keep their layer axis whole."""
    assert len(losses[mesh]) == STEPS
    for single, sharded in zip(losses["1x1x1-reference"], losses[mesh], strict=True):
        assert abs(single - sharded) <= 1e-5, (mesh, losses)
