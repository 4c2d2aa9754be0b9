"""Packed token shards (format `openllama-packed-v2`), written and read here: the contract between data and training.

A dataset directory holds `manifest.json` and flat binary shards under `<split>/<subset>/`. Each row is exactly
`seq_len + 1` token ids, and row r+1 starts with row r's last token, so inputs are `row[:-1]` and targets
`row[1:]`, and every token of a stream after its first is a target exactly once (no padding). A stream is the
documents (each `BOS + ids + EOS`) of one (split, subset); rows never mix streams.

A shard is nothing but its rows, one fixed-width record each: the row's tokens as little-endian uint16 (when the
tokenizer has at most 65,536 pieces, else uint32), then a little-endian crc32 of the row's index in the shard
(8 bytes) followed by those token bytes. Row r of a shard is bytes [r x record, (r + 1) x record): training
samples rows at random over thousands of shards, and one ranged read of about a row's own size, checked by its
own checksum, is all a row costs, on local disk or a bucket alike. Rows adjacent in a shard are read in one go.

The manifest lists every shard with its split, subset, rows, tokens (rows x seq_len, the targets), documents
(BOS tokens among the inputs), bytes and the sha256 of the whole file; `verify()` checks those sha256s (and
every row's crc32) by reading every file once; a reader refuses a manifest whose `finished` is not true.
Training samples rows by index, so the reader maps a subset-wide row index to (shard, row).

Writers publish every file whole (`openllama.files`): a crashed writer leaves only a temporary, which no
manifest names, so it is never taken for a shard.

Datasets of the first format (`openllama-packed-v1`: parquet shards, which could only be read whole) are
refused with the command that rewrites them in this one, `openllama data convert OLD --out NEW`, which reads
them with `read_v1_manifest` and `convert_shard`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from openllama import files
from openllama.commands import BadInput

FORMAT = "openllama-packed-v2"
FORMAT_V1 = "openllama-packed-v1"
SPLITS = ("train", "validation")
SHARD_SUFFIX = ".bin"
TAILS = "units/{unit_id}.tails.npz"  # a unit's leftover tokens per split, packed by `pack_tails`
CHECKSUM_BYTES = 4
MAX_READ_BYTES = 16 << 20  # one ranged read at most; a longer run of adjacent rows is cut into several
READ_THREADS = 16  # ranged reads in flight per dataset: a bucket's latency, not its bandwidth, bounds one read
MAX_OPEN_LOCAL = 256  # open shard files kept per dataset on local disk (each holds a file descriptor)
MAX_OPEN_REMOTE = 1 << 14  # on a bucket an open file is only its size, but opening one costs a request


class DatasetNotFinished(Exception):
    """The manifest says the tokenize run that writes this dataset has not completed."""


class ShardCorrupted(Exception):
    """A shard's bytes or shape do not match what the manifest recorded."""


class DatasetNeedsConversion(BadInput):
    """The dataset is in an older packed format, which this reader does not read; `data convert` rewrites it."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest token type that holds every id of a vocabulary: rows on disk cost 2 bytes a token, not 4."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """How one row is laid out in a shard file (module docstring); the manifest records it."""

    seq_len: int
    dtype: np.dtype

    @classmethod
    def for_vocabulary(cls, seq_len: int, vocab_size: int) -> RowLayout:
        return cls(seq_len, token_dtype(vocab_size))

    @classmethod
    def from_manifest(cls, manifest: dict, where: str) -> RowLayout:
        """The layout a manifest names; a manifest whose fields disagree is refused."""
        name = manifest.get("token_dtype")
        if name not in ("uint16", "uint32"):
            raise BadInput(f"{where}: token_dtype is {name!r}, expected 'uint16' or 'uint32'")
        layout = cls(int(manifest["seq_len"]), np.dtype(f"<{'u2' if name == 'uint16' else 'u4'}"))
        if manifest.get("row_bytes") != layout.record_bytes:
            raise BadInput(f"{where}: row_bytes is {manifest.get('row_bytes')!r}, but seq_len {layout.seq_len} "
                           f"of {name} makes {layout.record_bytes}")
        return layout

    @functools.cached_property
    def width(self) -> int:
        return self.seq_len + 1

    @functools.cached_property
    def token_bytes(self) -> int:
        return self.width * self.dtype.itemsize

    @functools.cached_property
    def record_bytes(self) -> int:
        return self.token_bytes + CHECKSUM_BYTES

    def manifest_fields(self) -> dict:
        return {"token_dtype": str(self.dtype.name), "row_bytes": self.record_bytes}

    def encode(self, rows: np.ndarray, first_index: int) -> bytes:
        """Rows (any int type, [n, width]) as records, the first being row `first_index` of its shard."""
        limit = np.iinfo(self.dtype).max
        if rows.size and (rows.min() < 0 or rows.max() > limit):
            raise ValueError(f"token ids in [{rows.min()}, {rows.max()}] do not fit {self.dtype.name} "
                             f"(at most {limit}); the tokenizer's vocabulary is larger than the manifest says")
        records = np.empty((len(rows), self.record_bytes), dtype=np.uint8)
        records[:, : self.token_bytes].view(self.dtype)[:] = rows
        records[:, self.token_bytes :].view("<u4")[:, 0] = self._checksums(records, first_index)
        return records.tobytes()

    def decode(self, data: memoryview | bytes, first_index: int) -> tuple[np.ndarray, list[int]]:
        """Records back to int32 rows [n, width], with the shard rows whose checksum does not match."""
        if len(data) % self.record_bytes:
            raise ValueError(f"{len(data)} bytes is not a whole number of {self.record_bytes}-byte rows")
        records = np.frombuffer(data, dtype=np.uint8).reshape(-1, self.record_bytes)
        stored = records[:, self.token_bytes :].view("<u4")[:, 0]
        damaged = np.flatnonzero(stored != self._checksums(records, first_index))
        tokens = records[:, : self.token_bytes].view(self.dtype)
        return tokens.astype(np.int32), (first_index + damaged).tolist()

    def _checksums(self, records: np.ndarray, first_index: int) -> np.ndarray:
        """The crc32 of each record's index in its shard (8 bytes, little-endian) followed by its tokens.

        Covering the index too means a record copied to the wrong offset is caught.
        """
        data, size, tokens = memoryview(records.reshape(-1)), self.record_bytes, self.token_bytes
        return np.fromiter(
            (zlib.crc32(data[i * size : i * size + tokens], zlib.crc32((first_index + i).to_bytes(8, "little")))
             for i in range(len(records))), dtype=np.uint32, count=len(records))


# --- writing ------------------------------------------------------------------------------------------


class Packer:
    """Cuts a token stream into rows by the packing contract (module docstring), across any number of `add`s."""

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


class ShardFile:
    """One shard being written at `root/relative`: streamed to a temporary, published whole by `close()`.

    Its sha256 is computed from the bytes as they are written, so publishing never reads the file back.
    Used as a context manager, an error discards it (only the temporary existed).
    """

    def __init__(self, root: str, relative: str, split: str, subset: str, layout: RowLayout, bos_id: int):
        self.root, self.relative, self.split, self.subset = root.rstrip("/"), relative, split, subset
        self.layout, self.bos_id = layout, bos_id
        self.rows = self.documents = 0
        self.entry: dict | None = None  # the manifest entry, once published
        self._digest = hashlib.sha256()
        self._output = contextlib.ExitStack()  # holds the open `files.open_output` until published
        self._stream = self._output.enter_context(files.open_output(f"{self.root}/{relative}"))

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if error is None:
            self.close()
        elif self.entry is None:
            self.discard(kind, error, trace)

    def add(self, rows: np.ndarray) -> None:
        data = self.layout.encode(rows, self.rows)
        self._stream.write(data)
        self._digest.update(data)
        self.rows += len(rows)
        self.documents += int((rows[:, :-1] == self.bos_id).sum())  # inputs of rows never overlap

    def close(self) -> dict:
        """Publish the shard under its name (once); returns its manifest entry."""
        if self.entry is None:
            self._output.close()
            self.entry = {"path": self.relative, "split": self.split, "subset": self.subset, "rows": self.rows,
                          "tokens": self.rows * self.layout.seq_len, "documents": self.documents,
                          "bytes": self.rows * self.layout.record_bytes, "sha256": self._digest.hexdigest()}
        return self.entry

    def discard(self, kind: type[BaseException] | None = None, error: BaseException | None = None,
                trace: TracebackType | None = None) -> None:
        """Drop the shard: its temporary is removed, nothing is published."""
        self._output.__exit__(kind, error or RuntimeError("shard discarded"), trace)


class ShardWriter:
    """Rows of one (split, subset) as shards of at most `shard_rows` rows under dataset `root`.

    Each shard is streamed to a temporary and published whole when full or at `close()`; `written` holds the
    manifest entries of the published ones. Used as a context manager, an error discards the open shard.
    """

    def __init__(self, root: str, prefix: str, split: str, subset: str, layout: RowLayout, shard_rows: int,
                 bos_id: int):
        self.root, self.prefix, self.split, self.subset = root.rstrip("/"), prefix, split, subset
        self.layout, self.shard_rows, self.bos_id = layout, shard_rows, bos_id
        self.written: list[dict] = []
        self._shard: ShardFile | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if error is None:
            self.close()
        elif self._shard is not None:
            self._shard.discard(kind, error, trace)
            self._shard = None

    def add(self, rows: np.ndarray) -> None:
        while len(rows):
            if self._shard is None:
                relative = f"{self.split}/{self.subset}/{self.prefix}{len(self.written):05d}{SHARD_SUFFIX}"
                self._shard = ShardFile(self.root, relative, self.split, self.subset, self.layout, self.bos_id)
            take = rows[: self.shard_rows - self._shard.rows]
            self._shard.add(take)
            rows = rows[len(take) :]
            if self._shard.rows == self.shard_rows:
                self.close()

    def close(self) -> None:
        """Publish the open shard, if any, and record its manifest entry."""
        if self._shard is not None:
            self.written.append(self._shard.close())
            self._shard = None


def write_tails(root: str, unit_id: str, pending: dict[str, np.ndarray]) -> None:
    """Save what a unit's packers could not fill a row with, per split, for `pack_tails` to pack later."""
    buffer = io.BytesIO()
    np.savez(buffer, **{split: pending[split] for split in SPLITS})
    files.write_bytes(f"{root.rstrip('/')}/{TAILS.format(unit_id=unit_id)}", buffer.getvalue())


def pack_tails(root: str, units: list[dict], layout: RowLayout, bos_id: int) -> tuple[list[dict], dict[str, int]]:
    """Pack the leftovers of all units into one tail shard per (split, subset), in unit order.

    `units` are the tokenize ledger's entries (`unit`, `subset`, `made_rows` per split). Returns the shard entries and
    the tokens dropped per "split/subset" (the final partial row, which cannot be packed).
    """
    shards, dropped = [], {}
    subsets = sorted({u["subset"] for u in units})
    for split in SPLITS:
        for subset in subsets:
            packer = Packer(layout.seq_len)
            with ShardWriter(root, "tail-", split, subset, layout, 1 << 62, bos_id) as writer:
                first = True
                for unit in sorted((u for u in units if u["subset"] == subset), key=lambda u: u["unit"]):
                    path = f"{root.rstrip('/')}/{TAILS.format(unit_id=unit['unit'])}"
                    with np.load(io.BytesIO(files.read_bytes(path))) as tails:
                        tail = tails[split]
                    # a unit's leftover starts with the last token of its last row, already a target: skip it
                    if not first and unit["made_rows"][split]:
                        tail = tail[1:]
                    if len(tail):
                        writer.add(packer.add(tail))
                        first = False
            shards += writer.written
            dropped[f"{split}/{subset}"] = max(0, len(packer.pending) - 1)
    return shards, dropped


def remove_crashed_writes(root: str) -> None:
    """Delete the temporaries a killed writer left under a local dataset (an object store never has any)."""
    if files.is_uri(root):
        return
    base = Path(root)
    for folder in [base, base / "units", base / "rejected", base / "staging", *base.glob("staging/*/"),
                   *(p for s in SPLITS for p in base.glob(f"{s}/*"))]:
        files.remove_temporaries(folder)


def write_dataset(root: str, rows: Mapping[tuple[str, str], np.ndarray | Iterable[np.ndarray]], seq_len: int,
                  vocab_size: int, shard_rows: int = 1 << 15, bos_id: int = 1) -> dict:
    """Publish a finished dataset holding `rows[(split, subset)]` (int [n, seq_len + 1], or chunks of them).

    For callers that have rows rather than documents (tests, benchmarks, tools that repack): the shards and
    manifest are those `openllama data tokenize` writes. Returns the manifest.
    """
    layout = RowLayout.for_vocabulary(seq_len, vocab_size)
    shards = []
    for (split, subset), stream in sorted(rows.items()):
        with ShardWriter(root, "", split, subset, layout, shard_rows, bos_id) as writer:
            for chunk in [stream] if isinstance(stream, np.ndarray) else stream:
                if np.ndim(chunk) != 2 or np.shape(chunk)[1] != layout.width:
                    raise ValueError(f"{split}/{subset}: rows of shape {np.shape(chunk)}, expected "
                                     f"[n, {layout.width}] for seq_len {seq_len}")
                writer.add(np.asarray(chunk))
        shards += writer.written
    return Manifest(layout, {"vocab_size": vocab_size}, shards, finished=True).write(root)


@dataclasses.dataclass
class Manifest:
    """A dataset's `manifest.json` (module docstring), built, written and read here only."""

    layout: RowLayout
    tokenizer: dict  # path, sha256 and vocab_size of the tokenizer that made the tokens
    shards: list[dict] = dataclasses.field(default_factory=list)
    stats: dict = dataclasses.field(default_factory=dict)
    finished: bool = False  # written true last: readers refuse a dataset until then
    settings: dict | None = None  # what the dataset was built with: a rerun with other settings is refused
    extra: dict = dataclasses.field(default_factory=dict)  # what a builder adds (converted_from, a v1 run's fields)

    def to_json(self) -> dict:
        fields = {"format": FORMAT, "finished": self.finished, "seq_len": self.layout.seq_len,
                  **self.layout.manifest_fields(), "tokenizer": self.tokenizer, "shards": self.shards,
                  "stats": self.stats}
        return {**self.extra, **fields, **({} if self.settings is None else {"settings": self.settings})}

    def write(self, root: str) -> dict:
        """Publish the manifest whole at `root/manifest.json`; returns what was written."""
        written = self.to_json()
        files.write_json(Manifest.location(root), written)
        return written

    @staticmethod
    def location(root: str) -> str:
        return f"{str(root).rstrip('/')}/manifest.json"

    @staticmethod
    def find(root: str) -> dict | None:
        """Whatever manifest `root` holds, in any state or format (None: none), for a builder to resume or refuse."""
        location = Manifest.location(root)
        return files.read_json(location) if files.is_file(location) else None

    @staticmethod
    def read(root: str) -> dict:
        """A dataset's manifest, refused unless finished and in this format (an old one names its conversion)."""
        manifest_path = Manifest.location(root)
        try:
            manifest = files.read_json(manifest_path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{root}: no manifest.json; build the dataset with `openllama data tokenize ... --out {root}`"
            ) from None
        if manifest.get("format") == FORMAT_V1:
            raise DatasetNeedsConversion(
                f"{root} is in the old format {FORMAT_V1} (parquet shards, read whole for every row); rewrite it "
                f"once with `openllama data convert {root} --out NEW_DIR` and point at NEW_DIR"
            )
        if manifest.get("format") != FORMAT:
            raise BadInput(f"{manifest_path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
        if manifest.get("finished") is not True:
            raise DatasetNotFinished(
                f"{root}: manifest.json has finished={manifest.get('finished')!r}; the tokenize run did not "
                "complete. Rerun the same `openllama data tokenize` command to finish it."
            )
        return manifest


# --- reading ------------------------------------------------------------------------------------------


class PackedDataset:
    """One split of a packed dataset. `read(subset, indices)` returns rows as int32 [n, seq_len + 1].

    Safe to call from several threads. `bytes_read` counts the bytes its ranged reads asked for.
    """

    def __init__(self, root: str, manifest: dict, split: str):
        self.root = root.rstrip("/")
        self.manifest = manifest
        self.split = split
        self.layout = RowLayout.from_manifest(manifest, f"{self.root}/manifest.json")
        self._shards: dict[str, list[dict]] = {}
        for shard in manifest["shards"]:
            if shard["split"] == split:
                self._shards.setdefault(shard["subset"], []).append(shard)
        # first global row index of each shard, per subset
        self._starts = {s: np.cumsum([0] + [sh["rows"] for sh in shards]) for s, shards in self._shards.items()}
        self.bytes_read = 0
        self._start_io()

    def _start_io(self) -> None:
        self._filesystem, self._base = files.filesystem(self.root)
        self._max_open = MAX_OPEN_LOCAL if isinstance(self._filesystem, pafs.LocalFileSystem) else MAX_OPEN_REMOTE
        self._open: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict:  # open files, the thread pool and the lock stay in the process that made them
        return {"root": self.root, "manifest": self.manifest, "split": self.split}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"], state["manifest"], state["split"])

    @classmethod
    def open(cls, root: str, split: str = "train") -> PackedDataset:
        manifest = Manifest.read(str(root))
        splits = {s["split"] for s in manifest["shards"]}
        if split not in splits:
            raise BadInput(f"{root}: no shards for split {split!r} (has: {sorted(splits)})")
        return cls(str(root), manifest, split)

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def subsets(self) -> list[str]:
        return sorted(self._shards)

    def rows(self, subset: str) -> int:
        return int(self._starts_of(subset)[-1])

    def tokens(self, subset: str) -> int:
        return int(sum(sh["tokens"] for sh in self._shards_of(subset)))

    def read(self, subset: str, indices: np.ndarray) -> np.ndarray:
        """Rows `indices` (global within the subset, in the order given) as int32 [len(indices), seq_len + 1].

        Each run of adjacent rows of one shard is one ranged read, and each row's checksum is checked.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        starts = self._starts_of(subset)
        if indices.size and (indices.min() < 0 or indices.max() >= starts[-1]):
            raise IndexError(f"{subset}: row index out of range [0, {starts[-1]}) in split {self.split!r}")
        if not indices.size:
            return np.empty((0, self.layout.width), dtype=np.int32)
        wanted, inverse = np.unique(indices, return_inverse=True)  # sorted: a shard's rows are adjacent here
        shard_of = np.searchsorted(starts, wanted, side="right") - 1
        local = wanted - starts[shard_of]
        breaks = np.flatnonzero((np.diff(shard_of) != 0) | (np.diff(local) != 1)) + 1
        max_rows = max(1, MAX_READ_BYTES // self.layout.record_bytes)
        reads = []  # (shard, first row, rows): one ranged read each
        for begin, end in zip([0, *breaks.tolist()], [*breaks.tolist(), len(wanted)], strict=True):
            shard = self._shards[subset][shard_of[begin]]
            for first in range(int(local[begin]), int(local[end - 1]) + 1, max_rows):
                reads.append((shard, first, min(max_rows, int(local[end - 1]) + 1 - first)))
        blocks = [self._decode(request, data) for request, data in zip(reads, self._fetch(reads), strict=True)]
        return (blocks[0] if len(blocks) == 1 else np.concatenate(blocks))[inverse]

    def _fetch(self, reads: list[tuple[dict, int, int]]) -> list[Any]:
        """The bytes of each (shard, first row, rows), read in parallel threads when there are several.

        Only the reads run in the threads (they release the GIL while waiting on the storage); the checksums
        are checked by the caller, so the threads never contend for the interpreter.
        """
        if len(reads) == 1:
            return [self._read_range(*reads[0])]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="shard-reads")
        groups = [reads[i::READ_THREADS] for i in range(min(READ_THREADS, len(reads)))]
        results = list(self._pool.map(lambda group: [self._read_range(*r) for r in group], groups))
        ordered: list[Any] = [None] * len(reads)
        for i, group in enumerate(results):
            ordered[i::READ_THREADS] = group
        return ordered

    def verify(self) -> None:
        """Check every shard of this split: size, the sha256 of the whole file and every row's crc32."""
        for subset in self.subsets:
            for shard in self._shards[subset]:
                self._verify_shard(shard)

    def _verify_shard(self, shard: dict) -> None:
        location, record = self._location(shard), self.layout.record_bytes
        expected = shard["rows"] * record
        digest, damaged, size, carry = hashlib.sha256(), [], 0, b""
        with self._filesystem.open_input_stream(self._path(shard)) as stream:
            chunk_rows = max(1, MAX_READ_BYTES // record)
            while data := stream.read(chunk_rows * record):
                digest.update(data)
                size += len(data)
                data = carry + data if carry else data
                whole = len(data) - len(data) % record
                if whole:
                    damaged += self.layout.decode(memoryview(data)[:whole], (size - len(data)) // record)[1]
                carry = data[whole:]
        if digest.hexdigest() != shard["sha256"]:
            found = f"; rows failing their crc32: {damaged[:10]}" if damaged else ""
            raise ShardCorrupted(
                f"{location}: sha256 {digest.hexdigest()[:12]}... does not match the manifest's "
                f"{shard['sha256'][:12]}...{found}; the file was changed or damaged. Rebuild the dataset."
            )
        if size != expected or damaged:
            raise ShardCorrupted(f"{location}: {size} bytes and damaged rows {damaged[:10]}, but its sha256 "
                                 f"matches a manifest that says {expected} bytes; the manifest was edited")

    def _shards_of(self, subset: str) -> list[dict]:
        if subset not in self._shards:
            raise KeyError(f"no subset {subset!r} in split {self.split!r} (has: {self.subsets})")
        return self._shards[subset]

    def _starts_of(self, subset: str) -> np.ndarray:
        self._shards_of(subset)
        return self._starts[subset]

    def _location(self, shard: dict) -> str:
        return f"{self.root}/{shard['path']}"

    def _path(self, shard: dict) -> str:
        """The shard's path on the dataset's filesystem."""
        return f"{self._base.rstrip('/')}/{shard['path']}"

    def _file(self, shard: dict) -> Any:
        """The shard opened for ranged reads, kept open for the next read (its size checked once, on opening)."""
        key = shard["path"]
        with self._lock:
            if key in self._open:
                self._open.move_to_end(key)
                return self._open[key]
        handle = self._filesystem.open_input_file(self._path(shard))
        if handle.size() != shard["rows"] * self.layout.record_bytes:
            raise ShardCorrupted(f"{self._location(shard)}: {handle.size()} bytes, but its {shard['rows']} rows "
                                 f"need {shard['rows'] * self.layout.record_bytes}; the file was cut short or "
                                 "changed. Rebuild the dataset.")
        with self._lock:
            self._open[key] = handle
            while len(self._open) > self._max_open:
                self._open.popitem(last=False)  # not closed here: another thread may be reading it
        return handle

    def _read_range(self, shard: dict, first: int, count: int) -> Any:
        """The bytes of rows [first, first + count) of one shard, in one ranged read."""
        record = self.layout.record_bytes
        data = self._file(shard).read_at(count * record, first * record)
        with self._lock:
            self.bytes_read += len(data)
        if len(data) != count * record:
            raise ShardCorrupted(f"{self._location(shard)}: rows {first}..{first + count - 1} read short "
                                 f"({len(data)} of {count * record} bytes); the file changed. Rebuild the dataset.")
        return data

    def _decode(self, request: tuple[dict, int, int], data: Any) -> np.ndarray:
        """Rows read by `_read_range`, every checksum checked, as int32 [rows, seq_len + 1]."""
        shard, first, _ = request
        rows, damaged = self.layout.decode(memoryview(data), first)
        if damaged:
            at = damaged[0] * self.layout.record_bytes
            raise ShardCorrupted(
                f"{self._location(shard)}: row {damaged[0]} (bytes {at}-{at + self.layout.record_bytes - 1}) fails "
                f"its crc32 check{f' (and {len(damaged) - 1} more rows)' if len(damaged) > 1 else ''}; the file was "
                "changed or damaged. Rebuild the dataset, or restore this file and run PackedDataset.verify()."
            )
        return rows


# --- the first format, read only to convert it ------------------------------------------------------------


def tokens_to_numpy(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """A v1 `tokens` column (list or fixed_size_list of ints) as an int32 array [rows, width]."""
    flat = pc.list_flatten(column)
    array = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.int32)
    if array.size != len(column) * width:
        raise ValueError(f"rows are not all {width} tokens long")
    return array.reshape(len(column), width)


def read_v1_manifest(source: str, out: str) -> dict:
    """The manifest of the finished `openllama-packed-v1` dataset at `source`, to convert into `out`."""
    old = Manifest.find(source)
    if old is None:
        raise FileNotFoundError(f"{source}: no manifest.json; pass the folder of an {FORMAT_V1} dataset")
    if old.get("format") != FORMAT_V1:
        raise BadInput(f"{source}: format is {old.get('format')!r}; only {FORMAT_V1} datasets are converted")
    if old.get("finished") is not True:
        raise DatasetNotFinished(f"{source}: manifest.json has finished={old.get('finished')!r}; an unfinished "
                                 f"{FORMAT_V1} dataset cannot be converted. Tokenize again into a new --out.")
    if files.filesystem(source)[1] == files.filesystem(out)[1] and files.is_uri(source) == files.is_uri(out):
        raise BadInput(f"--out {out} is the dataset being converted; choose a new folder")
    return old


def convert_shard(source: str, out: str, entry: dict, layout: RowLayout) -> dict:
    """One v1 parquet shard, its sha256 checked first, streamed batch by batch into a v2 shard."""
    location = f"{source}/{entry['path']}"
    digest = files.sha256_of(location)
    if digest != entry["sha256"]:
        raise ShardCorrupted(f"{location}: sha256 {digest[:12]}... does not match the manifest's "
                             f"{entry['sha256'][:12]}...; the old dataset is damaged and cannot be converted.")
    relative = entry["path"].removesuffix(".parquet") + SHARD_SUFFIX
    fs, path = files.filesystem(location)
    # bos_id -1 counts no documents: the old entry's count is kept, whatever BOS id its tokenizer had
    with fs.open_input_file(path) as handle, \
            ShardFile(out, relative, entry["split"], entry["subset"], layout, bos_id=-1) as shard:
        try:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=4096, columns=["tokens"]):
                shard.add(tokens_to_numpy(batch.column("tokens"), layout.width))
        except (pa.ArrowException, ValueError, KeyError) as err:
            raise ShardCorrupted(f"{location}: unreadable token shard ({err})") from err
        if shard.rows != entry["rows"]:
            raise ShardCorrupted(f"{location}: {shard.rows} rows, the manifest says {entry['rows']}")
    return {**shard.close(), "documents": entry.get("documents", 0)}
