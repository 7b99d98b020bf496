"""One driver per sweep folder: the running driver holds an OS lock (`flock`) on the folder's
`DRIVER_LOCK` file for as long as its process lives, with its host and pid written in it for the
message another `run` gets. The kernel drops the lock when the process ends, however it ends: a
lock left by a driver that died is taken over by the next one.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import BinaryIO

from orchestrator.sweep_folder import DRIVER_LOCK, SweepFolderError

log = logging.getLogger(__name__)
# the lock files this process holds, open until it ends
_HELD: list[BinaryIO] = []


def _held_here(lock: Path) -> bool:
    """Whether this process holds `lock` already (a sweep run again in one process, as tests do):
    a second `flock` of its own would wait on itself."""
    try:
        found = os.stat(lock, follow_symlinks=False)
    except OSError:
        return False
    return any(
        (held.st_dev, held.st_ino) == (found.st_dev, found.st_ino)
        for held in (os.fstat(file.fileno()) for file in _HELD)
    )


def _holder(file: BinaryIO) -> str:
    """Who holds the lock, as its file says: `pid 123 on host`."""
    file.seek(0)
    words = file.read(200).decode(errors="replace").split()
    return f"pid {words[1]} on {words[0]}" if len(words) == 2 else "another driver"


def _refusal(sweep_dir: Path, file: BinaryIO) -> SweepFolderError:
    return SweepFolderError(
        f"{sweep_dir} is being run by {_holder(file)} (it holds its {DRIVER_LOCK}); "
        "one driver per sweep folder: wait for it to end, or stop it and then --resume"
    )


def check_no_driver(sweep_dir: Path) -> None:
    """Refuse a folder whose lock another driver holds; creates nothing (a probe before the checks
    that follow, which may still refuse)."""
    if _held_here(sweep_dir / DRIVER_LOCK):
        return
    try:
        fd = os.open(sweep_dir / DRIVER_LOCK, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return
    with os.fdopen(fd, "rb") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refusal(sweep_dir, file) from None


def hold_driver_lock(sweep_dir: Path) -> None:
    """Take the folder's lock until this process ends; SweepFolderError naming the holder when
    another driver has it."""
    if _held_here(sweep_dir / DRIVER_LOCK):
        return
    try:
        fd = os.open(sweep_dir / DRIVER_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    # a symlink planted in its place is not followed (ELOOP), nor is a folder opened
    except OSError as error:
        raise SweepFolderError(
            f"cannot lock {sweep_dir / DRIVER_LOCK} ({error.strerror}); remove it if it is not a "
            "file the tool wrote"
        ) from None
    file = os.fdopen(fd, "r+b")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        error = _refusal(sweep_dir, file)
        file.close()
        raise error from None
    if (stale := _holder(file)) != "another driver":
        log.info("%s: took over the lock left by %s, which no longer runs", sweep_dir, stale)
    file.seek(0)
    file.truncate()
    file.write(f"{socket.gethostname()} {os.getpid()}\n".encode())
    file.flush()
    _HELD.append(file)
