"""The run lock (dittohead.lock), its one contract on both backends: flock and filelock.

filelock is the Windows backend; it runs here too, so that its side of the contract is
checked on every run, not only on a Windows machine. The holders are real processes: a lock
that only kept out threads of its own process would pass a test that used threads.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dittohead.lock import FileLock, Held

BACKENDS = ["flock", "filelock"]

HOLDER = textwrap.dedent("""
    import sys, time
    from dittohead.lock import FileLock
    lock = FileLock(sys.argv[1], backend=sys.argv[2])
    lock.acquire()
    print("held", flush=True)
    sys.stdin.read()  # hold until told (stdin closed) or killed
    lock.release()
    print("released", flush=True)
""")


class Holder:
    """Another process holding the lock until stop() or kill()."""

    def __init__(self, path: Path, backend: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), backend],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == "held\n", f"the holder could not take the lock: {line!r}"

    def stop(self) -> None:
        out, _ = self.proc.communicate("", timeout=30)
        assert out == "released\n"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        if self.proc.stdin:
            self.proc.stdin.close()
        if self.proc.stdout:
            self.proc.stdout.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_held_lock_is_refused_at_once_and_free_after_release(backend: str, tmp_path: Path) -> None:
    path = tmp_path / "run.lock"
    holder = Holder(path, backend)
    try:
        with pytest.raises(Held):
            FileLock(path, backend=backend).acquire()
    finally:
        holder.stop()
    lock = FileLock(path, backend=backend)
    lock.acquire()
    assert lock.held
    lock.release()
    assert not lock.held


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_killed_holder_leaves_no_stale_lock(backend: str, tmp_path: Path) -> None:
    path = tmp_path / "run.lock"
    holder = Holder(path, backend)
    holder.kill()
    lock = FileLock(path, backend=backend)
    lock.acquire()  # no clearing by hand after kill -9
    lock.release()


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_lock_objects_of_one_process_exclude_each_other(backend: str, tmp_path: Path) -> None:
    first, second = FileLock(tmp_path / "l", backend=backend), FileLock(tmp_path / "l", backend=backend)
    first.acquire()
    try:
        with pytest.raises(Held):
            second.acquire()
    finally:
        first.release()
    second.acquire()
    second.release()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refused_acquire_leaks_no_descriptor(backend: str, tmp_path: Path) -> None:
    holder = Holder(tmp_path / "l", backend)
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(50):
            with pytest.raises(Held):
                FileLock(tmp_path / "l", backend=backend).acquire()
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        holder.stop()


def test_misuse_is_an_error_not_a_silent_second_hold(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / "l")
    lock.acquire()
    with pytest.raises(RuntimeError, match="held already"):
        lock.acquire()
    lock.release()
    lock.release()  # a second release is harmless
    with pytest.raises(ValueError, match="unknown lock backend"):
        FileLock(tmp_path / "l", backend="fcntl")


def test_a_lock_in_a_missing_folder_fails_with_the_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FileLock(tmp_path / "no" / "such" / "l").acquire()
