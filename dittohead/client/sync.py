"""``sync``: one run of the client, from a source folder to a study's drop box.

1. Reconcile earlier submissions with their receipts (a submission that vanished from the inbox
   without a receipt was rejected: its files are sent again).
2. Re-use an unfinished staging folder (complete packs are not sent again; partial files go).
3. Scan; if every file is as last read and last sent, stop: nothing to send.
4. Read new have-segments: the chunks the study already holds. Read only files whose size,
   mtime_ns, ctime_ns or inode changed since last read; chunk and hash them; put each chunk
   the server lacks into a pack (about 16 MiB) and upload complete packs.
5. Write the manifest (files whose content differs from what this client last sent), then commit
   by renaming the staging folder. Nothing to send: no submission is made.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from dittohead import format as fmt
from dittohead import records
from dittohead.client import cache as cc
from dittohead.client.scan import ScanCounts, Scanner, ScanOptions, SourceFile
from dittohead.client.transport import GONE, IN_STAGING, Transport
from dittohead.errors import FormatError, UsageError
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
        left_out = f"; {plural(c.excluded, 'file')} left out by --include/--exclude" if c.excluded else ""
        return ("; skipped: " + ", ".join(out) if out else "") + left_out

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


def sync(opts: SyncOptions, t: Transport, cache: cc.StateCache,
         progress: Progress | None = None, *, now_ns: Callable[[], int] = time.time_ns) -> SyncSummary:
    progress = progress or NoProgress()
    if not os.path.isdir(opts.source):
        raise UsageError(f"{opts.source}: no such folder")
    summary = SyncSummary(dry_run=opts.dry_run)
    scanner = Scanner(opts.source, opts.scan)  # lists the folders ahead while this goes on
    try:
        t.check_study(opts.study)
        if not opts.dry_run:
            _reconcile(t, cache, opts.study, summary)
        name, staged_ids = (None, set()) if opts.dry_run else _resume_staging(t, cache, opts.study)
        cached = cache.load_files()
        last_sent = cache.last_sent()
        start_ns = now_ns()
        files = scanner.files(summary.counts, start_ns)
    finally:
        scanner.close()
    staging_exists = name is not None
    name = name or new_submission_name()
    skip: set[bytes] | None = None  # chunks the server holds or this submission carries

    def skip_set() -> set[bytes]:
        """Loaded only when some file may need sending: after an ingest, the new have-segment
        holds an id for every chunk it added, and a sync with nothing to send never reads it."""
        nonlocal skip
        if skip is None:
            _refresh_have(t, cache, opts.study)
            skip = cache.have()
            skip |= staged_ids
        return skip

    def as_read(sf: SourceFile) -> cc.CachedFile | None:
        """What the cache knows of the file, if it is unchanged since it was read."""
        c = cached.get(sf.path)
        if c is None or (c.size, c.mtime_ns, c.ctime_ns, c.ino) != (sf.size, sf.mtime_ns, sf.ctime_ns, sf.ino):
            return None
        return c

    def needs_read(sf: SourceFile) -> bool:
        c = as_read(sf)
        if c is None:
            return True
        if last_sent.get(sf.path) == c.hash:
            return False
        held = skip_set()
        return any(cid not in held for cid, _ in unpack_chunk_list(c.chunks))

    def sent_as_is(sf: SourceFile) -> bool:
        c = as_read(sf)
        return c is not None and last_sent.get(sf.path) == c.hash

    if all(sent_as_is(sf) for sf in files):
        # Nothing new, changed or unsent: the common case. It ends here, before the code that
        # reads, packs and sends is even imported.
        summary.unchanged = len(files)
        if staging_exists:
            _drop_staging(t, cache, opts.study, name)
        return summary

    from dittohead import manifest as mf
    from dittohead.chunking import Chunker, pack_chunk_list, unpack_chunk_list
    from dittohead.client.packer import Packer
    from dittohead.client.reader import SmallFiles, read

    to_read = {sf.path for sf in files if needs_read(sf)}
    progress.start(sum(sf.size for sf in files if sf.path in to_read), len(to_read))
    up = Packer(t, cache, opts.study, name, skip_set() if to_read else set(), opts.dry_run, staging_exists)
    chunker = Chunker()
    prefetch = SmallFiles([sf for sf in files if sf.path in to_read])
    entries: list[mf.Entry] = []
    batch: list[tuple[str, cc.CachedFile]] = []
    try:
        for sf in files:
            if sf.path in to_read:
                try:
                    got = read(sf, chunker, up.offer, progress.advance, prefetch.take(sf))
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
            _drop_staging(t, cache, opts.study, name)
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


def _drop_staging(t: Transport, cache: cc.StateCache, study: str, name: str) -> None:
    """An unfinished staging folder that this run has nothing to add to: it goes."""
    t.remove_staging(study, name)
    cache.drop_staged(name)
    cache.set_state(name, cc.LOST)


def _user() -> str:
    with contextlib.suppress(Exception):
        import getpass

        return getpass.getuser()[: fmt.TEXT_MAX]
    return "unknown"
