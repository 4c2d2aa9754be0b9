"""Quality rules for documents (Gopher's and C4's heuristics, and a minimum length): which one rejects a text.

`data dedup` applies the rules it is given to every valid document before hashing it; the first rule that
fails is the reason recorded in `rejected/`. Thresholds, papers and what each rule removes on the shipped
sample: docs/dedup.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

GOPHER_RULES = (
    "gopher_word_count", "gopher_mean_word_length", "gopher_symbol_ratio", "gopher_bullet_lines",
    "gopher_ellipsis_lines", "gopher_alpha_words", "gopher_stop_words", "gopher_duplicate_lines",
    "gopher_duplicate_line_chars", "gopher_top_ngram",
)
C4_RULES = ("c4_lorem_ipsum", "c4_curly_brace")
FILTERS = ("short", *GOPHER_RULES, *C4_RULES)
FILTER_GROUPS = {"gopher": GOPHER_RULES, "c4": C4_RULES}
STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
BULLETS = ("•", "‣", "◦", "⁃", "-", "*", "–", "—")
TOP_NGRAM_LIMITS = {2: 0.20, 3: 0.18, 4: 0.16}


def unknown_filter(names: list[str]) -> str | None:
    """The first of `names` that is neither a rule nor a group of rules, or None."""
    return next((name for name in names if name not in FILTERS and name not in FILTER_GROUPS), None)


def expand(names: list[str]) -> list[str]:
    """The rules `names` stand for, groups expanded, in FILTERS order (the first that fails is the reason)."""
    chosen = {rule for name in names for rule in FILTER_GROUPS.get(name, (name,))}
    return [rule for rule in FILTERS if rule in chosen]


def _top_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    counts = Counter(zip(*(words[i:] for i in range(n)), strict=False))
    if not counts:
        return 0.0
    gram, count = counts.most_common(1)[0]
    return 0.0 if count < 2 else count * sum(map(len, gram)) / total_chars


def quality_reason(text: str, filters: list[str], min_chars: int = 200) -> str | None:
    """The first of `filters` that rejects `text`, or None: thresholds and papers are in docs/dedup.md."""
    if "short" in filters and len(text) < min_chars:
        return "short"
    words = text.split()
    lines = [line for line in text.splitlines() if line.strip()]
    n_words, n_lines = len(words), max(1, len(lines))
    word_chars = sum(map(len, words))
    checks: dict[str, Callable[[], bool]] = {
        "gopher_word_count": lambda: not 50 <= n_words <= 100_000,
        "gopher_mean_word_length": lambda: not 3 <= word_chars / max(1, n_words) <= 10,
        "gopher_symbol_ratio": lambda: (text.count("#") + text.count("...") + text.count("…")) > 0.1 * n_words,
        "gopher_bullet_lines": lambda: sum(ln.lstrip().startswith(BULLETS) for ln in lines) > 0.9 * n_lines,
        "gopher_ellipsis_lines": lambda: sum(ln.rstrip().endswith(("...", "…")) for ln in lines) > 0.3 * n_lines,
        "gopher_alpha_words": lambda: sum(any(c.isalpha() for c in w) for w in words) < 0.8 * n_words,
        "gopher_stop_words": lambda: len(STOP_WORDS.intersection(w.lower() for w in words)) < 2,
        "gopher_duplicate_lines": lambda: len(lines) - len(set(lines)) > 0.3 * n_lines,
        "gopher_duplicate_line_chars": lambda: _duplicate_line_chars(lines) > 0.2 * max(1, sum(map(len, lines))),
        "gopher_top_ngram": lambda: any(_top_ngram_fraction(words, n, max(1, word_chars)) > limit
                                        for n, limit in TOP_NGRAM_LIMITS.items()),
        "c4_lorem_ipsum": lambda: "lorem ipsum" in text.lower(),
        "c4_curly_brace": lambda: "{" in text,
    }
    return next((name for name in filters if name != "short" and checks[name]()), None)


def _duplicate_line_chars(lines: list[str]) -> int:
    """Characters in lines that repeat an earlier line (Gopher counts each repeat, not the first copy)."""
    seen: set[str] = set()
    repeated = 0
    for line in lines:
        if line in seen:
            repeated += len(line)
        seen.add(line)
    return repeated
