"""The run directory and model checkpoints: the one module that knows their layout, for writing and reading.

A model checkpoint (what eval, export and generate take):

    CKPT/params/          orbax (restorable onto any device mesh)
    CKPT/model.json       LlamaConfig fields
    CKPT/tokenizer.model  the SentencePiece model the weights were trained with (optional)

A training run, `<output_dir>/<name>/` (`RunDir`):

    checkpoints/step_00000100/   a model checkpoint plus opt_state/ and state.json (step, seed, tokens seen)
    mlflow_run_id                the MLflow run every attempt of this run logs to
    (Ray Train's own files)

Every checkpoint is written under a temporary name and renamed when complete, so a folder with
`model.json` (or, for a step, `state.json`) is always whole; what a crash left half-written is removed
before a run resumes and never loaded.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from openllama import files
from openllama.train.model import LlamaConfig, config_from_dict, config_to_dict

MODEL_JSON = "model.json"
TOKENIZER = "tokenizer.model"
STATE_JSON = "state.json"
PARAMS = "params"
OPT_STATE = "opt_state"
STEP_DIR = re.compile(r"^step_(\d{8})$")


# --------------------------------------------------------------------------------------- model checkpoint


def is_model_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / MODEL_JSON).is_file() and (path / PARAMS).is_dir()


def write_metadata(path: Path, config: LlamaConfig, tokenizer: str | Path | None) -> None:
    """Config and tokenizer copy beside the weights (used by save_model and by training checkpoints)."""
    (path / MODEL_JSON).write_text(json.dumps(config_to_dict(config), indent=2, sort_keys=True))
    if tokenizer is not None:
        files.copy_file(tokenizer, path / TOKENIZER)  # local or in a bucket


def save_model(path: str | Path, params: Any, config: LlamaConfig, tokenizer: str | Path | None = None) -> Path:
    """Write a complete model checkpoint at `path` atomically (temporary name, then rename)."""
    path = Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"checkpoint {path} already exists; choose a new path or remove it")
    with files.new_directory(path) as tmp, ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp / PARAMS, params)
        checkpointer.wait_until_finished()
        write_metadata(tmp, config, tokenizer)
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


def read_config(path: str | Path) -> LlamaConfig:
    """The architecture of checkpoint `path` (resolved as `resolve` does), without loading its weights."""
    return config_from_dict(json.loads((resolve(path) / MODEL_JSON).read_text()))


def tokenizer_of(path: str | Path) -> Path | None:
    """The tokenizer.model saved with checkpoint `path`, if any."""
    tokenizer = resolve(path) / TOKENIZER
    return tokenizer if tokenizer.is_file() else None


def load_model(path: str | Path, shardings: Any = None) -> tuple[LlamaConfig, Any, Path | None]:
    """(config, params, tokenizer path or None) of a checkpoint; params placed by `shardings` if given."""
    path = resolve(path)
    config = read_config(path)
    with ocp.StandardCheckpointer() as checkpointer:
        meta = checkpointer.metadata(path / PARAMS)
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
        if shardings is None:  # onto this process's first device, whatever topology saved it
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, tree)
        target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), tree, shardings)
        params = checkpointer.restore(path / PARAMS, target)
    return config, params, tokenizer_of(path)


def checkpoint_step(path: str | Path) -> int | None:
    """The training step a checkpoint was saved at (its state.json), None for a checkpoint not from training."""
    try:
        return int(json.loads((Path(path) / STATE_JSON).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------------------ run directory


@dataclass(frozen=True)
class RunDir:
    """A training run's folder (`<output_dir>/<name>`): its step checkpoints and its MLflow run id."""

    path: Path

    RUN_ID_FILE = "mlflow_run_id"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}"

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, dir) of every complete step checkpoint, oldest first; temporary ones are never listed."""
        found = []
        for path in self.checkpoints.iterdir() if self.checkpoints.is_dir() else []:
            match = STEP_DIR.match(path.name)
            if match and (path / STATE_JSON).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        """The newest complete step checkpoint, or None before the first one."""
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def remove_partial_checkpoints(self) -> list[Path]:
        """Temporary folders left by a crash mid-save: never loaded, removed before training resumes."""
        return files.remove_temporaries(self.checkpoints, ".step_*.tmp*")

    def tracking_run_id(self) -> str | None:
        """The MLflow run this training run logs to, once one was recorded."""
        path = self.path / self.RUN_ID_FILE
        return (path.read_text().strip() or None) if path.is_file() else None

    def record_tracking_run(self, run_id: str) -> None:
        files.write_text(self.path / self.RUN_ID_FILE, run_id)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir | None:
        """The run a step checkpoint belongs to (RUN/checkpoints/step_N), None for any other checkpoint."""
        checkpoint = Path(checkpoint).absolute()
        if STEP_DIR.match(checkpoint.name) and checkpoint.parent.name == "checkpoints":
            return cls(checkpoint.parent.parent)
        return None


def save_step(run: RunDir, state: dict, config: LlamaConfig, tokenizer: Path | None, info: dict,
              keep: int) -> Path:
    """Write the train state of `state['step']` atomically; every process calls this, process 0 commits.

    Orbax writes each process's shards; process 0 adds model.json, state.json (`info` and the step) and
    renames the folder into place, then removes all but the newest `keep` step checkpoints.
    """
    step = int(state["step"])
    final = run.step_dir(step)
    tmp = final.parent / f".{final.name}.tmp"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp / PARAMS, state["params"])
        checkpointer.save(tmp / OPT_STATE, state["opt_state"])
    if jax.process_index() == 0:
        write_metadata(tmp, config, tokenizer)
        (tmp / STATE_JSON).write_text(json.dumps({"step": step, **info}, indent=2))
        files.publish_directory(tmp, final)  # replaces a save of this step that completed before a crash
        for _, old in run.complete_checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    multihost_utils.sync_global_devices(f"checkpoint {step}")
    return final


def restore_step(path: Path, abstract_state: dict) -> tuple[dict, dict]:
    """(train state placed as `abstract_state`'s shardings, state.json) of a step checkpoint."""
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(path / PARAMS, abstract_state["params"])
        opt_state = checkpointer.restore(path / OPT_STATE, abstract_state["opt_state"])
    info = json.loads((path / STATE_JSON).read_text())
    return {"params": params, "opt_state": opt_state, "step": info["step"]}, info
