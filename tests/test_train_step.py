"""The train step: gradient accumulation, the weight-decay mask, skipping non-finite updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from openllama.train.model import DEFAULT_RUNTIME, LlamaConfig, init_params
from openllama.train.step import decay_mask, learning_rate, make_optimizer, make_train_step

CONFIG = LlamaConfig.preset("tiny", num_hidden_layers=1)
SCHEDULE = learning_rate(1e-2, 1e-3, 1, 10)  # warmup starts at 0: step 0 makes no update, step 1 does


def setup(micro_batches: int, skip_nonfinite: bool = False):
    # eps well above float32 rounding of the gradients: with 1e-8, Adam turns the rounding of a gradient
    # near 1e-8 (summed in another order) into a visible part of a whole step, whatever the accumulation
    optimizer = make_optimizer(SCHEDULE, b1=0.9, b2=0.95, eps=1e-6, weight_decay=0.1, clip_norm=1.0)
    params = init_params(CONFIG, 0)
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}
    step = jax.jit(make_train_step(CONFIG, DEFAULT_RUNTIME, optimizer, SCHEDULE, micro_batches, skip_nonfinite))
    return state, step


def two_steps(state, step, batch):
    state, _ = step(state, batch)
    return step(state, batch)


def tokens(batch: int, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, 17), 0, CONFIG.vocab_size, jnp.int32)


def test_two_micro_batches_of_b_equal_one_batch_of_2b():
    batch = tokens(8)
    whole, whole_metrics = two_steps(*setup(micro_batches=1), batch)
    accumulated, accumulated_metrics = two_steps(*setup(micro_batches=2), batch)
    np.testing.assert_allclose(accumulated_metrics["loss"], whole_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(accumulated_metrics["grad_norm"], whole_metrics["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(accumulated["params"]), jax.tree.leaves(whole["params"]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)  # 1e-3 of a 1e-2 step


def test_step_reports_the_learning_rate_of_its_schedule():
    _, metrics = two_steps(*setup(micro_batches=1), tokens(4))
    assert float(metrics["learning_rate"]) == float(SCHEDULE(1)) > 0


def test_weight_decay_applies_to_kernels_only_by_default():
    mask = decay_mask(init_params(CONFIG, 0))
    assert mask["layers_0"]["self_attn"]["q_proj"]["kernel"] is True
    assert mask["lm_head"]["kernel"] is True
    assert mask["layers_0"]["input_layernorm"]["weight"] is False
    assert mask["norm"]["weight"] is False
    assert mask["embed_tokens"]["embedding"] is False


def test_weight_decay_on_embeddings_or_on_everything_is_a_setting():
    mask = decay_mask(init_params(CONFIG, 0), "kernels_and_embeddings")
    assert mask["embed_tokens"]["embedding"] is True
    assert mask["norm"]["weight"] is False
    assert all(jax.tree.leaves(decay_mask(init_params(CONFIG, 0), "all")))  # EasyLM's AdamW: no mask
    with pytest.raises(ValueError, match="decay='norms' must be one of all, kernels, kernels_and_embeddings"):
        decay_mask(init_params(CONFIG, 0), "norms")


@pytest.mark.parametrize("decay", ["all", "kernels"])
def test_with_no_gradient_only_the_decayed_parameters_shrink(decay):
    """One AdamW update with zero gradients moves a parameter only by its decay: lr x weight_decay x value."""
    params = init_params(CONFIG, 0)
    optimizer = make_optimizer(optax.constant_schedule(0.1), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.5,
                               clip_norm=1.0, decay=decay)
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    after = optax.apply_updates(params, updates)
    gain, kernel = after["norm"]["weight"], after["lm_head"]["kernel"]
    np.testing.assert_allclose(kernel, params["lm_head"]["kernel"] * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_allclose(gain, params["norm"]["weight"] * ((1 - 0.05) if decay == "all" else 1), rtol=1e-6)


def test_nonfinite_update_is_skipped_when_asked():
    state, step = setup(micro_batches=1, skip_nonfinite=True)
    state["params"]["norm"]["weight"] = state["params"]["norm"]["weight"] * jnp.nan
    before = jax.tree.map(np.asarray, state)
    after, metrics = step(state, tokens(4))
    assert not bool(metrics["finite"])
    kernel = ("layers_0", "mlp", "up_proj", "kernel")
    np.testing.assert_array_equal(after["params"][kernel[0]][kernel[1]][kernel[2]][kernel[3]],
                                  before["params"][kernel[0]][kernel[1]][kernel[2]][kernel[3]])
    for a, b in zip(jax.tree.leaves(after["opt_state"]), jax.tree.leaves(before["opt_state"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_finite_step_updates_parameters():
    state, step = setup(micro_batches=1, skip_nonfinite=True)
    before = np.asarray(state["params"]["layers_0"]["mlp"]["up_proj"]["kernel"])
    after, metrics = two_steps(state, step, tokens(4))
    assert bool(metrics["finite"])
    assert not np.array_equal(after["params"]["layers_0"]["mlp"]["up_proj"]["kernel"], before)
