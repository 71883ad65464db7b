"""Housekeeping: what the daemon does besides ingesting, at each rescan (docs/watch-housekeeping.md).

- **Abandoned staging folders.** A client's staging folder (``inbox/.NAME``) that nothing has
  touched for ``abandoned_after_hours`` (the newest change time of the folder and of the entries
  in it, by ``lstat``: nothing in it is opened, no symlink followed) is set aside: renamed within
  the inbox to ``.~abandoned-NAME-RANDOM``, a dot name that the ingest ignores, that no client
  makes and that the uploader, unable to list the inbox, cannot find by name. It cannot go
  further: the folder is the uploader's, mode 0750, and Linux moves a folder to another parent
  only for an account that may write into it (``..`` changes), which the daemon may not. The
  uploader keeps whatever descriptors it holds (a rename does not touch them): what it writes
  through them lands in the set-aside folder, on its own account. Its next sync finds its
  staging folder gone and starts afresh. Each move is an ``abandoned`` event.
- **Have-segment compaction.** One segment per ingest adds up to thousands of small files that
  every new client lists and reads. Once a study has ``compact_at`` segments smaller than
  ``small_segment`` bytes (besides the newest submission's, which ``Store.committed_seq`` reads
  by its name), they are merged into as few segments as ``fmt.HAVE_MAX_SIZE`` allows, named
  ``FIRST-LAST-HASH.have`` (the range of submissions, and 16 hex digits of the segment's BLAKE3,
  so that a name is only ever written with the same bytes). The merged segments are written
  (durably, under a temporary name, then linked into place) before any small one is removed: a
  client that lists the folder meanwhile finds every id in the old names or in the new ones, and
  one that listed the old names and finds one gone lists again (``client.sync._refresh_have``).
  A damaged segment is left as it is (fsck reports it). Only ``have/``, the daemon's own, is
  touched: no store lock.
- **Held-back submissions** (damage in the store, see ``store.ingest``) are retried after a
  delay that doubles at each attempt that ends held back again: 1 minute, 2, 4... up to an hour.
  The delays are kept in ``ROOT/daemon/held.json`` (replaced atomically), so a restart keeps them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dittohead import format as fmt
from dittohead import fsutil, records
from dittohead.daemon.config import WatchConfig, daemon_dir
from dittohead.daemon.events import Event
from dittohead.display import escape
from dittohead.errors import FormatError
from dittohead.hashing import digest
from dittohead.store.layout import ServerRoot

if TYPE_CHECKING:
    from dittohead.store.repo import Store

log = logging.getLogger(__name__)

ABANDONED_PREFIX = ".~abandoned-"  # inbox/.~abandoned-NAME-RANDOM: a staging folder set aside
HELD_NAME = "held.json"  # ROOT/daemon/held.json
HELD_MAX_SIZE = 4 * 1024 * 1024
RETRY_FIRST = 60.0  # seconds before the first retry of a held-back submission
RETRY_MAX = 3600.0  # the delay doubles up to this
COMPACT_AT = 32  # small segments a study gathers before they are merged
SMALL_SEGMENT = 1024 * 1024  # bytes: a segment under this is merged (about 32,000 chunk ids)
ENTRIES_LOOKED_AT = 10_000  # entries of a staging folder lstat'ed for its age, at most

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR_FLAGS = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0)
              | getattr(os, "O_CLOEXEC", 0))
# SEQ.have, SEQ.PART.have (the ingest's); FIRST-LAST-HASH.have (compaction's)
_SEGMENT_RE = re.compile(r"^(\d{10,})(?:-(\d{10,})-[0-9a-f]{16})?(?:\.\d+)?\.have\Z")


@dataclass(frozen=True)
class HeldBack:
    """A held-back submission: why, how many attempts ended held back, since when (the first of
    them) and when it may be tried again (``time.time()`` seconds)."""

    study: str
    submission: str
    reason: str
    attempts: int
    since: float
    retry_at: float

    def doc(self) -> dict:
        return {"study": self.study, "submission": self.submission, "reason": self.reason,
                "attempts": self.attempts, "since": self.since, "retry_at": self.retry_at}


def retry_delay(attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th attempt that ended held back."""
    return min(RETRY_FIRST * 2 ** min(max(attempts, 1) - 1, 32), RETRY_MAX)


def held_path(root_path: str) -> str:
    return os.path.join(daemon_dir(root_path), HELD_NAME)


def load_held(root_path: str) -> dict[tuple[str, str], HeldBack]:
    """ROOT/daemon/held.json as the daemon left it ({} if there is none; an entry that does not
    make sense is left out, a file that cannot be read is logged and counts as empty)."""
    path = held_path(root_path)
    try:
        doc = json.loads(fsutil.read_limited(path, HELD_MAX_SIZE))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("%s: cannot be read (%s); held-back submissions are retried at once", path, e)
        return {}
    out: dict[tuple[str, str], HeldBack] = {}
    for item in doc.get("held", []) if isinstance(doc, dict) else []:
        try:
            h = HeldBack(str(item["study"]), str(item["submission"]), str(item["reason"]), int(item["attempts"]),
                         float(item["since"]), float(item["retry_at"]))
        except (KeyError, TypeError, ValueError):
            continue
        if fmt.STUDY_NAME_RE.match(h.study) and fmt.SUBMISSION_NAME_RE.match(h.submission):
            out[(h.study, h.submission)] = h
    return out


class Housekeeper:
    """The daemon's housekeeping of one server root (see the module's docstring). ``run`` is
    called at each rescan; ``held``, ``cleared`` and ``retry_at`` by the ingest's loop."""

    def __init__(self, root_path: str, config: WatchConfig, *, clock: Callable[[], float] = time.time,
                 compact_at: int = COMPACT_AT, small_segment: int = SMALL_SEGMENT) -> None:
        self.root = ServerRoot(root_path)
        self.config = config  # replaced by the daemon on SIGHUP
        self.clock = clock
        self.compact_at = compact_at
        self.small_segment = small_segment
        self._held = load_held(self.root.path)

    # -- one pass
    def run(self, store: Store | None = None) -> list[Event]:
        """Set aside abandoned staging folders and compact have-segments, study by study; forget
        held-back submissions that have left processing/. A failure in one study's step is
        logged, returned as a ``daemon`` event (what "error") and costs only that step.
        ``store`` is the daemon's open store: no step here touches store/, so none takes its
        lock."""
        events: list[Event] = []
        for study in self.root.studies():
            for step in (self.sweep_abandoned, self.compact_have):
                try:
                    events += step(study)
                except OSError as e:
                    what = step.__name__.replace("_", " ")
                    log.warning("%s of study %s: %s", what, study, e)
                    events.append(Event("daemon", study, fields={"what": "error", "message": f"{what}: {e}"}))
        self._forget_finished()
        return events

    # -- abandoned staging folders
    def sweep_abandoned(self, study: str) -> list[Event]:
        """Set aside the staging folders of ``study`` untouched for longer than the configured age."""
        box = self.root.dropbox(study)
        limit_ns = int(self.config.abandoned_after_hours * 3600 * 1e9)
        try:
            inbox_fd = os.open(box.inbox, _DIR_FLAGS)
        except FileNotFoundError:
            return []
        events = []
        try:
            for name in os.listdir(inbox_fd):
                if not _is_staging_name(name):
                    continue  # committed, set aside, or no client's name: the ingest's rules
                st = fsutil.lstat_at(inbox_fd, name)
                if st is None or not stat.S_ISDIR(st.st_mode):
                    continue
                now_ns = int(self.clock() * 1e9)
                if now_ns - _changed_ns(st) <= limit_ns:
                    continue  # touched lately: not even looked into
                newest = _newest_ns(inbox_fd, name, st)
                if newest is None or now_ns - newest <= limit_ns:
                    continue
                again = fsutil.lstat_at(inbox_fd, name)
                if again is None or (again.st_ino, _changed_ns(again)) != (st.st_ino, _changed_ns(st)):
                    continue  # touched this very moment: next time
                target = _free_name(inbox_fd, f"{ABANDONED_PREFIX}{name[1:]}-")
                os.rename(name, target, src_dir_fd=inbox_fd, dst_dir_fd=inbox_fd)
                fsutil.fsync_dir_fd(inbox_fd)
                hours = round((now_ns - newest) / 3600e9, 1)
                log.info("set aside the abandoned staging folder %s/%s (untouched for %s h) as inbox/%s",
                         study, escape(name), hours, target)
                events.append(Event("abandoned", study, name[1:], fields={
                    "staging": name, "age_hours": hours, "moved_to": f"inbox/{target}"}))
        finally:
            os.close(inbox_fd)
        return events

    # -- have-segments
    def compact_have(self, study: str) -> list[Event]:
        """Merge the small have-segments of ``study`` once there are ``compact_at`` of them."""
        have = self.root.dropbox(study).have
        try:
            names = os.listdir(have)
        except FileNotFoundError:
            return []
        segments = []  # (first seq, last seq, name, size)
        for name in names:
            m = _SEGMENT_RE.match(name)
            if not m:
                continue
            st = _lstat(os.path.join(have, name))
            if st is None or not stat.S_ISREG(st.st_mode):
                continue
            first = int(m[1])
            segments.append((first, int(m[2] or first), name, st.st_size))
        if not segments:
            return []
        newest = max(last for _, last, _, _ in segments)
        full = fmt.HAVE_HEADER.size + (records.have_ids_max() + 1) * fmt.HASH_SIZE  # a full one: left as it is
        small = sorted((first, last, name) for first, last, name, size in segments
                       if size < min(self.small_segment, full) and last != newest)
        if len(small) < self.compact_at:
            return []
        ids: list[bytes] = []
        seen: set[bytes] = set()
        used = []
        for first, last, name in small:
            try:
                got = records.decode_have(fsutil.read_limited(os.path.join(have, name), fmt.HAVE_MAX_SIZE),
                                          what=f"have-segment {name}")
            except FileNotFoundError:
                continue
            except (ValueError, FormatError) as e:
                log.warning("study %s: %s; left as it is (fsck reports it)", study, e)
                continue
            used.append((first, last, name))
            for cid in got:
                if cid not in seen:
                    seen.add(cid)
                    ids.append(cid)
        if len(used) < 2:
            return []
        first, last = used[0][0], max(u[1] for u in used)
        per = records.have_ids_max()
        written = []
        for i in range(0, len(ids), per):  # each within HAVE_MAX_SIZE
            data = records.encode_have(ids[i : i + per])
            name = f"{first:010d}-{last:010d}-{digest(data).hex()[:16]}{fmt.HAVE_SUFFIX}"
            path = os.path.join(have, name)
            if fsutil.write_new(path, data, mode=0o644, exist_ok=True):  # exists: the same bytes
                os.chmod(path, 0o644)  # every client reads it, whatever the daemon's umask
            written.append(name)
        fsutil.fsync_dir(have)  # the merged segments are durable before any small one goes
        for _, _, name in used:
            if name not in written:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(have, name))
        fsutil.fsync_dir(have)
        log.info("study %s: %d have-segments merged into %d (%d chunk ids)", study, len(used), len(written), len(ids))
        return [Event("daemon", study, fields={"what": "compacted", "segments": len(used), "into": len(written),
                                               "ids": len(ids)})]

    # -- held-back submissions
    def held(self, study: str, submission: str, reason: str) -> float:
        """Record that an attempt at ``submission`` ended held back: it is retried after a delay
        that doubles with each such attempt (1 minute, 2, 4... at most an hour). Returns when."""
        now = self.clock()
        prev = self._held.get((study, submission))
        attempts = prev.attempts + 1 if prev else 1
        h = HeldBack(study, submission, reason, attempts, prev.since if prev else now, now + retry_delay(attempts))
        self._held[(study, submission)] = h
        self._save()
        return h.retry_at

    def cleared(self, study: str, submission: str) -> None:
        """``submission`` was ingested or rejected: no delay any more."""
        if self._held.pop((study, submission), None) is not None:
            self._save()

    def retry_at(self, study: str, submission: str) -> float | None:
        """When ``submission`` may be tried again (``time.time()`` seconds), or None if it is not
        held back (try it now)."""
        h = self._held.get((study, submission))
        return h.retry_at if h else None

    def held_back(self) -> list[HeldBack]:
        return sorted(self._held.values(), key=lambda h: (h.study, h.submission))

    def _forget_finished(self) -> None:
        """Held-back submissions no longer in processing/ (finished, or an admin moved them)."""
        gone = [key for key in self._held
                if not os.path.lexists(os.path.join(self.root.dropbox(key[0]).processing, key[1]))]
        for key in gone:
            del self._held[key]
        if gone:
            self._save()

    def _save(self) -> None:
        directory = daemon_dir(self.root.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        data = json.dumps({"held": [h.doc() for h in self.held_back()]}, indent=1).encode() + b"\n"
        fsutil.replace_file(held_path(self.root.path), data)  # the daemon's own state: replaced, not kept


def _is_staging_name(name: str) -> bool:
    return name.startswith(fmt.STAGING_PREFIX) and bool(fmt.SUBMISSION_NAME_RE.match(name[1:]))


def _changed_ns(st: os.stat_result) -> int:
    """The last change the kernel saw: mtime, or ctime where that is later (an uploader can set
    a file's mtime back, not its ctime)."""
    return max(st.st_mtime_ns, st.st_ctime_ns)


def _newest_ns(inbox_fd: int, name: str, st: os.stat_result) -> int | None:
    """The last change to the staging folder ``name`` or to an entry in it (lstat only; the
    first ENTRIES_LOOKED_AT entries); None if ``name`` is no longer the folder ``st`` describes.
    A folder the daemon cannot list counts by its own times."""
    newest = _changed_ns(st)
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=inbox_fd)
    except OSError:
        return newest
    try:
        if os.fstat(fd).st_ino != st.st_ino:
            return None  # replaced meanwhile
        with os.scandir(fd) as it:
            for i, entry in enumerate(it):
                if i >= ENTRIES_LOOKED_AT:
                    break
                with contextlib.suppress(OSError):
                    newest = max(newest, _changed_ns(entry.stat(follow_symlinks=False)))
    except OSError:
        pass
    finally:
        os.close(fd)
    return newest


def _free_name(dir_fd: int, prefix: str) -> str:
    while True:
        name = prefix + secrets.token_hex(8)
        if fsutil.lstat_at(dir_fd, name) is None:
            return name


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
