"""Memory of dedup's connected components against the partition count, on a near-duplicate graph of corpus shape.

    .venv/bin/python bench/dedup_components.py [--docs 1000000] [--partitions 1 8 32]

The graph: `--docs` document ids spread over 1,000 input files, half of them in near-duplicate clusters (as
SlimPajama found in RedPajama) of geometric sizes (mean 3) plus one boilerplate cluster of 10,000, each cluster
linked as LSH would link it (a random tree plus as many random extra pairs). For each partition count, a child
process publishes the graph as the match stage would, and another runs every star round of `openllama.data.dedup`,
one task after another, and reports the most arcs one task held and its own peak RSS. The baseline is 1
partition: the whole graph in one task, which is what an in-driver union-find or label propagation holds. Ratios
below 1 are the memory a partition count saves.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def near_duplicate_graph(docs: int, seed: int) -> np.ndarray:
    """Edges (a, b) of clusters covering half of `docs` documents; ids as dedup's scan makes them."""
    rng = np.random.default_rng(seed)
    ids = np.unique((rng.integers(0, 1000, docs).astype(np.int64) << 32) + rng.integers(0, 1 << 24, docs))
    rng.shuffle(ids)
    sizes = rng.geometric(1 / 2, len(ids) // 4) + 1  # mean 3
    sizes = np.concatenate([[10_000], sizes[: np.searchsorted(np.cumsum(sizes), len(ids) // 2)]])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    cluster_start, cluster_size = np.repeat(starts, sizes - 1), np.repeat(sizes, sizes - 1)
    rank = np.arange(len(cluster_start)) - np.repeat(starts - np.arange(len(sizes)), sizes - 1) + 1  # 1..size-1
    child = cluster_start + rank
    parent = cluster_start + (rng.random(len(rank)) * rank).astype(np.int64)  # a random tree
    extra = cluster_start[:, None] + (rng.random((len(rank), 2)) * cluster_size[:, None]).astype(np.int64)
    extra = extra[extra[:, 0] != extra[:, 1]]
    return np.concatenate([np.stack([ids[child], ids[parent]], axis=1), ids[extra]])


def peak_rss_mib() -> float:
    """This process's peak RSS since its exec (VmHWM; getrusage's maxrss keeps the forking parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def publish(edges_path: str, work: str, partitions: int) -> None:
    """The graph as the match stage leaves it: arcs in the partition of their first node (in its own child: in
    the product each match task publishes its own partition's edges)."""
    from openllama.data import dedup

    edges = np.load(edges_path)
    dedup.publish_edges(f"{work}/components/000", "edges", edges[:, 0], edges[:, 1], partitions)


def run_rounds(work: str, partitions: int) -> dict:
    """In this (child) process: every star round, each partition's task in turn, as the Ray stage runs them."""
    from openllama.data import dedup

    started = time.perf_counter()
    round_, largest = 0, 0
    while True:
        results = [dedup.star_round(round_, p, work, partitions) for p in range(partitions)]
        largest = max(largest, *(r["arcs"] for r in results))
        if round_ % 2 == 0 and all(r["star"] for r in results):
            break
        round_ += 1
    seconds = time.perf_counter() - started
    peak_mib = peak_rss_mib()
    return {"partitions": partitions, "rounds": round_ + 1, "largest_task_arcs": largest,
            "peak_rss_mib": peak_mib, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--publish", nargs=3, metavar=("EDGES", "WORK", "PARTITIONS"), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", nargs=2, metavar=("WORK", "PARTITIONS"), help=argparse.SUPPRESS)
    parser.add_argument("--idle", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.idle:
        from openllama.data import dedup  # noqa: F401  (what a rounds child imports)

        print(peak_rss_mib())
        return
    if args.publish:
        publish(args.publish[0], args.publish[1], int(args.publish[2]))
        return
    if args.rounds:
        print(json.dumps(run_rounds(args.rounds[0], int(args.rounds[1]))))
        return
    edges = near_duplicate_graph(args.docs, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        edges_path = str(Path(folder) / "edges.npy")
        np.save(edges_path, edges)
        # the child's baseline: Python, numpy and pyarrow imported, nothing held
        idle = subprocess.run([sys.executable, __file__, "--idle"], check=True, capture_output=True, text=True)
        baseline_mib = float(idle.stdout)
        rows = []
        for partitions in [1, *(p for p in args.partitions if p != 1)]:
            work = str(Path(folder) / f"work-{partitions}")
            subprocess.run([sys.executable, __file__, "--publish", edges_path, work, str(partitions)], check=True)
            child = subprocess.run([sys.executable, __file__, "--rounds", work, str(partitions)], check=True,
                                   capture_output=True, text=True)
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(f"graph: {args.docs:,} documents, {len(edges):,} near-duplicate edges; a child process with nothing "
          f"held peaks at {baseline_mib:.0f} MiB")
    print(f"{'partitions':>10}{'rounds':>8}{'largest task arcs':>19}{'ratio':>7}{'peak RSS MiB':>14}"
          f"{'above idle':>12}{'ratio':>7}{'seconds':>9}")
    whole = rows[0]
    for row in rows:
        above = row["peak_rss_mib"] - baseline_mib
        print(f"{row['partitions']:>10}{row['rounds']:>8}{row['largest_task_arcs']:>19,}"
              f"{row['largest_task_arcs'] / whole['largest_task_arcs']:>7.3f}{row['peak_rss_mib']:>14.0f}"
              f"{above:>12.0f}{above / (whole['peak_rss_mib'] - baseline_mib):>7.3f}{row['seconds']:>9.1f}")
    print("ratio: against 1 partition (the whole graph in one task); the floor is the largest cluster, whose "
          "edges all meet at its smallest document")


if __name__ == "__main__":
    main()
