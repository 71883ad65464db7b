"""Adoption: the daemon's copy of an uploaded pack becomes a store pack as it is (hard-linked),
instead of its chunks being written into a new pack.

The ingest never keeps a file the uploader made: it copies each one into a folder of its own
(``intake.take``) and verifies the copy. A copy is adopted only when nothing could tell it from a
pack the server would write: every chunk is new, the bytes are canonical, it lies on the store's
filesystem and its name is its id. Every other upload has its new chunks written into server
packs. These tests drive both paths through the real command line and check what a user relies
on: the versions read back byte for byte, fsck finds nothing, no pack is named for other bytes,
and no uploaded file is ever linked into the store, where its uploader could still change it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
from pathlib import Path

import pytest
from conftest import (
    Server,
    describe,
    invoke,
    raised,
    skip_unless_storage_reads_counted,
    storage_reads_of,
    store_snapshot,
    write_file,
)

from dittohead import format as fmt
from dittohead import pack
from dittohead.errors import FormatError
from dittohead.hashing import blake3

NOBODY = 65534


# -- helpers -----------------------------------------------------------------------------------


def _study(src: Path) -> dict[str, bytes]:
    """A small study: files that span several chunks, one of a single chunk, a tiny one."""
    files = {
        "big.bin": os.urandom(3 * 1024 * 1024),
        "dir/mid.bin": os.urandom(700 * 1024),
        "small.txt": b"hello adoption\n",
    }
    for rel, data in files.items():
        write_file(src / rel, data)
    return files


def _uploads(server: Server, name: str, part: str = "inbox") -> list[Path]:
    return sorted(server.dropbox(part).joinpath(name).glob("*" + fmt.PACK_SUFFIX))


def _store_packs(root: Path) -> dict[str, Path]:
    """Every pack file in the store, by file name."""
    return {p.name: p for p in sorted((root / "store" / "packs").rglob("*" + fmt.PACK_SUFFIX))}


def _store_path(root: Path, pack_name: str) -> Path:
    return root / "store" / "packs" / pack_name[:2] / pack_name


def _pack_id(path: Path) -> str:
    return blake3(path.read_bytes()).hexdigest()


def _assert_packs_named_by_id(root: Path) -> None:
    packs = _store_packs(root)
    assert packs, "the store holds no packs"
    for name, path in packs.items():
        assert name == _pack_id(path) + fmt.PACK_SUFFIX, f"{path}: named for other bytes"


def _assert_reads_back(server: Server, files: dict[str, bytes], version: int | None = None) -> None:
    for rel, data in files.items():
        got = server.cat(rel, version)
        assert got == data, f"{rel}: {len(got)} bytes read back, {len(data)} stored"


def _assert_fsck_clean(root: Path) -> None:
    res = invoke("fsck", "--store", root, "--json", "--read-data")
    assert res.exit_code == 0, (res.exit_code, res.output, res.exception)
    doc = json.loads(res.stdout)
    assert doc["ok"] and doc["findings"] == [], doc


def _assert_store_sound(server: Server, files: dict[str, bytes]) -> None:
    """Every file reads back, every store pack is named by its id, fsck --read-data is clean and
    nothing under the root is linked twice."""
    _assert_reads_back(server, files)
    _assert_packs_named_by_id(server.root)
    _assert_fsck_clean(server.root)
    _assert_no_links_left(server.root)


def _assert_no_links_left(root: Path) -> None:
    """Nothing under the server root is linked twice (no upload shares an inode with the store)."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            assert st.st_nlink == 1, f"{os.path.join(dirpath, f)}: link count {st.st_nlink}"


def _reason(server: Server, name: str) -> str:
    return (server.dropbox("failed") / name / fmt.REASON_NAME).read_text()


def _crash_after_link(server: Server, name: str) -> dict[str, int]:
    """What an ingest that died between adopting its copies (``link_durable``) and the study-log
    commit leaves: the upload still in the inbox, the daemon's folder in processing/ with its
    copies, each copy also linked into the store. Returns the store packs' inodes by name."""
    folder = server.dropbox("processing") / name
    folder.mkdir(mode=0o700, parents=True)
    inodes = {}
    for upload in _uploads(server, name):
        copy = folder / upload.name
        shutil.copyfile(upload, copy)
        os.chmod(copy, 0o600)
        dest = _store_path(server.root, upload.name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(copy, dest)
        inodes[upload.name] = dest.stat().st_ino
    assert inodes
    return inodes


def _synced(server: Server, tmp_path: Path) -> tuple[str, dict[str, bytes]]:
    files = _study(tmp_path / "src")
    name = server.sync(tmp_path / "src").submission
    assert name is not None
    assert _uploads(server, name), "sync uploaded no pack"
    return name, files


def _non_canonical_trailer(entries: list[pack.PackEntry]) -> bytes:
    """The trailer PackWriter would write, but every integer as a msgpack uint64 (0xcf):
    valid msgpack that decodes to the same entries, just not the minimal encoding."""
    n = len(entries)
    out = bytearray([0x90 | n]) if n < 16 else bytearray(b"\xdc" + struct.pack(">H", n))
    for e in entries:
        out += b"\x94\xc4" + bytes([len(e.id)]) + e.id
        for v in (e.offset, e.length, e.codec):
            out += b"\xcf" + struct.pack(">Q", v)
    return bytes(out)


# -- 1. the plain case: adopted --------------------------------------------------------------


def test_canonical_upload_is_adopted_as_the_daemons_own_copy(server: Server, tmp_path: Path) -> None:
    name, files = _synced(server, tmp_path)
    uploads = {p.name: (p.read_bytes(), p.stat().st_ino) for p in _uploads(server, name)}

    server.ingest()

    packs = _store_packs(server.root)
    assert set(packs) == set(uploads), "the store's packs are the uploaded packs, by name"
    for pname, path in packs.items():
        data, ino = uploads[pname]
        st = path.stat()
        assert path.read_bytes() == data
        assert st.st_ino != ino, f"{pname}: the uploaded file itself was linked into the store"
        assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        assert st.st_uid == os.geteuid()
        assert st.st_nlink == 1, "the copy's own link must be gone once the ingest is done"
    assert server.inbox_entries() == [], "the uploader's folder is removed once it is ingested"
    done = server.dropbox("done") / name
    assert sorted(os.listdir(done)) == [fmt.MANIFEST_NAME], "done/ keeps the manifest only"
    assert len(server.log()) == 1
    _assert_store_sound(server, files)


def test_ingest_leaves_the_uploads_out_of_the_page_cache(server: Server, tmp_path: Path) -> None:
    """The ingest reads each upload once and drops it from the cache after: the packs it adopted
    into the store are not left filling the server's memory."""
    skip_unless_storage_reads_counted(tmp_path)
    name, files = _synced(server, tmp_path)
    os.sync()
    server.ingest()
    packs = list(_store_packs(server.root).values())
    assert packs and (server.dropbox("done") / name).is_dir()
    os.sync()
    assert storage_reads_of(packs) >= sum(p.stat().st_size for p in packs)
    _assert_reads_back(server, files)


def test_second_submission_adopts_only_new_chunks(server: Server, tmp_path: Path) -> None:
    """An edit uploads a pack of the new chunks only: adopted too; both versions read back."""
    _name, files = _synced(server, tmp_path)
    server.ingest()
    first = set(_store_packs(server.root))

    edited = dict(files)
    edited["big.bin"] = files["big.bin"] + os.urandom(300 * 1024)
    edited["new.bin"] = os.urandom(400 * 1024)
    for rel in ("big.bin", "new.bin"):
        write_file(tmp_path / "src" / rel, edited[rel])
    name2 = server.sync(tmp_path / "src").submission
    assert name2 is not None
    uploads = {p.name: p.stat().st_ino for p in _uploads(server, name2)}
    assert uploads

    server.ingest()

    packs = _store_packs(server.root)
    assert set(packs) == first | set(uploads)
    for pname, ino in uploads.items():
        assert packs[pname].stat().st_ino != ino, f"{pname}: the uploaded file itself was linked"
    assert server.cat("big.bin", 1) == files["big.bin"]
    _assert_reads_back(server, edited)
    _assert_packs_named_by_id(server.root)
    _assert_fsck_clean(server.root)
    _assert_no_links_left(server.root)


def test_pack_whose_chunks_an_earlier_pack_carried_is_not_adopted(
    server: Server, tmp_path: Path
) -> None:
    """A second pack of the submission that repeats chunks of the first adds nothing to the store."""
    name, files = _synced(server, tmp_path)
    (first,) = _uploads(server, name)
    with open(first, "rb") as f:
        entries = pack.read_entries(f, what="upload")
        chunks = [(e.id, pack.read_chunk(f, e, what="upload")) for e in entries[:2]]
    extra_tmp = first.parent / "extra.tmp"
    with open(extra_tmp, "wb") as f:
        w = pack.PackWriter(f)
        for cid, data in chunks:
            w.add(cid, data)
        pid, _ = w.finish()
    extra = first.parent / (pid.hex() + fmt.PACK_SUFFIX)
    os.rename(extra_tmp, extra)
    # Pack order is the upload order (mtime): the repeat comes second.
    st = first.stat()
    os.utime(extra, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    server.ingest()

    packs = _store_packs(server.root)
    assert set(packs) == {first.name}, "the repeating pack must not become a store pack"
    _assert_reads_back(server, files)
    _assert_fsck_clean(server.root)
    _assert_no_links_left(server.root)


# -- 2. uploaded by another account: the store's pack is the daemon's own -----------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another account needs root")
def test_pack_owned_by_another_account_is_stored_as_the_daemons_own(server: Server, tmp_path: Path) -> None:
    name, files = _synced(server, tmp_path)
    uploads = _uploads(server, name)
    inodes = set()
    for p in uploads:
        os.chown(p, NOBODY, NOBODY)
        inodes.add(p.stat().st_ino)

    server.ingest()

    packs = _store_packs(server.root)
    assert packs
    for path in packs.values():
        st = path.stat()
        assert st.st_uid == os.geteuid(), f"{path}: owned by uid {st.st_uid}"
        assert st.st_ino not in inodes, f"{path}: the other account's file was adopted"
        assert stat.S_IMODE(st.st_mode) == 0o600
    _assert_store_sound(server, files)


# -- 3. held open for writing: what the writer does later cannot reach the store ---------------


def test_pack_held_open_for_writing_is_not_the_stores(server: Server, tmp_path: Path) -> None:
    name, files = _synced(server, tmp_path)
    uploads = _uploads(server, name)
    held = [open(p, "r+b") for p in uploads]  # noqa: SIM115  (closed below)
    try:
        inodes = {os.fstat(f.fileno()).st_ino for f in held}
        cp = server.proc("watch", "--store", server.root, "--once")
        assert cp.returncode == 0, describe(cp)
        packs = _store_packs(server.root)
        assert packs
        for path in packs.values():
            assert path.stat().st_ino not in inodes, f"{path}: adopted while open for writing"
            assert path.stat().st_nlink == 1
        # What the writer does now cannot reach the store.
        for f in held:
            f.seek(fmt.PACK_HEADER.size)
            f.write(b"\0" * 64)
            f.flush()
    finally:
        for f in held:
            f.close()
    _assert_reads_back(server, files)
    _assert_packs_named_by_id(server.root)
    _assert_fsck_clean(server.root)


# -- 4. valid but not canonical: copied --------------------------------------------------------


@pytest.mark.parametrize("named", ["own-id", "canonical-id"])
def test_non_canonical_pack_is_copied(server: Server, tmp_path: Path, named: str) -> None:
    """A pack with the same chunks but a trailer of non-minimal integers: named by the hash of
    its own bytes, or by the id its canonical form would have (the name the ingest computes)."""
    name, files = _synced(server, tmp_path)
    (upload,) = _uploads(server, name)
    data = upload.read_bytes()
    with open(upload, "rb") as f:
        entries = pack.read_entries(f, what="upload")
        assert pack.is_canonical(f, entries), "what sync uploads is canonical"
    end = entries[-1].offset + entries[-1].length
    trailer = _non_canonical_trailer(entries)
    footer = fmt.PACK_FOOTER.pack(len(trailer), blake3(trailer).digest(), fmt.PACK_MAGIC)
    new = data[:end] + trailer + footer
    assert new != data
    st = upload.stat()
    upload.unlink()
    own = blake3(new).hexdigest() + fmt.PACK_SUFFIX
    odd = upload.with_name(own if named == "own-id" else upload.name)
    write_file(odd, new)
    os.utime(odd, ns=(st.st_atime_ns, st.st_mtime_ns))
    odd_ino = odd.stat().st_ino
    with open(odd, "rb") as f:
        try:
            same = pack.read_entries(f, what="odd")
        except FormatError as e:  # the strict decoder may refuse non-minimal integers
            accepted, why = False, str(e)
        else:
            accepted, why = True, ""
            assert same == entries
            assert not pack.is_canonical(f, same)

    if not accepted:
        server.ingest(expect=1)
        assert _store_packs(server.root) == {}
        assert why.split(":")[-1].strip() in _reason(server, name)
        return

    server.ingest()
    packs = _store_packs(server.root)
    assert own not in packs, "a non-canonical upload must not become a store pack"
    for path in packs.values():
        assert path.read_bytes() != new
        assert path.stat().st_ino != odd_ino
    # What the server writes for the same chunks is the canonical pack: the original bytes.
    assert set(packs) == {upload.name}
    assert packs[upload.name].read_bytes() == data
    _assert_store_sound(server, files)


# -- 5. a crash between linking the pack into the store and the commit -------------------------


def test_resume_after_crash_between_link_and_commit(server: Server, tmp_path: Path) -> None:
    name, files = _synced(server, tmp_path)
    inodes = _crash_after_link(server, name)

    server.ingest()

    log = server.log()
    assert [r["name"] for r in log] == [name], log
    assert os.listdir(server.dropbox("failed")) == []
    packs = _store_packs(server.root)
    assert set(packs) == set(inodes)
    for pname, path in packs.items():
        assert path.stat().st_ino == inodes[pname], "a pack the store holds is kept, not replaced"
    _assert_store_sound(server, files)
    # Ingested once: nothing left to do, and the log did not grow.
    server.ingest()
    assert len(server.log()) == 1


@pytest.mark.parametrize("edit", ["appended", "repeated-chunk"])
def test_resume_after_crash_when_file_hash_needs_a_second_read(
    server: Server, tmp_path: Path, edit: str
) -> None:
    """The same crash, for a submission whose file hashes cannot all be computed as the chunks
    stream past (a file whose first chunk the study holds already, or a chunk a file repeats):
    the ingest reads those chunks a second time, from its fresh copy."""
    src = tmp_path / "src"
    base = os.urandom(3 * 1024 * 1024)
    write_file(src / "big.bin", base)
    assert server.sync(src).submission
    server.ingest()
    if edit == "appended":
        files = {"big.bin": base + os.urandom(200 * 1024)}
    else:  # 9 MiB of zeros: chunks of the maximum size, all alike, then the rest
        files = {"zeros.bin": bytes(9 * 1024 * 1024)}
    for rel, data in files.items():
        write_file(src / rel, data)
    name = server.sync(src).submission
    assert name is not None
    _crash_after_link(server, name)

    res = server.run("watch", "--store", server.root, "--once")

    failed = server.dropbox("failed") / name
    assert res.exit_code == 0 and not failed.exists(), describe(res) + (
        f"\nREASON: {_reason(server, name)}" if failed.exists() else ""
    )
    assert len(server.log()) == 2
    _assert_store_sound(server, files)


def test_pack_linked_to_another_path_is_rejected(server: Server, tmp_path: Path) -> None:
    """An upload with a second link elsewhere (where its uploader could reach it by another
    path) is refused outright, though the copy would be safe: a submission is files of its own."""
    name, _files = _synced(server, tmp_path)
    victim = _uploads(server, name)[0]
    os.link(victim, tmp_path / "other-link")
    before = store_snapshot(server.root)

    server.ingest(expect=1)

    assert "a hard link" in _reason(server, name)
    assert server.log() == []
    assert store_snapshot(server.root) == before, "a rejected submission must not change the store"


# -- 6. a pack named for other bytes ------------------------------------------------------------


def test_pack_named_for_other_bytes_is_copied_not_adopted(server: Server, tmp_path: Path) -> None:
    name, files = _synced(server, tmp_path)
    (upload,) = _uploads(server, name)
    real = upload.name
    data = upload.read_bytes()
    wrong = blake3(os.urandom(32)).hexdigest() + fmt.PACK_SUFFIX
    renamed = upload.with_name(wrong)
    os.rename(upload, renamed)
    ino = renamed.stat().st_ino

    res = server.run("watch", "--store", server.root, "--once")

    packs = _store_packs(server.root)
    assert wrong not in packs, "no store pack may be named for other bytes"
    if res.exit_code != 0:  # rejected: then with a reason, and nothing stored
        assert (server.dropbox("failed") / name / fmt.REASON_NAME).is_file(), describe(res)
        assert packs == {}
        return
    assert raised(res) is None, describe(res)
    # Verified chunk by chunk and copied: the server's pack for these chunks is the very same
    # bytes, so it goes by the real id, but it is a file of the server's own.
    assert set(packs) == {real}
    assert packs[real].read_bytes() == data
    assert packs[real].stat().st_ino != ino
    _assert_store_sound(server, files)
