"""Fault injection from outside a process, and the report `make faults` prints.

The fault tests (tests/faults/) start real commands in process groups of their own, wait for a moment
worth breaking (a unit ledger written, a checkpoint half-saved), and then break it: SIGKILL the group,
stop a server, fill the disk. Each test appends one JSON line to the file named by OPENLLAMA_FAULT_REPORT;
`python tests/harness.py FILE` renders those lines as a table, and with `--readme README.md` writes it into the
README's fault section (`make faults` does both). This is test code: nothing in the product injects faults;
the tests do it from outside, or through the training loop's hooks and monkeypatching.

Every row's time to recover has one definition: from the fault until the run is whole again, holding
everything it held when the fault hit and going on as if none had happened. Training: the resumed run
restores a checkpoint at or past the step reached at the fault, or logs such a step (`Watched.whole_again_at`).
A data command: its rerun (or Ray's retries) finished with the output of an uninterrupted run. Tracking: the run
finished with every step's metrics on the server. A fault that is only detected (a corrupted shard, a
diverging loss, bad input) has nothing to recover: `-`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from openllama.processes import stop_group

REPORT_ENV = "OPENLLAMA_FAULT_REPORT"
README_BEGIN, README_END = "<!-- fault table: make faults writes it -->", "<!-- end of fault table -->"
STEP_LINE = re.compile(r"\bstep (\d+)/(\d+) loss")
RESUME_LINE = re.compile(r"resuming from (\S+) \(step (\d+)\)")
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


class Watched:
    """A command started by `start` whose output lines are read as they come, each stamped with the time it
    arrived (time.time()): what a fault test observed during the fault, not what it inferred afterwards."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: str | Path | None = None):
        self.proc = start(command, env, cwd)
        self.lines: list[tuple[float, str, str]] = []  # (arrived, "out" | "err", line)
        self._lock = threading.Lock()
        self._readers = [threading.Thread(target=self._read, args=(stream, name), daemon=True)
                         for stream, name in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, name: str) -> None:
        for line in stream:
            with self._lock:
                self.lines.append((time.time(), name, line.rstrip("\n")))

    def wait(self, timeout: float) -> int:
        """The exit status once the command and its output have ended; kills the group on timeout."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            raise AssertionError(f"ran over {timeout}s:\n{self.text()[-4000:]}") from None
        for reader in self._readers:
            reader.join(timeout=30)
        return self.proc.returncode

    def snapshot(self, stream: str | None = None) -> list[tuple[float, str]]:
        with self._lock:
            return [(t, line) for t, name, line in self.lines if stream in (None, name)]

    def text(self, stream: str = "err") -> str:
        return "\n".join(line for _, line in self.snapshot(stream))

    def steps(self) -> list[tuple[float, int]]:
        """(arrived, step) of every `step N/M loss` line rank 0 logged."""
        return [(t, int(m[1])) for t, line in self.snapshot() if (m := STEP_LINE.search(line))]

    def reached(self, at: float) -> int:
        """The newest step logged by `at` (0: none)."""
        return max((step for t, step in self.steps() if t <= at), default=0)

    def resumes(self, after: float = 0.0) -> list[tuple[float, str, int]]:
        """(arrived, checkpoint, step) of each `resuming from CKPT (step N)` line after `after`."""
        return [(t, m[1], int(m[2])) for t, line in self.snapshot() if t > after and (m := RESUME_LINE.search(line))]

    def count(self, text: str, after: float = 0.0) -> int:
        return sum(text in line for t, line in self.snapshot() if t > after)

    def whole_again_at(self, fault_at: float, reached: int) -> float:
        """When the run resumed after `fault_at` was at or past the step `reached` (the module's time to
        recover): it restored a checkpoint of that step or later (a save at the fault), or else first logged
        such a step."""
        resumed = self.resumes(after=fault_at)
        assert resumed, f"no `resuming from` line after the fault:\n{self.text()[-3000:]}"
        if resumed[0][2] >= reached:
            return resumed[0][0]
        found = [t for t, step in self.steps() if t >= resumed[0][0] and step >= reached]
        assert found, f"the resumed run never logged step {reached}:\n{self.text()[-3000:]}"
        return found[0]


def units_done_before(stderr: str) -> tuple[int, int]:
    """(units, done before) from a tokenize run's `tokenize units: N units, K done before, M to run` line."""
    (units, done), = {(int(m[1]), int(m[2]))
                      for m in re.finditer(r"tokenize units: (\d+) units, (\d+) done before", stderr)}
    return units, done


def steps_lost(resumed: int, reached: int) -> str:
    """The data-lost cell of a training fault: nothing, and which steps were computed again."""
    if reached <= resumed:
        return "0 steps"
    again = f"step {reached}" if reached == resumed + 1 else f"steps {resumed + 1}-{reached}"
    return f"0 steps ({again} recomputed from the checkpoint)"


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


def readme_table(readme: str) -> str:
    """The fault table in the README's text, between its two markers."""
    begin, end = readme.find(README_BEGIN), readme.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"the README has no fault table between {README_BEGIN!r} and {README_END!r}")
    return readme[begin + len(README_BEGIN):end].strip("\n")


def with_table(readme: str, table: str) -> str:
    """The README's text with `table` between its two markers."""
    readme_table(readme)  # both markers present
    head, rest = readme.split(README_BEGIN, 1)
    return f"{head}{README_BEGIN}\n{table}\n{README_END}{rest.split(README_END, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/harness.py",
                                     description="Print the fault-injection report `make faults` collected.")
    parser.add_argument("report", help=f"JSON-lines file the fault tests wrote (env {REPORT_ENV})")
    parser.add_argument("--readme", type=Path, help="write the table into this README's fault section, and the "
                        "rows beside the table's source (docs/faults.jsonl) that tests/test_fault_report.py reads")
    parser.add_argument("--rows-to", type=Path, default=Path("docs/faults.jsonl"),
                        help="where --readme keeps the rows (default: %(default)s)")
    args = parser.parse_args(argv)
    if not Path(args.report).is_file():
        print(f"{args.report}: no fault report; run `make faults` (it sets {REPORT_ENV})", file=sys.stderr)
        return 2
    rows = read_rows(args.report)
    table = render(rows)
    print(table)
    failed = sum(row["outcome"] != "passed" for row in rows)
    print(f"\n{len(rows)} fault checks, {failed} not passed")
    if args.readme:
        args.readme.write_text(with_table(args.readme.read_text(), table))
        args.rows_to.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
        print(f"wrote the table into {args.readme} and its rows to {args.rows_to}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
