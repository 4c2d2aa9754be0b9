"""The pretraining data mixture: LLaMA's sampling weights (Table 1 of the LLaMA paper) and epochs per subset.

Weights are sampling proportions of training tokens, not of the corpus, so a small high-quality subset is
seen several times while common_crawl is seen about once; `epochs` makes that visible before a run starts.
"""

from __future__ import annotations

from openllama.commands import BadInput

LLAMA_WEIGHTS: dict[str, float] = {
    "common_crawl": 0.67,
    "c4": 0.15,
    "github": 0.045,
    "wikipedia": 0.045,
    "book": 0.045,
    "arxiv": 0.025,
    "stackexchange": 0.02,
}

# RedPajama-1T tokens per subset (LLaMA tokenizer), from the RedPajama release notes
REDPAJAMA_TOKENS: dict[str, int] = {
    "common_crawl": 878_000_000_000,
    "c4": 175_000_000_000,
    "github": 59_000_000_000,
    "book": 26_000_000_000,
    "arxiv": 28_000_000_000,
    "wikipedia": 24_000_000_000,
    "stackexchange": 20_000_000_000,
}


def normalize(weights: dict[str, float], subsets: list[str] | None = None) -> dict[str, float]:
    """Weights restricted to `subsets` (all when None) and rescaled to sum to 1."""
    chosen = {s: float(w) for s, w in weights.items() if subsets is None or s in subsets}
    for subset, weight in chosen.items():
        if weight < 0:
            raise BadInput(f"mixture weight for {subset!r} is {weight}; weights must be >= 0")
    total = sum(chosen.values())
    if total <= 0:
        raise BadInput(f"mixture weights {chosen} sum to {total}; at least one present subset needs weight > 0")
    return {s: w / total for s, w in chosen.items()}


def parse_weights(text: str) -> dict[str, float]:
    """`common_crawl=0.67,c4=0.15` -> {"common_crawl": 0.67, "c4": 0.15}."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise BadInput(f"--weights item {item!r} is not SUBSET=NUMBER") from None
    return weights


def epochs(token_budget: int, subset_tokens: dict[str, int],
           weights: dict[str, float] = LLAMA_WEIGHTS) -> dict[str, float]:
    """How many times each subset is read when `token_budget` tokens are drawn with `weights`."""
    shares = normalize(weights, list(subset_tokens))
    missing = [s for s in shares if subset_tokens.get(s, 0) <= 0 and shares[s] > 0]
    if missing:
        raise BadInput(f"subsets {missing} have weight but no tokens; drop them from the weights")
    return {s: token_budget * shares[s] / subset_tokens[s] for s in shares}


def format_epochs(token_budget: int, subset_tokens: dict[str, int],
                  weights: dict[str, float] = LLAMA_WEIGHTS) -> str:
    """A table of weight, tokens and epochs per subset, for logs and the CLI."""
    shares = normalize(weights, list(subset_tokens))
    lines = [f"{'subset':<14} {'weight':>7} {'tokens':>16} {'epochs':>7}"]
    for subset, n in sorted(epochs(token_budget, subset_tokens, weights).items(), key=lambda kv: -shares[kv[0]]):
        lines.append(f"{subset:<14} {shares[subset]:>7.3f} {subset_tokens[subset]:>16,} {n:>7.2f}")
    return "\n".join(lines)
