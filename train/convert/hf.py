"""Hugging Face `LlamaForCausalLM` format: export our checkpoints, import any LLaMA-architecture one.

Our model already uses HF's rotate-half rotary layout, so conversion is renaming plus transposing the
matmul kernels (ours are (in, out), torch Linear weights are (out, in)). Files follow what
`LlamaForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` read: config.json,
generation_config.json, safetensors (sharded with an index past `max_shard_bytes`), tokenizer.model,
tokenizer.json and tokenizer_config.json.

The tokenizer.json is built here from the SentencePiece model rather than left to transformers'
conversion, which drops SentencePiece's dummy-prefix space when a text starts with a space
(" a" -> "▁a" instead of "▁▁a"); see docs/model.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from openllama.commands import BadInput
from openllama.data.tokenizer import load_for_model, write_tokenizer
from openllama.train import checkpoint
from openllama.train.model import DTYPES, LlamaConfig

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# HF files that hold no weights we need (rotary tables are recomputed from rope_theta)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file, field or tensor."""


def tensor_names(config: LlamaConfig) -> Iterator[tuple[tuple[str, ...], str, bool]]:
    """(our param path, HF tensor name, transposed?) for every tensor of `config`."""
    yield ("embed_tokens", "embedding"), "model.embed_tokens.weight", False
    for i in range(config.num_hidden_layers):
        ours, theirs = f"layers_{i}", f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield (ours, "self_attn", proj, "kernel"), f"{theirs}.self_attn.{proj}.weight", True
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield (ours, "mlp", proj, "kernel"), f"{theirs}.mlp.{proj}.weight", True
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield (ours, norm, "weight"), f"{theirs}.{norm}.weight", False
    yield ("norm", "weight"), "model.norm.weight", False
    if not config.tie_word_embeddings:
        yield ("lm_head", "kernel"), "lm_head.weight", True


def expected_shapes(config: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shape of every parameter in our layout, from the config alone."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    by_leaf = {
        "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h), "lm_head": (h, v),
    }
    shapes = {}
    for path, _, _ in tensor_names(config):
        if path[0] == "embed_tokens":
            shapes[path] = (v, h)
        elif path[-1] == "weight":
            shapes[path] = (h,)
        else:
            shapes[path] = by_leaf[path[-2]]
    return shapes


def get_path(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
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
            raise ConversionError(
                f"{source}: tensor {name} has shape {tuple(value.shape)}, the config needs {shape}"
            )


# --- config.json -------------------------------------------------------------------------------


def hf_config_dict(config: LlamaConfig, torch_dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }


def config_from_hf(hf: dict, source: str) -> LlamaConfig:
    """Our LlamaConfig for an HF config.json, refusing anything that is not plain LLaMA."""
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise ConversionError(
            f"{source}: model_type={model_type!r} is not a LLaMA architecture; only model_type 'llama' imports"
        )
    for field, plain in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(field, plain) != plain:
            raise ConversionError(f"{source}: {field}={hf[field]!r} is not supported (LLaMA uses {plain!r})")
    rope = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ConversionError(
            f"{source}: rope scaling {hf.get('rope_scaling') or rope} is not supported; only plain rotary imports"
        )
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise ConversionError(
            f"{source}: head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads="
            f"{hf['hidden_size'] // heads}; only the standard head size imports"
        )
    bos, eos = hf.get("bos_token_id"), hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos  # generation may list several; the first is the text's end
    try:
        return LlamaConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            initializer_range=hf.get("initializer_range", 0.02),
            bos_token_id=1 if bos is None else bos,
            eos_token_id=2 if eos is None else eos,
        )
    except KeyError as missing:
        raise ConversionError(f"{source}: required field {missing.args[0]} is missing") from None


# --- export ------------------------------------------------------------------------------------


def _write_safetensors(tensors: dict[str, np.ndarray], out_dir: Path, max_shard_bytes: int) -> None:
    """One model.safetensors, or shards plus model.safetensors.index.json when larger than the limit."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SINGLE_FILE), metadata=metadata)
        return
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        filename = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / filename), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, filename))
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _new_dir_atomically(out_dir: Path) -> Path:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output directory {out_dir} exists and is not empty; choose a new path")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _check_tokenizer_fits(tokenizer: str | Path, config: LlamaConfig) -> None:
    try:
        load_for_model(tokenizer, config.vocab_size, config.bos_token_id, config.eos_token_id)
    except BadInput as error:  # reported like every other refusal of a conversion
        raise ConversionError(str(error)) from None


def export_hf(
    ckpt: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: str | Path | None = None,
) -> Path:
    """Write checkpoint `ckpt` as a Hugging Face LLaMA directory at `out_dir` (atomically).

    `dtype` (float32/bfloat16/float16) defaults to the checkpoint's parameter dtype, so an imported
    model exports bit-exactly. `tokenizer` overrides the checkpoint's tokenizer.model.
    """
    config, params, ckpt_tokenizer = checkpoint.load_model(ckpt)
    tokenizer = tokenizer or ckpt_tokenizer
    check_params(params, config, str(ckpt))
    if tokenizer is not None:
        _check_tokenizer_fits(tokenizer, config)
    dtype = dtype or config.param_dtype
    if dtype not in DTYPES:
        raise ConversionError(f"dtype={dtype!r}; allowed: {sorted(DTYPES)}")
    tensors = {}
    for path, name, transposed in tensor_names(config):
        array = np.asarray(get_path(params, path)).astype(DTYPES[dtype])
        tensors[name] = np.ascontiguousarray(array.T if transposed else array)
    out_dir = Path(out_dir).absolute()
    tmp = _new_dir_atomically(out_dir)
    try:
        _write_safetensors(tensors, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(config, dtype), indent=2))
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if tokenizer is not None:
            write_tokenizer(tokenizer, tmp, config.max_position_embeddings)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --- import ------------------------------------------------------------------------------------


def read_safetensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of a single-file or sharded safetensors checkpoint, as numpy arrays."""
    index = hf_dir / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise ConversionError(f"{hf_dir}: holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    tensors: dict[str, np.ndarray] = {}
    for filename in files:
        path = hf_dir / filename
        if not path.is_file():
            raise ConversionError(f"{path}: listed in {INDEX_FILE} but missing")
        try:
            with safe_open(str(path), framework="numpy") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise ConversionError(f"{path}: not a readable safetensors file ({error}); re-download it") from None
    return tensors


def params_from_hf_tensors(tensors: dict[str, np.ndarray], config: LlamaConfig, source: str) -> dict:
    """Our parameter tree from HF tensors, with every name and shape checked."""
    params: dict = {}
    shapes = expected_shapes(config)
    wanted = {name: (path, transposed) for path, name, transposed in tensor_names(config)}
    for name, (path, transposed) in wanted.items():
        if name not in tensors:
            raise ConversionError(f"{source}: tensor {name} is missing")
        array, expected = tensors[name], shapes[path][::-1] if transposed else shapes[path]
        if tuple(array.shape) != expected:
            raise ConversionError(
                f"{source}: tensor {name} has shape {tuple(array.shape)}, the config needs {expected}"
            )
        set_path(params, path, np.ascontiguousarray(array.T if transposed else array))
    tolerated = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(
        n for n in tensors if n not in wanted and n not in tolerated and not n.endswith(IGNORED_SUFFIXES)
    )
    if unexpected:
        raise ConversionError(f"{source}: unexpected tensors {unexpected[:5]} for a LLaMA model")
    check_params(params, config, source)
    return params


def unify_dtype(params: dict, source: str) -> tuple[dict, str]:
    """Parameters in one dtype: theirs when they share one, else all upcast to float32 (lossless)."""
    import jax

    names = {np.dtype(a.dtype).name for a in jax.tree.leaves(params)}
    unsupported = sorted(names - set(DTYPES))
    if unsupported:
        raise ConversionError(f"{source}: tensors of dtype {unsupported}; supported: {sorted(DTYPES)}")
    if len(names) == 1:
        return params, names.pop()
    return jax.tree.map(lambda a: a.astype(np.float32), params), "float32"


def import_hf(hf_dir: str | Path, ckpt: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Read a Hugging Face LLaMA directory into one of our checkpoints at `ckpt`.

    Parameters keep the file's dtype (param_dtype in model.json), so export gives back the same bytes;
    a file mixing dtypes is upcast to float32.
    """
    import dataclasses

    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json; is this a Hugging Face model directory?")
    config = config_from_hf(json.loads(config_path.read_text()), str(config_path))
    params, dtype = unify_dtype(params_from_hf_tensors(read_safetensors(hf_dir), config, str(hf_dir)), str(hf_dir))
    config = dataclasses.replace(config, param_dtype=dtype)
    if tokenizer is None and (hf_dir / "tokenizer.model").is_file():
        tokenizer = hf_dir / "tokenizer.model"
    return checkpoint.save_model(ckpt, params, config, tokenizer)


# --- CLI ---------------------------------------------------------------------------------------


def _size(text: str) -> int:
    units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="openllama export-hf", description=export_hf.__doc__)
    parser.add_argument("ckpt", help="model checkpoint, or a training run directory (newest checkpoint)")
    parser.add_argument("out_dir", help="new directory for the Hugging Face files")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="tensor dtype (default: the checkpoint's)")
    parser.add_argument("--max-shard-size", default="5GB", type=_size, help="shard past this size (e.g. 2GB)")
    parser.add_argument("--tokenizer", help="tokenizer.model to ship (default: the checkpoint's)")
    args = parser.parse_args(argv)
    try:
        out = export_hf(args.ckpt, args.out_dir, args.dtype, args.max_shard_size, args.tokenizer)
    except (ConversionError, FileExistsError, FileNotFoundError) as error:
        print(f"openllama export-hf: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def import_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="openllama import-hf", description=import_hf.__doc__)
    parser.add_argument("hf_dir", help="Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("ckpt", help="new checkpoint directory")
    parser.add_argument("--tokenizer", help="tokenizer.model to keep (default: the directory's)")
    args = parser.parse_args(argv)
    try:
        out = import_hf(args.hf_dir, args.ckpt, args.tokenizer)
    except (ConversionError, FileExistsError) as error:
        print(f"openllama import-hf: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
