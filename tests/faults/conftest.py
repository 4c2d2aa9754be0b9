"""Fault-injection suite (`make faults`): a packed dataset built once (the report row fixture, `fault_report`,
is in tests/conftest.py: the many-hosts faults of tests/test_multihost.py fill rows too).

Every test here injects a fault from outside (SIGKILL, a stopped server, flipped bytes, a full disk, bad
input) and fills one row of the report: fault, what happened, data lost, time to recover. Rows go to the
JSON-lines file named by OPENLLAMA_FAULT_REPORT when it is set (see tests/harness.py).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import harness as faults

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample" / "redpajama"
OPENLLAMA = str(Path(sys.executable).parent / "openllama")
SEQ_LEN = 32
def tokenize_command(inputs: list[str], tokenizer: Path, out: Path, *extra: str) -> list[str]:
    return [OPENLLAMA, "data", "tokenize", *inputs, "--tokenizer", str(tokenizer), "--out", str(out),
            "--seq-len", str(SEQ_LEN), "--val-fraction", "0.2", "--no-track", *extra]


@dataclass
class Packed:
    """The shipped sample corpus tokenized once, uninterrupted, by the CLI with its in-process Ray."""

    path: Path
    command: list[str]
    seconds: float
    listening: set[str]  # IPs the CLI's process tree (its in-process Ray) listened on, sampled mid-run


@pytest.fixture(scope="session")
def packed(sp_model, tmp_path_factory) -> Packed:
    out = tmp_path_factory.mktemp("faults_packed") / "dataset"
    command = tokenize_command([str(SAMPLE)], sp_model, out)
    started = time.perf_counter()
    proc = faults.start(command, faults.clean_env(), cwd=REPO)
    try:
        # sample the sockets while Ray works: a finished unit proves its workers are up
        faults.wait_for(lambda: list((out / "units").glob("*.json")), 240, "the first finished unit", proc)
        listening = faults.listening_ips(faults.process_tree(proc.pid))
        _, err = proc.communicate(timeout=300)
    except BaseException:
        faults.kill_group(proc)
        raise
    assert proc.returncode == 0, err[-4000:]
    return Packed(out, command, time.perf_counter() - started, listening)


@pytest.fixture(scope="session")
def tokenize():
    """`tokenize(inputs, tokenizer, out, *extra)`: the data CLI command line the fault tests use."""
    return tokenize_command
