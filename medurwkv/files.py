"""Crash-safe file writes: a reader (or a restart after ``kill -9``) sees the old file or the new one, never a
partly written one.

The data goes to a temporary file in the destination's own folder (same file system, so the rename is atomic),
is flushed and fsynced, then renamed over the destination; the folder is fsynced so that the rename itself is
durable. A failure at any point removes the temporary file and leaves the destination as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, IO, Union

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_copy"]


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform/file system; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary binary file next to ``path``, then fsync it and rename it to ``path``.

    The temporary name starts with ``.`` and ends with ``.tmp`` so that folder scans for volumes ignore it.
    If ``path`` is a symbolic link, the link itself is replaced (its target is never written)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_copy(src: PathLike, dst: PathLike) -> None:
    """Copy the contents of ``src`` to ``dst`` atomically (see :func:`atomic_write`)."""

    def write(f: IO[bytes]) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, 1 << 20)

    atomic_write(dst, write)
