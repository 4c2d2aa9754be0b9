"""Training's data path against the storage under it: rows/s and bytes read per row vs a sequential read.

Four measurements, in this process, on one dataset of production-size shards (2**26 tokens each by default):
  sequential  every shard read whole, front to back, in large reads: what the storage itself delivers, the
              physical limit for this reader
  bare ranged one-row ranged reads at random by the bare filesystem client, as many in flight as our reader
              keeps: the storage's own limit for random rows (on a bucket, its request latency)
  batches     `GlobalBatches.read` of B random rows per step (the loader's own pattern), on a cold reader
  one by one  `PackedDataset.read` of a single random row per call (latency rather than bandwidth)
each cold (the shards evicted from the page cache first, on local disk) and again warm. Bytes read per row come
from the reader's count of its ranged reads and, on local disk, from the kernel's count of this process's reads
(/proc/self/io). Then the loader's planning cost at RedPajama-1T's row counts (plan(0), plan(250_000)).

The dataset is written by the bench into a temporary folder and then into a bucket of an S3-protocol server it
starts on 127.0.0.1 (moto, from the test extra), or into `--root` (local or s3://, gs://) when that holds no
dataset yet; a `--root` holding a dataset is read as it is.

    .venv/bin/python bench/loader.py [--root DIR_OR_URI] [--shards 4] [--shard-tokens 67108864] [--batch 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pyarrow.fs as pafs

from openllama import files
from openllama.data.mixture import REDPAJAMA_TOKENS
from openllama.data.shards import READ_THREADS, PackedDataset, write_dataset
from openllama.train.loader import GlobalBatches

SUBSET = "common_crawl"
VOCAB = 32000  # OpenLLaMA's: uint16 tokens
CHUNK_ROWS = 4096
SEQUENTIAL_READ = 8 << 20


def write_synthetic(root: str, shards: int, shard_tokens: int, seq_len: int) -> None:
    """`shards` full shards of random tokens under `root`, streamed in chunks (never the whole corpus in memory)."""
    shard_rows = shard_tokens // seq_len
    total = shards * shard_rows
    rng = np.random.default_rng(0)

    def chunks():
        for start in range(0, total, CHUNK_ROWS):
            yield rng.integers(0, VOCAB, size=(min(CHUNK_ROWS, total - start), seq_len + 1), dtype=np.int32)

    write_dataset(root, {("train", SUBSET): chunks()}, seq_len=seq_len, vocab_size=VOCAB, shard_rows=shard_rows)


def shard_paths(dataset: PackedDataset) -> list[str]:
    return [f"{dataset.root}/{shard['path']}" for shard in dataset.manifest["shards"]]


def evict(dataset: PackedDataset) -> bool:
    """Drop the shards from the page cache, so the next read comes from the disk; False where it cannot."""
    if files.is_uri(dataset.root):
        return False
    for path in shard_paths(dataset):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)
    return True


def kernel_bytes_read() -> int | None:
    """rchar of /proc/self/io: bytes this process's read calls returned (None where there is no such file)."""
    try:
        lines = Path("/proc/self/io").read_text().splitlines()
    except OSError:
        return None
    return int(next(line for line in lines if line.startswith("rchar:")).split()[1])


def sequential(dataset: PackedDataset) -> tuple[float, int]:
    """(seconds, bytes) to read every shard whole, front to back, through the same filesystem layer."""
    total, started = 0, time.perf_counter()
    for path in shard_paths(dataset):
        fs, inner = files.filesystem(path)
        with fs.open_input_stream(inner) as stream:
            while data := stream.read(SEQUENTIAL_READ):
                total += len(data)
    return time.perf_counter() - started, total


def random_rows(root: str, split: str, batch: int, seconds: float, one_by_one: bool) -> dict:
    """Rows read at random by a fresh reader for about `seconds`: rows/s and bytes per row."""
    dataset = PackedDataset.open(root, split)
    kernel_before = kernel_bytes_read()
    rows, step, started = 0, 0, time.perf_counter()
    if one_by_one:
        rng = np.random.default_rng(1)
        total_rows = dataset.rows(SUBSET)
        while time.perf_counter() - started < seconds:
            dataset.read(SUBSET, rng.integers(0, total_rows, size=1))
            rows += 1
    else:
        batches = GlobalBatches(dataset, batch, seed=1, weights={SUBSET: 1.0})
        while time.perf_counter() - started < seconds:
            rows += len(batches.read(step))
            step += 1
    elapsed = time.perf_counter() - started
    kernel_after = kernel_bytes_read()
    return {"rows": rows, "seconds": elapsed, "rows_per_s": rows / elapsed, "bytes_per_row": dataset.bytes_read / rows,
            "kernel_bytes_per_row": None if kernel_before is None else (kernel_after - kernel_before) / rows,
            "row_bytes": dataset.layout.token_bytes}


class RedPajamaRows:
    """RedPajama-1T's row counts at seq_len 2048, no tokens behind them: what planning alone costs."""

    seq_len = 2048

    @property
    def subsets(self) -> list[str]:
        return sorted(REDPAJAMA_TOKENS)

    def rows(self, subset: str) -> int:
        return REDPAJAMA_TOKENS[subset] // 2048

    def read(self, subset: str, indices: np.ndarray) -> np.ndarray:
        raise NotImplementedError("planning only")


def planning() -> None:
    process = psutil.Process()
    for step in (0, 250_000):
        resident = process.memory_info().rss
        tracemalloc.start()
        GlobalBatches(RedPajamaRows(), 2048, seed=0, weights=None).plan(step)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        grown = process.memory_info().rss - resident
        timings = []
        for _ in range(20):
            started = time.perf_counter()
            GlobalBatches(RedPajamaRows(), 2048, seed=0, weights=None).plan(step)
            timings.append(time.perf_counter() - started)
        print(f"  plan({step:>7,}) fresh loader, B=2048: median {np.median(timings) * 1e3:6.2f} ms, "
              f"max {max(timings) * 1e3:6.2f} ms; traced peak {peak / 2**20:.2f} MiB, "
              f"RSS growth {grown / 2**20:.1f} MiB")


def report(name: str, result: dict, sequential_bps: float, ranged_rows_per_s: float) -> None:
    row_bytes = result["row_bytes"]
    throughput = result["rows_per_s"] * row_bytes
    kernel = result["kernel_bytes_per_row"]
    kernel_text = f", kernel {kernel:,.0f} ({kernel / row_bytes:.4f}x)" if kernel is not None else ""
    print(f"  {name:<22} {result['rows_per_s']:>10,.0f} rows/s = {throughput / 2**20:8.1f} MiB/s of rows "
          f"({throughput / sequential_bps:6.3f}x sequential, {result['rows_per_s'] / ranged_rows_per_s:5.2f}x bare "
          f"ranged reads); bytes read per {row_bytes}-byte row: reader "
          f"{result['bytes_per_row']:,.0f} ({result['bytes_per_row'] / row_bytes:.4f}x){kernel_text}")


def bare_ranged_reads(dataset: PackedDataset, seconds: float) -> float:
    """Rows/s of one-row ranged reads at random offsets by the bare filesystem client, READ_THREADS in flight:
    the store's own limit for random rows, without our reader's planning, checksums or decoding."""
    shards = shard_paths(dataset)
    handles = [files.open_input(path) for path in shards]
    record = dataset.layout.record_bytes
    rows = [shard["rows"] for shard in dataset.manifest["shards"] if shard["split"] == "train"]
    rng = np.random.default_rng(2)
    done, started = 0, time.perf_counter()
    with ThreadPoolExecutor(READ_THREADS) as pool:
        while time.perf_counter() - started < seconds:
            picks = rng.integers(0, len(handles), size=READ_THREADS * 4)
            offsets = [int(rng.integers(0, rows[i])) * record for i in picks]
            list(pool.map(lambda pick: handles[pick[0]].read_at(record, pick[1]), zip(picks, offsets, strict=True)))
            done += len(picks)
    return done / (time.perf_counter() - started)


def measure(root: str, args: argparse.Namespace, shards: int) -> None:
    """Every measurement on the dataset at `root`, written there first when it holds none."""
    fs, inner = files.filesystem(f"{root.rstrip('/')}/manifest.json")
    if fs.get_file_info(inner).type != pafs.FileType.File:
        started = time.perf_counter()
        write_synthetic(root, shards, args.shard_tokens, args.seq_len)
        print(f"wrote {shards} shards of {args.shard_tokens:,} tokens to {root} "
              f"in {time.perf_counter() - started:.1f} s")
    dataset = PackedDataset.open(root, "train")
    size = sum(shard["bytes"] for shard in dataset.manifest["shards"])
    print(f"dataset: {len(dataset.manifest['shards'])} shards, {dataset.rows(SUBSET):,} rows of "
          f"{dataset.layout.width} {dataset.layout.dtype.name} tokens ({dataset.layout.record_bytes} bytes a "
          f"record), {size / 2**20:,.0f} MiB; batch {args.batch} rows per step")
    for cache in ("cold", "warm"):
        cold = cache == "cold" and evict(dataset)
        if cache == "cold" and not cold:
            print("cold: the page cache cannot be dropped for this root; every pass reads from the store")
        seconds, total = sequential(dataset)
        sequential_bps = total / seconds
        if cache == "cold":
            evict(dataset)
        ranged = bare_ranged_reads(dataset, args.seconds / 2)
        print(f"{cache}: sequential read {total / 2**20:,.0f} MiB in {seconds:.2f} s = "
              f"{sequential_bps / 2**20:,.1f} MiB/s; bare ranged reads of one row, {READ_THREADS} in flight: "
              f"{ranged:,.0f} rows/s")
        for name, one_by_one in (("batches", False), ("one row per read", True)):
            if cache == "cold":
                evict(dataset)
            report(name, random_rows(root, "train", args.batch, args.seconds, one_by_one), sequential_bps, ranged)


def loopback_s3(scratch: str):
    """A moto S3 server on 127.0.0.1 (the test extra's), with this process's AWS settings pointing at it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    try:
        from object_store import start_s3_server
    except ImportError as error:
        print(f"s3: skipped ({error}; install the test extra for moto)")
        return None
    server = start_s3_server(Path(scratch), owner_pid=os.getpid())
    os.environ.update(server.env)
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="dataset folder or URI (default: a temporary folder, then a loopback S3 bucket)")
    parser.add_argument("--shards", type=int, default=4, help="shards to write when the root holds no dataset")
    parser.add_argument("--s3-shards", type=int, default=2, help="shards to write into the loopback S3 server")
    parser.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard written")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32, help="rows per loader step (one host's share)")
    parser.add_argument("--seconds", type=float, default=5.0, help="time spent on each random-row measurement")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-loader-", dir=os.environ.get("TMPDIR")) as scratch:
        if args.root:
            measure(args.root, args, args.shards)
        else:
            print("== local disk")
            measure(f"{scratch}/dataset", args, args.shards)
            server = loopback_s3(scratch)
            if server is not None:
                try:
                    print(f"== S3 protocol on loopback (moto at {server.endpoint})")
                    measure(f"s3://{server.new_bucket()}/dataset", args, args.s3_shards)
                finally:
                    server.stop()
    print("loader planning at RedPajama-1T scale (rows = tokens // 2048 per subset):")
    planning()


if __name__ == "__main__":
    main()
