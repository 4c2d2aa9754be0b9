"""Packed token shards (format `openllama-packed-v1`), written and read here: the contract between data and training.

A dataset directory holds `manifest.json` and parquet shards under `<split>/<subset>/`, with one column
`tokens`. Each row is exactly `seq_len + 1` token ids, and row r+1 starts with row r's last token, so inputs
are `row[:-1]` and targets `row[1:]`, and every token of a stream after its first is a target exactly once
(no padding). A stream is the documents (each `BOS + ids + EOS`) of one (split, subset); rows never mix streams.

The manifest lists every shard with its split, subset, rows, tokens (rows x seq_len, the targets), documents
(BOS tokens among the inputs) and sha256; a reader refuses a manifest whose `finished` is not true.
Training samples rows by index, so the reader maps a subset-wide row index to (shard, row).

Writers publish every file whole (`openllama.files`): a crashed writer leaves only a temporary, which no
manifest names, so it is never taken for a shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections import OrderedDict
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from openllama import files
from openllama.commands import BadInput

FORMAT = "openllama-packed-v1"
SPLITS = ("train", "validation")
MAX_CACHED_SHARDS = 32
TAILS = "units/{unit_id}.tails.npz"  # a unit's leftover tokens per split, packed by `pack_tails`


class DatasetNotFinished(Exception):
    """The manifest says the tokenize run that writes this dataset has not completed."""


class ShardCorrupted(Exception):
    """A shard's bytes or shape do not match what the manifest recorded."""


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


class ShardWriter:
    """Rows of one (split, subset) as parquet shards of at most `shard_rows` rows under dataset `root`.

    Each shard is streamed to a temporary and published whole when full or at `close()`; `written` holds the
    manifest entries of the published ones. Used as a context manager, an error discards the open shard.
    """

    def __init__(self, root: str, prefix: str, split: str, subset: str, seq_len: int, shard_rows: int,
                 bos_id: int):
        self.root, self.prefix, self.split, self.subset = root.rstrip("/"), prefix, split, subset
        self.seq_len, self.shard_rows, self.bos_id = seq_len, shard_rows, bos_id
        self.written: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._output = contextlib.ExitStack()  # holds the open `files.open_output` of the current shard
        self._relative = ""
        self._rows = self._documents = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if error is None:
            self.close()
        elif self._writer is not None:
            with contextlib.suppress(Exception):  # its footer goes to a temporary about to be removed
                self._writer.close()
            self._writer = None
            self._output.__exit__(kind, error, trace)  # the temporary is removed, nothing is published

    def add(self, rows: np.ndarray) -> None:
        while len(rows):
            if self._writer is None:
                self._start_shard()
            take = rows[: self.shard_rows - self._rows]
            flat = pa.array(take.reshape(-1), type=pa.int32())
            tokens = pa.FixedSizeListArray.from_arrays(flat, self.seq_len + 1)
            self._writer.write_table(pa.table({"tokens": tokens}))
            self._rows += len(take)
            self._documents += int((take[:, :-1] == self.bos_id).sum())  # inputs of rows never overlap
            rows = rows[len(take) :]
            if self._rows == self.shard_rows:
                self.close()

    def _start_shard(self) -> None:
        self._relative = f"{self.split}/{self.subset}/{self.prefix}{len(self.written):05d}.parquet"
        stream = self._output.enter_context(files.open_output(f"{self.root}/{self._relative}"))
        schema = pa.schema([("tokens", pa.list_(pa.int32(), self.seq_len + 1))])
        self._writer = pq.ParquetWriter(stream, schema, compression="zstd")
        self._rows = self._documents = 0

    def close(self) -> None:
        """Publish the open shard, if any, and record its manifest entry."""
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        self._output.close()  # publishes the shard under its name
        target = f"{self.root}/{self._relative}"
        self.written.append({
            "path": self._relative, "split": self.split, "subset": self.subset, "rows": self._rows,
            "tokens": self._rows * self.seq_len, "documents": self._documents, "sha256": files.sha256_of(target),
        })


def write_tails(root: str, unit_id: str, pending: dict[str, np.ndarray]) -> None:
    """Save what a unit's packers could not fill a row with, per split, for `pack_tails` to pack later."""
    buffer = io.BytesIO()
    np.savez(buffer, **{split: pending[split] for split in SPLITS})
    files.write_bytes(f"{root.rstrip('/')}/{TAILS.format(unit_id=unit_id)}", buffer.getvalue())


def pack_tails(root: str, units: list[dict], seq_len: int, bos_id: int) -> tuple[list[dict], dict[str, int]]:
    """Pack the leftovers of all units into one tail shard per (split, subset), in unit order.

    `units` are ledger entries (`unit_id`, `subset`, `made_rows` per split). Returns the shard entries and
    the tokens dropped per "split/subset" (the final partial row, which cannot be packed).
    """
    shards, dropped = [], {}
    subsets = sorted({u["subset"] for u in units})
    for split in SPLITS:
        for subset in subsets:
            packer = Packer(seq_len)
            with ShardWriter(root, "tail-", split, subset, seq_len, 1 << 62, bos_id) as writer:
                first = True
                for unit in sorted((u for u in units if u["subset"] == subset), key=lambda u: u["unit_id"]):
                    path = f"{root.rstrip('/')}/{TAILS.format(unit_id=unit['unit_id'])}"
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


# --- reading ------------------------------------------------------------------------------------------


def tokens_to_numpy(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """A `tokens` column (list or fixed_size_list of ints) as an int32 array [rows, width]."""
    flat = pc.list_flatten(column)
    array = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.int32)
    if array.size != len(column) * width:
        raise ValueError(f"rows are not all {width} tokens long")
    return array.reshape(len(column), width)


class PackedDataset:
    """One split of a packed dataset. `read(subset, indices)` returns rows as int32 [n, seq_len + 1]."""

    def __init__(self, root: str, manifest: dict, split: str):
        self.root = root.rstrip("/")
        self.manifest = manifest
        self.split = split
        self._shards: dict[str, list[dict]] = {}
        for shard in manifest["shards"]:
            if shard["split"] == split:
                self._shards.setdefault(shard["subset"], []).append(shard)
        # first global row index of each shard, per subset
        self._starts = {s: np.cumsum([0] + [sh["rows"] for sh in shards]) for s, shards in self._shards.items()}
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._verified: set[str] = set()

    @classmethod
    def open(cls, root: str, split: str = "train") -> PackedDataset:
        manifest_path = f"{str(root).rstrip('/')}/manifest.json"
        try:
            manifest = files.read_json(manifest_path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{root}: no manifest.json; build the dataset with `openllama data tokenize ... --out {root}`"
            ) from None
        if manifest.get("format") != FORMAT:
            raise BadInput(f"{manifest_path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
        if manifest.get("finished") is not True:
            raise DatasetNotFinished(
                f"{root}: manifest.json has finished={manifest.get('finished')!r}; the tokenize run did not "
                "complete. Rerun the same `openllama data tokenize` command to finish it."
            )
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
        """Rows `indices` (global within the subset, in the order given) as int32 [len(indices), seq_len + 1]."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        starts = self._starts_of(subset)
        if indices.size and (indices.min() < 0 or indices.max() >= starts[-1]):
            raise IndexError(f"{subset}: row index out of range [0, {starts[-1]}) in split {self.split!r}")
        out = np.empty((indices.size, self.seq_len + 1), dtype=np.int32)
        shard_of = np.searchsorted(starts, indices, side="right") - 1
        for shard_index in np.unique(shard_of):
            picked = shard_of == shard_index
            rows = self._load(self._shards[subset][shard_index])
            out[picked] = rows[indices[picked] - starts[shard_index]]
        return out

    def verify(self) -> None:
        """Check every shard of this split against its recorded checksum; raises ShardCorrupted."""
        for subset in self.subsets:
            for shard in self._shards[subset]:
                self._check(shard, files.sha256_of(self._location(shard)))

    def _shards_of(self, subset: str) -> list[dict]:
        if subset not in self._shards:
            raise KeyError(f"no subset {subset!r} in split {self.split!r} (has: {self.subsets})")
        return self._shards[subset]

    def _starts_of(self, subset: str) -> np.ndarray:
        self._shards_of(subset)
        return self._starts[subset]

    def _location(self, shard: dict) -> str:
        return f"{self.root}/{shard['path']}"

    def _check(self, shard: dict, digest: str) -> None:
        if digest != shard["sha256"]:
            raise ShardCorrupted(
                f"{self.root}/{shard['path']}: sha256 {digest[:12]}... does not match the manifest's "
                f"{shard['sha256'][:12]}...; the file was changed or damaged. Rebuild the dataset."
            )
        self._verified.add(shard["path"])

    def _load(self, shard: dict) -> np.ndarray:
        key = shard["path"]
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        data = files.read_bytes(self._location(shard))
        if key not in self._verified:
            self._check(shard, hashlib.sha256(data).hexdigest())
        try:
            table = pq.read_table(pa.BufferReader(data), columns=["tokens"])
            rows = tokens_to_numpy(table.column("tokens"), self.seq_len + 1)
        except (pa.ArrowException, ValueError, KeyError) as err:
            raise ShardCorrupted(f"{self.root}/{key}: unreadable token shard ({err})") from err
        if len(rows) != shard["rows"]:
            raise ShardCorrupted(f"{self.root}/{key}: {len(rows)} rows, manifest says {shard['rows']}")
        self._cache[key] = rows
        if len(self._cache) > MAX_CACHED_SHARDS:
            self._cache.popitem(last=False)
        return rows
