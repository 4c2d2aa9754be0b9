"""The Flax LLaMA itself: cache, GQA, mixed precision, remat, parameter counts, scanned blocks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openllama.train.model import (
    DEFAULT_RUNTIME,
    Llama,
    LlamaConfig,
    ModelRuntime,
    init_cache,
    init_params,
    stack_layers,
    unstack_layers,
)

TINY = LlamaConfig.preset("tiny")


def forward(config: LlamaConfig, params: dict, ids: np.ndarray, runtime: ModelRuntime = DEFAULT_RUNTIME) -> np.ndarray:
    return np.asarray(jax.jit(Llama(config, runtime).apply)({"params": params}, jnp.asarray(ids))[0])


def random_ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, TINY.vocab_size, (batch, length))


def test_kv_cache_prefill_then_decode_equals_full_forward():
    params = init_params(TINY, seed=1)
    ids = random_ids(2, 12)
    full = forward(TINY, params, ids)
    apply = jax.jit(Llama(TINY).apply)
    cache = init_cache(TINY, ModelRuntime(), batch=2, max_len=16)
    prefill, cache = apply({"params": params}, jnp.asarray(ids[:, :8]), cache=cache)
    steps = [prefill]
    for t in range(8, 12):
        logits, cache = apply({"params": params}, jnp.asarray(ids[:, t : t + 1]), cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_grouped_query_attention_equals_multi_head_with_repeated_kv_heads():
    gqa = LlamaConfig.preset("tiny", num_key_value_heads=2)
    mha = LlamaConfig.preset("tiny")
    params = init_params(gqa, seed=2)
    repeated = jax.tree.map(lambda x: x, params)
    for i in range(gqa.num_hidden_layers):
        attn = repeated[f"layers_{i}"]["self_attn"]
        for name in ("k_proj", "v_proj"):
            kernel = attn[name]["kernel"].reshape(gqa.hidden_size, gqa.num_key_value_heads, gqa.head_dim)
            group = gqa.num_attention_heads // gqa.num_key_value_heads
            attn[name]["kernel"] = jnp.repeat(kernel, group, axis=1).reshape(gqa.hidden_size, -1)
    ids = random_ids(2, 10)
    np.testing.assert_allclose(forward(gqa, params, ids), forward(mha, repeated, ids), atol=1e-5)


def test_bfloat16_compute_with_float32_params_is_close_to_float32():
    params = init_params(TINY, seed=3)
    ids = random_ids(2, 16)
    exact = forward(TINY, params, ids)
    mixed = forward(TINY, params, ids, ModelRuntime(dtype="bfloat16"))
    assert mixed.dtype == np.float32
    assert np.abs(mixed - exact).max() < 0.05 * np.abs(exact).max()


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", "kv"])
def test_remat_policy_gives_the_same_loss_and_gradients_as_none(policy):
    params = init_params(TINY, seed=4)
    ids = jnp.asarray(random_ids(2, 16))

    def loss(runtime, p):
        logits = Llama(TINY, runtime).apply({"params": p}, ids[:, :-1])[0]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    base_loss, base_grads = jax.jit(jax.value_and_grad(lambda p: loss(ModelRuntime(), p)))(params)
    remat = ModelRuntime(remat_policy=policy)
    remat_loss, remat_grads = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
    np.testing.assert_allclose(remat_loss, base_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(base_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_dots_policies_keep_the_projections_instead_of_recomputing_them():
    ids = jnp.asarray(random_ids(2, 16))

    def products_in_backward(policy: str) -> int:
        runtime = ModelRuntime(remat_policy=policy)
        params = init_params(TINY, seed=4)
        grad = jax.grad(lambda p: Llama(TINY, runtime).apply({"params": p}, ids)[0].sum())
        return str(jax.make_jaxpr(grad)(params)).count("dot_general[")

    none, full = products_in_backward("none"), products_in_backward("full")
    projections_recomputed = 7 * TINY.num_hidden_layers
    assert full >= none + projections_recomputed
    assert products_in_backward("dots_no_batch") < none + projections_recomputed
    assert products_in_backward("dots") < none + projections_recomputed
    keys_and_values = 2 * TINY.num_hidden_layers  # `kv` keeps them; the other projections run again
    assert products_in_backward("kv") == full - keys_and_values


@pytest.mark.parametrize(
    ("preset", "count"),
    [("7b", 6_738_415_616), ("13b", 13_015_864_320), ("3b", 3_426_473_600)],
)
def test_preset_parameter_counts_match_the_published_models(preset, count):
    assert LlamaConfig.preset(preset).num_params() == count


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 2}, {"tie_word_embeddings": True}])
def test_num_params_counts_exactly_the_initialized_parameters(overrides):
    config = LlamaConfig.preset("tiny", **overrides)
    actual = sum(x.size for x in jax.tree.leaves(init_params(config)))
    assert config.num_params() == actual


def test_unknown_preset_is_an_error_listing_the_allowed_names():
    with pytest.raises(ValueError, match=r"unknown model preset '70b'.*'7b'"):
        LlamaConfig.preset("70b")


def test_the_architecture_holds_no_run_time_setting():
    assert not {"param_dtype", "dtype", "remat_policy", "kernels", "scan_layers"} & set(dataclasses.asdict(TINY))
    with pytest.raises(ValueError, match=r"model.dtype='fp8'; allowed"):
        ModelRuntime(dtype="fp8")
    with pytest.raises(ValueError, match=r"model.remat_policy='some'; allowed"):
        ModelRuntime(remat_policy="some")


SCANNED_TINY = LlamaConfig.preset("tiny", num_key_value_heads=2)


def loss_and_grads(runtime: ModelRuntime, params: dict, ids: jax.Array) -> tuple[jax.Array, dict]:
    def loss(p: dict) -> jax.Array:
        logits = Llama(SCANNED_TINY, runtime).apply({"params": p}, ids[:, :-1])[0]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", ["none", "full", "dots_no_batch", "kv"])
def test_scanned_blocks_give_the_loss_and_gradients_of_the_unrolled_ones(policy):
    unrolled = ModelRuntime(remat_policy=policy, kernels="reference")
    scanned = dataclasses.replace(unrolled, scan_layers=True)
    params = init_params(SCANNED_TINY, 4, unrolled)
    ids = jnp.asarray(random_ids(2, 13))
    loss, grads = loss_and_grads(unrolled, params, ids)
    scanned_loss, scanned_grads = loss_and_grads(scanned, init_params(SCANNED_TINY, 4, scanned), ids)
    np.testing.assert_allclose(scanned_loss, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(unstack_layers(scanned_grads)), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_scanning_model_holds_its_blocks_stacked_and_a_seed_draws_the_same_weights_either_way():
    per_layer = init_params(SCANNED_TINY, 4)
    stacked = init_params(SCANNED_TINY, 4, ModelRuntime(scan_layers=True))
    assert set(stacked) == {"embed_tokens", "layers", "norm", "lm_head"}
    assert stacked["layers"]["self_attn"]["q_proj"]["kernel"].shape == (SCANNED_TINY.num_hidden_layers, 64, 64)
    assert jax.tree.all(jax.tree.map(np.array_equal, unstack_layers(stacked), per_layer))
    assert jax.tree.all(jax.tree.map(np.array_equal, stack_layers(per_layer), stacked))


def joined_shapes(jaxpr: jax.extend.core.Jaxpr) -> set[tuple[int, ...]]:
    """The output shapes of every stack and concatenate in `jaxpr` and the programs inside it (scan, remat)."""
    shapes = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("stack", "concatenate"):
            shapes |= {tuple(v.aval.shape) for v in eqn.outvars}
        for param in eqn.params.values():
            for inner in param if isinstance(param, tuple | list) else (param,):
                if isinstance(inner, jax.extend.core.ClosedJaxpr):
                    shapes |= joined_shapes(inner.jaxpr)
                elif isinstance(inner, jax.extend.core.Jaxpr):
                    shapes |= joined_shapes(inner)
    return shapes


def test_the_scanned_training_pass_stacks_no_parameters():
    runtime = ModelRuntime(scan_layers=True, remat_policy="kv")
    params = init_params(SCANNED_TINY, 4, runtime)
    ids = jnp.asarray(random_ids(2, 13))
    jaxpr = jax.make_jaxpr(lambda p: loss_and_grads(runtime, p, ids))(params)
    stacked = {tuple(leaf.shape) for leaf in jax.tree.leaves(params["layers"])}
    assert not joined_shapes(jaxpr.jaxpr) & stacked
