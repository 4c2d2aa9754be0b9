"""Where an attempt's wall time went: the productive steps, and everything that was not training.

Each attempt of a run (one `Trainer.fit`) times its own phases; what is not measured directly is the
productive part, so the parts always add up to the wall time:

    startup_s     building the mesh, the program and the data plan
    restore_s     removing partial saves, then restoring the newest checkpoint (or initializing)
    compile_s     the first step's time beyond a steady step's (the median of the others)
    data_wait_s   the loop waiting for its next batch
    checkpoint_s  the loop blocked on saves: copying the state off the devices, and waiting for a save
                  still in flight (the one before, and the last)
    eval_s        held-out evaluation
    redone_s      steps an earlier attempt had already computed after its last checkpoint (set by the
                  tracking hook, which knows the steps MLflow already has); zero for a first attempt
    productive_s  the rest
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

PHASES = ("startup_s", "restore_s", "compile_s", "data_wait_s", "checkpoint_s", "eval_s", "redone_s")


@dataclass
class Goodput:
    started: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    step_times: list[float] = field(default_factory=list)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    def summary(self, redone_s: float = 0.0) -> dict[str, float]:
        """The phases of this attempt so far, `productive_s`, `wall_s` and `goodput` (productive / wall)."""
        seconds = dict(self.seconds, redone_s=redone_s)
        if len(self.step_times) > 1:
            seconds["compile_s"] = max(0.0, self.step_times[0] - statistics.median(self.step_times[1:]))
        wall = time.perf_counter() - self.started
        productive = max(0.0, wall - sum(seconds.values()))
        return {**seconds, "productive_s": productive, "wall_s": wall, "goodput": productive / wall if wall else 0.0}


def with_redone(figures: dict[str, float], redone_s: float) -> dict[str, float]:
    """An attempt's figures with `redone_s` of its productive time moved to redone."""
    productive = max(0.0, figures["productive_s"] - redone_s)
    wall = figures["wall_s"]
    return dict(figures, redone_s=redone_s, productive_s=productive, goodput=productive / wall if wall else 0.0)


def combine(attempts: list[dict[str, float]]) -> dict[str, float]:
    """The whole run's figures from its attempts' summaries: seconds add up, goodput is recomputed."""
    total = {key: sum(a.get(key, 0.0) for a in attempts) for key in (*PHASES, "productive_s", "wall_s")}
    total["goodput"] = total["productive_s"] / total["wall_s"] if total["wall_s"] else 0.0
    return total


def describe(figures: dict[str, float]) -> str:
    """One line: goodput and where the rest of the wall time went."""
    others = ", ".join(f"{key.removesuffix('_s').replace('_', ' ')} {figures[key]:.1f} s" for key in PHASES
                       if figures.get(key, 0.0) >= 0.05)
    return (f"goodput {100 * figures['goodput']:.1f}% ({figures['productive_s']:.1f} s of {figures['wall_s']:.1f} s "
            f"training{'; ' + others if others else ''})")
