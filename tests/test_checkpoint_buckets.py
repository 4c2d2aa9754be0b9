"""A training run whose output_dir is a bucket, against a real S3-protocol server on 127.0.0.1 (moto): step
checkpoints staged on each process's own disk and uploaded, state.json written last, a run resumed from the
bucket, a save that did not finish never listed, and 2 JAX processes with separate staging folders (as on
hosts with disks of their own) saving one sharded state and restoring it onto another layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import harness
from openllama import files
from openllama.data.shards import write_dataset
from openllama.train.checkpoint import RunDir, fetch_model, load_model, restore_step, save_step, staging_mirror
from openllama.train.config import TrainConfig, load_config
from openllama.train.model import LlamaConfig
from openllama.train.trainer import Hook, Trainer

REPO = Path(__file__).resolve().parents[1]
OPENLLAMA = str(Path(sys.executable).parent / "openllama")
SEQ_LEN = 16
STEPS = 10
SHAPE = (8, 6)  # the sharded array of the two-process test: 4 rows on each process


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Random tokens packed as `openllama data tokenize` packs them (no tokenizer needed)."""
    root = tmp_path_factory.mktemp("packed")
    rows = np.random.default_rng(0).integers(2, 512, size=(64, SEQ_LEN + 1))
    write_dataset(str(root), {("train", "c4"): rows, ("validation", "c4"): rows[:8]}, seq_len=SEQ_LEN,
                  vocab_size=512)
    return root


@pytest.fixture(scope="module")
def base(dataset, tmp_path_factory) -> list[str]:
    """A 10-step schedule whose learning rate does not depend on train.steps, so a run stopped at step 5 and
    rerun to step 10 takes the same updates as one run to step 10."""
    return [*harness.short_run(dataset, SEQ_LEN, STEPS, tmp_path_factory.mktemp("jax_cache")),
            f"optimizer.decay_steps={STEPS}", "tracking.enabled=false"]


class Losses(Hook):
    def __init__(self):
        self.by_step: dict[int, float] = {}

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        self.by_step[step] = metrics["loss"]


def fit(config: TrainConfig) -> dict[int, float]:
    losses = Losses()
    Trainer(config, [losses]).fit()
    return losses.by_step


@pytest.fixture(scope="module")
def uninterrupted(base, tmp_path_factory) -> tuple[dict[int, float], TrainConfig]:
    """The reference: the same 10 steps in one go, in a local output_dir."""
    config = load_config("tiny-cpu", [*base, f"output_dir={tmp_path_factory.mktemp('local')}"])
    return fit(config), config


def assert_same_params(a, b, atol: float = 1e-5) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def resumed(s3_server, base, tmp_path_factory) -> dict:
    """Steps 1-5 in this process into a bucket; then a save of step 7 that crashed mid-upload (a step folder
    without state.json) planted; then `openllama train` to step 10 under Ray Train, resuming from the bucket."""
    bucket = f"s3://{s3_server.new_bucket()}"
    scratch = tmp_path_factory.mktemp("resumed")
    overrides = [*base, f"output_dir={bucket}/runs", f"checkpoint.staging_dir={scratch / 'staging'}"]
    run = RunDir(f"{bucket}/runs/tiny-cpu")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3_server.env.items():
            patch.setenv(key, value)
        first = fit(load_config("tiny-cpu", [*overrides, "train.steps=5"]))
        partial = run.step_dir(7)
        files.write_bytes(files.join(partial, "params", "_METADATA"), b"{}")
        files.write_bytes(files.join(partial, "model.json"), b"{}")
        listed_with_partial = [step for step, _ in run.complete_checkpoints()]
    tracked = ["tracking.enabled=true", f"tracking.uri=sqlite:///{scratch}/mlruns.db"]
    done = harness.run([OPENLLAMA, "train", "tiny-cpu", *overrides, *tracked], harness.clean_env(**s3_server.env),
                       timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return {"run": run, "first": first, "listed_with_partial": listed_with_partial, "stderr": done.stderr,
            "staging": scratch / "staging"}


def test_a_bucket_run_stopped_after_a_checkpoint_resumes_to_the_uninterrupted_run(resumed, uninterrupted, s3_env,
                                                                                  tmp_path):
    run: RunDir = resumed["run"]
    assert f"resuming from {run.step_dir(5)} (step 5)" in resumed["stderr"]
    assert [step for step, _ in run.complete_checkpoints()] == [5, STEPS]
    losses, config = uninterrupted
    assert resumed["first"] == pytest.approx({s: losses[s] for s in range(1, 6)}, abs=1e-5)
    local = fetch_model(run.path, staging=tmp_path)  # what eval, export-hf and generate do
    assert local == staging_mirror(run.step_dir(STEPS), tmp_path)
    _, params, _ = load_model(local)
    assert_same_params(params, load_model(RunDir(config.run_dir).latest()[1])[1])
    assert RunDir.of_checkpoint(local).tracking_run_id() == run.tracking_run_id() is not None


def test_the_bucket_holds_each_step_with_state_json_and_the_run_records(resumed, s3_env):
    run: RunDir = resumed["run"]
    names = {location.removeprefix(run.path + "/") for location in files.files_under(run.path)}
    for step in ("step_00000005", "step_00000010"):
        for name in ("state.json", "model.json", "params/_METADATA", "opt_state/_METADATA"):
            assert f"checkpoints/{step}/{name}" in names, (step, name)
    assert files.read_json(files.join(run.step_dir(STEPS), "state.json"))["step"] == STEPS
    assert {"mlflow_run_id", "train_config.json"} <= names


def test_a_step_in_the_bucket_without_state_json_is_never_listed_and_is_removed_before_resume(resumed, s3_env):
    run: RunDir = resumed["run"]
    assert resumed["listed_with_partial"] == [5]
    assert f"removing partial checkpoint {run.step_dir(7)}" in resumed["stderr"]
    assert "step_00000007" not in files.names_in(run.checkpoints)


def test_nothing_is_left_in_staging_once_the_run_is_done(resumed):
    assert [p for p in resumed["staging"].rglob("*") if p.is_file()] == []


def test_a_missing_bucket_is_one_line_before_any_work(s3_env, base, capsys):
    from openllama.train.launch import main

    assert main(["tiny-cpu", *base, "output_dir=s3://no-such-bucket-here/runs"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "openllama train: s3://no-such-bucket-here/runs: the bucket s3://no-such-bucket-here does not exist (or "
        "these credentials may not see it); create it or choose another location"]


# --- two processes, two staging folders -------------------------------------------------------------------


def expected(name: str) -> np.ndarray:
    offset = {"w": 0.0, "mu": 100.0}[name]
    return np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + offset


def two_process_worker(action: str, process_id: int, coordinator: str, run_location: str, staging: str,
                       spec: str) -> None:
    """One of 2 JAX processes (1 CPU device each): save a state sharded over both, or restore the newest one
    onto `spec` ("rows" or "cols") and print whether each local shard holds the values saved."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, 2, process_id)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2,), ("x",), devices=jax.devices())
    sharding = NamedSharding(mesh, {"rows": P("x"), "cols": P(None, "x")}[spec])
    scalar = NamedSharding(mesh, P())
    run = RunDir(run_location, staging=Path(staging))
    if action == "save":
        def array(name):
            return jax.make_array_from_callback(SHAPE, sharding, lambda index: expected(name)[index])
        state = {"params": {"w": array("w")}, "opt_state": {"mu": array("mu")},
                 "step": jax.device_put(np.int32(3), scalar)}
        save_step(run, state, LlamaConfig.preset("tiny"), None, {"seed": 0}, keep=2)
        left = [str(p) for p in Path(staging).rglob("*") if p.is_file()]
        print(json.dumps({"process": process_id, "staging_files_left": left}), flush=True)
        return
    abstract = {"params": {"w": jax.ShapeDtypeStruct(SHAPE, np.float32, sharding=sharding)},
                "opt_state": {"mu": jax.ShapeDtypeStruct(SHAPE, np.float32, sharding=sharding)}}
    state, info = restore_step(run.latest()[1], abstract, staging=run.process_staging())
    equal = all(np.array_equal(np.asarray(shard.data), expected(name)[shard.index])
                for name, value in (("w", state["params"]["w"]), ("mu", state["opt_state"]["mu"]))
                for shard in value.addressable_shards)
    print(json.dumps({"process": process_id, "equal": equal, "step": info["step"],
                      "shards": len(state["params"]["w"].addressable_shards)}), flush=True)


def two_processes(s3_server, action: str, run_location: str, stagings: list[Path], spec: str) -> list[dict]:
    """Run `two_process_worker` in 2 fresh processes, the S3 settings in their environment; their last lines."""
    from openllama.services import free_port

    coordinator = f"127.0.0.1:{free_port()}"
    env = harness.clean_env(**s3_server.env, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO / "tests"))
    procs = [harness.start([sys.executable, "-c", "import sys, test_checkpoint_buckets as t; "
                            "t.two_process_worker(*sys.argv[1:2], int(sys.argv[2]), *sys.argv[3:])",
                            action, str(i), coordinator, run_location, str(stagings[i]), spec], env, cwd=REPO)
             for i in range(2)]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-4000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                harness.kill_group(proc)
    return results


def test_two_processes_with_separate_staging_save_one_checkpoint_restored_onto_another_layout(s3_server, bucket,
                                                                                            tmp_path):
    run_location = f"{bucket}/runs/two"
    saved = two_processes(s3_server, "save", run_location, [tmp_path / "host0", tmp_path / "host1"], "rows")
    assert [result["staging_files_left"] for result in saved] == [[], []]
    run = RunDir(run_location)
    assert [step for step, _ in run.complete_checkpoints()] == [3]
    chunks = files.names_in(files.join(run.step_dir(3), "params", "w"))
    assert {"0.0", "1.0"} <= set(chunks)  # process 0's rows and process 1's rows, each uploaded by its writer
    restored = two_processes(s3_server, "restore", run_location, [tmp_path / "again0", tmp_path / "again1"],
                             "cols")
    assert restored == [{"process": i, "equal": True, "step": 3, "shards": 1} for i in range(2)]
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"params": {"w": jax.ShapeDtypeStruct(SHAPE, np.float32, sharding=one)},
                "opt_state": {"mu": jax.ShapeDtypeStruct(SHAPE, np.float32, sharding=one)}}
    state, _ = restore_step(run.step_dir(3), abstract, staging=tmp_path / "here")
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), expected("w"))
    np.testing.assert_array_equal(np.asarray(state["opt_state"]["mu"]), expected("mu"))
    assert not any((tmp_path / "here").rglob("*.zarray"))  # the download is removed once restored
