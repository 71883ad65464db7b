"""`study set`'s options for the watcher: notify addresses, notices of success, quota, hook."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import Server

from dittohead.store.layout import ServerRoot


def test_watch_settings_round_trip(server: Server) -> None:
    r = server.run("study", "set", "s", "--store", server.root, "--notify", "ra@lab.org",
                   "--notify", "mailtos://bot:s3cret@smtp.lab.org?to=pi@lab.org", "--notify-success",
                   "--quota", "1.5G", "--hook", "/usr/bin/env STUDY_HOOK=1 true")
    assert r.exit_code == 0, r.output
    assert "s3cret" not in r.output and "bot:***@" in r.output
    s = ServerRoot(str(server.root)).study_settings("s")
    assert s.notify == ("ra@lab.org", "mailtos://bot:s3cret@smtp.lab.org?to=pi@lab.org")
    assert s.notify_success and s.quota == int(1.5 * (1 << 30)) and s.hook == "/usr/bin/env STUDY_HOOK=1 true"
    r = server.run("study", "set", "s", "--store", server.root, "--notify", "", "--no-notify-success",
                   "--quota", "none", "--hook", "")
    assert r.exit_code == 0, r.output
    s = ServerRoot(str(server.root)).study_settings("s")
    assert (s.notify, s.notify_success, s.quota, s.hook) == ((), False, None, None)


def test_bad_values_change_nothing(server: Server) -> None:
    path = Path(ServerRoot(str(server.root)).settings_path("s"))
    before = path.read_bytes()
    for args in (["--quota", "lots"], ["--quota", "-5G"], ["--hook", "'unclosed"]):
        r = server.run("study", "set", "s", "--store", server.root, *args)
        assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert path.read_bytes() == before
    path.write_text(json.dumps({**json.loads(before), "quota": "big"}))
    r = server.run("study", "set", "s", "--store", server.root)
    assert r.exit_code == 1 and "bad study settings" in r.output


def test_receipts_and_have_segments_are_readable_whatever_the_daemons_umask(server: Server, tmp_path: Path) -> None:
    import os

    from conftest import write_file

    write_file(tmp_path / "src" / "a.txt", b"a\n")
    server.sync(tmp_path / "src")
    old = os.umask(0o077)
    try:
        server.ingest()
    finally:
        os.umask(old)
    box = server.root / "dropbox" / "s"
    for f in [*(box / "receipts").iterdir(), *(box / "have").iterdir()]:
        assert f.stat().st_mode & 0o777 == 0o644, f
