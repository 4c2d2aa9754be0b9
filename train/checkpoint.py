"""The project's model checkpoint: orbax parameters with the model config and tokenizer beside them.

    CKPT/params/          orbax (restorable onto any device mesh)
    CKPT/model.json       LlamaConfig fields
    CKPT/tokenizer.model  the SentencePiece model the weights were trained with (optional)

A checkpoint is written under a temporary name and renamed at the end, so a directory with `model.json`
is always complete. `load_model` also accepts a training run directory and then takes its newest
complete checkpoint.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from openllama.train.model import LlamaConfig, config_from_dict, config_to_dict

MODEL_JSON = "model.json"
TOKENIZER = "tokenizer.model"


def is_model_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / MODEL_JSON).is_file() and (path / "params").is_dir()


def write_metadata(path: Path, config: LlamaConfig, tokenizer: str | Path | None) -> None:
    """Config and tokenizer copy beside the weights (used by save_model and by training checkpoints)."""
    (path / MODEL_JSON).write_text(json.dumps(config_to_dict(config), indent=2, sort_keys=True))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, path / TOKENIZER)


def save_model(path: str | Path, params: Any, config: LlamaConfig, tokenizer: str | Path | None = None) -> Path:
    """Write a complete model checkpoint at `path` atomically (temporary name, then rename)."""
    path = Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"checkpoint {path} already exists; choose a new path or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / "params", params)
        write_metadata(tmp, config, tokenizer)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve(path: str | Path) -> Path:
    """The model checkpoint a user meant: the path itself, or a training run's newest complete checkpoint.

    Accepts a model checkpoint, a run directory (`RUN/checkpoints/step_XXXXXXXX`) or its `checkpoints/`;
    nothing deeper is searched, so a wrong path is an error rather than some other model.
    """
    path = Path(path).absolute()
    if is_model_checkpoint(path):
        return path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    steps = sorted(p for p in [*path.glob("step_*"), *path.glob("checkpoints/step_*")] if is_model_checkpoint(p))
    if not steps:
        raise FileNotFoundError(
            f"{path} is not a checkpoint: it holds no {MODEL_JSON} beside a params/ folder, nor a training run's "
            "checkpoints/step_* (make one with `openllama train`, `openllama import-hf` or `openllama import-easylm`)"
        )
    return steps[-1]


def load_model(path: str | Path, shardings: Any = None) -> tuple[LlamaConfig, Any, Path | None]:
    """(config, params, tokenizer path or None) of a checkpoint; params placed by `shardings` if given."""
    path = resolve(path)
    config = config_from_dict(json.loads((path / MODEL_JSON).read_text()))
    with ocp.StandardCheckpointer() as checkpointer:
        meta = checkpointer.metadata(path / "params")
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
        if shardings is None:  # onto this process's first device, whatever topology saved it
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, tree)
        target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), tree, shardings)
        params = checkpointer.restore(path / "params", target)
    tokenizer = path / TOKENIZER
    return config, params, tokenizer if tokenizer.is_file() else None
