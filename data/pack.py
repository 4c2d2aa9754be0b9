"""`openllama data tokenize`: RedPajama jsonl -> validated, tokenized, packed token shards, on Ray Data.

Work is split into units: a line-aligned byte range (`redpajama.Span`) of an input file, so that the cores of a
cluster share a large file, or a whole file when it is small or compressed. A Ray Data task reads, validates,
tokenizes and packs a whole unit
(the SentencePiece processor is cached per worker process, so there is no actor pool holding CPUs and no
per-row hand-off between stages), publishes its shards, and records the unit as done in the ledger
`units/<unit>.json` (`openllama.data.work`): that is what makes a killed run restartable without duplicates.
The few tokens left over at the end of each unit are packed together per subset when all units are done.
The shard format and the manifest are `openllama.data.shards`'s.

`openllama data convert OLD --out NEW` rewrites a dataset of the first shard format (parquet) in the current one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import logging
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import sentencepiece as spm

from openllama import commands, files
from openllama.config import METAVAR, POSITIONAL, ConfigError
from openllama.data import redpajama
from openllama.data.shards import (
    FORMAT,
    FORMAT_V1,
    SPLITS,
    Manifest,
    Packer,
    RowLayout,
    ShardWriter,
    convert_shard,
    pack_tails,
    read_v1_manifest,
    remove_crashed_writes,
    write_tails,
)
from openllama.data.work import Ledger, Progress, run_units

log = logging.getLogger(__name__)

BATCH_BYTES = 4 << 20


@dataclasses.dataclass
class TokenizeConfig:
    """Everything `openllama data tokenize` runs with; every field but `address` and `track` shapes the dataset."""

    # RedPajama root or subset folders, .jsonl/.jsonl.zst files or globs (local or URI)
    inputs: list[str] = dataclasses.field(metadata={POSITIONAL: True, METAVAR: "INPUT"})
    tokenizer: str  # SentencePiece tokenizer.model (local or URI), from `openllama tokenizer train`
    out: str  # dataset directory (local or URI)
    seq_len: int = 2048  # tokens per training row
    val_fraction: float = 0.01  # share of documents held out for perplexity, chosen by a seeded hash of the text
    seed: int = 0  # of the hold-out hash
    max_doc_bytes: int = redpajama.DEFAULT_MAX_DOC_BYTES  # larger documents are rejected as too_large
    shard_tokens: int = 1 << 26  # tokens per shard at most
    span_bytes: int = 32 << 20  # an uncompressed input larger than this is cut into units of about this size
    address: str | None = None  # Ray cluster (GCS) address; None: RAY_ADDRESS, else an in-process Ray
    track: bool = True  # log the run to MLflow experiment `data`

    def __post_init__(self) -> None:
        for name in ("seq_len", "max_doc_bytes", "shard_tokens", "span_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in [0, 1)")


@dataclasses.dataclass
class ConvertConfig:
    """What `openllama data convert` runs with: an old-format dataset and the new folder to write it to."""

    # a finished openllama-packed-v1 dataset (local or URI)
    source: str = dataclasses.field(metadata={POSITIONAL: True, METAVAR: "OLD_DIR"})
    out: str  # the new dataset directory (local or URI), not the source
    address: str | None = None  # Ray cluster (GCS) address; None: RAY_ADDRESS, else an in-process Ray


DEFAULT_VAL_FRACTION = TokenizeConfig.val_fraction
DEFAULT_SHARD_TOKENS = TokenizeConfig.shard_tokens


@functools.lru_cache(maxsize=4)
def _processor(model_proto: bytes) -> spm.SentencePieceProcessor:
    """One SentencePiece processor per worker process and model, reused by every unit that process runs."""
    return spm.SentencePieceProcessor(model_proto=model_proto)


def is_validation(text: str, val_fraction: float, seed: int) -> bool:
    """Deterministic hold-out by a seeded hash of the text: the same document lands in the same split on reruns."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little") < val_fraction * 2**64


def unit_id(span: redpajama.Span) -> str:
    """A stable, filesystem-safe name for the work unit of one input span (the file's name, and where it starts)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", span.path.rsplit("/", 1)[-1])[:60]
    uid = f"{redpajama.subset_of(span.path)}-{stem}-{hashlib.sha1(span.path.encode()).hexdigest()[:10]}"
    return uid if span.whole else f"{uid}-at{span.start:013d}"


def run_unit(unit: dict, settings: dict, root: str, model_proto: bytes) -> dict:
    """Read, validate, tokenize and pack one input span; its report for the ledger."""
    processor = _processor(model_proto)
    path, subset, uid = unit["path"], unit["subset"], unit["unit_id"]
    source = unit.get("source", path)  # a part of a streamed .zst file is read from its staging copy
    span = redpajama.Span(path, unit["start"], unit["end"])
    seq_len = settings["seq_len"]
    shard_rows = max(1, settings["shard_tokens"] // seq_len)
    layout = RowLayout.for_vocabulary(seq_len, processor.get_piece_size())
    packers = {split: Packer(seq_len) for split in SPLITS}
    stats = {split: {"documents": 0, "tokens": 0, "bytes": 0} for split in SPLITS}
    rejected: list[dict] = []
    batch: dict[str, list[str]] = {split: [] for split in SPLITS}
    batch_bytes = 0

    with contextlib.ExitStack() as stack:
        writers = {split: stack.enter_context(ShardWriter(root, f"{uid}-", split, subset, layout, shard_rows,
                                                          processor.bos_id()))
                   for split in SPLITS}

        def flush() -> None:
            for split in SPLITS:
                if not batch[split]:
                    continue
                ids = processor.encode(batch[split], add_bos=True, add_eos=True, num_threads=1)  # one CPU per task
                lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
                tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
                stats[split]["tokens"] += len(tokens)
                writers[split].add(packers[split].add(tokens))
                batch[split] = []

        for record in redpajama.read_records(span, settings["max_doc_bytes"], tuple(unit.get("origin", (0, 1)))):
            if isinstance(record, redpajama.Rejected):
                rejected.append({"reason": record.reason, "source": source, "line": record.line,
                                 "offset": record.offset, "excerpt": record.excerpt})
                continue
            split = "validation" if is_validation(record.text, settings["val_fraction"], settings["seed"]) else "train"
            batch[split].append(record.text)
            stats[split]["documents"] += 1
            stats[split]["bytes"] += record.nbytes
            batch_bytes += record.nbytes
            if batch_bytes >= BATCH_BYTES:
                flush()
                batch_bytes = 0
        flush()
    if unit.get("truncated"):  # the cut-off last line of a streamed .zst, found when it was split
        rejected.append({"source": source, **unit["truncated"]})

    write_tails(root, uid, {split: packers[split].pending for split in SPLITS})
    if rejected:
        files.write_parquet(f"{root}/rejected/{uid}.parquet", pa.Table.from_pylist(rejected))
    reasons: dict[str, int] = {}
    for row in rejected:
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    return {
        "source": source, "start": span.start, "end": span.end, "subset": subset,
        "shards": writers["train"].written + writers["validation"].written,
        "made_rows": {split: packers[split].made_rows for split in SPLITS},
        "stats": stats, "rejected": reasons,
    }


def summarize(units: list[dict], shards: list[dict], dropped: dict) -> dict:
    """Per-subset statistics: documents, tokens, bytes per token, packed rows, rejections by reason."""
    per_subset: dict[str, dict] = {}
    sources: dict[str, set[str]] = {}
    for unit in units:
        entry = per_subset.setdefault(unit["subset"], {
            "files": 0, "documents": 0, "validation_documents": 0, "tokens": 0, "bytes": 0,
            "rejected": {},
        })
        sources.setdefault(unit["subset"], set()).add(unit["source"])
        entry["files"] = len(sources[unit["subset"]])
        entry["documents"] += unit["stats"]["train"]["documents"] + unit["stats"]["validation"]["documents"]
        entry["validation_documents"] += unit["stats"]["validation"]["documents"]
        entry["tokens"] += unit["stats"]["train"]["tokens"] + unit["stats"]["validation"]["tokens"]
        entry["bytes"] += unit["stats"]["train"]["bytes"] + unit["stats"]["validation"]["bytes"]
        for reason, n in unit["rejected"].items():
            entry["rejected"][reason] = entry["rejected"].get(reason, 0) + n
    for subset, entry in per_subset.items():
        entry["bytes_per_token"] = entry["bytes"] / max(1, entry["tokens"])
        for split in SPLITS:
            entry[f"{split}_rows"] = sum(s["rows"] for s in shards if s["split"] == split and s["subset"] == subset)
            entry[f"{split}_tokens_dropped"] = dropped.get(f"{split}/{subset}", 0)
    totals = {key: sum(e[key] for e in per_subset.values()) for key in ("documents", "tokens", "bytes")}
    totals["rejected"] = sum(sum(e["rejected"].values()) for e in per_subset.values())
    return {"subsets": per_subset, "total": totals}


def run_split(item: dict, settings: dict, root: str) -> dict:
    """Stream one large .zst input once into plain parts under staging/; its report lists them."""
    folder = f"{root}/staging/{item['unit_id']}"
    parts, truncated = redpajama.split_stream(
        item["path"], settings["span_bytes"],
        lambda index, data: files.write_bytes(f"{folder}/part-{index:05d}.jsonl", data))
    return {"source": item["path"],
            "parts": [{"path": f"{folder}/part-{p.index:05d}.jsonl", "offset": p.offset, "line": p.line}
                      for p in parts],
            "truncated": None if truncated is None else {"reason": truncated.reason, "line": truncated.line,
                                                         "offset": truncated.offset, "excerpt": truncated.excerpt}}


def plan_units(inputs: list[str], settings: dict, root: str, address: str | None) -> list[dict]:
    """The work units of `inputs`: byte spans of plain files, and the parts of large .zst files, which are
    streamed once into staging/ first (by Ray tasks, one per file, skipped when the ledger has the split)."""
    units, streamed = [], []
    for path in inputs:
        if redpajama.needs_streamed_split(path, settings["span_bytes"]):
            streamed.append({"unit_id": unit_id(redpajama.Span(path)), "path": path,
                             "subset": redpajama.subset_of(path)})
            continue
        units += [{"unit_id": unit_id(s), "path": s.path, "start": s.start, "end": s.end,
                   "subset": redpajama.subset_of(s.path)} for s in redpajama.spans_of(path, settings["span_bytes"])]
    splits = run_units("split compressed files", streamed, lambda item: item["unit_id"],
                       functools.partial(run_split, settings=settings, root=root),
                       Ledger.of(f"{root}/staging", settings), address)
    for item, split in zip(streamed, splits, strict=True):
        last = len(split["parts"]) - 1
        units += [{"unit_id": f"{item['unit_id']}-part{n:05d}", "path": part["path"], "start": 0, "end": None,
                   "subset": item["subset"], "source": item["path"], "origin": [part["offset"], part["line"]],
                   "truncated": split["truncated"] if n == last else None}
                  for n, part in enumerate(split["parts"])]
    return units


def dataset_root(out: str) -> str:
    """`out` as every process can reach it: a URI as given, a local path made absolute (Ray workers' cwd differs)."""
    return out.rstrip("/") if files.is_uri(out) else str(Path(out).absolute())


def build_dataset(config: TokenizeConfig, on_progress: Progress | None = None) -> dict:
    """Build (or finish, or reuse) the packed dataset `config.out`; returns the manifest.

    `on_progress(what, finished, to_run)` is called after each unit this run tokenizes, in the driver.
    """
    inputs = redpajama.expand_inputs([str(i) for i in config.inputs])
    tokenizer = config.tokenizer if files.is_uri(config.tokenizer) else str(Path(config.tokenizer).absolute())
    root = dataset_root(config.out)
    try:
        model_proto = files.read_bytes(tokenizer)
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer {config.tokenizer} does not exist; pass --tokenizer "
                                "PATH/tokenizer.model (from `openllama tokenizer train`)") from None
    processor = _processor(model_proto)
    settings = {
        "inputs": inputs, "tokenizer_sha256": hashlib.sha256(model_proto).hexdigest(), "seq_len": config.seq_len,
        "val_fraction": config.val_fraction, "seed": config.seed, "max_doc_bytes": config.max_doc_bytes,
        "shard_tokens": config.shard_tokens, "span_bytes": config.span_bytes, "format": FORMAT,
    }
    try:
        previous = Manifest.find(root)
    except (NotADirectoryError, PermissionError) as error:
        raise commands.BadInput(f"--out {config.out} cannot be read: {error.strerror or error}") from None
    if previous is not None:
        if previous.get("format") == FORMAT_V1:
            raise commands.BadInput(
                f"{config.out} holds a dataset in the old format {FORMAT_V1}; convert it with `openllama data "
                f"convert {config.out} --out NEW_DIR`, or choose a new --out to tokenize again"
            )
        if previous.get("settings") != settings:
            differs = sorted(k for k in settings if previous.get("settings", {}).get(k) != settings[k])
            raise commands.BadInput(
                f"{config.out} holds a dataset built with other settings or inputs (differs in: {differs}); "
                "choose a new --out or delete the old one"
            )
        if previous.get("finished") is True:
            log.info("%s is finished and up to date; reusing it", config.out)
            return previous
    tokenizer_entry = {"path": tokenizer, "sha256": settings["tokenizer_sha256"],
                       "vocab_size": processor.get_piece_size()}
    layout = RowLayout.for_vocabulary(config.seq_len, processor.get_piece_size())
    manifest = Manifest(layout, tokenizer_entry, settings=settings)
    try:
        manifest.write(root)
    except OSError as error:  # a folder under a file, a read-only filesystem: found before any work
        raise commands.BadInput(f"--out {config.out} cannot be written: {error.strerror or error}") from None
    remove_crashed_writes(root)

    units = plan_units(inputs, settings, root, config.address)
    started = time.perf_counter()
    results = run_units("tokenize units", units, lambda unit: unit["unit_id"],
                        functools.partial(run_unit, settings=settings, root=root, model_proto=model_proto),
                        Ledger.of(f"{root}/units", settings), config.address, on_progress=on_progress)
    remove_crashed_writes(root)  # what tasks on a lost node left before Ray ran them again elsewhere
    tail_shards, dropped = pack_tails(root, results, layout, processor.bos_id())
    manifest.shards = [s for r in results for s in r["shards"]] + tail_shards
    manifest.stats = summarize(results, manifest.shards, dropped)
    manifest.stats["seconds"] = time.perf_counter() - started
    files.write_json(f"{root}/stats.json", manifest.stats)
    # the parts of streamed .zst inputs are tokenized; removed before `finished` is written, so that no crash
    # leaves them behind (one before it makes the rerun split those files again, then skip every done unit)
    files.remove_tree(f"{root}/staging")
    manifest.finished = True
    written = manifest.write(root)
    if config.track:
        # imported here: mlflow takes ~2 s to import, and every Ray worker imports this module for `run_unit`
        from openllama import tracking

        tracking.log_summary("data", f"tokenize {Path(config.out).name}", summary_params(settings, config.out),
                             summary_metrics(manifest.stats))
    return written


def summary_params(settings: dict, out: str) -> dict:
    """A data run's MLflow params: its settings, with the input list as its length."""
    return {"out_dir": out, "files": len(settings["inputs"]), **{k: v for k, v in settings.items() if k != "inputs"}}


def summary_metrics(stats: dict) -> dict[str, float]:
    """The tokenize run's counts as MLflow metrics: totals, and per subset its counts and rejections by reason."""
    metrics = {f"total_{k}": v for k, v in stats["total"].items()}
    for subset, entry in stats["subsets"].items():
        metrics.update({f"{subset}_{k}": v for k, v in entry.items() if isinstance(v, int | float)})
        metrics.update({f"{subset}_rejected_{r}": n for r, n in entry["rejected"].items()})
    return metrics


def tokenize_dataset(inputs: list[str], tokenizer: str | Path, out_dir: str | Path, seq_len: int = 2048,
                     val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0,
                     max_doc_bytes: int = redpajama.DEFAULT_MAX_DOC_BYTES,
                     shard_tokens: int = DEFAULT_SHARD_TOKENS, address: str | None = None,
                     track: bool = True, on_progress: Progress | None = None,
                     span_bytes: int = TokenizeConfig.span_bytes) -> dict:
    """`build_dataset` with the settings as arguments, for callers that have no TokenizeConfig."""
    settings = TokenizeConfig(
        inputs=[str(i) for i in inputs], tokenizer=str(tokenizer), out=str(out_dir), seq_len=seq_len,
        val_fraction=val_fraction, seed=seed, max_doc_bytes=max_doc_bytes, shard_tokens=shard_tokens,
        span_bytes=span_bytes, address=address, track=track,
    )
    return build_dataset(settings, on_progress)


def convert_dataset(source: str, out: str, address: str | None = None, on_progress: Progress | None = None) -> dict:
    """Rewrite a finished `openllama-packed-v1` dataset at `source` in the current format at `out`; its manifest.

    The rows are the same, shard for shard (`x.parquet` becomes `x.bin`), one Ray task per shard. Each
    converted shard is a unit of the ledger `out/units/`, so a killed conversion rerun with the same arguments
    redoes only what was not done; the manifest is written last.
    """
    source, out = dataset_root(source), dataset_root(out)
    old = read_v1_manifest(source, out)
    settings = {**old.get("settings", {}), "format": FORMAT}
    previous = Manifest.find(out)
    if previous is not None:
        if previous.get("converted_from") != source or previous.get("settings") != settings:
            raise commands.BadInput(f"--out {out} holds another dataset; choose a new folder or delete it")
        if previous.get("finished") is True:
            return previous
    vocab_size = (old.get("tokenizer") or {}).get("vocab_size") or 1 << 32
    layout = RowLayout.for_vocabulary(int(old["seq_len"]), vocab_size)
    kept = {k: v for k, v in old.items() if k not in ("shards", "format", "finished", "settings", "seq_len",
                                                      "token_dtype", "row_bytes", "tokenizer", "stats")}
    manifest = Manifest(layout, old.get("tokenizer") or {}, stats=old.get("stats") or {}, settings=settings,
                        extra={**kept, "converted_from": source})
    manifest.write(out)
    remove_crashed_writes(out)
    # a shard's unit id is its old path's hash; the ledger's settings hash covers every old shard's sha256
    ledger = Ledger.of(f"{out}/units", {"converted_from": source, "shards": old["shards"]})
    def shard_id(entry: dict) -> str:
        return "convert-" + hashlib.sha1(entry["path"].encode()).hexdigest()[:16]

    done = run_units("convert shards", old["shards"], shard_id,
                     lambda entry: {"shard": convert_shard(source, out, entry, layout)}, ledger, address,
                     on_progress=on_progress)
    manifest.shards = [entry["shard"] for entry in done]
    for name in ["stats.json", *(f"rejected/{p.rsplit('/', 1)[-1]}" for p in files.files_under(f"{source}/rejected"))]:
        if files.is_file(f"{source}/{name}"):  # what the old run said besides its shards
            files.copy_file(f"{source}/{name}", f"{out}/{name}")
    manifest.finished = True
    return manifest.write(out)


def tokenize_command(config: TokenizeConfig) -> None:
    """Validate, tokenize and pack RedPajama jsonl into token shards on Ray Data. A rerun of the same command
    finishes a killed run, or reuses a finished one."""
    commands.quiet_libraries()
    total = build_dataset(config)["stats"]["total"]
    print(f"{config.out}: {total['documents']:,} documents, {total['tokens']:,} tokens, "
          f"{total['rejected']:,} rejected lines; see {config.out}/stats.json")


def convert_command(config: ConvertConfig) -> None:
    """Rewrite a finished dataset of the first format (openllama-packed-v1: parquet shards, read whole) in the
    current one (rows read one by one), shard for shard with the same rows. A rerun finishes a killed conversion."""
    manifest = convert_dataset(config.source, config.out, config.address)
    rows = sum(shard["rows"] for shard in manifest["shards"])
    print(f"{config.out}: {len(manifest['shards'])} shards, {rows:,} rows in {FORMAT} "
          f"({manifest['token_dtype']} tokens), converted from {config.source}")
