"""Crash-safe file writes: a reader (or a restart after ``kill -9``) sees the old file or the new one, never a
partly written one.

The data goes to a temporary file in the destination's own folder (same file system, so the rename is atomic),
is flushed and fsynced, then renamed over the destination; the folder is fsynced so that the rename itself is
durable. A failure at any point removes the temporary file and leaves the destination as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["atomic_path", "atomic_write", "atomic_write_bytes", "atomic_copy", "write_json_atomic"]


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


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (for writers that take a path: ``torch.save``, safetensors); once
    the block has written it, fsync it and rename it onto ``path``. On error the temporary file is removed.

    The temporary name starts with ``.`` and ends with ``.tmp`` so that folder scans for volumes ignore it.
    If ``path`` is a symbolic link, the link itself is replaced (its target is never written)."""
    path = Path(path)
    folder = path.absolute().parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(str(folder))


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary binary file next to ``path``, then fsync it and rename it to ``path``
    (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_copy(src: PathLike, dst: PathLike) -> None:
    """Copy the contents of ``src`` to ``dst`` atomically (see :func:`atomic_write`)."""

    def write(f: IO[bytes]) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, 1 << 20)

    atomic_write(dst, write)


def write_json_atomic(path: PathLike, obj: Any) -> None:
    """``json.dump`` to ``path`` atomically (see :func:`atomic_path`)."""
    atomic_write_bytes(path, json.dumps(obj, indent=2).encode())
