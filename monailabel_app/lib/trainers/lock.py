"""One training at a time, across server restarts: an exclusive ``flock`` on ``models/model.pt.lock``.

The training process takes the lock before it starts and holds it until it exits, so it is released however the
process ends (also kill -9). A server that was killed and restarted no longer knows its earlier training process
(an orphan that keeps running and writing ``model.pt``); it asks the lock instead, and refuses a new training
while the lock is held. A second training process that starts anyway fails at once without touching the weights.
"""

from __future__ import annotations

import fcntl
import os
from typing import Optional


class TrainingLock:
    """The lock file of one weights file (``<weights>.lock``)."""

    def __init__(self, weights_path: str):
        self.path = f"{weights_path}.lock"
        self._fd: Optional[int] = None

    def acquire(self) -> bool:
        """Take the lock for this process (kept until :meth:`release` or exit); False when another process holds it."""
        if self._fd is not None:
            return True
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        os.fsync(fd)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holder(self) -> Optional[int]:
        """The process id holding the lock (-1 when unknown), or None when nobody holds it. Never takes it."""
        if self._fd is not None:
            return os.getpid()
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 32).decode(errors="replace").strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)
