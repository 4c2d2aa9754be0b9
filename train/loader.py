"""Deterministic global batches over packed shards: step k is the same tokens on 1 worker or 256.

The batch of step k is a pure function of (seed, k, dataset, weights), so resuming needs only the step, and
computing it costs the same at any step and for a corpus of any size: nothing per row of the corpus is ever
held, and nothing of earlier steps is replayed. A plan costs O(B) time and memory.

1. Subset counts. The run's sequences are slots 0, 1, 2, ...; step k holds slots [kB, (k+1)B). A
   `MixtureSchedule` deals slots to subsets down a balanced binary tree over the subsets: of the first m
   slots reaching a node whose left side carries share p of its weight, exactly floor(m p + phase) go left
   and the rest go right (p in fixed point, phase seeded per node). That count is a closed form of m, so
   `counts_before(n)`, the slots of each subset among [0, n), costs a few integer operations per subset.
   Each slot goes to exactly one subset, every step holds exactly B, and a subset's count never strays
   from n x weight by more than the depth of the tree, plus n / 2**32 per level for the fixed point (weights
   renormalized over the subsets present).
2. Positions. A subset's count before step k is its position in its own stream, so each subset is read in
   order, without replacement, epoch after epoch.
3. Rows. Stream position p of a subset with R rows is row `RowShuffle(R, key(seed, subset, p // R))(p % R)`:
   a Feistel network keyed by (seed, subset name, epoch) over the smallest power of two >= R, cycle-walked
   back into [0, R). It is a bijection of [0, R) computed per index, a fresh one per epoch, and keyed by the
   subset's name rather than its place in the list, so adding a subset does not reshuffle the others.
4. Order. The B subset labels are shuffled with `PCG64([seed, k, 1])`, so subsets mix within a batch; the
   slots of one subset take its rows in stream order, so reading the batches in order reads every subset's
   stream in order (its two epochs do not interleave in the step where one ends).

Each process then reads only the rows of its own slice of the batch sharding.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from openllama.data.mixture import LLAMA_WEIGHTS, normalize

FEISTEL_ROUNDS = 6  # four make a pseudorandom permutation of random round functions; two more for margin
SHARE_BITS = 32  # a node's left share is held as an integer over 2**SHARE_BITS, so the schedule is exact


class RowSource(Protocol):
    """What the loader needs of a dataset (`openllama.data.shards.PackedDataset` is one)."""

    @property
    def seq_len(self) -> int: ...

    @property
    def subsets(self) -> list[str]: ...

    def rows(self, subset: str) -> int: ...

    def read(self, subset: str, indices: np.ndarray) -> np.ndarray: ...


def mixture(subsets: list[str], weights: Mapping[str, float] | None) -> dict[str, float]:
    """Sampling weights over the subsets present, renormalized to sum to 1; zero-weight subsets dropped."""
    shares = normalize(dict(LLAMA_WEIGHTS if weights is None else weights), subsets)
    return {s: w for s, w in shares.items() if w > 0}


def subset_seed(name: str) -> int:
    """A stable per-subset seed (not list order), so adding a subset does not reshuffle the others."""
    return zlib.crc32(name.encode())


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every output bit depends on every input bit (the Feistel round function)."""
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


class RowShuffle:
    """A seeded bijection of [0, rows) evaluated per index, so a shuffle of any size costs nothing to hold.

    A Feistel network is a bijection of [0, 2**bits) whatever its round function; cycle-walking (applying it
    again to a value that landed outside [0, rows)) restricts it to a bijection of [0, rows). With 2**bits
    the smallest power of two >= rows, fewer than two applications are needed on average.
    """

    def __init__(self, rows: int, key: Sequence[int]):
        if rows < 1:
            raise ValueError(f"a shuffle needs at least one row, got rows={rows}")
        self.rows = rows
        bits = max(2, (rows - 1).bit_length())
        self.high_bits, self.low_bits = bits // 2, bits - bits // 2
        self.round_keys = np.random.SeedSequence([int(k) for k in key]).generate_state(FEISTEL_ROUNDS, np.uint64)

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The rows at `positions` (each in [0, rows)) as int64, same shape."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.rows):
            raise IndexError(f"shuffle positions must lie in [0, {self.rows})")
        values = self._permute(positions.reshape(-1).astype(np.uint64))  # 1-d: array arithmetic wraps silently
        outside = values >= np.uint64(self.rows)
        while outside.any():
            values[outside] = self._permute(values[outside])
            outside = values >= np.uint64(self.rows)
        return values.astype(np.int64).reshape(positions.shape)

    def _permute(self, values: np.ndarray) -> np.ndarray:
        """One pass of the network over [0, 2**bits): each round swaps halves of unequal width when bits is odd."""
        high, low = self.high_bits, self.low_bits
        for key in self.round_keys:
            left, right = values >> np.uint64(low), values & np.uint64((1 << low) - 1)
            scrambled = _mix(right + key) & np.uint64((1 << high) - 1)
            values = (right << np.uint64(high)) | (left ^ scrambled)
            high, low = low, high
        return values


class MixtureSchedule:
    """Which subset each slot of the run reads, as a closed form of the slot index (module docstring, 1.)."""

    def __init__(self, weights: Sequence[float], seed: int):
        if not weights or min(weights) <= 0:
            raise ValueError(f"a mixture schedule needs positive weights, got {list(weights)}")
        self.size = len(weights)
        # (first, middle, end, left share over 2**SHARE_BITS, phase): subsets [first, middle) go left
        self.nodes: list[tuple[int, int, int, int, int]] = []
        phases = np.random.SeedSequence([seed, 2]).generate_state(max(1, self.size - 1), np.uint32)

        def split(first: int, end: int) -> None:
            if end - first == 1:
                return
            middle = (first + end) // 2
            left, total = sum(weights[first:middle]), sum(weights[first:end])
            share = min(max(round(left / total * 2**SHARE_BITS), 1), 2**SHARE_BITS - 1)
            self.nodes.append((first, middle, end, share, int(phases[len(self.nodes)])))
            split(first, middle)
            split(middle, end)

        split(0, self.size)

    def counts_before(self, slots: int) -> np.ndarray:
        """Slots of each subset among slots [0, `slots`), int64 [subsets]; they sum to `slots`."""
        reaching = {(0, self.size): int(slots)}
        counts = np.zeros(self.size, dtype=np.int64)
        for first, middle, end, share, phase in self.nodes:  # parents come before their children
            m = reaching.pop((first, end))
            left = (m * share + phase) >> SHARE_BITS
            reaching[(first, middle)], reaching[(middle, end)] = left, m - left
        for (first, _), m in reaching.items():
            counts[first] = m
        return counts


class GlobalBatches:
    """The global batch plan of a run: `plan(step)` -> (subset index, row) for each of B sequences."""

    def __init__(self, source: RowSource, batch_size: int, seed: int, weights: Mapping[str, float] | None):
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.weights = mixture(source.subsets, weights)
        self.subsets = sorted(self.weights)
        self.probabilities = np.array([self.weights[s] for s in self.subsets])
        self.row_counts = np.array([source.rows(s) for s in self.subsets], dtype=np.int64)
        empty = [s for s, n in zip(self.subsets, self.row_counts, strict=True) if n == 0]
        if empty:
            raise ValueError(f"subsets {empty} have weight but no rows; drop them from data.weights")
        self.schedule = MixtureSchedule(list(self.probabilities), seed)

    def positions(self, step: int) -> np.ndarray:
        """Each subset's stream position at the start of `step`: rows of it read by steps 0..step-1."""
        return self.schedule.counts_before(step * self.batch_size)

    def counts(self, step: int) -> np.ndarray:
        """How many of step `step`'s B sequences come from each subset."""
        return self.positions(step + 1) - self.positions(step)

    def shuffle(self, subset: int, epoch: int) -> RowShuffle:
        """The row order of `epoch` of subset index `subset`."""
        key = (self.seed, subset_seed(self.subsets[subset]), epoch)
        return RowShuffle(int(self.row_counts[subset]), key)

    def plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(subset index [B], row index [B]) of the global batch at `step`."""
        start, counts = self.positions(step), self.counts(step)
        subset_ids, rows = [], []
        for s, (first, n) in enumerate(zip(start, counts, strict=True)):
            stream = first + np.arange(n)
            epochs, offsets = np.divmod(stream, self.row_counts[s])
            for epoch in np.unique(epochs):
                picked = epochs == epoch
                rows.append(self.shuffle(s, int(epoch))(offsets[picked]))
                subset_ids.append(np.full(int(picked.sum()), s))
        subset_ids, rows = np.concatenate(subset_ids), np.concatenate(rows)  # by subset, each in stream order
        order = np.random.Generator(np.random.PCG64([self.seed, step, 1])).permutation(self.batch_size)
        mixed = subset_ids[order]
        placed = np.empty_like(rows)
        placed[np.argsort(mixed, kind="stable")] = rows  # a subset's slots take its rows in stream order
        return mixed, placed

    def read(self, step: int, batch_rows: np.ndarray | slice | None = None) -> np.ndarray:
        """Tokens int32 [n, seq_len + 1] of the global batch's rows `batch_rows` (all rows when None)."""
        subset_ids, rows = self.plan(step)
        if batch_rows is not None:
            subset_ids, rows = subset_ids[batch_rows], rows[batch_rows]
        return read_rows(self.source, [self.subsets[i] for i in subset_ids], rows)


def read_rows(source: RowSource, subsets: list[str], rows: np.ndarray) -> np.ndarray:
    """Rows from several subsets, one read per subset, returned in the order asked."""
    out = np.empty((len(rows), source.seq_len + 1), dtype=np.int32)
    names = np.array(subsets)
    for name in np.unique(names):
        picked = names == name
        out[picked] = source.read(str(name), rows[picked])
    return out


def local_rows(sharding, global_batch: int) -> np.ndarray:
    """Indices of the global batch rows this process holds under `sharding` (in the order JAX expects)."""
    index_map = sharding.addressable_devices_indices_map((global_batch,))
    starts = sorted({(idx[0].start or 0, idx[0].stop or global_batch) for idx in index_map.values()})
    return np.concatenate([np.arange(a, b) for a, b in starts])
