"""Thresholds of filesystems and quotas (dittohead/daemon/disks.py): once per crossing, kept
across a restart. The filesystems are real: a small tmpfs mounted for the test (as root; the
tests that need one skip with a reason where mount is refused)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Server

from dittohead.daemon import disks
from dittohead.daemon.config import WatchConfig
from dittohead.daemon.disks import Monitor, level_for
from dittohead.daemon.events import Event
from dittohead.store.layout import StudySettings
from dittohead.store.repo import Store

MIB = 1 << 20


def test_level_for() -> None:
    t = (80, 90, 95)
    assert level_for(50, 0, t) == 0
    assert level_for(85, 0, t) == 80
    assert level_for(97, 0, t) == 95  # several at once: one crossing, the highest
    assert level_for(89, 90, t) == 90  # just under: kept (no flapping at 90)
    assert level_for(87, 90, t) == 80  # well under: dropped, without a word
    assert level_for(90.5, 80, t) == 90  # and told again when crossed again
    assert level_for(77.9, 80, t) == 0
    assert level_for(79, 80, t) == 80


# -- a real small filesystem -------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs, mounted for the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(mnt)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def percent(path: Path) -> float:
    v = os.statvfs(path)
    used = (v.f_blocks - v.f_bfree) * v.f_frsize
    return 100.0 * used / (used + v.f_bavail * v.f_frsize)


class Filler:
    """Files of 64 KiB (under 1% of 8 MiB) added or removed until the filesystem is as full as
    asked."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.files: list[Path] = []

    def to(self, target: float) -> float:
        while percent(self.folder) < target:
            p = self.folder / f"f{len(self.files):04d}"
            p.write_bytes(b"\xa5" * (64 << 10))
            self.files.append(p)
        while self.files and percent(self.folder) >= target + 0.8:
            self.files.pop().unlink()
        return percent(self.folder)


def disk_events(events: list[Event], path: Path) -> list[Event]:
    assert all(e.kind in ("disk", "quota") for e in events)
    return [e for e in events if e.kind == "disk" and e.fields["path"] == str(path)]


def test_export_destination_crossing_thresholds(server: Server, tmpfs: Path) -> None:
    """A study's export destination on a small filesystem of its own: 80% then 90% told once
    each, nothing repeated (nor after a restart), and once when it is back under."""
    dest = tmpfs / "exports" / "s"  # not made yet: its filesystem is that of the nearest folder
    settings = {"s": StudySettings("s", export=str(dest))}
    root = str(server.root)
    fill = Filler(tmpfs / "filler")
    with Store.open(root) as store:
        mon = Monitor(root, WatchConfig())
        assert disk_events(mon.check(store, settings), dest) == []
        at = fill.to(85)
        assert 80 <= at < 90
        [ev] = disk_events(mon.check(store, settings), dest)
        assert ev.study == "s" and ev.fields["level"] == 80 and ev.fields["holds"] == "the export of study s"
        assert abs(ev.fields["percent"] - at) < 1 and ev.fields["size"] == 8 * MIB
        assert "is 8" in ev.subject() and str(dest) in ev.subject()
        assert disk_events(mon.check(store, settings), dest) == []  # not every minute
        at = fill.to(92)
        assert 90 <= at < 95
        [ev] = disk_events(mon.check(store, settings), dest)
        assert ev.fields["level"] == 90
        assert disk_events(mon.check(store, settings), dest) == []
        # A restart tells nothing again: the levels are in ROOT/daemon/levels.json.
        levels = server.root / "daemon" / disks.LEVELS_NAME
        assert stat.S_IMODE(levels.stat().st_mode) == 0o600
        assert json.loads(levels.read_text())["disk"][str(dest)] == 90
        assert not [p for p in levels.parent.iterdir() if p.name.startswith(".tmp-")]
        mon = Monitor(root, WatchConfig())
        assert disk_events(mon.check(store, settings), dest) == []
        fill.to(89.2)  # just under 90: no word, no flapping
        assert disk_events(mon.check(store, settings), dest) == []
        fill.to(30)
        [ev] = disk_events(mon.check(store, settings), dest)
        assert ev.fields["level"] == 0 and "back under" in ev.subject()
        assert disk_events(mon.check(store, settings), dest) == []
        # Crossed again: told again.
        fill.to(81)
        [ev] = disk_events(mon.check(store, settings), dest)
        assert ev.fields["level"] == 80


def test_store_and_export_on_one_filesystem(tmp_path: Path, tmpfs: Path) -> None:
    """The store's filesystem, holding an export destination too: looked at once, told once,
    to the admin (no study)."""
    server = Server(tmpfs).init()
    dest = tmpfs / "export-s"
    settings = {"s": StudySettings("s", export=str(dest)), "t": StudySettings("t")}
    fill = Filler(tmpfs / "filler")
    root = str(server.root)
    with Store.open(root) as store:
        mon = Monitor(root, WatchConfig(thresholds=(50, 75)))
        fill.to(60)
        events = mon.check(store, settings)
        [ev] = events
        assert ev.kind == "disk" and ev.study is None and ev.fields["path"] == os.path.join(root, "store")
        assert ev.fields["holds"] == "the store, the export of study s" and ev.fields["level"] == 50
        assert mon.check(store, settings) == []


# -- quotas ----------------------------------------------------------------------------------


def submit(server: Server, src: Path, name: str, size: int) -> None:
    (src / name).write_bytes(os.urandom(size))
    server.sync(src)
    server.ingest()


def test_quota_crossings(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    root = str(server.root)
    quota = 200 * 1024
    settings = {"s": StudySettings("s", quota=quota)}
    submit(server, src, "a.bin", 100 * 1024)  # 50%
    with Store.open(root) as store:
        mon = Monitor(root, WatchConfig())
        assert mon.check(store, settings) == []
    submit(server, src, "b.bin", 74 * 1024)  # 87%
    with Store.open(root) as store:
        [ev] = mon.check(store, settings)
        assert (ev.kind, ev.study, ev.fields["level"], ev.fields["used"], ev.fields["quota"]) == \
            ("quota", "s", 80, 174 * 1024, quota)
        assert ev.fields["percent"] == 87.0 and ev.subject() == "dittohead: study s is 87.0% of its quota"
        assert mon.check(store, settings) == []
    submit(server, src, "c.bin", 30 * 1024)  # 102%: past 90, 95 and the quota itself at once
    with Store.open(root) as store:
        [ev] = mon.check(store, settings)
        assert ev.fields["level"] == 100 and ev.fields["used"] == 204 * 1024
        # A restart: nothing again; the running total is that of every submission.
        mon = Monitor(root, WatchConfig())
        assert mon.check(store, settings) == []
        total = store.index.db.execute("SELECT sum(new_chunk_bytes), max(seq) FROM submissions "
                                       "WHERE study = 's'").fetchone()
        assert tuple(total) == (204 * 1024, 3)
        assert mon.state["quota"]["s"] == {"seq": 3, "bytes": 204 * 1024, "level": 100}
        # The look reads the submissions since the last, by the primary key: never the study's history.
        plan = " ".join(str(r[-1]) for r in store.index.db.execute("EXPLAIN QUERY PLAN " + disks.STORED_BYTES_SQL,
                                                                    ("s", 3)))
        assert "PRIMARY KEY" in plan and "seq>?" in plan.replace(" ", ""), plan
        # The quota raised: back under every threshold, told once.
        bigger = {"s": StudySettings("s", quota=10 * quota)}
        [ev] = mon.check(store, bigger)
        assert ev.fields["level"] == 0
        assert mon.check(store, bigger) == []
        # The quota dropped: nothing to watch, nothing kept.
        assert mon.check(store, {"s": StudySettings("s")}) == []
        assert "s" not in mon.state["quota"]


def test_never_raises(server: Server, tmp_path: Path) -> None:
    root = str(server.root)
    (server.root / "daemon").mkdir(exist_ok=True)
    (server.root / "daemon" / disks.LEVELS_NAME).write_text("{not json")
    with Store.open(root) as store:
        mon = Monitor(root, WatchConfig())  # an unreadable levels file: start from nothing
        settings = {"s": StudySettings("s", export="/proc/self/fdinfo/nonexistent/x", quota=1)}
        events = mon.check(store, settings)
        assert [e.kind for e in events if e.kind == "quota"] == []  # no submission yet: 0 bytes

        class Broken:
            root = store.root
            config = store.config

            @property
            def index(self) -> None:
                raise RuntimeError("no index")

        mon.check(Broken(), {"s": StudySettings("s", quota=1)})
