"""Reader for packed token shards (format `openllama-packed-v1`), the contract between data and training.

A dataset directory holds `manifest.json` and parquet shards with one column `tokens`: each row is exactly
`seq_len + 1` token ids, and row r+1 starts with row r's last token, so inputs are `row[:-1]` and targets
`row[1:]`. Training samples rows by index, so the reader maps a subset-wide row index to (shard, row).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

FORMAT = "openllama-packed-v1"
MAX_CACHED_SHARDS = 32


class DatasetNotFinished(Exception):
    """The manifest says the tokenize run that writes this dataset has not completed."""


class ShardCorrupted(Exception):
    """A shard's bytes or shape do not match what the manifest recorded."""


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or any URI pyarrow understands (gs://, s3://, file://)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


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
        self._fs, self._base = filesystem(self.root)
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
        fs, base = filesystem(str(root))
        manifest_path = f"{base.rstrip('/')}/manifest.json"
        try:
            with fs.open_input_stream(manifest_path) as f:
                manifest = json.loads(f.read())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{root}: no manifest.json; build the dataset with `openllama data tokenize ... --out {root}`"
            ) from None
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
        if manifest.get("finished") is not True:
            raise DatasetNotFinished(
                f"{root}: manifest.json has finished={manifest.get('finished')!r}; the tokenize run did not "
                "complete. Rerun the same `openllama data tokenize` command to finish it."
            )
        splits = {s["split"] for s in manifest["shards"]}
        if split not in splits:
            raise ValueError(f"{root}: no shards for split {split!r} (has: {sorted(splits)})")
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
                self._check(shard, read_bytes(self._fs, self._path(shard)))

    def _shards_of(self, subset: str) -> list[dict]:
        if subset not in self._shards:
            raise KeyError(f"no subset {subset!r} in split {self.split!r} (has: {self.subsets})")
        return self._shards[subset]

    def _starts_of(self, subset: str) -> np.ndarray:
        self._shards_of(subset)
        return self._starts[subset]

    def _path(self, shard: dict) -> str:
        return f"{self._base.rstrip('/')}/{shard['path']}"

    def _check(self, shard: dict, data: bytes) -> None:
        digest = hashlib.sha256(data).hexdigest()
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
        data = read_bytes(self._fs, self._path(shard))
        if key not in self._verified:
            self._check(shard, data)
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
