"""Deterministic global batches over packed shards: step k is the same tokens on 1 worker or 256.

The batch of step k is a pure function of (seed, k, dataset, weights), so resuming needs only the step:

1. Subset counts: `Generator(PCG64([seed, k])).multinomial(B, weights)` splits the B sequences of the step
   over the subsets (weights renormalized over the subsets present).
2. Positions: a subset's running count over steps 0..k-1 is its position in its own stream, so each
   subset is read in order, without replacement, epoch after epoch.
3. Rows: stream position p of a subset with R rows is row `permutation(seed, subset, p // R)[p % R]`,
   a fresh shuffle per epoch.
4. Order: the B (subset, row) pairs are shuffled with `PCG64([seed, k, 1])`, so subsets mix within a batch.

Each process then reads only the rows of its own slice of the batch sharding.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from openllama.data.mixture import LLAMA_WEIGHTS, normalize


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
        self._permutations: dict[tuple[int, int], np.ndarray] = {}
        self._next_step, self._positions = 0, np.zeros(len(self.subsets), dtype=np.int64)

    def counts(self, step: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64([self.seed, step]))
        return rng.multinomial(self.batch_size, self.probabilities)

    def positions(self, step: int) -> np.ndarray:
        """Each subset's stream position at the start of `step` (O(1) when stepping forward, else O(step))."""
        if step < self._next_step:
            self._next_step, self._positions = 0, np.zeros_like(self._positions)
        while self._next_step < step:
            self._positions = self._positions + self.counts(self._next_step)
            self._next_step += 1
        return self._positions

    def _permutation(self, subset: int, epoch: int) -> np.ndarray:
        key = (subset, epoch)
        if key not in self._permutations:
            if len(self._permutations) > 4 * len(self.subsets):
                self._permutations.clear()
            rng = np.random.Generator(np.random.PCG64([self.seed, subset_seed(self.subsets[subset]), epoch]))
            self._permutations[key] = rng.permutation(int(self.row_counts[subset]))
        return self._permutations[key]

    def plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(subset index [B], row index [B]) of the global batch at `step`."""
        start, counts = self.positions(step), self.counts(step)
        subset_ids, rows = [], []
        for s, (first, n) in enumerate(zip(start, counts, strict=True)):
            stream = first + np.arange(n)
            epochs, offsets = np.divmod(stream, self.row_counts[s])
            for epoch in np.unique(epochs):
                picked = epochs == epoch
                rows.append(self._permutation(s, int(epoch))[offsets[picked]])
                subset_ids.append(np.full(int(picked.sum()), s))
        subset_ids, rows = np.concatenate(subset_ids), np.concatenate(rows)
        order = np.random.Generator(np.random.PCG64([self.seed, step, 1])).permutation(self.batch_size)
        return subset_ids[order], rows[order]

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
