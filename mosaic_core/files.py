"""The one way the tool writes a file into a sweep or run folder (records, tables, plots, results
parts, checkpoints): a new temporary file in the same folder, flushed to disk, then renamed over
the target. The rename replaces a symlink planted at the target rather than following it, so
nothing outside the folder is ever written through one; and a crash or a full disk leaves the old
file or the new one whole, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def replacing(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s new contents into; it replaces `path` once the block ends
    without an error (and is removed if it raises)."""
    # mkstemp creates a new file (O_EXCL): it never opens a symlink planted in the folder
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    # readable by others as a plain open's file would be (mkstemp makes it 0600)
    os.fchmod(fd, 0o644)
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_file(path: Path, contents: str | bytes) -> None:
    """`contents` (text as UTF-8) as the whole of `path`, written as `replacing` does."""
    with replacing(path) as file:
        file.write(contents.encode() if isinstance(contents, str) else contents)


def append_line(path: Path, line: str) -> None:
    """A line more at the end of `path` (created when missing), refused (OSError) when `path` is a
    symlink: appending cannot rename, so it does not follow one."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "a") as file:
        file.write(line + "\n")


def own_folder(path: Path) -> Path:
    """The path of a folder the tool keeps inside a sweep folder (`plots/`), freed of a symlink
    planted in its place (the link alone is removed, never what it points to), so the files
    written into it stay inside the sweep folder."""
    if path.is_symlink():
        path.unlink()
    return path
