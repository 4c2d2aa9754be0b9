"""`openllama data tokenize`: RedPajama jsonl -> validated, tokenized, packed token shards, on Ray Data.

Work is split into units: a line-aligned byte range (`redpajama.Span`) of an input file, so that the cores of a
cluster share a large file, or a whole file when it is small or compressed. A Ray Data task reads, validates,
tokenizes and packs a whole unit
(the SentencePiece processor is cached per worker process, so there is no actor pool holding CPUs and no
per-row hand-off between stages), publishes its shards, and records the unit as done in `units/<unit>.json`:
that ledger is what makes a killed run restartable without duplicates. The few tokens left over at the end of
each unit are packed together per subset when all units are done. The shard format is `openllama.data.shards`.

`openllama data convert OLD --out NEW` rewrites a dataset of the first shard format (parquet) in the current one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import sentencepiece as spm
from tqdm import tqdm

from openllama import commands, files, ray_jobs
from openllama.config import ConfigError, add_config_arguments, from_arguments
from openllama.data import redpajama
from openllama.data.shards import (
    FORMAT,
    FORMAT_V1,
    SPLITS,
    Packer,
    RowLayout,
    ShardWriter,
    convert_v1,
    pack_tails,
    remove_crashed_writes,
    write_tails,
)

log = logging.getLogger(__name__)

BATCH_BYTES = 4 << 20

UnitDone = Callable[[int, int], None]  # (units finished, units to run), called in the driver after each unit


@dataclasses.dataclass
class TokenizeConfig:
    """Everything `openllama data tokenize` runs with; every field but `address` and `track` shapes the dataset."""

    inputs: list[str]  # RedPajama root or subset folders, .jsonl/.jsonl.zst files or globs (local or URI)
    tokenizer: str  # SentencePiece tokenizer.model (local or URI)
    out: str  # dataset directory (local or URI)
    seq_len: int = 2048
    val_fraction: float = 0.01  # share of documents held out, chosen by a seeded hash of the text
    seed: int = 0
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

    source: str  # a finished openllama-packed-v1 dataset (local or URI)
    out: str  # the new dataset directory (local or URI), not the source


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


def _ledger_entry(root: str, uid: str) -> str:
    """Where the ledger records unit `uid` as done; written last, so its presence means the unit is complete."""
    return f"{root}/units/{uid}.json"


def run_unit(unit: dict, settings: dict, root: str, model_proto: bytes) -> dict:
    """Read, validate, tokenize and pack one input span; record it as done in units/<id>.json."""
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
        files.write_bytes(f"{root}/rejected/{uid}.parquet", _parquet_bytes(pa.Table.from_pylist(rejected)))
    reasons: dict[str, int] = {}
    for row in rejected:
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    result = {
        "unit_id": uid, "source": source, "start": span.start, "end": span.end, "subset": subset,
        "settings_sha": settings_sha(settings),
        "shards": writers["train"].written + writers["validation"].written,
        "made_rows": {split: packers[split].made_rows for split in SPLITS},
        "stats": stats, "rejected": reasons,
    }
    files.write_json(_ledger_entry(root, uid), result)
    return result


def _parquet_bytes(table: pa.Table) -> bytes:
    """A table as parquet bytes, to publish whole with `files.write_bytes`."""
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def settings_sha(settings: dict) -> str:
    """The identity of a run's settings, recorded in each ledger entry: a unit done with others is redone."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


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
    """Stream one large .zst input once into plain parts under staging/; record them in staging/<id>.json."""
    folder = f"{root}/staging/{item['unit_id']}"
    parts, truncated = redpajama.split_stream(
        item["path"], settings["span_bytes"],
        lambda index, data: files.write_bytes(f"{folder}/part-{index:05d}.jsonl", data))
    result = {"unit_id": item["unit_id"], "source": item["path"], "settings_sha": settings_sha(settings),
              "parts": [{"path": f"{folder}/part-{p.index:05d}.jsonl", "offset": p.offset, "line": p.line}
                        for p in parts],
              "truncated": None if truncated is None else {"reason": truncated.reason, "line": truncated.line,
                                                           "offset": truncated.offset, "excerpt": truncated.excerpt}}
    files.write_json(_split_entry(root, item["unit_id"]), result)
    return result


def _split_entry(root: str, uid: str) -> str:
    """Where the ledger records the split of a streamed input; written after all its parts."""
    return f"{root}/staging/{uid}.json"


def run_tasks(items: list[dict], work: Callable[[dict], dict], what: str,
              on_done: UnitDone | None = None) -> None:
    """`work(item)` for every item as Ray Data tasks, one item per task, each using one CPU."""
    import ray  # after ray_jobs.connect, which sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER before ray's first import

    # A dataset takes a copy of the current DataContext when it is made: set ours for this one, then put
    # the process's settings back. Our tqdm counts items. Ray Data reserves a share of the CPUs per
    # operator; with the single map operator here that only holds CPUs back (on 2 CPUs: one task at a
    # time for the first second, then 0.1-0.2 s idle between tasks).
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars, context.op_resource_reservation_enabled
    context.enable_progress_bars = context.op_resource_reservation_enabled = False
    try:
        dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    finally:
        context.enable_progress_bars, context.op_resource_reservation_enabled = saved
    done = dataset.map(lambda row: {"unit_id": work(row)["unit_id"]}, num_cpus=1)
    with tqdm(total=len(items), desc=what, unit="unit", file=sys.stderr) as progress:
        for finished, _ in enumerate(done.iter_rows(), start=1):
            progress.update(1)
            if on_done is not None:
                on_done(finished, len(items))


def plan_units(inputs: list[str], settings: dict, root: str, address: str | None) -> list[dict]:
    """The work units of `inputs`: byte spans of plain files, and the parts of large .zst files, which are
    streamed once into staging/ first (by Ray tasks, one per file, skipped when the ledger has the split)."""
    sha = settings_sha(settings)
    units, streamed = [], []
    for path in inputs:
        if redpajama.needs_streamed_split(path, settings["span_bytes"]):
            streamed.append({"unit_id": unit_id(redpajama.Span(path)), "path": path,
                             "subset": redpajama.subset_of(path)})
            continue
        units += [{"unit_id": unit_id(s), "path": s.path, "start": s.start, "end": s.end,
                   "subset": redpajama.subset_of(s.path)} for s in redpajama.spans_of(path, settings["span_bytes"])]
    pending = [i for i in streamed
               if (_read_json_if_present(_split_entry(root, i["unit_id"])) or {}).get("settings_sha") != sha]
    if pending:
        log.info("streaming %d compressed files into parts of about %d bytes", len(pending), settings["span_bytes"])
        ray_jobs.connect(address, log_to_driver=False, configure_logging=False)
        run_tasks(pending, lambda item: run_split(item, settings, root), "split compressed files")
    for item in streamed:
        split = files.read_json(_split_entry(root, item["unit_id"]))
        last = len(split["parts"]) - 1
        units += [{"unit_id": f"{item['unit_id']}-part{n:05d}", "path": part["path"], "start": 0, "end": None,
                   "subset": item["subset"], "source": item["path"], "origin": [part["offset"], part["line"]],
                   "truncated": split["truncated"] if n == last else None}
                  for n, part in enumerate(split["parts"])]
    return units


def _read_json_if_present(location: str) -> dict | None:
    """The JSON at `location` (local or URI), or None when there is no file there."""
    fs, path = files.filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    return files.read_json(location)


def _dataset_root(out: str) -> str:
    """`out` as every process can reach it: a URI as given, a local path made absolute (Ray workers' cwd differs)."""
    return out.rstrip("/") if files.is_uri(out) else str(Path(out).absolute())


def build_dataset(config: TokenizeConfig, on_unit_done: UnitDone | None = None) -> dict:
    """Build (or finish, or reuse) the packed dataset `config.out`; returns the manifest.

    `on_unit_done(finished, to_run)` is called after each unit this run tokenizes, in the driver.
    """
    inputs = redpajama.expand_inputs([str(i) for i in config.inputs])
    tokenizer = config.tokenizer if files.is_uri(config.tokenizer) else str(Path(config.tokenizer).absolute())
    root = _dataset_root(config.out)
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
    manifest_path = f"{root}/manifest.json"
    try:
        previous = _read_json_if_present(manifest_path)
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
    manifest = {"format": FORMAT, "finished": False, "seq_len": config.seq_len, **layout.manifest_fields(),
                "tokenizer": tokenizer_entry, "settings": settings, "shards": [], "stats": {}}
    try:
        files.write_json(manifest_path, manifest)
    except OSError as error:  # a folder under a file, a read-only filesystem: found before any work
        raise commands.BadInput(f"--out {config.out} cannot be written: {error.strerror or error}") from None
    remove_crashed_writes(root)

    units = plan_units(inputs, settings, root, config.address)
    sha = settings_sha(settings)
    pending = [u for u in units
               if (_read_json_if_present(_ledger_entry(root, u["unit_id"])) or {}).get("settings_sha") != sha]
    log.info("%d input files in %d units, %d already done, %d to tokenize", len(inputs), len(units),
             len(units) - len(pending), len(pending))
    started = time.perf_counter()
    if pending:
        ray_jobs.connect(config.address, log_to_driver=False, configure_logging=False)
        run_tasks(pending, lambda unit: run_unit(unit, settings, root, model_proto), "tokenize units", on_unit_done)
        remove_crashed_writes(root)  # what tasks on a lost node left before Ray ran them again elsewhere
    results = [files.read_json(_ledger_entry(root, u["unit_id"])) for u in units]
    tail_shards, dropped = pack_tails(root, results, layout, processor.bos_id())
    shards = [s for r in results for s in r["shards"]] + tail_shards
    stats = summarize(results, shards, dropped)
    stats["seconds"] = time.perf_counter() - started
    files.write_json(f"{root}/stats.json", stats)
    # the parts of streamed .zst inputs are tokenized; removed before `finished` is written, so that no crash
    # leaves them behind (one before it makes the rerun split those files again, then skip every done unit)
    files.remove_tree(f"{root}/staging")
    manifest.update(finished=True, shards=shards, stats=stats)
    files.write_json(manifest_path, manifest)
    if config.track:
        _log_to_mlflow(settings, stats, config.out)
    return manifest


def tokenize_dataset(inputs: list[str], tokenizer: str | Path, out_dir: str | Path, seq_len: int = 2048,
                     val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0,
                     max_doc_bytes: int = redpajama.DEFAULT_MAX_DOC_BYTES,
                     shard_tokens: int = DEFAULT_SHARD_TOKENS, address: str | None = None,
                     track: bool = True, on_unit_done: UnitDone | None = None,
                     span_bytes: int = TokenizeConfig.span_bytes) -> dict:
    """`build_dataset` with the settings as arguments, for callers that have no TokenizeConfig."""
    settings = TokenizeConfig(
        inputs=[str(i) for i in inputs], tokenizer=str(tokenizer), out=str(out_dir), seq_len=seq_len,
        val_fraction=val_fraction, seed=seed, max_doc_bytes=max_doc_bytes, shard_tokens=shard_tokens,
        span_bytes=span_bytes, address=address, track=track,
    )
    return build_dataset(settings, on_unit_done)


def _log_to_mlflow(settings: dict, stats: dict, out_dir: str) -> None:
    """Record the run in MLflow experiment `data` (see openllama.tracking for where runs go)."""
    # Imported here: mlflow takes ~2 s to import, and every Ray worker imports this module for `run_unit`.
    from mlflow.entities import Metric

    from openllama import tracking

    params = {"out_dir": out_dir, "files": len(settings["inputs"]),
              **{k: v for k, v in settings.items() if k != "inputs"}}
    metrics = {f"total_{k}": v for k, v in stats["total"].items()}
    for subset, entry in stats["subsets"].items():
        metrics.update({f"{subset}_{k}": v for k, v in entry.items() if isinstance(v, int | float)})
        metrics.update({f"{subset}_rejected_{r}": n for r, n in entry["rejected"].items()})
    now = int(time.time() * 1000)
    with tracking.run("data", run_name=f"tokenize {Path(out_dir).name}", params=params) as run_id:
        tracking.client().log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


def parser() -> argparse.ArgumentParser:
    """`openllama data`'s flags; each defaults to None so that TokenizeConfig holds the one default."""
    defaults = TokenizeConfig
    top = argparse.ArgumentParser(prog="openllama data", description="Prepare RedPajama for pretraining.",
                                  epilog=commands.EXIT_CODES)
    verbs = top.add_subparsers(dest="command", required=True)
    tok = verbs.add_parser(
        "tokenize", help="validate, tokenize and pack jsonl into token shards", epilog=commands.EXIT_CODES,
        description="Validate, tokenize and pack RedPajama jsonl into token shards on Ray Data. A rerun of the "
                    "same command finishes a killed run, or reuses a finished one.")
    tok.add_argument("inputs", nargs="*", metavar="INPUT",
                     help="RedPajama root or subset folders, .jsonl/.jsonl.zst files or globs (local or gs://, s3://)")
    tok.add_argument("--tokenizer", help="SentencePiece tokenizer.model (required)")
    tok.add_argument("--out", help="output dataset directory, local or URI (required)")
    tok.add_argument("--seq-len", type=int, help=f"tokens per training row (default: {defaults.seq_len})")
    tok.add_argument("--val-fraction", type=float,
                     help="share of documents held out for perplexity, chosen by a seeded hash of the text "
                          f"(default: {defaults.val_fraction})")
    tok.add_argument("--seed", type=int, help=f"seed of the hold-out hash (default: {defaults.seed})")
    tok.add_argument("--max-doc-bytes", type=int,
                     help=f"documents larger than this are rejected as too_large (default: {defaults.max_doc_bytes})")
    tok.add_argument("--shard-tokens", type=int, help=f"tokens per shard at most (default: {defaults.shard_tokens})")
    tok.add_argument("--span-bytes", type=int,
                     help="uncompressed inputs larger than this are cut into line-aligned byte ranges of about "
                          f"this size, tokenized in parallel (default: {defaults.span_bytes})")
    tok.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an in-process Ray)")
    tok.add_argument("--no-track", dest="track", action="store_false", default=None,
                     help="do not log the run to MLflow (default: log it)")
    add_config_arguments(tok)
    convert = verbs.add_parser(
        "convert", help=f"rewrite a {FORMAT_V1} (parquet) dataset in {FORMAT}", epilog=commands.EXIT_CODES,
        description=f"Rewrite a finished {FORMAT_V1} dataset (parquet shards, read whole) in {FORMAT} (rows read "
                    "one by one), shard for shard with the same rows. A rerun finishes a killed conversion.")
    convert.add_argument("source", nargs="?", metavar="OLD_DIR", help=f"the {FORMAT_V1} dataset (local or URI)")
    convert.add_argument("--out", help="the new dataset directory, local or URI (required)")
    add_config_arguments(convert)
    # listed for `openllama data --help`; `main` hands `dedup ...` to its own parser before this one runs
    verbs.add_parser("dedup", add_help=False,
                     help="deduplicate (exact and MinHash), filter and decontaminate a RedPajama corpus "
                          "(`openllama data dedup --help`)")
    return top


def main(argv: list[str]) -> int:
    if argv[:1] == ["dedup"]:
        # dedup has its own parser and config (openllama.data.dedup); imported only when it is the verb
        from openllama.data import dedup

        return dedup.main(argv[1:])
    args = parser().parse_args(argv)
    if args.command == "convert":
        return commands.run("openllama data convert", lambda: convert_dataset(from_arguments(ConvertConfig, args)))
    args.inputs = args.inputs or None  # none on the command line: from --config or --set

    def work() -> None:
        settings = from_arguments(TokenizeConfig, args)
        commands.quiet_libraries()
        manifest = build_dataset(settings)
        total = manifest["stats"]["total"]
        print(f"{settings.out}: {total['documents']:,} documents, {total['tokens']:,} tokens, "
              f"{total['rejected']:,} rejected lines; see {settings.out}/stats.json")

    return commands.run("openllama data tokenize", work)


def convert_dataset(config: ConvertConfig) -> None:
    """`openllama data convert`: the old dataset rewritten at `config.out`, with a line saying what was written."""
    manifest = convert_v1(_dataset_root(config.source), _dataset_root(config.out))
    rows = sum(shard["rows"] for shard in manifest["shards"])
    print(f"{config.out}: {len(manifest['shards'])} shards, {rows:,} rows in {FORMAT} "
          f"({manifest['token_dtype']} tokens), converted from {config.source}")
