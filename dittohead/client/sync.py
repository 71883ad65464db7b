"""``sync``: one run of the client, from a source folder to a study's drop box.

1. Reconcile earlier submissions with their receipts (a submission that vanished from the inbox
   without a receipt was rejected: its files are sent again).
2. Re-use an unfinished staging folder (complete packs are not sent again; partial files go).
3. Scan; if every file is as last read and last sent, stop: nothing to send.
4. Read new have-segments: the chunks the study already holds. Read only files whose size,
   mtime_ns, ctime_ns or inode changed since last read; chunk and hash them; put each chunk
   the server lacks into a pack (about 16 MiB) and upload complete packs.
5. Write the manifest (files whose content differs from what this client last sent), then commit
   by renaming the staging folder. Nothing to send: no submission is made. More files than one
   submission may hold (``fmt.MANIFEST_MAX_ENTRIES``, ``fmt.MANIFEST_MAX_SIZE``): the run makes
   several, one after another (``_Parts``).
"""

from __future__ import annotations

import calendar
import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from dittohead import format as fmt
from dittohead import paths, records
from dittohead.client import cache as cc
from dittohead.client.scan import ScanCounts, Scanner, ScanOptions, SourceFile
from dittohead.client.transport import GONE, IN_STAGING, Transport
from dittohead.display import escape
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
    submissions: list[str] = field(default_factory=list)  # committed by this run, in order
    parts: int = 0  # submissions made, or with --dry-run that would be made
    too_large: int = 0  # files too large for any one submission
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
            (self.too_large, "too large for one submission", "too large for one submission"),
            (c.unreadable, "unreadable", "unreadable"),
            (c.bad_names, "bad name", "bad names"),
        ]
        out = [f"{n} {one if n == 1 else many}" for n, one, many in parts if n]
        left_out = f"; {plural(c.excluded, 'file')} left out by --include/--exclude" if c.excluded else ""
        return ("; skipped: " + ", ".join(out) if out else "") + left_out

    @property
    def submission(self) -> str | None:
        """The last submission this run committed, if any."""
        return self.submissions[-1] if self.submissions else None

    def line(self) -> str:
        files = f"{self.new} new, {self.changed} changed, {plural(self.unchanged, 'unchanged file')}"
        if self.dry_run:
            if not (self.new or self.changed):
                return f"sync (dry run): nothing to send ({plural(self.unchanged, 'unchanged file')}){self.skipped()}"
            parts = f" as {self.parts} submissions" if self.parts > 1 else ""
            return (f"sync (dry run): would send {files}{parts}; {human_bytes(self.bytes_read)} read, "
                    f"about {human_bytes(self.bytes_sent)} to send{self.skipped()}")
        if not self.submissions:
            return f"sync: nothing to send ({plural(self.unchanged, 'unchanged file')}){self.skipped()}"
        if len(self.submissions) == 1:
            sent = f"submission {self.submissions[0]}"
        else:
            sent = f"{len(self.submissions)} submissions, {self.submissions[0]} to {self.submissions[-1]}"
        return (f"sync: {files}; {human_bytes(self.bytes_read)} read, {human_bytes(self.bytes_sent)} sent; "
                f"{sent}{self.skipped()}")


def new_submission_name() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + os.urandom(6).hex()


_PART_RE = re.compile(r"^(.*)\.(\d{4,})$")


def next_part_name(name: str) -> str:
    """The name of the submission that follows ``name`` in the same run: ``NAME.0002``, then
    ``NAME.0003``... Each sorts after the one before, so that ingest, which takes submissions in
    the order of their commits and on equal change times by name, takes them in this order."""
    m = _PART_RE.match(name)
    return f"{m[1]}.{int(m[2]) + 1:04d}" if m else f"{name}.0002"


def ago(seconds: float) -> str:
    """How long ago, in words: "just now", "7 min ago", "3 h ago", "2 days ago"."""
    minutes = int(max(seconds, 0) // 60)
    if minutes < 1:
        return "just now"
    if minutes < 120:
        return f"{minutes} min ago"
    if minutes < 48 * 60:
        return f"{minutes // 60} h ago"
    return f"{minutes // (24 * 60)} days ago"


_NAME_TIME_RE = re.compile(r"^(\d{8}T\d{6}Z)-")


def _made_ns(name: str) -> int | None:
    """When this client began submission ``name`` (``new_submission_name``), by its own clock."""
    m = _NAME_TIME_RE.match(name)
    if not m:
        return None
    try:
        return int(calendar.timegm(time.strptime(m[1], "%Y%m%dT%H%M%SZ")) * 1_000_000_000)
    except ValueError:
        return None


def _reconcile(t: Transport, cache: cc.StateCache, study: str, summary: SyncSummary,
               now_ns: Callable[[], int] = time.time_ns) -> None:
    def ingested(name: str) -> bool:
        raw = t.read_receipt(study, name)
        if raw is None:
            return False
        try:
            r = records.decode_receipt(raw)
            summary.notes.append(f"earlier submission {name} was ingested as #{r.seq} "
                                 f"({plural(r.new_versions, 'new version')})")
        except FormatError:
            summary.notes.append(f"earlier submission {name} was ingested (unreadable receipt)")
        cache.set_state(name, cc.INGESTED)
        return True

    waiting: list[str] = []
    for name in cache.submissions((cc.COMMITTING, cc.PENDING)):
        if ingested(name):
            continue
        where = t.submission_state(study, name)
        # The daemon writes the receipt before it removes the folder: a submission ingested
        # between the two looks has a receipt by now.
        if where == GONE and ingested(name):
            continue
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
            waiting.append(name)
    if waiting:  # one note, however many: the oldest says how long the server has been behind
        made = _made_ns(waiting[0])
        when = f" (sent {ago((now_ns() - made) / 1e9)})" if made else ""
        if len(waiting) == 1:
            summary.notes.append(f"earlier submission {waiting[0]} is waiting to be ingested{when}")
        else:
            summary.notes.append(f"{len(waiting)} earlier submissions are waiting to be ingested; "
                                 f"the oldest is {waiting[0]}{when}")


def _refresh_have(t: Transport, cache: cc.StateCache, study: str) -> None:
    known = cache.read_segments()
    tried: set[str] = set()
    # The daemon merges small segments (daemon/housekeeping.py): it writes the merged one, then
    # removes the small ones. A segment gone between the listing and the read is in one written
    # before it went: listing again finds that one.
    for _ in range(3):
        gone = False
        for seg in t.list_have(study):
            if seg in known or seg in tried:
                continue
            try:
                ids = records.decode_have(t.read_have(study, seg), what=f"have-segment {seg}")
            except FileNotFoundError:
                gone = True
                continue
            except (FormatError, ValueError):  # ValueError: larger than the limit
                tried.add(seg)
                continue  # a damaged segment only means re-sending chunks the server may have
            cache.add_segment(seg, ids)
            known.add(seg)
        if not gone:
            return


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
            _reconcile(t, cache, opts.study, summary, now_ns)
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
    staged_new: set[bytes] = set()  # chunks the staging folder carries that the server lacks

    def skip_set() -> set[bytes]:
        """Loaded only when some file may need sending: after an ingest, the new have-segment
        holds an id for every chunk it added, and a sync with nothing to send never reads it."""
        nonlocal skip, staged_new
        if skip is None:
            _refresh_have(t, cache, opts.study)
            skip = cache.have()
            staged_new = staged_ids - skip
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

    from dittohead.chunking import Chunker, pack_chunk_list, unpack_chunk_list
    from dittohead.client.reader import SmallFiles, read

    to_read = {sf.path for sf in files if needs_read(sf)}
    progress.start(sum(sf.size for sf in files if sf.path in to_read), len(to_read))
    # Something is to be sent, so the skip set is loaded already (by needs_read) or there are
    # files to read: loading it here costs nothing more.
    held = skip_set()  # sets staged_new too
    parts = _Parts(opts, t, cache, name, staging_exists, held, staged_new, now_ns)
    chunker = Chunker()
    prefetch = SmallFiles([sf for sf in files if sf.path in to_read])
    batch: list[tuple[str, cc.CachedFile]] = []

    def read_into_part(sf: SourceFile, prefetched, advance: Callable[[int], None]):
        """Read, chunk and hash a file, its new chunks packed into the current submission; None
        if it cannot be read or changes meanwhile (counted, and sent by a later run)."""
        nonlocal batch
        try:
            got = read(sf, chunker, parts.offer, advance, prefetched)
        except OSError as e:
            summary.counts.unreadable += 1
            summary.counts.problems.append(f"'{escape(sf.path)}': cannot read ({e.strerror})")
            return None
        if got is None:
            summary.changing += 1
            return None
        fhash, chunks, st = got
        summary.bytes_read += st.st_size
        racy = start_ns - max(st.st_mtime_ns, st.st_ctime_ns) <= RACY_NS
        mtime = -1 if racy else st.st_mtime_ns
        batch.append((sf.path, cc.CachedFile(st.st_size, mtime, st.st_ctime_ns, st.st_ino, fhash,
                                             pack_chunk_list(chunks))))
        if len(batch) >= 1000:
            cache.put_files(batch)
            batch = []
        return got

    try:
        for sf in files:
            prev = last_sent.get(sf.path)
            if sf.path in to_read:
                # Room first: a file's chunks go into the submission that lists it.
                parts.make_room(sf.path, sf.size // fmt.CHUNK_MIN + 1)
                got = read_into_part(sf, prefetch.take(sf), progress.advance)
                if got is None:
                    continue
                fhash, chunks, st = got
                size, mtime_ns, mode = st.st_size, st.st_mtime_ns, sf.mode
                if prev == fhash:
                    summary.unchanged += 1
                    continue
            else:
                c = cached[sf.path]
                if prev == c.hash:
                    summary.unchanged += 1
                    continue
                chunks = unpack_chunk_list(c.chunks)
                parts.make_room(sf.path, len(chunks))
                fhash, size, mtime_ns, mode = c.hash, sf.size, sf.mtime_ns, sf.mode
                if not parts.holds(chunks):
                    # A chunk of it went with an earlier submission of this run that does not
                    # list it (a staging folder resumed): read again, to send it with this one.
                    got = read_into_part(sf, None, _ignore)
                    if got is None:
                        continue
                    fhash, chunks, st = got
                    size, mtime_ns = st.st_size, st.st_mtime_ns
                    if prev == fhash:
                        summary.unchanged += 1
                        continue
            why_not = parts.add(sf.path, size, mtime_ns, mode, fhash, tuple(chunks))
            if why_not == TOO_LARGE:
                summary.too_large += 1
                summary.counts.problems.append(
                    f"'{escape(sf.path)}': too large to send ({plural(len(chunks), 'chunk')}; a submission's "
                    f"manifest holds about {parts.max_chunks():,} at most)")
                continue
            if why_not is not None:
                summary.changing += 1
                continue
            if prev is None:
                summary.new += 1
            else:
                summary.changed += 1
            if opts.dry_run:
                summary.would_send.append(sf.path)
        parts.commit()
    except BaseException:
        parts.up.abort()
        raise
    finally:
        prefetch.close()
        cache.put_files(batch)
        progress.close()
        summary.bytes_sent = parts.bytes_sent
        summary.submissions = parts.names
        summary.parts = parts.count
    return summary


def _ignore(_n: int) -> None:
    pass


TOO_LARGE = "too large"


class _Parts:
    """The submissions one run makes. Files go into the current one until one more would pass a
    manifest limit (``fmt.MANIFEST_MAX_ENTRIES`` entries, ``fmt.MANIFEST_MAX_SIZE`` bytes);
    then it is committed whole (packs, manifest, rename), and the next one begins.

    Room is made before a file is read (``make_room``, with the most chunks its size allows), so
    that its new chunks are packed into the submission that lists it: the server keeps only the
    chunks a submission's manifest references. A chunk that an earlier submission of this run
    carries *and* lists is not sent again: that one commits first and is ingested first (ingest
    goes by commit order, and ``next_part_name`` makes a tie go the same way); if it is not
    ingested, the later one is rejected for lacking the chunk, and the next run sends its files
    again. A chunk an earlier one carries without listing it (a file that changed while read,
    a resumed staging folder's) counts as not sent (``commit`` takes it out of ``skip``)."""

    def __init__(self, opts: SyncOptions, t: Transport, cache: cc.StateCache, name: str,
                 staging_exists: bool, skip: set[bytes], staged_new: set[bytes],
                 now_ns: Callable[[], int]) -> None:
        import socket  # here: a sync with nothing to send should not pay for importing it

        from dittohead import manifest as mf
        from dittohead.client.packer import Packer

        self.mf, self.Packer = mf, Packer
        self.opts, self.t, self.cache, self.now_ns = opts, t, cache, now_ns
        # Chunks the server holds, or earlier submissions of this run carry and list, or this
        # one carries: shared with the Packer, which adds what it packs.
        self.skip = skip
        self.carried = set(staged_new)  # by this submission, and not held by the server
        self.user, self.host = _user(), socket.gethostname()[: fmt.TEXT_MAX]
        self.header = mf.header_size_max(mf.Manifest(opts.study, opts.site, self.user, self.host, 0))
        self.name = name
        self.up = Packer(t, cache, opts.study, name, skip, opts.dry_run, staging_exists)
        self.entries: list = []
        self.size = self.header
        self.bytes_sent = 0
        self.names: list[str] = []
        self.count = 0

    def max_chunks(self) -> int:
        """The most chunks a file may have to fit in a submission on its own."""
        room = fmt.MANIFEST_MAX_SIZE - self.header - self.mf.entry_size_max(0, 0)
        return max(0, room // self.mf.CHUNK_REF_MAX)

    def _cost(self, path: str, nchunks: int) -> int:
        return self.mf.entry_size_max(len(path) if path.isascii() else len(paths.to_bytes(path)), nchunks)

    def make_room(self, path: str, nchunks: int) -> None:
        """Begin the next submission, unless this one has room for an entry of ``path`` with up
        to ``nchunks`` chunks (or is empty)."""
        cost = self._cost(path, min(nchunks, self.max_chunks()))
        if self.entries and (len(self.entries) >= fmt.MANIFEST_MAX_ENTRIES
                             or self.size + cost > fmt.MANIFEST_MAX_SIZE):
            self.commit()
            self.name = next_part_name(self.name)
            self.up = self.Packer(self.t, self.cache, self.opts.study, self.name, self.skip,
                                  self.opts.dry_run, False)

    def offer(self, chunk) -> None:
        if chunk.id not in self.skip:
            self.carried.add(chunk.id)
        self.up.offer(chunk)

    def holds(self, chunks: list[tuple[bytes, int]]) -> bool:
        """Whether an entry with these chunks may go into the current submission as it is."""
        skip = self.skip
        return all(cid in skip for cid, _ in chunks)

    def add(self, path: str, size: int, mtime_ns: int, mode: int, fhash: bytes, chunks: tuple) -> str | None:
        """Add a file to the current submission (``make_room`` made room for it); None, or why
        not: TOO_LARGE if its entry alone would pass the limit of a manifest's size, or
        "changed" if it did not have the chunks ``make_room`` was told (it changed meanwhile)."""
        cost = self._cost(path, len(chunks))
        if self.header + cost > fmt.MANIFEST_MAX_SIZE:
            return TOO_LARGE
        if self.entries and (len(self.entries) >= fmt.MANIFEST_MAX_ENTRIES
                             or self.size + cost > fmt.MANIFEST_MAX_SIZE):
            return "changed"
        self.entries.append(self.mf.Entry(path, size, mtime_ns, mode, fhash, chunks))
        self.size += cost
        return None

    def commit(self) -> None:
        """Finish the current submission: its packs, its manifest, the rename. Nothing in it (a
        run with nothing new to send): an unfinished staging folder it re-used goes."""
        up, entries, name = self.up, self.entries, self.name
        listed = {cid for e in entries for cid, _ in e.chunks}
        self.skip -= self.carried - listed  # carried, not listed: the server will not keep them
        self.carried = set()
        self.entries, self.size = [], self.header
        if self.opts.dry_run:
            self.bytes_sent += up.bytes_sent
            up.bytes_sent = 0
            self.count += bool(entries)
            return
        try:
            up.flush(wait=True)
        except BaseException:
            up.abort()
            raise
        up.close()
        self.bytes_sent += up.bytes_sent
        up.bytes_sent = 0
        study = self.opts.study
        if not entries:
            if up.staging_exists:
                _drop_staging(self.t, self.cache, study, name)
            return
        mf = self.mf
        m = mf.Manifest(study, self.opts.site, self.user, self.host, self.now_ns(), tuple(entries))
        data = mf.encode(m)
        up.ensure_staging()
        self.t.put(study, name, fmt.MANIFEST_NAME, memoryview(data))
        self.bytes_sent += len(data)
        with self.cache.transaction():
            self.cache.set_state(name, cc.COMMITTING)
            self.cache.record_sent(name, ((e.path, e.hash) for e in entries))
        self.t.commit(study, name)
        with self.cache.transaction():
            self.cache.set_state(name, cc.PENDING)
            self.cache.drop_staged(name)
        self.names.append(name)
        self.count += 1


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
