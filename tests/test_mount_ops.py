"""The mount's answers (dittohead/fuse/ops.py), called directly, without FUSE: every file of
every version reads back as `cat` gives it, attributes, EROFS for every change, a new ingest
seen while open files keep their version, damage as EIO, many threads at once.
(Real mounts: test_mount_real.py.)"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import random
import shutil
import stat
import threading
from pathlib import Path

import pytest
from conftest import Server, write_file

from dittohead.fuse import ops as ops_mod
from dittohead.fuse.ops import MountOps
from dittohead.store.repo import Store

STUDY = "s"
BIG = random.Random(7).randbytes(5 << 20)  # several chunks


def _walk(ops: MountOps, top: str) -> dict[str, ops_mod.Attr]:
    """path -> stat for everything under ``top``, by readdir and getattr as the kernel would."""
    out = {}
    stack = [top]
    while stack:
        d = stack.pop()
        for name, attrs in ops.readdir(d):
            if name in (".", ".."):
                continue
            path = f"{d.rstrip('/')}/{name}"
            st = ops.getattr(path)
            assert st == attrs, path  # what the listing gave the kernel is what getattr gives
            out[path] = st
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)
    return out


def _read_all(ops: MountOps, path: str, piece: int = 131072) -> bytes:
    fh = ops.open(path, os.O_RDONLY)
    try:
        out, off = [], 0
        while True:
            data = ops.read(path, piece, off, fh)
            if not data:
                return b"".join(out)
            out.append(data)
            off += len(data)
    finally:
        ops.release(path, fh)


@pytest.fixture
def filled(server: Server, tmp_path: Path) -> Server:
    src = tmp_path / "src"
    write_file(src / "a" / "one.txt", b"one\n")
    write_file(src / "big.bin", BIG)
    write_file(src / "empty", b"")
    server.sync(src)
    server.ingest()
    write_file(src / "a" / "one.txt", b"one, again\n")
    write_file(src / "a" / "b" / "deep.txt", b"deep\n")
    server.sync(src)
    server.ingest()
    return server


@pytest.fixture
def ops(filled: Server):
    store = Store.open(str(filled.root))
    o = MountOps(store)
    yield o
    o.close()
    store.close()


def test_every_file_of_every_version_reads_as_cat_gives_it(filled: Server, ops: MountOps) -> None:
    tree = _walk(ops, "/")
    files = {p: st for p, st in tree.items() if stat.S_ISREG(st.st_mode)}
    assert f"/{STUDY}/current/big.bin" in files and f"/{STUDY}/log.jsonl" in files
    checked = 0
    for path, st in files.items():
        data = _read_all(ops, path, piece=random.Random(path).choice([4096, 65536, 131072, 1 << 20]))
        assert len(data) == st.st_size, path
        parts = path.split("/")[2:]
        if parts[0] == "current":
            assert data == filled.cat("/".join(parts[1:])), path
            checked += 1
        elif parts[0] == "versions":
            n = int(parts[-1].split("_", 1)[0])
            assert data == filled.cat("/".join(parts[1:-1]), version=n), path
            checked += 1
    assert checked >= 8


def test_attributes(filled: Server, ops: MountOps) -> None:
    st = ops.getattr(f"/{STUDY}/current/big.bin")
    v = filled.versions("big.bin")[-1]
    assert st.st_size == len(BIG) and st.st_blocks == (len(BIG) + 511) // 512
    assert stat.S_ISREG(st.st_mode) and not st.st_mode & 0o222
    assert st.st_mtime == v["mtime_ns"]
    top = ops.getattr("/")
    assert stat.S_ISDIR(top.st_mode)
    d = ops.getattr(f"/{STUDY}/current/a")
    assert stat.S_ISDIR(d.st_mode) and not d.st_mode & 0o022
    for missing in (f"/{STUDY}/current/nope", "/nostudy", f"/{STUDY}/versions/big.bin/0009_x.bin"):
        with pytest.raises(OSError) as e:
            ops.getattr(missing)
        assert e.value.errno == errno.ENOENT


def test_every_change_is_refused_with_erofs(ops: MountOps) -> None:
    path = f"/{STUDY}/current/a/one.txt"
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
        with pytest.raises(OSError) as e:
            ops.open(path, flags)
        assert e.value.errno == errno.EROFS
    for call in (ops.chmod, ops.chown, ops.create, ops.link, ops.mkdir, ops.mknod, ops.rename,
                 ops.rmdir, ops.symlink, ops.truncate, ops.unlink, ops.utimens, ops.write,
                 ops.setxattr, ops.removexattr):
        with pytest.raises(OSError) as e:
            call(path, 0)
        assert e.value.errno == errno.EROFS, call
    with pytest.raises(OSError) as e:
        ops.access(path, os.W_OK)
    assert e.value.errno == errno.EROFS
    assert ops.access(path, os.R_OK) == 0


def test_a_new_ingest_shows_and_an_open_file_keeps_its_version(filled: Server, ops: MountOps, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops_mod, "REFRESH", 0.0)
    path = f"/{STUDY}/current/a/one.txt"
    fh = ops.open(path, os.O_RDONLY)
    assert ops.read(path, 100, 0, fh) == b"one, again\n"
    src = tmp_path / "src"
    write_file(src / "a" / "one.txt", b"one, the third time\n")
    write_file(src / "new.txt", b"new\n")
    filled.sync(src)
    filled.ingest()
    assert ops.read(path, 100, 0, fh) == b"one, again\n"  # the version it opened
    assert ops.getattr(path, fh).st_size == len(b"one, again\n")
    ops.release(path, fh)
    assert ops.getattr(path).st_size == len(b"one, the third time\n")
    assert _read_all(ops, path) == b"one, the third time\n"
    assert _read_all(ops, f"/{STUDY}/current/new.txt") == b"new\n"
    names = [n for n, _ in ops.readdir(f"/{STUDY}/versions/a/one.txt")]
    assert sum(n.startswith("000") for n in names) == 3


def test_a_damaged_chunk_is_eio_and_one_log_line(filled: Server, tmp_path: Path, caplog) -> None:
    work = tmp_path / "copy"
    shutil.copytree(filled.root, work)
    with Store.open(str(work)) as store:
        v = store.index.versions(STUDY, "big.bin")[-1]
        from dittohead.view import FileReader

        r = FileReader(store, v)
        cid, _ = r.chunks[1]
        pid, offset, length = store.index.chunk(cid)
        pack = work / "store" / "packs" / pid.hex()[:2] / f"{pid.hex()}.pack"
        data = bytearray(pack.read_bytes())
        data[offset + length // 2] ^= 1
        pack.write_bytes(bytes(data))
        ops = MountOps(store)
        try:
            path = f"/{STUDY}/current/big.bin"
            fh = ops.open(path, os.O_RDONLY)
            assert ops.read(path, r.offsets[1], 0, fh) == BIG[: r.offsets[1]]
            caplog.clear()
            with caplog.at_level(logging.ERROR), pytest.raises(OSError) as e:
                ops.read(path, 10, r.offsets[1], fh)
            assert e.value.errno == errno.EIO
            lines = [rec for rec in caplog.records if rec.name == "dittohead.mount"]
            assert len(lines) == 1 and "big.bin" in lines[0].getMessage()
        finally:
            ops.close()


def test_sequential_reads_are_read_ahead(ops: MountOps, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read at the start has the chunks of the next READ_AHEAD bytes read and verified on
    the read-ahead threads, and none beyond."""
    path = f"/{STUDY}/versions/big.bin"
    name = next(n for n, _ in ops.readdir(path) if n.startswith("0001"))
    path += "/" + name
    fh = ops.open(path, os.O_RDONLY)
    h = ops._handles[fh]
    assert h.reader is not None and len(h.reader.chunks) >= 4
    offsets = h.reader.offsets
    monkeypatch.setattr(ops_mod, "READ_AHEAD", offsets[2] + 1 - 4096)  # up to chunk 2
    ops.read(path, 4096, 0, fh)
    ops.close()  # waits for the reads ahead in flight
    with ops.cache._lock:
        cached = set(ops.cache._items)
    chunks = [cid for cid, _ in h.reader.chunks]
    assert set(chunks[:3]) <= cached  # chunk 0 read, 1 and 2 read ahead
    assert not set(chunks[3:]) & cached


def test_many_threads_read_the_right_bytes(filled: Server, ops: MountOps) -> None:
    want = {f"/{STUDY}/current/big.bin": BIG, f"/{STUDY}/current/a/one.txt": b"one, again\n",
            f"/{STUDY}/current/a/b/deep.txt": b"deep\n", f"/{STUDY}/current/empty": b""}
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(30):
            path = rng.choice(sorted(want))
            data = want[path]
            fh = ops.open(path, os.O_RDONLY)
            off = rng.randrange(0, max(1, len(data)))
            size = rng.choice([1, 4096, 131072, 1 << 20])
            got = ops.read(path, size, off, fh)
            ops.release(path, fh)
            if got != data[off : off + size]:
                errors.append(f"{path} at {off}+{size}")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_one_study_at_the_top(filled: Server) -> None:
    with Store.open(str(filled.root)) as store:
        ops = MountOps(store, STUDY)
        try:
            names = [n for n, _ in ops.readdir("/")]
            assert names == [".", "..", "current", "log.jsonl", "submissions", "versions"]
            assert _read_all(ops, "/current/a/b/deep.txt") == b"deep\n"
            log = _read_all(ops, "/log.jsonl")
            assert log.count(b"\n") == 2 and log.isascii()
        finally:
            ops.close()


def test_nodes_kept_are_bounded(ops: MountOps, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops_mod, "NODE_CACHE", 5)
    _walk(ops, "/")
    assert len(ops._nodes) <= 5


def test_a_mount_started_before_the_first_ingest_sees_it(server: Server, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """No index yet: the mount reads a private one built from the store, and switches to the
    real one once an ingest has made it."""
    monkeypatch.setattr(ops_mod, "REFRESH", 0.0)
    index = server.root / "store" / "index.sqlite"
    for p in server.root.glob("store/index.sqlite*"):
        p.unlink()
    with Store.open(str(server.root)) as store:
        ops = MountOps(store)
        try:
            assert [n for n, _ in ops.readdir(f"/{STUDY}/current")] == [".", ".."]
            assert not index.exists()
            src = tmp_path / "src"
            write_file(src / "first.txt", b"first\n")
            server.sync(src)
            server.ingest()
            assert index.exists()
            assert _read_all(ops, f"/{STUDY}/current/first.txt") == b"first\n"
        finally:
            ops.close()


def test_a_folder_read_in_parts_shows_each_entry_once_while_names_are_added(
        server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel reads a long folder in several calls, each going on from the offset the last
    entry it took gave: an ingest adding names between two calls neither repeats nor drops an
    entry of that reading; a listing no longer kept is made again, and the reading goes on."""
    monkeypatch.setattr(ops_mod, "REFRESH", 0.0)
    src = tmp_path / "src"
    for i in range(0, 60, 2):
        write_file(src / "d" / f"f{i:03d}", b"x")
    server.sync(src)
    server.ingest()
    with Store.open(str(server.root)) as store:
        ops = MountOps(store)
        try:
            path = f"/{STUDY}/current/d"
            first = list(itertools.islice(ops.readdir_from(path, 0), 20))
            for i in range(1, 60, 2):  # names sorting before and after where the reading stopped
                write_file(src / "d" / f"f{i:03d}", b"y")
            server.sync(src)
            server.ingest()
            rest = list(ops.readdir_from(path, first[-1][2]))
            names = [n for n, _, _ in first + rest]
            assert names == [".", ".."] + [f"f{i:03d}" for i in range(0, 60, 2)]
            assert [n for n, _ in ops.readdir(path)][2:] == [f"f{i:03d}" for i in range(60)]  # afresh: all

            monkeypatch.setattr(ops_mod, "LISTINGS", 1)
            first = list(itertools.islice(ops.readdir_from(path, 0), 10))
            ops.readdir(f"/{STUDY}/current")  # pushes the listing of d out
            rest = list(ops.readdir_from(path, first[-1][2]))
            assert [n for n, _, _ in first + rest][2:] == [f"f{i:03d}" for i in range(60)]
        finally:
            ops.close()
