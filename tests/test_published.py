"""The published columns: OpenLLaMA's preview-release table beside the final one, and `eval --compare` showing it."""

from __future__ import annotations

import pytest

from openllama.cli import parse_config
from openllama.config import ConfigError
from openllama.eval import published
from openllama.eval.run import EvalConfig, Row, render_table

PREVIEW_COLUMNS = ("GPT-J 6B", "LLaMA 7B", "OpenLLaMA 7B 400B Tokens", "OpenLLaMA 3B 350B Tokens")


def test_the_preview_table_has_the_seeds_four_columns_and_its_source():
    assert published.COMPARE_TABLES["preview"] == PREVIEW_COLUMNS
    assert "5d64f5fa970415bbd0b777afccdaf167a37b5f0c" in published.PREVIEW_SOURCE
    assert published.published("OpenLLaMA 7B 400B Tokens", "preview")[("hellaswag", "acc_norm")] == 0.67
    assert published.published("OpenLLaMA 3B 350B Tokens", "preview")[("cb", "acc")] == 0.11


def test_the_preview_average_row_is_the_mean_of_all_its_rows_cb_and_wsc_included():
    for model in PREVIEW_COLUMNS:
        column = published.published(model, "preview")
        assert sum(column.values()) / len(column) == pytest.approx(published.PREVIEW_AVERAGE[model], abs=0.005)


def test_the_baselines_are_the_same_in_both_tables():
    for model in ("GPT-J 6B", "LLaMA 7B"):
        final, preview = published.published(model), published.published(model, "preview")
        assert {key: preview[key] for key in final} == final


def test_an_unknown_table_or_column_is_named():
    with pytest.raises(ValueError, match="no published table 'v0'"):
        published.published("GPT-J 6B", "v0")
    with pytest.raises(ValueError, match="'OpenLLaMA 7B' in table 'preview'"):
        published.published("OpenLLaMA 7B", "preview")


def test_compare_shows_the_preview_columns_beside_ours():
    rows = [Row("hellaswag", "acc_norm", 0.7, True), Row("cb", "acc", 0.5, False)]
    lines = render_table(rows, "ours", compare=True, table="preview").splitlines()
    assert lines[0] == "| Task/Metric | ours | " + " | ".join(PREVIEW_COLUMNS) + " |"
    assert lines[2] == "| hellaswag/acc_norm | 0.7000 | 0.6600 | 0.7300 | 0.6700 | 0.6100 |"
    assert lines[3] == "| cb/acc | 0.5000 | 0.3600 | 0.3600 | 0.4300 | 0.1100 |"


def test_the_compare_table_flag_picks_the_table_and_implies_compare():
    settings = parse_config("eval", ["ckpt", "--tasks", "x", "--compare-table", "preview"])
    assert (settings.compare, settings.compare_table) == (True, "preview")
    assert parse_config("eval", ["ckpt", "--compare"]).compare_table is None
    with pytest.raises(ConfigError, match=r"--compare-table='v0'; allowed: \['preview', 'v1'\]"):
        EvalConfig(checkpoint="ckpt", compare_table="v0")
