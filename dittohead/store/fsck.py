"""fsck: prove the store's integrity, in layers, yielding findings instead of raising.

1. packs: every trailer (always) and every chunk against its id (``read_data``);
2. study logs: every record sound, a torn tail told apart from damage;
3. manifests: each one named by a log is present, matches its id, decodes, and every chunk it
   references is in a sound pack with the right length; a finding names the studies, paths and
   versions it affects;
4. the index: rebuilt from the above in memory and compared (in SQLite); replaced when it
   disagrees (the index is derived, so this is a repair, not damage);
5. the permission model: every folder of the server root with the mode, owner and group that
   ``init`` and ``study add`` gave it (a finding of severity "damage", kind "permissions"); a
   mode an earlier dittohead gave, looser than this one's but no damage (ROOT/dropbox/ 0755),
   is a "warning" of the same kind.
Severity "damage" makes the CLI exit 3; "warning" and "repaired" do not.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from dittohead import directio, fsutil, pack, records, studylog
from dittohead import format as fmt
from dittohead import manifest as mf
from dittohead.display import escape, json_path
from dittohead.errors import FormatError, StoreError
from dittohead.hashing import blake3
from dittohead.lock import FileLock, Held
from dittohead.store.index import DERIVED_TABLES, Index
from dittohead.store.repo import Store, manifest_key

DAMAGE = "damage"
WARNING = "warning"
REPAIRED = "repaired"


@dataclass(frozen=True)
class Affected:
    study: str
    path: str
    version: int


@dataclass
class Finding:
    severity: str
    kind: str  # pack, chunk, log, manifest, published, index, layout
    object: str
    message: str
    affects: list[Affected] = field(default_factory=list)

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["affects"] = [{**a, **json_path(a["path"])} for a in doc["affects"]]
        return doc

    def line(self) -> str:
        s = f"{self.severity}: {self.kind} {self.object}: {self.message}"
        if self.affects:
            shown = ", ".join(f"{a.study}:{escape(a.path)} v{a.version}" for a in self.affects[:5])
            more = f" and {len(self.affects) - 5} more" if len(self.affects) > 5 else ""
            s += f" (affects {shown}{more})"
        return s


@dataclass
class FsckStats:
    packs: int = 0
    chunks: int = 0
    bytes_read: int = 0
    studies: int = 0
    submissions: int = 0
    versions: int = 0


PARALLEL_MIN_BYTES = 64 * 1024 * 1024
TRAILER_READERS = 8


def hash_pack_data(path: str, entries: list[tuple[bytes, int, int]]) -> tuple[int, list[tuple[bytes, int]], str]:
    """Read a pack's data region front to back and check each chunk against its id.

    Read through the page cache, told that the read is sequential, the next block read ahead,
    each block fed straight to the hash of the chunk(s) it holds. The kernel's read-ahead keeps
    more of a disk busy than direct reads do (the figures: benchmarks/README.md, "Figures
    behind the code's choices"). What the cache held of the pack was dropped when
    its trailer was read (read_trailer), so that this reads the disk's copy, not one still in
    memory; it is dropped again after, so that a check of the whole store does not push out
    what the server is using. (Dropping it here, just before, was slower, perhaps because the
    trailer's pages, just read on another CPU, make the kernel drain every CPU's page lists.)
    Entries are contiguous from the header on (the trailer check made sure). A chunk cut short
    by the end of the file fails.
    Returns (bytes read, [(bad chunk id, offset)], error). Runs in a worker process.
    """
    bad: list[tuple[bytes, int]] = []
    got = 0
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError as e:
        return 0, [], f"cannot read: {e.strerror}"
    directio.advise(fd, "SEQUENTIAL")
    r = directio.Reader(fd)
    try:
        block, pos = memoryview(b""), 0
        skip = fmt.PACK_HEADER.size  # checked with the trailer
        while skip:
            block, pos = r.next_block(), 0
            if not block:
                break
            pos = min(skip, len(block))
            skip -= pos
        for cid, offset, length in entries:
            h = blake3()
            left = length
            while left:
                if pos == len(block):
                    block, pos = r.next_block(), 0
                    if not block:
                        break
                take = min(left, len(block) - pos)
                h.update(block[pos : pos + take])
                pos += take
                left -= take
                got += take
            if left or h.digest() != cid:
                bad.append((cid, offset))
    except OSError as e:
        return got, bad, f"cannot read: {e.strerror}"
    finally:
        directio.advise(fd, "DONTNEED")
        r.close()
    return got, bad, ""


@dataclass
class DataJob:
    """One sound pack's data to hash, and the worker's answer once it is submitted."""

    hexid: str
    path: str
    entries: list[tuple[bytes, int, int]]
    future: Future[tuple[int, list[tuple[bytes, int]], str]] | None = None


class Checker:
    def __init__(self, store: Store, *, read_data: bool = False,
                 progress: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.read_data = read_data
        self.progress = progress or (lambda n: None)
        self.stats = FsckStats()
        self.chunks: dict[bytes, tuple[bytes, int]] = {}  # id -> (pack id, length), by trailers
        self.bad_chunks: dict[bytes, str] = {}  # id -> why
        # Every new version as (study, path, n, chunks); which versions a chunk makes is only
        # worked out when a chunk fails its hash (see affected_by).
        self.made: list[tuple[str, str, int, Sequence[mf.ChunkRef]]] = []
        self._refs: dict[bytes, list[Affected]] | None = None
        self.data_jobs: list[DataJob] = []
        self.index_outdated = False  # the live index is of an earlier schema (rebuilt, not a finding)
        self.index_unreadable = False  # the live index cannot be read as one (rebuilt: repaired)
        self._pool: ProcessPoolExecutor | None = None
        self.sound_packs: set[bytes] = set()
        self.damaged_packs: set[bytes] = set()

    def data_size(self, keys: Iterable[str] | None = None) -> int:
        """Bytes in the packs (those under ``keys``, if given: a listing already made)."""
        if keys is None:
            keys = self.store.objects.list("packs")
        return sum(self.store.objects.size(key) for key in keys)

    def run(self) -> Iterator[Finding]:
        # The index as it should be, built in memory from what this pass reads (one decode each).
        self.fresh = Index(":memory:")
        # The history first, then the packs: a record's packs are written before the record
        # (write ordering), so every pack of the history read here is in the listing made next,
        # whatever an ingest commits meanwhile (that is not part of this check).
        self.logs: dict[str, studylog.ParsedLog | FormatError] = {}
        for study in self.store.log_studies():
            try:
                self.logs[study] = self.store.read_log(study)
            except FormatError as e:
                self.logs[study] = e
        try:
            yield from self.check_packs()
            history_ok = True
            for f in self.check_history():
                if f.kind in ("log", "manifest") and f.severity == DAMAGE:
                    history_ok = False
                yield f
            # Compared while the workers still hash; whether to act on it waits for their verdict.
            differs = self.compare_index() if history_ok and not self.damaged_packs else None
            yield from self.finish_data_checks()
            packs_ok = not self.damaged_packs and not self.bad_chunks
            yield from self.check_index(history_ok, packs_ok, differs)
        finally:
            self.fresh.close()
            self.stop_pool()
        for problem in self.store.root.permission_problems():
            where, _, what = problem.partition(": ")
            yield Finding(DAMAGE, "permissions", where, what)
        for note in self.store.root.permission_notes():
            where, _, what = note.partition(": ")
            yield Finding(WARNING, "permissions", where, what)

    # -- layer 1: trailers (always), then the data (in worker processes, beside layers 2 to 4)
    def check_packs(self) -> Iterator[Finding]:
        """Every trailer, read TRAILER_READERS at a time: each is a small read at the far end of
        its pack, and cold, one after another, they wait on the disk far longer than they take
        to check (and behind the data reads of the workers, once those have begun)."""
        named = [(key, self.pack_hexid(key)) for key in self.store.objects.list("packs")]
        if self.read_data and (os.cpu_count() or 1) >= 2:
            with contextlib.suppress(OSError):  # a pack gone or unreadable: its trailer will say
                if self.data_size(key for key, _ in named) >= PARALLEL_MIN_BYTES:
                    # Started now, so that the workers are ready when the first trailer is read.
                    self._pool = ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1))
        with ThreadPoolExecutor(TRAILER_READERS, thread_name_prefix="dittohead-fsck") as readers:
            readers.submit(self.warm_index)
            trailers = readers.map(self.read_trailer, named)
            for (key, hexid), trailer in zip(named, trailers):
                if hexid is None:
                    yield Finding(WARNING, "pack", key, "a file that is not a pack lies among the packs")
                    continue
                pid = bytes.fromhex(hexid)
                self.stats.packs += 1
                if isinstance(trailer, FormatError):
                    self.damaged_packs.add(pid)
                    yield Finding(DAMAGE, "pack", hexid, str(trailer))
                    continue
                if isinstance(trailer, OSError):
                    self.damaged_packs.add(pid)
                    yield Finding(DAMAGE, "pack", hexid, f"cannot read: {trailer.strerror}")
                    continue
                assert trailer is not None
                entries = trailer
                self.sound_packs.add(pid)
                self.stats.chunks += len(entries)
                if self.read_data and entries:
                    path = self.store.objects.local_path(key)
                    if path is None:
                        raise StoreError("fsck --read-data reads packs on this machine's disks only")
                    self.queue_data_check(DataJob(hexid, path, [(pe.id, pe.offset, pe.length) for pe in entries]))
                self.fresh.add_chunks((pe.id, pid, pe.offset, pe.length) for pe in entries)
                for pe in entries:
                    self.chunks.setdefault(pe.id, (pid, pe.length))

    @staticmethod
    def pack_hexid(key: str) -> str | None:
        """The pack id a key under packs/ names, or None for a file that is not a pack."""
        name = key.rsplit("/", 1)[-1]
        hexid = name[: -len(fmt.PACK_SUFFIX)] if name.endswith(fmt.PACK_SUFFIX) else ""
        try:
            pid = bytes.fromhex(hexid)
        except ValueError:
            return None
        if len(pid) != fmt.HASH_SIZE or key != f"packs/{hexid[:2]}/{name}":
            return None
        return hexid

    def warm_index(self) -> None:
        """Read the live index into the page cache while the trailers are read, so that comparing
        it later (page by page, in SQLite) does not wait on the disk for each page, behind the
        workers' data reads. Runs in a reader thread."""
        for path in (self.store.root.index_path, self.store.root.index_path + "-wal"):
            try:
                with open(path, "rb", buffering=0) as f:
                    while f.read(1024 * 1024):
                        pass
            except OSError:
                pass

    def read_trailer(self, named: tuple[str, str | None]) -> list[pack.PackEntry] | FormatError | OSError | None:
        """A pack's entries, or why they cannot be had. Runs in a reader thread."""
        key, hexid = named
        if hexid is None:
            return None
        try:
            path = self.store.objects.local_path(key)
            if path is None:
                objects = self.store.objects
                return pack.read_entries_by_range(objects.size(key), lambda off, n: objects.read_range(key, off, n),
                                                  what="its trailer")
            with open(path, "rb") as f:
                if self.read_data:  # the data is to be read from the disk, not from memory
                    directio.advise(f.fileno(), "DONTNEED")
                return pack.read_entries(f, what="its trailer")
        except (FormatError, OSError) as e:
            return e

    def queue_data_check(self, job: DataJob) -> None:
        """Hash a pack's data in worker processes when the store is large (the other layers keep
        the main process busy meanwhile, in Python); each pack is handed over as soon as its
        trailer is read, so the disk is busy from the first pack on. A small store is hashed in
        this process, in finish_data_checks."""
        self.data_jobs.append(job)
        if self._pool is not None:
            job.future = self._pool.submit(hash_pack_data, job.path, job.entries)

    def finish_data_checks(self) -> Iterator[Finding]:
        """The data findings, pack by pack in order. Packs no worker has started yet are hashed
        here, from the last one back (the workers take them from the front): this process has
        nothing else left to do."""
        done: dict[int, tuple[int, list[tuple[bytes, int]], str]] = {}
        for i in reversed(range(len(self.data_jobs))):
            job = self.data_jobs[i]
            if job.future is not None and not job.future.cancel():
                break  # begun, and so have all before it
            done[i] = hash_pack_data(job.path, job.entries)
        for i, job in enumerate(self.data_jobs):
            if i not in done:
                assert job.future is not None
                done[i] = job.future.result()
            got, bad, error = done.pop(i)
            self.stats.bytes_read += got
            self.progress(got)
            if error:
                self.damaged_packs.add(bytes.fromhex(job.hexid))
                yield Finding(DAMAGE, "pack", job.hexid, error)
            for cid, offset in bad:
                self.bad_chunks[cid] = f"fails its hash in pack {job.hexid}"
                yield Finding(DAMAGE, "chunk", cid.hex(),
                              f"in pack {job.hexid} at offset {offset}: bytes do not match the id",
                              self.affected_by(cid))
        self.stop_pool()

    def stop_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def affected_by(self, cid: bytes) -> list[Affected]:
        """The versions made of chunk ``cid``, in the order the history check met them."""
        if self._refs is None:
            self._refs = {}
            for study, path, n, chunks in self.made:
                for c, _ in chunks:
                    self._refs.setdefault(c, []).append(Affected(study, path, n))
        return self._refs.get(cid, [])

    # -- layers 2 and 3
    def check_history(self) -> Iterator[Finding]:
        for study, parsed in self.logs.items():
            self.stats.studies += 1
            if isinstance(parsed, FormatError):
                yield Finding(DAMAGE, "log", study, str(parsed))
                continue
            known, source = self.store.committed_seq(study)
            now = parsed
            if known > len(parsed.records):  # or an ingest committed since the log was read:
                with contextlib.suppress(FormatError):  # what it writes after its commit point
                    now = self.store.read_log(study)  # is in the log when read again
            if known > len(now.records):
                yield Finding(DAMAGE, "log", study,
                              f"holds {len(parsed.records)} records, but {source} shows submission #{known} "
                              "was committed: committed history is missing or damaged")
            elif parsed.torn:
                yield Finding(WARNING, "log", study,
                              "a torn record at the end (an ingest interrupted before its commit point); "
                              "the next ingest sets it aside")
            yield from self.check_published(study)
            latest: dict[str, tuple[int, bytes]] = {}
            for rec in parsed.records:
                self.stats.submissions += 1
                key = manifest_key(rec.manifest)
                try:
                    data = self.store.objects.get(key, fmt.STORED_MANIFEST_MAX_SIZE)
                except FileNotFoundError:
                    yield Finding(DAMAGE, "manifest", rec.manifest.hex(),
                                  f"missing (study {study}, submission #{rec.seq} {rec.submission})")
                    continue
                except FormatError as e:
                    yield Finding(DAMAGE, "manifest", rec.manifest.hex(), f"{e} (study {study}, submission #{rec.seq})")
                    continue
                if blake3(data).digest() != rec.manifest:
                    yield Finding(DAMAGE, "manifest", rec.manifest.hex(),
                                  f"does not match its id (study {study}, submission #{rec.seq})")
                    continue
                try:
                    m = mf.decode(data, stored=True)
                except FormatError as e:
                    yield Finding(DAMAGE, "manifest", rec.manifest.hex(), str(e))
                    continue
                self.fresh.apply(study, rec, m)
                for pid in rec.packs:
                    if pid not in self.sound_packs and pid not in self.damaged_packs:
                        self.damaged_packs.add(pid)
                        yield Finding(DAMAGE, "pack", pid.hex(),
                                      f"missing (written by study {study}'s submission #{rec.seq})")
                problems: dict[bytes, tuple[str, list[Affected]]] = {}
                for entry in m.entries:
                    prev = latest.get(entry.path)
                    if prev is not None and prev[1] == entry.hash:
                        continue  # not a new version: its bytes are those of the version before
                    n = 1 if prev is None else prev[0] + 1
                    latest[entry.path] = (n, entry.hash)
                    self.stats.versions += 1
                    self.made.append((study, entry.path, n, entry.chunks))
                    for cid, length in entry.chunks:
                        stored = self.chunks.get(cid)
                        why = None
                        if stored is None:
                            why = "missing from every sound pack"
                        elif stored[1] != length:
                            why = f"stored with length {stored[1]}, manifest says {length}"
                        if why:
                            problems.setdefault(cid, (why, []))[1].append(Affected(study, entry.path, n))
                for cid, (why, affected) in problems.items():
                    yield Finding(DAMAGE, "chunk", cid.hex(), why, affected)

    def check_published(self, study: str) -> Iterator[Finding]:
        """Have-segments and receipts: derived, and read by clients; damage there is a warning
        (a client re-sends chunks, or reports a submission as not yet confirmed)."""
        box = self.store.root.dropbox(study)
        for folder, decode in ((box.have, records.decode_have), (box.receipts, records.decode_receipt)):
            try:
                names = sorted(os.listdir(folder))
            except OSError:
                continue
            for name in names:
                if name.startswith("."):  # a temporary (a kill's leftover): no client reads it
                    continue
                try:
                    decode(fsutil.read_limited(os.path.join(folder, name), fmt.HAVE_MAX_SIZE))
                except (OSError, ValueError, FormatError) as e:
                    yield Finding(WARNING, "published", os.path.join(os.path.basename(folder), name),
                                  f"study {study}: unreadable ({e})")

    # -- layer 4
    def compare_index(self) -> list[str]:
        """Which tables of the live index disagree with the fresh one ([] if none), read as any
        reader reads it: never written here (see ``repair_index``)."""
        path = self.store.root.index_path
        if not os.path.exists(path):
            return ["missing"]
        try:
            live = Index(path, readonly=True)
            self.index_outdated = not live.schema_ok
            live.close()
            if self.index_outdated:  # an earlier dittohead's: rebuilt as the ingest would, no finding
                return []
            return self.fresh.differs_from(path)
        except sqlite3.DatabaseError:  # a damaged SQLite file: rebuild it
            self.index_unreadable = True
            return sorted([*DERIVED_TABLES, "error"])

    def check_index(self, history_ok: bool, packs_ok: bool, differs: list[str] | None) -> Iterator[Finding]:
        if not history_ok:
            yield Finding(WARNING, "index", "index.sqlite", "not compared: the history it derives from is damaged")
            return
        if not packs_ok:
            # The live index may hold the only map to intact chunks of a pack whose trailer is
            # damaged: never rebuild it away while there is damage.
            yield Finding(WARNING, "index", "index.sqlite", "not compared or rebuilt while packs are damaged")
            return
        assert differs is not None  # compared: no pack was damaged before the data check either
        if self.index_outdated or differs:
            yield from self.repair_index()

    def repair_index(self) -> Iterator[Finding]:
        """Compare again, and rebuild the index if it still disagrees, holding the store's lock
        (the one writer's): without it, the difference may be an ingest's work since this pass
        read the logs, or the submission it is committing now, and is not reported."""
        lock = FileLock(self.store.root.lock_path)
        try:
            lock.acquire()
        except Held:
            if not self.index_outdated:
                yield Finding(WARNING, "index", "index.sqlite",
                              "not compared: an ingest is running (run fsck again when it is idle)")
            return
        try:
            with self.store.writing():
                if self.index_outdated:  # an earlier dittohead's: no finding
                    self.store.rebuild_index()
                    return
                if self.index_unreadable or not os.path.exists(self.store.root.index_path):
                    self.store.rebuild_index()
                    if self.index_unreadable or self.store.log_studies():  # not a new, empty store
                        what = "could not be read" if self.index_unreadable else "was missing"
                        yield Finding(REPAIRED, "index", "index.sqlite", f"{what}; rebuilt from packs, "
                                      "manifests and logs")
                    return
                for study in self.store.log_studies():  # what was committed since the logs were read
                    for rec in self.store.read_log(study).records[self.fresh.last_seq(study):]:
                        self.store.apply_record(self.fresh, study, rec)
                live = Index(self.store.root.index_path)
                try:
                    self.store.catch_up(live)  # what the ingest does after a crash past a commit point
                finally:
                    live.close()
                differs = self.fresh.differs_from(self.store.root.index_path)
                if differs:
                    self.store.rebuild_index()
                    yield Finding(REPAIRED, "index", "index.sqlite", f"disagreed with the store "
                                  f"({', '.join(differs)}); rebuilt from packs, manifests and logs")
        except sqlite3.DatabaseError:  # damaged beyond opening: rebuilt
            with self.store.writing():
                self.store.rebuild_index()
            yield Finding(REPAIRED, "index", "index.sqlite",
                          "could not be read; rebuilt from packs, manifests and logs")
        finally:
            lock.release()


def check(store: Store, *, read_data: bool = False,
          progress: Callable[[int], None] | None = None) -> tuple[list[Finding], FsckStats]:
    c = Checker(store, read_data=read_data, progress=progress)
    findings = list(c.run())
    return findings, c.stats


__all__ = ["DAMAGE", "REPAIRED", "WARNING", "Checker", "Finding", "check"]
