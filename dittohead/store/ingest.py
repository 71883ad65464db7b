"""Ingest: turn committed submissions in the drop boxes into store history.

For each committed submission (a folder in ``inbox/`` without a leading dot), in the order the
server saw them arrive: record it in ``processing/NAME/`` (the daemon's own folder, with its
``STATE``); take it, copying its files there by descriptor (``intake``: the uploader keeps what
it made, so nothing of it is read twice or kept); verify the copies (invariant 3: only regular,
singly-linked files named ``manifest`` or ``<64 hex>.pack``; the manifest decodes strictly and
names this study; every pack's trailer is sound and every chunk matches its id; every chunk the
manifest references is held by the study already or carried by this submission, with the right
length; every new version's bytes hash to its file hash); then store the chunks new to the store
(adopting a copy that is exactly a pack the server would write, ``_adoptable``, or writing them
into server packs), store the manifest, append the study-log record (the commit point, fsynced),
update the index, publish the have-segment and the receipt, release the uploader's folder and
move the daemon's to ``done/``. A rejected submission's folder goes to ``failed/`` with a REASON
file, and the store does not change. Any failure met while taking and verifying one submission
is that submission's (``_process``), but the server's own (a full disk, the store): one
submission costs only itself.

Damage in the store is never blamed on a submission: one whose verification needs a stored chunk
that fails its hash (or whose pack is missing) is **held back**, not rejected. It stays in
``processing/``, the store does not change, an error line names the chunk and pack and asks for
``dittohead fsck --read-data``, and the next run tries it again. The study's later submissions
that list any of its paths wait behind it, left in the inbox (each path's history keeps the
order of arrival); everything else is ingested as usual.

Locks (one writer, many readers; docs/server-root.md): a study is ingested by one ingest at a
time, holding the study's lock (``StudyLock``: a flock on its ``processing/``), which keeps its
submissions in their order; studies go on beside one another (``watch``'s workers, one process
per submission). Taking and verifying a submission reads the index read-only, as any reader
does, and writes only the daemon's own copies and new server packs, into the ingest's own
folder of ``store/tmp/`` (``WorkDir``, swept by ``sweep_tmp`` once its ingest has ended); only
the commit (packs and manifest into place, the log record, the index) holds the store's lock,
for a moment. The index is caught up under that lock, and asked again whether the submission is
in the log, so that no commit is made twice.

Crash safety (invariant 2): every step before the commit point only adds content-addressed
objects (a redo writes the same names); every step after it is derived from the log and redone
if missing. ``processing/`` is resumed first at every start: a submission the log names is
finished, one with a REASON is rejected, any other is taken afresh from the inbox (the uploader's
folder stays there until the submission is ingested or rejected); an attempt the daemon died in
counts against it (``STATE``), and at ``max_attempts`` it is set aside.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

from dittohead import directio, fsutil, pack, records, studylog
from dittohead import format as fmt
from dittohead import manifest as mf
from dittohead.chunking import pack_chunk_list
from dittohead.display import escape
from dittohead.errors import (
    DittoheadError,
    FormatError,
    IntegrityError,
    LockedError,
    RejectedSubmission,
    StoreError,
)
from dittohead.hashing import blake3
from dittohead.lock import FileLock, Held
from dittohead.store import intake
from dittohead.store.layout import MAX_ATTEMPTS, StudyDropbox
from dittohead.store.objects import TmpFile
from dittohead.store.repo import Store, manifest_key, pack_key

log = logging.getLogger(__name__)

STATE_NAME = "STATE"  # processing/NAME/STATE: the daemon's record of where a submission stands
WORKDIR_PREFIX = "ingest-"  # store/tmp/ingest-PID-RANDOM/: one ingest's temporaries (WorkDir)
WORKDIR_GRACE_NS = 60 * 10**9  # a folder this young is left alone by the sweep, locked or not


class Stopped(BaseException):
    """A stop asked for by a signal (``watch``'s worker on SIGTERM), met outside a commit: the
    attempt at the submission in hand ends, and does not count against it."""


def _waited(take: Callable[[], bool], wait: float) -> bool:
    """Try ``take`` (one try at a lock, without waiting: True if it got it) until it succeeds
    or ``wait`` seconds have passed (at least once), pausing 5 ms between tries, then twice as
    long each time, up to 0.1 s; False if it never got it."""
    deadline = time.monotonic() + wait
    pause = 0.005
    while not take():
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.1)
    return True


def _flock(fd: int, wait: float) -> bool:
    """flock(2) ``fd`` exclusively, waiting up to ``wait`` seconds; False if another holds it."""
    import fcntl

    def take() -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    return _waited(take, wait)


class StudyLock:
    """One ingest per study at a time: an exclusive flock on the study's ``processing/`` folder
    (the daemon's own, 0700; no file is added anywhere). Whoever holds it alone takes, verifies
    and commits the study's submissions, in their order; other studies go on beside it. The
    system drops it when its holder ends, however."""

    def __init__(self, box: StudyDropbox) -> None:
        self.box = box
        self._fd: int | None = None

    def acquire(self, wait: float = 0.0) -> bool:
        fd = os.open(self.box.processing, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            got = _flock(fd, wait)
        except BaseException:
            os.close(fd)
            raise
        if not got:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class WorkDir:
    """One ingest's own folder for its temporaries: ``store/tmp/ingest-PID-RANDOM/``, flocked
    for as long as the ingest lives, so that the sweep (``sweep_tmp``) removes only the folders
    of ingests that have ended (killed, or crashed), never those of a live one beside it."""

    def __init__(self, store_dir: str) -> None:
        self.parent = os.path.join(store_dir, "tmp")
        self.path: str | None = None
        self._fd: int | None = None

    def new_tmp(self) -> tuple[str, TmpFile]:
        """A new temporary file in this folder (made and locked on first use), written around
        the page cache where the filesystem allows, as ``LocalObjectStore.new_tmp`` does."""
        if self.path is None:
            os.makedirs(self.parent, mode=0o700, exist_ok=True)
            path = os.path.join(self.parent, f"{WORKDIR_PREFIX}{os.getpid()}-{os.urandom(4).hex()}")
            os.mkdir(path, 0o700)
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
            _flock(fd, 0.0)  # a folder this new is never swept (WORKDIR_GRACE_NS)
            self.path, self._fd = path, fd
        path = fsutil.tmp_name(self.path)
        fd = directio.open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return path, directio.Writer(fd, hashed=True)

    def close(self) -> None:
        """Remove the folder and whatever is left in it (nothing, after a commit or a discard)."""
        path, fd = self.path, self._fd
        self.path = self._fd = None
        if path is not None:
            _remove_workdir(path)
        if fd is not None:
            os.close(fd)


def _remove_workdir(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(path, name))
        os.rmdir(path)


def sweep_tmp(store_dir: str) -> list[str]:
    """Remove what ingests that ended (killed, crashed) left in store/tmp/: the folders of
    ended ingests (``WorkDir``: nobody holds its lock, and it is older than a minute) and loose
    temporaries of earlier dittoheads. By the holder of the store's lock only; returns what it
    removed."""
    tmp = os.path.join(store_dir, "tmp")
    removed: list[str] = []
    try:
        names = os.listdir(tmp)
    except FileNotFoundError:
        return removed
    now = time.time_ns()
    for name in names:
        path = os.path.join(tmp, name)
        if name.startswith(".tmp-"):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(path)
                removed.append(name)
            continue
        if not name.startswith(WORKDIR_PREFIX):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            if now - os.fstat(fd).st_ctime_ns < WORKDIR_GRACE_NS or not _flock(fd, 0.0):
                continue  # being made, or its ingest lives
            _remove_workdir(path)
            removed.append(name)
        finally:
            os.close(fd)
    return removed


@dataclass
class StudyRun:
    """What one ``Ingestor.run_study`` did: its results, the submissions it left where they are
    (held back and not due, or waiting behind one that is), and whether more is waiting (it
    stopped at its ``limit``)."""

    results: list[IngestResult] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    more: bool = False


@dataclass(frozen=True)
class IngestResult:
    study: str
    submission: str
    ok: bool
    seq: int = 0
    files: int = 0
    new_versions: int = 0
    new_chunk_bytes: int = 0
    reason: str = ""
    held: bool = False  # neither ingested nor rejected: left for the next run (``reason`` says why)
    site: str = ""  # as the manifest says (ingested; rejected, where its manifest decoded)
    user: str = ""
    host: str = ""
    tried: bool = True  # False: left untouched, not verified (held back and not due, or behind one)


class StorePackWriter:
    """Server-written packs: chunks go to temporary files (``new_tmp``: in the ingest's own
    folder of store/tmp/, ``WorkDir``), linked into the store on commit."""

    def __init__(self, store: Store, new_tmp: Callable[[], tuple[str, TmpFile]] | None = None) -> None:
        self.store = store
        self._new_tmp = new_tmp or store.objects.new_tmp
        self.done: list[tuple[bytes, str, list[pack.PackEntry]]] = []  # (pack id, tmp path, entries)
        self._cur: tuple[str, TmpFile, pack.PackWriter] | None = None
        self.ids: set[bytes] = set()
        self.adopted: list[tuple[bytes, str, list[pack.PackEntry]]] = []  # (pack id, upload path, entries)
        # Finished packs are fsynced by one worker thread while verification goes on.
        self._pool: ThreadPoolExecutor | None = None
        self._syncing: list[Future[None]] = []

    def add(self, cid: bytes, data: bytes | memoryview) -> None:
        if cid in self.ids:
            return
        if self._cur is None:
            path, f = self._new_tmp()
            self._cur = (path, f, pack.PackWriter(f))
        self._cur[2].add(cid, data)
        self.ids.add(cid)
        if self._cur[2].full():
            self._close_current()

    def adopt(self, pid: bytes, path: str, entries: list[pack.PackEntry]) -> None:
        """Take an uploaded pack into the store as it is (see ``Ingestor._adoptable``). Its
        copy is made durable now, on the syncing thread, so that the commit (under the store's
        lock) finds nothing of it left to write out."""
        self.ids.update(pe.id for pe in entries)
        self.adopted.append((pid, path, entries))
        self._syncing.append(self._sync_pool().submit(_make_durable, path))

    def _sync_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="dittohead-ingest")
        return self._pool

    def _close_current(self) -> None:
        assert self._cur is not None
        path, f, w = self._cur
        pid, _ = w.finish()
        self._syncing.append(self._sync_pool().submit(f.finish))
        self.done.append((pid, path, w.entries))
        self._cur = None

    def _wait(self) -> None:
        try:
            for fut in self._syncing:
                fut.result()
        finally:
            self._syncing = []
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def finish(self) -> None:
        """Write out and fsync everything (before the commit, outside the store's lock)."""
        if self._cur is not None:
            self._close_current()
        self._wait()

    def commit(self) -> list[tuple[bytes, list[pack.PackEntry]]]:
        self.finish()
        out = []
        for pid, path, entries in self.done:
            self.store.objects.put_file(pack_key(pid), path)
            out.append((pid, entries))
        for pid, path, entries in self.adopted:
            self.store.objects.adopt_file(pack_key(pid), path, mode=0o600)
            out.append((pid, entries))
        return out

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self._wait()
        if self._cur is not None:
            self._cur[1].close()
            self.done.append((b"", self._cur[0], []))
            self._cur = None
        for _, path, _ in self.done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.done = []


def _make_durable(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Plan:
    data: bytes
    manifest: mf.Manifest
    mid: bytes
    writer: StorePackWriter
    carried: dict[bytes, tuple[str, int, int]] = field(default_factory=dict)


def _reject(msg: str) -> RejectedSubmission:
    return RejectedSubmission(msg)


class _HeldBack(Exception):
    """Not the submission's fault: it cannot be verified now (damage in the store, or an earlier
    held-back submission lists the same paths). It stays in processing/ for the next run."""

    def __init__(self, msg: str, paths: set[str]) -> None:
        super().__init__(msg)
        self.paths = paths  # the submission's paths: later submissions that list one wait too


def _open_copy(path: str) -> BinaryIO:
    """Open one of the daemon's own copies of a submission's files (``intake.take``)."""
    return open(path, "rb")


@dataclass
class _State:
    """The daemon's own record of a submission in processing/ (``processing/NAME/STATE``): when
    it arrived (the inbox entry's ctime, the server's clock: the order of ingest) and how many
    attempts at it have begun without ending (an attempt that ends, however, resets it; one the
    daemon died in does not)."""

    arrived_ns: int
    attempts: int = 0

    @classmethod
    def read(cls, folder: str) -> _State:
        try:
            doc = json.loads(fsutil.read_limited(os.path.join(folder, STATE_NAME), 4096))
            return cls(int(doc["arrived_ns"]), int(doc["attempts"]))
        except (OSError, ValueError, KeyError, TypeError):
            return cls(os.lstat(folder).st_ctime_ns)

    def write(self, folder: str) -> None:
        data = json.dumps({"arrived_ns": self.arrived_ns, "attempts": self.attempts}).encode()
        tmp = fsutil.tmp_name(folder)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, os.path.join(folder, STATE_NAME))  # the daemon's own: replaced, not kept
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsutil.fsync_dir(folder)

    def end_attempt(self, folder: str) -> None:
        """The attempt ended without the daemon dying in it (held back, or stopped by the
        server's own trouble): it does not count, and the copies it made go (they are taken
        afresh next time; on a full disk, they are what filled it)."""
        with contextlib.suppress(OSError):
            _drop_copies(folder, keep=(STATE_NAME,))
        with contextlib.suppress(OSError):
            _State(self.arrived_ns).write(folder)


def _free_name(directory: str, name: str) -> str:
    candidate, i = name, 1
    while os.path.lexists(os.path.join(directory, candidate)):
        candidate = f"{name}.{i}"
        i += 1
    return candidate


class _FileHashes:
    """File hashes computed as chunks stream past in pack order (clients pack in file order).

    A file whose chunks do not arrive in its order (held already, or repeated) is left
    unfinished and hashed afterwards by reading its chunks again.
    """

    def __init__(self, entries: list[mf.Entry]) -> None:
        self.entries = entries
        self.state = [(blake3(), 0) for _ in entries]
        self.done: list[bytes | None] = [None] * len(entries)
        self.waiting: dict[bytes, list[int]] = {}
        for i, e in enumerate(entries):
            self.waiting.setdefault(e.chunks[0][0], []).append(i)

    def feed(self, cid: bytes, data: bytes | memoryview) -> None:
        for i in self.waiting.pop(cid, ()):
            h, pos = self.state[i]
            h.update(data)
            pos += 1
            chunks = self.entries[i].chunks
            if pos == len(chunks):
                self.done[i] = h.digest()
            else:
                self.state[i] = (h, pos)
                self.waiting.setdefault(chunks[pos][0], []).append(i)

    def results(self) -> Iterator[tuple[mf.Entry, bytes | None]]:
        return zip(self.entries, self.done)


class Ingestor:
    """Ingests the committed submissions of a store's studies.

    Each study is ingested by one ingest at a time (``StudyLock``), in the order of arrival;
    studies go on beside one another, in other processes (``watch``'s workers) or in turn
    (``run_once``). A submission is taken and verified with the store only read (the index
    read-only, as any reader may); only its commit (packs and manifest into place, the study-log
    record, the index) holds the store's lock (``locked``): one writer, briefly.
    """

    LOCK_WAIT = 30.0  # seconds: an fsck that repairs the index holds the lock that long at most, mostly

    def __init__(self, store: Store, *, clock: Callable[[], int] = time.time_ns,
                 max_attempts: int = MAX_ATTEMPTS, commit_wait: float | None = None,
                 critical: Callable[[], contextlib.AbstractContextManager[object]] | None = None) -> None:
        self.store = store
        self.root = store.root
        self.clock = clock
        self.max_attempts = max_attempts
        # How long a verified submission waits for the store's lock to be committed (another
        # study's commit, an fsck repairing the index); past it, the attempt ends, not counted.
        self.commit_wait = self.LOCK_WAIT if commit_wait is None else commit_wait
        # Around each commit: ``watch``'s worker defers a stop asked for meanwhile (SIGTERM)
        # until the commit in hand is done.
        self.critical = critical or contextlib.nullcontext
        self.workdir = WorkDir(self.root.store)

    def close(self) -> None:
        self.workdir.close()

    @contextlib.contextmanager
    def locked(self, wait: float | None = None) -> Iterator[None]:
        """Hold the store's lock (the one writer's), waiting up to ``wait`` seconds (LOCK_WAIT)
        for it: another study's commit holds it for a moment, an fsck repairing the index for
        longer; past that, LockedError."""
        lock = FileLock(self.root.lock_path)

        def take() -> bool:
            try:
                lock.acquire()
            except Held:
                return False
            return True

        if not _waited(take, self.LOCK_WAIT if wait is None else wait):
            raise LockedError(f"{self.root.path}: another ingest (or an fsck repairing the index) "
                              f"holds the store's lock (lock {self.root.lock_path})")
        try:
            with self.store.writing():  # the one writer: only under the lock
                yield
        finally:
            lock.release()

    def run_once(self, on_result: Callable[[IngestResult], None] | None = None) -> list[IngestResult]:
        """Ingest everything committed now, study after study; returns one result per
        submission handled.

        ``on_result`` is called for each submission ingested or rejected. One held back (``held``:
        damage in the store, see the module's docstring) is logged as an error instead, in one
        line, and returned with ``ok`` false: it is neither, and the next run tries it again.
        A study another ingest is at (``watch``'s worker) is waited for up to LOCK_WAIT, then
        left to it: LockedError at the end, after the other studies.
        """
        results: list[IngestResult] = []
        with self.locked():
            sweep_tmp(self.root.store)
            if not self.root.has_work():
                return results  # idle: not even the index needs opening
            self.store.upgrade_logs()  # a store of dittohead 0.2: once
            self.store.catch_up()  # after a crash past a commit point
        busy = []
        try:
            for study in self.root.studies():
                run = self.run_study(study, wait=self.LOCK_WAIT, on_result=on_result)
                if run is None:
                    busy.append(study)
                    continue
                for r in run.results:
                    results.append(r)
                    if r.held:
                        log.error("held back %s/%s (not rejected; the next run tries it again): %s",
                                  r.study, r.submission, r.reason)
        finally:
            self.close()
        if busy:
            raise LockedError(f"another ingest (the watch daemon's worker?) was at study {', '.join(busy)} "
                              f"for {self.LOCK_WAIT:g} s: left to it")
        return results

    def run_study(self, study: str, *, skip: Collection[str] = (), limit: int | None = None, wait: float = 0.0,
                  on_result: Callable[[IngestResult], None] | None = None,
                  progress: Callable[[str, str], None] | None = None) -> StudyRun | None:
        """Ingest the study's waiting submissions, in order, holding its ``StudyLock`` (waiting
        up to ``wait`` seconds for it: None if another ingest holds it all that time).

        ``skip``: submissions held back earlier that are not to be tried again yet (they and
        those that list their paths are left where they are, untouched); ``limit``: how many
        submissions to take and verify at most (a bad name's rejection does not count);
        ``on_result`` is called for each submission ingested or rejected (not for one left or
        held back); ``progress(name, step)`` as a submission's ingest goes ("taking",
        "committing", "finishing").
        """
        box = self.root.dropbox(study)
        lock = StudyLock(box)
        try:
            if not lock.acquire(wait):
                return None
        except FileNotFoundError:  # a study being added, or removed by hand
            return StudyRun()
        run = StudyRun()
        try:
            self._prepare(box)
            waiting: dict[str, str] = {}  # path -> the held-back submission that lists it
            taken = 0
            for item in self._pending(box, waiting, frozenset(skip)):
                if limit is not None and taken >= limit:
                    run.more = True
                    break
                if isinstance(item, IngestResult):
                    r = item
                else:
                    taken += 1
                    r = self._process(box, item, waiting, progress)
                run.results.append(r)
                if not r.tried:
                    run.left.append(r.submission)
                elif not r.held and on_result:
                    on_result(r)
        finally:
            self.workdir.close()
            lock.release()
        return run

    def _prepare(self, box: StudyDropbox) -> None:
        """Before the study's submissions are verified against the index read-only: an index
        that is missing, unreadable or of an earlier dittohead, one that lags the study's log
        (a commit an ingest died after), or a log of dittohead 0.2 are first set right by the
        writer, under the store's lock."""
        if self.store.index_current(box.name):
            return
        with self.locked(self.commit_wait):
            sweep_tmp(self.root.store)
            self.store.upgrade_logs()
            self.store.catch_up()

    def _pending(self, box: StudyDropbox, waiting: dict[str, str],
                 skip: frozenset[str] = frozenset()) -> Iterator[str | IngestResult]:
        """processing/ first (resumed after a crash, or held back by the last run), then the inbox,
        each in order of arrival (the server's clock); an arrival gets its folder in processing/
        only when its turn comes.

        An arrival is rejected at once, untaken, when its name is not a submission name (names
        are bytes until checked) or was used by an earlier submission of the study (the name is
        how the client finds its receipt). An arrival that lists a path of a submission held
        back in this run (``waiting``, kept up to date by ``_process`` as the caller goes) stays
        in the inbox, untouched, so that it keeps its place in the order. A held-back submission
        in ``skip`` is not tried now: it is left (``tried`` false), and holds back those that
        list its paths just as if it had been.
        """
        resumed = []
        with contextlib.suppress(FileNotFoundError), os.scandir(box.processing) as it:
            for e in it:  # folders the daemon made, under names it checked
                resumed.append((_State.read(e.path).arrived_ns, e.name))
        for _, name in sorted(resumed):
            if name in skip:
                for p in self._listed_paths(box, os.fsencode(name)):
                    waiting.setdefault(p, name)
                yield IngestResult(box.name, name, False, held=True, tried=False,
                                   reason="held back; not tried again yet")
                continue
            yield name
        for arrived, raw in intake.arrivals(box.inbox):
            checked = intake.submission_name(raw)
            if checked is None:
                yield self._fail(box, escape(raw), f"bad submission name {escape(raw)!r}", raw=raw)
                continue
            name = checked
            if os.path.lexists(os.path.join(box.processing, name)):
                continue  # resumed above: held back, or its folder is being released
            # (the index asked afresh each time: a commit between two arrivals closes a reader's)
            if (self.store.index.submission_named(box.name, name) is not None
                    or os.path.lexists(os.path.join(box.done, name))):
                yield self._fail(box, name, f"the name {name!r} was used by an earlier submission", raw=raw)
                continue
            paths = self._listed_paths(box, raw) if waiting else set()
            behind = min(paths & waiting.keys(), default=None)
            if behind is not None:
                reason = (f"it lists '{escape(behind)}', as the held-back submission {waiting[behind]} does, "
                          "and waits behind it in the inbox")
                for p in paths:
                    waiting.setdefault(p, name)
                yield IngestResult(box.name, name, False, held=True, reason=reason, tried=False)
                continue
            folder = os.path.join(box.processing, name)
            os.mkdir(folder, 0o700)
            _State(arrived).write(folder)
            fsutil.fsync_dir(box.processing)
            yield name

    @staticmethod
    def _listed_paths(box: StudyDropbox, raw: bytes) -> set[str]:
        """The paths the manifest of this submission in the inbox lists (to see whether it must
        wait behind a held-back one). Only a look, nothing is trusted: anything odd about the
        submission is for the verification to find, and it does not wait."""
        try:
            fd = intake.open_submission(box.inbox, raw)
            try:
                data = intake.read_small(fd, fmt.MANIFEST_NAME, fmt.MANIFEST_MAX_SIZE)
            finally:
                os.close(fd)
            return {e.path for e in mf.decode(data).entries}
        except (OSError, ValueError, DittoheadError, MemoryError):
            return set()

    def _process(self, box: StudyDropbox, name: str, waiting: dict[str, str],
                 progress: Callable[[str, str], None] | None = None) -> IngestResult:
        """Ingest one submission; ``waiting`` maps the paths of the study's submissions held back
        earlier in this run to their names (a later one that lists such a path waits too).

        Whatever the submission holds costs only itself: anything wrong with it, and any error
        the verification meets that is not the server's own (its disk, its store, its index),
        rejects it; an attempt the daemon dies in (killed, out of memory) is counted in its
        state, and after ``max_attempts`` of those it is set aside, rejected with that reason,
        instead of being tried first on every start.

        Taking and verifying hold only the study's lock (the caller's); the commit takes the
        store's lock, and the index, caught up under it, is asked again whether the submission
        is in the log already (an attempt that died past its commit point), so that nothing is
        ever committed twice.
        """
        step = progress or (lambda n, s: None)
        idx = self.store.index
        folder = os.path.join(box.processing, name)
        done = idx.submission_named(box.name, name)
        if done is None:
            decided = _read_reason(folder)
            if decided is not None:  # rejected before a crash: the rejection is finished
                return self._fail(box, name, decided)
            state = _State.read(folder)
            if state.attempts >= self.max_attempts:
                return self._fail(box, name, f"the daemon stopped (crashed or was killed) during each of "
                                  f"{state.attempts} attempts at ingesting it; set aside")
            state.attempts += 1
            state.write(folder)
            step(name, "taking")
            try:
                plan = self._take_and_verify(box, name, folder, waiting)
                plan.writer.finish()  # written out and fsynced before the lock is taken
            except _HeldBack as e:
                state.end_attempt(folder)
                for p in e.paths:
                    waiting.setdefault(p, name)
                return IngestResult(box.name, name, False, reason=str(e), held=True)
            except (RejectedSubmission, FormatError, IntegrityError) as e:
                return self._fail(box, name, str(e))
            except MemoryError:
                return self._fail(box, name, "too large to verify within the daemon's memory")
            except (OSError, StoreError, sqlite3.Error, KeyboardInterrupt, SystemExit, Stopped):
                # The server's own trouble (a full disk, the store), or a stop: this run ends,
                # and the attempt does not count against the submission.
                state.end_attempt(folder)
                raise
            except Exception as e:  # a fault of the daemon's, met on this input: costs only it
                log.exception("internal error while verifying %s/%s", box.name, name)
                return self._fail(box, name, f"internal error while verifying it ({type(e).__name__}: "
                                  f"{escape(str(e))[:200]}); report this")
            with contextlib.ExitStack() as commit:
                try:
                    with self.locked(self.commit_wait):
                        commit.enter_context(self.critical())
                        step(name, "committing")
                        widx = self.store.index  # the writer's, caught up with the logs
                        done = widx.submission_named(box.name, name)
                        if done is None:
                            self._commit(box, name, plan)
                            done = widx.submission_named(box.name, name)
                        else:
                            plan.writer.discard()
                except BaseException:
                    plan.writer.discard()
                    state.end_attempt(folder)
                    raise
                assert done is not None
                step(name, "finishing")
                self._finish(box, name, done.seq)
        else:
            step(name, "finishing")
            self._finish(box, name, done.seq)
        log.info("ingested %s/%s as #%d", box.name, name, done.seq)
        return IngestResult(box.name, name, True, done.seq, done.files, done.new_versions, done.new_chunk_bytes,
                            site=done.site, user=done.user, host=done.host)

    def _take_and_verify(self, box: StudyDropbox, name: str, folder: str, waiting: dict[str, str]) -> _Plan:
        """Copy the submission into ``folder`` afresh (whatever an interrupted attempt copied
        goes first), then verify the copies."""
        _drop_copies(folder, keep=(STATE_NAME,))
        with intake.take(box.inbox, os.fsencode(name), folder) as taking:
            return self._verify(box, folder, taking, waiting)

    # -- verification: nothing is written to the store before all of it passes
    def _verify(self, box: StudyDropbox, path: str, taking: intake.Taking,
                waiting: dict[str, str]) -> _Plan:
        with _open_copy(os.path.join(path, fmt.MANIFEST_NAME)) as f:
            data = f.read(fmt.MANIFEST_MAX_SIZE + 1)
        m = mf.decode(data)
        if m.study != box.name:
            raise _reject(f"manifest is for study {m.study!r}, not {box.name!r}")
        if not m.entries:
            raise _reject("manifest lists no files (empty submission)")
        behind = sorted(e.path for e in m.entries if e.path in waiting)
        if behind:
            # Ingested now, it would come before the held-back one in these paths' histories.
            raise _HeldBack(f"it lists '{escape(behind[0])}', as the held-back submission {waiting[behind[0]]} does, "
                            "and waits for it", {e.path for e in m.entries})

        idx = self.store.index
        referenced: dict[bytes, int] = {}
        for e in m.entries:
            for cid, length in e.chunks:
                if referenced.setdefault(cid, length) != length:
                    raise _reject(f"chunk {cid.hex()} is listed with two different lengths")
        held = idx.study_holds(box.name, referenced)
        for cid, length in held.items():
            if length != referenced[cid]:
                raise _reject(f"chunk {cid.hex()}: length {referenced[cid]} differs from the stored chunk's")
        needed = set(referenced) - held.keys()
        to_write = needed - idx.has_chunks(needed)

        writer = StorePackWriter(self.store, self.workdir.new_tmp)
        plan = _Plan(data, m, mf.manifest_id(data), writer)
        hashing = _FileHashes(self._entries_to_hash(box, m))
        try:
            # In the order the client wrote them (a hint only: it lets file hashes be computed
            # as chunks stream past; out of order, they are computed by a second read).
            for i, pname in enumerate(taking.packs):
                taking.ready(i)
                ppath = os.path.join(path, pname)
                with _open_copy(ppath) as f:
                    what = f"pack {pname}"
                    entries = pack.read_entries(f, what=what)
                    if self._adoptable(f, entries, to_write, writer):
                        pid = self._stream(f, ppath, entries, what, plan, hashing, whole=True)
                        if pid is not None and pid.hex() + fmt.PACK_SUFFIX == pname:
                            writer.adopt(pid, ppath, entries)
                            continue
                        # Named for other bytes: written into server packs after all.
                        self._stream(f, ppath, entries, what, plan, None, copy_to=(writer, to_write))
                    else:
                        self._stream(f, ppath, entries, what, plan, hashing, copy_to=(writer, to_write))
            for cid in needed:
                if cid not in plan.carried:
                    raise _reject(f"chunk {cid.hex()} is neither held by study {box.name!r} nor carried by this submission")
                if plan.carried[cid][2] != referenced[cid]:
                    raise _reject(f"chunk {cid.hex()}: the manifest says {referenced[cid]} bytes, the pack holds {plan.carried[cid][2]}")
            self._check_file_hashes(plan, hashing)
        except BaseException:
            writer.discard()
            raise
        return plan

    @staticmethod
    def _stream(f: BinaryIO, path: str, entries: list[pack.PackEntry], what: str, plan: _Plan, hashing: _FileHashes | None,
                *, whole: bool = False, copy_to: tuple[StorePackWriter, set[bytes]] | None = None) -> bytes | None:
        """Read a pack's chunks once, each checked against its id, for the file hashes and for
        copying into server packs; with ``whole``, return the hash of the whole file (its id, if
        it is what it is named), computed on the reading thread.

        Through the page cache, told that the read is sequential: the kernel's read-ahead keeps
        more of a disk busy than one direct read at a time (the figures: benchmarks/README.md,
        "Figures behind the code's choices"). Nothing reads these bytes again soon, so what the
        cache holds of the pack is dropped after.
        """
        fd = os.dup(f.fileno())
        directio.advise(fd, "SEQUENTIAL")
        r = directio.Reader(fd, hashed=whole)
        try:
            for pe, chunk in pack.iter_verified(r, entries, what=what):
                plan.carried.setdefault(pe.id, (path, pe.offset, pe.length))
                if hashing is not None:
                    hashing.feed(pe.id, chunk)
                if copy_to is not None and pe.id in copy_to[1]:
                    copy_to[0].add(pe.id, chunk)
            return r.digest() if whole else None
        finally:
            directio.advise(fd, "DONTNEED")
            r.close()

    def _adoptable(self, f: BinaryIO, entries: list[pack.PackEntry], to_write: set[bytes],
                   writer: StorePackWriter) -> bool:
        """May this copy of an uploaded pack become a store pack as it is, instead of its new
        chunks being written into server packs?

        The copy is the daemon's own (``intake.take``: no other account wrote it, none can reach
        it, nothing else has it open), so only this matters: it is byte for byte what the server
        would write (PackWriter's header and trailer; each chunk is checked against its id as it
        is read); every chunk in it is new to the store; and it lies on the store's filesystem
        (it is linked, not copied).
        """
        if os.fstat(f.fileno()).st_dev != self.store.objects.local_device():
            return False  # not on the store's filesystem, or a store not on this machine's disks
        if not entries or any(pe.id not in to_write or pe.id in writer.ids for pe in entries):
            return False
        return pack.is_canonical(f, entries)

    def _entries_to_hash(self, box: StudyDropbox, m: mf.Manifest) -> list[mf.Entry]:
        """Entries whose bytes must be hashed: new content of more than one chunk.

        An entry equal to the latest version (same hash, same chunks) was verified when that
        version was ingested; a one-chunk file's hash must equal its (verified) chunk id; an
        empty file's hash is checked by the manifest decoder.
        """
        idx = self.store.index
        out = []
        for e in m.entries:
            if len(e.chunks) == 1:
                if e.chunks[0][0] != e.hash:
                    raise _reject(f"'{escape(e.path)}': its bytes do not match the file hash in the manifest")
                continue
            if not e.chunks:
                continue
            latest = idx.latest(box.name, e.path)
            if (latest is not None and latest[1] == e.hash
                    and idx.version_chunks(box.name, e.path, latest[0]) == pack_chunk_list(e.chunks)):
                continue
            out.append(e)
        return out

    def _check_file_hashes(self, plan: _Plan, hashing: _FileHashes) -> None:
        """Finish the file hashes the pack pass could not complete, and compare them all."""
        open_packs: dict[str, BinaryIO] = {}
        try:
            for e, digest in hashing.results():
                if digest is None:
                    h = blake3()
                    for cid, _ in e.chunks:
                        h.update(self._chunk_bytes(cid, plan, open_packs))
                    digest = h.digest()
                if digest != e.hash:
                    raise _reject(f"'{escape(e.path)}': its bytes do not match the file hash in the manifest")
        finally:
            for f in open_packs.values():
                f.close()

    def _chunk_bytes(self, cid: bytes, plan: _Plan, open_packs: dict[str, BinaryIO]) -> bytes:
        if cid in plan.carried:
            ppath, offset, length = plan.carried[cid]
            f = open_packs.get(ppath)
            if f is None:
                f = open_packs[ppath] = _open_copy(ppath)
            f.seek(offset)
            data = f.read(length)
            if blake3(data).digest() != cid:  # changed under us since it was verified
                raise _reject(f"chunk {cid.hex()} changed while being ingested")
            return data
        try:
            return self.store.read_chunk(cid)
        except IntegrityError as e:  # the store's copy, not the submission, is at fault
            raise _HeldBack(f"damage in the store: {e}; run 'dittohead fsck --read-data'",
                            {entry.path for entry in plan.manifest.entries}) from e

    # -- commit: packs, manifest, then the log record
    def _commit(self, box: StudyDropbox, name: str, plan: _Plan) -> None:
        store, idx = self.store, self.store.index
        written = plan.writer.commit()
        store.objects.put_bytes(manifest_key(plan.mid), plan.data)
        if store.old_log(box.name):  # its log of dittohead 0.2 could not be upgraded (damaged)
            raise StoreError(f"study log {box.name} is damaged; run 'dittohead fsck'")
        seq = idx.last_seq(box.name) + 1
        rec = studylog.LogRecord(seq, name, plan.mid, self.clock(), tuple(pid for pid, _ in written))
        if not store.objects.put_bytes(studylog.record_key(box.name, seq), studylog.encode_one(rec)):
            raise StoreError(f"study log {box.name}: record {seq} exists, and the index does not hold it; "
                             "run 'dittohead fsck'")
        # -- committed. Everything below is derived from the log and redone after a crash.
        rows = [(pe.id, pid, pe.offset, pe.length) for pid, entries in written for pe in entries]
        idx.apply(box.name, rec, plan.manifest, rows)

    def _finish(self, box: StudyDropbox, name: str, seq: int) -> None:
        idx = self.store.index
        gained = idx.chunks_gained(box.name, seq)
        for segment, data in records.have_segments(seq, gained):  # each within HAVE_MAX_SIZE
            fsutil.write_new(os.path.join(box.have, segment), data, mode=0o644, exist_ok=True)
        sub = idx.submission_named(box.name, name)
        assert sub is not None
        receipt = records.Receipt(box.name, name, seq, sub.manifest, sub.ingested_ns, sub.files,
                                  sub.new_versions, sub.new_chunk_bytes)
        fsutil.write_new(os.path.join(box.receipts, name), records.encode_receipt(receipt), mode=0o644,
                         exist_ok=True)
        # The store holds verified copies of every chunk that mattered: only the manifest as
        # received is kept, so that the drop box does not hold every byte a second time.
        folder = os.path.join(box.processing, name)
        if os.path.lexists(folder):
            _drop_copies(folder, keep=(fmt.MANIFEST_NAME,))
            self._release(box, os.fsencode(name))
            os.rename(folder, os.path.join(box.done, _free_name(box.done, name)))
            fsutil.fsync_dir(box.done)

    def _release(self, box: StudyDropbox, raw: bytes) -> None:
        what = intake.release(box.inbox, raw)
        log.debug("the uploader's folder %s/%s: %s", box.name, escape(raw), what)

    def _fail(self, box: StudyDropbox, name: str, reason: str, *, raw: bytes | None = None) -> IngestResult:
        """Reject: the reason, and the manifest as received if the submission was taken, are
        kept in ``failed/NAME`` (the daemon's own folder; ``NAME.1`` and so on if that is
        taken); the uploader's folder is released. ``name`` is a checked submission name, or,
        for an arrival whose own name (``raw``) is not one, that name escaped (``display``), kept
        under a name of the daemon's if it is long."""
        text = f"rejected: {reason}\n".encode("utf-8", "backslashreplace")
        folder = os.path.join(box.processing, name)
        kept_as = name if raw is None or len(name.encode()) <= 200 else f"badname-{blake3(raw).hexdigest()[:16]}"
        site = user = ""
        if raw is None and os.path.isdir(folder):
            site, user = _who(folder)
            # Decided first, in processing/: a crash from here on finishes the rejection.
            fsutil.write_new(os.path.join(folder, fmt.REASON_NAME), text, mode=0o600, exist_ok=True)
            _drop_copies(folder, keep=(fmt.MANIFEST_NAME, fmt.REASON_NAME))
            self._release(box, os.fsencode(name))
            os.rename(folder, os.path.join(box.failed, _free_name(box.failed, kept_as)))
        else:
            dest = os.path.join(box.failed, _free_name(box.failed, kept_as))
            os.mkdir(dest, 0o700)
            fsutil.write_new(os.path.join(dest, fmt.REASON_NAME), text, mode=0o600)
            self._release(box, raw if raw is not None else os.fsencode(name))
        fsutil.fsync_dir(box.failed)
        log.info("rejected %s/%s: %s", box.name, name, reason)
        return IngestResult(box.name, name, False, reason=reason, site=site, user=user)


def _who(folder: str) -> tuple[str, str]:
    """The site and user that the daemon's copy of a manifest names, for a rejection's notice
    ("", "" where it is missing or does not decode: its decoding is what failed, perhaps)."""
    try:
        m = mf.decode(fsutil.read_limited(os.path.join(folder, fmt.MANIFEST_NAME), fmt.MANIFEST_MAX_SIZE))
    except Exception:  # noqa: BLE001 (whatever the bytes are: this is only for the notice's words)
        return "", ""
    return m.site, m.user


def _drop_copies(folder: str, keep: tuple[str, ...]) -> None:
    """Remove from a submission's folder in processing/ everything but what ``keep`` names."""
    for entry in os.listdir(folder):
        if entry not in keep:
            os.unlink(os.path.join(folder, entry))


def _read_reason(folder: str) -> str | None:
    """The reason of a rejection decided before a crash, if there is one."""
    try:
        text = fsutil.read_limited(os.path.join(folder, fmt.REASON_NAME), 1 << 16).decode("utf-8", "replace")
    except (FileNotFoundError, NotADirectoryError):
        return None
    return text.removeprefix("rejected: ").rstrip("\n")
