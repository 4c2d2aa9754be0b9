"""The published zero-shot results that OpenLLaMA compared itself with, kept as data with their source.

Two tables of the OpenLLaMA README (lm-evaluation-harness, zero-shot), one per release:

- `v1`: the "Evaluation" table of the final README, openlm-research/open_llama at commit
  6e7f73eab7e799e2464f38ed977e537bae02873e (2023-07-16). OpenLLaMA dropped CB and WSC from it (suspected
  contamination), so those rows have no published value there.
- `preview`: the table of the preview release (OpenLLaMA 7B after 400B tokens, 3B after 350B, beside GPT-J 6B
  and LLaMA 7B), the README at commit 5d64f5fa970415bbd0b777afccdaf167a37b5f0c (2023-05-16), unchanged until
  the 700B-token release replaced it. It has CB and WSC rows, and its Average row counts them.

Rows are keyed by the lm-eval 0.4 task and metric names our runs produce; the README's own label is kept
beside each key. The baselines' values are the same in both tables where both have a row.
"""

from __future__ import annotations

SOURCE = (
    "https://github.com/openlm-research/open_llama/blob/6e7f73eab7e799e2464f38ed977e537bae02873e/README.md"
    "#evaluation"
)
PREVIEW_SOURCE = (
    "https://github.com/openlm-research/open_llama/blob/5d64f5fa970415bbd0b777afccdaf167a37b5f0c/README.md"
    "#evaluation"
)

MODELS = (
    "GPT-J 6B", "LLaMA 7B", "LLaMA 13B", "OpenLLaMA 3Bv2", "OpenLLaMA 7Bv2",
    "OpenLLaMA 3B", "OpenLLaMA 7B", "OpenLLaMA 13B",
)

# The columns `openllama eval --compare` shows: the baselines and the v1 (RedPajama, 1T tokens) models we reproduce.
COMPARE_MODELS = ("GPT-J 6B", "LLaMA 7B", "OpenLLaMA 3B", "OpenLLaMA 7B", "OpenLLaMA 13B")

# (lm-eval task, metric) -> (README label, one value per model in MODELS order)
_TABLE: dict[tuple[str, str], tuple[str, tuple[float, ...]]] = {
    ("anli_r1", "acc"): ("anli_r1/acc", (0.32, 0.35, 0.35, 0.33, 0.34, 0.33, 0.33, 0.33)),
    ("anli_r2", "acc"): ("anli_r2/acc", (0.34, 0.34, 0.36, 0.36, 0.35, 0.32, 0.36, 0.33)),
    ("anli_r3", "acc"): ("anli_r3/acc", (0.35, 0.37, 0.39, 0.38, 0.39, 0.35, 0.38, 0.40)),
    ("arc_challenge", "acc"): ("arc_challenge/acc", (0.34, 0.39, 0.44, 0.34, 0.39, 0.34, 0.37, 0.41)),
    ("arc_challenge", "acc_norm"): ("arc_challenge/acc_norm", (0.37, 0.41, 0.44, 0.36, 0.41, 0.37, 0.38, 0.44)),
    ("arc_easy", "acc"): ("arc_easy/acc", (0.67, 0.68, 0.75, 0.68, 0.73, 0.69, 0.72, 0.75)),
    ("arc_easy", "acc_norm"): ("arc_easy/acc_norm", (0.62, 0.52, 0.59, 0.63, 0.70, 0.65, 0.68, 0.70)),
    ("boolq", "acc"): ("boolq/acc", (0.66, 0.75, 0.71, 0.66, 0.72, 0.68, 0.71, 0.75)),
    ("hellaswag", "acc"): ("hellaswag/acc", (0.50, 0.56, 0.59, 0.52, 0.56, 0.49, 0.53, 0.56)),
    ("hellaswag", "acc_norm"): ("hellaswag/acc_norm", (0.66, 0.73, 0.76, 0.70, 0.75, 0.67, 0.72, 0.76)),
    ("openbookqa", "acc"): ("openbookqa/acc", (0.29, 0.29, 0.31, 0.26, 0.30, 0.27, 0.30, 0.31)),
    ("openbookqa", "acc_norm"): ("openbookqa/acc_norm", (0.38, 0.41, 0.42, 0.38, 0.41, 0.40, 0.40, 0.43)),
    ("piqa", "acc"): ("piqa/acc", (0.75, 0.78, 0.79, 0.77, 0.79, 0.75, 0.76, 0.77)),
    ("piqa", "acc_norm"): ("piqa/acc_norm", (0.76, 0.78, 0.79, 0.78, 0.80, 0.76, 0.77, 0.79)),
    ("record", "em"): ("record/em", (0.88, 0.91, 0.92, 0.87, 0.89, 0.88, 0.89, 0.91)),
    ("record", "f1"): ("record/f1", (0.89, 0.91, 0.92, 0.88, 0.89, 0.89, 0.90, 0.91)),
    ("rte", "acc"): ("rte/acc", (0.54, 0.56, 0.69, 0.55, 0.57, 0.58, 0.60, 0.64)),
    ("truthfulqa_mc1", "acc"): ("truthfulqa_mc/mc1", (0.20, 0.21, 0.25, 0.22, 0.23, 0.22, 0.23, 0.25)),
    ("truthfulqa_mc2", "acc"): ("truthfulqa_mc/mc2", (0.36, 0.34, 0.40, 0.35, 0.35, 0.35, 0.35, 0.38)),
    ("wic", "acc"): ("wic/acc", (0.50, 0.50, 0.50, 0.50, 0.50, 0.48, 0.51, 0.47)),
    ("winogrande", "acc"): ("winogrande/acc", (0.64, 0.68, 0.70, 0.63, 0.66, 0.62, 0.67, 0.70)),
}

# The README's Average row, for checking that our averaging rule reproduces it.
PUBLISHED_AVERAGE = dict(zip(MODELS, (0.52, 0.55, 0.57, 0.53, 0.56, 0.53, 0.55, 0.57), strict=True))

PREVIEW_MODELS = ("GPT-J 6B", "LLaMA 7B", "OpenLLaMA 7B 400B Tokens", "OpenLLaMA 3B 350B Tokens")

# The preview README's table, (lm-eval task, metric) -> (README label, one value per model in PREVIEW_MODELS order)
_PREVIEW_TABLE: dict[tuple[str, str], tuple[str, tuple[float, ...]]] = {
    ("anli_r1", "acc"): ("anli_r1/acc", (0.32, 0.35, 0.33, 0.34)),
    ("anli_r2", "acc"): ("anli_r2/acc", (0.34, 0.34, 0.33, 0.34)),
    ("anli_r3", "acc"): ("anli_r3/acc", (0.35, 0.37, 0.34, 0.37)),
    ("arc_challenge", "acc"): ("arc_challenge/acc", (0.34, 0.39, 0.34, 0.31)),
    ("arc_challenge", "acc_norm"): ("arc_challenge/acc_norm", (0.37, 0.41, 0.34, 0.33)),
    ("arc_easy", "acc"): ("arc_easy/acc", (0.67, 0.68, 0.68, 0.65)),
    ("arc_easy", "acc_norm"): ("arc_easy/acc_norm", (0.62, 0.52, 0.64, 0.59)),
    ("boolq", "acc"): ("boolq/acc", (0.66, 0.75, 0.67, 0.60)),
    ("cb", "acc"): ("cb/acc", (0.36, 0.36, 0.43, 0.11)),
    ("cb", "f1"): ("cb/f1", (0.26, 0.24, 0.22, 0.10)),
    ("hellaswag", "acc"): ("hellaswag/acc", (0.50, 0.56, 0.49, 0.45)),
    ("hellaswag", "acc_norm"): ("hellaswag/acc_norm", (0.66, 0.73, 0.67, 0.61)),
    ("openbookqa", "acc"): ("openbookqa/acc", (0.29, 0.29, 0.28, 0.26)),
    ("openbookqa", "acc_norm"): ("openbookqa/acc_norm", (0.38, 0.41, 0.39, 0.37)),
    ("piqa", "acc"): ("piqa/acc", (0.75, 0.78, 0.74, 0.72)),
    ("piqa", "acc_norm"): ("piqa/acc_norm", (0.76, 0.78, 0.74, 0.73)),
    ("record", "em"): ("record/em", (0.88, 0.91, 0.88, 0.86)),
    ("record", "f1"): ("record/f1", (0.89, 0.91, 0.88, 0.87)),
    ("rte", "acc"): ("rte/acc", (0.54, 0.56, 0.61, 0.56)),
    ("truthfulqa_mc1", "acc"): ("truthfulqa_mc/mc1", (0.20, 0.21, 0.22, 0.23)),
    ("truthfulqa_mc2", "acc"): ("truthfulqa_mc/mc2", (0.36, 0.34, 0.36, 0.35)),
    ("wic", "acc"): ("wic/acc", (0.50, 0.50, 0.50, 0.50)),
    ("winogrande", "acc"): ("winogrande/acc", (0.64, 0.68, 0.66, 0.61)),
    ("wsc", "acc"): ("wsc/acc", (0.37, 0.35, 0.40, 0.39)),
}

# The preview README's Average row: the mean of all its rows, CB and WSC included (our Average leaves them out).
PREVIEW_AVERAGE = dict(zip(PREVIEW_MODELS, (0.50, 0.52, 0.51, 0.47), strict=True))

# `openllama eval --compare --compare-table NAME`: the columns each table shows beside ours.
COMPARE_TABLES = {"v1": COMPARE_MODELS, "preview": PREVIEW_MODELS}
_TABLES = {"v1": (MODELS, _TABLE), "preview": (PREVIEW_MODELS, _PREVIEW_TABLE)}

# Tasks OpenLLaMA left out of its table and average; we still report them, outside the Average.
EXCLUDED_FROM_AVERAGE = frozenset({"cb", "wsc"})


def published(model: str, table: str = "v1") -> dict[tuple[str, str], float]:
    """{(task, metric): value} of one published model column of `table` (v1 or preview)."""
    if table not in _TABLES:
        raise ValueError(f"no published table {table!r}; known: {sorted(_TABLES)}")
    models, rows = _TABLES[table]
    if model not in models:
        raise ValueError(f"no published results for {model!r} in table {table!r}; known: {list(models)}")
    column = models.index(model)
    return {key: values[column] for key, (_, values) in rows.items()}


def readme_label(task: str, metric: str) -> str:
    """The row label the OpenLLaMA README uses (`truthfulqa_mc/mc1`), else `task/metric`."""
    entry = _TABLE.get((task, metric)) or _PREVIEW_TABLE.get((task, metric))
    return entry[0] if entry else f"{task}/{metric}"
