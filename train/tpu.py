"""TPU slices: how many chips and hosts a topology is, and what a run must ask of Ray to get one.

A v4 host has 4 chips (one Ray Train worker per host); a slice's name counts TensorCores, two per chip,
so the 256-chip 4x8x8 topology is a v4-512 on 64 hosts. Ray Train accepts any multiple of the hosts as
`num_workers`; a run needs exactly one worker per host, which `check_slice` says before anything starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from openllama.config import ConfigError

CHIPS_PER_HOST = {"v4": 4, "v5p": 4, "v5e": 8, "v6e": 8}
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
# HBM a program may use per chip (what the TPU compiler reports as the limit), for `openllama plan`
HBM_BYTES = {"v4": int(30.75 * 2**30), "v5p": int(95.74 * 2**30), "v5e": int(15.75 * 2**30),
             "v6e": int(31.25 * 2**30)}


@dataclass(frozen=True)
class Slice:
    """One TPU pod slice: generation, topology (e.g. 4x8x8), chips and hosts."""

    generation: str
    topology: str

    @property
    def chips(self) -> int:
        return math.prod(int(n) for n in self.topology.split("x"))

    @property
    def chips_per_host(self) -> int:
        return min(CHIPS_PER_HOST[self.generation], self.chips)

    @property
    def hosts(self) -> int:
        return self.chips // self.chips_per_host

    @property
    def name(self) -> str:
        """Google Cloud's accelerator type for the slice, e.g. v4-512."""
        return f"{self.generation}-{self.chips * CORES_PER_CHIP[self.generation]}"

    @property
    def hbm_bytes(self) -> int:
        return HBM_BYTES[self.generation]

    @property
    def host_bounds(self) -> tuple[int, int, int]:
        """Chips per host along each axis, as the compiler's topology description wants them."""
        return (2, 2, 1) if self.chips_per_host == 4 else (2, 4, 1)


def slice_of(accelerator_type: str | None, topology: str | None) -> Slice:
    """The slice a config's `scaling.accelerator_type` (TPU-V4) and `scaling.topology` (4x8x8) name."""
    if not accelerator_type or not topology:
        raise ConfigError("scaling.use_tpu=true needs scaling.topology and scaling.accelerator_type")
    generation = accelerator_type.lower().removeprefix("tpu-")
    if generation not in CHIPS_PER_HOST:
        raise ConfigError(f"scaling.accelerator_type={accelerator_type!r}; known: "
                          f"{[f'TPU-{g.upper()}' for g in CHIPS_PER_HOST]}")
    sizes = topology.split("x")
    if not all(size.isdigit() and int(size) > 0 for size in sizes) or len(sizes) not in (2, 3):
        raise ConfigError(f"scaling.topology={topology!r} is not a topology like 4x8x8")
    return Slice(generation, topology)


def check_slice(num_workers: int, accelerator_type: str | None, topology: str | None) -> Slice:
    """The slice, after checking that the run has one Ray Train worker per host of it."""
    tpu = slice_of(accelerator_type, topology)
    if num_workers != tpu.hosts:
        raise ConfigError(
            f"scaling.num_workers={num_workers} but topology {topology} ({tpu.name}) is {tpu.chips} chips on "
            f"{tpu.hosts} hosts of {tpu.chips_per_host}: set scaling.num_workers={tpu.hosts} (one worker per host)"
        )
    return tpu


def add_libtpu_flags(flags: str) -> None:
    """Append `flags` to this process's LIBTPU_INIT_ARGS, which libtpu reads once, when it starts (so before
    the first TPU device or topology is asked for)."""
    if flags:
        os.environ["LIBTPU_INIT_ARGS"] = " ".join(filter(None, [os.environ.get("LIBTPU_INIT_ARGS"), flags]))
