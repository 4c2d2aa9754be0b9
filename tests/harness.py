"""Fault injection from outside a process, and the report `make faults` prints.

The fault tests (tests/faults/) start real commands in process groups of their own, wait for a moment
worth breaking (a unit ledger written, a checkpoint half-saved), and then break it: SIGKILL the group,
stop a server, fill the disk. Each test appends one JSON line to the file named by OPENLLAMA_FAULT_REPORT;
`python tests/harness.py FILE` renders those lines as the table in docs/reliability.md. This is test
code: nothing in the product injects faults; the tests do it from outside, or through the training loop's
hooks and monkeypatching.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from openllama.processes import stop_group

REPORT_ENV = "OPENLLAMA_FAULT_REPORT"
# Subprocesses of the fault tests: no hub downloads, no telemetry, unbuffered output.
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
             "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Ray/MLflow addresses (each test says where to go), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "MLFLOW_TRACKING_URI"}
    return {**env, **QUIET_ENV, **extra}


def start(command: list[str], env: dict[str, str], cwd: str | Path | None = None) -> subprocess.Popen:
    """Start `command` in a new session: it and everything it spawns form one process group we can kill."""
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def run(command: list[str], env: dict[str, str], timeout: float = 300,
        cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run `command` to the end in its own process group; on timeout the group is killed and this fails."""
    proc = start(command, env, cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(command[:4])} ran over {timeout}s:\n{out[-2000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGKILL a process started by `start` and every process it started, and wait until they are gone."""
    stop_group(proc.pid, grace_s=0, wait_s=timeout)
    proc.wait(timeout=timeout)


def wait_for(condition: Callable[[], object], timeout: float, what: str, proc: subprocess.Popen | None = None,
             poll: float = 0.02):
    """Poll `condition` until it returns something true, and return that; fails naming `what`, with the
    output of `proc` when it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}:\n{out[-2000:]}\n"
                                 f"{err[-4000:]}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def process_tree(pid: int) -> list[int]:
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return []


def listening_ips(pids: list[int]) -> set[str]:
    """The local IPs that processes `pids` accept TCP connections on."""
    ips: set[str] = set()
    for pid in pids:
        try:
            ips |= {c.laddr.ip for c in psutil.Process(pid).net_connections("inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    return ips


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def train_workers(ray_head) -> list[psutil.Process]:
    """Ray Train worker processes of the session's head (children of its raylet, in sessions of their own)."""
    head = set(ray_head.pids())
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if "RayTrainWorker" in " ".join(process.info["cmdline"] or []) and \
                    any(parent.pid in head for parent in process.parents()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def on_cluster(ray_head, *command: str, tracking_uri: str | None = None) -> None:
    """Run a command as a client of the session's Ray head (this process keeps its own Ray state)."""
    env = {**os.environ, **ray_head.env, "HF_HUB_OFFLINE": "1"}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=repo)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def short_run(dataset: Path, seq_len: int, steps: int, compilation_cache: Path) -> list[str]:
    """Overrides of the short tiny-cpu run the training tests compare: 8 sequences a step, a checkpoint and a
    held-out evaluation every 5 steps (no lm-eval tasks: tests/test_train_eval.py scores those), one JAX
    compilation cache for all of them."""
    return [
        f"data.path={dataset}", f"train.seq_len={seq_len}", f"train.steps={steps}", "train.global_batch_size=8",
        "train.log_every=1", "optimizer.warmup_steps=2", "checkpoint.every_steps=5", "eval.every_steps=5",
        "eval.batches=1", "eval.tasks=[]", "device.peak_flops=1e11",
        f"device.compilation_cache_dir={compilation_cache}",
    ]


# ---------------------------------------------------------------------------------------------- report


def record(path: str | Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def read_rows(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def render(rows: list[dict]) -> str:
    """One table line per fault; cases of one fault (parametrized tests) are merged and counted."""
    merged: dict[str, dict] = {}
    for row in rows:
        entry = merged.setdefault(row["fault"], {**row, "cases": 0, "passed": 0, "recovery": []})
        entry["cases"] += 1
        entry["passed"] += row["outcome"] == "passed"
        if row.get("recovery_s") is not None:
            entry["recovery"].append(row["recovery_s"])
    lines = ["| fault | what happened | data lost | time to recover | result |", "|---|---|---|---|---|"]
    for fault, entry in merged.items():
        happened = entry["happened"] if entry["cases"] == 1 else f"{entry['cases']} cases; e.g. {entry['happened']}"
        recovery = _seconds(max(entry["recovery"])) if entry["recovery"] else "-"
        outcomes = {row["outcome"] for row in rows if row["fault"] == fault}
        result = ("ok" if entry["passed"] == entry["cases"] else "SKIPPED" if outcomes == {"skipped"}
                  else f"FAILED ({entry['cases'] - entry['passed']})")
        cells = [fault, happened, entry["lost"], recovery, result]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/harness.py",
                                     description="Print the fault-injection report `make faults` collected.")
    parser.add_argument("report", help=f"JSON-lines file the fault tests wrote (env {REPORT_ENV})")
    args = parser.parse_args(argv)
    if not Path(args.report).is_file():
        print(f"{args.report}: no fault report; run `make faults` (it sets {REPORT_ENV})", file=sys.stderr)
        return 2
    rows = read_rows(args.report)
    print(render(rows))
    failed = sum(row["outcome"] != "passed" for row in rows)
    print(f"\n{len(rows)} fault checks, {failed} not passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
