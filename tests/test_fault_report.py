"""The fault table `make faults` prints cannot hide a fault test that failed or skipped, and the README's copy is
that table as the last run wrote it, with a row for every fault test."""

from __future__ import annotations

import json
import re
from pathlib import Path

import harness


def rows() -> list[dict]:
    return [
        {"fault": "disk full", "outcome": "passed", "happened": "ENOSPC", "lost": "0", "recovery_s": 1.5},
        {"fault": "host lost", "outcome": "failed", "happened": "the test failed before it said what happened",
         "lost": "", "recovery_s": None},
        {"fault": "head lost", "outcome": "skipped", "happened": "no netns", "lost": "", "recovery_s": None},
    ]


def test_a_failed_or_skipped_fault_test_shows_in_the_table():
    table = harness.render(rows())
    assert "| disk full | ENOSPC | 0 | 1.5 s | ok |" in table
    assert "| host lost |" in table and "FAILED (1) |" in table
    assert "| head lost | no netns |  | - | SKIPPED |" in table


def test_the_report_exits_non_zero_unless_every_row_passed(tmp_path, capsys):
    report = tmp_path / "faults.jsonl"
    report.write_text("\n".join(json.dumps(row) for row in rows()[:1]) + "\n")
    assert harness.main([str(report)]) == 0
    report.write_text("\n".join(json.dumps(row) for row in rows()) + "\n")
    assert harness.main([str(report)]) == 1
    assert "3 fault checks, 2 not passed" in capsys.readouterr().out


# --- the README's fault table is `make faults`'s output ------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
ROWS = REPO / "docs" / "faults.jsonl"  # what the last `make faults` collected (tests/harness.py --readme)
SUITE = [REPO / "tests" / "test_multihost.py", *sorted((REPO / "tests" / "faults").glob("test_*.py"))]


def test_the_readmes_fault_table_is_the_last_make_faults_run_rendered():
    assert harness.readme_table((REPO / "README.md").read_text()) == harness.render(harness.read_rows(ROWS))


def test_the_last_make_faults_run_passed_every_check():
    rows = harness.read_rows(ROWS)
    assert rows and [row["test"] for row in rows if row["outcome"] != "passed"] == []


def test_every_fault_test_has_its_row_and_every_row_its_test():
    """A test that fills a row (takes `fault_report`) and has none in the table, or a row whose test is gone,
    means the table was not made by running the suite as it is."""
    filling = set()
    for path in SUITE:
        source = path.read_text()
        for name, params in re.findall(r"^def (test_\w+)\(([^)]*)\)", source, flags=re.M | re.S):
            if "fault_report" in params:
                filling.add(f"{path.relative_to(REPO).as_posix()}::{name}")
    recorded = {row["test"].split("[", 1)[0] for row in harness.read_rows(ROWS)}
    assert filling == recorded


def test_the_readme_table_is_written_between_its_markers(tmp_path):
    readme = f"intro\n{harness.README_BEGIN}\nold table\n{harness.README_END}\nafter\n"
    table = harness.render(rows())
    written = harness.with_table(readme, table)
    assert harness.readme_table(written) == table
    assert written.startswith("intro\n") and written.endswith("\nafter\n") and "old table" not in written
    report = tmp_path / "faults.jsonl"
    report.write_text("".join(json.dumps(row) + "\n" for row in rows()[:1]))
    (tmp_path / "README.md").write_text(readme)
    harness.main([str(report), "--readme", str(tmp_path / "README.md"), "--rows-to", str(tmp_path / "rows.jsonl")])
    assert "| disk full | ENOSPC | 0 | 1.5 s | ok |" in (tmp_path / "README.md").read_text()
    assert harness.read_rows(tmp_path / "rows.jsonl")[0]["fault"] == "disk full"
