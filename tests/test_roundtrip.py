"""Round trips through sync, ingest and cat: every version of every path reads back exactly.

A hypothesis-generated tree (spaces, non-ASCII names in NFC and NFD, empty files, sizes at the
chunking boundaries, nested folders) goes through several rounds of edits, deletions and
additions; a model (path -> distinct contents in order) says what the store must hold.
Invariant 5: a path gets a new version only when its content differs from its latest version;
deleted files stay. Re-syncing an unchanged tree sends nothing and leaves the store unchanged.
"""

from __future__ import annotations

import os
import random
import tempfile
import unicodedata
from pathlib import Path

import pytest
from conftest import Server, dir_bytes, store_snapshot, write_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dittohead import format as fmt

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

# Name characters: ASCII, spaces, punctuation that is valid on every OS, precomposed letters
# (written on disk in NFC or NFD), a singleton decomposition (ANGSTROM SIGN -> A with ring) and
# CJK. Characters Windows forbids (\ : * ? " < > |) are left out on purpose.
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
EXTS = ["", ".csv", ".txt", ".edat2", ".bin"]


def content(kind: str, size: int, seed: int) -> bytes:
    """Deterministic bytes: random (CDC cuts near the average), zeros (CDC cuts at the maximum),
    or a short repeated pattern."""
    if kind == "zeros":
        return bytes(size)
    if kind == "pattern":
        unit = random.Random(seed).randbytes(97)
        return (unit * (size // len(unit) + 1))[:size]
    return random.Random(seed).randbytes(size)


def nfc(s: str) -> str:
    return unicodedata.normalize("NFC", s)


class Tree:
    """The source folder and the model of what the store must hold."""

    def __init__(self, src: Path):
        self.src = src
        self.disk: dict[str, str] = {}  # store path (NFC) -> relative path on disk (any form)
        self.model: dict[str, list[bytes]] = {}  # store path -> distinct contents, in order
        self.deleted: dict[str, str] = {}  # store path -> its last on-disk form
        self.taken: set[str] = set()  # casefolded NFC paths ever used
        self.dirs: list[str] = [""]  # on-disk relative dirs ("" is the top)

    def write(self, path: str, data: bytes) -> None:
        rel = self.disk[path]
        write_file(self.src / rel, data)
        history = self.model.setdefault(path, [])
        if not history or history[-1] != data:
            history.append(data)

    def current(self, path: str) -> bytes:
        return (self.src / self.disk[path]).read_bytes()


@st.composite
def names(draw, prefix: str) -> tuple[str, str]:
    """(NFC name, on-disk name): the on-disk one in NFC or NFD. The prefix keeps files ("f")
    and folders ("d") apart, so that no path is ever both."""
    text = draw(st.text(alphabet=st.sampled_from(NAME_CHARS), min_size=0, max_size=10))
    ext = draw(st.sampled_from(EXTS)) if prefix == "f" else ""
    name = nfc(prefix + text + ext)
    on_disk = unicodedata.normalize(draw(st.sampled_from(["NFC", "NFD"])), name)
    return name, on_disk


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
        parent_disk = data.draw(st.sampled_from(tree.dirs), label="parent")
        _dname, d_disk = data.draw(names("d"), label="folder name")
        rel_dir = os.path.join(parent_disk, d_disk) if parent_disk else d_disk
        if nfc(rel_dir).casefold() not in {nfc(d).casefold() for d in tree.dirs}:
            tree.dirs.append(rel_dir)
        else:
            rel_dir = next(d for d in tree.dirs if nfc(d).casefold() == nfc(rel_dir).casefold())
    else:
        rel_dir = data.draw(st.sampled_from(tree.dirs), label="folder")
    _fname, f_disk = data.draw(names("f"), label="file name")
    rel = os.path.join(rel_dir, f_disk) if rel_dir else f_disk
    path = nfc(rel)
    if path.casefold() in tree.taken:
        return  # keep paths unique after normalisation and case folding
    tree.taken.add(path.casefold())
    tree.disk[path] = rel
    tree.write(path, draw_content(data, big_budget))


def edit_round(data, tree: Tree, big_budget: list[int]) -> None:
    """Edit, touch, delete or keep every live file; re-add some deleted ones; add new ones."""
    for path in sorted(tree.disk):
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
            st_ = os.stat(tree.src / tree.disk[path])
            os.utime(tree.src / tree.disk[path], ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))
            continue
        if op == "delete":
            (tree.src / tree.disk[path]).unlink()
            tree.deleted[path] = tree.disk.pop(path)
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
        if data.draw(st.booleans(), label=f"re-add {path!r}"):
            # Possibly under the other normalisation form of the same name.
            form = data.draw(st.sampled_from(["NFC", "NFD"]), label="form")
            rel = unicodedata.normalize(form, tree.deleted.pop(path))
            tree.disk[path] = rel
            if data.draw(st.booleans(), label="same content?"):
                tree.write(path, tree.model[path][-1])  # not a new version
            else:
                tree.write(path, draw_content(data, big_budget))
    for _ in range(data.draw(st.integers(0, 3), label="new files")):
        add_file(data, tree, big_budget)


def check_store(server: Server, tree: Tree) -> None:
    """Every version of every path ever synced reads back byte-identical, oldest first."""
    for path, history in sorted(tree.model.items()):
        listed = server.versions(path)
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
            server.sync(tree.src, site=f"site{round_no}")
            server.ingest()
            assert server.inbox_entries() == [], "ingest left something in the inbox"
        check_store(server, tree)

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


def test_nfd_name_is_stored_under_nfc(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    nfd = unicodedata.normalize("NFD", "caf\u00e9 r\u00e9sum\u00e9.txt")
    write_file(src / nfd, b"decomposed on disk\n")
    server.sync(src)
    server.ingest()
    assert server.cat(nfc(nfd)) == b"decomposed on disk\n"
    # The same name rewritten in NFC is the same path: a second version of it.
    (src / nfd).unlink()
    write_file(src / nfc(nfd), b"composed on disk\n")
    server.sync(src)
    server.ingest()
    assert [v["version"] for v in server.versions(nfc(nfd))] == [1, 2]
    assert server.cat(nfc(nfd), version=1) == b"decomposed on disk\n"
    assert server.cat(nfc(nfd), version=2) == b"composed on disk\n"


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
