"""`openllama data dedup`: quality filters, decontamination, exact and near-duplicate removal, on Ray Data.

The output is a RedPajama corpus (`OUT/<subset>/<file>.jsonl`) that `tokenizer train` and `data tokenize` read
unchanged, plus `OUT/duplicates/` (what was removed as a copy, and of which kept document), `OUT/rejected/`
(what a filter or the decontamination removed, and why) and `OUT/stats.json` (counts per subset).

The run is a sequence of stages of ledgered Ray tasks (`openllama.data.work`: each task's entry in
`OUT/work/<stage>/` is written last), so a killed run resumes where it stopped and redoes no finished task:

1. scan, one task per input file (`scan_unit`): validate, apply the quality rules (`data/filters.py`) and the
   decontamination (`data/decontaminate.py`), then publish each kept document's exact and MinHash keys
   into hash partitions;
2. match, pair, verify, components and resolve, one task per partition (`data/dedup.py`): the duplicates,
   their clusters, and the document each cluster keeps;
3. write, one task per input file (`write_unit`): the kept documents, and the removed ones into `duplicates/`.

Every file goes through `openllama.files`, so OUT can be a bucket.

How to choose presets, thresholds and filters, and what each removes on the shipped sample: docs/dedup.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from openllama import commands, files
from openllama.config import FLAG, METAVAR, POSITIONAL, ConfigError
from openllama.data import decontaminate, dedup, filters, redpajama
from openllama.data.dedup import ID_BITS, removed_in
from openllama.data.work import Ledger, Progress, run_units

log = logging.getLogger(__name__)

FORMAT = "openllama-dedup-v1"


@dataclasses.dataclass
class DedupConfig:
    """Everything `openllama data dedup` runs with; every field but `address`, `concurrency` and `track` shapes
    the output (`partitions` does not either: any count gives the same result, it only bounds memory)."""

    # RedPajama root or subset folders, .jsonl/.jsonl.zst files or globs (local or URI)
    inputs: list[str] = dataclasses.field(metadata={POSITIONAL: True, METAVAR: "INPUT"})
    out: str  # output folder (local or URI): the kept corpus in RedPajama layout, duplicates/, rejected/, stats.json
    exact: bool = True  # remove documents equal after NFC, whitespace collapsing and case folding
    fuzzy: bool = True  # remove near-duplicates: MinHash LSH over character 13-grams
    preset: Literal["default", "slimpajama", "datatrove"] = "default"  # permutations, bands, rows (minhash.PRESETS)
    threshold: float = 0.8  # estimated Jaccard at or above which an LSH candidate pair is a duplicate
    seed: int = 0  # of the MinHash permutations
    # quality rules or groups of them (data/filters.py: short, gopher, c4, gopher_word_count, ...)
    filters: list[str] = dataclasses.field(default_factory=lambda: ["short"], metadata={FLAG: "--filter",
                                                                                         METAVAR: "NAME"})
    min_chars: int = 200  # the `short` filter: documents with fewer characters are rejected
    # a JSON file {task: [item text, ...]} (`openllama eval texts TASK... --out FILE`): documents sharing an
    # n-gram with an item are rejected as contaminated; None: no decontamination
    decontaminate: str | None = None
    decontaminate_ngram: int = 13  # words per n-gram shared with an eval item that marks a document
    decontaminate_min_words: int = 8  # items shorter than the n-gram count as one n-gram of at least this length
    partitions: int = 16  # hash partitions of the exact and LSH keys: each match task holds one
    concurrency: int | None = None  # Ray tasks at once (None: as many as the cluster's CPUs allow)
    max_doc_bytes: int = redpajama.DEFAULT_MAX_DOC_BYTES  # larger documents are rejected as too_large
    address: str | None = None  # Ray cluster (GCS) address; None: RAY_ADDRESS, else an in-process Ray
    track: bool = True  # log the run to MLflow experiment `data` when MLFLOW_TRACKING_URI is set

    def __post_init__(self) -> None:
        for name in ("min_chars", "partitions", "decontaminate_ngram", "decontaminate_min_words", "max_doc_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"concurrency={self.concurrency} must be >= 1 or null")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"threshold={self.threshold} must be in (0, 1]")
        unknown = filters.unknown_filter(self.filters)
        if unknown is not None:
            raise ConfigError(f"filters: unknown filter {unknown!r}; allowed: "
                              f"{[*filters.FILTER_GROUPS, *filters.FILTERS]}")
        files.check_location(self.out)
        if self.decontaminate is not None:
            files.check_location(self.decontaminate)



def output_names(paths: list[str]) -> dict[str, str]:
    """Each input's output file, `<subset>/<name>.jsonl`, from which `subset_of` reads the same subset.

    The input's own name is kept when no other input has it; clashing names (en_head_0000 of two dumps) get a
    hash of their path.
    """
    plain = {p: f"{redpajama.subset_of(p)}/{p.rsplit('/', 1)[-1].removesuffix('.zst')}" for p in paths}
    clashes = Counter(plain.values())
    names = {}
    for path, name in plain.items():
        if clashes[name] > 1:
            stem = name.removesuffix(".jsonl")
            name = f"{stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}.jsonl"
        names[path] = name
    return names


def plan_units(inputs: list[str]) -> list[dict]:
    """One unit per input file, in (subset, path) order: a unit's index is the high half of its documents' ids."""
    paths = redpajama.expand_inputs(inputs)
    names = output_names(paths)
    ordered = sorted(paths, key=lambda p: (redpajama.subset_of(p), p))
    return [{"index": i, "path": p, "subset": redpajama.subset_of(p), "output": names[p],
             "uid": f"{i:06d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', p.rsplit('/', 1)[-1])[:60]}"}
            for i, p in enumerate(ordered)]


def scan_unit(unit: dict, settings: dict, work: str, index: dict[str, Any]) -> dict:
    """Validate, filter and decontaminate one input file; publish its documents' keys into the partitions."""
    uid, path = unit["uid"], unit["path"]
    keys_of = dedup.key_hasher(settings)
    lines: list[int] = []
    removed, keys, signatures, rejected = [], [], [], []
    reasons: Counter[str] = Counter()
    contaminated: Counter[str] = Counter()
    for record in redpajama.read_records(path, settings["max_doc_bytes"]):
        if isinstance(record, redpajama.Rejected):
            reasons[record.reason] += 1
            rejected.append({"source": path, "line": record.line, "subset": unit["subset"], "reason": record.reason,
                             "detail": record.excerpt})
            continue
        reason, detail = filters.quality_reason(record.text, settings["filters"], settings["min_chars"]), ""
        if reason is None:
            tasks = decontaminate.contaminated_by(record.text, index)
            if tasks:
                reason, detail = "contaminated", ",".join(tasks)
                contaminated.update(tasks)
        if reason is not None:
            reasons[reason] += 1
            rejected.append({"source": path, "line": record.line, "subset": unit["subset"], "reason": reason,
                             "detail": detail})
        if record.line >= 1 << ID_BITS:
            raise commands.BadInput(f"{path}: more than {(1 << ID_BITS) - 1:,} lines; split the file")
        lines.append(record.line)
        removed.append(reason is not None)
        exact, signature = keys_of(record.text if reason is None else None)
        keys.append(exact)
        signatures.append(signature)

    ids = (np.int64(unit["index"]) << np.int64(ID_BITS)) + np.array(lines, dtype=np.int64)
    folder = f"{work}/scan/{uid}"
    sink = io.BytesIO()
    np.save(sink, np.array(removed, dtype=bool))
    files.write_bytes(f"{folder}/removed.npy", sink.getvalue())
    files.write_parquet(f"{folder}/rejected.parquet", pa.Table.from_pylist(
        rejected, schema=pa.schema([("source", pa.string()), ("line", pa.int64()), ("subset", pa.string()),
                                    ("reason", pa.string()), ("detail", pa.string())])))
    dedup.publish_keys(uid, ids, keys, signatures, settings, work)
    return {"uid": uid, "documents": len(lines), "rejected": dict(reasons), "contaminated": dict(contaminated)}


def write_unit(unit: dict, settings: dict, work: str, out: str, units: list[dict]) -> dict:
    """The kept documents of one input, in RedPajama jsonl; its removed documents into duplicates/."""
    uid, line_mask = unit["uid"], (1 << ID_BITS) - 1
    copies = removed_in(uid, work)
    rejected = np.load(io.BytesIO(files.read_bytes(f"{work}/scan/{uid}/removed.npy")))  # by valid record
    duplicates = []
    kept = kept_bytes = position = 0
    with files.open_output(f"{out}/{unit['output']}") as stream:
        for record in redpajama.read_records(unit["path"], settings["max_doc_bytes"]):
            if isinstance(record, redpajama.Rejected):
                continue
            at, position = position, position + 1
            if rejected[at]:
                continue
            if record.line in copies:
                row = copies[record.line]
                source, kept_line = units[row["kept"] >> ID_BITS], row["kept"] & line_mask
                duplicates.append({
                    "id": f"{unit['output']}:{record.line}", "source": unit["path"], "line": record.line,
                    "subset": unit["subset"], "stage": row["stage"], "kept_id": f"{source['output']}:{kept_line}",
                    "kept_source": source["path"], "kept_line": kept_line,
                })
                continue
            stream.write(json.dumps({"text": record.text, "meta": json.loads(record.meta)},
                                    ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n")
            kept += 1
            kept_bytes += record.nbytes
    files.write_parquet(f"{out}/duplicates/{uid}.parquet", pa.Table.from_pylist(
        duplicates, schema=pa.schema([(c, pa.int64() if c in ("line", "kept_line") else pa.string()) for c in (
            "id", "source", "line", "subset", "stage", "kept_id", "kept_source", "kept_line")])))
    files.copy_file(f"{work}/scan/{uid}/rejected.parquet", f"{out}/rejected/{uid}.parquet")
    return {"uid": uid, "kept": kept, "kept_bytes": kept_bytes,
            "duplicates": dict(Counter(row["stage"] for row in duplicates))}


def run_dedup(config: DedupConfig, on_progress: Progress | None = None) -> dict:
    """Build (or finish, or reuse) the deduplicated corpus `config.out`; returns its manifest.

    `on_progress(stage, finished, to_run)` is called in the driver after each task of each stage.
    """
    units = plan_units([str(i) for i in config.inputs])
    out = config.out.rstrip("/") if files.is_uri(config.out) else str(Path(config.out).absolute())
    items = decontaminate.read_texts(config.decontaminate) if config.decontaminate else {}
    index = decontaminate.contamination_index(items, config.decontaminate_ngram, config.decontaminate_min_words)
    settings = {
        "inputs": [u["path"] for u in units], "exact": config.exact, "fuzzy": config.fuzzy, "preset": config.preset,
        "threshold": config.threshold, "seed": config.seed, "filters": filters.expand(config.filters),
        "min_chars": config.min_chars, "decontaminate": sorted(items),
        "decontaminate_ngram": config.decontaminate_ngram, "decontaminate_min_words": config.decontaminate_min_words,
        "eval_ngrams_sha256": hashlib.sha256(index["keys"].tobytes()).hexdigest(),
        "partitions": config.partitions, "max_doc_bytes": config.max_doc_bytes, "format": FORMAT,
    }
    manifest_path = f"{out}/dedup.json"
    try:
        found = files.kind(out)
        previous = files.read_json(manifest_path) if files.is_file(manifest_path) else None
    except OSError as error:
        raise commands.BadInput(f"--out {config.out} cannot be read: {error}") from None
    if found == pafs.FileType.File:
        raise commands.BadInput(f"--out {config.out} is a file, not a folder")
    if previous is not None:
        if previous.get("settings") != settings:
            differs = sorted(k for k in settings if previous.get("settings", {}).get(k) != settings[k])
            raise commands.BadInput(f"{config.out} holds a dedup run with other settings or inputs (differs in: "
                                    f"{differs}); choose a new --out or delete the old one")
        if previous.get("finished") is True:
            log.info("%s is finished and up to date; reusing it", config.out)
            return previous
    elif found == pafs.FileType.Directory and files.files_under(out):
        raise commands.BadInput(f"--out {config.out} is not empty and holds no dedup run; choose a new folder")
    manifest = {"format": FORMAT, "finished": False, "settings": settings}
    try:
        files.write_json(manifest_path, manifest)
    except OSError as error:
        raise commands.BadInput(f"--out {config.out} cannot be written: {getattr(error, 'strerror', None) or error}"
                                ) from None
    work = f"{out}/work"
    if not files.is_uri(out):  # what crashed local writers left (an object store has no temporaries)
        for folder in (Path(out), *(p for p in Path(out).rglob("*") if p.is_dir())):
            files.remove_temporaries(folder)
    started = time.perf_counter()

    def stage(name: str, ledger: str, items: Sequence[Any], task: Callable[[Any], dict]) -> list[dict]:
        """One stage's tasks, each recorded done in `work/<ledger>/`: a rerun runs only what is not."""
        def unit_id(item: Any) -> str:
            return item["uid"] if isinstance(item, dict) else f"{item:05d}"

        return run_units(f"dedup {name}", items, unit_id, task, Ledger.of(f"{work}/{ledger}", settings),
                         config.address, config.concurrency, on_progress)

    partitions = range(config.partitions)
    scans = stage("scan", "scan", units, lambda u: scan_unit(u, settings, work, index))
    stage("match", "match", partitions, lambda p: dedup.match_partition(p, settings, work))
    stage("pair", "pair", partitions, lambda p: dedup.pair_partition(p, settings, work))
    stage("verify", "verify", partitions, lambda p: dedup.verify_partition(p, settings, work))
    components = Ledger.of(work, settings)
    labels = components.entry("components") or components.record("components", {"labels_round": dedup.run_components(
        lambda round_, items, task: stage("components", f"components/{round_:03d}", items, task),
        config.partitions, work)})
    uids = [u["uid"] for u in units]
    stage("resolve", "resolve", partitions, lambda p: dedup.resolve_partition(p, labels["labels_round"], work, uids))
    writes = stage("write", "write", units, lambda u: write_unit(u, settings, work, out, units))

    stats = summarize(units, scans, writes, index)
    stats["seconds"] = time.perf_counter() - started
    files.write_json(f"{out}/stats.json", stats)
    manifest.update(finished=True, stats=stats)
    files.write_json(manifest_path, manifest)
    files.remove_tree(work)  # keys, signatures and the graph: only a resumed run needs them
    if config.track and os.environ.get("MLFLOW_TRACKING_URI"):
        # imported here: mlflow takes ~2 s to import, and every Ray worker imports this module for its tasks
        from openllama import tracking

        tracking.log_summary("data", f"dedup {Path(config.out).name}", {
            "stage": "dedup", "out_dir": config.out, "files": len(settings["inputs"]),
            **{k: v for k, v in settings.items() if k != "inputs"}}, summary_metrics(stats))
    return manifest


def summarize(units: list[dict], scans: list[dict], writes: list[dict], index: dict[str, Any]) -> dict:
    """Per-subset counts (documents, kept, removed by stage and reason) and the decontamination per task."""
    subsets: dict[str, dict] = {}
    for unit, scan, write in zip(units, scans, writes, strict=True):
        entry = subsets.setdefault(unit["subset"], {"files": 0, "documents": 0, "kept": 0, "kept_bytes": 0,
                                                    "exact": 0, "fuzzy": 0, "rejected": {}})
        entry["files"] += 1
        entry["documents"] += scan["documents"]
        entry["kept"] += write["kept"]
        entry["kept_bytes"] += write["kept_bytes"]
        for name in ("exact", "fuzzy"):
            entry[name] += write["duplicates"].get(name, 0)
        for reason, n in scan["rejected"].items():
            entry["rejected"][reason] = entry["rejected"].get(reason, 0) + n
    total = {k: sum(e[k] for e in subsets.values()) for k in ("documents", "kept", "kept_bytes", "exact", "fuzzy")}
    total["rejected"] = {}
    for entry in subsets.values():
        for reason, n in entry["rejected"].items():
            total["rejected"][reason] = total["rejected"].get(reason, 0) + n
    tasks = {task: {"items": n, "unchecked_items": index["unchecked"][task],
                    "documents_removed": sum(s["contaminated"].get(task, 0) for s in scans)}
             for task, n in index["items"].items()}
    return {"subsets": subsets, "total": total, "decontamination": tasks}


def summary_metrics(stats: dict) -> dict[str, float]:
    """The dedup run's counts as MLflow metrics: totals, per subset, and documents removed per eval task."""
    metrics = {f"total_{k}": v for k, v in stats["total"].items() if isinstance(v, int | float)}
    metrics.update({f"total_rejected_{r}": n for r, n in stats["total"]["rejected"].items()})
    for subset, entry in stats["subsets"].items():
        metrics.update({f"{subset}_{k}": v for k, v in entry.items() if isinstance(v, int | float)})
        metrics.update({f"{subset}_rejected_{r}": n for r, n in entry["rejected"].items()})
    for task, entry in stats["decontamination"].items():
        metrics[f"contaminated_{task}"] = entry["documents_removed"]
    return metrics


def dedup_command(config: DedupConfig) -> None:
    """Filter, decontaminate and deduplicate (exact, then MinHash LSH near-duplicates) RedPajama jsonl on Ray
    Data. Writes the kept documents in RedPajama layout, so `tokenizer train` and `data tokenize` take OUT as
    their input. A rerun of the same command finishes a killed run."""
    commands.quiet_libraries()
    total = run_dedup(config)["stats"]["total"]
    rejected = sum(total["rejected"].values())
    print(f"{config.out}: kept {total['kept']:,} of {total['documents']:,} documents; removed {total['exact']:,} "
          f"exact and {total['fuzzy']:,} near duplicates, {rejected:,} rejected; see {config.out}/stats.json")
