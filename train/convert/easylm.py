"""EasyLM checkpoints (the format OpenLLaMA's JAX weights were released in): read into ours, and written back.

EasyLM (young-geng/EasyLM, `EasyLM/checkpoint.py`) names what it loads as `LOAD_TYPE::FILE`:

- `params::` a streaming file of the parameter tree: msgpack records `(key, flax.serialization.to_bytes(tensor))`
  one after another, `key` the tensor's path from the top of the tree (`transformer/h/0/attention/wq/kernel`,
  `lm_head/kernel`). Its training writes these as `streaming_params`, `convert_hf_to_easylm.py --streaming` too.
- `trainstate_params::` a streaming file of a whole train state (`streaming_train_state`), the parameters
  under `params/params/`, beside the step and the optimizer state.
- `trainstate::` the same file. EasyLM would restore its optimizer state and step as well; a run here starts
  its own, so both read only the parameters and skip the rest without reading it.
- `flax_params::` one flax msgpack of the parameter tree (`flax.serialization.msgpack_serialize`), not streamed:
  it is read whole, as EasyLM reads it.

A FILE given without a load type is recognized from its first byte (a record or a map) and its keys.

Streamed files are read in two passes: the first reads only each record's header (name, shape, dtype; the
data is skipped) so the architecture is known and checked before any tensor is read, the second reads each
tensor once, from the file straight into its own array. The memory needed is the output plus about one
tensor, whatever the file's size. For the same reason the writer puts the msgpack headers together itself
and writes each tensor's bytes as they are, byte for byte what EasyLM's `StreamingCheckpointer` writes.

The architecture comes from the tensors: vocabulary and hidden size from the embedding, layers from
`transformer/h/N`, intermediate size from `w1`, key/value width from `wk`, a tied head from a missing
`lm_head`. The head count is in no tensor: it is `--num-heads`, else `--preset`'s, else that of the preset
whose hidden, intermediate and key/value sizes are the file's. rope_theta, rms_norm_eps and the context
length are in no tensor either: the preset's, else LLaMA's (OpenLLaMA's) defaults, unless given.

EasyLM rotates interleaved pairs (Meta's layout); we use HF's rotate-half layout, so the output features
of wq and wk are permuted per head on the way in, and back on the way out.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgpack
import numpy as np
from flax import serialization, traverse_util
from tqdm import tqdm

from openllama import commands, files
from openllama.config import POSITIONAL, ConfigError
from openllama.train import checkpoint
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
from openllama.train.model import DTYPES, PRESETS, LlamaConfig

log = logging.getLogger(__name__)

Key = tuple[str, ...]

# Where the parameter tree starts in each of EasyLM's load types (`load_trainstate_checkpoint`).
PARAMS_PREFIX: dict[str, Key] = {
    "params": (),
    "trainstate_params": ("params", "params"),
    "trainstate": ("params", "params"),
    "flax_params": (),
}
STREAMED = ("params", "trainstate_params", "trainstate")
# LlamaConfig fields that no tensor shows; the rest of the architecture is read from the shapes.
UNSEEN_FIELDS = ("rope_theta", "rms_norm_eps", "max_position_embeddings")

# --- the mapping table: EasyLM's LLaMA names (EasyLM/models/llama/llama_model.py) and ours ---------------

BLOCK_NAMES: dict[Key, Key] = {  # inside EasyLM's transformer/h/N and our layers_N
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
TOP_NAMES: dict[Key, Key] = {
    ("transformer", "wte", "embedding"): ("embed_tokens", "embedding"),
    ("transformer", "ln_f", "kernel"): ("norm", "weight"),
    ("lm_head", "kernel"): ("lm_head", "kernel"),
}
EMBEDDING, LM_HEAD = ("transformer", "wte", "embedding"), ("lm_head", "kernel")
OURS_TO_EASYLM_BLOCK = {ours: theirs for theirs, ours in BLOCK_NAMES.items()}
OURS_TO_EASYLM_TOP = {ours: theirs for theirs, ours in TOP_NAMES.items()}


def our_path(easylm_key: Key) -> Key | None:
    """Our parameter path for an EasyLM LLaMA parameter key (from the top of its parameter tree), else None."""
    if easylm_key in TOP_NAMES:
        return TOP_NAMES[easylm_key]
    if len(easylm_key) > 3 and easylm_key[:2] == ("transformer", "h") and easylm_key[2].isdigit():
        rest = BLOCK_NAMES.get(easylm_key[3:])
        if rest is not None:
            return (f"layers_{int(easylm_key[2])}", *rest)
    return None


def easylm_key(path: Key) -> Key:
    """EasyLM's key for one of our parameter paths."""
    if path in OURS_TO_EASYLM_TOP:
        return OURS_TO_EASYLM_TOP[path]
    layer, *rest = path
    return ("transformer", "h", layer.removeprefix("layers_"), *OURS_TO_EASYLM_BLOCK[tuple(rest)])


def layer_key(layer: int, block_name: Key) -> Key:
    return ("transformer", "h", str(layer), *block_name)


def interleaved_to_rotate_half(kernel: np.ndarray, heads: int, inverse: bool = False) -> np.ndarray:
    """Reorder a (in, heads*head_dim) kernel's outputs from pairs (x0,y0,x1,y1..) to halves (x0,x1..,y0,y1..);
    `inverse` goes back, for writing EasyLM files. Either way a swap of the head's two inner axes."""
    fan_in, fan_out = kernel.shape
    inner = (fan_out // heads // 2, 2)
    shape = (fan_in, heads, *(inner[::-1] if inverse else inner))
    return kernel.reshape(shape).transpose(0, 1, 3, 2).reshape(fan_in, fan_out)


# --- msgpack headers, read and written here so that no tensor is copied on its way -----------------------
# A streaming record is [key: array of str, value: bin]; the value is flax's encoding of one array:
# ext 1 holding [shape: array of int, dtype name: str, data: bin]. Only headers are parsed here; a value in
# any other form (flax splits arrays past 1 GiB into chunks) goes to flax's own reader.


class FormatError(ValueError):
    """Bytes that are not what an EasyLM file holds at that place."""


SIZED_HEADERS = {
    0xC4: ("bin", 1), 0xC5: ("bin", 2), 0xC6: ("bin", 4),
    0xC7: ("ext", 1), 0xC8: ("ext", 2), 0xC9: ("ext", 4),
    0xCC: ("int", 1), 0xCD: ("int", 2), 0xCE: ("int", 4), 0xCF: ("int", 8),
    0xD9: ("str", 1), 0xDA: ("str", 2), 0xDB: ("str", 4),
    0xDC: ("array", 2), 0xDD: ("array", 4), 0xDE: ("map", 2), 0xDF: ("map", 4),
}
FIXEXT_LENGTHS = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
NDARRAY_EXT = 1  # flax's ext type code for an ndarray


def read_exact(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise FormatError("the file ends in the middle of a record (truncated?)")
    return data


def read_header(stream: BinaryIO) -> tuple[str, int]:
    """(kind, length) of the next msgpack item, or ("int", value) for an unsigned integer."""
    first = read_exact(stream, 1)[0]
    if first <= 0x7F:
        return "int", first
    if first <= 0x8F:
        return "map", first & 0x0F
    if first <= 0x9F:
        return "array", first & 0x0F
    if first <= 0xBF:
        return "str", first & 0x1F
    if first in SIZED_HEADERS:
        kind, size = SIZED_HEADERS[first]
        return kind, int.from_bytes(read_exact(stream, size), "big")
    if first in FIXEXT_LENGTHS:
        return "ext", FIXEXT_LENGTHS[first]
    return f"msgpack type 0x{first:02x}", 0


def expect(stream: BinaryIO, kind: str) -> int:
    found, length = read_header(stream)
    if found != kind:
        raise FormatError(f"expected a msgpack {kind}, found a {found}")
    return length


def read_key(stream: BinaryIO) -> Key:
    parts = []
    for _ in range(expect(stream, "array")):
        kind, length = read_header(stream)
        if kind == "str":
            parts.append(read_exact(stream, length).decode("utf-8"))
        elif kind == "int":
            parts.append(str(length))
        else:
            raise FormatError(f"a key holds a {kind}; keys are lists of names")
    return tuple(parts)


def dtype_named(name: str) -> np.dtype:
    return np.dtype(DTYPES[name]) if name in DTYPES else np.dtype(name)


def read_array_header(stream: BinaryIO) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """(shape, dtype, offset of the data) of flax's encoding of one array at the stream's position, or None
    for a value flax encoded otherwise."""
    start = stream.tell()
    try:
        if expect(stream, "ext") < 1 or read_exact(stream, 1)[0] != NDARRAY_EXT or expect(stream, "array") != 3:
            return None
        shape = tuple(expect(stream, "int") for _ in range(expect(stream, "array")))
        dtype = dtype_named(read_exact(stream, expect(stream, "str")).decode("utf-8"))
        size = expect(stream, "bin")
    except (FormatError, TypeError, UnicodeDecodeError):
        return None
    if size != math.prod(shape) * dtype.itemsize:
        return None
    return shape, dtype, stream.tell() - start


def bin_header(size: int, kind: str = "bin") -> bytes:
    """msgpack's header of a bin (or ext) of `size` bytes in the smallest form, as msgpack's packer writes it:
    `read_header`'s table read backwards."""
    width = 1 if size < 1 << 8 else 2 if size < 1 << 16 else 4
    first = next(code for code, form in SIZED_HEADERS.items() if form == (kind, width))
    return bytes([first]) + size.to_bytes(width, "big")


def ext_header(size: int, code: int) -> bytes:
    fixed = {length: first for first, length in FIXEXT_LENGTHS.items()}
    return (bytes([fixed[size]]) if size in fixed else bin_header(size, "ext")) + bytes([code])


def raw_bytes(array: np.ndarray) -> np.ndarray:
    """The array's bytes in C order as a uint8 view (bfloat16 has no buffer-protocol format of its own)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def encode_record_headers(key: Key, array: np.ndarray) -> bytes:
    """Everything of a streaming record before the tensor's data: EasyLM's `(key, to_bytes(tensor))`, packed."""
    payload = b"\x93" + msgpack.packb(list(array.shape)) + msgpack.packb(array.dtype.name) + bin_header(array.nbytes)
    value_head = ext_header(len(payload) + array.nbytes, NDARRAY_EXT) + payload
    return b"\x92" + msgpack.packb(list(key)) + bin_header(len(value_head) + array.nbytes) + value_head


# --- reading --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    """One tensor of an EasyLM file, known from its header: its place in the file, shape and dtype."""

    key: Key  # as in the file
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int  # of the value (flax's bytes of the tensor)
    size: int  # of the value
    data_offset: int | None  # of the raw data within the value; None: flax encoded it otherwise


def split_load_spec(spec: str) -> tuple[str | None, Path]:
    """`params::path` style (as EasyLM's --load_checkpoint) into (load type or None, path)."""
    match = re.fullmatch(r"(\w+)::(.+)", spec)
    if match is None:
        return None, Path(spec)
    kind, path = match.groups()
    if kind == "flax":
        raise ConversionError(f"load type 'flax' in {spec!r}: EasyLM's docs name it so, its code (and this reader) "
                              f"flax_params::; use flax_params::{path}")
    if kind not in PARAMS_PREFIX:
        raise ConversionError(f"load type {kind!r} in {spec!r}; allowed: {sorted(PARAMS_PREFIX)}")
    return kind, Path(path)


def scan_records(path: Path) -> list[Tensor]:
    """The tensors of a streaming file from their headers alone; the data is skipped, not read."""
    tensors = []
    with open(path, "rb") as stream:
        end = os.fstat(stream.fileno()).st_size
        while stream.tell() < end:
            start = stream.tell()
            try:
                if expect(stream, "array") != 2:
                    raise FormatError("a record is not a (key, tensor) pair")
                key = read_key(stream)
                size = expect(stream, "bin")
            except FormatError as error:
                raise ConversionError(f"{path}: not a readable EasyLM streaming checkpoint at byte {start} "
                                      f"({error})") from None
            offset = stream.tell()
            name = "/".join(key)
            if offset + size > end:
                raise ConversionError(f"{path}: tensor {name} is cut off: the file ends {offset + size - end} bytes "
                                      "early (truncated? download it again)")
            header = read_array_header(stream)
            if header is None:
                stream.seek(offset)
                array = restore_value(read_exact(stream, size), path, name)
                shape, dtype, data_offset = array.shape, array.dtype, None
            else:
                shape, dtype, data_offset = header
            tensors.append(Tensor(key, tuple(shape), np.dtype(dtype), offset, size, data_offset))
            stream.seek(offset + size)
    return tensors


def restore_value(value: bytes, path: Path, name: str) -> np.ndarray:
    """A value in a form other than one ext array (chunked, scalar), through flax's own reader."""
    try:
        return np.asarray(serialization.msgpack_restore(value))
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise ConversionError(f"{path}: tensor {name} is not a flax-serialized array ({error})") from None


def read_tensor(stream: BinaryIO, tensor: Tensor, path: Path) -> np.ndarray:
    """One tensor, read from the file into its own array (no intermediate copy)."""
    name = "/".join(tensor.key)
    if tensor.data_offset is None:
        stream.seek(tensor.offset)
        return restore_value(read_exact(stream, tensor.size), path, name)
    array = np.empty(tensor.shape, tensor.dtype)
    stream.seek(tensor.offset + tensor.data_offset)
    if stream.readinto(memoryview(raw_bytes(array))) != array.nbytes:
        raise ConversionError(f"{path}: tensor {name} is cut off (truncated? download it again)")
    return array


class EasylmFile:
    """An EasyLM checkpoint opened for reading: its LLaMA tensors by EasyLM name, their shapes known before
    any tensor is read (streamed files), and then the tensors one at a time."""

    def __init__(self, spec: str) -> None:
        given_type, self.path = split_load_spec(spec)
        load_type = given_type
        if self.path.is_dir():
            raise ConversionError(f"EasyLM checkpoint {self.path} is a directory; name the file in it "
                                  "(streaming_params, streaming_train_state, ...)")
        if not self.path.is_file():
            raise ConversionError(f"EasyLM checkpoint {self.path} does not exist")
        with open(self.path, "rb") as stream:
            first = stream.read(1)
        streamed = first == b"\x92"  # a record [key, value]; a flax msgpack starts with a map
        is_map = bool(first) and (0x80 <= first[0] <= 0x8F or first[0] in (0xDE, 0xDF))
        if load_type is None:
            load_type = "params" if streamed else "flax_params"
        elif load_type in STREAMED and is_map:
            raise ConversionError(f"{self.path} is one flax msgpack, not a streaming file; load it as "
                                  f"flax_params::{self.path}")
        elif load_type == "flax_params" and streamed:
            raise ConversionError(f"{self.path} is a streaming file, not one flax msgpack; load it as "
                                  f"params::{self.path} (or trainstate_params:: for a train state)")
        self.flax_tree: dict | None = None
        if load_type == "flax_params":
            self.records = self.read_flax_tree()
        else:
            self.records = scan_records(self.path)
            in_train_state = any(t.key[:2] == ("params", "params") for t in self.records)
            if given_type is None and in_train_state:
                load_type = "trainstate_params"
            elif load_type == "params" and in_train_state:
                raise ConversionError(f"{self.path} holds a train state (weights under params/params/); load it as "
                                      f"trainstate_params::{self.path}")
            elif load_type != "params" and not in_train_state:
                raise ConversionError(f"{self.path} holds no train state (no params/params/ keys); load it as "
                                      f"params::{self.path}")
        self.load_type = load_type
        prefix = PARAMS_PREFIX[load_type]
        self.tensors: dict[Key, Tensor] = {}  # by EasyLM name from the top of the parameter tree
        for tensor in self.records:
            if tensor.key[: len(prefix)] != prefix:
                continue  # a train state's step and optimizer state
            name = tensor.key[len(prefix):]
            if name in self.tensors:
                raise ConversionError(f"{self.path}: tensor {'/'.join(tensor.key)} appears twice")
            if our_path(name) is None:
                raise ConversionError(f"{self.path}: tensor {'/'.join(tensor.key)} is not part of EasyLM's LLaMA "
                                      "(transformer/wte, transformer/h/N/..., transformer/ln_f, lm_head)")
            self.tensors[name] = tensor
        if not self.tensors:
            raise ConversionError(f"{self.path}: no EasyLM LLaMA weights (transformer/..., lm_head/...) found")

    def read_flax_tree(self) -> list[Tensor]:
        """A flax_params file, restored whole (it is not streamed); its arrays stand in for records."""
        try:
            tree = serialization.msgpack_restore(self.path.read_bytes())
        except (ValueError, TypeError, msgpack.UnpackException) as error:
            raise ConversionError(f"{self.path}: not a readable flax msgpack ({error})") from None
        if not isinstance(tree, dict):
            raise ConversionError(f"{self.path}: a flax msgpack of a parameter tree holds a mapping, not "
                                  f"{type(tree).__name__}")
        self.flax_tree = {tuple(map(str, key)): value for key, value in traverse_util.flatten_dict(tree).items()}
        return [Tensor(key, np.shape(value), np.asarray(value).dtype, 0, 0, None)
                for key, value in self.flax_tree.items()]

    def name(self, easylm_name: Key) -> str:
        """How a tensor is named in this file (with a train state's params/params/)."""
        return "/".join((*PARAMS_PREFIX[self.load_type], *easylm_name))

    def shapes(self) -> dict[Key, tuple[int, ...]]:
        return {name: tensor.shape for name, tensor in self.tensors.items()}

    def read(self) -> Iterator[tuple[Key, np.ndarray]]:
        """(EasyLM name, array) of every LLaMA tensor in file order, each read when it is reached."""
        if self.flax_tree is not None:
            for name, tensor in self.tensors.items():
                yield name, np.asarray(self.flax_tree.pop(tensor.key))
            return
        total = sum(t.size for t in self.tensors.values())
        with open(self.path, "rb") as stream, tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr,
                                                   desc=f"reading {self.path.name}") as progress:
            for name, tensor in self.tensors.items():
                yield name, read_tensor(stream, tensor, self.path)
                progress.update(tensor.size)


# --- the architecture, from the tensors ---------------------------------------------------------------------


def infer_config(
    source: EasylmFile,
    preset: str | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    **unseen: float | int | None,
) -> LlamaConfig:
    """The architecture of an EasyLM file: its shapes, and for the head count (no tensor holds it)
    `num_heads`, else the preset's, else the preset's whose other shapes are the file's.

    With `preset`, the file must have the preset's shapes; without, the shapes are the file's.
    """
    unknown = sorted(set(unseen) - set(UNSEEN_FIELDS))
    if unknown:
        raise ConversionError(f"{unknown} cannot be set for an EasyLM import; allowed: {list(UNSEEN_FIELDS)}")
    fields = {name: value for name, value in unseen.items() if value is not None}
    if num_heads is not None:
        fields["num_attention_heads"] = num_heads
    if num_kv_heads is not None:
        fields["num_key_value_heads"] = num_kv_heads
    if preset is not None:
        if preset not in PRESETS:
            raise ConversionError(f"--preset {preset!r} does not exist; allowed: {sorted(PRESETS)}")
        fields.setdefault("num_key_value_heads", fields.get("num_attention_heads", PRESETS[preset].num_key_value_heads))
        return build_config(LlamaConfig.preset, (preset,), fields, source)

    shapes = source.shapes()

    def shape_of(name: Key) -> tuple[int, ...]:
        if name not in shapes:
            raise ConversionError(f"{source.path}: tensor {source.name(name)} is missing")
        return shapes[name]

    vocab_size, hidden_size = shape_of(EMBEDDING)
    layers = {int(name[2]) for name in shapes if name[:2] == ("transformer", "h")}
    if not layers:
        raise ConversionError(f"{source.path}: no transformer/h/N tensors; an EasyLM LLaMA has at least one layer")
    intermediate_size = shape_of(layer_key(0, ("feed_forward", "w1", "kernel")))[-1]
    kv_width = shape_of(layer_key(0, ("attention", "wk", "kernel")))[-1]
    heads_from = "--num-heads"
    if num_heads is None:
        matching = {name: p for name, p in PRESETS.items() if (p.hidden_size, p.intermediate_size) ==
                    (hidden_size, intermediate_size) and p.num_key_value_heads * p.head_dim == kv_width}
        counts = {p.num_attention_heads for p in matching.values()}
        if len(counts) != 1:
            raise ConversionError(
                f"{source.path}: the number of attention heads is in no tensor, and "
                f"{'no preset' if not counts else 'presets ' + str(sorted(matching)) + ' with different heads'} has "
                f"hidden size {hidden_size}, intermediate size {intermediate_size} and key/value width {kv_width}; "
                "give --num-heads (or --preset)"
            )
        num_heads = counts.pop()
        heads_from = f"preset {sorted(matching)[0]} (same hidden, intermediate and key/value sizes)"
    if hidden_size % num_heads:
        raise ConversionError(f"{source.path}: {num_heads} heads do not divide the hidden size {hidden_size} of "
                              f"{source.name(EMBEDDING)}; check --num-heads")
    head_dim = hidden_size // num_heads
    wk = source.name(layer_key(0, ("attention", "wk", "kernel")))
    if kv_width % head_dim or (num_kv_heads is not None and num_kv_heads * head_dim != kv_width):
        wanted = f"{num_kv_heads} heads" if num_kv_heads is not None else "a whole number of heads"
        raise ConversionError(f"{source.path}: tensor {wk} has {kv_width} outputs, not {wanted} of {head_dim} "
                              f"(hidden size / {num_heads} heads); check --num-heads / --num-kv-heads")
    fields.update(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=max(layers) + 1, num_attention_heads=num_heads, num_key_value_heads=kv_width // head_dim,
        tie_word_embeddings=LM_HEAD not in shapes,
    )
    config = build_config(LlamaConfig, (), fields, source)
    log.info("%s: %d layers, hidden %d, %d heads from %s, %d key/value heads, vocab %d, %s head", source.path,
             config.num_hidden_layers, hidden_size, num_heads, heads_from, config.num_key_value_heads, vocab_size,
             "tied" if config.tie_word_embeddings else "untied")
    return config


def build_config(make: Callable[..., LlamaConfig], args: tuple, fields: dict, source: EasylmFile) -> LlamaConfig:
    try:
        return make(*args, **fields)
    except ValueError as error:  # e.g. heads that do not divide the hidden size
        raise ConversionError(f"{source.path}: {error}") from None


def check_shapes(source: EasylmFile, config: LlamaConfig, needs: str) -> None:
    """Every tensor `config` needs is in the file with its shape, and the file holds no other; else an error
    naming the tensor."""
    shapes = source.shapes()
    wanted = {easylm_key(path): shape for path, shape in expected_shapes(config).items()}
    for name, shape in wanted.items():
        if name not in shapes:
            raise ConversionError(f"{source.path}: tensor {source.name(name)} is missing ({needs} needs it)")
        if shapes[name] != shape:
            raise ConversionError(f"{source.path}: tensor {source.name(name)} has shape {shapes[name]}, "
                                  f"{needs} needs {shape}")
    for name in shapes:
        if name not in wanted:
            what = ("a tied head" if name == LM_HEAD else f"a {config.num_hidden_layers}-layer model")
            raise ConversionError(f"{source.path}: tensor {source.name(name)} does not belong to {what} ({needs})")


def iter_easylm_params(
    source: EasylmFile, config: LlamaConfig, needs: str = "the config"
) -> Iterator[tuple[Key, np.ndarray]]:
    """(our parameter path, array in our layout) for every tensor of the file, one at a time, all shapes
    checked against `config` before the first is read (`needs` says where the config came from)."""
    check_shapes(source, config, needs)
    for name, array in source.read():
        path = our_path(name)
        if path[-2] == "q_proj":
            array = interleaved_to_rotate_half(array, config.num_attention_heads)
        elif path[-2] == "k_proj":
            array = interleaved_to_rotate_half(array, config.num_key_value_heads)
        yield path, array


def read_easylm(
    spec: str,
    preset: str | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    **unseen: float | int | None,
) -> tuple[LlamaConfig, dict]:
    """(architecture, our parameter tree) of an EasyLM checkpoint `[LOAD_TYPE::]FILE`; see `infer_config`."""
    source = EasylmFile(spec)
    config = infer_config(source, preset, num_heads, num_kv_heads, **unseen)
    needs = f"--preset {preset}" if preset else "the architecture of its other tensors"
    params: dict = {}
    for path, array in iter_easylm_params(source, config, needs):
        set_path(params, path, array)
    return config, unify_dtype(params, str(source.path))


def read_easylm_params(spec: str, config: LlamaConfig) -> dict:
    """Our parameter tree from an EasyLM checkpoint whose architecture is `config` (checked, tensor by tensor)."""
    source = EasylmFile(spec)
    params: dict = {}
    for path, array in iter_easylm_params(source, config):
        set_path(params, path, array)
    check_params(params, config, str(source.path))
    return params


def import_easylm(
    spec: str,
    ckpt: str | Path,
    preset: str | None = None,
    tokenizer: str | Path | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    **unseen: float | int | None,
) -> Path:
    """Convert an EasyLM checkpoint into our checkpoint at `ckpt` (architecture as `infer_config` finds it)."""
    if preset is not None and preset not in PRESETS:
        raise ConversionError(f"--preset {preset!r} does not exist; allowed: {sorted(PRESETS)}")
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise ConversionError(f"--tokenizer {tokenizer} does not exist")
    if Path(ckpt).exists():  # refused before the file is read, not after
        raise FileExistsError(f"checkpoint {Path(ckpt).absolute()} already exists; choose a new path or remove it")
    config, params = read_easylm(spec, preset, num_heads, num_kv_heads, **unseen)
    return checkpoint.save_model(ckpt, params, config, tokenizer)


# --- writing --------------------------------------------------------------------------------------------


def export_order(config: LlamaConfig) -> list[tuple[Key, Key]]:
    """(EasyLM key, our path) of every tensor EasyLM's LLaMA has, in the order its training writes them.

    EasyLM's parameters pass through `jax.jit`, which rebuilds every dict with sorted keys, so its
    `streaming_params` list them sorted at every level (`lm_head` first, layer "10" before "2"). A tied
    head is written as the transposed embedding: EasyLM's LLaMA always has an `lm_head`.
    """
    pairs = [(easylm_key(path), path) for path in param_paths(config)]
    if config.tie_word_embeddings:
        pairs.append((LM_HEAD, ("embed_tokens", "embedding")))
    return sorted(pairs)


def export_easylm(ckpt: str | Path, out_file: str | Path, dtype: str | None = None) -> str:
    """Write checkpoint `ckpt` as an EasyLM `params::` streaming file at `out_file` (whole, or not at all).

    `dtype` (float32/bfloat16/float16) defaults to the checkpoint's parameter dtype, so an imported file
    writes back byte for byte.
    """
    config, params, _ = checkpoint.load_model(ckpt)
    check_params(params, config, str(ckpt))
    dtype = dtype or stored_dtype(params, str(ckpt))
    if dtype not in DTYPES:
        raise ConversionError(f"dtype={dtype!r}; allowed: {sorted(DTYPES)}")
    if not files.is_uri(out_file) and Path(out_file).exists():
        raise FileExistsError(f"{out_file} exists; choose a new path or remove it")
    order = export_order(config)
    with files.open_output(out_file) as stream:
        for key, path in tqdm(order, desc=f"writing {Path(str(out_file)).name}", unit=" tensors", file=sys.stderr):
            array = np.asarray(get_path(params, path)).astype(DTYPES[dtype], copy=False)
            if key == LM_HEAD and path[0] == "embed_tokens":
                array = array.T
            if path[-2:] == ("q_proj", "kernel"):
                array = interleaved_to_rotate_half(array, config.num_attention_heads, inverse=True)
            elif path[-2:] == ("k_proj", "kernel"):
                array = interleaved_to_rotate_half(array, config.num_key_value_heads, inverse=True)
            array = np.ascontiguousarray(array)
            if array.nbytes > serialization.MAX_CHUNK_SIZE:  # flax splits such arrays into chunks
                stream.write(msgpack.packb((key, serialization.to_bytes(array))))
            else:
                stream.write(encode_record_headers(key, array))
                stream.write(raw_bytes(array))
    return str(out_file)


# --- CLI ------------------------------------------------------------------------------------------------


@dataclass
class ImportEasylmConfig:
    """`openllama import-easylm`: an EasyLM checkpoint into one of ours, its architecture read from the tensors."""

    # LOAD_TYPE::FILE (params::, trainstate_params::, trainstate::, flax_params::), or FILE (its kind recognized)
    file: str = dataclasses.field(metadata={POSITIONAL: True})
    checkpoint: str = dataclasses.field(metadata={POSITIONAL: True})  # new checkpoint directory
    preset: str | None = None  # check the file against this model preset (None: the architecture is the file's)
    num_heads: int | None = None  # attention heads, in no tensor (None: the preset's, or a preset's of equal shapes)
    num_kv_heads: int | None = None  # key/value heads (None: wk's width over the head size)
    rope_theta: float | None = None  # rotary base frequency, in no tensor (None: the preset's, else LLaMA's)
    rms_norm_eps: float | None = None  # RMSNorm epsilon, in no tensor (None: the preset's, else LLaMA's)
    max_position_embeddings: int | None = None  # context length, in no tensor (None: the preset's, else LLaMA's)
    tokenizer: str | None = None  # tokenizer.model to keep with the weights

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"preset={self.preset!r} does not exist; allowed: {sorted(PRESETS)}")
        for name in ("num_heads", "num_kv_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value} must be positive")


@dataclass
class ExportEasylmConfig:
    """`openllama export-easylm`: one of our checkpoints as an EasyLM `params::` streaming file."""

    # a model checkpoint, or a training run directory (its newest checkpoint)
    checkpoint: str = dataclasses.field(metadata={POSITIONAL: True})
    # the new EasyLM file (a local path or a gs://, s3:// URI); EasyLM loads it as params::FILE
    file: str = dataclasses.field(metadata={POSITIONAL: True})
    dtype: str | None = None  # float32/bfloat16/float16, EasyLM's fp32/bf16/fp16 (None: the checkpoint's)

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}; allowed: {sorted(DTYPES)}")


def describe(config: LlamaConfig) -> str:
    head = "tied" if config.tie_word_embeddings else "untied"
    return (f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads "
            f"({config.num_key_value_heads} key/value), vocab {config.vocab_size}, {head} head")


def import_command(config: ImportEasylmConfig) -> None:
    """Read an EasyLM checkpoint (OpenLLaMA's release: params::, trainstate_params::, trainstate::,
    flax_params::) into one of ours, its architecture read from the tensors; prints what it found."""
    commands.quiet_libraries()
    unseen = {name: getattr(config, name) for name in UNSEEN_FIELDS}
    path = import_easylm(config.file, config.checkpoint, config.preset, config.tokenizer, config.num_heads,
                         config.num_kv_heads, **unseen)
    print(f"wrote {path}: {describe(checkpoint.read_config(path))}")


def export_command(config: ExportEasylmConfig) -> None:
    """Write one of our checkpoints (or a training run's newest) as an EasyLM `params::` streaming file."""
    print(f"wrote {export_easylm(config.checkpoint, config.file, config.dtype)}")
