"""The remat policy that offloads keys and values to host memory (the 3B preset's): same math on CPU, where the
host's memory is the device's own, and the offload is in the program (docs/tpu.md measures it on TPU)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openllama.train.model import Llama, LlamaConfig, ModelRuntime, init_params, stack_layers, unstack_layers

OFFLOADED = "q_saved_kv_offloaded"
TINY = LlamaConfig.preset("tiny", num_key_value_heads=2)
REFERENCE = ModelRuntime(kernels="reference")


def loss_and_grads(runtime: ModelRuntime, params: dict, ids: jax.Array) -> tuple[jax.Array, dict]:
    def loss(p: dict) -> jax.Array:
        logits = Llama(TINY, runtime).apply({"params": p}, ids[:, :-1])[0]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_offloading_keys_and_values_gives_the_loss_and_gradients_of_no_remat(scan_layers):
    params = init_params(TINY, seed=5)
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 17), 0, TINY.vocab_size)
    base_loss, base_grads = loss_and_grads(REFERENCE, params, ids)
    runtime = dataclasses.replace(REFERENCE, remat_policy=OFFLOADED, scan_layers=scan_layers)
    loss, grads = loss_and_grads(runtime, stack_layers(params) if scan_layers else params, ids)
    np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(unstack_layers(grads) if scan_layers else grads), jax.tree.leaves(base_grads),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_keys_and_values_go_to_host_memory_and_queries_stay_in_device_memory():
    params = init_params(TINY, seed=5)
    ids = jnp.zeros((2, 16), jnp.int32)

    def backward(policy: str) -> str:
        runtime = dataclasses.replace(REFERENCE, remat_policy=policy)
        return str(jax.make_jaxpr(jax.grad(lambda p: Llama(TINY, runtime).apply({"params": p}, ids)[0].sum()))(params))

    offloaded = backward(OFFLOADED)
    to_host = [line for line in offloaded.splitlines() if "<host>" in line and "device_put" in line]
    assert len(to_host) == 2 * TINY.num_hidden_layers  # each layer's keys and values, nothing else
    queries = TINY.num_hidden_layers  # kept, so q_proj does not run again in the backward pass
    assert offloaded.count("dot_general[") == backward("kv").count("dot_general[") - queries
