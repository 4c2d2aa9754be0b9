"""Hugging Face `LlamaForCausalLM` format: export our checkpoints, import any LLaMA-architecture one.

Our model already uses HF's rotate-half rotary layout, so conversion is renaming plus transposing the
matmul kernels (ours are (in, out), torch Linear weights are (out, in)). Files follow what
`LlamaForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` read: config.json,
generation_config.json, safetensors (sharded with an index past `max_shard_bytes`), tokenizer.model,
tokenizer.json and tokenizer_config.json.

The tokenizer.json is built from the SentencePiece model (`data/tokenizer.py`) rather than left to
transformers' conversion, which drops SentencePiece's dummy-prefix space when a text starts with a space
(" a" -> "▁a" instead of "▁▁a"); see docs/model.md.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from openllama import files
from openllama.commands import BadInput
from openllama.config import BARE, METAVAR, POSITIONAL, ConfigError
from openllama.data.tokenizer import load_for_model, write_tokenizer
from openllama.train import checkpoint, registry
from openllama.train.convert.tree import (
    ConversionError,
    check_params,
    expected_shapes,
    get_path,
    param_paths,
    set_path,
    stored_dtype,
    unify_dtype,
)
from openllama.train.model import DTYPES, LlamaConfig

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# HF files that hold no weights we need (rotary tables are recomputed from rope_theta)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def tensor_names(config: LlamaConfig) -> Iterator[tuple[tuple[str, ...], str, bool]]:
    """The mapping table: (our param path, HF tensor name, transposed?) for every tensor of `config`."""
    for path in param_paths(config):
        if path[0] == "embed_tokens":
            yield path, "model.embed_tokens.weight", False
        elif path[0] == "norm":
            yield path, "model.norm.weight", False
        elif path[0] == "lm_head":
            yield path, "lm_head.weight", True
        else:
            layer, *rest = path
            theirs = f"model.layers.{layer.removeprefix('layers_')}.{'.'.join(rest[:-1])}.weight"
            yield path, theirs, rest[-1] == "kernel"


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


def write_safetensors(tensors: dict[str, np.ndarray], out_dir: Path, max_shard_bytes: int) -> None:
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


def check_tokenizer_fits(tokenizer: str | Path, config: LlamaConfig) -> None:
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
    out_dir = Path(out_dir).absolute()
    with files.new_directory(out_dir) as tmp:
        write_hf(ckpt, tmp, dtype, max_shard_bytes, tokenizer)
    return out_dir


def write_hf(
    ckpt: str | Path,
    folder: Path,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: str | Path | None = None,
) -> None:
    """`export_hf`'s files, written into the existing empty `folder`: for a caller that does more with the
    folder (registers it) before publishing it, or throws it away after."""
    config, params, ckpt_tokenizer = checkpoint.load_model(ckpt)
    tokenizer = tokenizer or ckpt_tokenizer
    check_params(params, config, str(ckpt))
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, config)
    dtype = dtype or stored_dtype(params, str(ckpt))
    if dtype not in DTYPES:
        raise ConversionError(f"dtype={dtype!r}; allowed: {sorted(DTYPES)}")
    tensors = {}
    for path, name, transposed in tensor_names(config):
        array = np.asarray(get_path(params, path)).astype(DTYPES[dtype])
        tensors[name] = np.ascontiguousarray(array.T if transposed else array)
    write_safetensors(tensors, folder, max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(hf_config_dict(config, dtype), indent=2))
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer is not None:
        write_tokenizer(tokenizer, folder, config.max_position_embeddings)


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


def import_hf(hf_dir: str | Path, ckpt: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Read a Hugging Face LLaMA directory into one of our checkpoints at `ckpt`.

    Parameters keep the file's dtype (the export's default), so export gives back the same bytes; a file
    mixing dtypes is upcast to float32.
    """
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json; is this a Hugging Face model directory?")
    config = config_from_hf(json.loads(config_path.read_text()), str(config_path))
    params = unify_dtype(params_from_hf_tensors(read_safetensors(hf_dir), config, str(hf_dir)), str(hf_dir))
    if tokenizer is None and (hf_dir / "tokenizer.model").is_file():
        tokenizer = hf_dir / "tokenizer.model"
    return checkpoint.save_model(ckpt, params, config, tokenizer)


# --- CLI ---------------------------------------------------------------------------------------


@dataclass
class ExportHfConfig:
    """`openllama export-hf`: one of our checkpoints as a Hugging Face model directory."""

    # a model checkpoint, or a training run directory (its newest checkpoint)
    checkpoint: str = dataclasses.field(metadata={POSITIONAL: True})
    out_dir: str = dataclasses.field(metadata={POSITIONAL: True})  # new directory for the Hugging Face files
    dtype: str | None = None  # tensor dtype, one of float32/bfloat16/float16 (None: the checkpoint's)
    max_shard_size: str = "5GB"  # safetensors files past this size are sharded (e.g. 2GB, 500MiB)
    tokenizer: str | None = None  # tokenizer.model to ship (None: the checkpoint's)
    # also register the export in MLflow's model registry as the next version of this name, linked to the
    # training run ("": the run's name, also what the flag alone means; None: do not register); needs
    # MLFLOW_TRACKING_URI. Put the flag after OUT_DIR
    register: str | None = dataclasses.field(default=None, metadata={BARE: "", METAVAR: "NAME"})

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}; allowed: {sorted(DTYPES)}")
        size_in_bytes(self.max_shard_size)


@dataclass
class ImportHfConfig:
    """`openllama import-hf`: any LLaMA-architecture Hugging Face directory into one of our checkpoints."""

    # a Hugging Face model directory: config.json + safetensors
    hf_dir: str = dataclasses.field(metadata={POSITIONAL: True})
    checkpoint: str = dataclasses.field(metadata={POSITIONAL: True})  # new checkpoint directory
    tokenizer: str | None = None  # tokenizer.model to keep (None: the directory's)


def size_in_bytes(text: str) -> int:
    """`5GB`, `500MiB`, `1000` as bytes."""
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3}
    unit = next((u for u in units if text.upper().endswith(u)), None)
    number, factor = (text[: -len(unit)], units[unit]) if unit else (text, 1)
    try:
        return int(float(number) * factor)
    except ValueError:
        raise ConfigError(f"max_shard_size={text!r} is not a size like 5GB, 500MiB or 1000000") from None


def export_command(config: ExportHfConfig) -> None:
    """Write one of our checkpoints (or a training run's newest) as a Hugging Face LlamaForCausalLM directory,
    and with --register also as the next version of a model in MLflow's registry, linked to its training run."""
    shard_bytes = size_in_bytes(config.max_shard_size)
    if config.register is None:
        print(f"wrote {export_hf(config.checkpoint, config.out_dir, config.dtype, shard_bytes, config.tokenizer)}")
        return
    ckpt, run, run_id = registry.training_run(config.checkpoint)  # before any work: URI, run, server
    out = Path(config.out_dir).absolute()
    with files.new_directory(out) as tmp:  # registered before it is published: a failure leaves no OUT_DIR
        write_hf(ckpt, tmp, config.dtype, shard_bytes, config.tokenizer)
        version = registry.register_export(tmp, config.register or run.path.name, run_id, ckpt)
    print(f"wrote {out}")
    from openllama import tracking  # MLflow, already loaded by the registration: only the link is new here

    link = tracking.model_link(version.name, version.version)
    print(f"registered {version.uri} (MLflow run {run_id}); load it with "
          f"mlflow.transformers.load_model({version.uri!r})" + (f"; {link}" if link else ""))


def import_command(config: ImportHfConfig) -> None:
    """Read any LLaMA-architecture Hugging Face directory (config.json + safetensors) into one of our
    checkpoints, refusing anything that is not plain LLaMA."""
    print(f"wrote {import_hf(config.hf_dir, config.checkpoint, config.tokenizer)}")
