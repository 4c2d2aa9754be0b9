"""Our parameter tree as every conversion sees it: each tensor's path and shape, checked before anything is written.

A foreign format maps its names onto these paths (one table per format, in `hf.py` and `easylm.py`);
what it brings is checked here, so an error always names the tensor that is missing or of the wrong shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from openllama.commands import BadInput
from openllama.train.model import DTYPES, LlamaConfig

Path = tuple[str, ...]


class ConversionError(BadInput):
    """A checkpoint that cannot be converted; the message names the file, field or tensor."""


def param_paths(config: LlamaConfig) -> Iterator[Path]:
    """The path of every parameter of `config`, in the model's order."""
    yield ("embed_tokens", "embedding")
    for i in range(config.num_hidden_layers):
        layer = f"layers_{i}"
        yield (layer, "input_layernorm", "weight")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield (layer, "self_attn", proj, "kernel")
        yield (layer, "post_attention_layernorm", "weight")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield (layer, "mlp", proj, "kernel")
    yield ("norm", "weight")
    if not config.tie_word_embeddings:
        yield ("lm_head", "kernel")


def expected_shapes(config: LlamaConfig) -> dict[Path, tuple[int, ...]]:
    """Shape of every parameter in our layout (kernels are (in, out)), from the config alone."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    kernels = {
        "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h), "lm_head": (h, v),
    }
    shapes = {}
    for path in param_paths(config):
        if path[0] == "embed_tokens":
            shapes[path] = (v, h)
        elif path[-1] == "weight":
            shapes[path] = (h,)
        else:
            shapes[path] = kernels[path[-2]]
    return shapes


def get_path(tree: dict, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: Path, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def check_params(params: dict, config: LlamaConfig, source: str) -> None:
    """Every tensor the config needs is there with the right shape, or an error naming it."""
    for path, shape in expected_shapes(config).items():
        name = "/".join(path)
        try:
            value = get_path(params, path)
        except KeyError:
            raise ConversionError(f"{source}: tensor {name} is missing") from None
        if tuple(value.shape) != shape:
            raise ConversionError(f"{source}: tensor {name} has shape {tuple(value.shape)}, the config needs {shape}")


def stored_dtype(params: dict, source: str) -> str:
    """The dtype parameters share (float32, lossless, when they mix): what an export writes unless told."""
    names = {np.dtype(a.dtype).name for a in jax.tree.leaves(params)}
    unsupported = sorted(names - set(DTYPES))
    if unsupported:
        raise ConversionError(f"{source}: tensors of dtype {unsupported}; supported: {sorted(DTYPES)}")
    return names.pop() if len(names) == 1 else "float32"


def unify_dtype(params: dict, source: str) -> dict:
    """Parameters in one dtype: theirs when they share one, else all upcast to float32 (lossless)."""
    dtype = stored_dtype(params, source)
    return jax.tree.map(lambda a: a if np.dtype(a.dtype).name == dtype else a.astype(np.float32), params)
