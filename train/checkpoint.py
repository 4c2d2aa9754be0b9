"""The run directory and model checkpoints: the one module that knows their layout, for writing and reading.

A model checkpoint (what eval, export and generate take):

    CKPT/params/          orbax (restorable onto any device mesh); a training step keeps its weights in state/
    CKPT/model.json       the architecture (LlamaConfig fields); how a run ran it (dtypes, remat, ...) is not kept
    CKPT/tokenizer.model  the SentencePiece model the weights were trained with (optional)

A training run, `<output_dir>/<name>/` (`RunDir`), in a folder every host mounts or in a bucket:

    checkpoints/step_00000100/   model.json, tokenizer.model, state/ and state.json (step, seed, tokens seen)
    mlflow_run_id                the MLflow run every attempt of this run logs to
    (Ray Train's own files)

A step's `state/` is one TensorStore database of parameters and optimizer state (`state_db.py`): every
process writes its own shards straight to it, a few objects per process, and a restore reads only the shards
it needs. Saving is asynchronous (`CheckpointWriter`): the loop waits only while the state is copied off the
devices. state.json, the step's completeness marker, is written by process 0 after every process has written
and the databases are merged; a step folder without it is a save that did not finish, never listed and
removed before a run resumes.

Steps written before this layout (params/ and opt_state/ by orbax; in a bucket, orbax's zarr staged by every
process) still load: locally as they are, from a bucket by a download, with a warning saying so. So does a
model.json of before the architecture and the runtime were split: its run-time keys are dropped on reading.

A checkpoint holds one tree per layer (`layers_{i}`) whatever the run's layout: a run that scans its blocks holds
them stacked (`layers`, a leading layer axis) and its saves write each layer of the host copy as its own arrays,
its restores stack what they read, so a step restores into a run of either layout.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from openllama import files
from openllama.train import sharding, state_db
from openllama.train.model import (
    STACKED,
    LlamaConfig,
    config_from_dict,
    config_to_dict,
    is_stacked,
    layer_name,
    stack_layers,
    unstack_layers,
)

log = logging.getLogger("openllama.train")

MODEL_JSON = "model.json"
TOKENIZER = "tokenizer.model"
STATE_JSON = "state.json"
STATE = "state"  # a training step's parameters and optimizer state (state_db)
STATE_AT = "state_location"  # in a local copy of a bucket step's metadata: where its state/ is read from
PARAMS = "params"
OPT_STATE = "opt_state"
STEP_DIR = re.compile(r"^step_(\d{8})$")
DEFAULT_STAGING = Path(tempfile.gettempdir()) / "openllama-staging"
# what model.json held beside the architecture before `ModelRuntime` was split from `LlamaConfig`
EARLIER_RUNTIME_KEYS = ("param_dtype", "dtype", "remat_policy", "kernels", "scan_layers")


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


def download(location: str, local: Path, only: tuple[str, ...] | None = None,
             leave_out: tuple[str, ...] = ()) -> Path:
    """The folder at `location` (its entries named in `only`, if given, but those in `leave_out`) copied to
    `local`, unless a finished copy is already there.

    Fetched under a temporary name and renamed: a copy interrupted midway is never taken for a whole one,
    and of processes on one host that fetch the same folder at once, the first rename wins.
    """
    if local.is_dir():
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    temporary = files.temporary_name(local)
    temporary.mkdir()
    try:
        for name in files.names_in(location):
            if name not in leave_out and (only is None or name in only):
                files.copy_tree(under(location, name), temporary / name)
        temporary.rename(local)
    except OSError:
        if not local.is_dir():
            raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return local


def state_location(path: str | Path) -> str | None:
    """Where checkpoint `path`'s state database is (its own state/, or where a fetched copy points), if any."""
    if files.is_file(under(path, STATE, state_db.MANIFEST)):  # the root database exists once merged
        return str(under(path, STATE))
    if files.is_uri(path):
        return None
    path = Path(path)
    if (path / STATE_AT).is_file():
        return (path / STATE_AT).read_text().strip()
    return None


# --------------------------------------------------------------------------------------- model checkpoint


def is_model_checkpoint(path: str | Path) -> bool:
    if files.is_uri(path):  # in a bucket only training writes, and a step is whole once it has state.json
        return files.is_file(under(path, STATE_JSON)) and files.is_file(under(path, MODEL_JSON))
    path = Path(path)
    return (path / MODEL_JSON).is_file() and ((path / PARAMS).is_dir() or state_location(path) is not None)


def write_metadata(path: Path | str, config: LlamaConfig, tokenizer: str | Path | None) -> None:
    """Config and tokenizer copy beside the weights (used by save_model and by training checkpoints)."""
    files.write_text(under(path, MODEL_JSON), json.dumps(config_to_dict(config), indent=2, sort_keys=True))
    if tokenizer is not None:
        files.copy_file(tokenizer, under(path, TOKENIZER))  # local or in a bucket


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
    has its config and tokenizer fetched into local staging (`fetch_model`); its weights stay in the bucket.
    """
    if files.is_uri(path):
        return fetch_model(path)
    path = Path(path).absolute()
    if is_model_checkpoint(path):
        return path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    steps = sorted(p for p in [*path.glob("step_*"), *path.glob("checkpoints/step_*")]
                   if (p / STATE_JSON).is_file() and is_model_checkpoint(p))
    if not steps:
        raise FileNotFoundError(
            f"{path} is not a checkpoint: it holds no {MODEL_JSON} beside a params/ folder, nor a training run's "
            "checkpoints/step_* (make one with `openllama train`, `openllama import-hf` or `openllama import-easylm`)"
        )
    return steps[-1]


def fetch_model(location: str, staging: Path | None = None) -> Path:
    """A local stand-in for a training run's checkpoint in a bucket (the step itself, or a run's newest), kept
    in staging at the bucket's layout for the next command: its config, tokenizer and where its weights are,
    plus the run's MLflow id, so the copy names the run that trained it as the original does. The weights are
    read from the bucket when loaded (`load_model`), never the optimizer state."""
    location = files.check_location(location).rstrip("/")
    step = location
    if not is_model_checkpoint(location):
        run = RunDir(location.removesuffix("/checkpoints"))
        latest = run.latest()
        if latest is None:
            raise FileNotFoundError(f"{location} is not a checkpoint: it holds no {STATE_JSON} beside a "
                                    f"{MODEL_JSON}, nor a training run's checkpoints/step_* that finished")
        step = latest[1]
    mirror = staging_mirror(step, staging)
    if state_location(step) is None:  # a step of the earlier staged layout: its weights are downloaded
        log.warning("%s was saved in the staged layout of an earlier version; downloading its weights", step)
        local = download(step, mirror, leave_out=(OPT_STATE,))
    else:
        local = download(step, mirror, only=(MODEL_JSON, TOKENIZER, STATE_JSON))
        if not (local / STATE_AT).is_file():
            (local / STATE_AT).write_text(files.join(step, STATE))
    run = RunDir.of_checkpoint(step)
    if run is not None and (run_id := run.tracking_run_id()):
        RunDir(staging_mirror(run.path, staging)).record_tracking_run(run_id)
    return local


def read_config(path: str | Path) -> LlamaConfig:
    """The architecture of checkpoint `path` (resolved as `resolve` does), without loading its weights; an
    earlier version's run-time keys are dropped, any other unknown key is an error naming it."""
    values = json.loads((resolve(path) / MODEL_JSON).read_text())
    earlier = [key for key in EARLIER_RUNTIME_KEYS if key in values]
    if earlier:
        log.debug("%s: ignoring the run-time settings %s an earlier version kept in %s", path, earlier, MODEL_JSON)
    return config_from_dict({key: value for key, value in values.items() if key not in EARLIER_RUNTIME_KEYS})


def tokenizer_of(path: str | Path) -> Path | None:
    """The tokenizer.model saved with checkpoint `path`, if any."""
    tokenizer = resolve(path) / TOKENIZER
    return tokenizer if tokenizer.is_file() else None


def load_model(path: str | Path, shardings: Any = None) -> tuple[LlamaConfig, Any, Path | None]:
    """(config, params, tokenizer path or None) of a checkpoint; params placed by `shardings` if given (else
    onto this process's first device, whatever topology saved them). A training step's weights are read from
    its state database, wherever it is, without its optimizer state."""
    path = resolve(path)
    config = read_config(path)
    database = state_location(path)
    if database is not None:
        tree = state_db.abstract_tree(database, PARAMS)
    else:
        checkpointer = ocp.StandardCheckpointer()
        meta = checkpointer.metadata(path / PARAMS)
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, tree)
    target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), tree, shardings)
    if database is not None:
        params = state_db.read(database, {PARAMS: target})[PARAMS]
    else:
        with checkpointer:
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

    `path` is a local folder (every host mounts it) or a bucket URI; `staging` is node-local scratch (the
    download of a step saved in the earlier staged layout).
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
        """(step, dir) of every complete step checkpoint, oldest first; partial ones are never listed."""
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
        """What a crash mid-save left (a step folder without state.json; an earlier version's temporary
        folders): never loaded, removed before training resumes."""
        partial = [under(self.checkpoints, name) for name in files.names_in(self.checkpoints)
                   if STEP_DIR.match(name) and not files.is_file(under(self.checkpoints, name, STATE_JSON))]
        for location in partial:
            files.remove_tree(location)
        if not self.in_bucket:
            partial += files.remove_temporaries(self.checkpoints, ".step_*.tmp*")
        return partial

    def prune(self, keep: int) -> None:
        """Keep the newest `keep` milestone steps, and the newest rolling save if it is newer than them all."""
        steps = [(step, path, bool(files.read_json(under(path, STATE_JSON)).get("rolling")))
                 for step, path in self.complete_checkpoints()]
        milestones = [step for step, _, rolling in steps if not rolling]
        newest = steps[-1][0] if steps else None
        kept = set(milestones[-keep:]) | ({newest} if newest is not None else set())
        for step, path, _ in steps:
            if step not in kept:
                files.remove_tree(path)

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


# ---------------------------------------------------------------------------- per-layer trees, stacked ones


def per_layer_arrays(arrays: list[state_db.HostArray]) -> list[state_db.HostArray]:
    """A scan run's stacked arrays (`.../layers/...`) as the per-layer ones every checkpoint holds
    (`.../layers_{i}/...`): views of the host copy, nothing copied. The layer axis is never sharded, so every
    chunk holds all layers."""
    out = []
    for array in arrays:
        parts = array.name.split("/")
        if STACKED not in parts:
            out.append(array)
            continue
        at = parts.index(STACKED)
        for i in range(array.shape[0]):
            out.append(state_db.HostArray("/".join([*parts[:at], layer_name(i), *parts[at + 1:]]), array.shape[1:],
                                          array.dtype, array.chunk_shape[1:],
                                          [(index[1:], data[i]) for index, data in array.chunks]))
    return out


def per_layer_target(target: Any) -> Any:
    """A restore target (ShapeDtypeStructs with shardings) in the run's layout as the checkpoint holds it: each
    stacked tree (a scan run's parameters, their Adam moments) as one tree per layer."""

    def one_layer(leaf: jax.ShapeDtypeStruct, _: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding.one_layer(leaf.sharding))

    return jax.tree.map(lambda node: unstack_layers(node, one_layer) if is_stacked(node) else node, target,
                        is_leaf=is_stacked)


def in_run_layout(loaded: Any, target: Any) -> Any:
    """Arrays read as `per_layer_target(target)`, stacked where `target` is, onto its shardings. Each tree's
    layers are freed once stacked, before the next is: the restore holds at most one tree twice."""

    def restack(node: Any, arrays: Any) -> Any:
        if not is_stacked(node):
            return arrays
        layers = {key: value for key, value in arrays.items() if key not in node}
        shardings = jax.tree.map(lambda leaf: leaf.sharding, node[STACKED])
        stacked = jax.jit(lambda trees: stack_layers(trees)[STACKED], out_shardings=shardings)(layers)
        for array in jax.tree.leaves(layers):
            array.delete()
        return {**{key: arrays[key] for key in node if key != STACKED}, STACKED: stacked}

    return jax.tree.map(restack, target, loaded, is_leaf=is_stacked)


# ------------------------------------------------------------------------------------------ saving a step


class CheckpointWriter:
    """Step checkpoints of a run, written while training goes on; every process of the run makes one.

    `save` blocks only while this process's shards are copied to host memory; writing them, the barrier that
    every process has written, the merge and state.json (process 0) run on a background thread. At most one
    save is in flight: the next `save` (or `wait`) waits for it first. The barriers go through the JAX
    distributed runtime's coordination service, not through the devices, so they never interleave with the
    training step's collectives.
    """

    def __init__(self, run: RunDir, config: LlamaConfig, tokenizer: str | Path | None, keep: int,
                 barrier_timeout_s: float = 600.0):
        self.run, self.config, self.tokenizer, self.keep = run, config, tokenizer, keep
        self.rank, self.processes = jax.process_index(), jax.process_count()
        self.barrier_timeout_ms = int(barrier_timeout_s * 1000)
        self.barrier = ocp.multihost.get_barrier_sync_fn()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.in_flight: tuple[int, Future] | None = None

    def save(self, state: dict, info: dict, rolling: bool = False) -> float:
        """Start saving `state` (its step: state['step']); returns the seconds this call blocked the loop."""
        started = time.perf_counter()
        self.wait()
        step = int(state["step"])
        arrays = per_layer_arrays(state_db.copy_to_host({PARAMS: state["params"], OPT_STATE: state["opt_state"]}))
        self.in_flight = (step, self.pool.submit(self._write, step, arrays, {"step": step, **info,
                                                                           "rolling": rolling}))
        return time.perf_counter() - started

    def wait(self) -> tuple[int, Path | str] | None:
        """(step, folder) of the save in flight once it is complete everywhere (None if none was); its error,
        if it failed."""
        if self.in_flight is None:
            return None
        step, future = self.in_flight
        self.in_flight = None
        return step, future.result()

    def close(self, wait: bool = True) -> None:
        """No more saves; `wait` for the background thread (a save in flight goes on either way)."""
        self.pool.shutdown(wait=wait)

    def _sync(self, name: str) -> None:
        self.barrier(key=f"openllama {self.run.path} {name}", timeout_ms=self.barrier_timeout_ms)

    def _write(self, step: int, arrays: list[state_db.HostArray], info: dict) -> Path | str:
        final = self.run.step_dir(step)  # never complete already: a run resumes from its newest complete step
        state_db.write_part(str(under(final, STATE)), arrays, self.rank)
        self._sync(f"checkpoint {step} written")
        if self.rank == 0:
            state_db.merge(str(under(final, STATE)), self.processes)
            write_metadata(final, self.config, self.tokenizer)
            files.write_text(under(final, STATE_JSON), json.dumps(info, indent=2))
            self.run.prune(self.keep)
        self._sync(f"checkpoint {step} committed")
        return final


def save_step(run: RunDir, state: dict, config: LlamaConfig, tokenizer: str | Path | None, info: dict,
              keep: int) -> Path | str:
    """Write the train state of `state['step']` and wait until it is complete on every process."""
    writer = CheckpointWriter(run, config, tokenizer, keep)
    writer.save(state, info)
    _, path = writer.wait()
    writer.close()
    return path


def restore_step(path: Path | str, abstract_state: dict, staging: Path | None = None) -> tuple[dict, dict]:
    """(train state in `abstract_state`'s layout and shardings, state.json) of a step checkpoint: this process
    reads only its own shards, from a local folder or a bucket alike.

    A step of the earlier layout (orbax's params/ and opt_state/) is read by orbax; one of those in a bucket
    is first downloaded into `staging`, this process's own folder, and removed after.
    """
    info = files.read_json(under(path, STATE_JSON))
    target = {PARAMS: abstract_state["params"], OPT_STATE: abstract_state["opt_state"]}
    state = in_run_layout(read_state(path, per_layer_target(target), staging), target)
    return {"params": state[PARAMS], "opt_state": state[OPT_STATE], "step": info["step"]}, info


def read_state(path: Path | str, target: dict, staging: Path | None) -> dict:
    """A step checkpoint's {params, opt_state} as `target` (the checkpoint's per-layer layout) places them."""
    database = state_location(path)
    if database is not None:
        return state_db.read(database, target)
    local = path
    if files.is_uri(path):
        log.warning("%s was saved in the staged layout of an earlier version; downloading it whole", path)
        staging = staging or DEFAULT_STAGING / f"process_{jax.process_index()}"
        local = staging / f"restore-{str(path).rsplit('/', 1)[-1]}"
        shutil.rmtree(local, ignore_errors=True)  # a copy a crashed restore left may be of another run's step
        local = download(str(path), local)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return {name: checkpointer.restore(Path(local) / name, target[name]) for name in (PARAMS, OPT_STATE)}
    finally:
        if local != path:
            shutil.rmtree(local, ignore_errors=True)
