"""Ray Train's JAX backend, extended to CPU workers (and to TPU workers' libtpu flags).

The stock backend calls `jax.distributed.initialize` only for TPU or GPU workers; CPU workers would each
be a separate one-process JAX. Here CPU workers also join one `jax.distributed` system (a group of one
too: its runtime is what notices a SIGTERM and agrees on the step to save at), with gloo for the
cross-process collectives, so the same code path (mesh, shardings, collectives) runs on a laptop,
in CI and on a TPU pod. The coordinator is rank 0's Ray node address and gloo runs on each worker's node
address, so the workers may be on different hosts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial

import ray
from ray.train._internal.utils import get_address_and_port
from ray.train.v2.jax.config import JaxConfig, _JaxBackend, _shutdown_jax_distributed

from openllama.train.tpu import add_libtpu_flags

log = logging.getLogger(__name__)


def _gloo_on(address: str) -> None:
    """Make this process's CPU backend run gloo on `address`, the Ray node's address (its peers reach it).

    Left to itself, gloo listens on and advertises the address the machine's hostname resolves to, which is
    often 127.0.0.1 (/etc/hosts on many images): peers on other hosts then get `Connection refused`. JAX
    0.10 only takes the address through the collectives object of the CPU backend it creates lazily, so the
    backend's factory is registered again with one, before any backend exists.
    """
    # private JAX modules: the one place where gloo's address can be given (jax 0.10)
    from jax._src import distributed, xla_bridge
    from jax._src.lib import _jax

    collectives = _jax.make_gloo_tcp_collectives(distributed_client=distributed.global_state.client,
                                                 hostname=address)
    xla_bridge.register_backend_factory("cpu", partial(xla_bridge.make_cpu_client, collectives=collectives),
                                        priority=0, fail_quietly=False)


def _initialize_cpu_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax  # after JAX_PLATFORMS is set: JAX reads it when first imported in this worker

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)
    address = ray.util.get_node_ip_address()
    _gloo_on(address)
    log.info("JAX distributed on CPU: process %d of %d, coordinator %s, gloo on %s", process_id, num_processes,
             coordinator, address)


class _CpuJaxBackend(_JaxBackend):
    def on_start(self, worker_group, backend_config: JaxConfigWithCpu) -> None:
        if backend_config.use_tpu and backend_config.libtpu_flags:  # before JAX starts libtpu in the workers
            ray.get(worker_group.execute_async(add_libtpu_flags, backend_config.libtpu_flags))
        if backend_config.use_tpu or backend_config.use_gpu:
            return super().on_start(worker_group, backend_config)
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
        try:
            ray.get(worker_group.execute_async(_shutdown_jax_distributed), timeout=30)
        except Exception as error:  # a dead worker cannot shut down; the group is torn down anyway
            log.warning("JAX distributed shutdown on CPU workers failed: %s", error)
        return None


@dataclass
class JaxConfigWithCpu(JaxConfig):
    """`JaxConfig` whose backend also forms a `jax.distributed` system from CPU workers, and gives TPU workers
    the run's libtpu flags (`device.libtpu_flags`) before JAX starts libtpu there."""

    libtpu_flags: str = ""

    @property
    def backend_cls(self):
        return _CpuJaxBackend
