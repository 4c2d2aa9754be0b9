"""Ray Train's JAX backend, extended to CPU workers.

The stock backend calls `jax.distributed.initialize` only for TPU or GPU workers; CPU workers would each
be a separate one-process JAX. Here CPU workers also join one `jax.distributed` system, with gloo for
the cross-process collectives, so the same code path (mesh, shardings, collectives) runs on a laptop,
in CI and on a TPU pod.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray
from ray.train._internal.utils import get_address_and_port
from ray.train.v2.jax.config import JaxConfig, _JaxBackend, _shutdown_jax_distributed

log = logging.getLogger(__name__)


def _initialize_cpu_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax  # after JAX_PLATFORMS is set: JAX reads it when first imported in this worker

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)
    log.info("JAX distributed on CPU: process %d of %d, coordinator %s", process_id, num_processes, coordinator)


class _CpuJaxBackend(_JaxBackend):
    def on_start(self, worker_group, backend_config: JaxConfig) -> None:
        if backend_config.use_tpu or backend_config.use_gpu:
            return super().on_start(worker_group, backend_config)
        if len(worker_group) == 1:
            worker_group.execute(os.environ.__setitem__, "JAX_PLATFORMS", "cpu")
            return None
        address, port = worker_group.execute_single(0, get_address_and_port)
        coordinator = f"{address}:{port}"
        ray.get([
            worker_group.execute_single_async(i, _initialize_cpu_distributed, coordinator, len(worker_group), i)
            for i in range(len(worker_group))
        ])
        return None

    def on_shutdown(self, worker_group, backend_config: JaxConfig) -> None:
        if backend_config.use_tpu or backend_config.use_gpu:
            return super().on_shutdown(worker_group, backend_config)
        if len(worker_group) > 1:
            try:
                ray.get(worker_group.execute_async(_shutdown_jax_distributed), timeout=30)
            except Exception as error:  # a dead worker cannot shut down; the group is torn down anyway
                log.warning("JAX distributed shutdown on CPU workers failed: %s", error)
        return None


@dataclass
class JaxConfigWithCpu(JaxConfig):
    """`JaxConfig` whose backend also forms a `jax.distributed` system from CPU workers."""

    @property
    def backend_cls(self):
        return _CpuJaxBackend
