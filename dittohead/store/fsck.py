"""fsck: prove the store's integrity, in layers, yielding findings instead of raising.

1. packs: every trailer (always) and every chunk against its id (``read_data``);
2. study logs: every record sound, a torn tail told apart from damage;
3. manifests: each one named by a log is present, matches its id, decodes, and every chunk it
   references is in a sound pack with the right length; a finding names the studies, paths and
   versions it affects;
4. the index: rebuilt from the above into a temporary file and compared; replaced when it
   disagrees (the index is derived, so this is a repair, not damage);
5. the server root's folders and modes.
Severity "damage" makes the CLI exit 3; "warning" and "repaired" do not.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable

from dittohead import format as fmt
from dittohead import fsutil, pack, records
from dittohead import manifest as mf
from dittohead.errors import FormatError
from dittohead.hashing import blake3
from dittohead.store.index import Index
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
        return asdict(self)

    def line(self) -> str:
        s = f"{self.severity}: {self.kind} {self.object}: {self.message}"
        if self.affects:
            shown = ", ".join(f"{a.study}:{a.path} v{a.version}" for a in self.affects[:5])
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


def hash_pack_data(path: str, entries: list[tuple[bytes, int, int]]) -> tuple[int, list[tuple[bytes, int]], str]:
    """Read a pack's data region in one call and check each chunk against its id.

    Returns (bytes read, [(bad chunk id, offset)], error). Runs in a worker process.
    """
    start = fmt.PACK_HEADER.size
    end = entries[-1][1] + entries[-1][2]
    buf = bytearray(end - start)
    try:
        with open(path, "rb") as f:
            f.seek(start)
            got = f.readinto(buf)
    except OSError as e:
        return 0, [], f"cannot read: {e.strerror}"
    view = memoryview(buf)
    bad = []
    for cid, offset, length in entries:
        lo = offset - start
        if lo + length > got or blake3(view[lo : lo + length]).digest() != cid:
            bad.append((cid, offset))
    return got, bad, ""


class Checker:
    def __init__(self, store: Store, *, read_data: bool = False,
                 progress: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.read_data = read_data
        self.progress = progress or (lambda n: None)
        self.stats = FsckStats()
        self.chunks: dict[bytes, tuple[bytes, int]] = {}  # id -> (pack id, length), by trailers
        self.bad_chunks: dict[bytes, str] = {}  # id -> why
        self.refs: dict[bytes, list[Affected]] = {}  # id -> the versions made of it
        self.data_jobs: list[tuple[str, str, list[tuple[bytes, int, int]]]] = []
        self._pool: ProcessPoolExecutor | None = None
        self.sound_packs: set[bytes] = set()
        self.damaged_packs: set[bytes] = set()

    def data_size(self) -> int:
        total = 0
        for key in self.store.objects.list("packs"):
            total += self.store.objects.size(key)
        return total

    def run(self) -> Iterator[Finding]:
        # The index as it should be, built in memory from what this pass reads (one decode each).
        self.fresh = Index(":memory:")
        try:
            yield from self.check_packs()
            futures = self.start_data_checks()
            history_ok = True
            for f in self.check_history():
                if f.kind in ("log", "manifest") and f.severity == DAMAGE:
                    history_ok = False
                yield f
            yield from self.finish_data_checks(futures)
            packs_ok = not self.damaged_packs and not self.bad_chunks
            yield from self.check_index(history_ok, packs_ok)
        finally:
            self.fresh.close()
        for problem in self.store.root.mode_problems():
            where, _, what = problem.partition(": ")
            yield Finding(WARNING, "layout", where, what)

    # -- layer 1: trailers (always), then the data (in worker processes, beside layer 2)
    def check_packs(self) -> Iterator[Finding]:
        for key in self.store.objects.list("packs"):
            name = key.rsplit("/", 1)[-1]
            hexid = name[: -len(fmt.PACK_SUFFIX)] if name.endswith(fmt.PACK_SUFFIX) else ""
            try:
                pid = bytes.fromhex(hexid)
                if len(pid) != fmt.HASH_SIZE or key != f"packs/{hexid[:2]}/{name}":
                    raise ValueError(key)
            except ValueError:
                yield Finding(WARNING, "pack", key, "a file that is not a pack lies among the packs")
                continue
            self.stats.packs += 1
            try:
                with self.store.objects.open(key) as f:
                    entries = pack.read_entries(f, what=f"pack {hexid}")
            except FormatError as e:
                self.damaged_packs.add(pid)
                yield Finding(DAMAGE, "pack", hexid, str(e))
                continue
            except OSError as e:
                self.damaged_packs.add(pid)
                yield Finding(DAMAGE, "pack", hexid, f"cannot read: {e.strerror}")
                continue
            self.sound_packs.add(pid)
            self.stats.chunks += len(entries)
            self.fresh.add_chunks((pe.id, pid, pe.offset, pe.length) for pe in entries)
            for pe in entries:
                self.chunks.setdefault(pe.id, (pid, pe.length))
            if self.read_data and entries:
                self.data_jobs.append((hexid, self.store.objects.path_of(key),  # type: ignore[attr-defined]
                                       [(pe.id, pe.offset, pe.length) for pe in entries]))

    def start_data_checks(self) -> list[tuple[str, Future[tuple[int, list[tuple[bytes, int]], str]]]]:
        """Hash every pack's data: in worker processes when there is much of it (blake3 holds
        the GIL, and the history check needs the main process meanwhile)."""
        total = sum(e[-1][1] + e[-1][2] for _, _, e in self.data_jobs)
        if total < PARALLEL_MIN_BYTES or (os.cpu_count() or 1) < 2:
            self._pool = None
            futures = []
            for hexid, path, entries in self.data_jobs:
                fut: Future[tuple[int, list[tuple[bytes, int]], str]] = Future()
                fut.set_result(hash_pack_data(path, entries))
                futures.append((hexid, fut))
            return futures
        self._pool = ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1))
        futures = []
        for hexid, path, entries in self.data_jobs:
            fut = self._pool.submit(hash_pack_data, path, entries)
            futures.append((hexid, fut))
        return futures

    def finish_data_checks(self, futures) -> Iterator[Finding]:
        try:
            for hexid, fut in futures:
                got, bad, error = fut.result()
                self.stats.bytes_read += got
                self.progress(got)
                if error:
                    self.damaged_packs.add(bytes.fromhex(hexid))
                    yield Finding(DAMAGE, "pack", hexid, error)
                for cid, offset in bad:
                    self.bad_chunks[cid] = f"fails its hash in pack {hexid}"
                    yield Finding(DAMAGE, "chunk", cid.hex(),
                                  f"in pack {hexid} at offset {offset}: bytes do not match the id",
                                  self.refs.get(cid, []))
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None

    # -- layers 2 and 3
    def check_history(self) -> Iterator[Finding]:
        for study in self.store.log_studies():
            self.stats.studies += 1
            try:
                parsed = self.store.read_log(study)
            except FormatError as e:
                yield Finding(DAMAGE, "log", study, str(e))
                continue
            known, source = self.store.committed_seq(study)
            if known > len(parsed.records):
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
                    data = self.store.objects.get(key, fmt.MANIFEST_MAX_SIZE)
                except FileNotFoundError:
                    yield Finding(DAMAGE, "manifest", rec.manifest.hex(),
                                  f"missing (study {study}, submission #{rec.seq} {rec.submission})")
                    continue
                if blake3(data).digest() != rec.manifest:
                    yield Finding(DAMAGE, "manifest", rec.manifest.hex(),
                                  f"does not match its id (study {study}, submission #{rec.seq})")
                    continue
                try:
                    m = mf.decode(data)
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
                    for cid, length in entry.chunks:
                        self.refs.setdefault(cid, []).append(Affected(study, entry.path, n))
                        why = None
                        if cid not in self.chunks:
                            why = "missing from every sound pack"
                        elif self.chunks[cid][1] != length:
                            why = f"stored with length {self.chunks[cid][1]}, manifest says {length}"
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
                try:
                    decode(fsutil.read_limited(os.path.join(folder, name), fmt.HAVE_MAX_SIZE))
                except (OSError, ValueError, FormatError) as e:
                    yield Finding(WARNING, "published", os.path.join(os.path.basename(folder), name),
                                  f"study {study}: unreadable ({e})")

    # -- layer 4
    def check_index(self, history_ok: bool, packs_ok: bool) -> Iterator[Finding]:
        if not history_ok:
            yield Finding(WARNING, "index", "index.sqlite", "not compared: the history it derives from is damaged")
            return
        if not packs_ok:
            # The live index may hold the only map to intact chunks of a pack whose trailer is
            # damaged: never rebuild it away while there is damage.
            yield Finding(WARNING, "index", "index.sqlite", "not compared or rebuilt while packs are damaged")
            return
        want = self.fresh.dump()
        try:
            live = Index(self.store.root.index_path)
            try:
                have = live.dump()
            finally:
                live.close()
        except sqlite3.DatabaseError as e:  # a damaged SQLite file: rebuild it
            have = {"error": [(str(e),)]}
        if have != want:
            differs = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            self.store.rebuild_index()
            yield Finding(REPAIRED, "index", "index.sqlite",
                          f"disagreed with the store ({', '.join(differs)}); rebuilt from packs, manifests and logs")


def check(store: Store, *, read_data: bool = False,
          progress: Callable[[int], None] | None = None) -> tuple[list[Finding], FsckStats]:
    c = Checker(store, read_data=read_data, progress=progress)
    findings = list(c.run())
    return findings, c.stats


__all__ = ["DAMAGE", "REPAIRED", "WARNING", "Checker", "Finding", "check"]
