"""Faults in `openllama data tokenize`: a SIGKILLed run, a full disk, an unwritable output folder, a
corrupted shard. Each is injected from outside the pipeline; each ends with nothing lost or a clear error."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import harness as faults
from openllama.data.shards import PackedDataset, ShardCorrupted

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample" / "redpajama"
UNITS = len(list(SAMPLE.glob("*.jsonl")))


def manifest(dataset: Path) -> dict:
    return json.loads((dataset / "manifest.json").read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_entries(dataset: Path) -> list[tuple]:
    return sorted((s["path"], s["sha256"], s["rows"], s["documents"]) for s in manifest(dataset)["shards"])


def assert_ledger_consistent(dataset: Path) -> None:
    """Every unit the ledger calls done has all its shards on disk with the recorded checksum."""
    for entry in (dataset / "units").glob("*.json"):
        unit = json.loads(entry.read_text())
        assert (dataset / "units" / f"{unit['unit']}.tails.npz").is_file(), entry
        for shard in unit["shards"]:
            assert sha256(dataset / shard["path"]) == shard["sha256"], (entry, shard["path"])


def leftover_temporaries(dataset: Path) -> list[Path]:
    return [p for p in dataset.rglob("*") if ".tmp-" in p.name]


def same_as_uninterrupted(dataset: Path, baseline: Path) -> None:
    ours, theirs = manifest(dataset), manifest(baseline)
    assert ours["finished"] is True
    assert ours["stats"]["total"]["documents"] == theirs["stats"]["total"]["documents"]
    assert ours["stats"]["total"]["tokens"] == theirs["stats"]["total"]["tokens"]
    assert shard_entries(dataset) == shard_entries(baseline)  # same bytes: no document twice, none lost
    for shard in ours["shards"]:
        assert sha256(dataset / shard["path"]) == shard["sha256"], shard["path"]


def ledger_entries(dataset: Path) -> dict[str, tuple[int, bytes]]:
    """Each done unit's ledger entry: its modification time and bytes (a unit run again rewrites it)."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (dataset / "units").glob("*.json")}


# --- a SIGKILLed tokenize run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def killed_and_rerun(packed, sp_model, tokenize, tmp_path_factory) -> dict:
    """`openllama data tokenize` SIGKILLed (with its in-process Ray) once the first unit finished, then rerun."""
    out = tmp_path_factory.mktemp("tokenize_killed") / "dataset"
    command = tokenize([str(SAMPLE)], sp_model, out)
    proc = faults.start(command, faults.clean_env(), cwd=REPO)
    try:
        faults.wait_for(lambda: list((out / "units").glob("*.json")), 240, "the first finished unit", proc, poll=0.005)
    finally:
        faults.kill_group(proc)  # SIGKILL: the CLI, its Ray and every worker, mid-way
    killed_at = time.perf_counter()
    state = {"signal": -proc.returncode, "units_done": len(list((out / "units").glob("*.json"))),
             "finished": manifest(out)["finished"], "temporaries": len(leftover_temporaries(out)),
             "entries_at_kill": ledger_entries(out)}
    rerun = faults.run(command, faults.clean_env(), timeout=300, cwd=REPO)
    state.update(rerun=rerun, recovery_s=time.perf_counter() - killed_at, out=out)
    return state


def test_tokenize_run_was_killed_before_it_finished(killed_and_rerun, packed):
    assert killed_and_rerun["signal"] == signal.SIGKILL
    assert killed_and_rerun["finished"] is False
    assert 1 <= killed_and_rerun["units_done"] < len(list((packed.path / "units").glob("*.json")))


def test_rerun_after_sigkill_equals_an_uninterrupted_run(killed_and_rerun, packed, fault_report):
    """The kill landed mid-run, the rerun skipped the units done before it (its log line; their ledger entries
    untouched) and wrote the bytes of an uninterrupted run."""
    test_tokenize_run_was_killed_before_it_finished(killed_and_rerun, packed)
    rerun = killed_and_rerun["rerun"]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    units, done = faults.units_done_before(rerun.stderr)
    # a worker can finish the unit it was writing after the CLI's group is gone (Ray's workers are not in it)
    assert units == UNITS and killed_and_rerun["units_done"] <= done < UNITS, rerun.stderr[-3000:]
    after = ledger_entries(killed_and_rerun["out"])
    assert {name: after[name] for name in killed_and_rerun["entries_at_kill"]} == killed_and_rerun["entries_at_kill"]
    same_as_uninterrupted(killed_and_rerun["out"], packed.path)
    assert_ledger_consistent(killed_and_rerun["out"])
    test_rerun_leaves_no_temporary_files_of_the_killed_run(killed_and_rerun)
    total = manifest(packed.path)["stats"]["total"]
    fault_report.fault = "tokenize job SIGKILLed mid-run"
    fault_report.happened = (f"killed unfinished with {killed_and_rerun['units_done']} of {UNITS} units done; the "
                             f"rerun found {done} done and skipped them (its log; their ledger entries untouched), "
                             f"ran {UNITS - done} and wrote byte-identical shards, no temporary file left")
    fault_report.lost = f"0 of {total['documents']:,} documents, 0 of {total['tokens']:,} tokens, none twice"
    fault_report.recovery_s = killed_and_rerun["recovery_s"]


def test_rerun_leaves_no_temporary_files_of_the_killed_run(killed_and_rerun):
    assert leftover_temporaries(killed_and_rerun["out"]) == []


def test_the_cli_in_process_ray_listens_on_loopback_only(packed, fault_report):
    assert packed.listening, "no listening sockets found in the CLI's process tree"
    assert all(faults.is_loopback(ip) for ip in packed.listening), packed.listening
    fault_report.fault = "safe default: in-process Ray of a CLI verb"
    fault_report.happened = f"listening only on {sorted(packed.listening)}"
    fault_report.lost = "n/a"


# --- output that cannot be written ------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["under_a_file", "read_only_filesystem"])
def test_unwritable_output_is_a_clear_error_before_work_starts(where, sp_model, tokenize, tmp_path, fault_report):
    if where == "under_a_file":
        (tmp_path / "notes.txt").write_text("not a folder")
        out = tmp_path / "notes.txt" / "dataset"
    else:
        out = Path("/sys/openllama-faults/dataset")  # sysfs refuses new folders, to root as well
    done = faults.run(tokenize([str(SAMPLE)], sp_model, out), faults.clean_env(), timeout=120, cwd=REPO)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert str(out.parent) in done.stderr.strip().splitlines()[-1]
    assert "ray" not in done.stderr.lower()  # refused before any work (Ray never started)
    fault_report.fault = "output folder cannot be written"
    reason = done.stderr.strip().splitlines()[-1].rsplit("cannot be written: ", 1)[-1]
    fault_report.happened = f"exit 2 before Ray starts, one line naming the folder ({reason})"
    fault_report.lost = "0 (nothing written)"
    fault_report.details = {"case": where}


# --- a full disk --------------------------------------------------------------------------------------------

FULL_DISK_SCRIPT = r"""
set -u
mount -t tmpfs -o size="$SMALL" tmpfs "$MNT" || exit 90
"$@" --out "$MNT/dataset" >"$LOGS/full.out" 2>"$LOGS/full.err"; echo $? >"$LOGS/full.rc"
date +%s.%N >"$LOGS/failed"
cp -a "$MNT/dataset" "$LOGS/after_full"
mount -o remount,size=256m "$MNT" || exit 91
"$@" --out "$MNT/dataset" >"$LOGS/rerun.out" 2>"$LOGS/rerun.err"; echo $? >"$LOGS/rerun.rc"
date +%s.%N >"$LOGS/whole"
cp -a "$MNT/dataset" "$LOGS/after_rerun"
"""


def can_mount_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(shutil.which("unshare") is None or not can_mount_tmpfs(),
                    reason="needs `unshare --user --mount` to give the run a small tmpfs of its own")
def test_a_full_disk_marks_no_unit_done_and_a_rerun_with_space_finishes(packed, sp_model, tokenize, tmp_path,
                                                                        fault_report):
    """The output lives on a tmpfs of ~40% of the dataset's size (mounted in a private user+mount namespace)."""
    size = sum(p.stat().st_size for p in packed.path.rglob("*") if p.is_file())
    logs, mnt = tmp_path / "logs", tmp_path / "mnt"
    logs.mkdir()
    mnt.mkdir()
    command = tokenize([str(SAMPLE)], sp_model, Path("unused"))
    command = command[: command.index("--out")] + command[command.index("--out") + 2:]
    env = faults.clean_env(SMALL=str(int(size * 0.4)), MNT=str(mnt), LOGS=str(logs))
    done = faults.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", FULL_DISK_SCRIPT, "full-disk",
                *command], env, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    full_err = (logs / "full.err").read_text()
    assert (logs / "full.rc").read_text().strip() != "0", "the run did not notice the full disk"
    assert "No space left on device" in full_err, full_err[-3000:]
    assert manifest(logs / "after_full")["finished"] is False
    assert_ledger_consistent(logs / "after_full")
    assert (logs / "rerun.rc").read_text().strip() == "0", (logs / "rerun.err").read_text()[-3000:]
    same_as_uninterrupted(logs / "after_rerun", packed.path)
    units = len(list((logs / "after_full" / "units").glob("*.json")))
    fault_report.fault = "disk full while writing shards"
    fault_report.happened = (f"run failed with ENOSPC, {units} of {UNITS} units marked done (all complete), "
                             "manifest unfinished; the rerun after freeing space equals an uninterrupted run")
    fault_report.lost = "0 documents"
    fault_report.recovery_s = float((logs / "whole").read_text()) - float((logs / "failed").read_text())


# --- a corrupted shard ----------------------------------------------------------------------------------------


def test_a_shard_with_flipped_bytes_is_detected_by_checksum_and_named(packed, tmp_path, fault_report):
    dataset = tmp_path / "dataset"
    shutil.copytree(packed.path, dataset)
    victim = next(s for s in manifest(dataset)["shards"] if s["split"] == "train")
    path = dataset / victim["path"]
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    path.write_bytes(bytes(data))
    with pytest.raises(ShardCorrupted, match=victim["path"]) as error:
        PackedDataset.open(str(dataset), "train").verify()
    fault_report.fault = "corrupted shard (4 bytes flipped)"
    assert "sha256" in str(error.value)
    name = victim["path"].rsplit("/", 1)[-1]
    fault_report.happened = f"verify() raised ShardCorrupted naming {name} (sha256 mismatch)"
    fault_report.lost = "0 (detected before use)"


def test_a_shard_with_flipped_bytes_fails_the_read_of_that_row_only(packed, tmp_path, fault_report):
    dataset = tmp_path / "dataset"
    shutil.copytree(packed.path, dataset)
    layout = manifest(dataset)
    victim = next(s for s in layout["shards"] if s["split"] == "train" and s["rows"] >= 3)
    path = dataset / victim["path"]
    data = bytearray(path.read_bytes())
    row = victim["rows"] // 2
    data[row * layout["row_bytes"] + 3] ^= 0xFF
    path.write_bytes(bytes(data))
    reader = PackedDataset.open(str(dataset), "train")
    first = sum(s["rows"] for s in layout["shards"][: layout["shards"].index(victim)]
                if s["split"] == "train" and s["subset"] == victim["subset"])
    assert reader.read(victim["subset"], np.array([first + row - 1, first + row + 1])).shape[0] == 2
    with pytest.raises(ShardCorrupted, match=f"{victim['path']}: row {row} .*crc32"):
        reader.read(victim["subset"], np.array([first + row]))
    fault_report.fault = "corrupted shard (1 byte flipped), read by the trainer's reader"
    fault_report.happened = (f"reading row {row} raised ShardCorrupted naming the file and row (crc32); "
                             "its neighbours still read")
    fault_report.lost = "0 (detected before use)"
