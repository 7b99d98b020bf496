"""Where the tool will write and what it will connect to, tried before any work: a folder is
writable when a file can really be made in it (permission bits say nothing to root, nor of /proc),
a server is there when a connection opens within a few seconds (not after a minute of retries),
and a SQLite file is a database when its header says so. Each refusal is one line naming the flag.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

CONNECT_TIMEOUT_S = 3.0
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


class LocationError(ValueError):
    """A place the tool cannot write to or reach; the message is one line meant for the user."""


def check_writable(folder: Path, flag: str) -> None:
    """A file can be made in `folder` (made and removed at once)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
    except OSError as error:
        raise LocationError(f"{flag}: cannot write in {folder} ({error.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: Path, flag: str) -> None:
    """`path` can be written as a file: not a folder, in a folder that exists and is writable."""
    if path.is_dir():
        raise LocationError(f"{flag}: {path} is a directory; give a file name")
    folder = path.parent
    if not folder.is_dir():
        above = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if above is not None and not above.is_dir():
            raise LocationError(
                f"{flag}: {path} is under the file {above}; give a file in a folder"
            )
        raise LocationError(f"{flag}: the folder {folder} does not exist; make it first")
    check_writable(folder, flag)


def check_reachable(host: str, port: int, what: str, hint: str) -> None:
    """Something accepts a connection at host:port within CONNECT_TIMEOUT_S."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return
    except OSError as error:
        reason = "no answer" if isinstance(error, TimeoutError) else error.strerror or str(error)
        raise LocationError(
            f"{what}: nothing answers at {host}:{port} within {CONNECT_TIMEOUT_S:g} s ({reason}); "
            f"{hint}"
        ) from None


def check_sqlite_file(path: Path, what: str) -> None:
    """An existing SQLite store is a file holding a SQLite database (an empty one becomes one)."""
    if path.is_dir():
        raise LocationError(f"{what}: {path} is a directory, not a SQLite database file")
    with open(path, "rb") as file:
        header = file.read(len(SQLITE_HEADER))
    if header and header != SQLITE_HEADER:
        raise LocationError(f"{what}: {path} is not a SQLite database; give another file name")
