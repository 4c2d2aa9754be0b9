"""MinHash signatures over character n-grams, LSH band keys, and the S-curve that picks bands and rows.

Near-duplicate detection in `openllama.data.dedup` estimates the Jaccard similarity of two documents' sets of
character 13-grams from their MinHash signatures. Everything here is numpy over whole documents (no Python loop
per n-gram), so signing is cheap next to reading and parsing the jsonl.

Hashing: the text is read as an array of Unicode code points; each n-gram's 64-bit hash is a polynomial over its
code points (n vectorized multiply-adds, wrapping mod 2^64) followed by a 64-bit finalizer that mixes the bits.
Permutation i of a hash x is multiply-shift, (a_i * x + b_i) mod 2^64 >> 32, with odd a_i drawn from a seeded
generator: a 2-universal family into 32 bits, which is what MinHash needs for an unbiased estimate.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

NGRAM = 13  # SlimPajama's character n-gram length
CHUNK_NGRAMS = 1 << 14  # n-grams permuted at a time: the (n-grams x permutations) array stays at a few MB
_POLY_BASE = np.uint64(0x100000001B3)
_MIX_1, _MIX_2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_NOT_WORD = re.compile(r"[\W_]+")  # punctuation and whitespace (and `_`, which \w counts as a word character)


@dataclass(frozen=True)
class LshPreset:
    """How many permutations a signature has and how they are cut into bands of rows for LSH."""

    num_perm: int
    bands: int
    rows: int


PRESETS = {
    # 25 bands of 10 rows: P(candidate) >= 0.996 at Jaccard 0.85, and 250 permutations make the estimate tight
    # enough (sd 0.023 at 0.85) that verification at 0.8 keeps >= 0.98 of true pairs and almost no pair under 0.7
    "default": LshPreset(num_perm=250, bands=25, rows=10),
    # SlimPajama's setting: 128 permutations of which 9 bands x 13 rows are used
    "slimpajama": LshPreset(num_perm=128, bands=9, rows=13),
    # datatrove's default: 14 buckets of 8 hashes (bench/dedup.py compares both tools with the same bands)
    "datatrove": LshPreset(num_perm=112, bands=14, rows=8),
}


def fuzzy_normalize(text: str) -> str:
    """SlimPajama's normalization: lowercased, punctuation and whitespace removed.

    Lowercasing is Unicode case folding after NFC, as in the exact stage's normalization, so that documents
    equal for the exact stage are equal here too and always land in the same near-duplicate cluster.
    """
    return _NOT_WORD.sub("", unicodedata.normalize("NFC", text).casefold())


def _mix(h: np.ndarray) -> np.ndarray:
    """A 64-bit finalizer: the polynomial hash's low bits depend on few code points; these depend on all."""
    h = h ^ (h >> np.uint64(33))
    h = h * _MIX_1
    h = h ^ (h >> np.uint64(33))
    h = h * _MIX_2
    return h ^ (h >> np.uint64(33))


def window_hashes(values: np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of every window of `n` consecutive values (uint64): a polynomial, then mixed; with `n`."""
    count = len(values) - n + 1
    h = np.zeros(max(0, count), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * _POLY_BASE + values[k : k + count]
        return _mix(h + np.uint64(n))


def ngram_hashes(normalized: str, n: int = NGRAM) -> np.ndarray:
    """The distinct 64-bit hashes of `normalized`'s character n-grams (the whole string when shorter than n)."""
    if not normalized:
        return np.zeros(0, dtype=np.uint64)
    points = np.frombuffer(normalized.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    return np.unique(window_hashes(points, min(n, len(points))))


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of each permutation, from `seed` alone: the same signatures on every worker and rerun."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


def signature(hashes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The MinHash signature (uint32 per permutation) of a set of n-gram hashes; all 2^32-1 for the empty set."""
    result = np.full(len(a), np.iinfo(np.uint32).max, dtype=np.uint32)
    with np.errstate(over="ignore"):
        for start in range(0, len(hashes), CHUNK_NGRAMS):
            chunk = hashes[start : start + CHUNK_NGRAMS, None]
            permuted = ((chunk * a + b) >> np.uint64(32)).astype(np.uint32)
            np.minimum(result, permuted.min(axis=0), out=result)
    return result


def band_keys(signatures: np.ndarray, preset: LshPreset) -> np.ndarray:
    """(documents, bands) uint64 keys: two documents share key j exactly when their band j rows are equal."""
    used = signatures[:, : preset.bands * preset.rows].reshape(len(signatures), preset.bands, preset.rows)
    keys = np.zeros(used.shape[:2], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r in range(preset.rows):
            keys = _mix(keys * _POLY_BASE + used[:, :, r].astype(np.uint64))
    return keys


def estimated_jaccard(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The share of equal signature entries, row by row: an unbiased estimate of the sets' Jaccard similarity."""
    return (first == second).mean(axis=-1)


def p_candidate(jaccard: float, bands: int, rows: int) -> float:
    """The S-curve: the chance two documents of this Jaccard similarity share at least one band."""
    return 1.0 - (1.0 - jaccard**rows) ** bands


def p_verified(jaccard: float, num_perm: int, threshold: float) -> float:
    """The chance a candidate pair of this Jaccard similarity has an estimated Jaccard >= `threshold`."""
    need = math.ceil(threshold * num_perm - 1e-9)
    return sum(math.comb(num_perm, k) * jaccard**k * (1 - jaccard) ** (num_perm - k) for k in range(need, num_perm + 1))


def s_curve_table(preset: LshPreset, threshold: float,
                  points: tuple[float, ...] = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)) -> list[dict[str, float]]:
    """P(candidate) and P(candidate and verified) at each Jaccard in `points`: the table docs/dedup.md shows."""
    return [{"jaccard": j, "p_candidate": p_candidate(j, preset.bands, preset.rows),
             "p_removed": p_candidate(j, preset.bands, preset.rows) * p_verified(j, preset.num_perm, threshold)}
            for j in points]
