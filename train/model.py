"""LLaMA in Flax, read top to bottom: architecture and presets, how it runs, the blocks, the model, the KV cache.

Layout matches Hugging Face's `LlamaForCausalLM` so that conversion is only renaming and transposing:
rotary embeddings use the rotate-half layout (Meta/EasyLM interleave pairs instead; `convert/easylm.py`
permutes q/k), RMSNorm runs in float32, there are no biases. How the products and attention run on a
given backend is `kernels.py`'s business; nothing here knows about devices, meshes, Ray or files.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from openllama.train import kernels
from openllama.train.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# What the backward pass keeps from the forward; the rest it recomputes. The CPU kernels carry their own
# gradients, which hides their products from jax's checkpoint_dots, so products are saved by name. An offloaded
# name is copied to the host's memory in the forward pass and back in the backward: HBM it does not take, for
# host-link traffic instead of recompute (on CPU the host's memory is the device's own).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_only_these_names("projection", "query", "kv", "attention"),
    "dots_no_batch": jax.checkpoint_policies.save_only_these_names("projection", "query", "kv"),  # no per-head products
    "kv": jax.checkpoint_policies.save_only_these_names("kv"),  # keys and values; the rest is recomputed
    "q_saved_kv_offloaded": jax.checkpoint_policies.save_and_offload_only_these_names(  # q in HBM, k, v on the host
        names_which_can_be_saved=["query"], names_which_can_be_offloaded=["kv"],
        offload_src="device", offload_dst="pinned_host",
    ),
}
STACKED = "layers"  # the scanned blocks' parameters, one tree with a leading layer axis (`stack_layers`)


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture of one LLaMA model, all a checkpoint's model.json holds; field names follow Hugging Face's
    `LlamaConfig`. How a given run executes it is `ModelRuntime`'s."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A published size (or `tiny` for tests), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; allowed: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def num_params(self) -> int:
        """Parameter count, embeddings included."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * per_layer + h + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 per matmul weight plus causal attention.

        The input embedding is a lookup, not a matmul, so it is left out (as in PaLM's MFU).
        """
        matmul_params = self.num_params() - self.vocab_size * self.hidden_size * (not self.tie_word_embeddings)
        attention = 6 * self.num_hidden_layers * self.hidden_size * seq_len
        return 6 * matmul_params + attention


PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256,
    ),
    "1b": LlamaConfig(hidden_size=2048, intermediate_size=5504, num_hidden_layers=22, num_attention_heads=16),
    "3b": LlamaConfig(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32),
    "7b": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}


@dataclass(frozen=True)
class ModelRuntime:
    """How a model is run, apart from what it is: the same weights train, evaluate and export under different
    choices, so none of these is saved with them (a training run sets them as `model.*`)."""

    param_dtype: str = "float32"  # the dtype parameters are created in (a loaded tree keeps its own)
    dtype: str = "float32"  # the dtype products and activations are computed in
    remat_policy: str = "none"  # what the backward pass keeps from the forward (REMAT_POLICIES)
    kernels: str = "auto"  # how matmul and attention run (train/kernels.py)
    scan_layers: bool = False  # the blocks as one scanned body over stacked parameters (compile time flat in depth)

    def __post_init__(self) -> None:
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model.{name}={getattr(self, name)!r}; allowed: {sorted(DTYPES)}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"model.remat_policy={self.remat_policy!r}; allowed: {sorted(REMAT_POLICIES)}")
        if self.kernels not in kernels.KERNELS:
            raise ValueError(f"model.kernels={self.kernels!r}; allowed: {list(kernels.KERNELS)}")


DEFAULT_RUNTIME = ModelRuntime()  # float32 throughout, layer by layer, the backend's own kernels


class Dense(nn.Module):
    """A linear layer without bias over the last axis, kernel (in, out) like `nn.Dense`'s.

    The leading axes are flattened first so that the product and both of its gradients are plain 2-D
    products (on [batch, seq, hidden] XLA's CPU backend transposes the activation gradients).
    """

    features: int
    config: LlamaConfig
    runtime: ModelRuntime
    saved_as: str = "projection"  # the name remat policies know this product's output by

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        r = self.runtime
        kernel = self.param(
            "kernel", nn.initializers.normal(self.config.initializer_range), (x.shape[-1], self.features),
            DTYPES[r.param_dtype],
        )
        rows = x.reshape(-1, x.shape[-1]).astype(DTYPES[r.dtype])
        out = checkpoint_name(kernels.matmul(rows, kernel, r.kernels), self.saved_as)
        return out.reshape(*x.shape[:-1], self.features)


class RMSNorm(nn.Module):
    config: LlamaConfig
    runtime: ModelRuntime

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = DTYPES[self.runtime.dtype]
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), DTYPES[self.runtime.param_dtype])
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        return weight.astype(dtype) * x32.astype(dtype)


def rotary_tables(positions: jax.Array, dim: int, theta: float, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos and sin [batch, seq, 1, dim] of the rotary embedding at integer positions [batch, seq].

    Computed once per forward pass for all layers: inside each layer XLA fuses them into the rotation
    and recomputes them for every head of q and k.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half rotary embedding of x [batch, seq, heads, head_dim] with `rotary_tables`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    config: LlamaConfig
    runtime: ModelRuntime

    @nn.compact
    def __call__(
        self, x: jax.Array, rope: tuple[jax.Array, jax.Array], cache: dict | None, mask: jax.Array | None
    ) -> tuple[jax.Array, dict | None]:
        c, r = self.config, self.runtime
        batch, seq, _ = x.shape
        q = Dense(c.num_attention_heads * c.head_dim, c, r, "query", name="q_proj")(x)
        k = Dense(c.num_key_value_heads * c.head_dim, c, r, "kv", name="k_proj")(x)
        v = Dense(c.num_key_value_heads * c.head_dim, c, r, "kv", name="v_proj")(x)
        heads = ("batch", "seq", "heads", "head_dim")
        q = constrain(rotary(q.reshape(batch, seq, c.num_attention_heads, c.head_dim), *rope), *heads)
        k = constrain(rotary(k.reshape(batch, seq, c.num_key_value_heads, c.head_dim), *rope), *heads)
        v = constrain(v.reshape(batch, seq, c.num_key_value_heads, c.head_dim), *heads)
        if cache is None:
            out = kernels.attention(q, k, v, mask, r.kernels)  # mask None: causal
        else:
            index = cache["index"]
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, index, 0, 0))
            cache = {"k": k, "v": v, "index": index + seq}
            key_pos = jnp.arange(k.shape[1])
            query_pos = index + jnp.arange(seq)
            mask = (key_pos[None, :] <= query_pos[:, None])[None, None]
            out = kernels.attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, r.kernels)
        out = out.reshape(batch, seq, c.num_attention_heads * c.head_dim)
        return Dense(c.hidden_size, c, r, name="o_proj")(out), cache


class MLP(nn.Module):
    config: LlamaConfig
    runtime: ModelRuntime

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, r = self.config, self.runtime
        gate = Dense(c.intermediate_size, c, r, name="gate_proj")(x)
        up = Dense(c.intermediate_size, c, r, name="up_proj")(x)
        return Dense(c.hidden_size, c, r, name="down_proj")(constrain(nn.silu(gate) * up, "batch", "seq", "mlp"))


class Block(nn.Module):
    config: LlamaConfig
    runtime: ModelRuntime

    @nn.compact
    def __call__(
        self, x: jax.Array, rope: tuple[jax.Array, jax.Array], cache: dict | None, mask: jax.Array | None
    ) -> tuple[jax.Array, dict | None]:
        c, r = self.config, self.runtime
        attn_out, cache = Attention(c, r, name="self_attn")(RMSNorm(c, r, name="input_layernorm")(x), rope, cache, mask)
        x = x + attn_out
        x = x + MLP(c, r, name="mlp")(RMSNorm(c, r, name="post_attention_layernorm")(x))
        return constrain(x, "batch", "seq", "embed"), cache


class Llama(nn.Module):
    """Decoder-only LLaMA. Returns float32 logits and, when a cache is given, the updated cache.

    `hidden_states` and `logits` are the two halves of a call, for callers that need the output layer
    at a few positions only (eval scores continuations, not contexts). `mask` [batch, 1, seq, seq]
    replaces the causal mask, e.g. to pack several sequences into one row.

    With `runtime.scan_layers` the blocks are one `nn.scan` over parameters held stacked (`layers`, a
    leading layer axis: `stack_layers`), so XLA compiles and schedules one block body whatever the depth
    and no step stacks them; otherwise each block has its own tree (`layers_0`, `layers_1`, ...), the
    layout of every checkpoint and of the KV-cache decoder.
    """

    config: LlamaConfig
    runtime: ModelRuntime = DEFAULT_RUNTIME

    def setup(self) -> None:
        c, r = self.config, self.runtime
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=DTYPES[r.dtype],
            param_dtype=DTYPES[r.param_dtype],
            embedding_init=nn.initializers.normal(c.initializer_range),
        )
        policy = REMAT_POLICIES[r.remat_policy]
        # inside a scan each body is traced apart already, so remat needs no CSE barrier there
        block = Block if policy is None else nn.remat(Block, policy=policy, prevent_cse=not r.scan_layers)
        if r.scan_layers:
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_hidden_layers,
            )(c, r)
        else:
            self.layers = [block(c, r) for _ in range(c.num_hidden_layers)]  # named layers_0, layers_1, ...
        self.norm = RMSNorm(c, r)
        if not c.tie_word_embeddings:
            self.lm_head = Dense(c.vocab_size, c, r)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        cache: list[dict] | None = None,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, list[dict] | None]:
        x, cache = self.hidden_states(input_ids, positions, cache, mask)
        return self.logits(x), cache

    def hidden_states(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        cache: list[dict] | None = None,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, list[dict] | None]:
        """The final-normed hidden states [batch, seq, hidden] that `logits` turns into logits."""
        if positions is None:
            start = 0 if cache is None else cache[0]["index"]
            positions = start + jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        x = constrain(self.embed_tokens(input_ids), "batch", "seq", "embed")
        rope = rotary_tables(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        if self.runtime.scan_layers:
            if cache is not None:
                raise ValueError("a KV cache decodes layer by layer: run with scan_layers=False on the "
                                 "per-layer parameters (unstack_layers)")
            return self.norm(self.layers(x, rope, None, mask)[0]), None
        new_cache = [] if cache is not None else None
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, rope, None if cache is None else cache[i], mask)
            if new_cache is not None:
                new_cache.append(layer_cache)
        return self.norm(x), new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits over the vocabulary for hidden states of any leading shape."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)


def layer_name(index: int) -> str:
    """The key of block `index`'s own tree, as flax names the members of the `layers` list."""
    return f"{STACKED}_{index}"


def stack_layers(params: dict) -> dict:
    """Per-layer trees (`layers_0` ... `layers_{n-1}`) as one `layers` tree with a leading layer axis: the layout
    the scanned blocks hold their parameters in. Any tree keyed like the parameters (Adam's moments) stacks too."""
    count = sum(1 for key in params if key.startswith(f"{STACKED}_"))
    layers = [params[layer_name(i)] for i in range(count)]
    rest = {key: value for key, value in params.items() if not key.startswith(f"{STACKED}_")}
    return {**rest, STACKED: jax.tree.map(lambda *per_layer: jnp.stack(per_layer), *layers)}


def unstack_layers(params: dict, take: Callable[[Any, int], Any] = operator.getitem) -> dict:
    """The inverse of `stack_layers`: one tree per layer, as checkpoints and foreign formats hold them.
    `take(leaf, i)` is layer i of a stacked leaf (an abstract tree takes its shape and sharding instead)."""
    stacked = params[STACKED]
    count = jax.tree.leaves(stacked)[0].shape[0]
    rest = {key: value for key, value in params.items() if key != STACKED}
    return {**rest, **{layer_name(i): jax.tree.map(lambda leaf, i=i: take(leaf, i), stacked) for i in range(count)}}


def is_stacked(tree: Any) -> bool:
    """Whether `tree` is a parameter tree (or one keyed like it) whose blocks are stacked for the scan."""
    return isinstance(tree, dict) and STACKED in tree


def init_params(config: LlamaConfig, seed: int = 0, runtime: ModelRuntime = DEFAULT_RUNTIME) -> dict:
    """Fresh parameters, normal(std=initializer_range) as OpenLLaMA was initialized, in `runtime`'s layout.

    Always drawn layer by layer, then stacked for a scan: the same seed gives the same model either way.
    """
    dummy = jnp.zeros((1, 1), jnp.int32)
    per_layer = dataclasses.replace(runtime, scan_layers=False)
    params = Llama(config, per_layer).init(jax.random.PRNGKey(seed), dummy)["params"]
    return stack_layers(params) if runtime.scan_layers else params


def init_cache(config: LlamaConfig, runtime: ModelRuntime, batch: int, max_len: int) -> list[dict]:
    """An empty KV cache for `max_len` positions, one entry per layer, in the runtime's compute dtype."""
    shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
    dtype = DTYPES[runtime.dtype]
    return [
        {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.array(0, jnp.int32)}
        for _ in range(config.num_hidden_layers)
    ]


def config_to_dict(config: LlamaConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(values: dict) -> LlamaConfig:
    """Inverse of `config_to_dict`; unknown keys are an error that names them."""
    known = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown model config fields {unknown}; allowed: {sorted(known)}")
    return LlamaConfig(**values)
