"""Loglikelihood requests packed into model rows: each context once, several questions a row, few shapes.

The choices of a question share one copy of its context: each continuation is a branch that sees the
context and itself, at the positions it would have after the context alone (`packed_attention_mask`).
Several questions share a row, filled best-fit, and rows are batched at one width per evaluation
(`bucket_length`), so XLA compiles a handful of shapes. Inputs longer than the context are cut from the
left, keeping the continuation. The scores equal those of each request run alone; `backend.Scorer`
computes them.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

SMALLEST_BUCKET = 32
SLOT_BLOCK = 256  # scored tokens per batch are padded to a multiple of this

# (context tokens, continuation tokens) with the context already starting with BOS
TokenPair = tuple[list[int], list[int]]
# tokens, positions, question numbers, branch numbers (int32 [rows, width]); then per scored token its
# flat index rows*width into the outputs and its target (int32 [slots])
Batch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def bucket_length(n: int, max_length: int) -> int:
    """The padded length for an input of n tokens: 32, 48, 64, 96, 128, 192, ... (at most max_length).

    Steps of 1.5x and 1.33x keep padding under a third while the number of compiled shapes stays small.
    """
    length = SMALLEST_BUCKET
    while length < n:
        length += length // 2 if length & (length - 1) == 0 else length // 3
    return min(length, max_length)


@dataclass
class PackedRow:
    """One row of model input holding several requests, each context once.

    A question's context comes first; each of its continuations follows as a branch (all its tokens
    but the last) whose tokens see the context and their own branch only, at the positions they would
    have after the context alone. So k choices cost one context plus k continuations instead of k
    times both, and several questions share a row instead of padding one each. A slot is one scored
    token: (index in the row of the token whose output predicts it, the token, the request).
    """

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    questions: list[int] = field(default_factory=list)  # 1, 2, ... per question in the row; 0 is padding
    branches: list[int] = field(default_factory=list)  # 0 for a context, i for its i-th continuation
    slots: list[tuple[int, int, int]] = field(default_factory=list)

    def add(self, context: Sequence[int], continuations: list[tuple[int, list[int]]]) -> None:
        """Append one question: its context, then a branch per (request, continuation)."""
        question = (self.questions[-1] if self.questions else 0) + 1
        start, n = len(self.tokens), len(context)
        self._extend(context, range(n), question, 0)
        for branch, (request, continuation) in enumerate(continuations, 1):
            self.slots.append((start + n - 1, continuation[0], request))
            for offset, target in enumerate(continuation[1:]):
                self.slots.append((len(self.tokens) + offset, target, request))
            self._extend(continuation[:-1], range(n, n + len(continuation) - 1), question, branch)

    def _extend(self, tokens: Sequence[int], positions: range, question: int, branch: int) -> None:
        self.tokens += tokens
        self.positions += positions
        self.questions += [question] * len(tokens)
        self.branches += [branch] * len(tokens)


def pack_rows(pairs: Sequence[TokenPair], max_length: int) -> list[PackedRow]:
    """Rows of at most max_length tokens scoring every pair, fullest first.

    Each pair is context+continuation cut from the left to max_length+1 tokens, as lm-eval's `hf`
    backend does. Pairs with the same (cut) context form one question; a question too long for one row
    is split over rows, each with its own copy of the context. Questions go into rows best-fit, longest
    first, into rows as wide as the smallest power of two that holds the longest question. An empty
    continuation has nothing to score (its log-likelihood is 0) and gets no slot.
    """
    questions: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for request, (context, continuation) in enumerate(pairs):
        if not continuation:
            continue
        whole = (context + continuation)[-(max_length + 1) :]
        n_scored = min(len(continuation), len(whole) - 1)
        questions.setdefault(tuple(whole[:-n_scored]), []).append((request, whole[-n_scored:]))
    units: list[tuple[int, tuple[int, ...], list[tuple[int, list[int]]]]] = []  # (tokens, context, branches)
    for context, branches in questions.items():
        unit: list[tuple[int, list[int]]] = []
        size = len(context)
        for request, continuation in branches:
            if unit and size + len(continuation) - 1 > max_length:
                units.append((size, context, unit))
                unit, size = [], len(context)
            unit.append((request, continuation))
            size += len(continuation) - 1
        units.append((size, context, unit))
    units.sort(key=lambda unit: (-unit[0], unit[2][0][0]))
    width = 1 << max(units[0][0] - 1, 0).bit_length() if units else 1
    width = min(max(width, SMALLEST_BUCKET), max_length)
    rows: list[PackedRow] = []
    free: list[tuple[int, int]] = []  # (free tokens, row number), sorted: best fit is the first that fits
    for size, context, branches in units:
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            rows.append(PackedRow())
            number, room = len(rows) - 1, width
        else:
            room, number = free.pop(at)
        rows[number].add(context, branches)
        bisect.insort(free, (room - size, number))
    return sorted(rows, key=lambda row: -len(row.tokens))


def batch_rows(rows: Sequence[PackedRow], n_rows: int, width: int) -> tuple[Batch, np.ndarray]:
    """Model inputs for these rows, padded to [n_rows, width], and the request each slot belongs to (-1:
    padding). Slots are padded to a multiple of SLOT_BLOCK."""
    n_slots = -(-sum(len(row.slots) for row in rows) // SLOT_BLOCK) * SLOT_BLOCK
    arrays = np.zeros((4, n_rows, width), np.int32)  # tokens, positions, questions, branches
    slot_index = np.zeros(n_slots, np.int32)
    slot_target = np.zeros(n_slots, np.int32)
    slot_request = np.full(n_slots, -1, np.int64)
    at = 0
    for r, row in enumerate(rows):
        n = len(row.tokens)
        for a, values in enumerate((row.tokens, row.positions, row.questions, row.branches)):
            arrays[a, r, :n] = values
        for index, target, request in row.slots:
            slot_index[at], slot_target[at], slot_request[at] = r * width + index, target, request
            at += 1
    return (*arrays, slot_index, slot_target), slot_request


def make_batches(pairs: Sequence[TokenPair], batch_size: int, max_length: int) -> list[tuple[Batch, np.ndarray]]:
    """All pairs packed into batches of one shape, [min(batch_size, rows rounded up to a power of two),
    bucket of the longest row], so that a whole evaluation compiles the model once: on CPU, compiling
    another shape costs about what scoring a few hundred tokens does, and full rows leave little to pad."""
    rows = pack_rows(pairs, max_length)
    if not rows:
        return []
    width = bucket_length(max(len(row.tokens) for row in rows), max_length)
    n_rows = min(batch_size, 1 << (len(rows) - 1).bit_length())
    return [batch_rows(rows[start : start + n_rows], n_rows, width) for start in range(0, len(rows), n_rows)]


def packed_attention_mask(questions: jax.Array, branches: jax.Array) -> jax.Array:
    """[rows, 1, width, width]: a token sees earlier tokens of its own question that are its context
    or in its own branch (padding, question 0, sees only padding)."""
    width = questions.shape[1]
    causal = jnp.tril(jnp.ones((width, width), bool))
    same_question = questions[:, :, None] == questions[:, None, :]
    visible_branch = (branches[:, None, :] == 0) | (branches[:, :, None] == branches[:, None, :])
    return (causal & same_question & visible_branch)[:, None]
