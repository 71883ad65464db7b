"""An export into a destination that holds an earlier clean export writes and looks at only what
is new since then (docs/view.md, "What the export does, and never does"), ends as a fresh export
would, and looks at everything again with --verify or when the destination is not as it left it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import Server, write_file

from dittohead.export import ExportSummary, export_study
from dittohead.store.repo import Store


def _export(server: Server, dest: Path, **kw) -> ExportSummary:
    with Store.open(str(server.root)) as store:
        return export_study(store, server.study, str(dest), **kw)


def _tree(top: Path) -> dict[str, tuple[bytes, str]]:
    """Every file under ``top``: its bytes, and for a link in current/ or submissions/, the file
    in versions/ it is (the export's hard links)."""
    versions = {}
    for dirpath, _dirs, names in os.walk(top / "versions"):
        for name in names:
            p = Path(dirpath, name)
            versions[(p.stat().st_dev, p.stat().st_ino)] = p.relative_to(top).as_posix()
    out = {}
    for dirpath, _dirs, names in os.walk(top):
        for name in names:
            p = Path(dirpath, name)
            rel = p.relative_to(top).as_posix()
            out[rel] = (p.read_bytes(), versions.get((p.stat().st_dev, p.stat().st_ino), "not a version file"))
    return out


def _round(server: Server, src: Path) -> None:
    server.sync(src, site="lab A")
    server.ingest()


def test_each_export_after_a_clean_one_adds_only_what_is_new_and_ends_as_a_fresh_one(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dest = tmp_path / "src", tmp_path / "export"
    write_file(src / "a.txt", b"a1\n")
    write_file(src / "dir/b.csv", b"1,2\n")
    write_file(src / "data", b"data as a file\n")
    write_file(src / "deep/er/still/x.txt", b"x\n")
    for i in range(300):
        write_file(src / f"many/f{i:03d}.txt", b"%d\n" % i)
    _round(server, src)
    assert _export(server, dest).since is None  # the first: everything

    def changes(n: int) -> None:
        if n == 2:  # a new version, a file that becomes a folder, a new folder
            write_file(src / "a.txt", b"a2\n")
            (src / "data").unlink()
            write_file(src / "data/f.txt", b"now a folder\n")
            write_file(src / "dir2/c.txt", b"c\n")
        elif n == 3:  # a folder that becomes a file; bytes that go back to an older version
            shutil.rmtree(src / "dir2")
            write_file(src / "dir2", b"dir2 as a file\n")
            write_file(src / "a.txt", b"a1\n")
            write_file(src / "data/f.txt", b"f2\n")
        elif n == 4:  # one new file, deep
            write_file(src / "deep/er/y.txt", b"y\n")

    for n in (2, 3, 4):
        changes(n)
        _round(server, src)
        stats: list[object] = []

        def counting(*args, stats=stats, real_stat=os.stat, **kw):
            if kw.get("dir_fd") is not None:
                stats.append(args[0])
            return real_stat(*args, **kw)

        with monkeypatch.context() as m:
            m.setattr(os, "stat", counting)
            summary = _export(server, dest)
        assert summary.since == n - 1 and summary.clean, summary
        fresh = tmp_path / f"fresh{n}"
        _export(server, fresh)
        assert _tree(dest) == _tree(fresh), n
        # What was looked at follows what is new, not the 300 files of many/.
        assert not any("f1" in str(s) for s in stats) and len(stats) < 60, (n, len(stats), stats)
    assert (dest / "current/data~file").read_bytes() == b"data as a file\n"
    assert (dest / "current/dir2~file").read_bytes() == b"dir2 as a file\n"
    assert (dest / "current/a.txt").read_bytes() == b"a1\n"
    assert summary.written == 1 and summary.linked == 2  # y.txt: its version, current/ and submissions/


def test_verify_puts_back_what_an_export_after_a_clean_one_does_not_see(server: Server, tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "export"
    write_file(src / "a.txt", b"a\n")
    write_file(src / "dir/b.csv", b"b\n")
    _round(server, src)
    _export(server, dest)
    (dest / "current/dir/b.csv").unlink()  # deeper than the top folders the export checks
    again = _export(server, dest)
    assert again.since == 1 and not (dest / "current/dir/b.csv").exists()
    res = server.ok("export", "--store", server.root, "--study", server.study, dest, "--verify")
    assert "1 links added" in res.stdout and "new since" not in res.stdout, res.stdout
    assert (dest / "current/dir/b.csv").read_bytes() == b"b\n"
    assert os.path.samefile(dest / "current/dir/b.csv", next((dest / "versions/dir/b.csv").iterdir()))
    res = server.ok("export", "--store", server.root, "--study", server.study, dest)
    assert "what is new since submission #1" in res.stdout, res.stdout


def test_a_destination_not_as_the_last_export_left_it_gets_everything(server: Server, tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "export"
    write_file(src / "a.txt", b"a\n")
    _round(server, src)
    _export(server, dest)
    (dest / "current/a.txt").unlink()  # an entry taken out of a top folder
    summary = _export(server, dest)
    assert summary.since is None and (dest / "current/a.txt").read_bytes() == b"a\n"
    shutil.rmtree(dest)  # emptied and made anew
    dest.mkdir()
    summary = _export(server, dest)
    assert summary.since is None and summary.linked == 2 and (dest / "current/a.txt").read_bytes() == b"a\n"
    assert _export(server, dest).since == 1


def test_after_an_export_that_left_something_in_the_way_the_next_one_looks_at_everything(
    server: Server, tmp_path: Path
) -> None:
    src, dest = tmp_path / "src", tmp_path / "export"
    write_file(src / "dir/a.txt", b"a\n")
    _round(server, src)
    _export(server, dest)
    write_file(dest / "current/dir/b.txt", b"the user's own\n")  # where the next path goes
    write_file(src / "dir/b.txt", b"b\n")
    _round(server, src)
    summary = _export(server, dest)
    assert summary.since == 1 and summary.conflicts == [str(dest / "current/dir/b.txt")]
    (dest / "current/dir/b.txt").unlink()
    summary = _export(server, dest)
    assert summary.since is None and summary.clean
    assert (dest / "current/dir/b.txt").read_bytes() == b"b\n"
    assert _export(server, dest).since == 2


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_rounds_of_files_and_folders_export_as_a_fresh_export_would(
    server: Server, tmp_path: Path, seed: int
) -> None:
    """Rounds of random changes over a few names, where a name is a file in one round and a
    folder in another (either way): after each, the export after the last clean one leaves DEST
    as a fresh export does."""
    import random

    rnd = random.Random(seed)
    names = ["a", "b", "c.txt"]
    src, dest = tmp_path / "src", tmp_path / "export"
    exported = None  # the last submission of the last export
    for n in range(1, 7):
        files: dict[str, bytes] = {}
        for _ in range(rnd.randint(1, 6)):
            path = "/".join(rnd.choice(names) for _ in range(rnd.randint(1, 3)))
            if not any(p.startswith(path + "/") or path.startswith(p + "/") for p in files):
                files[path] = rnd.choice([b"x\n", b"y\n", b"%d\n" % n])
        if src.exists():
            shutil.rmtree(src)
        for path, data in files.items():
            write_file(src / path, data)
        _round(server, src)
        summary = _export(server, dest)
        assert summary.clean and summary.since == exported, (n, summary)
        exported = max(s["seq"] for s in server.log())
        fresh = tmp_path / f"fresh{n}"
        _export(server, fresh)
        assert _tree(dest) == _tree(fresh), (seed, n, files)
