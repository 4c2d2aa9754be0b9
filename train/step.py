"""Loss, optimizer and the jitted train and eval steps.

The train step takes the whole global batch and accumulates gradients over `micro_batches` pieces with a
scan: micro-batch m holds rows m, m+M, m+2M, ... so each device keeps its own rows and no data moves.
Every micro-batch has the same number of tokens, so the mean of their mean losses is the global mean.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from openllama.train.model import Llama, LlamaConfig, ModelRuntime
from openllama.train.sharding import path_name

TrainState = dict[str, Any]  # {"params", "opt_state", "step"}


def learning_rate(peak_lr: float, end_lr: float, warmup_steps: int, decay_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `peak_lr`, then cosine to `end_lr` at `decay_steps` (warmup included)."""
    return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps, decay_steps, end_lr)


DECAYED = ("all", "kernels", "kernels_and_embeddings")  # what `optimizer.decay` can name


def decay_mask(params: Any, decay: str = "kernels") -> Any:
    """True for the parameters weight decay applies to: every one (`all`: EasyLM's AdamW, which OpenLLaMA
    was trained with, takes no mask), or the matmul kernels (and the token embeddings when asked).

    Our default leaves out the norm gains (decay pulls them toward 0, not toward their init of 1) and the
    embeddings (a rare token's row gets almost no gradient, so decay alone would shrink it).
    """
    if decay not in DECAYED:
        raise ValueError(f"decay={decay!r} must be one of {', '.join(DECAYED)}")

    def decayed(path: tuple, _: Any) -> bool:
        name = path_name(path)
        return (decay == "all" or name.endswith("/kernel")
                or (decay == "kernels_and_embeddings" and name.endswith("embed_tokens/embedding")))

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(
    schedule: optax.Schedule, *, b1: float, b2: float, eps: float, weight_decay: float, clip_norm: float,
    decay: str = "kernels",
) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                    mask=lambda params: decay_mask(params, decay)),
    )


LOSS_CHUNK = 512  # positions whose logits exist at once


def token_losses(model: Llama, params: Any, tokens: jax.Array) -> jax.Array:
    """Next-token cross-entropy [batch, seq] of rows `tokens` [batch, seq + 1].

    The output layer and the loss run over chunks of LOSS_CHUNK positions, one after another, and the
    backward pass recomputes each chunk's logits: [batch, seq, vocab] float32 logits (and their gradient)
    never exist whole, which at 2048 positions and 32,000 tokens is gigabytes per chip.
    """
    hidden, _ = model.apply({"params": params}, tokens[:, :-1], method=Llama.hidden_states)
    targets = tokens[:, 1:]
    batch, seq, width = hidden.shape
    chunks = seq // LOSS_CHUNK if seq % LOSS_CHUNK == 0 else 1

    @jax.checkpoint
    def chunk_losses(chunk: tuple[jax.Array, jax.Array]) -> jax.Array:
        chunk_hidden, chunk_targets = chunk
        logits = model.apply({"params": params}, chunk_hidden, method=Llama.logits)
        return optax.softmax_cross_entropy_with_integer_labels(logits, chunk_targets)

    def split(x: jax.Array) -> jax.Array:
        return x.reshape(batch, chunks, seq // chunks, *x.shape[2:]).swapaxes(0, 1)

    losses = jax.lax.map(chunk_losses, (split(hidden), split(targets)))  # [chunks, batch, seq / chunks]
    return losses.swapaxes(0, 1).reshape(batch, seq)


def mean_loss(model: Llama, params: Any, tokens: jax.Array) -> jax.Array:
    return token_losses(model, params, tokens).mean()


def make_train_step(
    config: LlamaConfig,
    runtime: ModelRuntime,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    micro_batches: int,
    skip_nonfinite: bool,
    batch_sharding: NamedSharding | None = None,
):
    """`step(state, tokens[B, seq+1]) -> (state, metrics)`, to be jitted by the caller with its shardings.

    metrics: loss, grad_norm (before clipping), learning_rate (of this step), finite (loss and grads).
    With `skip_nonfinite` a step whose loss or gradients are NaN/Inf leaves params and optimizer unchanged.
    """
    model = Llama(config, runtime)
    grad_fn = jax.value_and_grad(lambda params, tokens: mean_loss(model, params, tokens))

    def step(state: TrainState, tokens: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        params = state["params"]
        batch, width = tokens.shape
        micro = tokens.reshape(batch // micro_batches, micro_batches, width).swapaxes(0, 1)

        def accumulate(carry, micro_tokens):
            loss_sum, grad_sum = carry
            if batch_sharding is not None:
                micro_tokens = jax.lax.with_sharding_constraint(micro_tokens, batch_sharding)
            loss, grads = grad_fn(params, micro_tokens)
            grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
            return (loss_sum + loss, grad_sum), None

        if micro_batches == 1:  # no loop: XLA optimizes the step as a whole (a scan body is compiled apart)
            loss, grads = grad_fn(params, tokens)
        else:
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), micro)
            loss = loss_sum / micro_batches
            grads = jax.tree.map(lambda g, p: (g / micro_batches).astype(p.dtype), grad_sum, params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
        if skip_nonfinite:
            kept = {"params": params, "opt_state": state["opt_state"], "step": state["step"] + 1}
            new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
        metrics = {
            "loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state["step"]), "finite": finite,
        }
        return new_state, metrics

    return step


def make_eval_step(config: LlamaConfig, runtime: ModelRuntime):
    """`eval(params, tokens[B, seq+1], row_weight[B]) -> (summed token loss, token count)`; weight 0 = padding."""
    model = Llama(config, runtime)

    def evaluate(params: Any, tokens: jax.Array, row_weight: jax.Array) -> tuple[jax.Array, jax.Array]:
        losses = token_losses(model, params, tokens)
        weights = jnp.broadcast_to(row_weight[:, None], losses.shape).astype(jnp.float32)
        return (losses * weights).sum(), weights.sum()

    return evaluate
