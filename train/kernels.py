"""What makes LLaMA's two hot operations fast on one backend, chosen by `ModelRuntime.kernels`.

`model.py` calls `matmul` (every projection) and `attention` (softmax attention with GQA) from here.

- `reference`: the plain math differentiated by JAX, the definition every other kernel is tested
  against in values and gradients. It materializes the [batch, heads, seq, seq] scores.
- `xla_cpu`: for XLA's CPU backend, whose fast bfloat16 kernels need row-major operands and whose
  autodiff of a float32-accumulating bfloat16 product runs float32 gradient products (docs/model.md).
- `splash`: TPU splash attention (Pallas), blockwise with a causal block mask, so no score matrix is
  ever whole; under a mesh it runs per shard (`shard_map` over the batch and head axes). Off TPU it runs
  in Pallas's interpreter, which is how the tests check it.
- `cudnn`: GPU flash attention through `jax.nn.dot_product_attention` (XLA's own elsewhere).

`auto` takes the kernel of the backend it runs on (`for_platform` picks for another, e.g. when
compiling for a TPU slice from a CPU machine), so a compile never inherits another backend's layout.
Splash and cuDNN serve causal attention (splash over lengths that are multiples of 128); a custom mask
(packed eval rows, the KV cache) or another length takes the reference path on TPU and GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.layout import Layout, with_layout_constraint
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from openllama.train import sharding

KERNELS = ("auto", "reference", "xla_cpu", "splash", "cudnn")
BY_PLATFORM = {"cpu": "xla_cpu", "tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "reference"}
SPLASH_BLOCK = 512  # query/key block of the splash kernels (smaller for shorter sequences)


def for_platform(kernels: str, platform: str) -> str:
    """The kernel set `kernels` means on `platform` (cpu, tpu, gpu)."""
    if kernels not in KERNELS:
        raise ValueError(f"model.kernels={kernels!r}; allowed: {list(KERNELS)}")
    return BY_PLATFORM.get(platform, "reference") if kernels == "auto" else kernels


def resolve(kernels: str) -> str:
    """The kernel set `kernels` means on the backend JAX runs on now."""
    return for_platform(kernels, jax.default_backend())


def matmul(rows: jax.Array, kernel: jax.Array, kernels: str = "auto") -> jax.Array:
    """rows [n, in] @ kernel [in, out] in the rows' dtype, accumulated in float32 (what TPUs and GPUs do)."""
    if resolve(kernels) == "xla_cpu":
        return cpu_matmul(rows, kernel)
    return jnp.matmul(rows, kernel.astype(rows.dtype), preferred_element_type=jnp.float32).astype(rows.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, kernels: str = "auto") -> jax.Array:
    """Softmax attention of q [batch, seq, heads, head_dim] over k, v [batch, keys, kv_heads, head_dim]
    where mask [batch or 1, 1, seq, keys] is True (None: causal), scores and softmax in float32. Named
    `attention` for the remat policies."""
    kind = resolve(kernels)
    if mask is None and kind == "splash" and splash_fits(q.shape[1]):
        return checkpoint_name(splash_attention(q, k, v), "attention")
    if mask is None and kind == "cudnn":
        return checkpoint_name(cudnn_attention(q, k, v), "attention")
    if mask is None:
        mask = causal_mask(q.shape[1], k.shape[1])
    if kind == "xla_cpu":
        return checkpoint_name(cpu_attention(q, k, v, mask), "attention")
    return checkpoint_name(reference_attention(q, k, v, mask), "attention")


def splash_fits(seq: int) -> bool:
    """Whether the splash kernels' blocks tile `seq` positions (a multiple of 128); shorter or ragged
    lengths (initialization's one token, a generation prompt) take the reference path."""
    return seq % 128 == 0 and seq % min(SPLASH_BLOCK, seq) == 0


def causal_mask(queries: int, keys: int) -> jax.Array:
    """[1, 1, queries, keys]: query i sees keys 0..i (queries are the last `queries` positions)."""
    return (jnp.arange(keys)[None, :] <= jnp.arange(queries)[:, None] + keys - queries)[None, None]


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d) where mask) v, each group of query heads sharing one key/value head (GQA)."""
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    grouped = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bskgd,btkd->bkgst", grouped, k, preferred_element_type=jnp.float32) * head_dim**-0.5
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgst,btkd->bskgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(batch, seq, heads, head_dim)


# ------------------------------------------------------------------------------------ TPU and GPU


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal attention by TPU splash kernels, per shard of the mesh in context (batch and heads sharded)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _splash_local(q, k, v)
    batch = tuple(axis for axis in sharding.BATCH_AXES if axis in mesh.axis_names)
    heads = sharding.HEADS_AXIS if sharding.HEADS_AXIS in mesh.axis_names else None
    spec = P(batch, None, heads, None)
    return jax.shard_map(_splash_local, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Splash on this device's rows and heads; q [b, s, h, d], k/v [b, s, kv, d] (heads grouped, GQA)."""
    batch, seq, heads, head_dim = q.shape
    block = min(SPLASH_BLOCK, seq)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((seq, seq)) for _ in range(heads)])
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=jax.default_backend() != "tpu")
    heads_first = (0, 2, 1, 3)
    out = jax.vmap(kernel)((q * head_dim**-0.5).transpose(heads_first), k.transpose(heads_first),
                           v.transpose(heads_first))
    return out.transpose(heads_first).astype(q.dtype)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal flash attention by cuDNN on GPU (bfloat16/float16), XLA's implementation elsewhere."""
    fused = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn" if fused else None)


# ------------------------------------------------------------------------------------------- XLA on CPU


def row_major(x: jax.Array) -> jax.Array:
    """A bfloat16 x laid out row-major in memory on CPU, where XLA would otherwise keep a transpose as a view.

    XLA's CPU backend runs a bfloat16 product on its fast kernels only when both operands are row-major
    with the contraction on the left operand's last axis; a transposed view makes it fall back to a
    much slower float32 product. Float32 products read transposed views as they are, and other
    backends keep choosing their own layouts.
    """
    if jax.default_backend() != "cpu" or x.dtype == jnp.float32:
        return x
    return with_layout_constraint(x, Layout(tuple(range(x.ndim))))


@jax.custom_vjp
def cpu_matmul(rows: jax.Array, kernel: jax.Array) -> jax.Array:
    """`matmul` with its gradients written out for XLA's CPU backend.

    Differentiated the ordinary way, a float32-accumulating bfloat16 product gets float32 x float32
    gradient products (the incoming gradient is float32), much slower there than the bfloat16 kernels,
    and the kernel's gradient reads the rows through a transposed view (see `row_major`).
    """
    return jnp.matmul(rows, kernel.astype(rows.dtype), preferred_element_type=jnp.float32).astype(rows.dtype)


def _matmul_forward(rows: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return cpu_matmul(rows, kernel), (rows, kernel)


def _matmul_backward(saved: tuple[jax.Array, jax.Array], grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    rows, kernel = saved
    contract_last = (((1,), (1,)), ((), ()))
    grad_rows = jax.lax.dot_general(grad, kernel.astype(rows.dtype), contract_last, preferred_element_type=jnp.float32)
    grad_kernel = jnp.matmul(row_major(rows.T), grad, preferred_element_type=jnp.float32)
    return grad_rows.astype(rows.dtype), grad_kernel.astype(kernel.dtype)


cpu_matmul.defvjp(_matmul_forward, _matmul_backward)


def cpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """`reference_attention` laid out for XLA's CPU backend, with its backward pass written out (`attend`).

    Heads go before positions, and the grouped query heads (GQA) of one kv head become more rows of one
    product over its keys, so they share them without copies.
    """
    batch, seq, heads, head_dim = q.shape
    kv_heads, keys = k.shape[2], k.shape[1]
    group = heads // kv_heads
    q = q.reshape(batch, seq, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch, kv_heads, group * seq, head_dim) * head_dim**-0.5
    mask = jnp.broadcast_to(mask[:, :, None], (mask.shape[0], 1, group, seq, keys)).reshape(-1, 1, group * seq, keys)
    q, k, v = row_major(q), row_major(k.transpose(0, 2, 1, 3)), row_major(v.transpose(0, 2, 1, 3))
    out = attend(q, k, v, mask)
    out = out.reshape(batch, kv_heads, group, seq, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, seq, heads, head_dim)


_HEADS = ((0, 1), (0, 1))  # dot_general batch dims of [batch, heads, rows, columns] operands


def _scores(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    scores = jax.lax.dot_general(q, k, (((3,), (3,)), _HEADS), preferred_element_type=jnp.float32)
    return jnp.where(mask, scores, jnp.finfo(jnp.float32).min)


@jax.custom_vjp
def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T where mask) v for q [b, h, rows, d], k and v [b, h, keys, d]: the math of
    FlashAttention without its tiling. The output is normalized after the product with v (rows x d, not
    rows x keys), and the backward pass recomputes the probabilities from the saved log-sum-exp, with
    every product in a form XLA's fast CPU kernels take (docs/model.md: what it gains per precision)."""
    return _attend_forward(q, k, v, mask)[0]


def _attend_forward(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> tuple[jax.Array, tuple]:
    scores = _scores(q, k, mask)
    top = scores.max(axis=-1, keepdims=True)
    weights = jnp.exp(scores - top)
    total = weights.sum(axis=-1, keepdims=True)
    out = jax.lax.dot_general(weights.astype(v.dtype), v, (((3,), (2,)), _HEADS), preferred_element_type=jnp.float32)
    out = (out / total).astype(q.dtype)
    return out, (q, k, v, mask, out, top + jnp.log(total))


def _attend_backward(saved: tuple, grad_out: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, None]:
    q, k, v, mask, out, log_total = saved
    dtype = q.dtype
    probs = jnp.exp(_scores(q, k, mask) - log_total)
    grad_v = jax.lax.dot_general(
        row_major(probs.astype(dtype).swapaxes(2, 3)), grad_out, (((3,), (2,)), _HEADS),
        preferred_element_type=jnp.float32,
    )
    grad_probs = jax.lax.dot_general(grad_out, v, (((3,), (3,)), _HEADS), preferred_element_type=jnp.float32)
    row_dot = jnp.sum(grad_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    grad_scores = (probs * (grad_probs - row_dot)).astype(dtype)
    grad_q = jax.lax.dot_general(grad_scores, k, (((3,), (2,)), _HEADS), preferred_element_type=jnp.float32)
    grad_k = jax.lax.dot_general(
        row_major(grad_scores.swapaxes(2, 3)), q, (((3,), (2,)), _HEADS), preferred_element_type=jnp.float32
    )
    return grad_q.astype(dtype), grad_k.astype(dtype), grad_v.astype(dtype), None


attend.defvjp(_attend_forward, _attend_backward)
