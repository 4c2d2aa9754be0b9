"""Weights a training run can start from (`train.init_from`): one of our checkpoints, a Hugging Face LLaMA
directory, or an EasyLM file (`params::FILE` and the other load types), read into the run's own layout.

Each parameter is placed straight into its sharding: from our checkpoints only the shards a process holds
are read (a training step's state database, local or in a bucket, or orbax's params/), from safetensors
only the slices its devices hold, and an EasyLM file is streamed one tensor at a time; no host holds the
whole model. The architecture must be the run's (`model.preset`, `model.overrides`); a field that differs is
named. The parameters arrive in the run's layout: per layer as every source holds them, stacked for a run that
scans its blocks.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pyarrow.fs as pafs
from safetensors import safe_open

from openllama import files
from openllama.config import ConfigError
from openllama.train import checkpoint
from openllama.train.convert import easylm, hf
from openllama.train.convert.tree import get_path, set_path
from openllama.train.model import DTYPES, LlamaConfig, ModelRuntime

# what a source must share with the run: the architecture, but for the spread of a fresh init, which a run from
# weights never draws (the runtime, `ModelRuntime`, is the run's own to choose)
ARCHITECTURE = tuple(f.name for f in dataclasses.fields(LlamaConfig) if f.name != "initializer_range")


def kind_of(source: str) -> str:
    """`ours`, `hf` or `easylm`, from what the path holds (an EasyLM file may name its load type)."""
    if files.is_uri(source.split("::", 1)[-1]):  # a training run in a bucket (output_dir=s3://..., gs://...)
        if "::" not in source and (checkpoint.is_model_checkpoint(source)
                                   or files.kind(files.join(source, "checkpoints")) == pafs.FileType.Directory):
            return "ours"
        raise ConfigError(f"train.init_from={source}: from a bucket, only a training run or one of its step "
                          "checkpoints is read; copy a Hugging Face directory or an EasyLM file to local disk first")
    path = Path(source.split("::", 1)[-1])
    if "::" in source or path.is_file():
        return "easylm"
    if checkpoint.is_model_checkpoint(path) or (path / "checkpoints").is_dir():
        return "ours"
    if (path / "config.json").is_file():
        return "hf"
    raise ConfigError(f"train.init_from={source}: neither one of our checkpoints (model.json + params/), a Hugging "
                      "Face directory (config.json + safetensors) nor an EasyLM file ([params::]FILE)")


def source_architecture(source: str) -> LlamaConfig | None:
    """The architecture a source states (None for EasyLM files, whose shapes are checked tensor by tensor)."""
    kind = kind_of(source)
    if kind == "ours":
        return checkpoint.read_config(source)
    if kind == "hf":
        path = Path(source) / "config.json"
        return hf.config_from_hf(json.loads(path.read_text()), str(path))
    return None


def check_architecture(source: str, run: LlamaConfig) -> None:
    """The source's architecture is the run's, or a ConfigError naming the first field that differs."""
    theirs = source_architecture(source)
    if theirs is None:
        easylm.check_shapes(easylm.EasylmFile(source), run, "the run's model.* settings")
        return
    for name in ARCHITECTURE:
        if getattr(theirs, name) != getattr(run, name):
            raise ConfigError(f"train.init_from={source} has {name}={getattr(theirs, name)!r} but the run's model has "
                              f"{name}={getattr(run, name)!r}; set model.preset/model.overrides to the source's")


def load_params(source: str, run: LlamaConfig, runtime: ModelRuntime, target: Any) -> Any:
    """The source's parameters in the run's param_dtype and layout, each placed as `target` (the run's abstract
    parameters, with their shardings) says."""
    check_architecture(source, run)
    dtype = DTYPES[runtime.param_dtype]
    shardings = jax.tree.map(lambda leaf: leaf.sharding, checkpoint.per_layer_target(target))
    kind = kind_of(source)
    if kind == "ours":
        _, params, _ = checkpoint.load_model(source, shardings)
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    elif kind == "hf":
        params = hf_params(Path(source), run, dtype, shardings)
    else:
        params = {}
        for path, array in easylm.iter_easylm_params(easylm.EasylmFile(source), run, "the run's model.* settings"):
            set_path(params, path, place(np.asarray(array, dtype), get_path(shardings, path)))
    return checkpoint.in_run_layout(params, target)


def place(array: np.ndarray, sharding: Any) -> jax.Array:
    """A host array as a global array: each device gets only its slice."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def hf_params(hf_dir: Path, run: LlamaConfig, dtype: Any, shardings: Any) -> dict:
    """Parameters from safetensors, each device's slice read from the file alone (HF kernels are (out, in))."""
    index = hf_dir / hf.INDEX_FILE
    if index.is_file():
        files = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(str(hf_dir / hf.SINGLE_FILE), framework="numpy") as f:
            files = dict.fromkeys(f.keys(), hf.SINGLE_FILE)
    params: dict = {}
    for path, name, transposed in hf.tensor_names(run):
        if name not in files:
            raise ConfigError(f"train.init_from={hf_dir}: tensor {name} is missing")
        with safe_open(str(hf_dir / files[name]), framework="numpy") as f:
            tensor = f.get_slice(name)
            shape = tuple(tensor.get_shape())
            ours = shape[::-1] if transposed else shape

            def read(index: tuple, tensor: Any = tensor, transposed: bool = transposed) -> np.ndarray:
                part = tensor[index[::-1]] if transposed else tensor[index]
                return np.ascontiguousarray(part.T if transposed else part).astype(dtype)

            set_path(params, path, jax.make_array_from_callback(ours, get_path(shardings, path), read))
    return params
