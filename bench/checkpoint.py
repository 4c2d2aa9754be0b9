"""Step checkpoints: how long a save blocks the training loop, how fast a restore is, what it fetches and how
many objects a step is, on local disk and on an S3-protocol server on loopback (moto, from the test extra).

One train state (parameters and two Adam moments, float32) of `--megabytes` in `--arrays` arrays, in this
one process. Each figure is the median of `--repeats` runs (alternated with its baseline) and its spread:

- save: the seconds `CheckpointWriter.save` blocks the loop (copying the state off the devices), against the
  whole save (until state.json is written), which is what a synchronous save would block for;
- restore: the seconds to restore the state onto its sharding, against a bare copy of the same step's
  objects with the same client (TensorStore's own kvstore driver, every object read whole into memory);
- fetched: the bytes the restore asked the store for (counted at the server's side, by a relay) against
  the state's own bytes;
- objects: the objects one step is made of.

    python bench/checkpoint.py [--megabytes 240] [--arrays 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import tensorstore as ts

from openllama import files
from openllama.train.checkpoint import CheckpointWriter, RunDir, restore_step
from openllama.train.model import LlamaConfig


def make_state(megabytes: int, arrays: int) -> dict:
    """params, mu and nu of `arrays` equal float32 matrices, `megabytes` in all."""
    elements = megabytes * 2**20 // 4 // 3 // arrays
    cols = 1024
    rows = max(1, elements // cols)
    rng = np.random.default_rng(0)

    def tree(offset: float) -> dict:
        return {f"layer_{i:03d}": jax.device_put(rng.standard_normal((rows, cols), dtype=np.float32) + offset)
                for i in range(arrays)}

    return {"params": tree(0.0), "opt_state": ({"mu": tree(1.0), "nu": tree(2.0)},),
            "step": jax.device_put(np.int32(1))}


def abstract(state: dict) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        {"params": state["params"], "opt_state": state["opt_state"]})


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f}, n={len(values)})"


def bare_copy(step: str) -> float:
    """Seconds to read every object of the step whole through TensorStore's kvstore driver."""
    started = time.perf_counter()
    store = ts.KvStore.open(files.kvstore_spec(step)).result()
    reads = [store.read(key) for key in store.list().result()]
    total = sum(len(read.result().value) for read in reads)
    assert total > 0
    return time.perf_counter() - started


def measure(root: str, state: dict, repeats: int, relay=None) -> None:
    nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves({"p": state["params"], "o": state["opt_state"]}))
    run = RunDir(f"{root}/run")
    writer = CheckpointWriter(run, LlamaConfig.preset("tiny"), None, keep=repeats + 1)
    blocked, whole, restores, copies, fetched = [], [], [], [], []
    for attempt in range(repeats):
        state["step"] = jax.device_put(np.int32(attempt + 1))
        started = time.perf_counter()
        blocked.append(writer.save(state, {"seed": 0}))
        step, path = writer.wait()
        whole.append(time.perf_counter() - started)
        # alternated: the bare copy, then the restore, of the same step
        copies.append(bare_copy(str(path) + "/state"))
        if relay is not None:
            relay.reset()
        started = time.perf_counter()
        restored, _ = restore_step(path, abstract(state))
        jax.block_until_ready(restored)
        restores.append(time.perf_counter() - started)
        if relay is not None:
            fetched.append(relay.response_bytes / nbytes)
    writer.close()
    objects = len(files.files_under(run.step_dir(repeats)))
    ratio = [b / w for b, w in zip(blocked, whole, strict=True)]
    speed = [c / r for c, r in zip(copies, restores, strict=True)]
    print(f"  state {nbytes / 2**20:,.0f} MiB in {len(jax.tree.leaves(state)) - 1} arrays")
    print(f"  save blocked the loop s: {spread(blocked)}; whole save s: {spread(whole)}")
    print(f"  blocked / whole save: {spread(ratio)}  (goal <= 0.10)")
    print(f"  restore s: {spread(restores)}; bare copy of the step s: {spread(copies)}")
    print(f"  restore speed / bare copy: {spread(speed)}  (goal >= 0.8)")
    if fetched:
        print(f"  fetched / state bytes: {spread(fetched)}  (goal <= 1.1)")
    print(f"  objects in one step: {objects}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=240, help="size of the whole train state")
    parser.add_argument("--arrays", type=int, default=48, help="arrays per tree (params, mu, nu)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    state = make_state(args.megabytes, args.arrays)
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs")
    if jax.devices()[0].platform == "cpu":
        print("(on CPU a shard's host copy is a view of its buffer: the blocked time is the loop's own overhead; "
              "on TPU and GPU it includes the device-to-host transfer)")
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-", dir=os.environ.get("TMPDIR")) as scratch:
        print("== local disk")
        measure(f"{scratch}/local", state, args.repeats)
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        try:
            from object_store import CountingRelay, start_s3_server
        except ImportError as error:
            print(f"s3: skipped ({error}; install the test extra for moto)")
            return
        server = start_s3_server(Path(scratch), owner_pid=os.getpid())
        relay = CountingRelay(server.endpoint)
        try:
            os.environ.update(server.env, AWS_ENDPOINT_URL=relay.endpoint)
            print(f"== S3 protocol on loopback (moto at {server.endpoint}, through a counting relay)")
            measure(f"s3://{server.new_bucket()}", state, args.repeats, relay)
        finally:
            relay.stop()
            server.stop()


if __name__ == "__main__":
    main()
