"""Process groups: how the project stops exactly the processes it started, and nothing else.

Everything we start that spawns children (a Ray head, an MLflow server, a CLI run under test) gets a
session of its own, so its process group id names it and all it spawned. Stopping by group never
touches other users' processes, which `ray stop` or killing by name would.
"""

from __future__ import annotations

import os
import signal
import time

import psutil


def group_pids(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`."""
    pids = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return pids


def group_commands(pgid: int) -> list[str]:
    """The command lines of the live processes of group `pgid`."""
    lines = []
    for pid in group_pids(pgid):
        try:
            lines.append(" ".join(psutil.Process(pid).cmdline()))
        except psutil.Error:
            continue
    return lines


def stop_group(pgid: int, grace_s: float = 3.0, marker: str | None = None, wait_s: float = 30.0) -> bool:
    """SIGTERM process group `pgid`, SIGKILL what is left after `grace_s` (at once when 0), wait until gone.

    With `marker`, only a group one of whose commands mentions it is stopped: a record of a group we
    started may be stale, its id reused by someone else's processes. Returns whether anything was stopped.
    """
    if marker is not None and not any(marker in line for line in group_commands(pgid)):
        return False
    if not group_pids(pgid):
        return False
    first = signal.SIGTERM if grace_s > 0 else signal.SIGKILL
    try:
        os.killpg(pgid, first)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and group_pids(pgid):
        time.sleep(0.1)
    if first != signal.SIGKILL and group_pids(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and group_pids(pgid):
        time.sleep(0.1)
    return True
