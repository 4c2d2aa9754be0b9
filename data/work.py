"""Ledgered work units: how every data stage splits its work, runs it on Ray, and resumes after a crash.

A stage plans its work as units (an input span to tokenize, a hash partition to match, a shard to convert),
each named by a stable id. A unit runs as one Ray task of one CPU; it publishes its outputs whole
(`openllama.files`), then its ledger entry, last:

    <ledger folder>/<unit id>.json  =  {"unit": ID, "settings_sha": SHA, ...what the unit reports}

An entry whose `settings_sha` is the stage's settings hash means the unit is done with these settings; a rerun
skips it and reads its report from the entry. A unit without an entry (a crash, a lost node) or with another
settings hash is run again from the start, and since its outputs are published whole under names of its
own, the rerun replaces them instead of adding to them. The pipeline records its stages (Ray jobs) in the same
format, keyed by the hash of each stage's command, inputs and code (`platform/pipeline.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tqdm import tqdm

from openllama import commands, files, ray_jobs

log = logging.getLogger(__name__)

Unit = TypeVar("Unit")
Progress = Callable[[str, int, int], None]  # (what, units finished, units to run), in the driver after each unit


def settings_sha(settings: Any) -> str:
    """The identity of a stage's settings (any JSON value), recorded in each ledger entry."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Ledger:
    """The entries of one stage's units in `folder` (local or a bucket), for settings whose hash is `sha`."""

    folder: str
    sha: str

    @classmethod
    def of(cls, folder: str, settings: Any) -> Ledger:
        return cls(folder.rstrip("/"), settings_sha(settings))

    def location(self, unit: str) -> str:
        return f"{self.folder}/{unit}.json"

    def read(self, unit: str) -> dict | None:
        """The unit's entry, whatever settings it was done with (None: it has none)."""
        location = self.location(unit)
        return files.read_json(location) if files.is_file(location) else None

    def entry(self, unit: str) -> dict | None:
        """The unit's entry when it is done with these settings, else None."""
        entry = self.read(unit)
        return entry if entry is not None and entry.get("settings_sha") == self.sha else None

    def record(self, unit: str, report: dict) -> dict:
        """Mark `unit` done: its entry, written whole and after everything the unit published."""
        entry = {"unit": unit, "settings_sha": self.sha, **report}
        files.write_json(self.location(unit), entry)
        return entry


def run_units(what: str, units: Sequence[Unit], unit_id: Callable[[Unit], str], task: Callable[[Unit], dict],
              ledger: Ledger, address: str | None = None, concurrency: int | None = None,
              on_progress: Progress | None = None) -> list[dict]:
    """Each unit's ledger entry, in order, running as Ray tasks those not done yet.

    Units are JSON values (a dict, a partition number). `task(unit)` publishes the unit's outputs and returns
    its report; the task records the entry itself, on the worker, right after. Ray is joined (the cluster at
    `address`, else RAY_ADDRESS, else an in-process Ray) only when a unit is pending.
    """
    entries = {unit_id(unit): ledger.entry(unit_id(unit)) for unit in units}
    pending = [unit for unit in units if entries[unit_id(unit)] is None]
    log.info("%s: %d units, %d done before, %d to run", what, len(units), len(units) - len(pending), len(pending))
    if pending:
        ray_jobs.connect(address, log_to_driver=False, configure_logging=False)
    for entry in run_tasks(what, pending, lambda unit: ledger.record(unit_id(unit), task(unit)), concurrency,
                           on_progress):
        entries[entry["unit"]] = entry
    return [entries[unit_id(unit)] for unit in units]


def run_tasks(what: str, items: Sequence[Unit], task: Callable[[Unit], dict], concurrency: int | None = None,
              on_progress: Progress | None = None) -> list[dict]:
    """`task(item)` for every item as Ray Data tasks of one CPU each, one item per task; their results.

    Plain tasks, no actor pool: nothing holds a CPU while it waits (on 2 CPUs, actors that take every CPU
    leave Ray Data's own operators none, and it hangs).
    """
    if not items:
        return []
    import ray  # after ray_jobs.connect, which sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER before ray's first import

    # A dataset takes a copy of the current DataContext when it is made: set ours for this one, then put
    # the process's settings back. Our tqdm counts units. Ray Data reserves a share of the CPUs per
    # operator; with the single map operator here that only holds CPUs back.
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars, context.op_resource_reservation_enabled
    context.enable_progress_bars = context.op_resource_reservation_enabled = False
    try:
        # units travel as JSON: Ray Data would turn dicts into Arrow structs, giving every unit every key
        dataset = ray.data.from_items([{"item": json.dumps(item)} for item in items], override_num_blocks=len(items))
    finally:
        context.enable_progress_bars, context.op_resource_reservation_enabled = saved

    def guarded(row: dict) -> dict:
        """The task's result, or the error it raised, to raise again in the driver as itself (Ray Data would
        wrap it in its own exception, and a unit's bad input would no longer read as one)."""
        try:
            return {"result": json.dumps(task(json.loads(row["item"]))), "error": b""}
        except Exception as error:
            error.add_note(f"raised in a Ray task of {what}:\n{traceback.format_exc()}")
            try:
                return {"result": "", "error": pickle.dumps(error)}
            except Exception:  # an exception that does not pickle: its message, as a failure
                return {"result": "", "error": pickle.dumps(commands.WorkFailed(f"{what}: {error!r}"))}

    done = dataset.map(guarded, num_cpus=1, concurrency=concurrency)
    results = []
    with tqdm(total=len(items), desc=what, unit="unit", file=sys.stderr) as progress:
        for finished, row in enumerate(done.iter_rows(), start=1):
            if row["error"]:
                raise pickle.loads(row["error"])
            results.append(json.loads(row["result"]))
            progress.update(1)
            if on_progress is not None:
                on_progress(what, finished, len(items))
    return results
