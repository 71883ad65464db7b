"""One writer, many readers: only the ingest that holds the store's lock changes anything under
store/, the index included; readers (log, versions, cat, export, fsck's checks) read it as it is.

The two interleavings that broke it (issue 10) are forced here, deterministically, with real
processes: an ingest is stopped between its commit point (the study-log record, appended and
fsynced) and its index update, and a reader runs in that gap. A reader used to catch the index up
itself (and the ingest then failed: "index already holds ... seq N"), and fsck used to take the
gap for a disagreement, report it repaired and rebuild the index under the ingest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Server, describe, store_snapshot, tree_snapshot, write_file

from dittohead.errors import LockedError
from dittohead.lock import FileLock, Held
from dittohead.store.ingest import Ingestor, StudyLock
from dittohead.store.layout import ServerRoot
from dittohead.store.repo import Store

# A child process that ingests with Index.apply paused: it writes PAUSED once the study-log
# record is appended (the commit point) and waits for GO before it updates the index.
PAUSED_INGEST = r"""
import os, sys, time
from dittohead.store import index as index_mod
from dittohead.store.ingest import Ingestor
from dittohead.store.repo import Store

flag_dir, root = sys.argv[1], sys.argv[2]
real_apply = index_mod.Index.apply

def paused_apply(self, *args, **kwargs):
    open(os.path.join(flag_dir, "PAUSED"), "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(flag_dir, "GO")):
        if time.monotonic() > deadline:
            sys.exit("never told to go on")
        time.sleep(0.01)
    return real_apply(self, *args, **kwargs)

index_mod.Index.apply = paused_apply
store = Store.open(root)
results = Ingestor(store).run_once()
store.close()
print(" ".join(f"{r.study}/{r.submission}:{'ok' if r.ok else r.reason}" for r in results))
sys.exit(0 if results and all(r.ok for r in results) else 1)
"""


def _start_paused_ingest(server: Server, flags: Path) -> subprocess.Popen:
    flags.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_INGEST, str(flags), str(server.root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not (flags / "PAUSED").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate(timeout=10)
            pytest.fail(f"the ingest never reached its index update: {proc.returncode}\n{out}\n{err}")
        time.sleep(0.01)
    return proc


def _finish(proc: subprocess.Popen, flags: Path) -> str:
    (flags / "GO").touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"the ingest failed ({proc.returncode}):\n{out}\n{err}"
    return out


@pytest.fixture
def two_submissions(server: Server, tmp_path: Path) -> Path:
    """Study s with one submission ingested and a second one committed, not yet ingested."""
    src = tmp_path / "src"
    write_file(src / "a.txt", b"first\n")
    server.sync(src)
    server.ingest()
    write_file(src / "b.txt", b"second\n")
    server.sync(src)
    return src


def test_a_reader_in_the_gap_after_the_commit_point_leaves_the_ingest_alone(
        server: Server, two_submissions: Path, tmp_path: Path) -> None:
    flags = tmp_path / "flags"
    proc = _start_paused_ingest(server, flags)
    try:
        index_files = {p: p.stat().st_mtime_ns for p in (server.root / "store").glob("index.sqlite*")}
        # the reader answers from the index as it is: the submission in flight is not there yet
        res = server.run("log", "--store", server.root, "--study", "s", "--json")
        assert res.exit_code == 0, describe(res)
        assert [s["seq"] for s in json.loads(res.stdout)["submissions"]] == [1]
        assert server.run("versions", "--store", server.root, "--study", "s", "b.txt").exit_code == 1  # not yet
        assert server.cat("a.txt") == b"first\n"
        assert {p: p.stat().st_mtime_ns for p in (server.root / "store").glob("index.sqlite*")} == index_files
    finally:
        out = _finish(proc, flags)
    assert "s/" in out
    assert [s["seq"] for s in server.log()] == [1, 2]
    assert server.cat("b.txt") == b"second\n"


def test_fsck_in_the_gap_reports_nothing_that_is_not_there(server: Server, two_submissions: Path,
                                                           tmp_path: Path) -> None:
    flags = tmp_path / "flags"
    proc = _start_paused_ingest(server, flags)
    try:
        before = store_snapshot(server.root)
        res = server.run("fsck", "--store", server.root, "--json")
        doc = json.loads(res.stdout)
        assert res.exit_code == 0, describe(res)
        # the index lags the log by the submission in flight: not a disagreement, not repaired
        assert [f for f in doc["findings"] if f["severity"] != "warning"] == [], doc["findings"]
        assert store_snapshot(server.root) == before  # fsck changed nothing under the ingest
    finally:
        _finish(proc, flags)
    res = server.run("fsck", "--store", server.root, "--read-data", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["findings"] == [], describe(res)


def test_readers_never_write_under_store(server: Server, two_submissions: Path, tmp_path: Path) -> None:
    """An ingest killed past its commit point leaves the index a submission behind the log.
    Every read command, and fsck's checks, then leave store/ byte for byte as it was, the index
    included (SQLite's -wal and -shm coordination files aside); the next ingest catches up."""
    flags = tmp_path / "flags"
    proc = _start_paused_ingest(server, flags)
    proc.kill()
    proc.communicate(timeout=30)
    coordination = ("lock", "index.sqlite-wal", "index.sqlite-shm")

    def snapshot() -> dict:
        return {k: v for k, v in tree_snapshot(server.root / "store").items() if k not in coordination}

    before = snapshot()
    for args in (["log", "--study", "s"], ["versions", "--study", "s", "a.txt"], ["cat", "--study", "s", "a.txt"],
                 ["export", "--study", "s", str(tmp_path / "out")]):
        res = server.run(args[0], "--store", server.root, *args[1:])
        assert res.exit_code == 0, describe(res)
    assert snapshot() == before
    assert server.run("versions", "--store", server.root, "--study", "s", "b.txt").exit_code == 1  # not yet
    # fsck: no damage; holding the lock, it catches the index up as the ingest would (no finding)
    res = server.run("fsck", "--store", server.root, "--read-data", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["findings"] == [], describe(res)
    server.ingest()
    assert server.cat("b.txt") == b"second\n"


def test_an_ingest_reads_no_record_it_has_nothing_to_add_to(server: Server, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Cost follows the new work: the study log is one object a record, and an ingest (its
    catch-up and its commit) reads none of the records the index holds; it looks for the next
    record by its key. With the index gone, it reads them all once, to build it again."""
    from dittohead.store import repo

    src = tmp_path / "src"
    for i in range(3):
        write_file(src / f"f{i}.txt", b"x" * i)
        server.sync(src)
        server.ingest()
    read: list[int] = []
    real = repo.Store.read_record

    def counted(self, study: str, seq: int):
        rec = real(self, study, seq)
        if rec is not None:
            read.append(seq)
        return rec

    monkeypatch.setattr(repo.Store, "read_record", counted)
    monkeypatch.setattr(repo.Store, "read_log", lambda self, study: pytest.fail("the whole log was read"))
    write_file(src / "new.txt", b"new\n")
    server.sync(src)
    server.ingest()
    assert read == []
    assert server.cat("new.txt") == b"new\n"
    (server.root / "store" / "index.sqlite").unlink()  # built again by the next ingest
    write_file(src / "newer.txt", b"newer\n")
    server.sync(src)
    server.ingest()
    assert read == [1, 2, 3, 4]
    read.clear()
    write_file(src / "newest.txt", b"newest\n")
    server.sync(src)
    server.ingest()
    assert read == []
    monkeypatch.undo()
    assert [s["seq"] for s in server.log()] == [1, 2, 3, 4, 5, 6]
    res = server.run("fsck", "--store", server.root, "--read-data", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["findings"] == [], describe(res)


def test_a_held_lock_is_waited_for_up_to_the_wait_then_refused(server: Server) -> None:
    """The store's lock (Ingestor.locked) and a study's (StudyLock.acquire) are each waited for,
    while another holds them, up to the wait given: taken soon after the other lets go, and past
    the wait refused (LockedError, in one line; False for a study's)."""
    root = ServerRoot(str(server.root))
    store = Store.open(str(server.root))
    ingestor = Ingestor(store)
    other = FileLock(root.lock_path)
    held = StudyLock(root.dropbox("s"))
    try:
        other.acquire()
        t0 = time.monotonic()
        with pytest.raises(LockedError, match="holds the store's lock") as e, ingestor.locked(wait=0.3):
            pytest.fail("taken while another held it")
        assert time.monotonic() - t0 >= 0.3 and "\n" not in str(e.value)
        threading.Timer(0.3, other.release).start()
        t0 = time.monotonic()
        with ingestor.locked(wait=30):
            assert 0.25 <= time.monotonic() - t0 < 10
            with pytest.raises(Held):
                FileLock(root.lock_path).acquire()  # held by the ingestor now

        assert held.acquire()
        mine = StudyLock(root.dropbox("s"))
        t0 = time.monotonic()
        assert not mine.acquire(wait=0.3)
        assert time.monotonic() - t0 >= 0.3
        threading.Timer(0.3, held.release).start()
        t0 = time.monotonic()
        assert mine.acquire(wait=30)
        assert 0.25 <= time.monotonic() - t0 < 10
        mine.release()
    finally:
        other.release()
        held.release()
        ingestor.close()
        store.close()
