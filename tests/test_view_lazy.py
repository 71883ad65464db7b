"""The read-only view answered from the index (dittohead/view.py, the index's tree table).

Its listings and look-ups are compared with a model built by brute force from the manifests
alone (docs/view.md's layout and its ``~file`` rule, written out again here); a view kept open
sees each new ingest; a path of 1,500 folders lists, looks up, reads and exports; and a view
over an index of a million versions answers without building the study.
"""

from __future__ import annotations

import gc
import os
import resource
import subprocess
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import Server, write_file
from hypothesis import given, settings
from hypothesis import strategies as st

from dittohead.errors import NotFound
from dittohead.manifest import Entry, Manifest
from dittohead.paths import check_tree, to_bytes
from dittohead.store.index import Index, Version
from dittohead.store.repo import Store
from dittohead.studylog import LogRecord
from dittohead.view import (
    CONFLICT_SUFFIX,
    Dir,
    File,
    FileReader,
    LogFile,
    StudyView,
    submission_dir_name,
    version_name,
)

SITE = "lab A"
T0 = 1_700_000_000_000_000_000


def _apply(idx: Index, seq: int, files: dict[str, int], study: str = "s") -> None:
    """Submission ``seq`` of ``files`` (path -> content number) into the index, as the ingest
    applies it (no packs: the view's listings need none)."""
    entries = tuple(Entry(p, h, 0, 0o644, bytes([h]) * 32, ()) for p, h in files.items())
    idx.apply(study, LogRecord(seq, f"sub{seq}", bytes([seq % 256]) * 32, T0 + seq * 1_000_000_000, ()),
              Manifest(study, SITE, "ra", "pc", 0, entries))


def _view(idx: Index, study: str = "s") -> StudyView:
    return StudyView(SimpleNamespace(index=idx), study)  # type: ignore[arg-type]


# -- the model: docs/view.md, by brute force over the manifests

def _shown(folders: set[str], files: dict[str, tuple[str, int]]) -> dict[str, tuple]:
    """One folder's entries by the rule of docs/view.md: folders keep their names; a file whose
    name a folder has is shown as NAME~file, unless an entry has that name."""
    out: dict[str, tuple] = {name: ("dir",) for name in folders}
    for name, ref in files.items():
        if name in folders:
            name += CONFLICT_SUFFIX
            if name in folders or name in files:
                continue
        out[name] = ("file", *ref)
    return out


def _tree(into: dict[str, dict[str, tuple]], top: str, paths: dict[str, int]) -> None:
    """The folders of one tree (current/, or one submission's): ``paths`` path -> version."""
    folders = {""} | {"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 1)}
    for f in folders:
        def child(x: str, f: str = f) -> str | None:
            head, _, name = x.rpartition("/")
            return name if head == f else None
        subs = {c for x in folders if x and (c := child(x)) is not None}
        files = {c: (x, n) for x, n in paths.items() if (c := child(x)) is not None}
        into[f"{top}/{f}" if f else top] = _shown(subs, files)


def _model(subs: list[dict[str, int]]) -> dict[str, dict[str, tuple]]:
    """Every folder of the view (its view path) -> {name: ("dir",) | ("file", path, n)}."""
    history: dict[str, list[tuple[int, int]]] = {}  # path -> [(seq, content)] one per version
    entries: dict[int, dict[str, int]] = {}
    for seq, files in enumerate(subs, 1):
        entries[seq] = {}
        for p, h in files.items():
            vs = history.setdefault(p, [])
            if not vs or vs[-1][1] != h:
                vs.append((seq, h))
            entries[seq][p] = len(vs)
    out: dict[str, dict[str, tuple]] = {"": {"current": ("dir",), "log.jsonl": ("log",), "submissions": ("dir",),
                                             "versions": ("dir",)}}
    _tree(out, "current", {p: len(vs) for p, vs in history.items()})
    out["submissions"] = {}
    for seq, files in entries.items():
        top = submission_dir_name(seq, T0 + seq * 1_000_000_000, SITE)
        out["submissions"][top] = ("dir",)
        _tree(out, f"submissions/{top}", files)
    named = set(history) | {"/".join(p.split("/")[:i]) for p in history for i in range(1, p.count("/") + 1)}
    for f in {""} | named:
        kids = {x.rpartition("/")[2] for x in named if x.rpartition("/")[0] == f}
        files = {}
        for n, (seq, _) in enumerate(history.get(f, []), 1):
            v = Version("s", f, n, seq, b"", 0, 0, 0, b"", T0 + seq * 1_000_000_000, SITE)
            files[version_name(v)] = (f, n)
        out[f"versions/{f}" if f else "versions"] = _shown(kids, files)
    return out


def _listing(view: StudyView, folder: str) -> dict[str, tuple]:
    got = view.listdir(folder)
    names = [name for name, _ in got]
    assert names == sorted(names, key=to_bytes), folder  # sorted by the names' bytes
    return {name: ("dir",) if isinstance(node, Dir) else ("log",) if isinstance(node, LogFile)
            else ("file", node.version.path, node.version.n) for name, node in got}


def _same_as_model(view: StudyView, model: dict[str, dict[str, tuple]]) -> None:
    for folder, want in model.items():
        assert _listing(view, folder) == want, folder
        for name, what in want.items():
            node = view.lookup(f"{folder}/{name}" if folder else name)
            if what[0] == "dir":
                assert isinstance(node, Dir), (folder, name)
            elif what[0] == "log":
                assert isinstance(node, LogFile), (folder, name)
            else:
                assert isinstance(node, File) and (node.version.path, node.version.n) == what[1:], (folder, name)
            if what[0] == "file" and name + CONFLICT_SUFFIX not in want:
                with pytest.raises(NotFound):
                    view.lookup(f"{folder}/{name}{CONFLICT_SUFFIX}")
        with pytest.raises(NotFound):
            view.lookup(f"{folder}/no such name" if folder else "no such name")


NAMES = ["a", "b", "a~file", "a~file~file", "a.txt", "é", "e\u0301", "\udcff", "0001"]


def _valid(files: dict[str, int]) -> dict[str, int]:
    """What a manifest may hold: no path that is also another's folder (paths.check_tree)."""
    out = {p: h for p, h in files.items() if not any(q.startswith(p + "/") for q in files)}
    check_tree(list(out))
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(st.dictionaries(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join),
                                st.integers(0, 2), min_size=1, max_size=6).map(_valid),
                min_size=1, max_size=4))
def test_listings_and_lookups_match_a_model_of_the_manifests(subs: list[dict[str, int]]) -> None:
    """Every folder of the view lists as the model says, every entry looks up to what its
    folder lists, and a view opened before an ingest answers from each new one."""
    idx = Index(":memory:")
    try:
        view = _view(idx)  # opened before anything is ingested
        assert view.listdir("current") == [] and view.last_seq == 0
        for seq, files in enumerate(subs, 1):
            _apply(idx, seq, files)
            assert view.last_seq == seq
            _same_as_model(view, _model(subs[:seq]))
    finally:
        idx.close()


def test_a_version_file_named_as_a_folder_is_shown_with_the_suffix() -> None:
    """versions/x/ holds the versions of the file x and the folders of x's own paths (when x
    was also a folder): where one of those has a version file's very name, the folder keeps it."""
    idx = Index(":memory:")
    try:
        _apply(idx, 1, {"x": 1})
        (name, node), = _view(idx).listdir("versions/x")
        assert isinstance(node, File)
        _apply(idx, 2, {f"x/{name}": 1})
        view = _view(idx)
        assert [(n, type(e).__name__) for n, e in view.listdir("versions/x")] == [
            (name, "Dir"), (name + CONFLICT_SUFFIX, "File")]
        hidden = view.lookup(f"versions/x/{name}{CONFLICT_SUFFIX}")
        assert isinstance(hidden, File) and (hidden.version.path, hidden.version.n) == ("x", 1)
        assert isinstance(view.lookup(f"versions/x/{name}"), Dir)
        (inner, _), = view.listdir(f"versions/x/{name}")  # the versions of the path x/NAME
        assert inner.startswith("0001_") and inner != name
    finally:
        idx.close()


def test_the_export_writes_such_a_version_file_with_the_suffix_too(server: Server, tmp_path: Path) -> None:
    from test_export import _commit_by_hand

    from dittohead.export import export_study
    from dittohead.units import utc_stamp

    _commit_by_hand(server, {b"x": b"the file x\n"}, "by-hand-1")
    server.ingest()
    name = f"0001_{utc_stamp(server.log()[0]['ingested_ns'])}_win-pc"
    _commit_by_hand(server, {f"x/{name}".encode(): b"a file named as a version\n"}, "by-hand-2")
    server.ingest()
    dest = tmp_path / "out"
    with Store.open(str(server.root)) as store:
        summary = export_study(store, server.study, str(dest))
    assert summary.written == 2 and not summary.conflicts and not summary.damaged
    assert (dest / "versions/x" / (name + CONFLICT_SUFFIX)).read_bytes() == b"the file x\n"
    (inner,) = (dest / "versions/x" / name).iterdir()
    assert inner.read_bytes() == b"a file named as a version\n"
    assert (dest / "current/x~file").read_bytes() == b"the file x\n"
    assert (dest / "current/x" / name).read_bytes() == b"a file named as a version\n"
    with Store.open(str(server.root)) as store:
        again = export_study(store, server.study, str(dest))
    assert (again.written, again.linked, again.conflicts) == (0, 0, []), again


def test_a_view_kept_open_sees_each_new_ingest(server: Server, tmp_path: Path) -> None:
    """A view (as the mount keeps one) answers from the index as it is now: a new ingest shows
    without reopening it, and folders take its time."""
    src = tmp_path / "src"
    write_file(src / "a.txt", b"one\n")
    server.sync(src)
    server.ingest()
    with Store.open(str(server.root)) as store:
        view = StudyView(store, server.study)
        assert [name for name, _ in view.listdir("current")] == ["a.txt"]
        before = view.lookup("current").mtime_ns  # type: ignore[union-attr]
        write_file(src / "a.txt", b"two\n")
        write_file(src / "d/b.txt", b"b\n")
        server.sync(src)
        server.ingest()
        assert view.last_seq == 2
        assert [name for name, _ in view.listdir("current")] == ["a.txt", "d"]
        a = view.lookup("current/a.txt")
        assert isinstance(a, File) and a.version.n == 2
        assert b"".join(FileReader(store, a.version).iter_all()) == b"two\n"
        assert [name[:4] for name, _ in view.listdir("versions/a.txt")] == ["0001", "0002"]
        assert len(view.listdir("submissions")) == 2
        assert view.lookup("current").mtime_ns > before  # type: ignore[union-attr]


def _read_deep(top: Path, rel: str) -> bytes:
    """The first bytes of the file ``rel`` below ``top``, reached by descriptors, a folder at a
    time (the path may be longer than PATH_MAX)."""
    *folders, name = rel.split("/")
    fd = os.open(top, os.O_RDONLY)
    for part in folders:
        deeper = os.open(part, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = deeper
    got = os.open(name, os.O_RDONLY, dir_fd=fd)
    try:
        return os.read(got, 100)
    finally:
        os.close(got)
        os.close(fd)


def _deep_source(src: Path, depth: int) -> str:
    """src/d/d/.../d/f.txt, ``depth`` folders deep (made by descriptors: longer than PATH_MAX)."""
    src.mkdir()
    fd = os.open(src, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        deeper = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = deeper
    out = os.open("f.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(out, b"deep\n")
    os.close(out)
    os.close(fd)
    return "/".join(["d"] * depth) + "/f.txt"


def test_a_path_of_1500_folders_lists_looks_up_reads_and_exports(server: Server, tmp_path: Path) -> None:
    from dittohead.export import export_study

    src, dest = tmp_path / "src", tmp_path / "out"
    deep = _deep_source(src, 1500)
    (src / "top.txt").write_bytes(b"top\n")
    try:
        server.sync(src)
        server.ingest()
        with Store.open(str(server.root)) as store:
            view = StudyView(store, server.study)
            node = view.lookup(f"current/{deep}")
            assert isinstance(node, File) and node.version.path == deep
            assert FileReader(store, node.version).read(0, 100) == b"deep\n"
            folder = deep.rsplit("/", 1)[0]
            assert [name for name, _ in view.listdir(f"current/{folder}")] == ["f.txt"]
            assert [name for name, _ in view.listdir(f"submissions/{view.listdir('submissions')[0][0]}/{folder}")] == ["f.txt"]
            (vname, v), = view.listdir(f"versions/{deep}")
            assert isinstance(v, File) and vname.startswith("0001_") and vname.endswith(".txt")
            walked = [p for p, _ in view.walk("current")]
            assert walked[0] == "current/d" and walked[-2:] == [f"current/{deep}", "current/top.txt"]
            assert len(walked) == 1502
            summary = export_study(store, server.study, str(dest))
            assert summary.written == 2 and not summary.conflicts
        assert server.cat(deep) == b"deep\n"
        listed = server.ok("ls", "--store", server.root, "--study", server.study, folder).stdout.splitlines()
        assert listed[1].endswith("  f.txt") and listed[1].split()[0] == "1"
        assert _read_deep(dest / "current", folder + "/f.txt") == b"deep\n"
    finally:  # rm, not pytest's shutil.rmtree, which recurses in Python: too deep for it
        subprocess.run(["rm", "-rf", "--", str(src), str(dest)], check=True)


# -- scale: an index of a million versions, made without the ingest's per-file work

FOLDERS, PER_FOLDER, ROUNDS = 10, 10_000, 10  # 100,000 paths of 10 versions each


def _million(path: str) -> None:
    """An index of FOLDERS x PER_FOLDER paths with ROUNDS versions each: the first submission
    through Index.apply, the other rounds copied from it in SQL (a new version of every path,
    its entries and its submission's tree), in one transaction."""
    idx = Index(path)
    files = {f"f{d}/file{i:05d}.csv": 1 for d in range(FOLDERS) for i in range(PER_FOLDER)}
    _apply(idx, 1, files)
    db = idx.db
    db.execute("BEGIN")
    for seq in range(2, ROUNDS + 1):
        db.execute("INSERT INTO versions SELECT study, path, ?1, ?1, hash, size + ?1, mtime_ns, mode, chunks "
                   "FROM versions WHERE study='s' AND n=1", (seq,))
        db.execute("INSERT INTO entries SELECT study, ?1, path, ?1 FROM entries WHERE study='s' AND seq=1", (seq,))
        db.execute("INSERT INTO tree SELECT study, ?1, parent, name, kind FROM tree WHERE study='s' AND seq=1", (seq,))
        db.execute("INSERT INTO submissions SELECT study, ?1, name || ?1, manifest, ingested_ns + ?1 * 1000000000, "
                   "site, user, host, created_ns, files, bytes, new_versions, new_chunk_bytes "
                   "FROM submissions WHERE study='s' AND seq=1", (seq,))
    db.execute("UPDATE studies SET last_seq=? WHERE name='s'", (ROUNDS,))
    db.execute("COMMIT")
    idx.close()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_a_million_versions_are_looked_up_and_listed_without_building_the_study(tmp_path: Path, capsys) -> None:
    start = time.perf_counter()
    path = str(tmp_path / "index.sqlite")
    _million(path)
    built = time.perf_counter() - start
    idx = Index(path)
    try:
        assert idx.db.execute("SELECT count(*) FROM versions").fetchone()[0] == FOLDERS * PER_FOLDER * ROUNDS
        gc.collect()
        rss = _rss()
        tracemalloc.start()
        t = time.perf_counter()
        view = _view(idx)
        node = view.lookup("current/f3/file04242.csv")
        looked_up = time.perf_counter() - t
        assert isinstance(node, File) and node.version.n == ROUNDS and node.version.size == 1 + ROUNDS
        t = time.perf_counter()
        listed = view.listdir("current/f3")
        listed_s = time.perf_counter() - t
        assert len(listed) == PER_FOLDER and all(isinstance(n, File) and n.version.n == ROUNDS for _, n in listed)
        del listed
        top = view.listdir("submissions")[4][0]
        in_sub = view.listdir(f"submissions/{top}/f7")
        assert len(in_sub) == PER_FOLDER and all(n.version.n == 5 for _, n in in_sub)  # type: ignore[union-attr]
        del in_sub
        assert [name[:4] for name, _ in view.listdir("versions/f3/file04242.csv")] == [
            f"{n:04d}" for n in range(1, ROUNDS + 1)]
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        grown = _rss() - rss
        with capsys.disabled():
            print(f"\n1M versions: index built in {built:.1f} s; lookup {looked_up * 1000:.1f} ms, listing of "
                  f"{PER_FOLDER} files {listed_s * 1000:.0f} ms; Python peak {peak / 2**20:.1f} MiB, "
                  f"RSS grown {grown / 2**20:.1f} MiB")
        # The whole-study tree took 1.2 GiB here; one folder's listing takes a few MiB.
        assert peak < 32 * 2**20
        assert grown < 64 * 2**20
    finally:
        idx.close()
