"""``sync``: one run of the client, from a source folder to a study's drop box.

1. Reconcile earlier submissions with their receipts (a submission that vanished from the inbox
   without a receipt was rejected: its files are sent again).
2. Read new have-segments: the chunks the study already holds.
3. Re-use an unfinished staging folder (complete packs are not sent again; partial files go).
4. Scan; read only files whose size, mtime_ns or inode changed since last read; chunk and hash
   them; put each chunk the server lacks into a pack (about 16 MiB) and upload complete packs.
5. Write the manifest (files whose content differs from what this client last sent), then commit
   by renaming the staging folder. Nothing to send: no submission is made.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol

from dittohead import directio, pack, records
from dittohead import format as fmt
from dittohead import manifest as mf
from dittohead.chunking import Chunk, Chunker
from dittohead.client import cache as cc
from dittohead.client.scan import ScanCounts, ScanOptions, SourceFile, scan
from dittohead.client.transport import GONE, IN_STAGING, Transport, Upload
from dittohead.errors import FormatError, TransportError, UsageError
from dittohead.hashing import EMPTY_HASH, blake3
from dittohead.store.index import pack_chunk_list, unpack_chunk_list
from dittohead.units import human_bytes, plural

RACY_NS = 2_000_000_000  # a file changed this recently may change again within its timestamps' tick


@dataclass(frozen=True)
class SyncOptions:
    source: str
    study: str
    site: str
    scan: ScanOptions = field(default_factory=ScanOptions)
    dry_run: bool = False


class Progress(Protocol):
    def start(self, total_bytes: int, files: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def close(self) -> None: ...


class NoProgress:
    def start(self, total_bytes: int, files: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class SyncSummary:
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    changing: int = 0
    bytes_read: int = 0
    bytes_sent: int = 0
    submission: str | None = None
    dry_run: bool = False
    counts: ScanCounts = field(default_factory=ScanCounts)
    notes: list[str] = field(default_factory=list)
    would_send: list[str] = field(default_factory=list)

    def skipped(self) -> str:
        c = self.counts
        parts = [
            (c.symlinks, "symlink", "symlinks"),
            (c.special, "special file", "special files"),
            (c.too_new, "too new (--min-age)", "too new (--min-age)"),
            (self.changing, "changing while read", "changing while read"),
            (c.unreadable, "unreadable", "unreadable"),
            (c.bad_names, "bad name", "bad names"),
        ]
        out = [f"{n} {one if n == 1 else many}" for n, one, many in parts if n]
        return "; skipped: " + ", ".join(out) if out else ""

    def line(self) -> str:
        files = f"{self.new} new, {self.changed} changed, {self.unchanged} unchanged files"
        if self.dry_run:
            if not (self.new or self.changed):
                return f"sync (dry run): nothing to send ({self.unchanged} unchanged files){self.skipped()}"
            return (f"sync (dry run): would send {files}; {human_bytes(self.bytes_read)} read, "
                    f"about {human_bytes(self.bytes_sent)} to send{self.skipped()}")
        if self.submission is None:
            return f"sync: nothing to send ({plural(self.unchanged, 'unchanged file')}){self.skipped()}"
        return (f"sync: {files}; {human_bytes(self.bytes_read)} read, {human_bytes(self.bytes_sent)} sent; "
                f"submission {self.submission}{self.skipped()}")


def new_submission_name() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + os.urandom(6).hex()


class _Uploader:
    """Streams chunks the server lacks into packs in the staging folder, one pack at a time."""

    def __init__(self, t: Transport, cache: cc.StateCache, study: str, name: str,
                 skip: set[bytes], dry_run: bool, staging_exists: bool) -> None:
        self.t, self.cache, self.study, self.name = t, cache, study, name
        self.skip = skip
        self.dry_run = dry_run
        self.staging_exists = staging_exists
        self.upload: Upload | None = None
        self.writer: pack.PackWriter | None = None
        self.bytes_sent = 0
        # Each finished pack is fsynced and renamed in the background while the next one fills;
        # at most one is in flight, and it is recorded as staged only once it is complete.
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: tuple[Future[None], Upload, str, int, bytes] | None = None

    def offer(self, chunk: Chunk) -> None:
        if chunk.id in self.skip:
            return
        self.skip.add(chunk.id)
        if self.dry_run:
            self.bytes_sent += chunk.length
            return
        try:
            if self.writer is None:
                self.ensure_staging()
                self.upload = self.t.open_upload(self.study, self.name)
                self.writer = pack.PackWriter(self.upload)
            self.writer.add(chunk.id, chunk.data)
            if self.writer.full():
                self.flush()
        except OSError as e:  # not a source file's fault: it must not read as one
            raise _write_error(e) from e

    def ensure_staging(self) -> None:
        if not self.staging_exists:
            self.cache.set_state(self.name, cc.STAGING, time.time_ns())
            self.t.make_staging(self.study, self.name)
            self.staging_exists = True

    def flush(self, wait: bool = False) -> None:
        """Finish the current pack (in the background); with ``wait``, every pack is complete."""
        try:
            if self.writer is not None and self.upload is not None:
                self._settle()  # the previous pack is recorded before anything of this one can fail
                pid, size = self.writer.finish()
                filename = pid.hex() + fmt.PACK_SUFFIX
                ids = b"".join(e.id for e in self.writer.entries)
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="dittohead-upload")
                self._inflight = (self._pool.submit(self.upload.finish, filename), self.upload, filename, size, ids)
                self.upload, self.writer = None, None
            if wait:
                self._settle()
        except OSError as e:
            raise _write_error(e) from e

    def _settle(self) -> None:
        if self._inflight is None:
            return
        fut, upload, filename, size, ids = self._inflight
        self._inflight = None
        try:
            fut.result()
        except BaseException:
            upload.abort()  # its temporary file: a pack that never became complete
            raise
        self.cache.add_staged(self.name, filename, size, ids)
        self.bytes_sent += size

    def abort(self) -> None:
        if self._inflight is not None:
            with contextlib.suppress(Exception):
                self._settle()
        if self.upload is not None:
            self.upload.abort()
            self.upload, self.writer = None, None
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _write_error(e: OSError) -> TransportError:
    return TransportError(f"cannot write to the drop box: {e.strerror or e}")


def _reconcile(t: Transport, cache: cc.StateCache, study: str, summary: SyncSummary) -> None:
    for name in cache.submissions((cc.COMMITTING, cc.PENDING)):
        raw = t.read_receipt(study, name)
        if raw is not None:
            try:
                r = records.decode_receipt(raw)
                summary.notes.append(f"earlier submission {name} was ingested as #{r.seq} "
                                     f"({plural(r.new_versions, 'new version')})")
            except FormatError:
                summary.notes.append(f"earlier submission {name} was ingested (unreadable receipt)")
            cache.set_state(name, cc.INGESTED)
            continue
        where = t.submission_state(study, name)
        if where == IN_STAGING:  # the commit rename never happened: carry on filling it
            with cache.transaction():
                cache.forget_sent(name)
                cache.set_state(name, cc.STAGING)
        elif where == GONE:
            with cache.transaction():
                cache.forget_sent(name)
                cache.set_state(name, cc.LOST)
            summary.notes.append(f"earlier submission {name} left the inbox without a receipt "
                                 "(rejected by the server?): its files are sent again")
        else:
            cache.set_state(name, cc.PENDING)


def _refresh_have(t: Transport, cache: cc.StateCache, study: str) -> None:
    known = cache.read_segments()
    for seg in t.list_have(study):
        if seg in known:
            continue
        try:
            ids = records.decode_have(t.read_have(study, seg), what=f"have-segment {seg}")
        except FormatError:
            continue  # a damaged segment only means re-sending chunks the server may have
        cache.add_segment(seg, ids)


def _resume_staging(t: Transport, cache: cc.StateCache, study: str) -> tuple[str | None, set[bytes]]:
    names = cache.submissions((cc.STAGING,))
    for stale in names[:-1]:
        t.remove_staging(study, stale)
        cache.drop_staged(stale)
        cache.set_state(stale, cc.LOST)
    if not names:
        return None, set()
    name = names[-1]
    try:
        listing = t.list_staging(study, name)
    except FileNotFoundError:
        cache.drop_staged(name)
        cache.set_state(name, cc.LOST)
        return None, set()
    ids: set[bytes] = set()
    keep = set()
    for filename, (size, blob) in cache.staged(name).items():
        if listing.get(filename) == size:
            keep.add(filename)
            ids.update(blob[i : i + 32] for i in range(0, len(blob), 32))
        else:
            cache.drop_staged(name, filename)
    for filename in listing:
        if filename not in keep:  # partial uploads, unrecorded packs, an old manifest
            t.remove(study, name, filename)
    return name, ids


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
PREFETCH_THREADS = 4  # small files are read ahead, several at once: a cold disk serves them faster
PREFETCH_BATCH = 16  # files per task: one hand-over between threads per batch, not per file
PREFETCH_WINDOW = 64  # files read ahead at most (each at most CHUNK_MIN bytes: 16 MiB in all)

Slurped = tuple[bytes, bytes, os.stat_result, os.stat_result]  # data, BLAKE3 of it, stat before, after


def _slurp(paths: list[str]) -> list[Slurped | OSError]:
    """Small files' bytes (at most CHUNK_MIN + 1 of each), their hashes, and their stat before
    and after. Hashed here, on the reading thread: a small file's hash is its one chunk's id."""
    out: list[Slurped | OSError] = []
    for path in paths:
        try:
            data, st, st2 = directio.read_small(path, _OPEN_FLAGS, fmt.CHUNK_MIN)
        except OSError as e:
            out.append(e)
            continue
        out.append((data, blake3(data).digest(), st, st2))
    return out


class _Slot:
    """One file's place in a batch being read ahead."""

    def __init__(self, batch: Future[list[Slurped | OSError]], i: int) -> None:
        self.batch, self.i = batch, i

    def result(self) -> Slurped:
        got = self.batch.result()[self.i]
        if isinstance(got, OSError):
            raise got
        return got


class _Prefetcher:
    """Reads the small files among ``files`` ahead, in order, in batches on worker threads."""

    def __init__(self, files: list[SourceFile]) -> None:
        self.queue = deque(sf for sf in files if sf.size <= fmt.CHUNK_MIN)
        self.pending: dict[str, _Slot] = {}
        self.pool = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="dittohead-read") if self.queue else None
        self._fill()

    def _fill(self) -> None:
        while self.pool is not None and self.queue and len(self.pending) + PREFETCH_BATCH <= PREFETCH_WINDOW:
            batch = [self.queue.popleft() for _ in range(min(PREFETCH_BATCH, len(self.queue)))]
            fut = self.pool.submit(_slurp, [sf.os_path for sf in batch])
            for i, sf in enumerate(batch):
                self.pending[sf.path] = _Slot(fut, i)

    def take(self, sf: SourceFile) -> _Slot | None:
        slot = self.pending.pop(sf.path, None)
        self._fill()
        return slot

    def close(self) -> None:
        if self.pool is not None:
            for slot in self.pending.values():
                slot.batch.cancel()
            self.pool.shutdown(wait=True)
            self.pool = None


def _read_small(got: Slurped, on_chunk: Callable[[Chunk], None],
                progress: Progress) -> tuple[bytes, list[tuple[bytes, int]], os.stat_result] | None:
    data, digest, st, st2 = got
    if len(data) != st.st_size or (st2.st_size, st2.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        return None
    progress.advance(len(data))
    if not data:
        return EMPTY_HASH, [], st
    on_chunk(Chunk(digest, data))  # a file of one chunk: the chunk's id is the file's hash
    return digest, [(digest, len(data))], st


def _read(sf: SourceFile, chunker: Chunker, on_chunk: Callable[[Chunk], None],
          progress: Progress, prefetched: _Slot | None = None,
          ) -> tuple[bytes, list[tuple[bytes, int]], os.stat_result] | None:
    """Chunk and hash one file; None if it changed while being read."""
    if prefetched is not None:
        got = prefetched.result()
        if len(got[0]) <= fmt.CHUNK_MIN:
            return _read_small(got, on_chunk, progress)
        # It grew past one chunk since the scan: read it as a large file.
    f = directio.Reader(directio.open_fd(sf.os_path, _OPEN_FLAGS))
    try:
        st = os.fstat(f.fd)
        # A file of one chunk (up to CHUNK_MIN bytes) has its chunk id as its file hash.
        h = blake3() if st.st_size > fmt.CHUNK_MIN else None
        chunks: list[tuple[bytes, int]] = []
        total = 0
        for c in chunker.cut_stream(f, st.st_size):
            if h is not None:
                h.update(c.data)
            chunks.append((c.id, c.length))
            total += c.length
            on_chunk(c)
            progress.advance(c.length)
        st2 = os.fstat(f.fd)
    finally:
        f.close()
    if total != st.st_size or (st2.st_size, st2.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        return None
    if h is not None:
        fhash = h.digest()
    elif len(chunks) == 1:
        fhash = chunks[0][0]
    elif not chunks:
        fhash = EMPTY_HASH
    else:
        return None  # grew past CHUNK_MIN while being read: changing
    return fhash, chunks, st


def sync(opts: SyncOptions, t: Transport, cache: cc.StateCache,
         progress: Progress | None = None, *, now_ns: Callable[[], int] = time.time_ns) -> SyncSummary:
    progress = progress or NoProgress()
    if not os.path.isdir(opts.source):
        raise UsageError(f"{opts.source}: no such folder")
    summary = SyncSummary(dry_run=opts.dry_run)
    t.check_study(opts.study)
    if not opts.dry_run:
        _reconcile(t, cache, opts.study, summary)
    _refresh_have(t, cache, opts.study)
    name, staged_ids = (None, set()) if opts.dry_run else _resume_staging(t, cache, opts.study)
    staging_exists = name is not None
    name = name or new_submission_name()

    start_ns = now_ns()
    files = list(scan(opts.source, opts.scan, summary.counts, start_ns))
    cached = cache.load_files()
    last_sent = cache.last_sent()
    skip: set[bytes] | None = None  # chunks the server holds or this submission carries

    def skip_set() -> set[bytes]:  # loaded only when some file may need sending
        nonlocal skip
        if skip is None:
            skip = cache.have()
            skip |= staged_ids
        return skip

    def needs_read(sf: SourceFile) -> bool:
        c = cached.get(sf.path)
        if c is None or (c.size, c.mtime_ns, c.ctime_ns, c.ino) != (sf.size, sf.mtime_ns, sf.ctime_ns, sf.ino):
            return True
        if last_sent.get(sf.path) == c.hash:
            return False
        held = skip_set()
        return any(cid not in held for cid, _ in unpack_chunk_list(c.chunks))

    to_read = {sf.path for sf in files if needs_read(sf)}
    progress.start(sum(sf.size for sf in files if sf.path in to_read), len(to_read))
    up = _Uploader(t, cache, opts.study, name, skip_set() if to_read else set(), opts.dry_run, staging_exists)
    chunker = Chunker()
    prefetch = _Prefetcher([sf for sf in files if sf.path in to_read])
    entries: list[mf.Entry] = []
    batch: list[tuple[str, cc.CachedFile]] = []
    try:
        for sf in files:
            if sf.path in to_read:
                try:
                    got = _read(sf, chunker, up.offer, progress, prefetch.take(sf))
                except OSError as e:
                    summary.counts.unreadable += 1
                    summary.counts.problems.append(f"{sf.path}: cannot read ({e.strerror})")
                    continue
                if got is None:
                    summary.changing += 1
                    continue
                fhash, chunks, st = got
                summary.bytes_read += st.st_size
                racy = start_ns - max(st.st_mtime_ns, st.st_ctime_ns) <= RACY_NS
                mtime = -1 if racy else st.st_mtime_ns
                batch.append((sf.path, cc.CachedFile(st.st_size, mtime, st.st_ctime_ns, st.st_ino, fhash,
                                                     pack_chunk_list(chunks))))
                if len(batch) >= 1000:
                    cache.put_files(batch)
                    batch = []
                size, mtime_ns, mode = st.st_size, st.st_mtime_ns, sf.mode
            else:
                c = cached[sf.path]
                fhash, chunks = c.hash, None  # unpacked only if the file is sent
                size, mtime_ns, mode = sf.size, sf.mtime_ns, sf.mode
            prev = last_sent.get(sf.path)
            if prev == fhash:
                summary.unchanged += 1
                continue
            if chunks is None:
                chunks = unpack_chunk_list(cached[sf.path].chunks)
            if prev is None:
                summary.new += 1
            else:
                summary.changed += 1
            entries.append(mf.Entry(sf.path, size, mtime_ns, mode, fhash, tuple(chunks)))
            if opts.dry_run:
                summary.would_send.append(sf.path)
    except BaseException:
        up.abort()
        raise
    finally:
        prefetch.close()
        cache.put_files(batch)
        progress.close()

    if opts.dry_run:
        summary.bytes_sent = up.bytes_sent
        return summary
    try:
        up.flush(wait=True)
    except BaseException:
        up.abort()
        raise
    up.close()
    summary.bytes_sent = up.bytes_sent
    if not entries:
        if up.staging_exists:
            t.remove_staging(opts.study, name)
            cache.drop_staged(name)
            cache.set_state(name, cc.LOST)
        return summary

    import socket  # here: a sync with nothing to send should not pay for importing it

    m = mf.Manifest(opts.study, opts.site, _user(), socket.gethostname()[: fmt.TEXT_MAX], now_ns(), tuple(entries))
    data = mf.encode(m)
    up.ensure_staging()
    t.put(opts.study, name, fmt.MANIFEST_NAME, memoryview(data))
    summary.bytes_sent += len(data)
    with cache.transaction():
        cache.set_state(name, cc.COMMITTING)
        cache.record_sent(name, ((e.path, e.hash) for e in entries))
    t.commit(opts.study, name)
    with cache.transaction():
        cache.set_state(name, cc.PENDING)
        cache.drop_staged(name)
    summary.submission = name
    return summary


def _user() -> str:
    with contextlib.suppress(Exception):
        import getpass

        return getpass.getuser()[: fmt.TEXT_MAX]
    return "unknown"
