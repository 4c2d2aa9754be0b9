"""`openllama data dedup`: quality filters, decontamination, exact and near-duplicate removal, on Ray Data.

The output is a RedPajama corpus (`OUT/<subset>/<file>.jsonl`) that `tokenizer train` and `data tokenize` read
unchanged, plus `OUT/duplicates/` (what was removed as a copy, and of which kept document), `OUT/rejected/`
(what a filter or the decontamination removed, and why) and `OUT/stats.json` (counts per subset).

Its stages are sets of Ray Data tasks whose results are published whole with a ledger entry written last
(`OUT/work/<stage>/<item>.json`), so a killed run resumes where it stopped and redoes no finished item:

1. scan, one task per input file: validate, filter, decontaminate; hash each document's normalized text (exact
   stage) and MinHash its character 13-grams (fuzzy stage); write the keys into `partitions` hash partitions,
   and each signature into the partition of its document.
2. match, one task per partition: exact groups (same key) and LSH buckets (same band) of that partition only:
   memory is the partition, not the corpus. Exact copies become edges of one graph, partitioned by document;
   bucket pairs become candidates.
3. pair and verify, one task per partition each: a candidate pair picks up the signature of its first document
   in that document's partition, then is verified against its second one's in that one's (the estimated
   Jaccard of the signatures); verified pairs join the graph.
4. components, rounds of one task per partition (`star_round`) until every cluster is a star around its
   smallest document id; ids order documents by (subset, file path, line), so the document kept does not
   depend on input order, partitions or workers.
5. resolve, one task per partition: the removed documents and the kept one of each, per input file.
6. write, one task per input file: the kept documents, and the removed ones into `duplicates/`.

Every file goes through `openllama.files`, so OUT can be a bucket; no task reads another's files at random.

How to choose presets, thresholds and filters, and what each removes on the shipped sample: docs/dedup.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.resources
import io
import json
import logging
import os
import re
import time
import unicodedata
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from openllama import commands, files, ray_jobs
from openllama.config import ConfigError, add_config_arguments, from_arguments
from openllama.data import minhash, redpajama

log = logging.getLogger(__name__)

FORMAT = "openllama-dedup-v1"
Progress = Callable[[str, int, int], None]  # (stage, items finished, items to run), in the driver after each item
ID_BITS = 32  # a document id is (unit index << 32) | its line in its file: ids sort as (subset, path, line)
ALL_PAIRS_BUCKET = 16  # buckets up to this size verify every pair; larger ones each member against two others

GOPHER_RULES = (
    "gopher_word_count", "gopher_mean_word_length", "gopher_symbol_ratio", "gopher_bullet_lines",
    "gopher_ellipsis_lines", "gopher_alpha_words", "gopher_stop_words", "gopher_duplicate_lines",
    "gopher_duplicate_line_chars", "gopher_top_ngram",
)
C4_RULES = ("c4_lorem_ipsum", "c4_curly_brace")
FILTERS = ("short", *GOPHER_RULES, *C4_RULES)
FILTER_GROUPS = {"gopher": GOPHER_RULES, "c4": C4_RULES}
STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
BULLETS = ("•", "‣", "◦", "⁃", "-", "*", "–", "—")
TOP_NGRAM_LIMITS = {2: 0.20, 3: 0.18, 4: 0.16}
LOCAL_PACK = "openllama_local"
# the fields of each local task's items that hold what the model is shown or asked to produce
LOCAL_TASK_FIELDS = {
    "local_arc": ("question", "choices.text"),
    "local_hellaswag": ("activity_label", "ctx", "endings"),
    "local_piqa": ("goal", "sol1", "sol2"),
    "local_boolq": ("passage", "question"),
    "local_arithmetic": ("question", "answer"),
    "local_text_perplexity": ("text",),
}
_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")


@dataclasses.dataclass
class DedupConfig:
    """Everything `openllama data dedup` runs with; every field but `address`, `concurrency` and `track` shapes
    the output (`partitions` does not either: any count gives the same result, it only bounds memory)."""

    inputs: list[str]  # RedPajama root or subset folders, .jsonl/.jsonl.zst files or globs (local or URI)
    out: str  # output folder (local or URI): the kept corpus in RedPajama layout, duplicates/, rejected/, stats.json
    exact: bool = True  # remove documents equal after NFC, whitespace collapsing and case folding
    fuzzy: bool = True  # remove near-duplicates: MinHash LSH over character 13-grams
    preset: Literal["default", "slimpajama"] = "default"  # permutations, bands and rows (minhash.PRESETS)
    threshold: float = 0.8  # estimated Jaccard at or above which an LSH candidate pair is a duplicate
    seed: int = 0  # of the MinHash permutations
    filters: list[str] = dataclasses.field(default_factory=lambda: ["short"])  # names of FILTERS or groups
    min_chars: int = 200  # the `short` filter: documents with fewer characters are rejected
    decontaminate: list[str] = dataclasses.field(default_factory=lambda: [LOCAL_PACK])  # eval tasks (or groups)
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
        unknown = [f for f in self.filters if f not in FILTERS and f not in FILTER_GROUPS]
        if unknown:
            raise ConfigError(f"filters: unknown filter {unknown[0]!r}; allowed: {[*FILTER_GROUPS, *FILTERS]}")
        files.check_location(self.out)

    def filter_names(self) -> list[str]:
        """The filters to apply, groups expanded, in FILTERS order (the first that fails is the reason)."""
        chosen = {n for f in self.filters for n in FILTER_GROUPS.get(f, (f,))}
        return [f for f in FILTERS if f in chosen]


# ---- normalization and quality filters ------------------------------------------------------------------------


def exact_normalize(text: str) -> str:
    """The exact stage's normalization: Unicode NFC, case folded, whitespace runs collapsed to one space."""
    return " ".join(unicodedata.normalize("NFC", text).casefold().split())


def exact_key(text: str) -> bytes:
    """128 bits of the normalized text's hash: collisions stay unlikely past 10^15 documents."""
    return hashlib.blake2b(exact_normalize(text).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _top_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    counts = Counter(zip(*(words[i:] for i in range(n)), strict=False))
    if not counts:
        return 0.0
    gram, count = counts.most_common(1)[0]
    return 0.0 if count < 2 else count * sum(map(len, gram)) / total_chars


def quality_reason(text: str, filters: list[str], min_chars: int = 200) -> str | None:
    """The first of `filters` that rejects `text`, or None: thresholds and papers are in docs/dedup.md."""
    if "short" in filters and len(text) < min_chars:
        return "short"
    words = text.split()
    lines = [line for line in text.splitlines() if line.strip()]
    n_words, n_lines = len(words), max(1, len(lines))
    word_chars = sum(map(len, words))
    checks: dict[str, Callable[[], bool]] = {
        "gopher_word_count": lambda: not 50 <= n_words <= 100_000,
        "gopher_mean_word_length": lambda: not 3 <= word_chars / max(1, n_words) <= 10,
        "gopher_symbol_ratio": lambda: (text.count("#") + text.count("...") + text.count("…")) > 0.1 * n_words,
        "gopher_bullet_lines": lambda: sum(ln.lstrip().startswith(BULLETS) for ln in lines) > 0.9 * n_lines,
        "gopher_ellipsis_lines": lambda: sum(ln.rstrip().endswith(("...", "…")) for ln in lines) > 0.3 * n_lines,
        "gopher_alpha_words": lambda: sum(any(c.isalpha() for c in w) for w in words) < 0.8 * n_words,
        "gopher_stop_words": lambda: len(STOP_WORDS.intersection(w.lower() for w in words)) < 2,
        "gopher_duplicate_lines": lambda: len(lines) - len(set(lines)) > 0.3 * n_lines,
        "gopher_duplicate_line_chars": lambda: _duplicate_line_chars(lines) > 0.2 * max(1, sum(map(len, lines))),
        "gopher_top_ngram": lambda: any(_top_ngram_fraction(words, n, max(1, word_chars)) > limit
                                        for n, limit in TOP_NGRAM_LIMITS.items()),
        "c4_lorem_ipsum": lambda: "lorem ipsum" in text.lower(),
        "c4_curly_brace": lambda: "{" in text,
    }
    return next((name for name in filters if name != "short" and checks[name]()), None)


def _duplicate_line_chars(lines: list[str]) -> int:
    """Characters in lines that repeat an earlier line (Gopher counts each repeat, not the first copy)."""
    seen: set[str] = set()
    repeated = 0
    for line in lines:
        if line in seen:
            repeated += len(line)
        seen.add(line)
    return repeated


# ---- decontamination ------------------------------------------------------------------------------------------


def normalized_words(text: str) -> list[str]:
    """Decontamination's words: NFC, case folded, runs of letters and digits (punctuation dropped)."""
    return _WORD.findall(unicodedata.normalize("NFC", text).casefold())


def word_ngram_hashes(words: list[str], lengths: Iterable[int]) -> np.ndarray:
    """Stable 64-bit hashes of every window of each length in `lengths` (a window hash includes its length)."""
    if not words:
        return np.zeros(0, dtype=np.uint64)
    points = np.fromiter((zlib.crc32(w.encode("utf-8", "surrogatepass")) for w in words), dtype=np.uint64,
                         count=len(words))
    return np.unique(np.concatenate([minhash.window_hashes(points, n) for n in lengths if n <= len(words)]
                                    or [np.zeros(0, dtype=np.uint64)]))


class _PackLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs, whose `!function` tags name Python callables we do not need."""


_PackLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _field_texts(record: dict, field: str) -> list[str]:
    """The strings at a dotted `field` of an item (a string, or a list of strings)."""
    value: Any = record
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def local_pack_items(pack: Path) -> dict[str, list[str]]:
    """{task: item texts} of every task of the local pack (eval/tasks), from the files its YAMLs name."""
    items: dict[str, list[str]] = {}
    for path in sorted(pack.glob("*.yaml")):
        spec = yaml.load(path.read_text(), Loader=_PackLoader) or {}
        data_files = (spec.get("dataset_kwargs") or {}).get("data_files") or {}
        if not isinstance(spec.get("task"), str) or "test" not in data_files:
            continue
        name = spec["task"]
        fields = LOCAL_TASK_FIELDS.get(name)
        texts = []
        for line in (pack / data_files["test"]).read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                chosen = fields or [k for k, v in record.items() if k != "id" and isinstance(v, str)]
                texts.append(" ".join(t for f in chosen for t in _field_texts(record, f)))
        items[name] = texts
    return items


def lm_eval_items(name: str) -> list[str]:
    """The decontamination queries of lm-eval task `name` (its test split, else validation), from local caches."""
    try:
        # lm-eval is the `eval` extra and imports torch: only a run that names one of its tasks pays for it
        from lm_eval.tasks import TaskManager, get_task_dict
    except ImportError:
        raise commands.BadInput(f"decontaminate: task {name!r} is not in the local pack and lm-eval is not "
                                "installed; pip install 'openllama-ray[eval]'") from None
    try:
        tasks = get_task_dict([name], TaskManager())
    except Exception as error:  # lm-eval raises bare KeyError/ValueError/connection errors for a missing task
        raise commands.BadInput(f"decontaminate: lm-eval task {name!r} cannot be loaded offline ({error}); "
                                "download its dataset first, or leave it out") from None
    texts: list[str] = []
    for task in _leaf_tasks(tasks):
        docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
        query = task.doc_to_decontamination_query if task.should_decontaminate() else task.doc_to_text
        texts += [str(query(doc)) for doc in docs]
    return texts


def _leaf_tasks(tree: dict) -> list[Any]:
    """The tasks of lm-eval's task dict, groups flattened."""
    return [t for v in tree.values() for t in (_leaf_tasks(v) if isinstance(v, dict) else [v])]


def eval_items(names: list[str], pack: Path) -> dict[str, list[str]]:
    """{task: item texts} for each name: the local pack (all of it, or a task), else an lm-eval task."""
    local = local_pack_items(pack) if names else {}
    chosen: dict[str, list[str]] = {}
    for name in names:
        if name == LOCAL_PACK:
            chosen.update(local)
        elif name in local:
            chosen[name] = local[name]
        else:
            chosen[name] = lm_eval_items(name)
    return chosen


def contamination_index(items: dict[str, list[str]], ngram: int, min_words: int) -> dict[str, Any]:
    """The n-gram hashes of every item, with the task of each, and per task the items too short to check."""
    keys: dict[int, set[str]] = {}
    unchecked: dict[str, int] = {}
    lengths: set[int] = set()
    for task, texts in items.items():
        unchecked[task] = 0
        for text in texts:
            words = normalized_words(text)
            if len(words) < min_words:
                unchecked[task] += 1
                continue
            length = min(ngram, len(words))
            lengths.add(length)
            for key in word_ngram_hashes(words, [length]).tolist():
                keys.setdefault(key, set()).add(task)
    ordered = sorted(keys)
    return {"keys": np.array(ordered, dtype=np.uint64), "tasks": [sorted(keys[k]) for k in ordered],
            "lengths": sorted(lengths), "items": {t: len(v) for t, v in items.items()}, "unchecked": unchecked}


def contaminated_by(text: str, index: dict[str, Any]) -> list[str]:
    """The eval tasks sharing an n-gram with `text` (empty: clean)."""
    if not len(index["keys"]):
        return []
    found = np.intersect1d(word_ngram_hashes(normalized_words(text), index["lengths"]), index["keys"])
    if not len(found):
        return []
    positions = np.searchsorted(index["keys"], found)
    return sorted({task for p in positions.tolist() for task in index["tasks"][p]})


# ---- the work units and their ledger --------------------------------------------------------------------------


def _npy_bytes(array: np.ndarray) -> bytes:
    sink = io.BytesIO()
    np.save(sink, array)
    return sink.getvalue()


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _tables_in(folder: str, prefix: str = "") -> list[str]:
    """The published `prefix*.parquet` files in `folder` (local or in a bucket): never what a crashed writer left
    under a temporary name."""
    names = ((path, path.rsplit("/", 1)[-1]) for path in files.files_under(folder))
    return [path for path, name in names if name.startswith(prefix) and name.endswith(".parquet")]


def _read_parquets(locations: Iterable[str], schema: pa.Schema) -> pa.Table:
    tables = [pq.read_table(pa.BufferReader(files.read_bytes(location))) for location in locations]
    return pa.concat_tables(tables) if tables else schema.empty_table()


EXACT_SCHEMA = pa.schema([("k1", pa.uint64()), ("k2", pa.uint64()), ("id", pa.int64())])
BAND_SCHEMA = pa.schema([("band", pa.uint16()), ("key", pa.uint64()), ("id", pa.int64())])
ARC_SCHEMA = pa.schema([("u", pa.int64()), ("v", pa.int64())])  # one direction of an undirected edge
PAIR_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64())])  # an LSH candidate pair, a < b
ID_SCHEMA = pa.schema([("id", pa.int64())])
REMOVED_SCHEMA = pa.schema([("id", pa.int64()), ("kept", pa.int64()), ("stage", pa.string())])


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
    """Validate, filter and decontaminate one input file; write its exact and LSH keys into the partitions."""
    preset = minhash.PRESETS[settings["preset"]]
    a, b = minhash.permutations(preset.num_perm, settings["seed"])
    partitions = settings["partitions"]
    uid, path = unit["uid"], unit["path"]
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
        reason, detail = quality_reason(record.text, settings["filters"], settings["min_chars"]), ""
        if reason is None:
            tasks = contaminated_by(record.text, index)
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
        keys.append(exact_key(record.text) if reason is None and settings["exact"] else b"")
        if settings["fuzzy"]:
            hashes = minhash.ngram_hashes(minhash.fuzzy_normalize(record.text)) if reason is None else None
            signatures.append(minhash.signature(hashes, a, b) if hashes is not None and len(hashes) else None)

    ids = (np.int64(unit["index"]) << np.int64(ID_BITS)) + np.array(lines, dtype=np.int64)
    folder = f"{work}/scan/{uid}"
    files.write_bytes(f"{folder}/removed.npy", _npy_bytes(np.array(removed, dtype=bool)))
    files.write_bytes(f"{folder}/rejected.parquet", _parquet_bytes(pa.Table.from_pylist(
        rejected, schema=pa.schema([("source", pa.string()), ("line", pa.int64()), ("subset", pa.string()),
                                    ("reason", pa.string()), ("detail", pa.string())]))))
    tables: dict[str, list[pa.Table]] = {}
    has_key = np.array([len(k) == 16 for k in keys], dtype=bool)
    if has_key.any():
        raw = np.frombuffer(b"".join(k for k in keys if k), dtype=np.uint64).reshape(-1, 2)
        exact = pa.table({"k1": raw[:, 0], "k2": raw[:, 1], "id": ids[has_key]}, schema=EXACT_SCHEMA)
        tables["exact"] = _split(exact, raw[:, 0] % np.uint64(partitions), partitions)
    signed = np.array([s is not None for s in signatures], dtype=bool)
    if signed.any():
        matrix = np.stack([s for s in signatures if s is not None])
        bands = minhash.band_keys(matrix, preset)
        band_ids = np.repeat(ids[signed], preset.bands)
        band_numbers = np.tile(np.arange(preset.bands, dtype=np.uint16), int(signed.sum()))
        flat = bands.reshape(-1)
        table = pa.table({"band": band_numbers, "key": flat, "id": band_ids}, schema=BAND_SCHEMA)
        tables["bands"] = _split(table, flat % np.uint64(partitions), partitions)
        # each signature goes where the verify tasks of its document look for it: the partition of its id
        _publish_by_node(f"{work}/signatures", uid, ids[signed], _signature_table(ids[signed], matrix), partitions)
    for kind, parts in tables.items():
        for p, part in enumerate(parts):
            if part.num_rows:
                files.write_bytes(f"{work}/partitions/{p:05d}/{kind}-{uid}.parquet", _parquet_bytes(part))
    result = {"uid": uid, "documents": len(lines), "rejected": dict(reasons), "contaminated": dict(contaminated)}
    files.write_json(f"{work}/scan/{uid}.json", result)
    return result


def _split(table: pa.Table, partition: np.ndarray, partitions: int) -> list[pa.Table]:
    """`table`'s rows by partition number."""
    order = np.argsort(partition, kind="stable")
    bounds = np.searchsorted(partition[order], np.arange(partitions + 1))
    return [table.take(order[bounds[p]:bounds[p + 1]]) for p in range(partitions)]


def _groups(sorted_keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of each run of equal rows in columns already sorted together."""
    if not len(sorted_keys[0]):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    change = np.zeros(len(sorted_keys[0]), dtype=bool)
    change[0] = True
    for column in sorted_keys:
        change[1:] |= column[1:] != column[:-1]
    starts = np.flatnonzero(change)
    return starts, np.append(starts[1:], len(change))


def _bucket_pairs(ids: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Candidate pairs (smaller id first) of each bucket: all pairs of small buckets; in a large one each member
    with the bucket's smallest id and with its predecessor, which keeps a bucket's pairs linear in its size."""
    pairs = []
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        if end - start < 2:
            continue
        members = ids[start:end]
        if len(members) <= ALL_PAIRS_BUCKET:
            i, j = np.triu_indices(len(members), k=1)
            pairs.append(np.stack([members[i], members[j]], axis=1))
        else:
            pairs.append(np.stack([np.full(len(members) - 1, members[0]), members[1:]], axis=1))
            pairs.append(np.stack([members[:-1], members[1:]], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(pairs), axis=0)


def match_partition(partition: int, settings: dict, work: str) -> dict:
    """Exact groups and LSH candidate pairs among the keys of one partition."""
    folder = f"{work}/partitions/{partition:05d}"
    exact = _read_parquets(_tables_in(folder, "exact-"), EXACT_SCHEMA)
    k1, k2, ids = (exact[c].to_numpy() for c in ("k1", "k2", "id"))
    order = np.lexsort((ids, k2, k1))
    k1, k2, ids = k1[order], k2[order], ids[order]
    starts, ends = _groups([k1, k2])
    group_of = np.repeat(np.arange(len(starts)), ends - starts)
    kept = ids[starts][group_of]
    duplicate = ids != kept
    exact_ids, exact_kept = ids[duplicate], kept[duplicate]
    # an exact copy is also an edge to its kept document: one graph, so each cluster keeps one document
    publish_edges(f"{work}/components/{0:03d}", f"exact-{partition:05d}", exact_ids, exact_kept,
                  settings["partitions"])
    _publish_by_node(f"{work}/exact", f"from-{partition:05d}", exact_ids,
                     pa.table({"id": exact_ids}, schema=ID_SCHEMA), settings["partitions"])

    bands = _read_parquets(_tables_in(folder, "bands-"), BAND_SCHEMA)
    band, key, ids = (bands[c].to_numpy() for c in ("band", "key", "id"))
    order = np.lexsort((ids, key, band))
    band, key, ids = band[order], key[order], ids[order]
    starts, ends = _groups([band, key])
    pairs = _bucket_pairs(ids, starts, ends)
    _publish_by_node(f"{work}/pairs", f"from-{partition:05d}", pairs[:, 0],
                     pa.table({"a": pairs[:, 0], "b": pairs[:, 1]}, schema=PAIR_SCHEMA), settings["partitions"])
    result = {"partition": partition, "exact_duplicates": int(duplicate.sum()), "candidates": len(pairs)}
    files.write_json(f"{work}/match/{partition:05d}.json", result)
    return result


def _signature_table(ids: np.ndarray, matrix: np.ndarray) -> pa.Table:
    """Signatures as (id, sig) rows, `sig` the row's uint32 entries as one fixed-size binary value."""
    width = matrix.shape[1] * 4
    sig = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(ids),
                                               [None, pa.py_buffer(np.ascontiguousarray(matrix).tobytes())])
    return pa.table({"id": pa.array(ids, pa.int64()), "sig": sig})


def _signature_matrix(column: pa.ChunkedArray | pa.Array, num_perm: int) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not len(array):
        return np.zeros((0, num_perm), dtype=np.uint32)
    data = np.frombuffer(array.buffers()[1], dtype=np.uint32, count=len(array) * num_perm,
                         offset=array.offset * num_perm * 4)
    return data.reshape(len(array), num_perm)


def _signatures_of(partition: int, work: str, num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted ids, their signatures) of the documents of one partition."""
    table = _read_parquets(_tables_in(f"{work}/signatures/{partition:05d}"),
                           pa.schema([("id", pa.int64()), ("sig", pa.binary(num_perm * 4))]))
    ids = table["id"].to_numpy()
    order = np.argsort(ids)
    return ids[order], _signature_matrix(table["sig"], num_perm)[order]


def _lookup(ids: np.ndarray, known: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The rows of `ids` among the sorted `known` ids (every id must be there)."""
    at = np.searchsorted(known, ids)
    if len(ids) and (at.max() >= len(known) or not np.array_equal(known[at], ids)):
        raise RuntimeError("a candidate document has no signature: the scan's files are incomplete")
    return rows[at]


def _publish_by_node(folder: str, name: str, nodes: np.ndarray, table: pa.Table, partitions: int) -> None:
    """Row i of `table` into `folder/<the partition of document nodes[i]>/<name>.parquet`."""
    by_node = node_partition(nodes, partitions)
    for q in np.unique(by_node).tolist():
        files.write_bytes(f"{folder}/{q:05d}/{name}.parquet", _parquet_bytes(table.filter(pa.array(by_node == q))))


def pair_partition(partition: int, settings: dict, work: str) -> dict:
    """The candidate pairs whose first document is in this partition, with its signature attached, sent on to
    the partition of their second document: signatures travel with pairs, never read at random."""
    num_perm = minhash.PRESETS[settings["preset"]].num_perm
    pairs = _read_parquets(_tables_in(f"{work}/pairs/{partition:05d}"), PAIR_SCHEMA)
    a, b = _unique_arcs(pairs["a"].to_numpy(), pairs["b"].to_numpy())
    known, rows = _signatures_of(partition, work, num_perm)
    signature_a = _lookup(a, known, rows)
    signed = _signature_table(a, signature_a)
    _publish_by_node(f"{work}/signed-pairs", f"from-{partition:05d}", b,
                     pa.table({"a": signed["id"], "b": pa.array(b, pa.int64()), "sig": signed["sig"]}),
                     settings["partitions"])
    result = {"partition": partition, "candidates": len(a)}
    files.write_json(f"{work}/pair/{partition:05d}.json", result)
    return result


def verify_partition(partition: int, settings: dict, work: str) -> dict:
    """The candidate pairs whose second document is in this partition whose signatures agree in at least
    `threshold` of their entries (the estimated Jaccard), published as edges of the components graph."""
    num_perm = minhash.PRESETS[settings["preset"]].num_perm
    pairs = _read_parquets(_tables_in(f"{work}/signed-pairs/{partition:05d}"),
                           pa.schema([("a", pa.int64()), ("b", pa.int64()), ("sig", pa.binary(num_perm * 4))]))
    a, b = pairs["a"].to_numpy(), pairs["b"].to_numpy()
    signature_a = _signature_matrix(pairs["sig"], num_perm)
    known, rows = _signatures_of(partition, work, num_perm)
    verified = np.zeros(len(a), dtype=bool)
    for start in range(0, len(a), 1 << 15):
        chunk = slice(start, start + (1 << 15))
        estimate = minhash.estimated_jaccard(signature_a[chunk], _lookup(b[chunk], known, rows))
        verified[chunk] = estimate >= settings["threshold"] - 1e-9
    publish_edges(f"{work}/components/{0:03d}", f"fuzzy-{partition:05d}", a[verified], b[verified],
                  settings["partitions"])
    result = {"partition": partition, "candidates": len(a), "verified": int(verified.sum())}
    files.write_json(f"{work}/verify/{partition:05d}.json", result)
    return result


def node_partition(ids: np.ndarray, partitions: int) -> np.ndarray:
    """The partition that holds a document's edges in the components rounds: a SplitMix64 finalizer of its id,
    so that the consecutive ids of one file spread over every partition."""
    x = ids.astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x % np.uint64(partitions)).astype(np.int64)


def _unique_arcs(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (u, v) pairs, sorted by u then v."""
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    if len(u):
        keep = np.ones(len(u), dtype=bool)
        keep[1:] = (u[1:] != u[:-1]) | (v[1:] != v[:-1])
        u, v = u[keep], v[keep]
    return u, v


def publish_edges(folder: str, source: str, x: np.ndarray, y: np.ndarray, partitions: int) -> None:
    """Undirected edges {x[i], y[i]} as the arcs u -> v and v -> u, each arc in the partition of u, so that a
    task of the next round holds every neighbour of its nodes: `folder/<partition>/<source>.parquet`."""
    u, v = np.concatenate([x, y]), np.concatenate([y, x])
    part = node_partition(u, partitions)
    for p in np.unique(part).tolist():
        mask = part == p
        pu, pv = _unique_arcs(u[mask], v[mask])
        files.write_bytes(f"{folder}/{p:05d}/{source}.parquet", _parquet_bytes(pa.table(
            {"u": pu, "v": pv}, schema=ARC_SCHEMA)))


def star_round(round_: int, partition: int, work: str, partitions: int) -> dict:
    """One round of connected components by alternating large-star and small-star (Kiveris et al., 2014,
    "Connected Components in MapReduce and Beyond") over the nodes of one partition.

    A task holds the arcs of its partition only (each node with all its neighbours), so memory is set by
    `partitions`, not by the corpus; rounds grow with the logarithm of the largest cluster. Even rounds are
    large-star: each node links its larger neighbours to its smallest neighbour (or itself); they also test
    whether every cluster is already a star around its smallest document, and write each node's label (that
    smallest document). Odd rounds are small-star: each node links itself and its smaller neighbours to the
    smallest of them.
    """
    folder = f"{work}/components/{round_:03d}"
    table = _read_parquets(_tables_in(f"{folder}/{partition:05d}"), ARC_SCHEMA)
    u, v = _unique_arcs(table["u"].to_numpy(), table["v"].to_numpy())
    starts, ends = _groups([u])
    nodes, degree, first = u[starts], ends - starts, v[starts]  # first: each node's smallest neighbour
    group = np.repeat(np.arange(len(starts)), degree)
    star = None
    if round_ % 2 == 0:
        smallest = np.minimum(nodes, first)
        # a star: every node either has only larger neighbours (a centre) or one smaller neighbour (a leaf)
        star = bool(np.all((first > nodes) | ((degree == 1) & (first < nodes))))
        files.write_bytes(f"{folder}/labels-{partition:05d}.parquet", _parquet_bytes(pa.table(
            {"u": nodes, "v": smallest}, schema=ARC_SCHEMA)))
        larger = v > u
        x, y = v[larger], smallest[group[larger]]
    else:
        has_smaller = first < nodes  # then `first` is the smallest of them
        linked = (v < u) & (v != first[group])
        x = np.concatenate([v[linked], nodes[has_smaller]])
        y = np.concatenate([first[group[linked]], first[has_smaller]])
    publish_edges(f"{work}/components/{round_ + 1:03d}", f"round-{partition:05d}", x, y, partitions)
    result = {"round": round_, "partition": partition, "nodes": len(nodes), "arcs": len(u), "star": star}
    files.write_json(f"{folder}/{partition:05d}.json", result)
    return result


def resolve_partition(partition: int, labels_round: int, work: str, units: list[dict]) -> dict:
    """The removed documents among one partition's nodes, each with the kept document of its cluster and the
    stage that found it, published per input file for the write stage."""
    labels = _read_parquets([f"{work}/components/{labels_round:03d}/labels-{partition:05d}.parquet"], ARC_SCHEMA)
    nodes, cluster = labels["u"].to_numpy(), labels["v"].to_numpy()
    exact_ids = _read_parquets(_tables_in(f"{work}/exact/{partition:05d}"), ID_SCHEMA)
    removed = nodes != cluster
    ids, kept = nodes[removed], cluster[removed]
    exact = np.isin(ids, exact_ids["id"].to_numpy())
    unit_of = ids >> ID_BITS
    for index in np.unique(unit_of).tolist():
        mask = unit_of == index
        stage = np.where(exact[mask], "exact", "fuzzy")
        files.write_bytes(f"{work}/resolve/{units[index]['uid']}/{partition:05d}.parquet", _parquet_bytes(pa.table(
            {"id": ids[mask], "kept": kept[mask], "stage": stage.tolist()}, schema=REMOVED_SCHEMA)))
    result = {"partition": partition, "exact": int(exact.sum()), "fuzzy": int((~exact).sum()),
              "clusters": int((~removed).sum())}
    files.write_json(f"{work}/resolve/{partition:05d}.json", result)
    return result


def write_unit(unit: dict, settings: dict, work: str, out: str, units: list[dict]) -> dict:
    """The kept documents of one input, in RedPajama jsonl; its removed documents into duplicates/."""
    uid, line_mask = unit["uid"], (1 << ID_BITS) - 1
    removed = _read_parquets(_tables_in(f"{work}/resolve/{uid}"), REMOVED_SCHEMA).to_pylist()
    copies = {row["id"] & line_mask: row for row in removed}
    rejected = np.load(io.BytesIO(files.read_bytes(f"{work}/scan/{uid}/removed.npy")))
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
    files.write_bytes(f"{out}/duplicates/{uid}.parquet", _parquet_bytes(pa.Table.from_pylist(
        duplicates, schema=pa.schema([(c, pa.int64() if c in ("line", "kept_line") else pa.string()) for c in (
            "id", "source", "line", "subset", "stage", "kept_id", "kept_source", "kept_line")]))))
    files.copy_file(f"{work}/scan/{uid}/rejected.parquet", f"{out}/rejected/{uid}.parquet")
    result = {"uid": uid, "kept": kept, "kept_bytes": kept_bytes,
              "duplicates": dict(Counter(row["stage"] for row in duplicates))}
    files.write_json(f"{work}/write/{uid}.json", result)
    return result


# ---- the driver -----------------------------------------------------------------------------------------------


def _run_tasks(stage: str, items: list[Any], task: Callable[[Any], dict], concurrency: int | None,
               on_progress: Progress | None) -> None:
    """`task(item)` for each item as Ray Data tasks of one CPU each (no actor pool: nothing holds CPUs idle)."""
    import ray  # after ray_jobs.connect, which sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER before ray's first import

    if not items:
        return
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars, context.op_resource_reservation_enabled
    context.enable_progress_bars = context.op_resource_reservation_enabled = False
    try:  # a dataset copies the current DataContext when it is made (see data/tokenize.py's run_tasks)
        dataset = ray.data.from_items([{"item": i} for i in items], override_num_blocks=len(items))
    finally:
        context.enable_progress_bars, context.op_resource_reservation_enabled = saved
    done = dataset.map(lambda row: {"done": json.dumps(task(row["item"]))}, num_cpus=1, concurrency=concurrency)
    for finished, _ in enumerate(done.iter_rows(), start=1):
        log.info("dedup %s: %d of %d done", stage, finished, len(items))
        if on_progress is not None:
            on_progress(stage, finished, len(items))


def _components(stage: Callable[[str, list[Any], Callable[[Any], dict]], None], partitions: int,
                work: str) -> int:
    """Run star rounds until every cluster is a star (`work/components.json` records it); the round whose
    labels are final."""
    if _done(f"{work}/components.json"):
        return files.read_json(f"{work}/components.json")["labels_round"]
    round_ = 0
    while True:
        ledger = f"{work}/components/{round_:03d}"
        stage("components", [p for p in range(partitions) if not _done(f"{ledger}/{p:05d}.json")],
              functools.partial(star_round, round_, work=work, partitions=partitions))
        results = [files.read_json(f"{ledger}/{p:05d}.json") for p in range(partitions)]
        log.info("dedup components: round %d, %d arcs (largest partition %d)", round_,
                 sum(r["arcs"] for r in results), max(r["arcs"] for r in results))
        if round_ % 2 == 0 and all(r["star"] for r in results):
            files.write_json(f"{work}/components.json", {"labels_round": round_, "rounds": round_ + 1})
            return round_
        round_ += 1


def _done(ledger: str) -> bool:
    return files.is_file(ledger)


def task_pack() -> Path:
    """The local eval task pack (eval/tasks): its items are what decontamination protects by default."""
    return Path(str(importlib.resources.files("openllama.eval"))) / "tasks"


def run_dedup(config: DedupConfig, on_progress: Progress | None = None) -> dict:
    """Build (or finish, or reuse) the deduplicated corpus `config.out`; returns its manifest.

    `on_progress(stage, finished, to_run)` is called in the driver after each task of each stage.
    """
    units = plan_units([str(i) for i in config.inputs])
    out = config.out.rstrip("/") if files.is_uri(config.out) else str(Path(config.out).absolute())
    items = eval_items(config.decontaminate, task_pack())
    index = contamination_index(items, config.decontaminate_ngram, config.decontaminate_min_words)
    settings = {
        "inputs": [u["path"] for u in units], "exact": config.exact, "fuzzy": config.fuzzy, "preset": config.preset,
        "threshold": config.threshold, "seed": config.seed, "filters": config.filter_names(),
        "min_chars": config.min_chars, "decontaminate": config.decontaminate,
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
    connected = False

    def stage(name: str, pending: list[Any], task: Callable[[Any], dict]) -> None:
        nonlocal connected
        log.info("dedup %s: %d to run", name, len(pending))
        if pending and not connected:
            ray_jobs.connect(config.address, log_to_driver=False, configure_logging=False)
            connected = True
        _run_tasks(name, pending, task, config.concurrency, on_progress)

    stage("scan", [u for u in units if not _done(f"{work}/scan/{u['uid']}.json")],
          lambda u: scan_unit(u, settings, work, index))
    partitions = range(config.partitions)
    stage("match", [p for p in partitions if not _done(f"{work}/match/{p:05d}.json")],
          lambda p: match_partition(p, settings, work))
    stage("pair", [p for p in partitions if not _done(f"{work}/pair/{p:05d}.json")],
          lambda p: pair_partition(p, settings, work))
    stage("verify", [p for p in partitions if not _done(f"{work}/verify/{p:05d}.json")],
          lambda p: verify_partition(p, settings, work))
    labels_round = _components(stage, config.partitions, work)
    stage("resolve", [p for p in partitions if not _done(f"{work}/resolve/{p:05d}.json")],
          lambda p: resolve_partition(p, labels_round, work, units))
    stage("write", [u for u in units if not _done(f"{work}/write/{u['uid']}.json")],
          lambda u: write_unit(u, settings, work, out, units))

    scans = [files.read_json(f"{work}/scan/{u['uid']}.json") for u in units]
    writes = [files.read_json(f"{work}/write/{u['uid']}.json") for u in units]
    stats = summarize(units, scans, writes, index)
    stats["seconds"] = time.perf_counter() - started
    files.write_json(f"{out}/stats.json", stats)
    manifest.update(finished=True, stats=stats)
    files.write_json(manifest_path, manifest)
    files.remove_tree(work)  # keys, signatures and the graph: only a resumed run needs them
    if config.track and os.environ.get("MLFLOW_TRACKING_URI"):
        _log_to_mlflow(settings, stats, config.out)
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


def _log_to_mlflow(settings: dict, stats: dict, out_dir: str) -> None:
    """Record the run in MLflow experiment `data`, beside the tokenize runs (see openllama.tracking)."""
    # Imported here: mlflow takes ~2 s to import, and every Ray worker imports this module for its tasks.
    from mlflow.entities import Metric

    from openllama import tracking

    params = {"stage": "dedup", "out_dir": out_dir, "files": len(settings["inputs"]),
              **{k: v for k, v in settings.items() if k != "inputs"}}
    metrics = {f"total_{k}": v for k, v in stats["total"].items() if isinstance(v, int | float)}
    metrics.update({f"total_rejected_{r}": n for r, n in stats["total"]["rejected"].items()})
    for subset, entry in stats["subsets"].items():
        metrics.update({f"{subset}_{k}": v for k, v in entry.items() if isinstance(v, int | float)})
        metrics.update({f"{subset}_rejected_{r}": n for r, n in entry["rejected"].items()})
    for task, entry in stats["decontamination"].items():
        metrics[f"contaminated_{task}"] = entry["documents_removed"]
    now = int(time.time() * 1000)
    with tracking.run("data", run_name=f"dedup {Path(out_dir).name}", params=params) as run_id:
        tracking.client().log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


def parser() -> argparse.ArgumentParser:
    """`openllama data dedup`'s flags; each defaults to None so that DedupConfig holds the one default."""
    d = DedupConfig
    p = argparse.ArgumentParser(
        prog="openllama data dedup", epilog=commands.EXIT_CODES,
        description="Filter, decontaminate and deduplicate (exact, then MinHash LSH near-duplicates) RedPajama "
                    "jsonl on Ray Data. Writes the kept documents in RedPajama layout, so `tokenizer train` and "
                    "`data tokenize` take OUT as their input. A rerun of the same command finishes a killed run.")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="RedPajama root or subset folders, .jsonl/.jsonl.zst files or globs (local or gs://, s3://)")
    p.add_argument("--out", help="output folder, local or gs://, s3:// (required)")
    p.add_argument("--preset", choices=list(minhash.PRESETS),
                   help=f"MinHash permutations and LSH bands (default: {d.preset}; slimpajama: 9 bands x 13 rows)")
    p.add_argument("--threshold", type=float, help=f"estimated Jaccard of a near-duplicate (default: {d.threshold})")
    p.add_argument("--seed", type=int, help=f"seed of the MinHash permutations (default: {d.seed})")
    p.add_argument("--no-exact", dest="exact", action="store_false", default=None, help="skip exact dedup")
    p.add_argument("--no-fuzzy", dest="fuzzy", action="store_false", default=None, help="skip near-duplicate dedup")
    p.add_argument("--filter", dest="filters", action="append", metavar="NAME",
                   help="quality filter or group (repeatable; default: short): "
                        + ", ".join([*FILTER_GROUPS, *FILTERS]))
    p.add_argument("--min-chars", type=int, help=f"the short filter's length (default: {d.min_chars})")
    p.add_argument("--decontaminate", action="append", metavar="TASK",
                   help=f"eval task whose items' 13-grams mark a document (repeatable; default: {LOCAL_PACK}, the "
                        "local pack; any lm-eval task whose data is cached)")
    p.add_argument("--no-decontaminate", dest="decontaminate", action="store_const", const=[],
                   help="do not decontaminate")
    p.add_argument("--partitions", type=int, help=f"hash partitions; bounds memory per task (default: {d.partitions})")
    p.add_argument("--concurrency", type=int, help="Ray tasks at once (default: as many as CPUs allow)")
    p.add_argument("--max-doc-bytes", type=int, help=f"larger documents are rejected (default: {d.max_doc_bytes})")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an in-process Ray)")
    p.add_argument("--no-track", dest="track", action="store_false", default=None,
                   help="do not log the run to MLflow (default: log it when MLFLOW_TRACKING_URI is set)")
    add_config_arguments(p)
    return p


def main(argv: list[str]) -> int:
    """`openllama data dedup INPUT... --out DIR`: exit 0 done, 2 bad input (one line), 1 failure."""
    args = parser().parse_args(argv)
    args.inputs = args.inputs or None  # none on the command line: from --config or --set

    def work() -> None:
        config = from_arguments(DedupConfig, args)
        commands.quiet_libraries()
        total = run_dedup(config)["stats"]["total"]
        rejected = sum(total["rejected"].values())
        print(f"{config.out}: kept {total['kept']:,} of {total['documents']:,} documents; removed {total['exact']:,} "
              f"exact and {total['fuzzy']:,} near duplicates, {rejected:,} rejected; see {config.out}/stats.json")

    return commands.run("openllama data dedup", work)
