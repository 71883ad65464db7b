"""fsck finds every kind of damage, says what it affects, and repairs only what is derived.

One small store is built once through the public command line (two submissions; a 1.5 MiB file
of three chunks whose second version shares two of them; an empty file; a non-ASCII name). Each
test works on its own copy of it (``shutil.copytree``) and damages the copy deterministically:

* single-bit flips in the stored packs: every byte of each pack's header, trailer and footer,
  the first and last byte of every chunk and ~200 evenly spaced bytes of the data, bit
  ``offset % 8``; plus a hypothesis test choosing offset and bit. ``fsck --read-data`` must exit
  3, name the pack (header/trailer/footer) or the chunk (data), and list in ``affects`` exactly
  the (study, path, version)s whose bytes depend on what was hit. ``cat`` of an affected version
  then exits 1 with one line on stderr and writes only a prefix of the true content.
* without ``--read-data`` a data flip goes unseen but a trailer flip does not;
* a missing pack, a missing or damaged manifest, a damaged study log, a torn last record;
* a deleted, emptied, truncated, garbage or disagreeing index.sqlite: "repaired", exit 0, and
  log, versions and cat work afterwards.

Which (path, version) uses which chunk is computed here from the files' contents with the
chunker, independently of the store's index.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import Result
from conftest import invoke, ok, skip_unless_storage_reads_counted, storage_reads, storage_reads_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dittohead import format as fmt
from dittohead import pack as packfmt
from dittohead import studylog
from dittohead.chunking import Chunker

STUDY = "s"
KiB = 1024
EXIT_DAMAGE = 3
DATA_SAMPLES = 200

Key = tuple[str, str, int]  # (study, path, version)


# The state dir is isolated by conftest's autouse fixture; invoke and ok come from there.


def fsck(root: Path, *extra: str) -> tuple[int, dict]:
    res = invoke("fsck", "--store", root, "--json", *extra)
    assert res.exit_code in (0, EXIT_DAMAGE), (res.exit_code, res.output, res.exception)
    return res.exit_code, json.loads(res.stdout)


def cat(root: Path, path: str, n: int) -> Result:
    return invoke("cat", "--store", root, "--study", STUDY, path, "--version", n)


def flip_bit(path: Path, offset: int, bit: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, offset)
        assert len(b) == 1
        os.pwrite(fd, bytes([b[0] ^ (1 << bit)]), offset)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- the base store


@dataclass
class PackInfo:
    rel: str  # path under ROOT
    hexid: str
    size: int
    entries: list[packfmt.PackEntry]

    @property
    def data_end(self) -> int:
        return self.entries[-1].offset + self.entries[-1].length if self.entries else fmt.PACK_HEADER.size

    def chunk_at(self, offset: int) -> packfmt.PackEntry | None:
        for e in self.entries:
            if e.offset <= offset < e.offset + e.length:
                return e
        return None

    def offsets(self) -> list[int]:
        """Every byte outside the data; each chunk's first and last byte; ~200 spaced in the data."""
        if self.size <= 64 * KiB:
            return list(range(self.size))
        hsize = fmt.PACK_HEADER.size
        out = set(range(hsize)) | set(range(self.data_end, self.size))
        for e in self.entries:
            out |= {e.offset, e.offset + e.length - 1}
        span = self.data_end - hsize
        out |= {hsize + i * span // DATA_SAMPLES for i in range(DATA_SAMPLES)}
        return sorted(out)


@dataclass
class Base:
    root: Path
    contents: dict[tuple[str, int], bytes]  # (path, version) -> bytes
    packs: list[PackInfo]
    users: dict[bytes, set[Key]] = field(default_factory=dict)  # chunk id -> who needs it
    manifests: list[str] = field(default_factory=list)  # manifest hex id by seq

    def pack_users(self, p: PackInfo) -> set[Key]:
        return set().union(*(self.users.get(e.id, set()) for e in p.entries))

    def copy(self, dest: Path) -> Path:
        shutil.copytree(self.root, dest, symlinks=True)
        return dest


NON_ASCII = "\u00fcn\u00efc\u00f6d\u00e9/\u30c7\u30fc\u30bf \u00e9t\u00e9.csv"


def _write(src: Path, rel: str, data: bytes, mtime_ns: int) -> None:
    p = src / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    os.utime(p, ns=(mtime_ns, mtime_ns))  # well in the past: never "racy" for sync


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    top = tmp_path_factory.mktemp("fsck-base")
    root, src = top / "root", top / "src"
    big1 = random.Random(18).randbytes(1536 * KiB)
    big2 = big1[:-100] + bytes(100)  # a local edit at the end: shares its first chunks with v1
    first = {"big.bin": big1, "a.txt": b"hello\n", "d/empty": b"", NON_ASCII: "\u00e4\u00f6\u00fc\n".encode() * 50}
    second = {"big.bin": big2, "a.txt": b"hello again\n", "d/new.csv": b"1,2,3\n" * 1000}
    now = time.time_ns()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DITTOHEAD_STATE_DIR", str(top / "client-state"))
        mp.delenv("DITTOHEAD_STORE", raising=False)
        ok("init", "--store", root)
        ok("study", "add", STUDY, "--store", root)
        for rel, data in first.items():
            _write(src, rel, data, now - 3600 * 10**9)
        ok("sync", src, "--study", STUDY, "--to", root, "--site", "x")
        ok("watch", "--store", root, "--once")
        for rel, data in second.items():
            _write(src, rel, data, now - 1800 * 10**9)
        ok("sync", src, "--study", STUDY, "--to", root, "--site", "x")
        ok("watch", "--store", root, "--once")
        subs = json.loads(ok("log", "--store", root, "--study", STUDY, "--json").stdout)["submissions"]
    assert len(subs) == 2

    contents: dict[tuple[str, int], bytes] = {}
    for rel, data in first.items():
        contents[(rel, 1)] = data
    contents[("big.bin", 2)] = big2
    contents[("a.txt", 2)] = second["a.txt"]
    contents[("d/new.csv", 1)] = second["d/new.csv"]

    users: dict[bytes, set[Key]] = {}
    chunker = Chunker()
    for (rel, n), data in contents.items():
        for c in chunker.cut_bytes(data):
            users.setdefault(c.id, set()).add((STUDY, rel, n))
    assert len(list(Chunker().cut_bytes(big1))) >= 3, "the big file must have several chunks"
    shared = [cid for cid, who in users.items() if len(who) > 1]
    assert shared, "big.bin v1 and v2 must share chunks"

    packs = []
    for p in sorted((root / "store" / "packs").rglob("*.pack")):
        with open(p, "rb") as f:
            entries = packfmt.read_entries(f, what=str(p))
        packs.append(PackInfo(str(p.relative_to(root)), p.name[: -len(".pack")], p.stat().st_size, entries))
    assert len(packs) == 2
    stored = {e.id for p in packs for e in p.entries}
    assert stored == set(users), "every chunk stored once, and only the chunks of the files"

    b = Base(root, contents, packs, users, [s["manifest"] for s in subs])
    code, doc = fsck(root, "--read-data")
    assert code == 0 and doc["ok"] and doc["findings"] == [], doc
    return b


@pytest.fixture
def scratch(tmp_path: Path):
    """A folder for work copies: on a tmpfs when there is one (fsck's SQLite rebuilds fsync, and
    the flip sweeps run fsck about a thousand times), else in tmp_path."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        with tempfile.TemporaryDirectory(dir=shm, prefix="dittohead-fsck-") as d:
            yield Path(d)
    else:
        yield tmp_path


# -------------------------------------------------------------------------------- assertions


def affects_of(doc: dict) -> set[Key]:
    return {(a["study"], a["path"], a["version"]) for f in doc["findings"] for a in f["affects"]}


def damaged(doc: dict, kind: str) -> set[str]:
    return {f["object"] for f in doc["findings"] if f["severity"] == "damage" and f["kind"] == kind}


def check_cat_after_damage(b: Base, work: Path, key: Key, *, must_fail: bool) -> None:
    _, path, n = key
    true = b.contents[(path, n)]
    res = cat(work, path, n)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    out = res.stdout_bytes
    if res.exit_code == 0 and not must_fail:
        assert out == true, key
        return
    assert res.exit_code == 1, (key, res.exit_code, res.stderr)
    assert true.startswith(out) and len(out) < len(true), f"cat {key} wrote wrong bytes"
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dittohead:") and "Traceback" not in res.stderr, res.stderr


def check_flip(b: Base, work: Path, p: PackInfo, offset: int, bit: int, *, with_cat: bool = True) -> str | None:
    """Flip one bit of pack p in the copy at work; None if fsck and cat behave, else why not."""
    flip_bit(work / p.rel, offset, bit)
    code, doc = fsck(work, "--read-data")
    where = f"pack {p.hexid[:12]} offset {offset} bit {bit}"
    if code != EXIT_DAMAGE or doc["ok"]:
        return f"{where}: fsck exit {code}, findings {doc['findings']}"
    hit = p.chunk_at(offset)
    if hit is not None:  # chunk data: the chunk is named, the pack's trailer is still sound
        if damaged(doc, "chunk") != {hit.id.hex()} or damaged(doc, "pack"):
            return f"{where}: expected damage to chunk {hit.id.hex()[:12]} only, got {doc['findings']}"
        want = b.users[hit.id]
    else:  # header, trailer or footer: the pack is named, every chunk in it is unreadable
        if p.hexid not in damaged(doc, "pack"):
            return f"{where}: the pack is not named: {doc['findings']}"
        want = b.pack_users(p)
    got = affects_of(doc)
    if got != want:
        return f"{where}: affects {sorted(got)}, expected {sorted(want)}"
    if with_cat:
        for key in sorted(want):
            check_cat_after_damage(b, work, key, must_fail=hit is not None)
    return None


# ------------------------------------------------------------------------- single-bit flips


@pytest.mark.parametrize("which", [0, 1])
def test_every_sampled_bit_flip_in_a_pack_is_found(base: Base, scratch: Path, which: int) -> None:
    p = base.packs[which]
    problems = []
    offsets = p.offsets()
    assert len(offsets) >= DATA_SAMPLES
    for i, off in enumerate(offsets):
        # A fresh copy per flip (fsck may rebuild the index; the in-process CLI leaves SQLite
        # connections for the garbage collector, so files are never restored in place).
        work = base.copy(scratch / f"w{i}")
        # cat after every header/trailer/footer flip, and after every third data flip
        why = check_flip(base, work, p, off, off % 8, with_cat=(i % 3 == 0) or p.chunk_at(off) is None)
        if why:
            problems.append(why)
        shutil.rmtree(work)
    assert not problems, f"{len(problems)} of {len(offsets)} flips not handled:\n" + "\n".join(problems[:20])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_any_bit_flip_in_a_pack_is_found(base: Base, scratch: Path, data) -> None:
    p = data.draw(st.sampled_from(base.packs), label="pack")
    offset = data.draw(st.integers(0, p.size - 1), label="offset")
    bit = data.draw(st.integers(0, 7), label="bit")
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        work = base.copy(Path(tmp) / "root")
        why = check_flip(base, work, p, offset, bit)
    assert why is None, why


def test_without_read_data_a_data_flip_is_unseen_but_a_trailer_flip_is_found(base: Base, tmp_path: Path) -> None:
    p = base.packs[0]
    e = p.entries[len(p.entries) // 2]
    work = base.copy(tmp_path / "data")
    flip_bit(work / p.rel, e.offset + e.length // 2, 3)
    code, doc = fsck(work)
    assert code == 0 and doc["ok"] and not doc["read_data"], doc
    code, doc = fsck(work, "--read-data")
    assert code == EXIT_DAMAGE and damaged(doc, "chunk") == {e.id.hex()}, doc

    for off in (p.data_end, p.data_end + 5, p.size - fmt.PACK_FOOTER.size, p.size - 1):
        work = base.copy(tmp_path / f"trailer{off}")
        flip_bit(work / p.rel, off, off % 8)
        code, doc = fsck(work)
        assert code == EXIT_DAMAGE and damaged(doc, "pack") == {p.hexid}, (off, doc)
        assert affects_of(doc) == base.pack_users(p)


# ----------------------------------------------------------------- missing and damaged objects


@pytest.mark.parametrize("which", [0, 1])
def test_missing_pack(base: Base, tmp_path: Path, which: int) -> None:
    p = base.packs[which]
    work = base.copy(tmp_path / "root")
    os.unlink(work / p.rel)
    code, doc = fsck(work, "--read-data")
    assert code == EXIT_DAMAGE, doc
    assert damaged(doc, "chunk") == {e.id.hex() for e in p.entries}, doc
    assert affects_of(doc) == base.pack_users(p)
    for key in sorted(base.pack_users(p)):
        check_cat_after_damage(base, work, key, must_fail=True)
    # The versions that need nothing from the missing pack still read back.
    for (path, n), data in base.contents.items():
        if (STUDY, path, n) not in base.pack_users(p):
            res = cat(work, path, n)
            assert res.exit_code == 0 and res.stdout_bytes == data, (path, n, res.stderr)


def _manifest_path(root: Path, hexid: str) -> Path:
    return root / "store" / "manifests" / hexid[:2] / hexid


@pytest.mark.parametrize("seq", [1, 2])
@pytest.mark.parametrize("how", ["missing", "flipped", "truncated"])
def test_missing_or_damaged_manifest(base: Base, tmp_path: Path, seq: int, how: str) -> None:
    mid = base.manifests[seq - 1]
    work = base.copy(tmp_path / "root")
    mp = _manifest_path(work, mid)
    if how == "missing":
        os.unlink(mp)
    elif how == "flipped":
        flip_bit(mp, mp.stat().st_size // 2, 5)
    else:
        os.truncate(mp, mp.stat().st_size - 1)
    code, doc = fsck(work, "--read-data")
    assert code == EXIT_DAMAGE, doc
    assert damaged(doc, "manifest") == {mid}, doc
    # Without --read-data too: manifests are always checked.
    assert fsck(work)[0] == EXIT_DAMAGE


def _record_path(root: Path, seq: int) -> Path:
    """The object of record ``seq`` of the study's log (studies/NAME/SEQ.rec)."""
    return root / "store" / studylog.record_key(STUDY, seq)


def _index_submissions(root: Path) -> int:
    db = sqlite3.connect(f"file:{root / 'store' / 'index.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM submissions WHERE study=?", (STUDY,)).fetchone()[0]
    finally:
        db.close()


def test_flip_in_a_log_record_is_damage(base: Base, scratch: Path) -> None:
    """Every byte of record 1's object (record 2 follows it): its header, length, payload and
    checksum. A record object is created whole, so nothing in one is ever a torn tail."""
    size = _record_path(base.root, 1).stat().st_size
    problems = []
    for off in range(size):
        work = base.copy(scratch / f"w{off}")
        flip_bit(_record_path(work, 1), off, off % 8)
        code, doc = fsck(work, "--read-data")
        if code != EXIT_DAMAGE or damaged(doc, "log") != {STUDY} or _index_submissions(work) != 2:
            problems.append((off, code, doc["findings"]))
        if off == 20:  # a reader answers from the index, as it was; fsck says what is wrong
            res = invoke("log", "--store", work, "--study", STUDY, "--json")
            assert res.exit_code == 0 and len(json.loads(res.stdout)["submissions"]) == 2, res.output
        shutil.rmtree(work)
    assert not problems, problems[:5]


def test_an_interrupted_commit_leaves_nothing_that_counts(base: Base, tmp_path: Path) -> None:
    """An ingest that crashed while writing its record (before its commit point) leaves at most
    a temporary file beside the records, never a record: fsck is clean, and reads are as before."""
    work = base.copy(tmp_path / "w")
    rec3 = studylog.encode_one(studylog.LogRecord(3, "never-committed", bytes(32), 1, ()))
    (_record_path(work, 1).parent / ".tmp-0123456789abcdef").write_bytes(rec3[:-5])
    code, doc = fsck(work, "--read-data")
    assert code == 0 and doc["findings"] == [], doc
    subs = json.loads(ok("log", "--store", work, "--study", STUDY, "--json").stdout)["submissions"]
    assert [s["seq"] for s in subs] == [1, 2]


@pytest.mark.parametrize("how", ["cut", "emptied", "deleted", "first-deleted"])
def test_a_lost_or_cut_committed_record_is_damage(base: Base, tmp_path: Path, how: str) -> None:
    """A committed record cut short, emptied or gone, while the index, the receipts and the
    have-segments know it was committed (or a later record is there): lost history. Damage, and
    the index is not "repaired" into forgetting the submission. Reads fail cleanly meanwhile."""
    work = base.copy(tmp_path / "w")
    path = _record_path(work, 1 if how == "first-deleted" else 2)
    if how == "cut":
        os.truncate(path, path.stat().st_size // 2)
    elif how == "emptied":
        os.truncate(path, 0)
    else:
        path.unlink()
    code, doc = fsck(work, "--read-data")
    assert code == EXIT_DAMAGE and damaged(doc, "log") == {STUDY}, doc
    assert _index_submissions(work) == 2
    for p in ("big.bin", "d/empty", NON_ASCII):
        res = cat(work, p, 1)
        if res.exit_code == 0:
            assert res.stdout_bytes == base.contents[(p, 1)]
        else:
            assert res.exit_code == 1 and res.stdout_bytes == b"" and len(res.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------- the index


def _damage_index(root: Path, how: str) -> None:
    ip = root / "store" / "index.sqlite"
    if how == "deleted":
        os.unlink(ip)
    elif how == "empty":
        ip.write_bytes(b"")
    elif how == "garbage":
        ip.write_bytes(b"this is not a database " * 200)
    elif how == "truncated":
        data = ip.read_bytes()
        ip.write_bytes(data[: len(data) // 2])
    elif how == "magic-flipped":
        flip_bit(ip, 0, 1)
    elif how == "disagreeing":
        db = sqlite3.connect(ip)
        db.execute("DELETE FROM versions WHERE path=CAST('a.txt' AS BLOB) AND n=2")
        db.execute("UPDATE submissions SET site='forged' WHERE seq=1")
        db.commit()
        db.close()
    else:
        raise AssertionError(how)


def _check_reads(b: Base, work: Path) -> None:
    subs = json.loads(ok("log", "--store", work, "--study", STUDY, "--json").stdout)["submissions"]
    assert [s["seq"] for s in subs] == [1, 2] and all(s["site"] == "x" for s in subs), subs
    paths = {p for p, _ in b.contents}
    for path in paths:
        vs = json.loads(ok("versions", "--store", work, "--study", STUDY, path, "--json").stdout)["versions"]
        want = sorted(n for p, n in b.contents if p == path)
        assert [v["version"] for v in vs] == want, (path, vs)
    for (path, n), data in b.contents.items():
        assert ok("cat", "--store", work, "--study", STUDY, path, "--version", n).stdout_bytes == data, (path, n)


@pytest.mark.parametrize("how", ["deleted", "empty", "garbage", "truncated", "magic-flipped", "disagreeing"])
def test_damaged_index_is_repaired_by_fsck(base: Base, tmp_path: Path, how: str) -> None:
    work = base.copy(tmp_path / "root")
    _damage_index(work, how)
    code, doc = fsck(work, "--read-data")
    assert code == 0 and doc["ok"], doc
    assert [(f["severity"], f["kind"]) for f in doc["findings"]] == [("repaired", "index")], doc
    _check_reads(base, work)
    code, doc = fsck(work, "--read-data")
    assert code == 0 and doc["findings"] == [], doc


_TAMPER = {
    "none": [],
    "row-deleted": ["DELETE FROM versions WHERE path=CAST('a.txt' AS BLOB) AND n=2"],
    "value-changed": ["UPDATE submissions SET site='forged' WHERE seq=1"],
    "type-changed": ["UPDATE entries SET n='two' WHERE n=2"],
    "row-added": ["INSERT INTO studies VALUES ('other', 1)"],
    "chunk-length": ["UPDATE chunks SET length=length+1 WHERE id=(SELECT min(id) FROM chunks)"],
    "chunk-pack": ["UPDATE chunks SET pack=x'00'"],  # not compared: which pack holds a chunk
    "reshaped": ["ALTER TABLE study_chunks RENAME TO old",
                 ("CREATE TABLE study_chunks (study TEXT, id BLOB, seq INTEGER, extra INTEGER, "
                  "PRIMARY KEY (study, id)) WITHOUT ROWID"),
                 "INSERT INTO study_chunks SELECT *, 0 FROM old", "DROP TABLE old"],
}


@pytest.mark.parametrize("how", sorted(_TAMPER))
def test_index_comparison_names_the_tables_a_row_by_row_one_would(base: Base, tmp_path: Path, how: str) -> None:
    """fsck compares the live index with its own inside SQLite (Index.differs_from); it must name
    exactly the tables in which comparing every row (Index.dump) finds a difference."""
    from dittohead.store.index import Index

    work = base.copy(tmp_path / "root")
    ip = work / "store" / "index.sqlite"
    src, dst = sqlite3.connect(ip), sqlite3.connect(tmp_path / "want.sqlite")
    src.backup(dst)  # with whatever the WAL holds
    src.close()
    dst.close()
    db = sqlite3.connect(ip)
    for sql in _TAMPER[how]:
        db.execute(sql)
    db.commit()
    db.close()
    want, live = Index(str(tmp_path / "want.sqlite")), Index(str(ip))
    try:
        have = live.dump()
        expect = sorted(k for k, rows in want.dump().items() if have[k] != rows)
        assert want.differs_from(str(ip)) == expect
    finally:
        want.close()
        live.close()
    assert (expect == []) == (how in ("none", "chunk-pack")), expect


@pytest.mark.parametrize("block", [2 * 4096, 4 << 20])
def test_pack_data_is_hashed_piece_by_piece(base: Base, tmp_path: Path, monkeypatch, block: int) -> None:
    """hash_pack_data hashes straight from the read blocks: chunks longer than a block, and blocks
    holding the end of one chunk and the start of the next, hash whole; a pack cut short (after
    its trailer was read) fails exactly the chunks it cuts, and counts the bytes it did read."""
    from dittohead import directio
    from dittohead.store import fsck as fsck_mod

    monkeypatch.setattr(directio, "BLOCK", block)
    p = max(base.packs, key=lambda p: len(p.entries))
    assert len(p.entries) >= 3
    if block < 4 << 20:
        assert any(e.length > block for e in p.entries)
        assert any(e.length % block for e in p.entries[:-1])  # a block spans two chunks
    entries = [(e.id, e.offset, e.length) for e in p.entries]
    path = base.root / p.rel
    assert fsck_mod.hash_pack_data(str(path), entries) == (p.data_end - fmt.PACK_HEADER.size, [], "")
    cut = tmp_path / "cut.pack"
    at = (fmt.PACK_HEADER.size + p.data_end) // 2
    cut.write_bytes(path.read_bytes()[:at])
    got, bad, error = fsck_mod.hash_pack_data(str(cut), entries)
    assert (got, error) == (at - fmt.PACK_HEADER.size, "")
    assert bad == [(e.id, e.offset) for e in p.entries if e.offset + e.length > at]
    assert fsck_mod.hash_pack_data(str(tmp_path / "gone.pack"), entries) == (
        0, [], "cannot read: No such file or directory")


def test_read_data_reads_the_disks_copy_and_leaves_the_cache_as_it_found_it(
    base: Base, tmp_path: Path
) -> None:
    """With every pack in the page cache, fsck --read-data still reads them from the disk (bit
    rot under a cached copy is found), and afterwards they are not left in the cache."""
    skip_unless_storage_reads_counted(tmp_path)
    work = base.copy(tmp_path / "root")
    packs = [work / p.rel for p in base.packs]
    data = sum(p.data_end - fmt.PACK_HEADER.size for p in base.packs)
    os.sync()  # clean pages: the only kind the cache can drop
    storage_reads_of(packs)
    assert storage_reads_of(packs) == 0  # all cached now
    before = storage_reads()
    code, doc = fsck(work, "--read-data")
    assert code == 0 and doc["findings"] == [], doc
    assert storage_reads() - before >= data
    assert storage_reads_of(packs) >= data  # not left cached


def test_a_deleted_index_is_read_around_and_rebuilt_by_the_writer(base: Base, tmp_path: Path) -> None:
    """Readers answer without the index (from one of their own, outside the store) and leave
    store/ as it is; fsck, the one writer while it holds the lock, rebuilds it."""
    work = base.copy(tmp_path / "root")
    _damage_index(work, "deleted")
    _check_reads(base, work)
    assert not (work / "store" / "index.sqlite").exists()
    code, doc = fsck(work, "--read-data")
    assert code == 0 and [(f["severity"], f["kind"]) for f in doc["findings"]] == [("repaired", "index")], doc
    code, doc = fsck(work, "--read-data")
    assert code == 0 and doc["findings"] == [], doc


@pytest.mark.parametrize("how", ["empty", "garbage", "truncated", "magic-flipped"])
def test_corrupt_index_is_rebuilt_on_first_use(base: Base, tmp_path: Path, how: str) -> None:
    """The index is derived: a reader reads around an unreadable one (see above)."""
    work = base.copy(tmp_path / "root")
    _damage_index(work, how)
    res = invoke("versions", "--store", work, "--study", STUDY, "a.txt", "--json")
    assert res.exit_code == 0 and "internal error" not in res.stderr, res.stderr
    _check_reads(base, work)


def test_fsck_does_not_make_intact_versions_unreadable(base: Base, tmp_path: Path) -> None:
    p = base.packs[0]
    work = base.copy(tmp_path / "root")
    flip_bit(work / p.rel, p.size - fmt.PACK_FOOTER.size - 3, 0)  # in the trailer: data intact
    key = min(base.pack_users(p))
    before = cat(work, key[1], key[2])
    assert before.exit_code == 0 and before.stdout_bytes == base.contents[key[1:]]  # reads verify
    code, doc = fsck(work, "--read-data")
    assert code == EXIT_DAMAGE and damaged(doc, "pack") == {p.hexid}
    after = cat(work, key[1], key[2])
    assert after.exit_code == 0 and after.stdout_bytes == base.contents[key[1:]], after.stderr


# ------------------------------------------------------------- a store past the parallel size

MiB = 1024 * KiB


def test_large_store_every_flipped_chunk_is_found(tmp_path: Path) -> None:
    """More data than fsck hashes in its own process (64 MiB): several store packs, read by worker
    processes. One bit flipped in a chunk of every pack at once: every one of those chunks is
    named, with the versions made of it; then a trailer flip names its pack."""
    from dittohead.store import fsck as fsck_mod

    root, src = tmp_path / "root", tmp_path / "src"
    files = {f"run{i}.bin": random.Random(100 + i).randbytes(23 * MiB) for i in range(3)}
    assert sum(map(len, files.values())) > getattr(fsck_mod, "PARALLEL_MIN_BYTES", 64 * MiB)
    ok("init", "--store", root)
    ok("study", "add", STUDY, "--store", root)
    for rel, data in files.items():
        _write(src, rel, data, time.time_ns() - 3600 * 10**9)
    ok("sync", src, "--study", STUDY, "--to", root, "--site", "x")
    ok("watch", "--store", root, "--once")
    users: dict[bytes, set[Key]] = {}
    for rel, data in files.items():
        for c in Chunker().cut_bytes(data):
            users.setdefault(c.id, set()).add((STUDY, rel, 1))
    packs = []
    for p in sorted((root / "store" / "packs").rglob("*.pack")):
        with open(p, "rb") as f:
            packs.append((p, packfmt.read_entries(f, what=str(p))))
    assert len(packs) >= 3

    code, doc = fsck(root, "--read-data")
    assert code == 0 and doc["findings"] == [] and doc["stats"]["bytes_read"] >= sum(map(len, files.values()))

    flipped = {}
    for i, (p, entries) in enumerate(packs):
        e = entries[(i * 7) % len(entries)]
        off = e.offset + (e.length * (i + 1)) // (len(packs) + 1)
        flip_bit(p, off, i % 8)
        flipped[e.id] = (p, off, i % 8)
    code, doc = fsck(root, "--read-data")
    assert code == EXIT_DAMAGE, doc
    assert damaged(doc, "chunk") == {cid.hex() for cid in flipped}, doc["findings"]
    assert affects_of(doc) == set().union(*(users[cid] for cid in flipped))
    for p, off, bit in flipped.values():
        flip_bit(p, off, bit)  # back
    code, doc = fsck(root, "--read-data")
    assert code == 0 and doc["findings"] == [], doc

    p, entries = packs[-1]
    flip_bit(p, p.stat().st_size - 1, 2)  # the footer's magic
    code, doc = fsck(root, "--read-data")
    assert code == EXIT_DAMAGE and damaged(doc, "pack") == {p.name[: -len(".pack")]}, doc
    assert affects_of(doc) == set().union(*(users[e.id] for e in entries))


def test_a_stored_manifest_over_the_limit_is_damage_not_an_internal_error(
        base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Library code raises dittohead's own errors: a manifest in the store larger than the
    limit it is read under is damage that fsck reports (exit 3)."""
    work = base.copy(tmp_path / "root")
    monkeypatch.setattr(fmt, "STORED_MANIFEST_MAX_SIZE", 16)
    code, doc = fsck(work)
    assert code == EXIT_DAMAGE, doc
    kinds = {(f["severity"], f["kind"]) for f in doc["findings"]}
    assert ("damage", "manifest") in kinds and all("larger than the limit" in f["message"]
                                                   for f in doc["findings"] if f["kind"] == "manifest"), doc
