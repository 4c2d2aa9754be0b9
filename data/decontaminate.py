"""Decontamination: documents that share a word n-gram with an evaluation item are removed before training.

The items come in as texts, `{task: [item text, ...]}` in a JSON file (what `openllama eval texts` writes for
the tasks eval runs; the pipeline hands it to `data dedup --decontaminate FILE`), so that the data stage
knows nothing of how eval stores its tasks. Words are NFC-normalized, case folded runs of letters and digits;
an item is checked by its n-grams of `ngram` words (a shorter item by its whole length, down to `min_words`).
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from openllama import files
from openllama.commands import BadInput
from openllama.data import minhash

_WORD = re.compile(r"\w+")


def read_texts(location: str) -> dict[str, list[str]]:
    """The `{task: [item text, ...]}` of a decontamination file (local or URI), checked to be that shape."""
    try:
        texts = files.read_json(location)
    except FileNotFoundError:
        raise FileNotFoundError(f"decontaminate: {location} does not exist; write it with `openllama eval texts "
                                "TASK... --out FILE`") from None
    except ValueError as error:
        raise BadInput(f"decontaminate: {location} is not JSON ({error})") from None
    if not isinstance(texts, dict) or not all(
            isinstance(items, list) and all(isinstance(t, str) for t in items) for items in texts.values()):
        raise BadInput(f"decontaminate: {location} must map each task name to a list of item texts")
    return texts


def normalized_words(text: str) -> list[str]:
    """Decontamination's words: NFC, case folded, runs of letters and digits (punctuation dropped)."""
    return _WORD.findall(unicodedata.normalize("NFC", text).casefold())


def word_ngram_hashes(words: list[str], lengths: Iterable[int]) -> np.ndarray:
    """Stable 64-bit hashes of every window of each length in `lengths` (a window hash includes its length)."""
    if not words:
        return np.zeros(0, dtype=np.uint64)
    points = np.fromiter((zlib.crc32(w.encode("utf-8", "surrogatepass")) for w in words), dtype=np.uint64,
                         count=len(words))
    return np.unique(np.concatenate([minhash.window_hashes(points, n) for n in lengths if n <= len(words)]
                                    or [np.zeros(0, dtype=np.uint64)]))


def contamination_index(items: dict[str, list[str]], ngram: int, min_words: int) -> dict[str, Any]:
    """The n-gram hashes of every item, with the task of each, and per task the items too short to check."""
    keys: dict[int, set[str]] = {}
    unchecked: dict[str, int] = {}
    lengths: set[int] = set()
    for task, texts in items.items():
        unchecked[task] = 0
        for text in texts:
            words = normalized_words(text)
            if len(words) < min_words:
                unchecked[task] += 1
                continue
            length = min(ngram, len(words))
            lengths.add(length)
            for key in word_ngram_hashes(words, [length]).tolist():
                keys.setdefault(key, set()).add(task)
    ordered = sorted(keys)
    return {"keys": np.array(ordered, dtype=np.uint64), "tasks": [sorted(keys[k]) for k in ordered],
            "lengths": sorted(lengths), "items": {t: len(v) for t, v in items.items()}, "unchecked": unchecked}


def contaminated_by(text: str, index: dict[str, Any]) -> list[str]:
    """The eval tasks sharing an n-gram with `text` (empty: clean)."""
    if not len(index["keys"]):
        return []
    found = np.intersect1d(word_ngram_hashes(normalized_words(text), index["lengths"]), index["keys"])
    if not len(found):
        return []
    positions = np.searchsorted(index["keys"], found)
    return sorted({task for p in positions.tolist() for task in index["tasks"][p]})
