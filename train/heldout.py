"""Held-out loss and perplexity per subset: the one implementation training and `openllama eval` share.

Rows are scored as they were trained on: every token after a row's first is a target once, so the loss
is training's own `val/<subset>/loss` on the same rows, wherever it is computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from openllama.train.loader import RowSource

# (tokens int32 [batch, seq + 1], row weight float32 [batch], 0 for padding) -> (summed token loss, tokens)
ScoreBatch = Callable[[np.ndarray, np.ndarray], tuple[float, float]]


def validation_rows(source: RowSource, subset: str, limit: int | None) -> np.ndarray:
    """The first `limit` rows of a validation subset (all when None): the same held-out set every time."""
    rows = source.rows(subset)
    return np.arange(rows if limit is None else min(limit, rows))


def heldout_loss(score: ScoreBatch, source: RowSource, subset: str, rows: np.ndarray, batch_size: int) -> float:
    """Mean next-token loss over `rows` of `subset`, in fixed-size batches (the last one padded, weight 0)."""
    loss_sum = count = 0.0
    for first in range(0, len(rows), batch_size):
        chunk = rows[first:first + batch_size]
        weight = np.zeros(batch_size, np.float32)
        weight[: len(chunk)] = 1.0
        padded = np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[0])])
        total, n = score(source.read(subset, padded), weight)
        loss_sum += float(total)
        count += float(n)
    return loss_sum / max(count, 1.0)


def heldout_metrics(score: ScoreBatch, source: RowSource, batch_size: int,
                    rows_per_subset: int | None = None) -> dict[str, float]:
    """`{subset}/loss` and `{subset}/ppl` for every validation subset with rows."""
    metrics: dict[str, float] = {}
    for subset in source.subsets:
        rows = validation_rows(source, subset, rows_per_subset)
        if not len(rows):
            continue
        loss = heldout_loss(score, source, subset, rows, batch_size)
        metrics[f"{subset}/loss"] = loss
        metrics[f"{subset}/ppl"] = perplexity(loss)
    return metrics


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged model reports a huge number rather than an overflow."""
    return math.exp(min(loss, 50.0))
