"""Filesystems and quotas crossing thresholds: told once per crossing, not at every look.

``Monitor.check(store, settings)`` looks at

- the filesystem holding the store (ROOT/store) and the one holding each study's export
  destination (its nearest existing folder, if it is not made yet), each filesystem once (by
  ``st_dev``): how full it is, as ``df`` counts it (used / (used + available to the daemon));
- each study with a quota (``study set --quota``): the bytes it holds in the store (the chunks
  it brought that it did not hold before, the index's ``new_chunk_bytes``), against that quota.

It returns a ``disk`` or ``quota`` event when a level is crossed upward: the highest threshold
(watch.json's ``thresholds``, default 80, 90, 95; for a quota 100 too: "the study passed its
quota") at or under the figure, if it is above the level already told. A figure that falls keeps
its level until it is ``HYSTERESIS`` points under it (so a disk that hovers at 90% is told once,
not every minute); the level then drops without a word, and a later rise past it is told again.
When a figure falls under every threshold (less the margin), one event with level 0 says so.

The levels told are kept in ROOT/daemon/levels.json (written to a temporary name, fsynced,
renamed), so a restart tells nothing again. So is each study's running total of stored bytes,
with the last submission it counts: a look costs one ``os.stat`` per path, one ``statvfs`` per
filesystem, and, per study with a quota, one query over the submissions since the last look (a
range of the submissions table's primary key), never a sum over the study's whole history.

A disk event names the filesystem by the first path found on it (the store's, if it is there),
says what it holds (``holds``), and carries the study when it holds the export of one study and
nothing else of the server's (its notices then go to that study's addresses too).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from dittohead import fsutil
from dittohead.daemon.config import WatchConfig, daemon_dir
from dittohead.daemon.events import Event
from dittohead.display import escape
from dittohead.store.layout import StudySettings

log = logging.getLogger(__name__)

LEVELS_NAME = "levels.json"
LEVELS_VERSION = 1
LEVELS_MAX_SIZE = 4 << 20
HYSTERESIS = 2.0  # percentage points a figure falls under a level before that level is dropped
# A study's stored bytes since the last look: a range of the submissions' primary key (study, seq).
STORED_BYTES_SQL = ("SELECT coalesce(sum(new_chunk_bytes), 0), max(seq) FROM submissions "
                    "WHERE study = ? AND seq > ?")


@dataclass
class _Filesystem:
    path: str  # the first path of ours on it: the name it is told by
    probe: str  # that path, or its nearest existing parent: what statvfs is asked about
    holds: list[str] = field(default_factory=list)
    studies: list[str] = field(default_factory=list)  # whose export is on it
    store: bool = False


def level_for(percent: float, told: int, thresholds: tuple[int, ...]) -> int:
    """The level a figure of ``percent`` is at, where ``told`` was the level last told: a
    threshold crossed upward raises it; a fall drops it only to the highest threshold (at most
    ``told``) that the figure is still within ``HYSTERESIS`` of."""
    up = max((t for t in thresholds if percent >= t), default=0)
    if up > told:
        return up
    return max((t for t in thresholds if t <= told and percent >= t - HYSTERESIS), default=0)


def _existing(path: str) -> tuple[str, os.stat_result] | None:
    """``path``, or its nearest existing parent (an export destination not made yet is made on
    that filesystem), with its stat; None if nothing on the way can be looked at."""
    p = os.path.abspath(path)
    while True:
        try:
            return p, os.stat(p)
        except FileNotFoundError:
            parent = os.path.dirname(p)
            if parent == p:
                return None
            p = parent


def _percent(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 1) if whole > 0 else (100.0 if part > 0 else 0.0)


class Monitor:
    """Thresholds of the store's filesystem, the export destinations' and the studies' quotas
    (see the module's docstring). Not thread-safe: one caller, the daemon's loop."""

    def __init__(self, root_path: str, config: WatchConfig) -> None:
        self.root_path = os.path.abspath(root_path)
        self.config = config
        self.path = os.path.join(daemon_dir(self.root_path), LEVELS_NAME)
        self._failing: set[str] = set()  # paths whose look failed (logged once until it works again)
        self.state = self._load()

    def reconfigure(self, config: WatchConfig) -> None:
        """watch.json read again (SIGHUP): new thresholds apply from the next look."""
        self.config = config

    # -- levels.json
    def _empty(self) -> dict[str, Any]:
        return {"version": LEVELS_VERSION, "store_id": None, "disk": {}, "quota": {}}

    def _load(self) -> dict[str, Any]:
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return self._empty()
        except OSError as e:
            log.error("disks: cannot read %s (%s): every level starts from nothing", self.path, e.strerror)
            return self._empty()
        try:
            with os.fdopen(fd, "rb") as f:
                doc = json.loads(f.read(LEVELS_MAX_SIZE + 1))
            if (not isinstance(doc, dict) or doc.get("version") != LEVELS_VERSION
                    or not isinstance(doc.get("disk"), dict) or not isinstance(doc.get("quota"), dict)):
                raise ValueError("not a levels file of this dittohead")
            disk = {k: v for k, v in doc["disk"].items() if isinstance(k, str) and isinstance(v, int)}
            quota = {k: v for k, v in doc["quota"].items() if isinstance(k, str) and isinstance(v, dict)
                     and all(isinstance(v.get(x), int) for x in ("seq", "bytes", "level"))}
            return {"version": LEVELS_VERSION, "store_id": doc.get("store_id"), "disk": disk, "quota": quota}
        except (OSError, ValueError) as e:
            log.error("disks: %s is unreadable (%s): every level starts from nothing", self.path, e)
            return self._empty()

    def _save(self) -> None:
        data = (json.dumps(self.state, indent=1, sort_keys=True) + "\n").encode()
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            fsutil.replace_file(self.path, data)
        except OSError as e:
            # Kept in memory: told once in this run still; a restart may tell it again.
            log.error("disks: cannot write %s (%s)", self.path, e.strerror or e)

    # -- looking
    def check(self, store: Any, settings: dict[str, StudySettings]) -> list[Event]:
        """The events of thresholds crossed since the last look (``store``: the server root's
        ``dittohead.store.repo.Store``). Never raises."""
        before = json.dumps(self.state, sort_keys=True)
        events: list[Event] = []
        try:
            store_id = store.config.store_id
            if self.state.get("store_id") != store_id:
                if self.state.get("store_id") is not None:
                    log.warning("disks: %s is another store's: the quotas' running totals start again", self.path)
                self.state["quota"] = {}
                self.state["store_id"] = store_id
        except Exception as e:  # noqa: BLE001
            log.error("disks: cannot read the store's config: %s", e)
        for look in (self._disks, self._quotas):
            try:
                events += look(store, settings)
            except Exception as e:  # noqa: BLE001 - a look that fails must not stop the daemon
                log.error("disks: %s failed: %s: %s", look.__name__.strip("_"), type(e).__name__, e)
        if json.dumps(self.state, sort_keys=True) != before:
            self._save()
        return events

    def _filesystems(self, store: Any, settings: dict[str, StudySettings]) -> dict[int, _Filesystem]:
        wanted: list[tuple[str, str, str | None]] = [(store.root.store, "the store", None)]
        for name in sorted(settings):
            dest = settings[name].export
            if dest:
                wanted.append((dest, f"the export of study {name}", name))
        out: dict[int, _Filesystem] = {}
        for path, what, study in wanted:
            try:
                found = _existing(path)
            except OSError as e:
                self._fail(path, f"cannot look at it: {e.strerror or e}")
                continue
            if found is None:
                self._fail(path, "nothing on its way exists")
                continue
            fs = out.setdefault(found[1].st_dev, _Filesystem(os.path.abspath(path), found[0]))
            if what not in fs.holds:
                fs.holds.append(what)
            if study is None:
                fs.store = True
            else:
                fs.studies.append(study)
        return out

    def _fail(self, path: str, why: str) -> None:
        if path not in self._failing:
            self._failing.add(path)
            log.warning("disks: %s: %s (not watched until it can be)", escape(path), why)

    def _disks(self, store: Any, settings: dict[str, StudySettings]) -> list[Event]:
        events: list[Event] = []
        seen: set[str] = set()
        for fs in self._filesystems(store, settings).values():
            try:
                v = os.statvfs(fs.probe)
            except OSError as e:
                self._fail(fs.path, f"statvfs: {e.strerror or e}")
                continue
            self._failing.discard(fs.path)
            size = v.f_blocks * v.f_frsize
            used = (v.f_blocks - v.f_bfree) * v.f_frsize
            avail = v.f_bavail * v.f_frsize
            if size <= 0:
                continue  # a filesystem that tells nothing (some FUSE ones)
            percent = _percent(used, used + avail)
            key = fs.path
            seen.add(key)
            told = int(self.state["disk"].get(key, 0))
            level = level_for(percent, told, self.config.thresholds)
            self.state["disk"][key] = level
            if level > told or (level == 0 and told > 0):
                study = fs.studies[0] if len(fs.studies) == 1 and not fs.store else None
                events.append(Event("disk", study=study, fields={
                    "path": fs.path, "percent": percent, "level": level, "used": used, "size": size,
                    "holds": ", ".join(fs.holds)}))
        for key in [k for k in self.state["disk"] if k not in seen]:
            del self.state["disk"][key]  # no longer watched (an export dropped): starts afresh if it returns
        return events

    def _quotas(self, store: Any, settings: dict[str, StudySettings]) -> list[Event]:
        events: list[Event] = []
        thresholds = tuple(sorted({*self.config.thresholds, 100}))
        quotas = {name: s.quota for name, s in settings.items() if s.quota is not None}
        for name in [n for n in self.state["quota"] if n not in quotas]:
            del self.state["quota"][name]
        if not quotas:
            return events
        db = store.index.db
        for name in sorted(quotas):
            quota = int(quotas[name])  # type: ignore[arg-type]
            q = dict(self.state["quota"].get(name) or {"seq": 0, "bytes": 0, "level": 0})
            try:
                added, last = db.execute(STORED_BYTES_SQL, (name, q["seq"])).fetchone()
            except sqlite3.Error as e:
                log.error("disks: cannot read study %s's stored bytes from the index: %s", name, e)
                continue
            if last is not None:
                q["bytes"] += int(added)
                q["seq"] = int(last)
            percent = _percent(q["bytes"], quota)
            told = int(q["level"])
            q["level"] = level_for(percent, told, thresholds)
            self.state["quota"][name] = q
            if q["level"] > told or (q["level"] == 0 and told > 0):
                events.append(Event("quota", study=name, fields={
                    "study": name, "used": q["bytes"], "quota": quota, "percent": percent, "level": q["level"]}))
        return events
