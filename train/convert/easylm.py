"""EasyLM streaming checkpoints (the format OpenLLaMA's JAX weights were released in) into our checkpoints.

On disk: a flat sequence of msgpack records `(key, value)`, where key is the flattened path of one
tensor as a list of strings and value is that tensor serialized by `flax.serialization.to_bytes`.
A `params::FILE` holds keys `params/transformer/...`; a `trainstate::FILE` (or `trainstate_params::`)
holds the whole train state, with the weights under `params/params/transformer/...` beside optimizer
state, which is skipped. Tensors may be float32 or bfloat16; they keep their dtype.

EasyLM applies rotary embeddings to interleaved pairs (Meta's layout); we use HF's rotate-half layout,
so the output features of wq and wk are permuted per head on import.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
from flax.serialization import msgpack_restore
from tqdm import tqdm

from openllama import commands
from openllama.config import add_config_arguments, from_arguments
from openllama.train import checkpoint
from openllama.train.convert.tree import ConversionError, check_params, expected_shapes, set_path, unify_dtype
from openllama.train.model import PRESETS, LlamaConfig

LOAD_TYPES = {"params": 1, "trainstate_params": 2, "trainstate": 2}  # how many "params" levels lead
READ_SIZE = 64 * 1024 * 1024

LAYER_NAMES = {
    ("attention", "wq", "kernel"): ("self_attn", "q_proj", "kernel"),
    ("attention", "wk", "kernel"): ("self_attn", "k_proj", "kernel"),
    ("attention", "wv", "kernel"): ("self_attn", "v_proj", "kernel"),
    ("attention", "wo", "kernel"): ("self_attn", "o_proj", "kernel"),
    ("feed_forward", "w1", "kernel"): ("mlp", "gate_proj", "kernel"),
    ("feed_forward", "w2", "kernel"): ("mlp", "down_proj", "kernel"),
    ("feed_forward", "w3", "kernel"): ("mlp", "up_proj", "kernel"),
    ("attention_norm", "kernel"): ("input_layernorm", "weight"),
    ("ffn_norm", "kernel"): ("post_attention_layernorm", "weight"),
}
TOP_NAMES = {
    ("transformer", "wte", "embedding"): ("embed_tokens", "embedding"),
    ("transformer", "ln_f", "kernel"): ("norm", "weight"),
    ("lm_head", "kernel"): ("lm_head", "kernel"),
}


def our_path(easylm_key: tuple[str, ...]) -> tuple[str, ...] | None:
    """Our parameter path for an EasyLM LLaMA parameter key (without the leading "params"), else None."""
    if easylm_key in TOP_NAMES:
        return TOP_NAMES[easylm_key]
    if len(easylm_key) > 3 and easylm_key[:2] == ("transformer", "h") and easylm_key[2].isdigit():
        rest = LAYER_NAMES.get(easylm_key[3:])
        if rest is not None:
            return (f"layers_{int(easylm_key[2])}", *rest)
    return None


def interleaved_to_rotate_half(kernel: np.ndarray, heads: int) -> np.ndarray:
    """Reorder a (in, heads*head_dim) kernel's outputs from pairs (x0,y0,x1,y1..) to halves (x0,x1..,y0,y1..)."""
    fan_in, fan_out = kernel.shape
    head_dim = fan_out // heads
    return kernel.reshape(fan_in, heads, head_dim // 2, 2).transpose(0, 1, 3, 2).reshape(fan_in, fan_out)


def rotate_half_to_interleaved(kernel: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of `interleaved_to_rotate_half` (for writing EasyLM files)."""
    fan_in, fan_out = kernel.shape
    head_dim = fan_out // heads
    return kernel.reshape(fan_in, heads, 2, head_dim // 2).transpose(0, 1, 3, 2).reshape(fan_in, fan_out)


def split_load_spec(spec: str) -> tuple[int | None, Path]:
    """`params::path` style (as EasyLM's --load_checkpoint) into (leading "params" levels or None, path)."""
    match = re.fullmatch(r"(\w+)::(.+)", spec)
    if match is None:
        return None, Path(spec)
    kind, path = match.groups()
    if kind not in LOAD_TYPES:
        raise ConversionError(f"load type {kind!r} in {spec!r}; allowed: {sorted(LOAD_TYPES)}")
    return LOAD_TYPES[kind], Path(path)


def read_records(path: Path) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(key, array) records of a streaming checkpoint, one tensor in memory at a time."""
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, read_size=READ_SIZE, max_buffer_size=0)
        try:
            for record in unpacker:
                if not (isinstance(record, list | tuple) and len(record) == 2):
                    raise ConversionError(f"{path}: a record is not a (key, tensor) pair; not an EasyLM file")
                key, value = record
                yield tuple(str(k) for k in key), np.asarray(msgpack_restore(value))
        except (msgpack.UnpackException, ValueError) as error:
            if isinstance(error, ConversionError):
                raise
            raise ConversionError(f"{path}: not a readable EasyLM streaming checkpoint ({error})") from None


def read_easylm_params(spec: str, config: LlamaConfig) -> dict:
    """Our parameter tree from an EasyLM streaming checkpoint, checked against `config`."""
    depth, path = split_load_spec(spec)
    if not path.is_file():
        raise ConversionError(f"EasyLM checkpoint {path} does not exist")
    params: dict = {}
    seen_depths = set()
    shapes = expected_shapes(config)
    for key, array in tqdm(read_records(path), desc=f"reading {path.name}", unit=" tensors", file=sys.stderr):
        leading = next((i for i, k in enumerate(key) if k != "params"), len(key))
        if leading == 0 or (depth is not None and leading != depth):
            continue  # optimizer state, step counter
        target = our_path(key[leading:])
        if target is None:
            continue
        name = "/".join(key)
        if target not in shapes:
            raise ConversionError(f"{path}: tensor {name} does not belong to a {config.num_hidden_layers}-layer model; "
                                  "check --preset")
        if tuple(array.shape) != shapes[target]:
            raise ConversionError(f"{path}: tensor {name} has shape {tuple(array.shape)}, the preset needs "
                                  f"{shapes[target]}; check --preset")
        seen_depths.add(leading)
        if target[-2] == "q_proj":
            array = interleaved_to_rotate_half(array, config.num_attention_heads)
        elif target[-2] == "k_proj":
            array = interleaved_to_rotate_half(array, config.num_key_value_heads)
        set_path(params, target, array)
    if len(seen_depths) > 1:
        raise ConversionError(
            f"{path} holds weights at several depths; name the part to load, e.g. trainstate_params::{path}"
        )
    if not params:
        raise ConversionError(f"{path}: no EasyLM LLaMA weights (transformer/..., lm_head/...) found")
    check_params(params, config, str(path))
    return params


def import_easylm(spec: str, ckpt: str | Path, preset: str, tokenizer: str | Path | None = None) -> Path:
    """Convert an EasyLM streaming checkpoint (architecture from `preset`) into our checkpoint at `ckpt`."""
    if preset not in PRESETS:
        raise ConversionError(f"--preset {preset!r} does not exist; allowed: {sorted(PRESETS)}")
    config = LlamaConfig.preset(preset)
    params, dtype = unify_dtype(read_easylm_params(spec, config), spec)
    config = dataclasses.replace(config, param_dtype=dtype)
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise ConversionError(f"--tokenizer {tokenizer} does not exist")
    return checkpoint.save_model(ckpt, params, config, tokenizer)


@dataclass
class ImportEasylmConfig:
    """`openllama import-easylm`: an EasyLM checkpoint into one of ours."""

    file: str  # the checkpoint, optionally as LOAD_TYPE::FILE (params::, trainstate_params::, trainstate::)
    checkpoint: str  # new checkpoint directory
    preset: str  # the architecture, one of the model presets
    tokenizer: str | None = None  # tokenizer.model to keep with the weights


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="openllama import-easylm", description=__doc__.split("\n\n")[0],
                                     epilog=commands.EXIT_CODES)
    parser.add_argument("file", help="streaming checkpoint, optionally as params::FILE or trainstate_params::FILE")
    parser.add_argument("checkpoint", help="new checkpoint directory")
    parser.add_argument("--preset", help=f"architecture: one of {sorted(PRESETS)}")
    parser.add_argument("--tokenizer", help="tokenizer.model to keep with the weights")
    add_config_arguments(parser)
    args = parser.parse_args(argv)

    def work() -> int:
        config = from_arguments(ImportEasylmConfig, args)
        print(f"wrote {import_easylm(config.file, config.checkpoint, config.preset, config.tokenizer)}")
        return 0

    return commands.run("openllama import-easylm", work)
