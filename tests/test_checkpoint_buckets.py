"""A training run whose output_dir is a bucket, against a real S3-protocol server on 127.0.0.1 (moto): step
checkpoints written straight to the bucket, state.json written last, a run resumed from the bucket, a save
that did not finish never listed; and 2 JAX processes saving one sharded state, each writing and reading
only its own shards (counted at the server's side, through a relay per process), restored onto another
layout and another process count."""

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
        files.write_bytes(files.join(partial, "state", "ocdbt.process_0", "manifest.ocdbt"), b"half")
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
    assert sorted(p.name for p in local.iterdir()) == ["model.json", "state.json", "state_location"]  # no weights
    _, params, _ = load_model(local)
    assert_same_params(params, load_model(RunDir(config.run_dir).latest()[1])[1])
    assert RunDir.of_checkpoint(local).tracking_run_id() == run.tracking_run_id() is not None


def test_the_bucket_holds_each_step_with_state_json_and_the_run_records(resumed, s3_env):
    run: RunDir = resumed["run"]
    names = {location.removeprefix(run.path + "/") for location in files.files_under(run.path)}
    for step in ("step_00000005", "step_00000010"):
        for name in ("state.json", "model.json", "state/manifest.ocdbt"):
            assert f"checkpoints/{step}/{name}" in names, (step, name)
    assert files.read_json(files.join(run.step_dir(STEPS), "state.json"))["step"] == STEPS
    assert {"mlflow_run_id", "train_config.json"} <= names


def test_a_step_in_the_bucket_without_state_json_is_never_listed_and_is_removed_before_resume(resumed, s3_env):
    run: RunDir = resumed["run"]
    assert resumed["listed_with_partial"] == [5]
    assert f"removing partial checkpoint {run.step_dir(7)}" in resumed["stderr"]
    assert "step_00000007" not in files.names_in(run.checkpoints)


def test_no_checkpoint_byte_passes_through_local_staging(resumed):
    assert [p for p in resumed["staging"].rglob("*") if p.is_file() and "jax_cache" not in p.parts] == []


def test_a_missing_bucket_is_one_line_before_any_work(s3_env, base, capsys):
    from openllama.training import main

    assert main(["tiny-cpu", *base, "output_dir=s3://no-such-bucket-here/runs"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "openllama train: s3://no-such-bucket-here/runs: the bucket s3://no-such-bucket-here does not exist (or "
        "these credentials may not see it); create it or choose another location"]


# --- two processes, each reading and writing only its own shards ---------------------------------------------

# a state of a few MiB, sharded by rows over 2 processes as fsdp shards it: params and one Adam-like moment
SHAPES = {"params/embed": (512, 512), "params/w1": (1024, 256), "params/w2": (256, 1024), "opt_state/0/mu": (512, 512)}


def expected(name: str) -> np.ndarray:
    offset = sorted(SHAPES).index(name) * 1000.0
    return np.arange(np.prod(SHAPES[name]), dtype=np.float32).reshape(SHAPES[name]) + offset


def nested(values: dict[str, object]) -> dict:
    tree: dict = {}
    for name, value in values.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    tree["opt_state"] = (tree["opt_state"]["0"],)  # optax keeps its states in tuples
    return tree


def two_process_worker(action: str, process_id: int, coordinator: str, run_location: str, spec: str) -> None:
    """One of 2 JAX processes (1 CPU device each): save a state sharded by rows over both, or restore the
    newest one onto `spec` ("rows" or "cols") and print whether each local shard holds the values saved."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, 2, process_id)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2,), ("x",), devices=jax.devices())
    sharding = NamedSharding(mesh, {"rows": P("x"), "cols": P(None, "x")}[spec])
    run = RunDir(run_location)
    if action == "save":
        arrays = {name: jax.make_array_from_callback(SHAPES[name], sharding, lambda i, n=name: expected(n)[i])
                  for name in SHAPES}
        state = {**nested(arrays), "step": jax.device_put(np.int32(3), NamedSharding(mesh, P()))}
        save_step(run, state, LlamaConfig.preset("tiny"), None, {"seed": 0}, keep=2)
        share = sum(shard.data.nbytes for value in arrays.values() for shard in value.addressable_shards)
        print(json.dumps({"process": process_id, "share": share}), flush=True)
        return
    abstract = nested({name: jax.ShapeDtypeStruct(SHAPES[name], np.float32, sharding=sharding) for name in SHAPES})
    state, info = restore_step(run.latest()[1], abstract)
    restored = {"params/embed": state["params"]["embed"], "params/w1": state["params"]["w1"],
                "params/w2": state["params"]["w2"], "opt_state/0/mu": state["opt_state"][0]["mu"]}
    equal = all(np.array_equal(np.asarray(shard.data), expected(name)[shard.index])
                for name, value in restored.items() for shard in value.addressable_shards)
    share = sum(shard.data.nbytes for value in restored.values() for shard in value.addressable_shards)
    print(json.dumps({"process": process_id, "equal": equal, "step": info["step"], "share": share}), flush=True)


def two_processes(s3_server, action: str, run_location: str, spec: str, relays: list | None = None) -> list[dict]:
    """Run `two_process_worker` in 2 fresh processes, each reaching the S3 server through its own relay when
    `relays` are given; their last lines."""
    from openllama.services import free_port

    coordinator = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(2):
        endpoint = {"AWS_ENDPOINT_URL": relays[i].endpoint} if relays else {}
        env = harness.clean_env(**{**s3_server.env, **endpoint}, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO / "tests"))
        procs.append(harness.start([sys.executable, "-c", "import sys, test_checkpoint_buckets as t; "
                                    "t.two_process_worker(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])",
                                    action, str(i), coordinator, run_location, spec], env, cwd=REPO))
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


@pytest.fixture(scope="module")
def sharded_step(s3_server) -> dict:
    """A step saved by 2 processes into a bucket, then restored by 2 fresh processes onto the same layout, each
    through its own counting relay: what each one fetched from the server."""
    from object_store import CountingRelay

    location = f"s3://{s3_server.new_bucket()}/runs/two"
    saved = two_processes(s3_server, "save", location, "rows")
    relays = [CountingRelay(s3_server.endpoint) for _ in range(2)]
    try:
        restored = two_processes(s3_server, "restore", location, "rows", relays)
        fetched = [relay.response_bytes for relay in relays]
    finally:
        for relay in relays:
            relay.stop()
    return {"location": location, "saved": saved, "restored": restored, "fetched": fetched}


def test_each_process_restoring_from_the_bucket_fetches_only_its_share(sharded_step):
    shares = [result["share"] for result in sharded_step["restored"]]
    assert [result["equal"] for result in sharded_step["restored"]] == [True, True]
    assert shares == [result["share"] for result in sharded_step["saved"]]
    for fetched, share in zip(sharded_step["fetched"], shares, strict=True):
        assert share <= fetched <= 1.1 * share, (fetched, share)
    step_bytes = sum(np.prod(shape) * 4 for shape in SHAPES.values())
    assert sum(sharded_step["fetched"]) <= 1.1 * step_bytes  # about one copy of the step in all, not one each


def test_a_step_in_the_bucket_is_a_few_objects_per_process_whatever_the_number_of_arrays(sharded_step, s3_env):
    run = RunDir(sharded_step["location"])
    objects = [location.removeprefix(str(run.step_dir(3)) + "/") for location in files.files_under(run.step_dir(3))]
    per_process = {i: [o for o in objects if o.startswith(f"state/ocdbt.process_{i}/")] for i in range(2)}
    root = [o for o in objects if not o.startswith("state/ocdbt.process_")]
    # its manifest and one data file, for 4 arrays as for 400 (orbax's zarr made one object per shard of each)
    assert all(len(found) == 2 for found in per_process.values()), per_process
    assert sorted(o.split("/d/")[0] + ("/d" if "/d/" in o else "") for o in root) == [
        "model.json", "state.json", "state/d", "state/manifest.ocdbt"]


def test_a_bucket_step_restores_onto_another_layout_and_another_process_count(sharded_step, s3_server, s3_env):
    again = two_processes(s3_server, "restore", sharded_step["location"], "cols")
    assert [(r["equal"], r["step"]) for r in again] == [(True, 3), (True, 3)]
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # and by this one process alone
    abstract = nested({name: jax.ShapeDtypeStruct(SHAPES[name], np.float32, sharding=one) for name in SHAPES})
    state, _ = restore_step(RunDir(sharded_step["location"]).step_dir(3), abstract)
    np.testing.assert_array_equal(np.asarray(state["params"]["w1"]), expected("params/w1"))
    np.testing.assert_array_equal(np.asarray(state["opt_state"][0]["mu"]), expected("opt_state/0/mu"))


# --- steps of the earlier layout ------------------------------------------------------------------------------


def write_earlier_layout(step: Path, zarr: bool) -> None:
    """A step as the previous version saved it: orbax's params/ and opt_state/ (OCDBT locally; in a bucket,
    zarr staged by each process and uploaded), model.json, state.json."""
    import orbax.checkpoint as ocp

    options = {"multiprocessing_options": ocp.options.MultiprocessingOptions(primary_host=None),
               "use_ocdbt": False} if zarr else {}
    state = nested({name: expected(name) for name in SHAPES})
    with ocp.StandardCheckpointer(**options) as checkpointer:
        checkpointer.save(step / "params", state["params"])
        checkpointer.save(step / "opt_state", state["opt_state"])
    (step / "model.json").write_text(json.dumps({"hidden_size": 64}))
    (step / "state.json").write_text(json.dumps({"step": 3, "seed": 0}))


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_a_step_of_the_earlier_layout_still_restores(where, bucket, tmp_path, caplog):
    local = tmp_path / "run" / "checkpoints" / "step_00000003"
    write_earlier_layout(local, zarr=where == "bucket")
    step: Path | str = local
    if where == "bucket":
        step = f"{bucket}/run/checkpoints/step_00000003"
        files.copy_tree(local, step)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = nested({name: jax.ShapeDtypeStruct(SHAPES[name], np.float32, sharding=one) for name in SHAPES})
    with caplog.at_level("WARNING", logger="openllama.train"):
        state, info = restore_step(step, abstract, staging=tmp_path / "staging")
    assert info["step"] == 3
    np.testing.assert_array_equal(np.asarray(state["params"]["w2"]), expected("params/w2"))
    np.testing.assert_array_equal(np.asarray(state["opt_state"][0]["mu"]), expected("opt_state/0/mu"))
    assert ("earlier version" in caplog.text) == (where == "bucket")  # a download of the whole step, said so
