"""Crash-safe file publication: a file appears complete under its final name, or not at
all (temporary file in the same file system, fsync, atomic rename, fsync of the folder).

Used by every store that must survive `kill -9` or a power cut: blobs, manifests, pins.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename is durable only once its folder is)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_durable(fd: int, temp: Path, final: Path) -> None:
    """Flush a complete temp file, rename it into place, and flush the directory entry."""
    os.fsync(fd)
    os.replace(temp, final)
    fsync_dir(final.parent)


def write_atomically(path: Path, data: bytes, *, temp_dir: Path | None = None) -> None:
    """Publish `data` at `path` all at once (temp file in `temp_dir`, default beside it)."""
    fd, name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".part", dir=temp_dir or path.parent
    )
    try:
        with os.fdopen(fd, "wb", closefd=False) as handle:
            handle.write(data)
        make_durable(fd, Path(name), path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise
    finally:
        os.close(fd)
