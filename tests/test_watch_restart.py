"""What a stop or a crash of the watch daemon leaves for its next start, with the real daemon as
its own account (test_watch_daemon.py's ``Site``):

- an ingest committed whose export never happened (SIGTERM, or kill -9 of the daemon and its
  workers, while the worker exports; the export held at its first step by a FIFO where its
  record of the last clean export goes): the next start exports the study without a new
  submission, to the byte what a fresh ``dittohead export`` writes; a start with nothing
  behind exports nothing;
- an export destination the daemon cannot write: the failure is logged after the ingest and at
  each start, and the start after it is fixed catches up;
- a study's hook that is slow (sleeps) is running, two more are recorded behind it, when the
  daemon gets SIGTERM (it exits at once, the hook's process group killed, nothing reported as
  failed) or kill -9 (the hook's run outlives it): the next start ends a run left over, and runs
  the three, in order of seq, the first again;
- hooks recorded by the worker (run by hand, as the daemon runs it, with no daemon to hear its
  result: the daemon killed between its worker's ingest and the hook's start) are run at the
  next start, in order of seq, and their records removed.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest
from accounts import Accounts, make_dir
from test_watch_daemon import STOP_BOUND, Daemon, Site, describe, listdir, wait_for

from dittohead.daemon.hooks import process_start

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

MAKE_FIFO = """\
import os, sys
from dittohead.export import _LastExport
from dittohead.store.repo import Store
store = Store.open(sys.argv[1])
path = _LastExport(store, sys.argv[2], os.path.abspath(sys.argv[3])).path
if os.path.exists(path):
    os.unlink(path)
os.mkfifo(path, 0o600)
print(path)
"""


@pytest.fixture
def site(accounts: Accounts, acct_dir: Path) -> Site:
    """A server root of the daemon's account, no study yet (test_watch_daemon.py's ``site``)."""
    srv = make_dir(acct_dir / "srv", accounts.daemon, 0o755)
    s = Site(accounts, make_dir(acct_dir / "work", accounts.daemon, 0o755), srv / "root")
    s.as_daemon("init", "--store", s.root)
    return s


def tree(path: Path) -> tuple[dict[str, bytes | str], list[list[str]]]:
    """Every entry below ``path`` (a folder as "dir", a symlink as "-> TARGET", a file as its
    bytes), and which files are links of one another."""
    out: dict[str, bytes | str] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(path))
            if p.is_symlink():
                out[rel] = f"-> {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = p.read_bytes()
                inodes.setdefault(p.stat().st_ino, []).append(rel)
    return out, sorted(sorted(names) for names in inodes.values())


def exports(site: Site) -> Path:
    return make_dir(site.base / "exports", site.daemon, 0o755)


def assert_as_fresh_export(site: Site, study: str, dest: Path) -> None:
    """``dest`` holds what a fresh ``dittohead export`` of the study writes, to the byte."""
    ref = dest.parent / f"{dest.name}-fresh"
    site.as_daemon("export", "--store", site.root, "--study", study, ref)
    (got, got_links), (want, want_links) = tree(dest), tree(ref)
    assert sorted(got) == sorted(want)
    assert got == want and got_links == want_links


def export_lines(d: Daemon) -> list[str]:
    return [e["message"] for e in d.said("worker") if e["message"].startswith("export: ")]


# -- an export cut short by a stop, or by a kill ----------------------------------------------------


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_an_export_cut_short_is_done_at_the_next_start(site: Site, how: str) -> None:
    a = site.accounts.up_a
    dest = exports(site) / "e"
    site.add_study("e", "--export", dest)
    d = site.start()
    first = site.submit(a, "e")
    wait_for(lambda: site.receipt("e", first) and (dest / "current").is_dir(), 30, "the first export")
    wait_for(lambda: export_lines(d), 10, "the first export's line")

    # The next export stops at its first step: reading its record of the last clean export.
    cp = site.accounts.python_as(site.daemon, MAKE_FIFO, site.root, "e", dest)
    assert cp.returncode == 0, describe(cp)
    fifo = Path(cp.stdout.strip())
    for i in range(3):
        site.write(a, "e", f"more/{i}.csv", os.urandom(3000))
    second = site.sync(a, "e")
    wait_for(lambda: site.receipt("e", second), 30, "the second receipt")
    wait_for(lambda: site.worker_pids("e"), 10, "the worker, held in its export")
    wait_for(lambda: listdir(site.box("e", "processing")) == [], 10, "the submission's release")
    assert not (dest / "current" / "more").exists()

    if how == "sigterm":
        took = site.stop(d)
        print(f"\nSIGTERM during the export: stopped in {took:.2f} s")
    else:
        os.killpg(d.pid, signal.SIGKILL)
        d.proc.wait(timeout=10)
        wait_for(lambda: not site.worker_pids("e"), 10, "the worker's end")
    assert len(export_lines(d)) == 1, d.text()
    assert not (dest / "current" / "more").exists()
    fifo.unlink()

    d = site.start()
    wait_for(lambda: (dest / "current" / "more" / "2.csv").exists() and export_lines(d), 30,
             "the export at the start")
    (behind,) = d.said("export_behind")
    assert behind["study"] == "e" and "did not end clean" in behind["message"], behind
    assert not [e for e in d.events() if e.get("kind") in ("ingested", "rejected")], d.text()
    site.stop(d)
    assert_as_fresh_export(site, "e", dest)
    assert site.logged("e") == [first, second]

    # Nothing behind now: the next start exports nothing.
    d = site.start()
    site.stop(d)
    assert not d.said("export_behind") and not export_lines(d), d.text()


def test_an_export_that_fails_is_told_and_tried_again_at_each_start(site: Site) -> None:
    a = site.accounts.up_a
    parent = site.base / "not-yet"
    parent.mkdir(mode=0o755)  # root's: the daemon cannot make the destination in it
    dest = parent / "e"
    site.add_study("e", "--export", dest)
    d = site.start()
    name = site.submit(a, "e")
    wait_for(lambda: site.receipt("e", name), 30, "the receipt")

    def failed(d: Daemon) -> list[str]:
        return [e["message"] for e in d.said("worker") if "its export to" in e["message"]]

    wait_for(lambda: failed(d), 10, "the export's failure")
    assert "Permission denied" in failed(d)[0], failed(d)
    # ... and an event, notified as every failure is (to the study's addresses and the admin's)
    wait_for(lambda: [e for e in d.events() if e.get("kind") == "export_failed"], 10, "the export_failed event")
    (told,) = [e for e in d.events() if e.get("kind") == "export_failed"]
    assert told["study"] == "e" and told["dest"] == str(dest) and "Permission denied" in told["reason"], told
    site.stop(d)

    d = site.start()  # still not writable: behind, tried, told again
    wait_for(lambda: failed(d), 10, "the export's failure at the start")
    (behind,) = d.said("export_behind")
    assert "not exported yet" in behind["message"], behind
    site.stop(d)

    os.chown(parent, site.daemon.uid, site.daemon.gid)
    d = site.start()
    wait_for(lambda: export_lines(d), 30, "the export at the start")
    took = site.stop(d)
    assert took < STOP_BOUND
    assert not failed(d) and not [e for e in d.events() if e.get("kind") == "ingested"], d.text()
    assert_as_fresh_export(site, "e", dest)


# -- hooks due, across a stop or a kill ---------------------------------------------------------------


HOOK = """#!/bin/sh
echo "$DITTOHEAD_SEQ start $$" >> {log}
if [ "$DITTOHEAD_SEQ" = 1 ] && [ ! -e {fast} ]; then sleep 60; fi
echo "$DITTOHEAD_SEQ done" >> {log}
"""


def hook_study(site: Site, name: str = "h") -> Path:
    """Study ``name`` with HOOK as its hook; the hook's log file (written by the daemon's account)."""
    log = site.base / "hook.log"
    hook = site.base / "hook.sh"
    hook.write_text(HOOK.format(log=log, fast=site.base / "fast"))
    hook.chmod(0o755)
    site.add_study(name, "--hook", hook)
    return log


def lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def due(site: Site) -> list[str]:
    return [n for n in listdir(site.root / "daemon" / "hooks") if not n.startswith(".")]


def running(pid: int) -> bool:
    return process_start(pid) is not None


@pytest.mark.parametrize("how", ["sigterm", "systemd", "sigkill"])
def test_a_hook_cut_short_and_those_behind_it_run_at_the_next_start(site: Site, how: str) -> None:
    """SIGTERM to the daemon alone (it kills the hook), to every process at once as systemd's
    KillMode=control-group sends it (the hook may die before the daemon heeds its own), or kill
    -9 of the daemon and its workers (the hook, in a session of its own, goes on)."""
    a = site.accounts.up_a
    log = hook_study(site)
    d = site.start()
    site.submit(a, "h")
    (first,) = wait_for(lambda: lines(log), 30, "the first hook's start")
    pid = int(first.split()[2])
    assert first == f"1 start {pid}"
    for _ in range(2):
        site.submit(a, "h")
    wait_for(lambda: len(due(site)) == 3, 30, "the next two hooks recorded")
    assert lines(log) == [first] and running(pid)

    if how in ("sigterm", "systemd"):
        if how == "systemd":  # the hook dies first; the daemon heeds its own SIGTERM a moment later
            os.killpg(pid, signal.SIGTERM)
            time.sleep(0.3)
        took = site.stop(d)
        assert took < 10, f"took {took:.1f} s to stop"
        assert not running(pid), "the hook outlived the daemon's stop"
        print(f"\nSIGTERM ({how}) with a hook running: stopped in {took:.2f} s")
    else:
        os.killpg(d.pid, signal.SIGKILL)
        d.proc.wait(timeout=10)
        assert running(pid)  # a session of its own: it outlives a killed daemon
    assert not [e for e in d.events() if e.get("kind") == "hook_failed"], d.text()
    assert lines(log) == [first]
    assert sorted(json.loads((site.root / "daemon" / "hooks" / n).read_text())["seq"] for n in due(site)) == [1, 2, 3]

    (site.base / "fast").touch()
    d = site.start()
    wait_for(lambda: "3 done" in lines(log) and not due(site), 30, "the three hooks' runs")
    assert not running(pid)
    again = [ln.split()[:2] for ln in lines(log)[1:]]
    assert again == [["1", "start"], ["1", "done"], ["2", "start"], ["2", "done"], ["3", "start"], ["3", "done"]]
    said = [e["message"] for e in d.said("hook_due")]
    assert len(said) == 3 and "#1 began before" in said[0] and all("had not begun" in m for m in said[1:]), said
    if how == "sigkill":
        (ended,) = d.said("hook")
        assert f"(pid {pid}): ended" in ended["message"], ended
    site.stop(d)
    assert not [e for e in d.events() if e.get("kind") == "hook_failed"], d.text()


WORKER = "import sys\nfrom dittohead.daemon.worker import main\nsys.exit(main())\n"


def test_hooks_a_worker_recorded_are_run_at_the_next_start_in_order(site: Site) -> None:
    a = site.accounts.up_a
    log = hook_study(site)
    (site.base / "fast").touch()
    for seq in (1, 2, 3):
        site.submit(a, "h")
        cp = site.accounts.python_as(site.daemon, WORKER, site.root, "h", "--max-attempts", "3")
        assert cp.returncode == 0, describe(cp)
        (result,) = [doc for doc in map(json.loads, cp.stdout.splitlines()) if doc["type"] == "result"]
        assert result["ok"] and result["seq"] == seq, result
    folder = site.root / "daemon" / "hooks"
    assert due(site) == [f"h.{seq:012d}.json" for seq in (1, 2, 3)]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE((folder / n).stat().st_mode) == 0o600 for n in due(site))
    assert not log.exists()

    d = site.start()
    wait_for(lambda: "3 done" in lines(log) and not due(site), 30, "the recorded hooks' runs")
    assert [ln.split()[:2] for ln in lines(log)] == [
        ["1", "start"], ["1", "done"], ["2", "start"], ["2", "done"], ["3", "start"], ["3", "done"]]
    assert len(d.said("hook_due")) == 3
    time.sleep(0.2)
    site.stop(d)
    assert not [e for e in d.events() if e.get("kind") in ("hook_failed", "ingested")], d.text()
    assert len(lines(log)) == 6
