"""A train state as one TensorStore OCDBT database that every process writes at once, straight into the run's
folder or bucket: a step checkpoint's `state/`.

Each process writes only the shards it holds (replica 0 of each, so every chunk has one writer) into a
database of its own, `state/ocdbt.process_<i>/`, as zarr3 arrays chunked by the sharding they were saved
with. One transaction per process makes that a few objects per process, however many arrays the model has.
Once every process has written, process 0 merges their databases into the root (`state/manifest.ocdbt`) by
reference: the merge copies no array bytes. A restore opens the root and reads, for each shard its devices
hold in the target sharding, only the chunks that overlap it, as ranged reads; a chunk that is missing is an
error (`fill_missing_data_reads` off), never zeros.

TensorStore reaches a bucket through its own S3 and GCS drivers (`files.kvstore_spec`), so nothing is staged
on local disk. This module knows arrays and databases; `checkpoint.py` owns the step folder around them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from openllama import files

PROCESS_PREFIX = "ocdbt.process_"
MANIFEST = "manifest.ocdbt"  # the root database's manifest: written by the merge, so only once complete
# Each array's zarr.json (a few hundred bytes) is kept inside the database's B-tree nodes rather than among the
# chunks of a data file, so a data file holds only its process's chunks, in the order they were written.
DATABASE_CONFIG = {"max_inline_value_bytes": 1024}
# Chunk reads of one data file that are near each other become one ranged request: restoring onto the layout
# it was saved with, a process then reads its own data file in a few requests (a store charges per request).
READ_COALESCING = {"experimental_read_coalescing_threshold_bytes": 1 << 20,
                   "experimental_read_coalescing_merged_bytes": 1 << 30,
                   "experimental_read_coalescing_interval": "10ms"}


def leaf_name(path: tuple) -> str:
    """A pytree key path as a database key: {'params': {'w': x}} -> 'params/w', optax's tuples by position."""
    parts = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            raise TypeError(f"cannot name the pytree key {key!r}")
    return "/".join(parts)


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    return [(leaf_name(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


@dataclass
class HostArray:
    """This process's part of one array, copied off the devices: the chunks it writes and where they go."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_shape: tuple[int, ...]
    chunks: list[tuple[tuple[slice, ...], np.ndarray]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(data.nbytes for _, data in self.chunks)


def copy_to_host(tree: Any) -> list[HostArray]:
    """Each array's shards that this process writes (replica 0), copied into host memory: the only part of a
    save that must wait for the devices. All copies are started before the first is waited for."""
    arrays = []
    for name, leaf in named_leaves(tree):
        if not isinstance(leaf, jax.Array):
            leaf = jax.numpy.asarray(leaf)
        shards = [shard for shard in leaf.addressable_shards if shard.replica_id == 0]
        for shard in shards:
            shard.data.copy_to_host_async()
        arrays.append(HostArray(name, tuple(leaf.shape), np.dtype(leaf.dtype),
                                tuple(leaf.sharding.shard_shape(leaf.shape)),
                                [(shard.index, np.asarray(shard.data)) for shard in shards]))
    return arrays


def _database(base: str, *, writes: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"driver": "ocdbt", "base": files.kvstore_spec(base)}
    if writes:
        spec["config"] = DATABASE_CONFIG
    else:
        spec.update(READ_COALESCING)
    return spec


def _array_spec(database: dict[str, Any], name: str) -> dict[str, Any]:
    return {"driver": "zarr3", "kvstore": {**database, "path": f"{name}/"}}


def write_part(location: str, arrays: Iterable[HostArray], process: int) -> None:
    """This process's chunks into its own database under `location`, in one transaction (one commit)."""
    database = _database(files.join(str(location), f"{PROCESS_PREFIX}{process}"), writes=True)
    context = ts.Context()
    transaction = ts.Transaction()
    opened = []
    for array in arrays:
        if not array.chunks:
            continue
        metadata = {"shape": list(array.shape), "data_type": ts.dtype(array.dtype).name,
                    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(array.chunk_shape)}}}
        opened.append((array, ts.open({**_array_spec(database, array.name), "metadata": metadata}, create=True,
                                      context=context, transaction=transaction)))
    writes = []
    for array, future in opened:
        store = future.result()
        writes += [store[index].write(data) for index, data in array.chunks]
    for write in writes:
        write.result()
    transaction.commit_async().result()


def merge(location: str, processes: int) -> None:
    """The processes' databases under `location` merged into its root database, by reference, atomically."""
    context = ts.Context()
    root = ts.KvStore.open(_database(str(location), writes=True), context=context).result()
    parts = [ts.KvStore.open(_database(files.join(str(location), f"{PROCESS_PREFIX}{i}")), context=context)
             for i in range(processes)]
    transaction = ts.Transaction(atomic=True)
    copies = [part.result().experimental_copy_range_to(root.with_transaction(transaction)) for part in parts]
    for copy in copies:
        copy.result()
    transaction.commit_async().result()


class StateMismatch(ValueError):
    """The checkpoint's arrays do not fit the state asked for (another model, or a missing array)."""


def _read_context() -> ts.Context:
    """One cache for the database's manifest and B-tree nodes, shared by every array read: without it each
    array's open fetches them again, a round trip each (a step is immutable once complete)."""
    return ts.Context({"cache_pool": {"total_bytes_limit": 64 << 20}})


def _read_spec(database: dict[str, Any], name: str) -> dict[str, Any]:
    return {**_array_spec(database, name), "fill_missing_data_reads": False, "recheck_cached_metadata": False,
            "recheck_cached_data": False}


def read(location: str, abstract: Any) -> Any:
    """`abstract` (a pytree of ShapeDtypeStruct with shardings) filled from the root database at `location`:
    each process reads only the chunks under the shards its devices hold."""
    database = _database(str(location))
    context = _read_context()
    leaves = named_leaves(abstract)
    stores = [ts.open(_read_spec(database, name), open=True, context=context) for name, _ in leaves]
    pending = []
    for (name, target), future in zip(leaves, stores, strict=True):
        try:
            store = future.result()
        except ValueError as error:
            raise StateMismatch(f"{location} has no array {name} ({error})") from error
        if tuple(store.shape) != tuple(target.shape):
            raise StateMismatch(f"{location}: {name} has shape {tuple(store.shape)}, the state asks for "
                                f"{tuple(target.shape)}")
        reads: dict[tuple, Any] = {}
        placements = []
        for device, index in target.sharding.addressable_devices_indices_map(target.shape).items():
            key = tuple((s.start, s.stop, s.step) for s in index)
            if key not in reads:
                reads[key] = store[index].read()
            placements.append((device, key))
        pending.append((target, reads, placements, store.dtype.numpy_dtype))
    out = []
    for target, reads, placements, stored in pending:
        host = {key: read.result() for key, read in reads.items()}
        if np.dtype(target.dtype) != stored:
            host = {key: value.astype(target.dtype) for key, value in host.items()}
        out.append(jax.make_array_from_single_device_arrays(
            target.shape, target.sharding, [jax.device_put(host[key], device) for device, key in placements]))
    return jax.tree.unflatten(jax.tree.structure(abstract), out)


def array_names(location: str) -> list[str]:
    """The names of the arrays in the root database at `location` (each one's zarr.json key)."""
    store = ts.KvStore.open(_database(str(location))).result()
    return sorted(key.decode().removesuffix("/zarr.json") for key in store.list().result()
                  if key.endswith(b"/zarr.json"))


def abstract_tree(location: str, prefix: str) -> dict:
    """The arrays under `prefix` in the root database at `location` as a nested dict of ShapeDtypeStruct
    (no sharding): the shape of a tree to read without knowing the model that wrote it."""
    database = _database(str(location))
    context = _read_context()
    names = [name for name in array_names(location) if name.startswith(f"{prefix}/")]
    stores = [ts.open(_read_spec(database, name), open=True, context=context) for name in names]
    tree: dict = {}
    for name, future in zip(names, stores, strict=True):
        store = future.result()
        *parents, leaf = name.removeprefix(f"{prefix}/").split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = jax.ShapeDtypeStruct(tuple(store.shape), store.dtype.numpy_dtype)
    return tree
