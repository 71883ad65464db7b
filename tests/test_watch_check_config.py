"""``dittohead watch --check-config``: watch.json and every study's notification addresses and
hook checked as the daemon reads them, one line per problem (passwords masked), or one OK line;
exit 0 or 1. It starts no daemon, takes no lock and writes nothing under ROOT.

Each check runs as a real process with a time-out: a daemon started by mistake would run on
until it, and fail the test.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import Server, describe

from dittohead.daemon.config import config_path, load
from dittohead.errors import UsageError
from dittohead.lock import FileLock

PASSWORD = "s3cretPW"
SMTP = f"mailtos://dittohead:{PASSWORD}@smtp.example.org:587?from=dittohead@example.org"
TOKEN = "T0KENxyzT0KENxyz"


def _write_config(server: Server, doc: object, mode: int = 0o600) -> Path:
    path = Path(config_path(str(server.root)))
    path.write_text(json.dumps(doc))
    path.chmod(mode)
    return path


def _check(server: Server) -> subprocess.CompletedProcess:
    cp = server.proc("watch", "--store", server.root, "--check-config", timeout=60)
    out = cp.stdout.decode() if isinstance(cp.stdout, bytes) else cp.stdout
    cp = subprocess.CompletedProcess(cp.args, cp.returncode, out, cp.stderr)
    assert "Traceback" not in cp.stderr and PASSWORD not in out + cp.stderr and TOKEN not in out + cp.stderr, \
        describe(cp)
    return cp


def _snapshot(top: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``top``, folders included: (mode, size, mtime_ns)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), top)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    st = os.lstat(top)
    out["."] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def good(server: Server, tmp_path: Path) -> Server:
    """Study s with an e-mail address, an Apprise URL and a hook; watch.json with smtp and an admin."""
    hook = tmp_path / "on-ingest"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    server.ok("study", "set", "s", "--store", server.root, "--notify", "pi@lab.example.org",
              "--notify", f"ntfys://{TOKEN}", "--hook", f"{hook} --quiet")
    server.ok("study", "add", "t", "--store", server.root, "--hook", "true")
    _write_config(server, {"admin": ["ops@lab.example.org"], "smtp": SMTP, "workers": 3})
    return server


def test_a_good_configuration_is_one_ok_line_and_exit_0(good: Server) -> None:
    cp = _check(good)
    assert cp.returncode == 0 and cp.stderr == "", describe(cp)
    assert cp.stdout.count("\n") == 1 and cp.stdout.startswith("watch configuration OK: "), describe(cp)
    assert "e-mail through mailtos://dittohead:***@smtp.example.org" in cp.stdout
    assert "2 studies, 3 notification addresses, 2 hooks" in cp.stdout, cp.stdout


def test_no_watch_json_is_the_defaults(server: Server) -> None:
    cp = _check(server)
    assert cp.returncode == 0 and "the defaults; no smtp; 1 study" in cp.stdout, describe(cp)


def test_a_mode_others_may_read_is_refused(good: Server) -> None:
    _write_config(good, {"admin": ["ops@lab.example.org"], "smtp": SMTP}, mode=0o644)
    cp = _check(good)
    assert cp.returncode == 1 and cp.stdout == "", describe(cp)
    want = f"{config_path(str(good.root))}: readable by others (mode 0644); it may hold a password: chmod 600 it"
    assert cp.stderr.splitlines() == [want], describe(cp)


def test_an_unknown_key_and_bad_values_one_line_each(good: Server) -> None:
    _write_config(good, {"smtp": f"smtp://dittohead:{PASSWORD}@smtp.example.org", "colour": "blue",
                         "workers": 0, "thresholds": [80, 120]})
    cp = _check(good)
    lines = cp.stderr.splitlines()
    assert cp.returncode == 1 and cp.stdout == "", describe(cp)
    conf = config_path(str(good.root))
    assert f"{conf}: unknown key 'colour' (known: abandoned_after_hours, admin, hook_timeout_seconds, " \
           "notify_retry_seconds, rescan_seconds, smtp, thresholds, workers)" in lines, lines
    assert f"{conf}: 'smtp' must be a mailto:// or mailtos:// URL, not smtp://***" in lines, lines
    assert f"{conf}: 'workers' must be a whole number from 1 to 64, not 0" in lines, lines
    assert f"{conf}: 'thresholds' must be a list of percentages from 1 to 100, not [80, 120]" in lines, lines
    # Without a usable smtp, the study's e-mail address cannot be sent to either: said too.
    assert any(line.startswith("study s: notify address 1 (pi@lab.example.org): an e-mail address, and "
                               "watch.json has no 'smtp'") for line in lines), lines
    assert len(lines) == 5, lines


def test_bad_addresses_and_hooks(good: Server, tmp_path: Path) -> None:
    not_executable = tmp_path / "not-executable"
    not_executable.write_text("#!/bin/sh\n")
    not_executable.chmod(0o644)
    good.ok("study", "set", "s", "--store", good.root, "--notify", "pi@lab.example.org",
            "--notify", f"slak://{TOKEN}/B000/XXXX", "--notify", "not an address",
            "--hook", str(not_executable))
    good.ok("study", "set", "t", "--store", good.root, "--hook", "no-such-program-here --x")
    _write_config(good, {"admin": [f"mailtos://ops:{PASSWORD}@", "ops@lab.example.org"], "smtp": SMTP})
    cp = _check(good)
    lines = cp.stderr.splitlines()
    assert cp.returncode == 1 and cp.stdout == "", describe(cp)
    conf = config_path(str(good.root))
    untaken = "Apprise does not take this URL (an unknown service, or a part it needs is missing or wrong)"
    assert lines == [
        f"{conf}: 'admin' address 1 (mailtos://ops:***@): {untaken}",
        f"study s: notify address 2 (slak://***): {untaken} (dittohead study set s --notify ...)",
        ("study s: notify address 3 (not an address): neither an e-mail address nor an Apprise URL: the daemon "
         "skips it (dittohead study set s --notify ...)"),
        (f"study s: hook: {not_executable}: not executable by this account (chmod +x it) "
         "(dittohead study set s --hook ...)"),
        ("study t: hook: no-such-program-here: not found in the hook's PATH (/usr/local/bin:/usr/bin:/bin): "
         "give its full path (dittohead study set t --hook ...)"),
    ], lines


def test_unreadable_study_settings(good: Server) -> None:
    Path(good.root / "store" / "studies" / "t.json").write_text("{not json")
    cp = _check(good)
    assert cp.returncode == 1 and cp.stderr.startswith("study t: ") and "bad study settings" in cp.stderr, \
        describe(cp)


def test_not_a_server_root(tmp_path: Path, server: Server) -> None:
    cp = server.proc("watch", "--store", tmp_path / "nothing", "--check-config", timeout=60)
    assert cp.returncode == 1 and cp.stderr.strip() == f"{tmp_path / 'nothing'}: no such server root", describe(cp)


def test_it_starts_no_daemon_takes_no_lock_and_writes_nothing(good: Server) -> None:
    daemon = good.root / "daemon"
    before = _snapshot(good.root)
    assert _check(good).returncode == 0
    assert _snapshot(good.root) == before
    assert not (daemon / "lock").exists() and not (daemon / "state.json").exists()
    assert not (daemon / "outbox").exists()
    # With a daemon running (its lock held), the check runs all the same: it never asks for it.
    lock = FileLock(daemon / "lock")
    lock.acquire()
    try:
        before = _snapshot(good.root)
        cp = _check(good)
        assert cp.returncode == 0, describe(cp)
        assert _snapshot(good.root) == before
    finally:
        lock.release()


def test_check_config_runs_alone(good: Server) -> None:
    for extra in (["--once"], ["--interval", "5"], ["--log-json"]):
        r = good.run("watch", "--store", good.root, "--check-config", *extra)
        assert r.exit_code == 2 and "--check-config runs alone" in r.output, describe(r)


def test_the_daemon_masks_a_password_in_a_value_it_refuses(server: Server) -> None:
    """At start and on SIGHUP the daemon says the first problem (config.load): no password in it."""
    _write_config(server, {"smtp": f"smtps://dittohead:{PASSWORD}@smtp.example.org"})
    with pytest.raises(UsageError) as e:
        load(str(server.root))
    assert PASSWORD not in str(e.value) and "'smtp' must be a mailto:// or mailtos:// URL" in str(e.value)
    _write_config(server, {"admin": "ops@lab.example.org", "workers": 0})
    with pytest.raises(UsageError, match="'admin' must be a list of addresses or URLs, not ops@lab.example.org"):
        load(str(server.root))
