"""How every `openllama` command ends: one exit-code convention, one way to report an error.

- 0: done.
- 2: bad input or config, found before or during the work (a field, a path, a file that is not what it
  should be): one line on stderr naming it, no traceback, nothing half-written left behind.
- 1: a failure while working (a Ray job failed, the loss diverged, a crash in a library): one line saying
  what failed, with the traceback above it when the error is not one we raised on purpose.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable

EXIT_CODES = "exit codes: 0 done, 2 bad input or config (one line naming it), 1 a failure while working"


class BadInput(ValueError):
    """Input that cannot work (a config field, a path, a file's contents); the message names it."""


class WorkFailed(RuntimeError):
    """Work that started and did not succeed; the message says what failed and where to look."""


BAD_INPUT = (BadInput, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def run(prog: str, work: Callable[[], int | None]) -> int:
    """`work()`'s exit code, with every error reported by the convention above."""
    try:
        return int(work() or 0)
    except BAD_INPUT as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    except WorkFailed as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as error:  # not raised on purpose: the traceback is what a bug report needs
        traceback.print_exc()
        print(f"{prog}: failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


def quiet_libraries() -> None:
    """Our progress at INFO, the libraries' chatter only from WARNING (orbax logs every file it writes).

    The level is set on our own logger too: a library that installs a root handler when imported (absl
    does) turns `basicConfig` into a no-op, and the root logger's WARNING would then hide our progress.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("openllama").setLevel(logging.INFO)
    for name in ("absl", "jax._src", "orbax", "lm-eval", "lm_eval", "datasets", "filelock", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
