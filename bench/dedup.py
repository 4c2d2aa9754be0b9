"""`openllama data dedup` against datatrove's MinHash dedup: recall per Jaccard bin, on the same corpus and
the same similarity, in configurations both sides share.

    .venv/bin/pip install -e '.[bench]'       # datatrove, with the xxhash<4 its default hasher needs
    .venv/bin/python bench/dedup.py [--docs 10000] [--workers 2] [--repeats 3]

The corpus: documents made of random sentences of the shipped sample (so unrelated documents share little),
spread over files of several subsets, plus near-copies of some of them, each in another subset's file than its
original. A copy is made for a Jaccard bin ([0.50, 0.60), ..., [0.85, 0.90), [0.90, 0.95), [0.95, 1.00)): a
target is drawn inside the bin and as few words are replaced as bring the similarity of the two documents'
character 13-gram sets (SlimPajama's normalization, the similarity our MinHash estimates) under it, so every
pair lies inside its bin, its low edge included. Both tools are scored on that one similarity: recall per
bin (a pair counts as found when either document is removed), the share of pairs under 0.7 merged, and the
share of unrelated documents removed.

Configurations, each run by both tools on the same corpus:
- `defaults`: ours (250 permutations, 25 bands x 10 rows, character 13-grams, candidates verified at an
  estimated Jaccard >= 0.8) against datatrove's (112 hashes, 14 buckets x 8, word 5-grams, no verification).
- `14 x 8`: both with datatrove's 14 bands of 8 hashes (ours: preset `datatrove`), each with its own shingles.
- `25 x 10`: both with our 25 bands of 10 (datatrove: `num_buckets=25, hashes_per_bucket=10`).
datatrove runs with its own hasher (xxhash, 64-bit), which needs xxhash<4, as datatrove pins it. Each repeat
builds a corpus of its own seed and runs every (configuration, tool), the tools' order alternating between
repeats; printed are the medians over the repeats with their spread. Both tools get `--workers` CPUs of this
machine: ours on an in-process Ray, datatrove's LocalPipelineExecutor with as many workers.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from openllama.data import clean, minhash

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "redpajama"
BINS = ((0.5, 0.6), (0.6, 0.65), (0.65, 0.7), (0.7, 0.75), (0.75, 0.8), (0.8, 0.85), (0.85, 0.9), (0.9, 0.95),
        (0.95, 1.0))
GOAL_BIN = (0.85, 0.9)
FILES = ("c4/c4-train.00000-of-01024.jsonl", "c4/c4-train.00001-of-01024.jsonl", "wikipedia/wiki.jsonl",
         "arxiv/arxiv_0.jsonl", "arxiv/arxiv_1.jsonl", "book/book.jsonl", "stackexchange/stackexchange.jsonl",
         "common_crawl/2019-30/en_head_0000.jsonl")
CONFIGS = {  # name: (our preset, datatrove's (buckets, hashes per bucket))
    "defaults": ("default", (14, 8)),
    "14 x 8": ("datatrove", (14, 8)),
    "25 x 10": ("default", (25, 10)),
}


def grams(text: str) -> set[str]:
    t = minhash.fuzzy_normalize(text)
    return {t[i : i + minhash.NGRAM] for i in range(max(1, len(t) - minhash.NGRAM + 1))}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b)


def copy_in_bin(text: str, low: float, high: float, rng: random.Random) -> tuple[str, float] | None:
    """`text` with random words replaced until its 13-gram Jaccard with `text` lies in [low, high): as few as
    bring it under a target drawn in the bin. None when 20 tries miss the bin (a short document)."""
    words, original = text.split(" "), grams(text)
    for _ in range(20):
        order, target = rng.sample(range(len(words)), len(words)), rng.uniform(low, high)
        replacement = {i: f"{rng.choice('bcdfghjklmnpqrstvwxz')}{rng.randrange(10**6)}" for i in order}

        def with_edits(k: int, order: list[int] = order, replacement: dict = replacement) -> tuple[str, float]:
            changed = list(words)
            for i in order[:k]:
                changed[i] = replacement[i]
            copy = " ".join(changed)
            return copy, jaccard(original, grams(copy))

        first, last = 0, len(words)
        while first < last:
            middle = (first + last) // 2
            if with_edits(middle)[1] >= target:
                first = middle + 1
            else:
                last = middle
        copy, similarity = with_edits(first)
        if low <= similarity < high:
            return copy, similarity
    return None


def build_corpus(root: Path, docs: int, seed: int) -> list[dict]:
    """Write the corpus; returns the planted pairs (ids of original and copy, their bin and true Jaccard).

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
    per_bin = max(1, docs // 40 // len(BINS))
    for n, edges in enumerate(edge for edge in BINS for _ in range(per_bin)):
        original = n * 7 % docs
        made = copy_in_bin(bodies[original], *edges, rng)
        if made is None:
            continue
        name = FILES[(FILES.index(where[original][0]) + 3) % len(FILES)]
        per_file[name].append(made[0])
        pairs.append({"original": f"{where[original][0]}:{where[original][1]}", "copy": f"{name}:{len(per_file[name])}",
                      "bin": edges, "jaccard": made[1]})
    for name, texts in per_file.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": t, "id": f"{name}:{i}", "meta": {}}) + "\n"
                                for i, t in enumerate(texts, start=1)))
    return pairs


def run_ours(corpus: Path, out: Path, workers: int, preset: str) -> tuple[set[str], float]:
    """Removed ids and seconds of `openllama data dedup` (decontamination off: datatrove has none)."""
    import ray  # started here with `workers` CPUs, so both tools get the same cores

    started = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    clean.run_dedup(clean.DedupConfig(inputs=[str(corpus)], out=str(out), preset=preset, track=False))
    ray.shutdown()
    seconds = time.perf_counter() - started
    import pyarrow.parquet as pq  # only after the timing: reading the result is not part of the run

    rows = pq.read_table(out / "duplicates").to_pylist()
    return {f"{str(Path(r['source']).relative_to(corpus))}:{r['line']}" for r in rows}, seconds


def run_datatrove(corpus: Path, work: Path, workers: int, bands: tuple[int, int]) -> tuple[set[str], float]:
    """Removed ids and seconds of datatrove's four MinHash stages, its defaults but for `bands`."""
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

    config = MinhashConfig(num_buckets=bands[0], hashes_per_bucket=bands[1])  # its own hasher: xxhash
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
    return removed, seconds


def scores(pairs: list[dict], removed: set[str], docs: int) -> dict[str, float]:
    """Recall per bin, the share of pairs under 0.7 merged, and of the unrelated documents removed."""
    found = [p["copy"] in removed or p["original"] in removed for p in pairs]
    planted = {p["copy"] for p in pairs} | {p["original"] for p in pairs}
    result = {}
    for edges in BINS:
        inside = [hit for hit, p in zip(found, pairs, strict=True) if p["bin"] == edges]
        result[f"recall [{edges[0]:.2f}, {edges[1]:.2f})"] = sum(inside) / max(1, len(inside))
    low = [hit for hit, p in zip(found, pairs, strict=True) if p["jaccard"] < 0.7]
    result["merged under 0.7"] = sum(low) / max(1, len(low))
    result["unrelated removed"] = len(removed - planted) / docs
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10000, help="unrelated documents (planted pairs: docs/40)")
    parser.add_argument("--workers", type=int, default=2, help="CPUs for each tool")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    measured: dict[tuple[str, str], list[dict]] = {}
    planted = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            pairs = build_corpus(root / "corpus", args.docs, args.seed + repeat)
            planted.append(len(pairs))
            total = args.docs + len(pairs)
            runs = [(config, tool) for config in CONFIGS for tool in ("openllama", "datatrove")]
            for config, tool in runs if repeat % 2 == 0 else runs[::-1]:  # alternated between repeats
                work = root / f"{config}-{tool}".replace(" ", "")
                preset, bands = CONFIGS[config]
                removed, seconds = (run_ours(root / "corpus", work, args.workers, preset) if tool == "openllama"
                                    else run_datatrove(root / "corpus", work, args.workers, bands))
                row = {**scores(pairs, removed, args.docs), "docs/s": total / seconds}
                measured.setdefault((config, tool), []).append(row)
                print(f"repeat {repeat} {config:<8} {tool:<9} {total / seconds:7.0f} docs/s  "
                      f"recall [0.85, 0.90) {row['recall [0.85, 0.90)']:.3f}  "
                      f"merged under 0.7 {row['merged under 0.7']:.3f}", flush=True)

    def figure(values: list[float], digits: int) -> str:
        return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    print(f"\n{args.docs:,} unrelated documents and {statistics.median(planted):.0f} planted pairs a corpus, "
          f"{args.workers} CPUs of {os.cpu_count()} each, median (spread) of {args.repeats} repeats")
    for config in CONFIGS:
        ours, theirs = measured[(config, "openllama")], measured[(config, "datatrove")]
        print(f"\n{config}: ours {CONFIGS[config][0]} preset, datatrove {CONFIGS[config][1][0]} x "
              f"{CONFIGS[config][1][1]}")
        print(f"  {'':<24}{'openllama':>22}{'datatrove':>22}")
        for key in ours[0]:
            digits = 0 if key == "docs/s" else 3
            print(f"  {key:<24}{figure([r[key] for r in ours], digits):>22}"
                  f"{figure([r[key] for r in theirs], digits):>22}")
        ratios = [o["docs/s"] / t["docs/s"] for o, t in zip(ours, theirs, strict=True)]
        print(f"  speed ours / datatrove: {figure(ratios, 2)}x")
    goal = measured[("defaults", "openllama")]
    print(f"\ngoals (ours, defaults): recall in [0.85, 0.90) >= 0.95: "
          f"{statistics.median(r['recall [0.85, 0.90)'] for r in goal):.3f}; merged under 0.7 <= 0.01: "
          f"{statistics.median(r['merged under 0.7'] for r in goal):.3f}")


if __name__ == "__main__":
    main()
