"""A study added with --export is exported by watch after each ingest that touched it."""

from __future__ import annotations

import os
from pathlib import Path

from click.testing import CliRunner

from dittohead.cli import cli


def _ok(*args: object) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, (args, res.output, res.exception)
    return res.stdout


def test_watch_exports_each_ingest_into_the_study_destination(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DITTOHEAD_STATE_DIR", str(tmp_path / "state"))
    root, src, out = tmp_path / "root", tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "subj01.txt").write_bytes(b"first\n")
    _ok("init", "--store", root)
    _ok("study", "add", "foo", "--store", root, "--export", out)
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
    assert sorted(p.name for p in out.iterdir()) == ["current", "submissions", "versions"]
