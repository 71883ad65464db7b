"""Damage in the store is never blamed on a client.

A chunk of a store pack is damaged (one byte flipped, as a failing disk would), then a collector
with fresh state syncs a file that holds that chunk: the client skips the chunk (the study's
have-segments say the server holds it), so the ingest must read the stored copy to check the
file's hash, and that copy fails its id. The submission is then **held back**, not rejected: it
stays in processing/ (never failed/), the store does not change, ``watch --once`` exits 1 with an
error line that names the damage in the store, the chunk, the pack and ``fsck --read-data``, and
once the damage is repaired the next run ingests it. Submissions that do not depend on it are
ingested in the same run; a later one of the same study that lists one of its paths waits
behind it, so that the path's history keeps the order of arrival.

Real files through the real command line (``watch`` as a real process, so its stderr is what
an admin sees); no mocks.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import STUDY, Server, describe, store_snapshot, write_file

from dittohead import errors
from dittohead import format as fmt
from dittohead import pack as pk
from dittohead.chunking import Chunker

OTHER = "t"
MiB = 1 << 20


def big(seed: int) -> bytes:
    """Random bytes the chunker cuts into two or more chunks (a file whose hash ingest checks
    by reading its chunks back)."""
    data = random.Random(seed).randbytes(3 * MiB)
    assert len(list(Chunker().cut_bytes(data))) >= 2
    return data


DATA = big(1)
FIRST_CHUNK = next(iter(Chunker().cut_bytes(DATA))).id


def client(srv: Server, name: str) -> Server:
    """Another collector (fresh client state) syncing into srv's server root."""
    c = Server(srv.base, study=srv.study, state=srv.base / f"client-{name}")
    assert c.root == srv.root
    return c


def find_chunk(root: Path, cid: bytes) -> tuple[Path, pk.PackEntry]:
    """The store pack that holds chunk ``cid``, read from the packs themselves."""
    for p in sorted((root / "store" / "packs").rglob("*" + fmt.PACK_SUFFIX)):
        with open(p, "rb") as f:
            for e in pk.read_entries(f, what=str(p)):
                if e.id == cid:
                    return p, e
    raise AssertionError(f"chunk {cid.hex()} is in no store pack")


def flip(path: Path, offset: int) -> None:
    """Invert one byte of a (read-only) store file; a second flip puts it back."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    os.chmod(path, mode | stat.S_IWUSR)
    try:
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ 0xFF]))
    finally:
        os.chmod(path, mode)


@contextmanager
def damaged(root: Path, cid: bytes) -> Iterator[tuple[Path, pk.PackEntry]]:
    """Chunk ``cid`` damaged in its store pack inside the block, repaired after it."""
    pack_path, entry = find_chunk(root, cid)
    where = entry.offset + entry.length // 2
    flip(pack_path, where)
    try:
        yield pack_path, entry
    finally:
        flip(pack_path, where)


def watch(srv: Server, expect: int):
    cp = srv.proc("watch", "--store", srv.root, "--once")
    assert cp.returncode == expect and "Traceback" not in cp.stderr, describe(cp)
    return cp


def stored(srv: Server) -> dict[str, tuple]:
    """packs/, manifests/ and studies/ of the store, byte for byte."""
    return {k: v for k, v in store_snapshot(srv.root).items()
            if k.split(os.sep)[0] in ("packs", "manifests", "studies")}


def assert_held(srv: Server, cp, name: str, pack_path: Path, study: str = STUDY) -> None:
    """Held back, not rejected: in processing/, not in failed/, no receipt; one error line that
    blames the store, names chunk and pack, and points at fsck --read-data."""
    assert name in os.listdir(srv.dropbox("processing", study)), describe(cp)
    assert os.listdir(srv.dropbox("failed", study)) == [], "store damage is not the client's fault"
    assert not (srv.dropbox("receipts", study) / name).exists()
    line = next((ln for ln in cp.stderr.splitlines() if name in ln), None)
    assert line is not None, describe(cp)
    assert not re.search(r"^rejected ", cp.stderr, re.MULTILINE), describe(cp)
    assert re.search(r"damage in the store", line), line
    assert FIRST_CHUNK.hex() in line, line
    assert pack_path.name[: -len(fmt.PACK_SUFFIX)] in line, line
    assert "dittohead fsck --read-data" in line, line


def test_store_damage_holds_the_submission_back_until_repaired(tmp_path: Path) -> None:
    srv = Server(tmp_path, state=tmp_path / "state").init([STUDY])
    write_file(tmp_path / "src1" / "a.bin", DATA)
    srv.sync(tmp_path / "src1")
    srv.ingest()

    # A second collector, fresh state: an intact copy of the file at another path, and a new
    # file. It skips every chunk of the copy (the study holds them).
    c2 = client(srv, "2")
    write_file(tmp_path / "src2" / "copy.bin", DATA)
    write_file(tmp_path / "src2" / "notes.txt", b"new notes\n")
    name = c2.sync(tmp_path / "src2").submission
    assert name is not None

    with damaged(srv.root, FIRST_CHUNK) as (pack_path, _):
        before = stored(srv)
        for _ in range(2):  # held again by the next run, not rejected on a retry
            cp = watch(srv, errors.EXIT_FAILURE)
            assert_held(srv, cp, name, pack_path)
            assert stored(srv) == before, "a held-back submission changed the store"
            assert [s["seq"] for s in srv.log()] == [1]

    # Repaired (the original byte written back): the next run ingests it, exactly once.
    cp = watch(srv, 0)
    assert os.listdir(srv.dropbox("processing")) == [] and os.listdir(srv.dropbox("failed")) == []
    assert (srv.dropbox("receipts") / name).exists(), describe(cp)
    assert [s["seq"] for s in srv.log()] == [1, 2]
    assert srv.cat("copy.bin") == DATA
    assert srv.cat("a.bin") == DATA
    assert srv.cat("notes.txt") == b"new notes\n"
    fsck = srv.fsck("--read-data")
    assert fsck.exit_code == 0, describe(fsck)


def test_what_does_not_depend_on_the_damage_is_ingested_in_the_same_run(tmp_path: Path) -> None:
    srv = Server(tmp_path, state=tmp_path / "state").init([STUDY, OTHER])
    write_file(tmp_path / "src1" / "a.bin", DATA)
    srv.sync(tmp_path / "src1")
    srv.ingest()

    # In order of arrival: held (needs the damaged chunk); unrelated, same study; another
    # study; same study and a path the held one lists (must wait behind it); and one that lists
    # only a path of the waiting one (must wait behind that).
    write_file(tmp_path / "src2" / "copy.bin", DATA)
    held = client(srv, "2").sync(tmp_path / "src2").submission
    write_file(tmp_path / "src3" / "other.txt", b"unrelated\n")
    later = client(srv, "3").sync(tmp_path / "src3").submission
    write_file(tmp_path / "src4" / "t.txt", b"another study\n")
    other_study = client(srv, "4").sync(tmp_path / "src4", study=OTHER).submission
    write_file(tmp_path / "src5" / "copy.bin", b"a newer copy.bin\n")
    write_file(tmp_path / "src5" / "extra.txt", b"extra 1\n")
    behind = client(srv, "5").sync(tmp_path / "src5").submission
    write_file(tmp_path / "src6" / "extra.txt", b"extra 2\n")
    behind2 = client(srv, "6").sync(tmp_path / "src6").submission
    assert None not in (held, later, other_study, behind, behind2)
    assert held is not None and behind is not None and behind2 is not None

    with damaged(srv.root, FIRST_CHUNK) as (pack_path, _):
        cp = watch(srv, errors.EXIT_FAILURE)
        assert_held(srv, cp, held, pack_path)
        # Waits where it is, in the inbox, keeping its place (and the client sees it pending);
        # the held one's upload stays there too, until it is ingested.
        assert srv.inbox_entries() == sorted([held, behind, behind2]), describe(cp)
        assert any(behind in ln and held in ln for ln in cp.stderr.splitlines()), describe(cp)
        assert any(behind2 in ln and behind in ln for ln in cp.stderr.splitlines()), describe(cp)
        assert not re.search(r"^rejected ", cp.stderr, re.MULTILINE), describe(cp)
        # The others: ingested normally, in this run.
        assert (srv.dropbox("receipts") / str(later)).exists(), describe(cp)
        assert (srv.dropbox("receipts", OTHER) / str(other_study)).exists(), describe(cp)
        assert srv.cat("other.txt") == b"unrelated\n"
        assert srv.cat("t.txt", study=OTHER) == b"another study\n"
        assert os.listdir(srv.dropbox("failed")) == [] and os.listdir(srv.dropbox("failed", OTHER)) == []

    cp = watch(srv, 0)
    assert os.listdir(srv.dropbox("processing")) == [] and srv.inbox_entries() == [], describe(cp)
    assert [s["name"] for s in srv.log()][-3:] == [held, behind, behind2]
    # Each path's history in the order of arrival.
    assert [v["version"] for v in srv.versions("copy.bin")] == [1, 2]
    assert srv.cat("copy.bin", version=1) == DATA
    assert srv.cat("copy.bin") == b"a newer copy.bin\n"
    assert srv.cat("extra.txt", version=1) == b"extra 1\n"
    assert srv.cat("extra.txt") == b"extra 2\n"


def test_a_submission_carrying_a_good_copy_of_the_damaged_chunk_is_ingested(tmp_path: Path) -> None:
    """Its own copy is what ingest verifies the file with (a carried chunk is never read from
    the store). The store keeps its damaged copy (fsck still reports it): ingest does not
    rewrite a chunk the index already places; reads go on failing until it is repaired."""
    srv = Server(tmp_path, state=tmp_path / "state").init([STUDY])
    write_file(tmp_path / "src1" / "a.bin", DATA)
    srv.sync(tmp_path / "src1")
    srv.ingest()

    # A submission that carries every chunk of the file: made against an empty root of its own
    # (no have-segments to skip by), then moved into this root's inbox.
    elsewhere = Server(tmp_path / "elsewhere", state=tmp_path / "client-x").init([STUDY])
    write_file(tmp_path / "src2" / "copy.bin", DATA)
    name = elsewhere.sync(tmp_path / "src2").submission
    assert name is not None
    shutil.move(elsewhere.dropbox("inbox") / name, srv.dropbox("inbox") / name)

    with damaged(srv.root, FIRST_CHUNK):
        cp = watch(srv, 0)
        assert (srv.dropbox("receipts") / name).exists(), describe(cp)
        assert os.listdir(srv.dropbox("failed")) == [] and os.listdir(srv.dropbox("processing")) == []
    assert srv.cat("copy.bin") == DATA
