"""The scan on its own: every file a plain walk finds, in its order, however the prefetch goes.

The prefetch (folders listed ahead on threads, given up when the tree turns out cached) may
only change how fast the scan is: these tests compare the scan with a plain single-threaded
walk, with the prefetch on, off, stopped at once and never stopped, and check that no thread
outlives a scan, even one that fails.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dittohead.client import scan as scan_mod
from dittohead.client.scan import ScanCounts, Scanner, ScanOptions, SourceFile


def plain_walk(top: str, rel: str = "") -> list[tuple[str, int, int]]:
    """The reference: depth first, sorted by name, regular files only, links never followed."""
    out = []
    for name in sorted(os.listdir(os.path.join(top, rel) if rel else top)):
        rpath = f"{rel}/{name}" if rel else name
        st_ = os.lstat(os.path.join(top, rpath))
        if stat.S_ISDIR(st_.st_mode):
            out += plain_walk(top, rpath)
        elif stat.S_ISREG(st_.st_mode):
            out.append((rpath, st_.st_size, st_.st_ino))
    return out


def scanned(top: str | Path) -> tuple[list[tuple[str, int, int]], ScanCounts]:
    counts = ScanCounts()
    files: list[SourceFile] = Scanner(str(top), ScanOptions()).files(counts, time.time_ns())
    return [(f.path, f.size, f.ino) for f in files], counts


def scan_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("dittohead-scan")]


def make_tree(top: Path, folders: int, fanout: int, files_each: int) -> None:
    """``folders`` folders, ``fanout`` to a parent, breadth first, each with a few files."""
    top.mkdir()
    made = [top]
    i = 0
    while len(made) <= folders:
        parent = made[i // fanout]
        d = parent / f"d{i:04d}"
        d.mkdir()
        for j in range(files_each):
            (d / f"f{j}.txt").write_bytes(b"x" * (i + j))
        made.append(d)
        i += 1


# Names a lab's folders hold: spaces, non-ASCII, dots, digits; a small alphabet so that
# siblings often share prefixes (sort order matters).
NAMES = st.text(alphabet="ab Zé.0-", min_size=1, max_size=6).filter(
    lambda n: n not in (".", "..") and not n.endswith((" ", ".")) and not n.startswith(" "))
TREES = st.recursive(
    st.binary(max_size=40),
    lambda children: st.dictionaries(NAMES, children, max_size=5),
    max_leaves=30,
)


def build(path: Path, node: bytes | dict) -> None:
    if isinstance(node, dict):
        path.mkdir()
        for name, child in node.items():
            build(path / name, child)
    else:
        path.write_bytes(node)


@pytest.mark.parametrize("threads", [0, 1, 4])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.dictionaries(NAMES, TREES, max_size=6))
def test_scan_finds_what_a_plain_walk_finds(threads: int, tree: dict,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scan_mod, "LIST_THREADS", threads)
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp) / "src"
        build(top, tree)
        files, counts = scanned(top)
        assert files == plain_walk(str(top))
        assert counts.problems == []
    assert scan_threads() == []


@pytest.mark.parametrize(("cached_ns", "what"), [
    (10**12, "every listing looks cached: the prefetch stops after CACHED_RUN folders"),
    (0, "no listing looks cached: the prefetch lists the whole tree"),
])
def test_scan_is_complete_however_the_prefetch_ends(cached_ns: int, what: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    make_tree(tmp_path / "src", folders=600, fanout=7, files_each=2)
    monkeypatch.setattr(scan_mod, "CACHED_NS", cached_ns)
    monkeypatch.setattr(scan_mod, "LIST_THREADS", 4)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(scanned(tmp_path / "src")))
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), f"the scan hung ({what})"
    files, _ = result[0]
    assert len(files) == 1200
    assert files == plain_walk(str(tmp_path / "src"))
    assert scan_threads() == []


def test_a_failing_scan_leaves_no_thread_behind(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    make_tree(tmp_path / "src", folders=400, fanout=5, files_each=3)
    monkeypatch.setattr(scan_mod, "CACHED_NS", 0)  # the prefetch would list everything
    calls = 0

    real_scandir = os.scandir

    def scandir(path):
        nonlocal calls
        if threading.current_thread() is threading.main_thread():  # the walk, not the prefetch
            calls += 1
            if calls == 50:
                raise KeyboardInterrupt  # Ctrl-C in the middle of the scan
        return real_scandir(path)
    monkeypatch.setattr(scan_mod.os, "scandir", scandir)
    with pytest.raises(KeyboardInterrupt):
        scanned(tmp_path / "src")
    assert scan_threads() == []


def test_a_folder_that_cannot_be_listed_is_counted_once_and_the_rest_scanned() -> None:
    """As an account that may not list one folder: the scan says so once and goes on."""
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)  # reachable by the unprivileged account below
        top = Path(tmp) / "src"
        make_tree(top, folders=40, fanout=3, files_each=2)
        locked = top / "d0000" / "d0003"
        for p in [top, *top.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.chmod(locked, 0o000)
        expected = [f for f in plain_walk(str(top))
                    if not f[0].startswith("d0000/d0003/")]
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop to an account that cannot list `locked`, then scan
            try:
                os.close(r)
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                files, counts = scanned(top)
                os.write(w, json.dumps([files, counts.unreadable, counts.problems]).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            out = f.read()
        os.waitpid(pid, 0)
        os.chmod(locked, 0o755)
    files, unreadable, problems = json.loads(out)
    assert [tuple(f) for f in files] == expected
    assert unreadable == 1
    assert problems == ["'d0000/d0003': cannot list (Permission denied)"]
