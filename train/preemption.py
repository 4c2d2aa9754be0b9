"""Noticing a preemption: SIGTERM (a spot or preemptible VM about to stop, `ray job stop` through the driver)
or SIGINT (Ctrl-C), agreed on by every process so that all of them save the same step and stop.

With `jax.distributed` (every Ray Train worker group, one worker too), the JAX runtime's own preemption
notifier catches SIGTERM on whichever process gets it and tells the coordination service; every process
then reaches the same step in `multihost_utils.reached_preemption_sync_point`. A lone process (a Trainer run
in a notebook or a test) installs Python handlers instead, when it runs on the main thread.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from jax._src import distributed
from jax.experimental import multihost_utils

log = logging.getLogger("openllama.train")


class PreemptionWatch:
    """`reached(step)` is True on every process at the same step once any process was sent SIGTERM/SIGINT."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.signalled: int | None = None
        self.previous: dict[int, object] = {}
        # JAX's private module: the one place that says whether its preemption sync manager exists
        self.synced = distributed.global_state.preemption_sync_manager is not None

    def __enter__(self) -> PreemptionWatch:
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return self
        if self.synced:  # SIGTERM is JAX's; Ctrl-C is turned into the SIGTERM it notices
            self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda *_: os.kill(os.getpid(),
                                                                                             signal.SIGTERM))
        else:
            for number in (signal.SIGTERM, signal.SIGINT):
                self.previous[number] = signal.signal(number, self._note)
        return self

    def _note(self, number: int, frame) -> None:
        if self.signalled is not None:  # a second Ctrl-C: stop now, as Python would
            raise KeyboardInterrupt
        self.signalled = number
        log.warning("%s received: saving the step reached, then stopping", signal.Signals(number).name)

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous.clear()

    def reached(self, step: int) -> bool:
        if not self.enabled:
            return False
        if self.synced:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signalled is not None
