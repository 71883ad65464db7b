"""A full disk, on real (small) filesystems: a clear error, nothing lost, and the next run resumes.

The issue: "An interrupted run (Ctrl-C, kill -9, a full disk) is resumed by the next run, which
re-uses the staging folder and re-sends no pack that was complete"; "a crash loses nothing"; no
traceback ever reaches a user (one line ``dittohead: ...`` on stderr, a non-zero exit code).

Each test mounts a tmpfs of a few MiB (tmpfs accepts O_DIRECT on current kernels, so packs go
through ``directio.Writer`` and its write-behind thread, where ENOSPC surfaces late) and fills it
with a filler file. The commands under test run as real ``python -m dittohead`` processes, so
exit codes and stderr are what a user sees; set-up steps run in-process (faster).

(1) The client: the server root's filesystem fills during a sync.
(2) The server: the store's filesystem fills during an ingest: while it copies the upload (the
    daemon keeps only copies of its own), or, with room for those copies, while it stores the
    manifest, before its commit point, or while it publishes the have-segment, after it; for
    uploads from the daemon's own account and from another.

Two bugs were found here and fixed with these tests: an error writing a pack (ENOSPC from the
write-behind thread) was taken for a source file's read error, and the final flush lost the
record of a complete pack; and a full disk made Store.index delete and rebuild a sound index.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import Result
from conftest import Server, describe, parse_submission, raised, write_file

from dittohead import directio, errors

MiB = 1 << 20
KiB = 1 << 10
OUR_UID = os.geteuid() if hasattr(os, "geteuid") else 0
OTHER_UID = 65534  # nobody: an upload from another account

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="mounts a tmpfs (Linux only)"
)

DISK_FULL = re.compile(r"no space left on device|disk (is )?full", re.IGNORECASE)
SUMMARY_BYTES = re.compile(r"([\d.]+) (B|KiB|MiB|GiB) read, ([\d.]+) (B|KiB|MiB|GiB) sent")
UNITS = {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": 1 << 30}

# -- small filesystems ----------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """small_fs(size_mib) -> the mount point of a new tmpfs of that size (unmounted after)."""
    mounted: list[Path] = []

    def mount(size_mib: int) -> Path:
        if shutil.which("mount") is None or shutil.which("umount") is None:
            pytest.skip("needs mount(8) and umount(8)")
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        cp = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            check=False,
        )
        if cp.returncode != 0:
            pytest.skip(
                f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {cp.stderr.strip()}"
            )
        mounted.append(where)
        return where

    try:
        yield mount
    finally:
        for where in reversed(mounted):
            cp = subprocess.run(["umount", str(where)], capture_output=True, check=False)
            if cp.returncode != 0:  # something still holds it open: detach it anyway
                subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(mnt: Path, leave: int) -> Path:
    """A filler file in mnt that leaves about ``leave`` bytes free (0: the disk is full)."""
    path = mnt / "filler"
    remaining = max(0, free_bytes(mnt) - leave)
    block = bytes(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while remaining:
            try:
                remaining -= os.write(fd, block[: min(len(block), remaining)])
            except OSError as e:
                if e.errno != errno.ENOSPC or leave:
                    raise
                break
    finally:
        os.close(fd)
    assert free_bytes(mnt) <= leave + 64 * KiB, (free_bytes(mnt), leave)
    return path


# -- helpers --------------------------------------------------------------------------------


def make_source(top: Path, rng: random.Random, big: list[int], small: int) -> dict[str, bytes]:
    """Random (incompressible, never deduplicated) files: ``big`` sizes plus ``small`` small ones."""
    files: dict[str, bytes] = {}
    for i, size in enumerate(big):
        files[f"raw/recording_{i}.bdf"] = rng.randbytes(size)
    for i in range(small):
        files[f"session {i % 3}/trial_{i:03d}.csv"] = rng.randbytes(rng.randint(1, 40_000))
    for rel, data in files.items():
        write_file(top / rel, data)
    return files


def assert_disk_full_failure(cp: subprocess.CompletedProcess) -> str:
    """Exit 1, one line ``dittohead: ...`` on stderr that says the disk is full; no traceback."""
    assert cp.returncode == errors.EXIT_FAILURE, describe(cp)
    assert "Traceback" not in cp.stderr, describe(cp)
    assert "internal error" not in cp.stderr, describe(cp)
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1, f"not one line:\n{describe(cp)}"
    assert lines[0].startswith("dittohead: "), describe(cp)
    assert DISK_FULL.search(lines[0]), describe(cp)
    return lines[0]


def run_ok(server: Server, *args: object) -> subprocess.CompletedProcess:
    cp = server.proc(*args)
    assert cp.returncode == 0 and "Traceback" not in cp.stderr, describe(cp)
    return cp


def sent_and_read(summary: str) -> tuple[float, float]:
    """(bytes read, bytes sent) from sync's summary line (as rounded there)."""
    m = SUMMARY_BYTES.search(summary)
    assert m, summary
    return float(m[1]) * UNITS[m[2]], float(m[3]) * UNITS[m[4]]


def committed(server: Server) -> list[str]:
    """Submissions committed to the inbox (names without the staging dot)."""
    return [n for n in server.inbox_entries() if not n.startswith(".")]


def staging(server: Server) -> list[str]:
    return [n for n in server.inbox_entries() if n.startswith(".")]


def store_tmp_leftovers(server: Server) -> list[str]:
    tmp = server.root / "store" / "tmp"
    return sorted(os.listdir(tmp)) if tmp.is_dir() else []


def log_names(server: Server) -> list[str]:
    cp = run_ok(server, "log", "--store", server.root, "--study", server.study, "--json")
    return [s["name"] for s in json.loads(cp.stdout)["submissions"]]


def assert_reads_back(server: Server, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        got = server.cat(rel)
        assert got == data, f"{rel}: {len(got)} bytes read back, {len(data)} written"


def assert_fsck_clean(server: Server) -> None:
    cp = server.proc("fsck", "--store", server.root, "--read-data")
    assert cp.returncode == 0, describe(cp)


# -- (1) the client: the server root's filesystem fills during a sync -------------------------


def test_sync_onto_a_full_disk_fails_cleanly_and_the_next_run_resumes(
    small_fs: Callable[[int], Path], tmp_path: Path
) -> None:
    mnt = small_fs(40)  # room for the upload, and for the daemon's copy of it
    server = Server(mnt, state=tmp_path / "state").init()
    src = tmp_path / "src"
    # ~15 MiB: three files of 5 MiB (several chunks each) and small ones; one pack.
    files = make_source(src, random.Random(1), [5 * MiB] * 3, small=8)
    filler = fill(mnt, leave=6 * MiB)

    cp = server.proc(*server.sync_args(src))
    assert_disk_full_failure(cp)
    assert committed(server) == [], server.inbox_entries()
    assert len(staging(server)) == 1, server.inbox_entries()  # kept, for the next run to resume
    staged_as = staging(server)[0][1:]

    filler.unlink()
    cp = run_ok(server, *server.sync_args(src))
    out = cp.stdout.decode()
    name = parse_submission(out)
    assert name == staged_as, f"the next run did not re-use the staging folder .{staged_as}:\n{out}"
    assert committed(server) == [name] and staging(server) == [], server.inbox_entries()
    read, sent = sent_and_read(out)
    assert read >= sum(map(len, files.values())) * 0.99, out
    assert sent >= read * 0.99, out  # no pack was complete when the disk filled: all of it

    cp = run_ok(server, "watch", "--store", server.root, "--once")
    assert f"ingested {server.study}/{name} as #1" in cp.stdout.decode(), describe(cp)
    assert server.inbox_entries() == []
    assert log_names(server) == [name]
    assert_reads_back(server, files)
    assert_fsck_clean(server)


def test_a_complete_pack_is_not_sent_again_after_a_full_disk(
    small_fs: Callable[[int], Path], tmp_path: Path
) -> None:
    """Two packs: the first (16 MiB of chunks) completes, the disk fills during the second.

    The next run must keep the complete pack and send only the rest; and the failed run must not
    leave its partial upload behind, filling the server's disk until this client runs again."""
    mnt = small_fs(72)  # room for the upload, and for the daemon's copy of it
    server = Server(mnt, state=tmp_path / "state").init()
    src = tmp_path / "src"
    files = make_source(src, random.Random(2), [5 * MiB] * 5, small=8)  # ~25 MiB: two packs
    total = sum(map(len, files.values()))
    filler = fill(mnt, leave=22 * MiB)

    cp = server.proc(*server.sync_args(src))
    assert_disk_full_failure(cp)
    assert committed(server) == [], server.inbox_entries()
    [folder] = staging(server)
    left = sorted(os.listdir(server.dropbox("inbox") / folder))
    complete = [n for n in left if n.endswith(".pack")]
    partial = [n for n in left if n.startswith(".tmp-")]
    assert complete, f"no complete pack before the disk filled (test set-up): {left}"
    complete_bytes = sum((server.dropbox("inbox") / folder / n).stat().st_size for n in complete)

    filler.unlink()
    cp = run_ok(server, *server.sync_args(src))
    out = cp.stdout.decode()
    name = parse_submission(out)
    _read, sent = sent_and_read(out)
    problems = []
    if name != folder[1:]:
        problems.append(f"the staging folder {folder} was not re-used ({name})")
    if sent > total - complete_bytes + 1 * MiB:
        problems.append(
            f"the resumed run sent {sent / MiB:.1f} MiB of {total / MiB:.1f} MiB although "
            f"{complete_bytes / MiB:.1f} MiB of complete packs were in staging: {complete}"
        )
    if partial:
        problems.append(f"the failed run left its partial upload on the full disk: {partial}")

    # Whatever happened, nothing is lost.
    run_ok(server, "watch", "--store", server.root, "--once")
    assert log_names(server) == [name]
    assert_reads_back(server, files)
    assert_fsck_clean(server)
    assert not problems, "\n".join(problems)


def test_a_pack_write_error_is_not_blamed_on_a_source_file(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC for one block of an upload, and then space again (another process freed some).

    Deterministic stand-in for a disk that fills and frees during a sync: the first write-behind
    write of an upload's third 2 MiB block fails with ENOSPC. The sync must fail (the pack is
    short a block); it must not report a source file as unreadable and commit a pack whose bytes
    do not match its name, which the server then rejects as the client's fault."""
    src = tmp_path / "src"
    files = make_source(src, random.Random(3), [5 * MiB] * 2, small=3)
    real_write_all = directio._write_all
    calls = {"n": 0}

    def flaky_write_all(fd: int, view: memoryview) -> None:
        if "/.tmp-upload-" in os.readlink(f"/proc/self/fd/{fd}"):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write_all(fd, view)

    monkeypatch.setattr(directio, "_write_all", flaky_write_all)
    result: Result = server.run(*server.sync_args(src))
    monkeypatch.setattr(directio, "_write_all", real_write_all)
    assert raised(result) is None, describe(result)
    assert calls["n"] >= 3, "the upload was not written through directio._write_all"
    ingest = server.run("watch", "--store", server.root, "--once")
    assert result.exit_code == errors.EXIT_FAILURE, (
        f"sync went on after a pack write failed:\n{describe(result)}\n"
        f"then the server said:\n{describe(ingest)}"
    )
    assert DISK_FULL.search(result.stderr), describe(result)
    assert "cannot read" not in result.stderr, describe(result)
    assert committed(server) == [], server.inbox_entries()
    # and the next run sends everything, once
    sync = server.sync(src)
    server.ingest()
    assert server.log() and server.log()[-1]["name"] == sync.submission
    assert_reads_back(server, files)


# -- (2) the server: the store's filesystem fills during an ingest ----------------------------


@pytest.mark.parametrize(
    ("own", "leave", "beyond_copy"),
    [
        pytest.param(False, 2 * MiB, False, id="other-account-2MiB-free"),
        pytest.param(True, 0, False, id="own-full"),
        # With room for the daemon's copy of the upload (which becomes the store's pack): on this
        # kernel, with 32 KiB more the ingest fails before its commit point (storing the
        # manifest), with 64 KiB more after it (the have-segment).
        pytest.param(True, 32 * KiB, True, id="own-copy-and-32KiB-free"),
        pytest.param(True, 64 * KiB, True, id="own-copy-and-64KiB-free"),
        pytest.param(False, 64 * KiB, True, id="other-account-copy-and-64KiB-free"),
    ],
)
def test_ingest_into_a_full_store_fails_cleanly_and_the_next_run_ingests_once(
    small_fs: Callable[[int], Path], tmp_path: Path, own: bool, leave: int, beyond_copy: bool
) -> None:
    mnt = small_fs(64)
    server = Server(mnt, state=tmp_path / "state").init()
    src = tmp_path / "src"
    # A first submission, ingested with room to spare: the store has its index and a log.
    warm = {"warm-up.txt": b"hello\n"}
    write_file(src / "warm-up.txt", warm["warm-up.txt"])
    first = server.sync(src).submission
    server.ingest()
    files = warm | make_source(src, random.Random(4), [5 * MiB] * 3, small=8)
    name = server.sync(src).submission
    assert first and name
    upload = server.dropbox("inbox") / name
    packs = sorted(upload.glob("*.pack"))
    assert packs, sorted(os.listdir(upload))
    if not own:  # from another account
        for p in packs:
            os.chown(p, OTHER_UID, -1)
    inodes = {p.name: p.stat().st_ino for p in packs}
    records = server.root / "store" / "studies" / server.study  # the study log: a record an object

    def study_log() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in records.glob("*.rec")}

    log_before = study_log()
    upload_bytes = sum(p.stat().st_size for p in upload.iterdir())
    filler = fill(mnt, leave + (upload_bytes if beyond_copy else 0))

    cp = server.proc("watch", "--store", server.root, "--once")
    failed_line = None
    if beyond_copy and cp.returncode == 0:
        pass  # what is left to write after the copy is small: it may simply fit
    else:
        failed_line = assert_disk_full_failure(cp)
    box = server.dropbox
    assert sorted(os.listdir(box("failed"))) == [], "a full disk is not the client's fault"
    assert store_tmp_leftovers(server) == []
    if failed_line is not None:
        if not beyond_copy:  # the copy could not be made: before the commit point
            assert study_log() == log_before, "the log gained a record"
            assert not (box("receipts") / name).exists()
        # Past the commit point the log may hold the record (invariant 2: the rest is redone);
        # either way the submission is not lost: still waiting, in the inbox or processing/.
        now = study_log()
        assert {k: now.get(k) for k in log_before} == log_before, "the log's committed part changed"
        assert name in os.listdir(box("inbox")) + os.listdir(box("processing"))

    filler.unlink()
    cp = run_ok(server, "watch", "--store", server.root, "--once")
    out = cp.stdout.decode()
    if failed_line is not None:
        assert f"ingested {server.study}/{name} as #2" in out, describe(cp)
    assert log_names(server) == [first, name]  # exactly once
    assert os.listdir(box("processing")) == [] and os.listdir(box("inbox")) == []
    assert sorted(os.listdir(box("done"))) == sorted([first, name])
    assert (box("receipts") / name).exists()
    assert store_tmp_leftovers(server) == []
    # The store's packs are the daemon's copies, never an uploaded file itself.
    for pname, ino in inodes.items():
        stored = server.root / "store" / "packs" / pname[:2] / pname
        assert stored.exists() and stored.stat().st_ino != ino, f"{pname}: not stored, or the upload itself"
    assert_reads_back(server, files)
    assert_fsck_clean(server)
    cp = run_ok(server, "watch", "--store", server.root, "--once")
    assert log_names(server) == [first, name]


def test_passes_stopped_by_a_full_disk_do_not_count_against_the_submission(
    small_fs: Callable[[int], Path], tmp_path: Path
) -> None:
    """More passes on a full disk than a submission has attempts (3): each stops with one line,
    leaves nothing of its copies behind, and the submission is ingested once the disk has room;
    only an attempt the daemon dies in counts."""
    mnt = small_fs(64)
    server = Server(mnt, state=tmp_path / "state").init()
    src = tmp_path / "src"
    files = make_source(src, random.Random(5), [5 * MiB] * 3, small=4)
    name = server.sync(src).submission
    assert name
    filler = fill(mnt, 2 * MiB)
    for _ in range(4):
        assert_disk_full_failure(server.proc("watch", "--store", server.root, "--once"))
        folder = server.dropbox("processing") / name
        assert sorted(os.listdir(folder)) == ["STATE"], sorted(os.listdir(folder))
        assert json.loads((folder / "STATE").read_text())["attempts"] == 0
    assert os.listdir(server.dropbox("failed")) == []
    filler.unlink()
    cp = run_ok(server, "watch", "--store", server.root, "--once")
    assert f"ingested {server.study}/{name} as #1" in cp.stdout.decode(), describe(cp)
    assert_reads_back(server, files)
    assert_fsck_clean(server)


def test_reading_a_full_store_works_and_keeps_its_index(
    small_fs: Callable[[int], Path], tmp_path: Path
) -> None:
    """A study runner's reads (log, versions, cat) on a full disk: each works, or fails with a
    clear one-line error; none throws the store's index away as if it were damaged."""
    mnt = small_fs(16)
    server = Server(mnt, state=tmp_path / "state").init()
    src = tmp_path / "src"
    files = make_source(src, random.Random(5), [1 * MiB], small=3)
    server.sync(src)
    server.ingest()
    index = server.root / "store" / "index.sqlite"
    inode = index.stat().st_ino
    fill(mnt, 0)

    outcomes = []
    for args in (
        ("log", "--store", server.root, "--study", server.study, "--json"),
        ("versions", "--store", server.root, "--study", server.study, "raw/recording_0.bdf"),
        ("cat", "--store", server.root, "--study", server.study, "raw/recording_0.bdf"),
    ):
        cp = server.proc(*args)
        outcomes.append(f"{args[0]}: exit {cp.returncode}, stderr {cp.stderr!r}")
        if cp.returncode == 0:
            if args[0] == "cat":
                assert cp.stdout == files["raw/recording_0.bdf"]
        else:
            assert_disk_full_failure(cp)
    assert index.exists() and index.stat().st_ino == inode, "\n".join(
        ["the index was deleted or replaced:", *outcomes]
    )
