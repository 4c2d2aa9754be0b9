"""`openllama data dedup` against datatrove's MinHash dedup, on one corpus with planted near-duplicates.

    .venv/bin/pip install -e '.[bench]'       # datatrove
    .venv/bin/python bench/dedup.py [--docs 20000] [--workers 2]

The corpus: documents made of random sentences of the shipped sample (so unrelated documents share little),
spread over files of several subsets, plus one copy per planted original, edited (words replaced at random)
until the Jaccard similarity of the two documents' character 13-gram sets (SlimPajama's normalization) is near
each level from 0.5 to 0.95; each copy sits in another subset's file than its original. A pair counts as found
when either of its documents is removed. Both tools run in this process's cores: ours on an in-process Ray with
`--workers` CPUs, datatrove's LocalPipelineExecutor with `--workers` workers; peak memory is the largest summed
RSS of the process tree, sampled every 0.1 s.

datatrove runs with its defaults (word 5-grams, 14 buckets of 8 hashes, no verification) but for its hash
function, sha1 instead of xxhash (see run_datatrove): it measures another similarity than the planted one, which
is part of what the recall figures compare.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path

import psutil

from openllama.data import clean, minhash

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "redpajama"
LEVELS = (0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
FILES = ("c4/c4-train.00000-of-01024.jsonl", "c4/c4-train.00001-of-01024.jsonl", "wikipedia/wiki.jsonl",
         "arxiv/arxiv_0.jsonl", "arxiv/arxiv_1.jsonl", "book/book.jsonl", "stackexchange/stackexchange.jsonl",
         "common_crawl/2019-30/en_head_0000.jsonl")


def grams(text: str) -> set[str]:
    t = minhash.fuzzy_normalize(text)
    return {t[i : i + minhash.NGRAM] for i in range(max(1, len(t) - minhash.NGRAM + 1))}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b)


def edited_copy(text: str, target: float, rng: random.Random) -> tuple[str, float]:
    """`text` with as many random words replaced as brings the 13-gram Jaccard closest to `target`."""
    words = text.split(" ")
    order = rng.sample(range(len(words)), len(words))
    original = grams(text)

    def with_edits(k: int) -> tuple[str, float]:
        changed = list(words)
        for i in order[:k]:
            changed[i] = f"{rng.choice('bcdfghjklmnpqrstvwxz')}{rng.randrange(10**6)}"
        copy = " ".join(changed)
        return copy, jaccard(original, grams(copy))

    low, high = 0, len(words)
    while low < high:  # the smallest k whose similarity is at or below the target
        middle = (low + high) // 2
        if with_edits(middle)[1] > target:
            low = middle + 1
        else:
            high = middle
    return with_edits(low)


def build_corpus(root: Path, docs: int, seed: int) -> list[dict]:
    """Write the corpus; returns the planted pairs (ids of original and copy, and their true Jaccard).

    Sentences of 5-60 words only, so that no document is one long sentence (code, a table) drawn twice.
    """
    rng = random.Random(seed)
    sentences = [s.strip() + "." for path in sorted(SAMPLE.glob("*.jsonl")) for line in open(path, encoding="utf-8")
                 for s in json.loads(line)["text"].replace("\n", " ").split(". ") if 5 <= len(s.split()) <= 60]
    bodies = []
    for _ in range(docs):
        body: list[str] = []
        while sum(map(len, body)) < 1500:
            body.append(rng.choice(sentences))
        bodies.append(" ".join(body))
    per_file: dict[str, list[str]] = {name: [] for name in FILES}
    where = []
    for i, body in enumerate(bodies):
        name = FILES[i % len(FILES)]
        per_file[name].append(body)
        where.append((name, len(per_file[name])))
    pairs = []
    per_level = max(1, docs // 40 // len(LEVELS))
    for n, level in enumerate(lvl for lvl in LEVELS for _ in range(per_level)):
        original = n * 7 % docs
        copy, similarity = edited_copy(bodies[original], level, rng)
        name = FILES[(FILES.index(where[original][0]) + 3) % len(FILES)]
        per_file[name].append(copy)
        pairs.append({"original": f"{where[original][0]}:{where[original][1]}", "copy": f"{name}:{len(per_file[name])}",
                      "level": level, "jaccard": similarity})
    for name, texts in per_file.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": t, "id": f"{name}:{i}", "meta": {}}) + "\n"
                                for i, t in enumerate(texts, start=1)))
    return pairs


class PeakMemory:
    """The largest summed RSS of this process and its descendants while the block runs."""

    def __enter__(self) -> PeakMemory:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_ours(corpus: Path, out: Path, workers: int) -> tuple[set[str], float, int]:
    """Removed ids, seconds and peak bytes of `openllama data dedup` (decontamination off: datatrove has none)."""
    import ray  # started here with `workers` CPUs, so both tools get the same cores

    started = time.perf_counter()
    with PeakMemory() as memory:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        clean.run_dedup(clean.DedupConfig(inputs=[str(corpus)], out=str(out), track=False))
        ray.shutdown()
    seconds = time.perf_counter() - started
    import pyarrow.parquet as pq  # only after the timing: reading the result is not part of the run

    rows = pq.read_table(out / "duplicates").to_pylist()
    return {f"{str(Path(r['source']).relative_to(corpus))}:{r['line']}" for r in rows}, seconds, memory.peak


def run_datatrove(corpus: Path, work: Path, workers: int) -> tuple[set[str], float, int]:
    """Removed ids, seconds and peak bytes of datatrove's four MinHash stages with its default settings."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    # its default hash, xxhash, fails on str under xxhash>=4 (installed here); sha1 is its other choice
    config = MinhashConfig(hash_config=HashConfig(hash_fc="sha1"))
    tasks = len(FILES)

    def reader() -> JsonlReader:
        return JsonlReader(str(corpus), glob_pattern="**/*.jsonl", id_key="id")

    stages = [
        ([reader(), MinhashDedupSignature(output_folder=str(work / "sigs"), config=config)], tasks),
        ([MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"), config=config)],
         config.num_buckets),
        ([MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"), config=config)],
         1),
        ([reader(), MinhashDedupFilter(input_folder=str(work / "remove"),
                                       exclusion_writer=JsonlWriter(str(work / "removed"))),
          JsonlWriter(str(work / "kept"))], tasks),
    ]
    started = time.perf_counter()
    with PeakMemory() as memory:
        previous = None
        for n, (pipeline, count) in enumerate(stages):
            previous = LocalPipelineExecutor(pipeline, tasks=count, workers=workers, depends=previous,
                                             logging_dir=str(work / f"logs{n}"))
        previous.run()
    seconds = time.perf_counter() - started
    removed = set()
    for path in (work / "removed").rglob("*.gz"):
        with gzip.open(path, "rt") as f:
            removed |= {json.loads(line)["id"] for line in f}
    return removed, seconds, memory.peak


def scores(pairs: list[dict], removed: set[str], docs: int) -> dict[str, float]:
    """Recall at Jaccard >= 0.85, the share of pairs under 0.7 merged, and of other documents removed."""
    found = [p for p in pairs if p["copy"] in removed or p["original"] in removed]
    high = [p for p in pairs if p["jaccard"] >= 0.85]
    low = [p for p in pairs if p["jaccard"] < 0.7]
    planted = {p["copy"] for p in pairs} | {p["original"] for p in pairs}
    return {
        "recall_at_0.85": sum(p in found for p in high) / max(1, len(high)),
        "fpr_below_0.7": sum(p in found for p in low) / max(1, len(low)),
        "other_removed": len(removed - planted) / docs,
        **{f"found_at_{level}": sum(p in found for p in pairs if p["level"] == level)
           / max(1, sum(p["level"] == level for p in pairs)) for level in LEVELS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20000, help="unrelated documents (planted copies: docs/40)")
    parser.add_argument("--workers", type=int, default=2, help="CPUs for each tool")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print("S-curve of the presets (threshold 0.8; p_removed: candidate and verified)")
    for name, preset in minhash.PRESETS.items():
        print(f"  {name}: {preset.num_perm} permutations, {preset.bands} bands x {preset.rows} rows")
        for row in minhash.s_curve_table(preset, 0.8):
            print(f"    J={row['jaccard']:.2f}  P(candidate)={row['p_candidate']:.4f}  "
                  f"P(removed)={row['p_removed']:.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pairs = build_corpus(root / "corpus", args.docs, args.seed)
        total = args.docs + len(pairs)
        print(f"\ncorpus: {total:,} documents ({args.docs:,} unrelated, {len(pairs)} planted pairs), "
              f"{sum(p.stat().st_size for p in (root / 'corpus').rglob('*.jsonl')) / 1e6:.1f} MB, "
              f"{args.workers} CPUs of {os.cpu_count()}")
        results = {"openllama": run_ours(root / "corpus", root / "ours", args.workers),
                   "datatrove": run_datatrove(root / "corpus", root / "datatrove", args.workers)}
    print(f"\n{'':<28}{'openllama':>12}{'datatrove':>12}{'ratio':>8}")
    measured = {name: {**scores(pairs, removed, args.docs), "docs_per_s": total / seconds,
                       "seconds": seconds, "peak_memory_mb": peak / 2**20}
                for name, (removed, seconds, peak) in results.items()}
    for key in measured["openllama"]:
        ours, theirs = measured["openllama"][key], measured["datatrove"][key]
        ratio = f"{ours / theirs:.2f}x" if theirs else "-"
        print(f"{key:<28}{ours:>12.4g}{theirs:>12.4g}{ratio:>8}")
    print(f"\ntargets: recall_at_0.85 >= 0.95, fpr_below_0.7 <= 0.01, docs_per_s ratio >= 1.0 "
          f"(ours: {measured['openllama']['recall_at_0.85']:.3f}, {measured['openllama']['fpr_below_0.7']:.3f}, "
          f"{measured['openllama']['docs_per_s'] / measured['datatrove']['docs_per_s']:.2f}x)")


if __name__ == "__main__":
    main()
