"""The export into a destination that refuses names: a real one, the way a Windows (SMB) share does.

``tests/refusing_fs.py`` mounts a FUSE passthrough of a tmp folder that refuses, with EINVAL, to
make any name Windows would not hold (``\\:*?"<>|`` and control characters, a trailing dot or
space, CON/NUL/COM1..., over 255 bytes, not UTF-8) and does not find such names either. A study
holding such names is exported into it; each name the share refuses must be written as its
``display.portable_name`` (only that name, not the ones the share holds, like ``Müller.csv`` or
``100%.txt``), listed once in DEST/escaped-names.tsv, and said once in the export's output;
every file of the view must be there, with its bytes and its hard links. Where the export goes
to a POSIX folder, which holds every name, nothing is escaped.

The view a refusing export is compared with is the export of the same study into a plain folder,
which ``test_a_posix_folder_gets_every_name_exactly`` checks against the source itself.

Names longer than 255 bytes (a study may hold up to 1,024) are not in these studies: no Linux
source folder can hold one. Names that grow past 255 bytes when escaped are (``LONG_REFUSED``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import refusing_fs
from click.testing import Result
from conftest import Server, describe, raised
from refusing_fs import windows_refuses

from dittohead.display import escape, portable_name, unescape
from dittohead.paths import from_bytes, to_bytes

NAMES_FILE = b"escaped-names.tsv"
SITE = "lab-1"

# names a Windows share holds: written exactly
ACCEPTED = [
    b"plain.txt",
    "Müller.csv".encode(),
    "日本語/データ.bin".encode(),
    b"100%.txt",
    b"CONSOLE.txt",  # not a device name
    b"x.CON",  # the device name is the part before the first dot
    b"sub/dir/deep.txt",
    b"README",
]
LONG_REFUSED = [
    b"a" * 254 + b":",  # 255 bytes; escaped, 257: cut to 255 with '~' and 16 hex digits
    b":" * 100,  # 300 bytes escaped
]
# names it refuses: written as their portable_name
REFUSED = [
    b"a:b.txt",
    b"what?.csv",
    b'q"<>|*.dat',
    b"back\\slash.txt",
    b"tab\there",
    b"ctl\x01\x1f.bin",
    b"trailing.",  # and its version files end with '.' too (EXT is '.')
    b"trailing ",
    b"CON",
    b"nul.txt",
    b"Com1.log",
    b"LPT9",
    b"CON.tar.gz",
    b"AUX .c",
    b"bad\xff\xfe.bin",  # not UTF-8
    b"caf\xe9.txt",  # Latin-1
    b"odd.ext?",  # its version files' EXT ('.ext?') is refused too
    b"dir:x/inner.txt",  # a refused folder, a name it holds inside
    b"dir:x/in?ner.txt",  # a refused name inside a refused folder
    b"aux/ok-inside.txt",
    b"nested./deeper./f.txt",
    *LONG_REFUSED,
]
# files that are folders in the second submission of test_a_share_gets_...
BECOME_FOLDERS = [b"da:ta", b"plainfile"]


# -- helpers ----------------------------------------------------------------------------------


def contents(path: bytes, round_: int = 1) -> bytes:
    return b"round %d of %s\n" % (round_, path) * (1 + len(path) % 5)


def make_source(src: Path, files: dict[bytes, bytes]) -> None:
    top = os.fsencode(src)
    for rel, data in files.items():
        p = os.path.join(top, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)


def tree(top: Path) -> tuple[dict[bytes, bytes], set[bytes], dict[bytes, int]]:
    """(files: relative bytes path -> bytes, folders, files -> st_ino) under ``top``."""
    root = os.fsencode(top)
    files: dict[bytes, bytes] = {}
    folders: set[bytes] = set()
    inodes: dict[bytes, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            folders.add(os.path.relpath(os.path.join(dirpath, d), root))
        for n in filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            with open(p, "rb") as f:
                files[rel] = f.read()
            inodes[rel] = os.lstat(p).st_ino
    return files, folders, inodes


def link_groups(inodes: dict[bytes, int], rename=lambda p: p) -> set[frozenset[bytes]]:
    """The sets of paths that are one file (hard links), each path passed through ``rename``."""
    by_ino: dict[int, set[bytes]] = {}
    for path, ino in inodes.items():
        by_ino.setdefault(ino, set()).add(rename(path))
    return {frozenset(g) for g in by_ino.values()}


def written_as(view_path: bytes) -> bytes:
    """Where a refusing share gets ``view_path``: each name it refuses as its portable_name."""
    return b"/".join(to_bytes(portable_name(from_bytes(n))) if windows_refuses(n) else n
                     for n in view_path.split(b"/"))


def expected_lines(view_paths: set[bytes]) -> set[tuple[bytes, bytes]]:
    """(as written, in the view) for every path, file or folder, whose own name is refused."""
    out = set()
    for p in view_paths:
        parts = p.split(b"/")
        for i, name in enumerate(parts, start=1):
            if windows_refuses(name):
                prefix = b"/".join(parts[:i])
                out.add((written_as(prefix), prefix))
    return out


def names_file_lines(dest: Path) -> list[tuple[bytes, bytes]]:
    """escaped-names.tsv's lines as (as written, in the view), unescaped to bytes."""
    text = (dest / os.fsdecode(NAMES_FILE)).read_text(encoding="utf-8")
    lines = text.split("\n")
    assert lines[0].startswith("#"), lines[:3]
    assert lines[-1] == "", "the last line ends with a newline"
    out = []
    for line in lines[:-1]:
        if line.startswith("#"):
            continue
        written, view = line.split("\t")
        assert escape(unescape(written)) == written and escape(unescape(view)) == view, line
        out.append((unescape(written), unescape(view)))
    return out


def export(server: Server, dest: Path) -> Result:
    result = server.run("export", "--store", server.root, "--study", server.study, dest)
    assert result.exit_code == 0 and raised(result) is None, describe(result)
    return result


def notes(result: Result) -> list[str]:
    """The lines of the export's output that mention escaped-names.tsv (the summary line, on
    stdout, says it: docs/view.md, "Names a destination refuses")."""
    return [line for line in (result.stdout + result.stderr).splitlines()
            if os.fsdecode(NAMES_FILE) in line]


def snapshot(top: Path) -> dict[bytes, tuple[int, int, int, int]]:
    """Every entry under top (folders and files): (inode, mode, size, mtime)."""
    root = os.fsencode(top)
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            snap[os.path.relpath(p, root)] = (st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns)
    return snap


def sync_and_ingest(server: Server, src: Path) -> None:
    server.sync(src, site=SITE)
    server.ingest()


# -- the refusing filesystem ------------------------------------------------------------------


@pytest.fixture(scope="session")
def _fuse() -> None:
    """Skip where FUSE cannot be mounted; unmount what killed runs left mounted."""
    reason = refusing_fs.unavailable()
    if reason:
        pytest.skip(reason)
    refusing_fs.sweep_stale()


@pytest.fixture
def share(request: pytest.FixtureRequest, tmp_path: Path, _fuse: None) -> Iterator[Path]:
    """A mounted folder that refuses names the way a Windows share does (empty), with EINVAL,
    or with the errno named by an indirect parameter."""
    refuse = getattr(request, "param", "EINVAL")
    with refusing_fs.mounted(tmp_path / "share-backing", tmp_path / "share", refuse) as mountpoint:
        yield mountpoint


@pytest.mark.parametrize("name, refused", [
    (b"ok.txt", False), ("Müller.csv".encode(), False), (b"100%.txt", False),
    (b"CONSOLE", False), (b"x.CON", False), (b".hidden", False), (b"a" * 255, False),
    (b"a:b", True), (b"a\\b", True), (b"a*b", True), (b"a?b", True), (b'a"b', True),
    (b"a<b", True), (b"a>b", True), (b"a|b", True), (b"a\x00b", True), (b"a\x1fb", True),
    (b"a\tb", True), (b"dot.", True), (b"space ", True), (b"con", True), (b"CON.txt", True),
    (b"Nul.tar.gz", True), (b"COM9", True), (b"lpt1.x", True), (b"AUX .c", True),
    (b"a" * 256, True), (b"\xff", True), (b"\xed\xa0\x80", True),  # a surrogate, WTF-8
])
def test_the_windows_rule(name: bytes, refused: bool) -> None:
    assert windows_refuses(name) is refused


@pytest.mark.parametrize("name", ACCEPTED + REFUSED + [b"CON.", b"con ", b"%41.txt"],
                         ids=lambda n: escape(n)[:40])
def test_every_portable_name_is_one_the_share_holds(name: bytes) -> None:
    for part in name.split(b"/"):
        escaped = portable_name(from_bytes(part))
        assert escaped.isascii() and not windows_refuses(escaped.encode()), (part, escaped)
        if windows_refuses(part):
            assert escaped != from_bytes(part)
        if not windows_refuses(part) and part.isascii() and b"%" not in part:
            assert escaped == part.decode(), "a name every share holds is kept as it is"


def test_the_share_refuses_windows_names_and_passes_the_rest_through(share: Path,
                                                                     tmp_path: Path) -> None:
    backing = tmp_path / "share-backing"
    d = os.open(share, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # a name it refuses, made any way: EINVAL; looked up: not there
        for bad in (b"a:b", b"CON", b"nul.txt", b"dot.", b"x\xff", b"a" * 256):
            with pytest.raises(OSError) as e:
                os.open(bad, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=d)
            assert e.value.errno == errno.EINVAL, bad
            with pytest.raises(OSError) as e:
                os.mkdir(bad, dir_fd=d)
            assert e.value.errno == errno.EINVAL, bad
        assert os.listdir(share) == [] and os.listdir(backing) == []

        # a name it holds: a file written, synced, read back, through descriptors
        fd = os.open(b"ok.txt", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=d)
        os.write(fd, b"hello")
        os.utime(fd, ns=(1_000_000_000, 1_234_567_890_123))
        os.fchmod(fd, 0o444)
        os.fsync(fd)
        st = os.fstat(fd)
        os.close(fd)
        assert (st.st_size, st.st_mode & 0o777, st.st_mtime_ns) == (5, 0o444, 1_234_567_890_123)
        assert (backing / "ok.txt").read_bytes() == b"hello"
        assert os.stat(backing / "ok.txt").st_mtime_ns == 1_234_567_890_123
        fd = os.open("Müller.csv".encode(), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=d)
        os.close(fd)

        # hard links: one inode; a link or rename to a refused name: EINVAL, nothing made
        os.link(b"ok.txt", b"ok2.txt", src_dir_fd=d, dst_dir_fd=d, follow_symlinks=False)
        a, b = (os.stat(n, dir_fd=d, follow_symlinks=False) for n in (b"ok.txt", b"ok2.txt"))
        assert a.st_ino == b.st_ino == os.stat(backing / "ok.txt").st_ino and a.st_nlink == 2
        for call in (lambda: os.link(b"ok.txt", b"k?", src_dir_fd=d, dst_dir_fd=d),
                     lambda: os.rename(b"ok2.txt", b"k ", src_dir_fd=d, dst_dir_fd=d),
                     lambda: os.symlink(b"ok.txt", b"k|", dir_fd=d)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EINVAL
        os.replace(b"ok2.txt", b"ok3.txt", src_dir_fd=d, dst_dir_fd=d)
        os.mkdir(b"sub", dir_fd=d)
        sub = os.open(b"sub", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=d)
        os.link(b"ok.txt", b"in", src_dir_fd=d, dst_dir_fd=sub)
        os.fsync(sub)
        os.close(sub)
        assert sorted(os.listdir(share)) == sorted(["Müller.csv", "ok.txt", "ok3.txt", "sub"])

        # RENAME_NOREPLACE is kept (mfusepy alone drops rename's flags)
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if hasattr(libc, "renameat2"):
            assert libc.renameat2(d, b"ok3.txt", d, b"ok.txt", ctypes.c_uint(1)) == -1
            assert ctypes.get_errno() == errno.EEXIST
            assert (backing / "ok3.txt").exists()

        # a refused name that is in the folder all the same is not seen
        (backing / "a:b").write_bytes(b"x")
        with pytest.raises(FileNotFoundError):
            os.stat(b"a:b", dir_fd=d, follow_symlinks=False)
        assert "a:b" not in os.listdir(share)
    finally:
        os.close(d)


# -- the export -------------------------------------------------------------------------------


def check_against_reference(share: Path, reference: Path, source: dict[bytes, bytes]) -> None:
    """``share`` holds the view that ``reference`` (an export into a POSIX folder) holds, each
    refused name escaped, listed once in escaped-names.tsv, the hard links the same."""
    ref_files, ref_folders, ref_inodes = tree(reference)
    got_files, got_folders, got_inodes = tree(share)
    assert NAMES_FILE in got_files, "no escaped-names.tsv beside current/"
    del got_files[NAMES_FILE], got_inodes[NAMES_FILE]

    # every file there, under its exact name or its portable_name, with its bytes; nothing else
    want = {written_as(p): data for p, data in ref_files.items()}
    missing = sorted(escape(p) for p in want.keys() - got_files.keys())
    extra = sorted(escape(p) for p in got_files.keys() - want.keys())
    assert not missing and not extra, f"missing: {missing}\nnot in the view: {extra}"
    wrong = sorted(escape(p) for p, data in want.items() if got_files[p] != data)
    assert not wrong, f"bytes differ: {wrong}"
    assert got_folders == {written_as(p) for p in ref_folders}
    for path, data in source.items():
        assert got_files[written_as(b"current/" + path)] == data, escape(path)
    # names it holds are written as they are
    for path in ACCEPTED:
        if path in source:
            assert b"current/" + path in got_files, escape(path)
    # the same files are one file (hard links to their version in versions/)
    assert link_groups(got_inodes) == link_groups(ref_inodes, written_as)

    # escaped-names.tsv: one line per refused name (a folder once), no duplicates, each line
    # naming a path of the view and where it was written
    lines = names_file_lines(share)
    assert len(lines) == len(set(lines)), "duplicate lines in escaped-names.tsv"
    for written, view in lines:
        assert view in ref_files or view in ref_folders, escape(view)
        assert written == written_as(view), (escape(written), escape(view))
    assert set(lines) == expected_lines(set(ref_files) | ref_folders)


def test_a_share_gets_each_refused_name_escaped_and_listed(server: Server, share: Path,
                                                           tmp_path: Path) -> None:
    src, reference = tmp_path / "src", tmp_path / "reference"
    source = {p: contents(p) for p in ACCEPTED + REFUSED + BECOME_FOLDERS}
    make_source(src, source)
    sync_and_ingest(server, src)

    first = export(server, share)
    export(server, reference)
    check_against_reference(share, reference, source)
    assert len(notes(first)) == 1, first.output
    assert "left untouched" not in first.stderr, first.stderr

    # new versions (of refused names, in refused folders), a new refused name, files that
    # become folders: current/ entries swapped or moved aside under their escaped names, the
    # new names listed, nothing listed twice
    changed = [b"a:b.txt", b"CON", b"dir:x/in?ner.txt", b"plain.txt", b"trailing."]
    for p in changed:
        source[p] = contents(p, 2)
    source[b"new?.txt"] = contents(b"new?.txt")
    for p in BECOME_FOLDERS:  # current/P becomes a folder, the file moves to current/P~file
        os.unlink(os.path.join(os.fsencode(src), p))
        del source[p]
        source[p + b"/f?.txt"] = contents(p + b"/f?.txt")
    make_source(src, source)
    sync_and_ingest(server, src)
    second = export(server, share)
    export(server, reference)
    check_against_reference(share, reference, source)
    assert len(notes(second)) == 1, second.output  # new names escaped: said again
    assert "left untouched" not in second.stderr, second.stderr
    now, _, _ = tree(share)
    for p in changed:
        assert now[written_as(b"current/" + p)] == contents(p, 2), escape(p)

    # once more, with nothing new: nothing written, nothing listed again
    before, listed = snapshot(share), (share / os.fsdecode(NAMES_FILE)).read_bytes()
    third = export(server, share)
    assert snapshot(share) == before
    assert (share / os.fsdecode(NAMES_FILE)).read_bytes() == listed
    for said in ("export: 0 version files written", " 0 current entries updated", " 0 links added"):
        assert said in third.stdout, third.stdout
    assert len(notes(third)) <= 1 and "left untouched" not in third.stderr, third.output


@pytest.mark.parametrize("share", ["ENOENT"], indirect=True)
def test_a_share_that_refuses_a_name_as_not_found(server: Server, share: Path,
                                                  tmp_path: Path) -> None:
    src, reference = tmp_path / "src", tmp_path / "reference"
    source = {p: contents(p) for p in [b"plain.txt", b"CON", b"a:b.txt", b"dir:x/in?ner.txt"]}
    make_source(src, source)
    sync_and_ingest(server, src)
    result = export(server, share)
    export(server, reference)
    check_against_reference(share, reference, source)
    assert len(notes(result)) == 1, result.output


def test_a_posix_folder_gets_every_name_exactly(server: Server, tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    source = {p: contents(p) for p in ACCEPTED + REFUSED}
    make_source(src, source)
    sync_and_ingest(server, src)

    result = export(server, dest)
    assert not notes(result), result.output
    assert not (dest / os.fsdecode(NAMES_FILE)).exists()
    files, _folders, inodes = tree(dest)
    del files[b"log.jsonl"], inodes[b"log.jsonl"]  # the study's log (tests/test_view_access_log.py)
    (sub,) = os.listdir(dest / "submissions")
    want: dict[bytes, bytes] = {}
    for path, data in source.items():
        want[b"current/" + path] = data
        want[b"submissions/" + sub.encode() + b"/" + path] = data
        folder = os.path.join(os.fsencode(dest), b"versions", path)
        (version,) = os.listdir(folder)
        assert version.startswith(b"0001_"), escape(version)
        dot = path.rsplit(b"/", 1)[-1].rfind(b".")
        assert version.endswith(path.rsplit(b"/", 1)[-1][dot:] if dot > 0 else b"_" + SITE.encode())
        want[b"versions/" + path + b"/" + version] = data
    assert files == want
    groups = link_groups(inodes)
    assert len(groups) == len(source) and all(len(g) == 3 for g in groups)

    again = export(server, dest)
    assert " 0 links added" in again.stdout and not (dest / os.fsdecode(NAMES_FILE)).exists()


@pytest.mark.parametrize("refused, taken", [
    (b"a:b.txt", b"a%3Ab.txt"),  # the name that is really there sorts first
    (b'q"x.txt', b"q%22x.txt"),  # the refused one sorts first
])
def test_an_escaped_name_that_another_path_really_has(server: Server, share: Path,
                                                      tmp_path: Path, refused: bytes,
                                                      taken: bytes) -> None:
    """A study may hold both ``a:b.txt`` and ``a%3Ab.txt``: the share holds the second as it
    is, and it stays that path's, in current/, versions/ and submissions/ alike, whatever
    order they come in; the refused one can only be left out then, and is reported."""
    assert written_as(refused) == taken
    src = tmp_path / "src"
    source = {refused: b"R" * 64, taken: b"T" * 64}  # the same size: only the bytes tell
    make_source(src, source)
    sync_and_ingest(server, src)

    for _round in (1, 2):
        result = export(server, share)
        files, _folders, _inodes = tree(share)
        assert files[b"current/" + taken] == source[taken], result.output
        (sub,) = (n for n in os.listdir(os.fsencode(share / "submissions")))
        assert files[b"submissions/" + sub + b"/" + taken] == source[taken], result.output
        versions = [p for p in files if p.startswith(b"versions/" + taken + b"/")]
        assert versions and all(files[p] == source[taken] for p in versions), (
            f"versions/{escape(taken)}/ holds another path's file: {result.output}")
        lines = names_file_lines(share) if NAMES_FILE in files else []
        for written, view in lines:
            top, *rest = view.split(b"/")
            path = rest[1] if top == b"submissions" else rest[0]  # a one-name path
            if written in files:  # a file listed: the view path's bytes
                assert files[written] == source[path], (escape(written), escape(view))
            assert written not in (b"current/" + taken, b"versions/" + taken), (
                f"{escape(written)} is listed as {escape(view)}, but it is "
                f"{escape(taken)}'s, a name the share holds")
        # the refused path: reached through the list, or reported as left out
        reached = any(view == b"current/" + refused and files.get(written) == source[refused]
                      for written, view in lines)
        assert reached or "left untouched" in result.stderr, result.output
