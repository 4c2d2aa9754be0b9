"""Stage caching: a stage reruns exactly when its command, inputs or code changed, from clean outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from openllama import pipeline
from openllama.data.work import Ledger


def copy_stage(tmp_path: Path) -> pipeline.Stage:
    """A real one-line stage: copies its input into its output folder, noting each run in runs.txt."""
    source, target = tmp_path / "input.txt", tmp_path / "out" / "copy"
    if not source.exists():
        source.write_text("first")
    script = f"mkdir -p {target} && cp {source} {target}/copy.txt && echo run >> {tmp_path}/runs.txt"
    return pipeline.Stage("copy", ["bash", "-c", script], inputs=[source], outputs=[target])


@pytest.fixture
def runner(ray_head, tmp_path) -> pipeline.Runner:
    return pipeline.Runner(tmp_path / "out", ray_head.dashboard_url, {**os.environ, **ray_head.env}, {},
                           code="code-v1")


def runs(tmp_path: Path) -> int:
    return len((tmp_path / "runs.txt").read_text().splitlines())


def test_content_hash_depends_on_bytes_not_on_timestamps(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("same")
    before = pipeline.content_hash([tmp_path])
    os.utime(path, (1, 1))
    assert pipeline.content_hash([tmp_path]) == before
    path.write_text("other")
    assert pipeline.content_hash([tmp_path]) != before


def test_rerun_reason_names_what_changed(tmp_path):
    stage = copy_stage(tmp_path)
    ledger = pipeline.stage_identity(stage, "code-v1")
    assert pipeline.rerun_reason(ledger, pipeline.stage_identity(stage, "code-v2")) == "changed: code"
    (tmp_path / "input.txt").write_text("second")
    assert pipeline.rerun_reason(ledger, pipeline.stage_identity(stage, "code-v1")) == "changed: inputs_sha256"


def test_a_finished_stage_with_unchanged_inputs_is_reused_without_a_job(runner, tmp_path):
    first = runner.run(copy_stage(tmp_path))
    again = runner.run(copy_stage(tmp_path))
    assert runs(tmp_path) == 1
    assert again["submission_id"] == first["submission_id"]
    assert runner.reused == ["copy"]


def test_a_changed_input_reruns_the_stage_from_clean_outputs(runner, tmp_path):
    runner.run(copy_stage(tmp_path))
    stale = tmp_path / "out" / "copy" / "stale.txt"
    stale.write_text("left by the previous run")
    (tmp_path / "input.txt").write_text("second")
    runner.run(copy_stage(tmp_path))
    assert runs(tmp_path) == 2
    assert (tmp_path / "out" / "copy" / "copy.txt").read_text() == "second"
    assert not stale.exists()


def test_an_interrupted_stage_is_run_again_without_clearing_its_outputs(runner, tmp_path):
    """Same key but status `running` (the last attempt crashed): the stage's own command resumes."""
    stage = copy_stage(tmp_path)
    partial = tmp_path / "out" / "copy" / "partial.txt"
    partial.parent.mkdir(parents=True)
    partial.write_text("work done before the crash")
    identity = pipeline.stage_identity(stage, "code-v1")
    Ledger(str(tmp_path / "out" / "ledger"), identity["key"]).record("copy", {**identity, "status": "running"})
    entry = runner.run(stage)
    assert entry["status"] == "done" and runs(tmp_path) == 1
    assert partial.exists()
    assert json.loads((tmp_path / "out" / "ledger" / "copy.json").read_text())["status"] == "done"
