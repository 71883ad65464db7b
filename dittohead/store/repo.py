"""The store: immutable packs and manifests, append-only study logs, and the derived index.

Write ordering (docs/format.md, "Write ordering"): chunks (packs), then the manifest, then the
study-log record that publishes them (the commit point); the index, have-segment and receipt
follow and can all be redone from the log. Reads verify every chunk against its id (invariant 4).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Iterator

from dittohead import format as fmt
from dittohead import fsutil, pack, records, studylog
from dittohead import manifest as mf
from dittohead.errors import FormatError, IntegrityError, StoreError
from dittohead.hashing import blake3
from dittohead.store.index import Index
from dittohead.store.layout import ServerRoot
from dittohead.store.objects import LocalObjectStore, ObjectStore

log = logging.getLogger(__name__)
READERS_PRUNE_AT = 64  # reading threads with a connection open before those of ended threads are closed


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _sqlite_file_intact(path: str) -> bool:
    """A cheap look at an SQLite file's header: its magic, and (with no WAL pending) its size
    against the page count it declares. A missing or empty file is fine: it is created anew."""
    try:
        with open(path, "rb") as f:
            header = f.read(100)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return True
    if size == 0:
        return True
    if len(header) < 100 or header[:16] != b"SQLite format 3\x00":
        return False
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    try:
        wal = os.path.getsize(path + "-wal")
    except OSError:
        wal = 0
    return wal > 0 or pages == 0 or page_size * pages == size


def pack_key(pid: bytes) -> str:
    h = pid.hex()
    return f"packs/{h[:2]}/{h}{fmt.PACK_SUFFIX}"


def manifest_key(mid: bytes) -> str:
    h = mid.hex()
    return f"manifests/{h[:2]}/{h}"


def log_key(study: str) -> str:
    """The study log of dittohead 0.1 and 0.2: one object, every record appended (read only)."""
    return f"studies/{study}.log"


def copied_key(study: str) -> str:
    """Made once that log's records are all record objects too (``Store.upgrade_logs``)."""
    return f"studies/{study}.log-copied"


def _is_damage(e: sqlite3.DatabaseError) -> bool:
    """Is this an index that cannot be read as SQLite (to be rebuilt), rather than an index that
    cannot be used now (a full disk, no permission, locked)?"""
    code = getattr(e, "sqlite_errorcode", None)
    if code is None:  # raised by this module's own checks, or an SQLite without error codes
        return not isinstance(e, sqlite3.OperationalError)
    return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _sqlite_reason(e: sqlite3.Error, where: str) -> str:
    code = getattr(e, "sqlite_errorcode", 0) & 0xFF
    full = code == sqlite3.SQLITE_FULL
    if not full:
        import shutil

        with contextlib.suppress(OSError):
            full = shutil.disk_usage(where).free < (1 << 20)
    return "No space left on device" if full else str(e)


class Store:
    """A server root's store, opened for reading, and for writing only by the ingest that holds
    the store's lock (``writing``): one writer, many readers (docs/server-root.md).

    A reader never changes anything under store/, the index included: each thread reads the
    index through a read-only connection of its own, as it is (an index that lags the log by a
    submission being committed answers without it). Where the index cannot be used (missing,
    unreadable, or of an earlier dittohead), a reader builds one of its own from the store in a
    temporary file outside it, for as long as the Store is open; the ingest rebuilds the real one.
    """

    def __init__(self, root: ServerRoot, objects: ObjectStore | None = None) -> None:
        self.root = root
        self.config = root.config()
        self.objects: ObjectStore = objects or LocalObjectStore(root.store)
        self.writer = False
        self._index: Index | None = None  # the writer's
        # Each reading thread's own connection, by the thread's id in the system: a thread that
        # libfuse made calls in through ctypes with a new Python thread state each time, so a
        # threading.local would give it a new connection for every call.
        self._readers: dict[int, Index] = {}
        self._readers_lock = threading.Lock()
        self._private: str | None = None  # the folder of a reader's own index, if it needed one
        self._stale: set[str] = set()  # private indexes given up for the real one (use_real_index)

    @classmethod
    def open(cls, path: str) -> Store:
        return cls(ServerRoot(path))

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None
        self._close_readers()
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None

    def _close_readers(self) -> None:
        with self._readers_lock:
            for idx in self._readers.values():
                idx.close()
            self._readers.clear()

    def _prune_readers(self) -> None:
        """Close the connections of threads that have ended (with the lock held; Linux only:
        elsewhere they stay open until ``close``)."""
        try:
            alive = {int(t) for t in os.listdir("/proc/self/task")}
        except OSError:
            return
        for tid in [t for t in self._readers if t not in alive]:
            self._readers.pop(tid).close()

    @contextlib.contextmanager
    def writing(self) -> Iterator[Store]:
        """Use this store as its one writer, for the ingest that holds the store's lock: the
        index is opened for writing, rebuilt if it must be, and caught up with the logs."""
        self._close_readers()
        self.writer = True
        try:
            yield self
        finally:
            self.writer = False
            if self._index is not None:
                self._index.close()
                self._index = None

    def __enter__(self) -> Store:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the index: the writer's, caught up with the logs; or a reader thread's, read-only
    @property
    def index(self) -> Index:
        if not self.writer:
            tid = threading.get_native_id()
            mine: Index | None = self._readers.get(tid)
            if mine is not None and mine.path in self._stale:  # a private index given up: this thread's own
                with self._readers_lock:
                    self._readers.pop(tid, None)
                mine.close()
                mine = None
            if mine is None:
                mine = self._open_reader()
                with self._readers_lock:
                    if len(self._readers) >= READERS_PRUNE_AT:
                        self._prune_readers()
                    self._readers[tid] = mine
            return mine
        if self._index is None:
            idx: Index | None = None
            try:
                if not _sqlite_file_intact(self.root.index_path):
                    raise sqlite3.DatabaseError("truncated, or not an SQLite file")
                idx = Index(self.root.index_path)
                if not idx.schema_ok:
                    idx.close()
                    idx = None
            except sqlite3.DatabaseError as e:
                if not _is_damage(e):  # a full disk, say: the index is fine, rebuilding cannot help
                    raise StoreError(f"{self.root.index_path}: cannot open the index: {_sqlite_reason(e, self.root.store)}") from e
                log.warning("index %s is unreadable (%s): rebuilding it from the store", self.root.index_path, e)
                idx = None
            if idx is None:
                self.rebuild_index()
                idx = Index(self.root.index_path)
            self._index = idx
            self.catch_up()
        assert self._index is not None
        return self._index

    def use_real_index(self) -> bool:
        """For a long-running reader (the mount): where this store reads from a private index
        (the real one was missing or unusable when it first looked), switch to the real index
        once it is usable (an ingest has made it). Each thread's connection to the private one
        is closed by that thread, at its next use. True if it switched."""
        with self._readers_lock:
            private = self._private
            if private is None:
                return False
            path = self.root.index_path
            try:
                if not (os.path.exists(path) and _sqlite_file_intact(path)):
                    return False
                idx = Index(path, readonly=True)
                try:
                    if not idx.schema_ok:
                        return False
                finally:
                    idx.close()
            except sqlite3.DatabaseError:
                return False
            self._stale.add(os.path.join(private, "index.sqlite"))
            self._private = None
        shutil.rmtree(private, ignore_errors=True)  # open connections keep their (unlinked) files
        log.info("reading the index %s now", path)
        return True

    def index_current(self, study: str) -> bool:
        """Whether the index can be read as it is for an ingest of ``study`` (which verifies
        with the store only read): it is there, sound and of this dittohead, and it holds every
        record of the study's log (a log of dittohead 0.2 not yet copied counts as not). If not,
        the writer sets it right first (``catch_up``, or a rebuild). A cheap look: the index's
        header, one query, and the next record's name."""
        path = self.root.index_path
        if not os.path.exists(path) or not _sqlite_file_intact(path) or self.old_log(study):
            return False
        try:
            idx = Index(path, readonly=True)
        except sqlite3.Error:
            return False
        try:
            if not idx.schema_ok:
                return False
            last = idx.last_seq(study)
        except sqlite3.Error:
            return False
        finally:
            idx.close()
        return not self.objects.exists(studylog.record_key(study, last + 1))

    def _open_reader(self) -> Index:
        """A read-only connection to the index, or to a reader's own where it cannot be used."""
        path = self.root.index_path
        with self._readers_lock:
            if self._private is not None:
                return Index(os.path.join(self._private, "index.sqlite"), readonly=True)
            why = ""
            try:
                if not os.path.exists(path):
                    why = "missing"
                elif not _sqlite_file_intact(path):
                    why = "damaged"
                else:
                    idx = Index(path, readonly=True)
                    if idx.schema_ok:
                        return idx
                    idx.close()
                    why = "of an earlier dittohead"
            except sqlite3.DatabaseError as e:
                if not _is_damage(e):
                    raise StoreError(f"{path}: cannot read the index: {_sqlite_reason(e, self.root.store)}") from e
                why = f"unreadable ({e})"
            log.warning("the index %s is %s: reading from one built from the store for this command "
                        "(the next ingest, or 'dittohead fsck', rebuilds it)", path, why)
            private = tempfile.mkdtemp(prefix="dittohead-index-")
            try:
                self.rebuild_index(os.path.join(private, "index.sqlite")).close()
            except BaseException:
                shutil.rmtree(private, ignore_errors=True)
                raise
            self._private = private
            return Index(os.path.join(private, "index.sqlite"), readonly=True)

    def log_studies(self) -> list[str]:
        """The studies with a log: a folder of record objects, or a log of dittohead 0.2."""
        out = set()
        for name in self.objects.names("studies"):
            if name.endswith("/") and fmt.STUDY_NAME_RE.match(name[:-1]):
                out.add(name[:-1])
            elif name.endswith(".log") and fmt.STUDY_NAME_RE.match(name[:-4]):
                out.add(name[:-4])
        return sorted(out)

    def old_log(self, study: str) -> bool:
        """Whether the study's history is (partly) in a log of dittohead 0.2 not yet copied
        into record objects."""
        return self.objects.exists(log_key(study)) and not self.objects.exists(copied_key(study))

    def read_record(self, study: str, seq: int) -> studylog.LogRecord | None:
        """Record ``seq`` of the study's log, if its object is there (FormatError if damaged)."""
        key = studylog.record_key(study, seq)
        try:
            data = self.objects.get(key, fmt.LOG_RECORD_MAX + 64)
        except FileNotFoundError:
            return None
        return studylog.parse_one(data, seq, what=f"study log {study}: record {seq}")

    def read_log(self, study: str) -> studylog.ParsedLog:
        """The study's whole history, in order; FormatError where it is damaged (a record
        missing before one that is there, a record object that fails its checks)."""
        records: list[studylog.LogRecord] = []
        good, torn = 0, False
        if self.old_log(study):
            parsed = studylog.parse(self.objects.get(log_key(study), 1 << 40), what=f"study log {study}")
            records, good, torn = list(parsed.records), parsed.good_size, parsed.torn
        seqs = sorted(seq for name in self.objects.names(f"studies/{study}")
                      if (seq := studylog.record_seq(name)) is not None)
        for seq in seqs:
            if seq <= len(records):
                continue  # a copy of the old log's record, made by an upgrade that stopped
            if seq != len(records) + 1:
                raise FormatError(f"study log {study}: record {len(records) + 1} is missing "
                                  f"(record {seq} is there)")
            rec = self.read_record(study, seq)
            if rec is None:
                raise FormatError(f"study log {study}: record {seq} is gone")
            records.append(rec)
        return studylog.ParsedLog(records, good, torn)

    def upgrade_logs(self) -> None:
        """Copy each log of dittohead 0.2 into record objects (by the writer, once a study):
        every record, then the mark that it is done; the old log is never written again. A log
        that cannot be read is left as it is (fsck reports it; the ingest refuses its study)."""
        if not self.writer:
            raise StoreError("only the ingest that holds the lock upgrades the study logs")
        for study in self.log_studies():
            if not self.old_log(study):
                continue
            key = log_key(study)
            try:
                parsed = studylog.parse(self.objects.get(key, 1 << 40), what=f"study log {study}")
            except FormatError as e:
                log.error("study %s: its log of dittohead 0.2 is damaged (%s): not upgraded; run "
                          "'dittohead fsck'", study, e)
                continue
            for rec in parsed.records:
                data = studylog.encode_one(rec)
                rkey = studylog.record_key(study, rec.seq)
                if not self.objects.put_bytes(rkey, data) and self.objects.get(rkey, len(data) + 1) != data:
                    raise StoreError(f"study log {study}: record {rec.seq} exists and differs from the "
                                     "log of dittohead 0.2; run 'dittohead fsck'")
            self.objects.put_bytes(copied_key(study), json.dumps(
                {"records": len(parsed.records), "log_size": parsed.good_size}).encode() + b"\n")
            log.info("study %s: its log of dittohead 0.2 (%d records) is now in record objects",
                     study, len(parsed.records))

    def committed_seq(self, study: str) -> tuple[int, str]:
        """The highest seq anything besides the log says was committed, and what says so.

        The index, the receipts and the have-segments are all written after the commit point,
        so a log holding fewer records than this has lost committed history (damage), however
        much its tail looks like a crash's torn write.
        """
        best, source = 0, ""
        try:
            db = sqlite3.connect(f"file:{self.root.index_path}?mode=ro", uri=True)
            try:
                row = db.execute("SELECT last_seq FROM studies WHERE name=?", (study,)).fetchone()
            finally:
                db.close()
            if row and row[0] > best:
                best, source = row[0], "the index"
        except sqlite3.Error:
            pass
        box = self.root.dropbox(study)
        for name in _listdir(box.have):
            if name.endswith(fmt.HAVE_SUFFIX) and name[: -len(fmt.HAVE_SUFFIX)].isdigit():
                seq = int(name[: -len(fmt.HAVE_SUFFIX)])
                if seq > best:
                    best, source = seq, f"have-segment {name}"
        for name in _listdir(box.receipts):
            try:
                r = records.decode_receipt(fsutil.read_limited(os.path.join(box.receipts, name), fmt.RECEIPT_MAX_SIZE))
            except (OSError, ValueError, FormatError):
                continue
            if r.study == study and r.seq > best:
                best, source = r.seq, f"receipt {name}"
        return best, source

    def read_manifest(self, mid: bytes) -> tuple[bytes, mf.Manifest]:
        key = manifest_key(mid)
        try:
            data = self.objects.get(key, fmt.STORED_MANIFEST_MAX_SIZE)
        except FileNotFoundError:
            raise StoreError(f"manifest {mid.hex()} is missing from the store") from None
        if blake3(data).digest() != mid:
            raise IntegrityError(f"manifest {mid.hex()} does not match its id")
        return data, mf.decode(data, stored=True)

    def pack_entries(self, pid: bytes) -> list[pack.PackEntry]:
        key = pack_key(pid)
        return pack.read_entries_by_range(self.objects.size(key), lambda off, n: self.objects.read_range(key, off, n),
                                          what=f"pack {pid.hex()}")

    def catch_up(self, idx: Index | None = None) -> int:
        """Apply log records the index has not seen (after a crash past the commit point): by
        the writer, to its index, or to an index of the caller's own (``idx``)."""
        if idx is None and not self.writer:
            raise StoreError("only the ingest that holds the lock catches the index up")
        idx = idx or self.index
        applied = 0
        for study in self.log_studies():
            last = idx.last_seq(study)
            if not self.old_log(study):  # the records after the last the index holds, by key
                seq = last + 1
                while (rec := self.read_record(study, seq)) is not None:
                    self.apply_record(idx, study, rec)
                    applied += 1
                    seq += 1
                continue
            parsed = self.read_log(study)
            if last > len(parsed.records):
                # The log lost committed records: reads go on from the index, which still holds
                # them; ingest refuses this study (its next seq would not follow); fsck reports it.
                log.error("study %s: the index knows %d submissions but the log holds %d: the log is "
                          "damaged; run 'dittohead fsck'", study, last, len(parsed.records))
                continue
            for rec in parsed.records[last:]:
                self.apply_record(idx, study, rec)
                applied += 1
        return applied

    def apply_record(self, idx: Index, study: str, rec: studylog.LogRecord):
        _, m = self.read_manifest(rec.manifest)
        rows = []
        for pid in rec.packs:
            rows += [(e.id, pid, e.offset, e.length) for e in self.pack_entries(pid)]
        return idx.apply(study, rec, m, rows)

    def rebuild_index(self, path: str | None = None) -> Index:
        """Build an index from packs, manifests and logs only (at ``path``, or in place: only
        by the writer)."""
        target = path or self.root.index_path
        if path is None:
            if not self.writer:
                raise StoreError("the index is rebuilt in place only by the ingest that holds the lock")
            self.close()
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.unlink(target + suffix)
                except FileNotFoundError:
                    pass
        idx = Index(target)
        for key in self.objects.list("packs"):
            name = key.rsplit("/", 1)[-1]
            if not name.endswith(fmt.PACK_SUFFIX):
                continue
            try:
                pid = bytes.fromhex(name[: -len(fmt.PACK_SUFFIX)])
                entries = self.pack_entries(pid)
            except (ValueError, FormatError) as e:
                log.warning("rebuild: skipping pack %s: %s", key, e)
                continue
            idx.add_chunks((e.id, pid, e.offset, e.length) for e in entries)
        for study in self.log_studies():
            for rec in self.read_log(study).records:
                _, m = self.read_manifest(rec.manifest)
                idx.apply(study, rec, m)
        if path is None:
            self._index = idx
        return idx

    # -- reading content, verified
    def read_chunk(self, cid: bytes) -> bytes:
        loc = self.index.chunk(cid)
        if loc is None:
            raise IntegrityError(f"chunk {cid.hex()} is not in the store")
        pid, offset, length = loc
        try:
            data = self.objects.read_range(pack_key(pid), offset, length)
        except FileNotFoundError:
            raise IntegrityError(f"chunk {cid.hex()}: pack {pid.hex()} is missing") from None
        if len(data) != length or blake3(data).digest() != cid:
            log.error("chunk %s in pack %s does not match its id", cid.hex(), pid.hex())
            raise IntegrityError(f"chunk {cid.hex()} in pack {pid.hex()} does not match its id")
        return data
