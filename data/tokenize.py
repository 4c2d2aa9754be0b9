"""`openllama data tokenize`: RedPajama jsonl -> validated, tokenized, packed parquet shards, on Ray Data.

Work is split into units, one per input file. A Ray Data task reads, validates, tokenizes and packs a whole unit
(the SentencePiece processor is cached per worker process, so there is no actor pool holding CPUs and no
per-row hand-off between stages), writes its shards under temporary names, renames them, and records the unit
as done in `units/<unit>.json`: that ledger is what makes a killed run restartable without duplicates.
The few tokens left over at the end of each unit are packed together per subset when all units are done.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import itertools
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import sentencepiece as spm

from openllama import ray_jobs
from openllama.data import redpajama
from openllama.data.shards import FORMAT, filesystem, read_bytes

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
DEFAULT_VAL_FRACTION = 0.01
DEFAULT_SHARD_TOKENS = 1 << 26
BATCH_BYTES = 4 << 20
STOP_AFTER_UNITS_ENV = "OPENLLAMA_DATA_STOP_AFTER_UNITS"  # test hook: simulate a crash after N finished units


class Store:
    """Output directory on any pyarrow filesystem; every write goes to a temporary name and is renamed."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.fs, self.base = filesystem(self.root)
        self.fs.create_dir(self.base, recursive=True)

    def path(self, relative: str) -> str:
        return f"{self.base}/{relative}"

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type == pafs.FileType.File

    def read(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as f:
            return f.read()

    def write(self, relative: str, data: bytes) -> None:
        target = self.path(relative)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        temporary = f"{target}.tmp-{os.getpid()}"
        with self.fs.open_output_stream(temporary) as f:
            f.write(data)
        self.fs.move(temporary, target)

    def read_json(self, relative: str) -> dict:
        return json.loads(self.read(relative))

    def write_json(self, relative: str, value: dict) -> None:
        self.write(relative, json.dumps(value, indent=1, sort_keys=True).encode())


@functools.lru_cache(maxsize=4)
def _processor(model_proto: bytes) -> spm.SentencePieceProcessor:
    """One SentencePiece processor per worker process and model, reused by every unit that process runs."""
    return spm.SentencePieceProcessor(model_proto=model_proto)


def is_validation(text: str, val_fraction: float, seed: int) -> bool:
    """Deterministic hold-out by a seeded hash of the text: the same document lands in the same split on reruns."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little") < val_fraction * 2**64


class Packer:
    """Concatenates token streams and cuts rows of seq_len + 1 tokens, each row starting with the previous
    row's last token, so every token after the stream's first is a target exactly once."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.pending = np.zeros(0, dtype=np.int32)
        self.made_rows = False

    def add(self, tokens: np.ndarray) -> np.ndarray:
        """Append tokens; return the complete rows now available as int32 [n, seq_len + 1]."""
        stream = np.concatenate([self.pending, tokens.astype(np.int32, copy=False)])
        n = max(0, (len(stream) - 1) // self.seq_len)
        L = self.seq_len
        rows = np.empty((n, L + 1), dtype=np.int32)
        rows[:, :L] = stream[: n * L].reshape(n, L)
        rows[:, L] = stream[L : n * L + 1 : L]
        self.pending = stream[n * L :]
        self.made_rows |= n > 0
        return rows


class ShardWriter:
    """Writes rows of one (split, subset) of a unit into parquet shards of at most `shard_rows` rows."""

    def __init__(self, store: Store, prefix: str, split: str, subset: str, seq_len: int, shard_rows: int,
                 bos_id: int):
        self.store, self.prefix, self.split, self.subset = store, prefix, split, subset
        self.seq_len, self.shard_rows, self.bos_id = seq_len, shard_rows, bos_id
        self.written: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows = self._documents = 0

    def add(self, rows: np.ndarray) -> None:
        while len(rows):
            if self._writer is None:
                self._open()
            take = rows[: self.shard_rows - self._rows]
            flat = pa.array(take.reshape(-1), type=pa.int32())
            tokens = pa.FixedSizeListArray.from_arrays(flat, self.seq_len + 1)
            self._writer.write_table(pa.table({"tokens": tokens}))
            self._rows += len(take)
            self._documents += int((take[:, :-1] == self.bos_id).sum())  # inputs of rows never overlap
            rows = rows[len(take) :]
            if self._rows == self.shard_rows:
                self.close()

    def _open(self) -> None:
        self._relative = f"{self.split}/{self.subset}/{self.prefix}{len(self.written):05d}.parquet"
        target = self.store.path(self._relative)
        self.store.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        self._temporary = f"{target}.tmp-{os.getpid()}"
        self._stream = self.store.fs.open_output_stream(self._temporary)
        schema = pa.schema([("tokens", pa.list_(pa.int32(), self.seq_len + 1))])
        self._writer = pq.ParquetWriter(self._stream, schema, compression="zstd")
        self._rows = self._documents = 0

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._stream.close()
        digest = hashlib.sha256()
        with self.store.fs.open_input_stream(self._temporary) as f:
            while chunk := f.read(1 << 20):  # a shard can be hundreds of MB: never all of it in memory
                digest.update(chunk)
        self.store.fs.move(self._temporary, self.store.path(self._relative))
        self.written.append({
            "path": self._relative, "split": self.split, "subset": self.subset, "rows": self._rows,
            "tokens": self._rows * self.seq_len, "documents": self._documents, "sha256": digest.hexdigest(),
        })
        self._writer = None


def unit_id(path: str) -> str:
    """A stable, filesystem-safe name for the work unit of one input file."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.rsplit("/", 1)[-1])[:60]
    return f"{redpajama.subset_of(path)}-{stem}-{hashlib.sha1(path.encode()).hexdigest()[:10]}"


def run_unit(unit: dict, settings: dict, out_dir: str, model_proto: bytes) -> dict:
    """Read, validate, tokenize and pack one input file; record it as done in units/<id>.json."""
    store = Store(out_dir)
    processor = _processor(model_proto)
    path, subset, uid = unit["path"], unit["subset"], unit["unit_id"]
    seq_len = settings["seq_len"]
    shard_rows = max(1, settings["shard_tokens"] // seq_len)
    packers = {split: Packer(seq_len) for split in SPLITS}
    writers = {split: ShardWriter(store, f"{uid}-", split, subset, seq_len, shard_rows, processor.bos_id())
               for split in SPLITS}
    stats = {split: {"documents": 0, "tokens": 0, "bytes": 0} for split in SPLITS}
    rejected: list[dict] = []
    batch: dict[str, list[str]] = {split: [] for split in SPLITS}
    batch_bytes = 0

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

    for record in redpajama.read_records(path, settings["max_doc_bytes"]):
        if isinstance(record, redpajama.Rejected):
            rejected.append({"reason": record.reason, "source": path, "line": record.line,
                             "excerpt": record.excerpt})
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
    for writer in writers.values():
        writer.close()

    tails = io.BytesIO()
    np.savez(tails, **{split: packers[split].pending for split in SPLITS})
    store.write(f"units/{uid}.tails.npz", tails.getvalue())
    if rejected:
        store.write(f"rejected/{uid}.parquet", _parquet_bytes(pa.Table.from_pylist(rejected)))
    reasons: dict[str, int] = {}
    for row in rejected:
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    result = {
        "unit_id": uid, "source": path, "subset": subset, "settings_sha": settings_sha(settings),
        "shards": writers["train"].written + writers["validation"].written,
        "made_rows": {split: packers[split].made_rows for split in SPLITS},
        "stats": stats, "rejected": reasons,
    }
    store.write_json(f"units/{uid}.json", result)
    return result


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def settings_sha(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _pack_tails(store: Store, units: list[dict], settings: dict, bos_id: int) -> tuple[list[dict], dict]:
    """Pack the leftovers of all units per (split, subset); returns shard entries and dropped-token counts."""
    seq_len = settings["seq_len"]
    shards, dropped = [], {}
    subsets = sorted({u["subset"] for u in units})
    for split in SPLITS:
        for subset in subsets:
            packer = Packer(seq_len)
            writer = ShardWriter(store, "tail-", split, subset, seq_len, 1 << 62, bos_id)
            first = True
            for unit in sorted((u for u in units if u["subset"] == subset), key=lambda u: u["unit_id"]):
                with np.load(io.BytesIO(store.read(f"units/{unit['unit_id']}.tails.npz"))) as tails:
                    tail = tails[split]
                # a unit's leftover starts with the last token of its last row, already a target: skip it
                if not first and unit["made_rows"][split]:
                    tail = tail[1:]
                if len(tail):
                    writer.add(packer.add(tail))
                    first = False
            writer.close()
            shards += writer.written
            dropped[f"{split}/{subset}"] = max(0, len(packer.pending) - 1)
    return shards, dropped


def summarize(units: list[dict], shards: list[dict], dropped: dict) -> dict:
    """Per-subset statistics: documents, tokens, bytes per token, packed rows, rejections by reason."""
    per_subset: dict[str, dict] = {}
    for unit in units:
        entry = per_subset.setdefault(unit["subset"], {
            "files": 0, "documents": 0, "validation_documents": 0, "tokens": 0, "bytes": 0,
            "rejected": {},
        })
        entry["files"] += 1
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


def _run_units(units: list[dict], settings: dict, out_dir: str, model_proto: bytes) -> None:
    """Run pending units as Ray Data tasks, one unit per task, each using one CPU."""
    import ray
    from tqdm import tqdm

    stop_after = int(os.environ.get(STOP_AFTER_UNITS_ENV, "0"))
    # A dataset takes a copy of the current DataContext when it is made: set ours for this one, then put
    # the process's settings back. Our tqdm counts files. Ray Data reserves a share of the CPUs per
    # operator; with the single map operator here that only holds CPUs back (on 2 CPUs: one task at a
    # time for the first second, then 0.1-0.2 s idle between tasks).
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars, context.op_resource_reservation_enabled
    context.enable_progress_bars = context.op_resource_reservation_enabled = False
    try:
        dataset = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    finally:
        context.enable_progress_bars, context.op_resource_reservation_enabled = saved
    done = dataset.map(
        lambda row: {"unit_id": run_unit(row, settings, out_dir, model_proto)["unit_id"]},
        num_cpus=1,
    )
    with tqdm(total=len(units), desc="tokenize units", unit="file", file=sys.stderr) as progress:
        for finished, _ in enumerate(done.iter_rows(), start=1):
            progress.update(1)
            if finished == stop_after:
                raise RuntimeError(f"{STOP_AFTER_UNITS_ENV}={stop_after}: stopping as if the run had crashed")


def tokenize_dataset(inputs: list[str], tokenizer: str | Path, out_dir: str | Path, seq_len: int = 2048,
                     val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0,
                     max_doc_bytes: int = redpajama.DEFAULT_MAX_DOC_BYTES,
                     shard_tokens: int = DEFAULT_SHARD_TOKENS, address: str | None = None,
                     track: bool = True) -> dict:
    """Build (or finish, or reuse) the packed dataset in `out_dir`; returns the manifest."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    files = redpajama.expand_inputs([str(i) for i in inputs])
    tokenizer = str(tokenizer) if "://" in str(tokenizer) else os.path.abspath(tokenizer)
    out_dir = str(out_dir)
    model_proto = read_bytes(*filesystem(tokenizer))
    processor = _processor(model_proto)
    settings = {
        "inputs": files, "tokenizer_sha256": hashlib.sha256(model_proto).hexdigest(), "seq_len": seq_len,
        "val_fraction": val_fraction, "seed": seed, "max_doc_bytes": max_doc_bytes, "shard_tokens": shard_tokens,
    }
    store = Store(out_dir)
    if store.exists("manifest.json"):
        previous = store.read_json("manifest.json")
        if previous.get("settings") != settings:
            raise ValueError(
                f"{out_dir} holds a dataset built with other settings or inputs "
                f"(differs in: {sorted(k for k in settings if previous.get('settings', {}).get(k) != settings[k])}); "
                "choose a new --out or delete the old one"
            )
        if previous.get("finished") is True:
            log.info("%s is finished and up to date; reusing it", out_dir)
            return previous
    tokenizer_entry = {"path": tokenizer, "sha256": settings["tokenizer_sha256"],
                       "vocab_size": processor.get_piece_size()}
    manifest = {"format": FORMAT, "finished": False, "seq_len": seq_len, "tokenizer": tokenizer_entry,
                "settings": settings, "shards": [], "stats": {}}
    store.write_json("manifest.json", manifest)

    units = [{"unit_id": unit_id(p), "path": p, "subset": redpajama.subset_of(p)} for p in files]
    sha = settings_sha(settings)
    pending = [u for u in units if not (store.exists(f"units/{u['unit_id']}.json")
                                        and store.read_json(f"units/{u['unit_id']}.json")["settings_sha"] == sha)]
    log.info("%d input files, %d already done, %d to tokenize", len(units), len(units) - len(pending), len(pending))
    started = time.perf_counter()
    if pending:
        ray_jobs.connect(address, log_to_driver=False, configure_logging=False)
        _run_units(pending, settings, out_dir, model_proto)
    results = [store.read_json(f"units/{u['unit_id']}.json") for u in units]
    tail_shards, dropped = _pack_tails(store, results, settings, processor.bos_id())
    shards = [s for r in results for s in r["shards"]] + tail_shards
    stats = summarize(results, shards, dropped)
    stats["seconds"] = time.perf_counter() - started
    store.write_json("stats.json", stats)
    manifest.update(finished=True, shards=shards, stats=stats)
    store.write_json("manifest.json", manifest)
    if track:
        _log_to_mlflow(settings, stats, out_dir)
    return manifest


def _log_to_mlflow(settings: dict, stats: dict, out_dir: str) -> None:
    """Record the run in MLflow experiment `data` (see openllama.tracking for where runs go)."""
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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="openllama data", description="Prepare RedPajama for pretraining.")
    commands = parser.add_subparsers(dest="command", required=True)
    tok = commands.add_parser("tokenize", help="validate, tokenize and pack jsonl into parquet shards")
    tok.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="RedPajama root or subset folders, .jsonl/.jsonl.zst files or globs (local or gs://, s3://)")
    tok.add_argument("--tokenizer", required=True, help="SentencePiece tokenizer.model")
    tok.add_argument("--out", required=True, help="output dataset directory (local or URI)")
    tok.add_argument("--seq-len", type=int, default=2048)
    tok.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                     help="share of documents held out for perplexity, chosen by a seeded hash of the text")
    tok.add_argument("--seed", type=int, default=0)
    tok.add_argument("--max-doc-bytes", type=int, default=redpajama.DEFAULT_MAX_DOC_BYTES,
                     help="documents larger than this are rejected as too_large")
    tok.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard at most")
    tok.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local one)")
    tok.add_argument("--no-track", action="store_true", help="do not log the run to MLflow")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        manifest = tokenize_dataset(args.inputs, args.tokenizer, args.out, seq_len=args.seq_len,
                                    val_fraction=args.val_fraction, seed=args.seed,
                                    max_doc_bytes=args.max_doc_bytes, shard_tokens=args.shard_tokens,
                                    address=args.address, track=not args.no_track)
    except (ValueError, OSError) as err:  # OSError: an --out that cannot be created or written
        print(f"openllama data tokenize: {err}", file=sys.stderr)
        return 2
    total = manifest["stats"]["total"]
    print(f"{args.out}: {total['documents']:,} documents, {total['tokens']:,} tokens, "
          f"{total['rejected']:,} rejected lines; see {args.out}/stats.json")
    return 0
