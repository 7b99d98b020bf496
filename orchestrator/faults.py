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
    return _full_disk_line(message) is not None


def _full_disk_line(message: str) -> str | None:
    """The last line of the message (a trial's error holds its whole traceback) that says a disk
    is full."""
    lines = [line.strip() for line in message.splitlines() if any(f in line for f in _FULL_DISK)]
    return lines[-1][:300] if lines else None


def disk_full(error: BaseException) -> str | None:
    """The line of `error`, or of one it was raised from or during, that says a disk is full; None
    for any other error."""
    seen: BaseException | None = error
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return f"{type(seen).__name__}: {seen}"[:300]
        line = _full_disk_line(str(seen))
        if line is not None:
            return line
        seen = seen.__cause__ or seen.__context__
    return None
