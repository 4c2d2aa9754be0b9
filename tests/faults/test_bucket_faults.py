"""A tokenize run from s3:// to s3:// SIGKILLed mid-run and rerun, against a real S3 server on 127.0.0.1.

An object store has no rename: a shard appears whole when its upload completes, and a unit counts as done
only once its ledger entry exists. So a kill at any moment leaves nothing a rerun could take for finished
work, and the rerun must give the bytes of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import signal
import time
from pathlib import Path

import pytest

import harness as faults
from openllama import files

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample" / "redpajama"
SPAN_BYTES = "150000"  # the sample's files cut into ~30 units, so that a kill finds most of them undone


def units_done(dataset: str) -> list[str]:
    return [u for u in files.files_under(f"{dataset}/units") if u.endswith(".json")]


def object_digests(dataset: str) -> dict[str, str]:
    """sha256 of the bytes of every object under the dataset, listed from the bucket (not from the manifest),
    but the ledger and the JSON reports, which record timings."""
    digests = {}
    for path in files.files_under(dataset):
        name = path[len(dataset) + 1:]
        if not name.startswith("units/") and not name.endswith(".json"):
            digests[name] = hashlib.sha256(files.read_bytes(path)).hexdigest()
    return digests


def shard_entries(dataset: str) -> list[tuple]:
    manifest = files.read_json(f"{dataset}/manifest.json")
    return sorted((s["path"], s["sha256"], s["rows"], s["documents"]) for s in manifest["shards"])


@pytest.fixture(scope="module")
def runs(s3_server, sp_model, tokenize) -> dict:
    """One uninterrupted run and one SIGKILLed-then-rerun run of the same bucket inputs, into two prefixes."""
    root = f"s3://{s3_server.new_bucket()}"
    env = faults.clean_env(**s3_server.env)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3_server.env.items():
            patch.setenv(key, value)
        for path in sorted(SAMPLE.glob("*.jsonl")):
            files.copy_file(path, f"{root}/redpajama/{path.name}")
        files.copy_file(sp_model, f"{root}/tokenizer.model")
        command = {name: tokenize([f"{root}/redpajama"], f"{root}/tokenizer.model", f"{root}/{name}",
                                  "--span-bytes", SPAN_BYTES) for name in ("uninterrupted", "killed")}
        baseline = faults.run(command["uninterrupted"], env, timeout=300, cwd=REPO)
        assert baseline.returncode == 0, baseline.stderr[-3000:]
        proc = faults.start(command["killed"], env, cwd=REPO)
        try:
            faults.wait_for(lambda: units_done(f"{root}/killed"), 240, "the first finished unit", proc, poll=0.01)
        finally:
            faults.kill_group(proc)
        killed_at = time.perf_counter()
        state = {"signal": -proc.returncode, "units_done": len(units_done(f"{root}/killed")),
                 "finished": files.read_json(f"{root}/killed/manifest.json")["finished"]}
        rerun = faults.run(command["killed"], env, timeout=300, cwd=REPO)
        state["skipped"] = faults.units_done_before(rerun.stderr)[1] if rerun.returncode == 0 else None
        state.update(rerun=rerun, recovery_s=time.perf_counter() - killed_at, root=root,
                     units=len(units_done(f"{root}/uninterrupted")),
                     killed=shard_entries(f"{root}/killed"), uninterrupted=shard_entries(f"{root}/uninterrupted"),
                     killed_bytes=object_digests(f"{root}/killed"),
                     uninterrupted_bytes=object_digests(f"{root}/uninterrupted"),
                     total=files.read_json(f"{root}/uninterrupted/manifest.json")["stats"]["total"],
                     leftovers=[p for p in files.files_under(f"{root}/killed") if ".tmp-" in p])
    return state


def test_a_bucket_to_bucket_run_killed_mid_way_and_rerun_equals_an_uninterrupted_run(runs, fault_report):
    assert runs["signal"] == signal.SIGKILL
    assert runs["finished"] is False and 1 <= runs["units_done"] < runs["units"]
    # what the rerun found done (its log line): at least what was listed at the kill (a worker, outside the
    # CLI's process group, may finish the unit it was uploading), never all
    assert runs["skipped"] is not None and runs["units_done"] <= runs["skipped"] < runs["units"], runs["rerun"].stderr
    assert runs["rerun"].returncode == 0, runs["rerun"].stderr[-3000:]
    assert runs["killed"] == runs["uninterrupted"]  # the manifests list the same shards
    assert runs["killed_bytes"] == runs["uninterrupted_bytes"]  # and the objects hold the same bytes
    assert {path for path, *_ in runs["killed"]} <= set(runs["killed_bytes"])
    for path, sha256, *_ in runs["killed"]:
        assert runs["killed_bytes"][path] == sha256, path
    assert runs["leftovers"] == []
    fault_report.fault = "tokenize s3:// -> s3:// SIGKILLed mid-run"
    fault_report.happened = (f"killed unfinished with {runs['units_done']} of {runs['units']} byte-range units done; "
                             f"the rerun skipped the {runs['skipped']} it found done (its log) and wrote the objects "
                             f"of an uninterrupted run: {len(runs['killed_bytes'])} objects, byte for byte")
    total = runs["total"]
    fault_report.lost = f"0 of {total['documents']:,} documents, 0 of {total['tokens']:,} tokens, none twice"
    fault_report.recovery_s = runs["recovery_s"]
