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

The run directory may be in a bucket (`output_dir=s3://...` or `gs://...`), where every host of a pod sees
it. A bucket has no rename and orbax writes only to local paths, so each process lets orbax write its own
shards into a node-local staging folder and uploads them (`files.copy_tree`); once every process has
uploaded, process 0 writes state.json, the step's completeness marker, last. A step folder in a bucket
without state.json is a save that did not finish. Restoring downloads the step into staging first.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
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
DEFAULT_STAGING = Path(tempfile.gettempdir()) / "openllama-staging"
# Saving to staging folders that no other process sees: every process is primary for its own folder (orbax's
# mode for host-local storage), and arrays are zarr, a file per shard; OCDBT's merge would need every
# process's folder on process 0. Restore reads either format.
EACH_PROCESS_ITS_OWN_FOLDER = {"multiprocessing_options": ocp.options.MultiprocessingOptions(primary_host=None),
                               "use_ocdbt": False}


def under(base: Path | str, *parts: str) -> Path | str:
    """`base`/parts, a Path for a local folder and a URI string for a bucket."""
    return files.join(str(base), *parts) if files.is_uri(base) else Path(base, *parts)


def staging_mirror(location: str | Path, staging: Path | None = None) -> Path:
    """The local folder standing for bucket location `location` (s3://b/runs/x -> STAGING/s3/b/runs/x)."""
    if files.is_uri(location):
        scheme, rest = files.check_location(location).split("://", 1)
    else:
        scheme, rest = "file", str(Path(location).absolute())
    return Path(staging or DEFAULT_STAGING) / scheme / rest.strip("/")


def download(location: str, local: Path, leave_out: tuple[str, ...] = ()) -> Path:
    """The folder at `location` (but the entries named in `leave_out`) copied to `local`, unless a finished
    copy is already there.

    Fetched under a temporary name and renamed: a copy interrupted midway is never taken for a whole one,
    and of processes on one host that fetch the same folder at once, the first rename wins.
    """
    if local.is_dir():
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    temporary = files.temporary_name(local)
    try:
        for name in files.names_in(location):
            if name not in leave_out:
                files.copy_tree(under(location, name), temporary / name)
        temporary.rename(local)
    except OSError:
        if not local.is_dir():
            raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return local


# --------------------------------------------------------------------------------------- model checkpoint


def is_model_checkpoint(path: str | Path) -> bool:
    if files.is_uri(path):  # in a bucket only training writes, and a step is whole once it has state.json
        return files.is_file(under(path, STATE_JSON)) and files.is_file(under(path, MODEL_JSON))
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
    nothing deeper is searched, so a wrong path is an error rather than some other model. One in a bucket
    is fetched into local staging (`fetch_model`), since orbax reads local files only.
    """
    if files.is_uri(path):
        return fetch_model(path)
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


def fetch_model(location: str, staging: Path | None = None) -> Path:
    """The local copy of a training run's checkpoint in a bucket (the step itself, or a run's newest), kept in
    staging at the bucket's layout for the next command: weights, config and tokenizer, not the optimizer
    state, plus the run's MLflow id, so the copy names the run that trained it as the original does."""
    location = files.check_location(location).rstrip("/")
    step = location
    if not is_model_checkpoint(location):
        run = RunDir(location.removesuffix("/checkpoints"))
        latest = run.latest()
        if latest is None:
            raise FileNotFoundError(f"{location} is not a checkpoint: it holds no {STATE_JSON} beside a "
                                    f"{MODEL_JSON}, nor a training run's checkpoints/step_* that finished")
        step = latest[1]
    local = download(step, staging_mirror(step, staging), leave_out=(OPT_STATE,))
    run = RunDir.of_checkpoint(step)
    if run is not None and (run_id := run.tracking_run_id()):
        RunDir(staging_mirror(run.path, staging)).record_tracking_run(run_id)
    return local


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
        return int(files.read_json(under(path, STATE_JSON))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------------------ run directory


@dataclass(frozen=True)
class RunDir:
    """A training run's folder (`<output_dir>/<name>`): its step checkpoints and its MLflow run id.

    `path` is a local folder (every host mounts it) or a bucket URI; for a bucket, each process stages its
    part of a checkpoint under `staging` (node-local scratch) on the way up and down.
    """

    path: Path | str
    staging: Path | None = None

    RUN_ID_FILE = "mlflow_run_id"

    def __post_init__(self) -> None:
        path = files.check_location(self.path).rstrip("/") if files.is_uri(self.path) else Path(self.path)
        object.__setattr__(self, "path", path)

    @property
    def in_bucket(self) -> bool:
        return isinstance(self.path, str)

    @property
    def checkpoints(self) -> Path | str:
        return under(self.path, "checkpoints")

    def step_dir(self, step: int) -> Path | str:
        return under(self.checkpoints, f"step_{step:08d}")

    def process_staging(self) -> Path:
        """This process's own scratch folder for the run (processes on one host never share one)."""
        return staging_mirror(self.path, self.staging) / f"process_{jax.process_index()}"

    def complete_checkpoints(self) -> list[tuple[int, Path | str]]:
        """(step, dir) of every complete step checkpoint, oldest first; temporary ones are never listed."""
        found = []
        for name in files.names_in(self.checkpoints):
            match = STEP_DIR.match(name)
            if match and files.is_file(under(self.checkpoints, name, STATE_JSON)):
                found.append((int(match.group(1)), under(self.checkpoints, name)))
        return sorted(found)

    def latest(self) -> tuple[int, Path | str] | None:
        """The newest complete step checkpoint, or None before the first one."""
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def remove_partial_checkpoints(self) -> list[Path | str]:
        """What a crash mid-save left (a temporary folder; in a bucket, a step without state.json): never
        loaded, removed before training resumes."""
        if not self.in_bucket:
            return files.remove_temporaries(self.checkpoints, ".step_*.tmp*")
        partial = [under(self.checkpoints, name) for name in files.names_in(self.checkpoints)
                   if STEP_DIR.match(name) and not files.is_file(under(self.checkpoints, name, STATE_JSON))]
        for location in partial:
            files.remove_tree(location)
        return partial

    def tracking_run_id(self) -> str | None:
        """The MLflow run this training run logs to, once one was recorded."""
        path = under(self.path, self.RUN_ID_FILE)
        return (files.read_bytes(path).decode().strip() or None) if files.is_file(path) else None

    def record_tracking_run(self, run_id: str) -> None:
        files.write_text(under(self.path, self.RUN_ID_FILE), run_id)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir | None:
        """The run a step checkpoint belongs to (RUN/checkpoints/step_N), None for any other checkpoint."""
        if files.is_uri(checkpoint):
            run, folder, name = str(checkpoint).rstrip("/").rsplit("/", 2)
            return cls(run) if STEP_DIR.match(name) and folder == "checkpoints" else None
        checkpoint = Path(checkpoint).absolute()
        if STEP_DIR.match(checkpoint.name) and checkpoint.parent.name == "checkpoints":
            return cls(checkpoint.parent.parent)
        return None


def save_step(run: RunDir, state: dict, config: LlamaConfig, tokenizer: str | Path | None, info: dict,
              keep: int) -> Path | str:
    """Write the train state of `state['step']` atomically; every process calls this, process 0 commits.

    Orbax writes each process's shards; process 0 adds model.json, state.json (`info` and the step) and
    renames the folder into place, then removes all but the newest `keep` step checkpoints.
    """
    if run.in_bucket:
        return upload_step(run, state, config, tokenizer, info, keep)
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


def upload_step(run: RunDir, state: dict, config: LlamaConfig, tokenizer: str | Path | None, info: dict,
                keep: int) -> str:
    """`save_step` into a bucket: each process saves its shards to its staging folder and uploads them; after
    a barrier that every upload finished, process 0 writes state.json, then prunes to the newest `keep`."""
    step = int(state["step"])
    final = run.step_dir(step)
    local = run.process_staging() / f"step_{step:08d}"
    shutil.rmtree(local, ignore_errors=True)  # what a crash of this process left
    if jax.process_index() == 0:  # a save of this step that completed before a crash is not complete meanwhile
        files.remove_file(under(final, STATE_JSON))
    multihost_utils.sync_global_devices(f"checkpoint {step} started")
    with ocp.StandardCheckpointer(**EACH_PROCESS_ITS_OWN_FOLDER) as checkpointer:
        checkpointer.save(local / PARAMS, state["params"])
        checkpointer.save(local / OPT_STATE, state["opt_state"])
    if jax.process_index() == 0:
        write_metadata(local, config, tokenizer)
    files.copy_tree(local, final)
    shutil.rmtree(local, ignore_errors=True)
    multihost_utils.sync_global_devices(f"checkpoint {step} uploaded")
    if jax.process_index() == 0:
        files.write_text(under(final, STATE_JSON), json.dumps({"step": step, **info}, indent=2))
        for _, old in run.complete_checkpoints()[:-keep]:
            files.remove_tree(old)
    multihost_utils.sync_global_devices(f"checkpoint {step}")
    return final


def restore_step(path: Path | str, abstract_state: dict, staging: Path | None = None) -> tuple[dict, dict]:
    """(train state placed as `abstract_state`'s shardings, state.json) of a step checkpoint.

    One in a bucket is first downloaded whole into `staging`, this process's own folder, and removed after.
    """
    info = files.read_json(under(path, STATE_JSON))
    local = path
    if files.is_uri(path):
        staging = staging or DEFAULT_STAGING / f"process_{jax.process_index()}"
        local = staging / f"restore-{str(path).rsplit('/', 1)[-1]}"
        shutil.rmtree(local, ignore_errors=True)  # a copy a crashed restore left may be of another run's step
        local = download(str(path), local)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(Path(local) / PARAMS, abstract_state["params"])
            opt_state = checkpointer.restore(Path(local) / OPT_STATE, abstract_state["opt_state"])
    finally:
        if local != path:
            shutil.rmtree(local, ignore_errors=True)
    return {"params": params, "opt_state": opt_state, "step": info["step"]}, info
