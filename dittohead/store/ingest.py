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
from collections.abc import Callable, Iterator
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


class StorePackWriter:
    """Server-written packs: chunks go to temporary files, linked into the store on commit."""

    def __init__(self, store: Store) -> None:
        self.store = store
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
            path, f = self.store.objects.new_tmp()
            self._cur = (path, f, pack.PackWriter(f))
        self._cur[2].add(cid, data)
        self.ids.add(cid)
        if self._cur[2].full():
            self._close_current()

    def adopt(self, pid: bytes, path: str, entries: list[pack.PackEntry]) -> None:
        """Take an uploaded pack into the store as it is (see ``Ingestor._adoptable``)."""
        self.ids.update(pe.id for pe in entries)
        self.adopted.append((pid, path, entries))

    def _close_current(self) -> None:
        assert self._cur is not None
        path, f, w = self._cur
        pid, _ = w.finish()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="dittohead-ingest")
        self._syncing.append(self._pool.submit(f.finish))
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

    def commit(self) -> list[tuple[bytes, list[pack.PackEntry]]]:
        if self._cur is not None:
            self._close_current()
        self._wait()
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
    """Ingests every committed submission of every study of one store (one at a time, locked)."""

    def __init__(self, store: Store, *, clock: Callable[[], int] = time.time_ns,
                 max_attempts: int = MAX_ATTEMPTS) -> None:
        self.store = store
        self.root = store.root
        self.clock = clock
        self.max_attempts = max_attempts

    LOCK_WAIT = 30.0  # seconds: an fsck that repairs the index holds the lock that long at most, mostly

    @contextlib.contextmanager
    def locked(self):
        """Hold the store's lock (the one writer's), waiting up to LOCK_WAIT for it: an fsck
        repairing the index holds it for a moment; another ingest's pass is refused after that."""
        lock = FileLock(self.root.lock_path)
        deadline = time.monotonic() + self.LOCK_WAIT
        while True:
            try:
                lock.acquire()
                break
            except Held:
                if time.monotonic() >= deadline:
                    raise LockedError(f"{self.root.path}: another ingest (or an fsck repairing the index) "
                                      f"is running (lock {self.root.lock_path})") from None
                time.sleep(0.1)
        try:
            with self.store.writing():  # the one writer: only under the lock
                yield
        finally:
            lock.release()

    def run_once(self, on_result: Callable[[IngestResult], None] | None = None) -> list[IngestResult]:
        """Ingest everything committed now; returns one result per submission handled.

        ``on_result`` is called for each submission ingested or rejected. One held back (``held``:
        damage in the store, see the module's docstring) is logged as an error instead, in one
        line, and returned with ``ok`` false: it is neither, and the next run tries it again.
        """
        results: list[IngestResult] = []
        with self.locked():
            self._sweep_tmp()
            if not self.root.has_work():
                return results  # idle: not even the index needs opening
            self.store.upgrade_logs()  # a store of dittohead 0.2: once
            self.store.catch_up()  # after a crash past a commit point
            for study in self.root.studies():
                box = self.root.dropbox(study)
                waiting: dict[str, str] = {}  # path -> the held-back submission that lists it
                for item in self._pending(box, waiting):
                    r = item if isinstance(item, IngestResult) else self._process(box, item, waiting)
                    results.append(r)
                    if r.held:
                        log.error("held back %s/%s (not rejected; the next run tries it again): %s",
                                  r.study, r.submission, r.reason)
                    elif on_result:
                        on_result(r)
        return results

    def _sweep_tmp(self) -> None:
        """Remove what an interrupted ingest left in store/tmp/ (never part of the store)."""
        tmp = os.path.join(self.root.store, "tmp")
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(tmp):
                if name.startswith(".tmp-"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(tmp, name))

    def _pending(self, box: StudyDropbox, waiting: dict[str, str]) -> Iterator[str | IngestResult]:
        """processing/ first (resumed after a crash, or held back by the last run), then the inbox,
        each in order of arrival (the server's clock); an arrival gets its folder in processing/
        only when its turn comes.

        An arrival is rejected at once, untaken, when its name is not a submission name (names
        are bytes until checked) or was used by an earlier submission of the study (the name is
        how the client finds its receipt). An arrival that lists a path of a submission held
        back in this run (``waiting``, kept up to date by ``_process`` as the caller goes) stays
        in the inbox, untouched, so that it keeps its place in the order.
        """
        resumed = []
        with contextlib.suppress(FileNotFoundError), os.scandir(box.processing) as it:
            for e in it:  # folders the daemon made, under names it checked
                resumed.append((_State.read(e.path).arrived_ns, e.name))
        for _, name in sorted(resumed):
            yield name
        idx = self.store.index
        for arrived, raw in intake.arrivals(box.inbox):
            checked = intake.submission_name(raw)
            if checked is None:
                yield self._fail(box, escape(raw), f"bad submission name {escape(raw)!r}", raw=raw)
                continue
            name = checked
            if os.path.lexists(os.path.join(box.processing, name)):
                continue  # resumed above: held back, or its folder is being released
            if idx.submission_named(box.name, name) is not None or os.path.lexists(os.path.join(box.done, name)):
                yield self._fail(box, name, f"the name {name!r} was used by an earlier submission", raw=raw)
                continue
            paths = self._listed_paths(box, raw) if waiting else set()
            behind = min(paths & waiting.keys(), default=None)
            if behind is not None:
                reason = (f"it lists '{escape(behind)}', as the held-back submission {waiting[behind]} does, "
                          "and waits behind it in the inbox")
                for p in paths:
                    waiting.setdefault(p, name)
                yield IngestResult(box.name, name, False, held=True, reason=reason)
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

    def _process(self, box: StudyDropbox, name: str, waiting: dict[str, str]) -> IngestResult:
        """Ingest one submission; ``waiting`` maps the paths of the study's submissions held back
        earlier in this run to their names (a later one that lists such a path waits too).

        Whatever the submission holds costs only itself: anything wrong with it, and any error
        the verification meets that is not the server's own (its disk, its store, its index),
        rejects it; an attempt the daemon dies in (killed, out of memory) is counted in its
        state, and after ``max_attempts`` of those it is set aside, rejected with that reason,
        instead of being tried first on every start.
        """
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
            try:
                plan = self._take_and_verify(box, name, folder, waiting)
            except _HeldBack as e:
                state.end_attempt(folder)
                for p in e.paths:
                    waiting.setdefault(p, name)
                return IngestResult(box.name, name, False, reason=str(e), held=True)
            except (RejectedSubmission, FormatError, IntegrityError) as e:
                return self._fail(box, name, str(e))
            except MemoryError:
                return self._fail(box, name, "too large to verify within the daemon's memory")
            except (OSError, StoreError, sqlite3.Error, KeyboardInterrupt, SystemExit):
                # The server's own trouble (a full disk, the store), or a stop: this run ends,
                # and the attempt does not count against the submission.
                state.end_attempt(folder)
                raise
            except Exception as e:  # a fault of the daemon's, met on this input: costs only it
                log.exception("internal error while verifying %s/%s", box.name, name)
                return self._fail(box, name, f"internal error while verifying it ({type(e).__name__}: "
                                  f"{escape(str(e))[:200]}); report this")
            try:
                self._commit(box, name, plan)
            except BaseException:
                plan.writer.discard()
                state.end_attempt(folder)
                raise
            done = idx.submission_named(box.name, name)
            assert done is not None
        self._finish(box, name, done.seq)
        log.info("ingested %s/%s as #%d", box.name, name, done.seq)
        return IngestResult(box.name, name, True, done.seq, done.files, done.new_versions, done.new_chunk_bytes)

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

        writer = StorePackWriter(self.store)
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
        if raw is None and os.path.isdir(folder):
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
        return IngestResult(box.name, name, False, reason=reason)


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
