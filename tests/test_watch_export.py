"""A study added with --export is exported by watch after each ingest that touched it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from click.testing import CliRunner

from dittohead.cli import cli


def _ok(*args: object) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, (args, res.output, res.exception)
    return res.stdout


def _store_exporting_foo(tmp_path: Path, monkeypatch, name: str, data: bytes) -> tuple[Path, Path, Path]:
    """A server root with study foo added --export OUT, and a source folder holding one file."""
    monkeypatch.setenv("DITTOHEAD_STATE_DIR", str(tmp_path / "state"))
    root, src, out = tmp_path / "root", tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / name).write_bytes(data)
    _ok("init", "--store", root)
    _ok("study", "add", "foo", "--store", root, "--export", out)
    return root, src, out


def test_watch_exports_each_ingest_into_the_study_destination(tmp_path: Path, monkeypatch) -> None:
    root, src, out = _store_exporting_foo(tmp_path, monkeypatch, "subj01.txt", b"first\n")
    _ok("study", "add", "bar", "--store", root)
    _ok("sync", src, "--study", "foo", "--to", root, "--site", "A")
    _ok("watch", "--store", root, "--once")
    assert (out / "current" / "subj01.txt").read_bytes() == b"first\n"
    first = next((out / "versions" / "subj01.txt").iterdir())
    inode = first.stat().st_ino

    (src / "subj01.txt").write_bytes(b"second\n")
    os.utime(src / "subj01.txt", (1e9, 1e9))
    _ok("sync", src, "--study", "foo", "--to", root, "--site", "A")
    _ok("watch", "--store", root, "--once")
    assert (out / "current" / "subj01.txt").read_bytes() == b"second\n"
    assert first.read_bytes() == b"first\n" and first.stat().st_ino == inode
    assert len(list((out / "versions" / "subj01.txt").iterdir())) == 2

    # A study without --export is never exported anywhere.
    _ok("sync", src, "--study", "bar", "--to", root, "--site", "A")
    _ok("watch", "--store", root, "--once")
    assert sorted(p.name for p in out.iterdir()) == ["current", "log.jsonl", "submissions", "versions"]


def test_a_failing_export_is_reported_and_the_ingest_stands(tmp_path: Path, monkeypatch) -> None:
    """The destination unusable (a file where the folder should be): the submission is ingested
    all the same, watch says in one line that the export failed and exits 1; once the
    destination is usable, the next ingest's export adds everything, the earlier version too."""
    root, src, out = _store_exporting_foo(tmp_path, monkeypatch, "a.txt", b"one\n")
    out.write_bytes(b"in the way\n")
    _ok("sync", src, "--study", "foo", "--to", root, "--site", "A")
    res = CliRunner().invoke(cli, ["watch", "--store", str(root), "--once"])
    assert res.exit_code == 1, res.output
    assert "ingested foo/" in res.stdout
    (line,) = res.stderr.strip().splitlines()
    assert "study foo is ingested, but its export to" in line and str(out) in line
    assert out.read_bytes() == b"in the way\n"  # left as it was
    assert len(json.loads(_ok("log", "--store", root, "--study", "foo", "--json"))["submissions"]) == 1

    out.unlink()
    (src / "a.txt").write_bytes(b"two\n")
    os.utime(src / "a.txt", (1e9, 1e9))
    _ok("sync", src, "--study", "foo", "--to", root, "--site", "A")
    _ok("watch", "--store", root, "--once")
    assert (out / "current" / "a.txt").read_bytes() == b"two\n"
    assert sorted(p.read_bytes() for p in (out / "versions" / "a.txt").iterdir()) == [b"one\n", b"two\n"]


def test_study_add_refuses_an_export_whose_parent_is_missing(tmp_path: Path) -> None:
    _ok("init", "--store", tmp_path / "root")
    res = CliRunner().invoke(cli, ["study", "add", "foo", "--store", str(tmp_path / "root"),
                                   "--export", str(tmp_path / "no" / "such" / "dest")])
    assert res.exit_code == 2, res.output
    assert "no such folder" in res.stderr
    assert not (tmp_path / "root" / "dropbox" / "foo").exists()
    assert not (tmp_path / "no").exists()
