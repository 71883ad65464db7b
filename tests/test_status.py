"""``dittohead status`` (dittohead/cli/status.py), and what a collector's ``sync`` says of its
earlier submissions.

status: per study, what waits in the inbox, is in processing, held back (reason, next retry) or
failed lately (REASON), and the last ingest; the daemon's state from ROOT/daemon/state.json
(running or not: a dead pid, or a pid that another process took since, is not running), the
notifications pending and the outbox; with no state file it says the daemon never ran. --json
prints one document of a fixed shape. It runs as the daemon's account; another account gets one
line and exit 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from accounts import Accounts, make_dir
from conftest import Server, describe, write_file

from dittohead import format as fmt
from dittohead.client.sync import _made_ns, ago
from dittohead.daemon.config import WatchConfig
from dittohead.daemon.housekeeping import Housekeeper
from dittohead.store.index import Index

BAD = "20260101T000000Z-bad"


@pytest.fixture
def busy(server: Server, tmp_path: Path) -> dict[str, str]:
    """Study s with one ingest (#1), one rejected submission and one waiting; study t, empty."""
    server.ok("study", "add", "t", "--store", server.root)
    src = tmp_path / "src"
    write_file(src / "a.txt", b"alpha\n")
    first = server.sync(src).submission
    server.ingest()
    write_file(server.dropbox("inbox") / BAD / fmt.MANIFEST_NAME, b"not a manifest")
    server.ingest(expect=1)
    write_file(src / "b.txt", b"beta\n")
    waiting = server.sync(src).submission
    assert first and waiting
    return {"first": first, "waiting": waiting}


def _status(server: Server, *extra: str) -> str:
    return server.ok("status", "--store", server.root, *extra).stdout


def test_status_without_a_daemon(server: Server, busy: dict[str, str]) -> None:
    lines = _status(server).splitlines()
    assert lines[0] == "daemon: not running (it has never run here: no daemon/state.json)"
    assert lines[1].startswith("study s: 1 waiting (oldest arrived just now), 0 in processing, 0 held back, "
                               "1 failed; last ingest #1 at "), lines
    assert lines[2].startswith(f"  failed: {BAD} (") and "manifest" in lines[2], lines
    assert lines[3] == "study t: 0 waiting, 0 in processing, 0 held back, 0 failed; nothing ingested yet"
    assert len(lines) == 4, lines


def test_status_json_schema(server: Server, busy: dict[str, str]) -> None:
    doc = json.loads(_status(server, "--json"))
    assert set(doc) == {"root", "time_ns", "daemon", "studies"}
    assert doc["daemon"] == {"state_file": False, "running": False, "pid": None, "started_ns": None,
                             "stopped_ns": None, "last_rescan_ns": None, "notifications_pending": None,
                             "outbox": 0}
    s, t = doc["studies"]
    assert set(s) == {"name", "waiting", "processing", "held", "failed", "failed_total", "abandoned",
                      "last_ingest"}
    assert s["waiting"]["count"] == 1 and s["waiting"]["names"] == [busy["waiting"]]
    assert isinstance(s["waiting"]["oldest_ns"], int)
    assert s["processing"] == [] and s["held"] == [] and s["failed_total"] == 1 and s["abandoned"] == 0
    assert [set(f) for f in s["failed"]] == [{"name", "reason", "time_ns"}] and s["failed"][0]["name"] == BAD
    assert s["last_ingest"]["seq"] == 1 and isinstance(s["last_ingest"]["time_ns"], int)
    assert t["name"] == "t" and t["waiting"] == {"count": 0, "oldest_ns": None, "names": []}
    assert t["last_ingest"] is None


def test_latest_ingests_read_from_the_index(server: Server, tmp_path: Path) -> None:
    """Index.latest_ingests: what status and the daemon's state show as each study's last ingest."""
    index = str(server.root / "store" / "index.sqlite")
    assert not os.path.exists(index)  # a fresh server: nothing ingested, no index yet
    assert Index.latest_ingests(index, ["s", "t"]) == {"s": (0, 0), "t": (0, 0)}
    assert not os.path.exists(index)  # a reader's look makes nothing
    write_file(tmp_path / "src" / "a.txt", b"a\n")
    server.sync(tmp_path / "src")
    before = time.time_ns()
    server.ingest()
    got = Index.latest_ingests(index, ["s", "t"])
    assert got["t"] == (0, 0) and got["s"][0] == 1 and before <= got["s"][1] <= time.time_ns(), got
    assert Index.latest_ingests(index, []) == {}


def test_a_fresh_server_has_no_index_and_says_nothing_of_it(server: Server) -> None:
    """After init and study add, before any ingest, there is no index yet: that is no warning."""
    server.ok("study", "add", "t", "--store", server.root)
    assert not (server.root / "store" / "index.sqlite").exists()
    cp = server.proc("status", "--store", server.root)
    assert cp.returncode == 0 and cp.stderr == "", describe(cp)
    assert cp.stdout.decode().splitlines()[1:] == [
        "study s: 0 waiting, 0 in processing, 0 held back, 0 failed; nothing ingested yet",
        "study t: 0 waiting, 0 in processing, 0 held back, 0 failed; nothing ingested yet"], describe(cp)
    cp = server.proc("status", "--store", server.root, "--json")
    assert cp.returncode == 0 and cp.stderr == "" and "index_error" not in json.loads(cp.stdout), describe(cp)


def _index_trouble(server: Server) -> str:
    """status's warning about the index (and that it still shows everything else)."""
    cp = server.proc("status", "--store", server.root)
    assert cp.returncode == 0 and "Traceback" not in cp.stderr, describe(cp)
    (line,) = cp.stderr.splitlines()
    assert line.startswith("warning: the index ") and line.endswith(": last ingests not shown"), line
    assert "study s: 0 waiting, 0 in processing, 0 held back, 0 failed" in cp.stdout.decode(), describe(cp)
    doc = json.loads(server.proc("status", "--store", server.root, "--json").stdout)
    assert doc["index_error"] == line.removeprefix("warning: ").removesuffix(": last ingests not shown")
    return line


@pytest.mark.parametrize("harm", ["garbage", "other schema", "missing"])
def test_a_broken_index_still_warns(server: Server, tmp_path: Path, harm: str) -> None:
    write_file(tmp_path / "src" / "a.txt", b"a\n")
    server.sync(tmp_path / "src")
    server.ingest()
    index = server.root / "store" / "index.sqlite"
    if harm == "garbage":
        for suffix in ("-wal", "-shm"):
            Path(f"{index}{suffix}").unlink(missing_ok=True)
        index.write_bytes(b"not an index, whatever it was" * 200)
        assert "cannot be read" in _index_trouble(server)
    elif harm == "other schema":
        import sqlite3

        db = sqlite3.connect(index)
        db.execute("UPDATE meta SET value = 3 WHERE key = 'schema'")
        db.commit()
        db.close()
        assert "another dittohead version" in _index_trouble(server)
    else:  # an index lost on a server with ingests: not a fresh server's "nothing ingested yet"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{index}{suffix}").unlink(missing_ok=True)
        assert "the index is missing, though the store holds ingests" in _index_trouble(server)


def _state(server: Server, **doc: object) -> None:
    state = server.root / "daemon"
    state.mkdir(mode=0o700, exist_ok=True)
    (state / "state.json").write_text(json.dumps(doc))


def test_status_with_a_running_daemon_held_and_outbox(server: Server, busy: dict[str, str]) -> None:
    now = time.time_ns()
    _state(server, pid=os.getpid(), started_ns=now, last_rescan_ns=now - 30_000_000_000,
           studies={"s": {}}, notifications_pending=2)
    outbox = server.root / "daemon" / "outbox"
    outbox.mkdir()
    for name in ("n1", "n2", "n3", ".tmp-n4"):
        (outbox / name).write_text("{}")
    (server.dropbox("processing") / "20260101T000000Z-h31d").mkdir()
    Housekeeper(str(server.root), WatchConfig()).held("s", "20260101T000000Z-h31d", "damage in the store: chunk X")
    (server.dropbox("processing") / "20260101T000000Z-n0w").mkdir()

    out = _status(server)
    assert out.startswith(f"daemon: running since {time.strftime('%Y-%m-%d %H:%M', time.gmtime(now / 1e9))}")
    first = out.splitlines()[0]
    assert f"(pid {os.getpid()}); last rescan just now; 2 notifications pending, 3 notices in the outbox" in first
    assert "1 in processing, 1 held back" in out
    assert "  in processing: 20260101T000000Z-n0w" in out
    assert ("  held back: 20260101T000000Z-h31d (attempt 1; next retry in 5" in out
            and "): damage in the store: chunk X" in out), out
    doc = json.loads(_status(server, "--json"))
    d = doc["daemon"]
    assert d["running"] is True and d["pid"] == os.getpid() and d["notifications_pending"] == 2 and d["outbox"] == 3
    held = doc["studies"][0]["held"]
    assert [(h["submission"], h["attempts"]) for h in held] == [("20260101T000000Z-h31d", 1)]
    assert held[0]["retry_at_ns"] > now


def test_status_of_a_daemon_that_is_gone(server: Server) -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    _state(server, pid=p.pid, started_ns=time.time_ns(), last_rescan_ns=time.time_ns(), studies={},
           notifications_pending=0)
    assert _status(server).startswith(f"daemon: NOT RUNNING (last seen as pid {p.pid}, started ")
    # Stopped cleanly (SIGTERM): said as it is, not as an alarm.
    _state(server, pid=p.pid, started_ns=time.time_ns(), stopped_ns=time.time_ns(), studies={},
           notifications_pending=0)
    assert _status(server).startswith("daemon: not running (stopped at ")
    # A pid another process took since: this test's own, which began before the daemon did.
    _state(server, pid=os.getpid(), started_ns=time.time_ns() + 3_600_000_000_000, studies={})
    assert json.loads(_status(server, "--json"))["daemon"]["running"] is True
    _state(server, pid=os.getpid(), started_ns=time.time_ns() - 10 * 86_400_000_000_000, studies={})
    assert json.loads(_status(server, "--json"))["daemon"]["running"] is False


def test_status_is_the_daemons(accounts: Accounts, acct_dir: Path) -> None:
    root = make_dir(acct_dir / "srv", accounts.daemon, 0o755) / "root"
    for args in (("init", "--store", root), ("study", "add", "s", "--store", root)):
        assert accounts.run_as(accounts.daemon, *args).returncode == 0
    cp = accounts.run_as(accounts.daemon, "status", "--store", root)
    assert cp.returncode == 0 and cp.stdout.startswith("daemon: not running"), describe(cp)
    assert cp.stderr == "", describe(cp)  # no index yet on a fresh server: nothing to warn of
    cp = accounts.run_as(accounts.up_a, "status", "--store", root)
    assert cp.returncode == 1 and "Traceback" not in cp.stderr, describe(cp)
    assert len(cp.stderr.strip().splitlines()) == 1 and "permission denied" in cp.stderr, describe(cp)


# -- sync: earlier submissions -----------------------------------------------------------------


def test_sync_says_once_which_earlier_submissions_wait(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_file(src / "a.txt", b"a\n")
    first = server.sync(src).submission
    write_file(src / "b.txt", b"b\n")
    second = server.sync(src)
    assert f"note: earlier submission {first} is waiting to be ingested (sent just now)" in second.result.stderr
    write_file(src / "c.txt", b"c\n")
    third = server.sync(src)
    notes = [line for line in third.result.stderr.splitlines() if "waiting" in line]
    assert notes == [f"note: 2 earlier submissions are waiting to be ingested; the oldest is {first} (sent just now)"]
    server.ingest()
    done = server.sync(src)
    assert "waiting" not in done.result.stderr
    assert done.result.stderr.count("was ingested as #") == 3, done.result.stderr


def test_how_long_ago() -> None:
    assert [ago(s) for s in (-5, 0, 59, 60, 7199, 7200, 47 * 3600, 48 * 3600, 30 * 86400)] == [
        "just now", "just now", "just now", "1 min ago", "119 min ago", "2 h ago", "47 h ago", "2 days ago",
        "30 days ago"]
    assert _made_ns("20261129T101502Z-0a1b2c3d4e5f.0002") == 1795947302 * 10**9
    assert _made_ns("made-by-hand") is None
