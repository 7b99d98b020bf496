"""The faults a sweep cannot wait out — a full disk, an MLflow store that fails (lost,
read-only) — and how its stop is told: no retry mends them, so the sweep stops cleanly (its trials stopped,
their runs failed with the reason where the store still takes it, the table so far printed) and
`--resume` continues it once the cause is gone. (A busy MLflow store, which ends by itself, is
waited out by `orchestrator.tracking.runs.retried`.)"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from mlflow.exceptions import MlflowException

# how a full disk reads: an OSError's ENOSPC (Python, torch, pyarrow, Ray), SQLite's (MLflow,
# Optuna)
_FULL_DISK = (os.strerror(errno.ENOSPC), "database or disk is full")
_LINE = 300  # the most characters of an error line a stop quotes


@dataclass(frozen=True)
class Stop:
    """Why a sweep stopped for good: what failed, the error line that says so (the runs' error
    tag), and what to do before `--resume`."""

    what: str
    line: str
    before_resume: str


class DiskFullError(RuntimeError):
    """A trial's write failed for want of space; the message is its error line."""


def fills_disk(message: str) -> bool:
    """Whether an error's message says a disk is full."""
    return _full_disk_line(message) is not None


def _full_disk_line(message: str) -> str | None:
    """The last line of the message (a trial's error holds its whole traceback) that says a disk
    is full."""
    lines = [line.strip() for line in message.splitlines() if any(f in line for f in _FULL_DISK)]
    return lines[-1][:_LINE] if lines else None


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and those it was raised from or during."""
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and all(seen is not earlier for earlier in chain):
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def disk_full(error: BaseException) -> str | None:
    """The line of `error`, or of one in its chain, that says a disk is full; None for any other."""
    for seen in _chain(error):
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return f"{type(seen).__name__}: {seen}"[:_LINE]
        line = _full_disk_line(str(seen))
        if line is not None:
            return line
    return None


def _store_error(error: BaseException) -> str | None:
    """The telling line of an MLflow error in the chain (SQLite's own, where it names one)."""
    for seen in _chain(error):
        if isinstance(seen, MlflowException):
            lines = [line.strip() for line in str(seen).splitlines() if line.strip()] or ["?"]
            return next((line for line in lines if "Error)" in line), lines[0])[:_LINE]
    return None


def stop_for(error: BaseException) -> Stop | None:
    """The stop a fault calls for: a full disk, or an MLflow store that failed; None for any other
    error (a bug, which keeps its traceback)."""
    full = disk_full(error)
    if full is not None:
        where = "its folder, Tune's storage, the MLflow store"
        return Stop(
            "a disk the sweep writes to is full", full, f"Free space where it writes ({where})"
        )
    store = _store_error(error)
    if store is not None:
        again = (
            "a store that was deleted or moved is made again, with the sweep's runs logged again"
        )
        return Stop(
            "its MLflow store failed", store, f"Make sure the store can be written ({again})"
        )
    return None
