"""Round trips through sync, ingest and cat: every version of every path reads back exactly.

A hypothesis-generated tree (spaces, non-ASCII names in NFC, in NFD and as drawn, bytes that are
not UTF-8 and characters Windows refuses where the system is POSIX, empty files, sizes at the
chunking boundaries, nested folders) goes through several rounds of edits, deletions, additions
and re-additions; a model (path -> distinct contents in order) says what the store must hold.
A path is the file's name bytes on disk, nothing normalized (docs/format.md, "Paths"): a name in
NFC and the same name in NFD are two paths, two files side by side, each with its own versions,
and a deleted file written back under another spelling is a new path beside the old one.
Invariant 5: a path gets a new version only when its content differs from its latest version;
deleted files stay. Re-syncing an unchanged tree sends nothing and leaves the store unchanged.
"""

from __future__ import annotations

import os
import random
import tempfile
import unicodedata
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
from conftest import Server, dir_bytes, store_snapshot, write_file
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dittohead import format as fmt
from dittohead.paths import to_bytes

KiB = 1024
MiB = 1024 * KiB

# Sizes at and around the chunker's boundaries (min 256 KiB, avg 1 MiB, max 4 MiB).
BOUNDARY_SIZES = [
    fmt.CHUNK_MIN - 1,
    fmt.CHUNK_MIN,
    fmt.CHUNK_MIN + 1,
    fmt.CHUNK_AVG - 1,
    fmt.CHUNK_AVG,
    fmt.CHUNK_AVG + 1,
    fmt.CHUNK_MAX - 1,
    fmt.CHUNK_MAX,
    fmt.CHUNK_MAX + 1,
    2 * fmt.CHUNK_MAX + 7,
]
SMALL_SIZES = st.one_of(st.just(0), st.integers(1, 64), st.integers(65, 8 * KiB))

# Name characters: ASCII, spaces, punctuation, precomposed letters (written in NFC, NFD or as
# drawn), a singleton decomposition (ANGSTROM SIGN: NFC and NFD both change it) and CJK. On a
# POSIX system also what only Windows refuses (\ : * ? and a tab), a bidi override, and bytes
# that are not UTF-8 (0xFC, 0xE9: Latin-1 letters), held as surrogateescape'd text.
NAME_CHARS = list("abcxyzABC0189 -_.,()'#+~") + [
    "\u00e9",
    "\u00f1",
    "\u00fc",
    "\u00c5",
    "\u212b",
    "\u00df",
    "\u65e5",
    "\u672c",
    "\u00d6",
]
if os.name == "posix":
    NAME_CHARS += ["\\", ":", "*", "?", "\t", "\u202e", "\udcfc", "\udce9"]
EXTS = ["", ".csv", ".txt", ".edat2", ".bin"]
FORMS = ["NFC", "NFD", "as drawn"]


def content(kind: str, size: int, seed: int) -> bytes:
    """Deterministic bytes: random (CDC cuts near the average), zeros (CDC cuts at the maximum),
    or a short repeated pattern."""
    if kind == "zeros":
        return bytes(size)
    if kind == "pattern":
        unit = random.Random(seed).randbytes(97)
        return (unit * (size // len(unit) + 1))[:size]
    return random.Random(seed).randbytes(size)


def spell(form: str, name: str) -> str:
    """``name`` in a normalization form, or as it is ("as drawn")."""
    return name if form == "as drawn" else unicodedata.normalize(form, name)


@cache
def name_folding(where: str) -> Callable[[str], str]:
    """What the filesystem at ``where`` takes as the same name: the identity on ext4, tmpfs and
    the like (case- and normalization-sensitive); casefolding and NFC where it is blind to case
    or to normalization (macOS, Windows), so that the model never holds two paths that would
    be one file there."""
    with tempfile.TemporaryDirectory(dir=where, prefix="dittohead-probe-") as d:
        Path(d, "Aa").touch()
        case_blind = Path(d, "aA").exists()
        Path(d, "\u00e9").touch()
        norm_blind = Path(d, "e\u0301").exists()

    def fold(path: str) -> str:
        if norm_blind:
            path = unicodedata.normalize("NFC", path)
        return path.casefold() if case_blind else path

    return fold


class Tree:
    """The source folder and the model of what the store must hold. A path is a file's
    relative name on disk, exactly (surrogateescape'd text for bytes that are not UTF-8)."""

    def __init__(self, src: Path):
        self.src = src
        self.fold = name_folding(str(src.parent))
        self.live: set[str] = set()  # paths on disk now
        self.model: dict[str, list[bytes]] = {}  # path -> distinct contents, in order
        self.deleted: set[str] = set()  # paths synced once, now gone from the source
        self.taken: set[str] = set()  # every path ever used, folded (see name_folding)
        self.dirs: list[str] = [""]  # relative folders on disk ("" is the top)

    def add(self, path: str, data: bytes) -> bool:
        """Start a new path (False, and nothing done, if its name is already used)."""
        if self.fold(path) in self.taken:
            return False
        self.taken.add(self.fold(path))
        self.live.add(path)
        self.write(path, data)
        parts = path.split("/")[:-1]  # its folders, possibly new ones (another spelling)
        for i in range(1, len(parts) + 1):
            if "/".join(parts[:i]) not in self.dirs:
                self.dirs.append("/".join(parts[:i]))
        return True

    def write(self, path: str, data: bytes) -> None:
        write_file(self.src / path, data)
        history = self.model.setdefault(path, [])
        if not history or history[-1] != data:
            history.append(data)

    def current(self, path: str) -> bytes:
        return (self.src / path).read_bytes()


@st.composite
def names(draw, prefix: str) -> str:
    """A name in NFC, NFD or as drawn. The prefix keeps files ("f") and folders ("d") apart,
    so that no path is ever both."""
    text = draw(st.text(alphabet=st.sampled_from(NAME_CHARS), min_size=0, max_size=10))
    ext = draw(st.sampled_from(EXTS)) if prefix == "f" else ""
    return spell(draw(st.sampled_from(FORMS)), prefix + text + ext)


def draw_content(data, big_budget: list[int]) -> bytes:
    kind = data.draw(st.sampled_from(["random", "random", "zeros", "pattern"]), label="kind")
    if big_budget[0] > 0 and data.draw(st.integers(0, 5), label="big?") == 5:
        big_budget[0] -= 1
        size = data.draw(st.sampled_from(BOUNDARY_SIZES), label="boundary size")
    else:
        size = data.draw(SMALL_SIZES, label="size")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    return content(kind, size, seed)


def add_file(data, tree: Tree, big_budget: list[int]) -> None:
    if data.draw(st.booleans(), label="new folder?"):
        parent = data.draw(st.sampled_from(tree.dirs), label="parent")
        name = data.draw(names("d"), label="folder name")
        rel_dir = f"{parent}/{name}" if parent else name
        same = [d for d in tree.dirs if tree.fold(d) == tree.fold(rel_dir)]
        if same:
            rel_dir = same[0]  # the folder there already (where the filesystem folds names)
        else:
            tree.dirs.append(rel_dir)
    else:
        rel_dir = data.draw(st.sampled_from(tree.dirs), label="folder")
    name = data.draw(names("f"), label="file name")
    tree.add(f"{rel_dir}/{name}" if rel_dir else name, draw_content(data, big_budget))


def add_twin(data, tree: Tree, big_budget: list[int]) -> None:
    """Beside a file, the same name spelled in another normalization form: another path."""
    twins = sorted({spell(form, p) for p in tree.model for form in ("NFC", "NFD")} - set(tree.model))
    if twins:
        twin = data.draw(st.sampled_from(twins), label="twin")
        if tree.add(twin, draw_content(data, big_budget)):
            event("an NFC/NFD twin beside a file")


def edit_round(data, tree: Tree, big_budget: list[int]) -> None:
    """Edit, touch, delete or keep every live file; write back some deleted ones, under their
    own name or another spelling of it (a new path); add new files and NFC/NFD twins."""
    for path in sorted(tree.live):
        old = tree.current(path)
        op = data.draw(
            st.sampled_from(
                [
                    "keep",
                    "keep",
                    "overwrite",
                    "insert",
                    "truncate",
                    "append",
                    "replace",
                    "revert",
                    "touch",
                    "delete",
                ]
            ),
            label=f"op {path!r}",
        )
        rng = random.Random(data.draw(st.integers(0, 2**32 - 1), label="seed"))
        if op == "keep":
            continue
        if op == "touch":  # a new mtime, the same bytes: no new version
            st_ = os.stat(tree.src / path)
            os.utime(tree.src / path, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))
            continue
        if op == "delete":
            (tree.src / path).unlink()
            tree.live.remove(path)
            tree.deleted.add(path)
            continue
        if op == "overwrite" and old:
            pos = rng.randrange(len(old))
            patch = rng.randbytes(min(rng.randint(1, 64), len(old) - pos))
            new = old[:pos] + patch + old[pos + len(patch) :]
        elif op == "insert":
            pos = rng.randint(0, len(old))
            new = old[:pos] + rng.randbytes(rng.randint(1, 300)) + old[pos:]
        elif op == "truncate" and old:
            new = old[: rng.randrange(len(old))]
        elif op == "append":
            new = old + rng.randbytes(rng.randint(1, 5000))
        elif op == "revert" and len(tree.model[path]) >= 2:
            new = tree.model[path][-2]  # back to an older content: a new version again
        else:
            new = draw_content(data, big_budget)
        tree.write(path, new)
    for path in sorted(tree.deleted):
        if not data.draw(st.booleans(), label=f"write back {path!r}"):
            continue
        same_content = data.draw(st.booleans(), label="same content?")
        data_ = tree.model[path][-1] if same_content else draw_content(data, big_budget)
        # Under its own name, or under another spelling of it: that is another path, the
        # deleted one stays as it was (its versions, and deleted at the source).
        others = sorted({spell(form, path) for form in ("NFC", "NFD")} - {path})
        if others and data.draw(st.booleans(), label="another spelling?"):
            spelled = data.draw(st.sampled_from(others), label="spelling")
            if tree.add(spelled, data_):  # version 1 of a new path, even with the same bytes
                event("a deleted file written back under another spelling")
        else:
            tree.deleted.remove(path)
            tree.live.add(path)
            tree.write(path, data_)  # the same bytes: not a new version
    for _ in range(data.draw(st.integers(0, 3), label="new files")):
        add_file(data, tree, big_budget)
    if data.draw(st.integers(0, 2), label="twin?"):
        add_twin(data, tree, big_budget)


def check_store(server: Server, tree: Tree) -> None:
    """Every version of every path ever synced reads back byte-identical, oldest first, under
    the path's own bytes."""
    for path, history in sorted(tree.model.items()):
        listed = server.versions(path)  # (the helper checks the path --json gives back)
        assert [v["version"] for v in listed] == list(range(1, len(history) + 1)), (path, listed)
        for number, expected in enumerate(history, start=1):
            got = server.cat(path, version=number)
            assert got == expected, (
                f"{path!r} version {number}: {len(got)} bytes read back, {len(expected)} sent"
            )
            assert listed[number - 1]["size"] == len(expected)
        assert server.cat(path) == history[-1], f"{path!r}: latest"


@pytest.mark.slow
@settings(
    max_examples=40,  # examples take ~50-300 ms each: 40 of them run in well under a minute
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
def test_rounds_of_edits_read_back_exactly(data) -> None:
    with tempfile.TemporaryDirectory(prefix="dittohead-rt-") as tmp:
        server = Server(Path(tmp)).init()
        tree = Tree(Path(tmp) / "src")
        tree.src.mkdir()
        big_budget = [2]  # at most two boundary-sized contents per example: examples stay fast
        for _ in range(data.draw(st.integers(1, 6), label="initial files")):
            add_file(data, tree, big_budget)
        rounds = data.draw(st.integers(1, 3), label="edit rounds")
        for round_no in range(rounds + 1):
            if round_no:
                edit_round(data, tree, big_budget)
            sent = server.sync(tree.src, site=f"site{round_no}")
            assert "skipped" not in sent.output, sent.output  # no file left out for its name
            server.ingest()
            assert server.inbox_entries() == [], "ingest left something in the inbox"
        check_store(server, tree)

        # The export's current/ holds every path ever synced under its own bytes, and no other.
        server.ok("export", "--store", server.root, "--study", server.study, Path(tmp) / "out")
        assert exported_current(Path(tmp) / "out") == {
            to_bytes(path): history[-1] for path, history in tree.model.items()
        }

        # The log counts exactly the versions the model expects.
        log = server.log()
        assert [s["seq"] for s in log] == list(range(1, len(log) + 1))
        assert sum(s["new_versions"] for s in log) == sum(len(h) for h in tree.model.values())

        # Unchanged tree: nothing to send, no submission, the store byte-for-byte as it was.
        before = store_snapshot(server.root)
        again = server.sync(tree.src)
        assert again.submission is None, again.output
        assert server.inbox_entries() == []
        server.ingest()
        assert store_snapshot(server.root) == before
        assert len(server.log()) == len(log)


def test_resync_unchanged_tree_sends_nothing(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_file(src / "a.txt", b"alpha\n")
    write_file(src / "sub dir/b\u00e9.bin", random.Random(1).randbytes(300 * KiB))
    write_file(src / "empty", b"")
    first = server.sync(src)
    assert first.submission is not None, first.output
    server.ingest()
    before = store_snapshot(server.root)
    log = server.log()
    for _ in range(2):
        again = server.sync(src)
        assert again.submission is None, again.output
        assert server.inbox_entries() == []
        server.ingest()
    assert store_snapshot(server.root) == before
    assert server.log() == log
    assert server.cat("sub dir/b\u00e9.bin") == (src / "sub dir/b\u00e9.bin").read_bytes()
    assert server.cat("empty") == b""


def exported_current(dest: Path) -> dict[bytes, bytes]:
    """DEST/current as the filesystem lists it: relative path bytes -> file bytes."""
    top = os.path.join(os.fsencode(dest), b"current")
    out = {}
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, name), top)] = f.read()
    return out


def test_nfd_name_is_stored_under_its_own_bytes(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    name = "caf\u00e9 r\u00e9sum\u00e9.txt"
    nfc, nfd = (unicodedata.normalize(form, name) for form in ("NFC", "NFD"))
    assert nfc != nfd
    write_file(src / nfd, b"decomposed on disk\n")
    server.sync(src)
    server.ingest()
    assert server.cat(nfd) == b"decomposed on disk\n"
    (version,) = server.versions(nfd)  # the helper checks --json gives back the path as given
    assert version["size"] == len(b"decomposed on disk\n")
    res = server.run("cat", "--store", server.root, "--study", server.study, nfc)
    assert res.exit_code == 1 and "no file" in res.output, res.output  # NFC is another path

    # The NFC spelling beside it, on disk at the same time: another file, another path; the
    # NFD one unchanged (no second version of it).
    write_file(src / nfc, b"composed on disk\n")
    assert sorted(os.listdir(os.fsencode(src))) == sorted([nfc.encode(), nfd.encode()])
    sent = server.sync(src)
    assert "1 new, 0 changed, 1 unchanged" in sent.output, sent.output
    server.ingest()
    assert server.cat(nfd) == b"decomposed on disk\n"
    assert server.cat(nfc) == b"composed on disk\n"
    assert len(server.versions(nfd)) == 1 and len(server.versions(nfc)) == 1

    # Rewriting the NFD file changes that path only.
    write_file(src / nfd, b"decomposed, edited\n")
    server.sync(src)
    server.ingest()
    assert server.cat(nfd, version=1) == b"decomposed on disk\n"
    assert server.cat(nfd, version=2) == b"decomposed, edited\n"
    assert [v["version"] for v in server.versions(nfc)] == [1]

    server.ok("export", "--store", server.root, "--study", server.study, tmp_path / "out")
    assert exported_current(tmp_path / "out") == {
        nfc.encode(): b"composed on disk\n",
        nfd.encode(): b"decomposed, edited\n",
    }


LARGE = 24 * MiB


@pytest.mark.parametrize("edit", ["overwrite", "insert"])
def test_edit_in_large_file_resends_only_nearby_chunks(
    server: Server, tmp_path: Path, edit: str
) -> None:
    src = tmp_path / "src"
    original = random.Random(2024).randbytes(LARGE)
    write_file(src / "recording.bdf", original)
    write_file(src / "notes.txt", b"session 1\n")
    server.sync(src)
    server.ingest()

    mid = LARGE // 2 + 12345
    if edit == "overwrite":
        edited = original[:mid] + b"\xff" * 100 + original[mid + 100 :]
    else:
        edited = original[:mid] + b"inserted marker " * 64 + original[mid:]
    (src / "recording.bdf").write_bytes(edited)

    sent = server.sync(src)
    assert sent.submission is not None, sent.output
    submission = server.dropbox("inbox") / sent.submission
    assert submission.is_dir(), server.inbox_entries()
    uploaded = dir_bytes(submission)
    # Only the chunks around the edit travel: at most 3 maximum-size chunks, and far less
    # than the file itself.
    assert uploaded < 3 * fmt.CHUNK_MAX, (
        f"{uploaded} bytes uploaded for one small {edit} in a {LARGE}-byte file"
    )
    assert uploaded < LARGE // 4, uploaded

    server.ingest()
    assert server.cat("recording.bdf", version=1) == original
    assert server.cat("recording.bdf", version=2) == edited
    assert server.cat("recording.bdf") == edited
    assert len(server.versions("notes.txt")) == 1


def test_every_boundary_size_reads_back(server: Server, tmp_path: Path) -> None:
    """Deterministic companion of the property test: each boundary size once, as random bytes
    (cuts near the average) and as zeros (cuts at the maximum), then one byte changed in each."""
    src = tmp_path / "src"
    sent: dict[str, bytes] = {}
    for size in [0, 1] + BOUNDARY_SIZES:
        for kind in ("random", "zeros"):
            path = f"{kind}/size {size}.bin"
            sent[path] = content(kind, size, seed=size)
            write_file(src / path, sent[path])
    server.sync(src)
    server.ingest()
    edited = {}
    for path, data in sent.items():
        if data:
            mid = len(data) // 2
            edited[path] = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
            write_file(src / path, edited[path])
    server.sync(src)
    server.ingest()
    for path, data in sent.items():
        assert server.cat(path, version=1) == data, path
        if path in edited:
            assert server.cat(path, version=2) == edited[path], path
            assert [v["size"] for v in server.versions(path)] == [len(data), len(data)]
        else:
            assert len(server.versions(path)) == 1
