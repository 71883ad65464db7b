"""An exclusive lock on a file, taken without waiting, released when its holder ends.

Two runs that must not overlap (two syncs of one study to one destination; two ingests of one
store) each take the lock on one file. The operating system drops the lock when its holder
ends in any way, kill -9 and a power cut included, so a stale lock never needs clearing by hand.

- POSIX: ``flock(2)`` on the open file. Five lines, and importing nothing: the no-change sync
  takes this lock first, and importing filelock (which pulls in logging, inspect, decimal and
  OpenSSL) added to its time, measurably, with a cold cache (benchmarks/README.md, "Figures
  behind the code's choices").
- Windows: filelock (``msvcrt.locking``), the well-kept cross-platform library, imported only
  there. The tests run the same contract against both backends on Linux.

With flock the lock file stays after release: removing it would race with a run that opened
it just before, which would then lock a file no longer in the folder.
"""

from __future__ import annotations

import os
import sys
from typing import Any


class Held(Exception):
    """Another process (or another lock object of this one) holds the lock."""


class FileLock:
    """acquire() takes the lock or raises Held at once; release() lets it go."""

    def __init__(self, path: str | os.PathLike[str], *, backend: str | None = None) -> None:
        self.path = os.fspath(path)
        self.backend = backend or ("filelock" if sys.platform == "win32" else "flock")
        if self.backend not in ("flock", "filelock"):
            raise ValueError(f"unknown lock backend {self.backend!r}")
        self._fd: int | None = None
        self._other: Any = None  # the filelock object, on that backend

    @property
    def held(self) -> bool:
        return self._fd is not None or self._other is not None

    def acquire(self) -> None:
        if self.held:
            raise RuntimeError(f"{self.path}: this lock is held already")
        if self.backend == "filelock":
            self._acquire_filelock()
            return
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Held(self.path) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _acquire_filelock(self) -> None:
        import filelock

        other = filelock.FileLock(self.path, thread_local=False)
        try:
            other.acquire(timeout=0)
        except filelock.Timeout:
            raise Held(self.path) from None
        self._other = other

    def release(self) -> None:
        """Lets the lock go (closing the file does it); a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        other, self._other = self._other, None
        if other is not None:
            other.release()
