"""Exact and near-duplicate detection over hash partitions, and the connected components of the duplicates.

What `data dedup` (`openllama.data.clean`) runs after it has scanned its inputs; every step is a set of tasks,
one per hash partition, that read only their partition's files and publish theirs whole (`openllama.files`),
so OUT can be a bucket and no task reads another's files at random:

1. keys, in the scan of each input file (`publish_keys`): the exact hash of each document's normalized text,
   and the MinHash signature of its character 13-grams with its LSH band keys, each written into one of
   `partitions` hash partitions; each signature into the partition of its document.
2. match, one task per partition: exact groups (same key) and LSH buckets (same band) of that partition only:
   memory is the partition, not the corpus. Exact copies become edges of one graph, partitioned by document;
   bucket pairs become candidates.
3. pair and verify, one task per partition each: a candidate pair picks up the signature of its first document
   in that document's partition, then is verified against its second one's in that one's (the estimated
   Jaccard of the signatures); verified pairs join the graph.
4. components, rounds of one task per partition (`star_round`) until every cluster is a star around its
   smallest document id; ids order documents by (subset, file path, line), so the document kept does not
   depend on input order, partitions or workers.
5. resolve, one task per partition: the removed documents and the kept one of each, per input file
   (`removed_in`).
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa

from openllama import files
from openllama.data import minhash

log = logging.getLogger(__name__)

ID_BITS = 32  # a document id is (unit index << 32) | its line in its file: ids sort as (subset, path, line)
ALL_PAIRS_BUCKET = 16  # buckets up to this size verify every pair; larger ones each member against two others


def exact_normalize(text: str) -> str:
    """The exact stage's normalization: Unicode NFC, case folded, whitespace runs collapsed to one space."""
    return " ".join(unicodedata.normalize("NFC", text).casefold().split())


def exact_key(text: str) -> bytes:
    """128 bits of the normalized text's hash: collisions stay unlikely past 10^15 documents."""
    return hashlib.blake2b(exact_normalize(text).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _tables_in(folder: str, prefix: str = "") -> list[str]:
    """The published `prefix*.parquet` files in `folder` (local or in a bucket): never what a crashed writer left
    under a temporary name."""
    names = ((path, path.rsplit("/", 1)[-1]) for path in files.files_under(folder))
    return [path for path, name in names if name.startswith(prefix) and name.endswith(".parquet")]


def _read_parquets(locations: Iterable[str], schema: pa.Schema) -> pa.Table:
    tables = [files.read_parquet(location) for location in locations]
    return pa.concat_tables(tables) if tables else schema.empty_table()


EXACT_SCHEMA = pa.schema([("k1", pa.uint64()), ("k2", pa.uint64()), ("id", pa.int64())])
BAND_SCHEMA = pa.schema([("band", pa.uint16()), ("key", pa.uint64()), ("id", pa.int64())])
ARC_SCHEMA = pa.schema([("u", pa.int64()), ("v", pa.int64())])  # one direction of an undirected edge
PAIR_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64())])  # an LSH candidate pair, a < b
ID_SCHEMA = pa.schema([("id", pa.int64())])
REMOVED_SCHEMA = pa.schema([("id", pa.int64()), ("kept", pa.int64()), ("stage", pa.string())])




def key_hasher(settings: dict) -> Callable[[str | None], tuple[bytes, np.ndarray | None]]:
    """A document's keys: (its exact key, its MinHash signature), empty or None for a stage that is off and
    for a document removed before deduplication (None)."""
    a, b = minhash.permutations(minhash.PRESETS[settings["preset"]].num_perm, settings["seed"])

    def keys(text: str | None) -> tuple[bytes, np.ndarray | None]:
        exact = exact_key(text) if text is not None and settings["exact"] else b""
        hashes = minhash.ngram_hashes(minhash.fuzzy_normalize(text)) if text is not None and settings["fuzzy"] else None
        return exact, minhash.signature(hashes, a, b) if hashes is not None and len(hashes) else None

    return keys


def publish_keys(uid: str, ids: np.ndarray, keys: list[bytes], signatures: list[np.ndarray | None], settings: dict,
                 work: str) -> None:
    """One input's exact keys, LSH band keys and signatures (`key_hasher`'s, for documents `ids`), written into
    the hash partitions for the match tasks."""
    preset = minhash.PRESETS[settings["preset"]]
    partitions = settings["partitions"]
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
                files.write_parquet(f"{work}/partitions/{p:05d}/{kind}-{uid}.parquet", part)


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
    return {"partition": partition, "exact_duplicates": int(duplicate.sum()), "candidates": len(pairs)}


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
        files.write_parquet(f"{folder}/{q:05d}/{name}.parquet", table.filter(pa.array(by_node == q)))


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
    return {"partition": partition, "candidates": len(a)}


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
    return {"partition": partition, "candidates": len(a), "verified": int(verified.sum())}


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
        files.write_parquet(f"{folder}/{p:05d}/{source}.parquet", pa.table({"u": pu, "v": pv}, schema=ARC_SCHEMA))


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
        files.write_parquet(f"{folder}/labels-{partition:05d}.parquet", pa.table(
            {"u": nodes, "v": smallest}, schema=ARC_SCHEMA))
        larger = v > u
        x, y = v[larger], smallest[group[larger]]
    else:
        has_smaller = first < nodes  # then `first` is the smallest of them
        linked = (v < u) & (v != first[group])
        x = np.concatenate([v[linked], nodes[has_smaller]])
        y = np.concatenate([first[group[linked]], first[has_smaller]])
    publish_edges(f"{work}/components/{round_ + 1:03d}", f"round-{partition:05d}", x, y, partitions)
    return {"round": round_, "partition": partition, "nodes": len(nodes), "arcs": len(u), "star": star}


def resolve_partition(partition: int, labels_round: int, work: str, uids: list[str]) -> dict:
    """The removed documents among one partition's nodes, each with the kept document of its cluster and the
    stage that found it, published per input file (`uids[i]` is input i's unit id) for `removed_in`."""
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
        files.write_parquet(f"{work}/resolve/{uids[index]}/{partition:05d}.parquet", pa.table(
            {"id": ids[mask], "kept": kept[mask], "stage": stage.tolist()}, schema=REMOVED_SCHEMA))
    return {"partition": partition, "exact": int(exact.sum()), "fuzzy": int((~exact).sum()),
            "clusters": int((~removed).sum())}


def removed_in(uid: str, work: str) -> dict[int, dict]:
    """The documents of input `uid` removed as copies, by line: {line: {"id", "kept", "stage"}}."""
    removed = _read_parquets(_tables_in(f"{work}/resolve/{uid}"), REMOVED_SCHEMA).to_pylist()
    return {row["id"] & ((1 << ID_BITS) - 1): row for row in removed}


def run_components(step: Callable[[int, Sequence[int], Callable[[int], dict]], list[dict]], partitions: int,
                   work: str) -> int:
    """Star rounds until every cluster is a star; the round whose labels are final.

    `step(round, partitions, task)` runs one round's tasks (one per partition) and returns their reports.
    """
    round_ = 0
    while True:
        results = step(round_, range(partitions),
                       lambda p, r=round_: star_round(r, p, work=work, partitions=partitions))
        log.info("dedup components: round %d, %d arcs (largest partition %d)", round_,
                 sum(r["arcs"] for r in results), max(r["arcs"] for r in results))
        if round_ % 2 == 0 and all(r["star"] for r in results):
            return round_
        round_ += 1
