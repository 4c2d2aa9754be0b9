"""Every kernel set equals the reference math (plain JAX, differentiated by JAX), in values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openllama.train import kernels
from openllama.train.model import Llama, LlamaConfig, ModelRuntime, init_params

FAST = [k for k in kernels.KERNELS if k not in ("auto", "reference")]


def random(shape: tuple[int, ...], seed: int) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


@pytest.mark.parametrize("name", FAST)
def test_matmul_and_its_gradients_equal_the_reference(name):
    rows, kernel, probe = random((12, 16), 0), random((16, 8), 1), random((12, 8), 2)

    def loss(kind):
        return lambda r, k: jnp.sum(kernels.matmul(r, k, kind) * probe)

    np.testing.assert_allclose(kernels.matmul(rows, kernel, name), kernels.matmul(rows, kernel, "reference"),
                               atol=1e-5)
    for fast, reference in zip(jax.grad(loss(name), (0, 1))(rows, kernel),
                               jax.grad(loss("reference"), (0, 1))(rows, kernel), strict=True):
        np.testing.assert_allclose(fast, reference, atol=1e-4)


SEQ = {"splash": 128}  # the splash kernels work in blocks of 128 positions


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_and_its_gradients_equal_the_reference(name, kv_heads, causal):
    """Causal (mask None, what training runs) and a custom mask (packed eval rows, the KV cache)."""
    batch, seq, heads, head_dim = 2, SEQ.get(name, 10), 4, 8
    q, probe = random((batch, seq, heads, head_dim), 3), random((batch, seq, heads, head_dim), 6)
    k, v = random((batch, seq, kv_heads, head_dim), 4), random((batch, seq, kv_heads, head_dim), 5)
    mask = None
    if not causal:
        mask = jnp.tril(jnp.ones((seq, seq), bool))[None, None] & (jnp.arange(seq) != 3)[None, None, None]
        mask = mask | jnp.eye(seq, dtype=bool)[None, None]  # a masked-out key, every row still sees itself

    def loss(kind):
        return lambda q, k, v: jnp.sum(kernels.attention(q, k, v, mask, kind) * probe)

    np.testing.assert_allclose(kernels.attention(q, k, v, mask, name),
                               kernels.attention(q, k, v, mask, "reference"), atol=1e-5)
    for fast, reference in zip(jax.grad(loss(name), (0, 1, 2))(q, k, v),
                               jax.grad(loss("reference"), (0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(fast, reference, atol=1e-4)


@pytest.mark.parametrize("name", FAST)
def test_the_model_gives_the_same_logits_with_every_kernel_set(name):
    config = LlamaConfig.preset("tiny", num_key_value_heads=2)
    params = init_params(config, seed=1)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (2, SEQ.get(name, 16))))

    def logits(kind):
        return Llama(config, ModelRuntime(kernels=kind)).apply({"params": params}, ids)[0]

    np.testing.assert_allclose(logits(name), logits("reference"), atol=1e-5)


def test_auto_takes_each_backends_own_kernels():
    assert [kernels.for_platform("auto", p) for p in ("cpu", "tpu", "gpu")] == ["xla_cpu", "splash", "cudnn"]
    assert kernels.for_platform("reference", "tpu") == "reference"
    with pytest.raises(ValueError, match="model.kernels='fast'"):
        kernels.resolve("fast")


def test_a_length_the_splash_blocks_do_not_tile_takes_the_reference_path():
    q, k = random((1, 100, 4, 8), 0), random((1, 100, 2, 8), 1)
    assert not kernels.splash_fits(100) and kernels.splash_fits(2048)
    np.testing.assert_array_equal(kernels.attention(q, k, k, None, "splash"),
                                  kernels.attention(q, k, k, None, "reference"))
