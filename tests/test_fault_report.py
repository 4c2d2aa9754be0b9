"""The fault table `make faults` prints cannot hide a fault test that failed or skipped."""

from __future__ import annotations

import json

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
