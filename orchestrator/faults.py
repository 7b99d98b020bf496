"""A full disk, the fault a sweep cannot wait out: no retry mends it, so the sweep stops cleanly
(its trials stopped, their runs failed with the reason, the table so far printed) and `--resume`
continues it once space is freed. (A busy MLflow store, which ends by itself, is waited out by
`orchestrator.tracking.runs.retried`.)"""

from __future__ import annotations

import errno
import os

# how a full disk reads: an OSError's ENOSPC (Python, torch, pyarrow, Ray), SQLite's (MLflow, Optuna)
_FULL_DISK = (os.strerror(errno.ENOSPC), "database or disk is full")


class DiskFullError(RuntimeError):
    """A trial's write failed for want of space; the message is its error line."""


def fills_disk(message: str) -> bool:
    """Whether an error's message says a disk is full."""
    return any(full in message for full in _FULL_DISK)


def disk_full(error: BaseException) -> str | None:
    """The first line of `error`, or of one it was raised from or during, where that says a disk is
    full; None for any other error."""
    seen: BaseException | None = error
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        full = isinstance(seen, OSError) and seen.errno == errno.ENOSPC
        if full or fills_disk(str(seen)):
            return (str(seen).strip().splitlines() or [type(seen).__name__])[0]
        seen = seen.__cause__ or seen.__context__
    return None
