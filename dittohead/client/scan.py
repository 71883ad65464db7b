"""Scanning a source folder: which files to consider, never following links.

Symlinks, FIFOs, sockets and devices are never followed or read: they are counted as skipped.
Every regular file is kept under its own name, whatever its bytes (``paths.from_os_name``): a
file is left out only if it cannot be read, never for its name.
Globs match the path relative to SOURCE in POSIX form; a pattern without "/" also matches the
file's name alone (so ``--exclude '*.tmp'`` works at any depth). ``**`` matches across folders.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from queue import SimpleQueue
from time import perf_counter_ns
from typing import NamedTuple

from dittohead import format as fmt
from dittohead import paths
from dittohead.display import escape


@dataclass(frozen=True)
class ScanOptions:
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_age: float = 0.0


@dataclass
class ScanCounts:
    symlinks: int = 0
    special: int = 0
    too_new: int = 0
    excluded: int = 0
    unreadable: int = 0
    bad_names: int = 0
    problems: list[str] = field(default_factory=list)


class SourceFile(NamedTuple):
    path: str  # study path: relative, "/"-separated, the name bytes as the filesystem gave them
    os_path: str
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    mode: int


@lru_cache(maxsize=256)
def _glob_re(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : j].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def matches(pattern: str, path: str) -> bool:
    rx = _glob_re(pattern)
    if rx.match(path):
        return True
    return "/" not in pattern and bool(rx.match(path.rsplit("/", 1)[-1]))


def selected(path: str, opts: ScanOptions) -> bool:
    if opts.include and not any(matches(p, path) for p in opts.include):
        return False
    return not any(matches(p, path) for p in opts.exclude)


LIST_THREADS = 4  # folders listed ahead at once: a cold disk answers a queue of reads faster
CACHED_NS = 30_000  # a listing this quick came from the cache (cold, on this VM: 70 us and up)
CACHED_RUN = 64  # so many cached listings in a row: the tree is cached, stop listing ahead


class _Prefetch:
    """Lists every folder under a root on threads, breadth first, and throws the listings away.

    Only the side effect counts. On a cold cache most of a scan is waiting for directory
    blocks, one at a time, and the disk answers a queue of reads faster; the scanning thread
    then finds them cached. Nothing is stat'ed: a file's inode is read with its neighbours'
    when the scan stats the first of them. When the tree turns out to be cached, the threads
    stop: their listings would only take the interpreter lock from the scanning thread.
    The figures: benchmarks/README.md, "Figures behind the code's choices".
    Nothing is kept but the queue of folders still to list.
    """

    def __init__(self, root: str, threads: int) -> None:
        self._queue: SimpleQueue[str | None] = SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 1  # folders queued or being listed
        self._stopped = False
        self._cached_run = 0  # updated without the lock: a lost update only delays the stop
        self._queue.put(root)
        self._threads = [threading.Thread(target=self._work, name="dittohead-scan", daemon=True)
                         for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        get, put = self._queue.get, self._queue.put
        while (path := get()) is not None:
            subdirs: list[str] = []
            if not self._stopped:
                began = perf_counter_ns()
                try:
                    with os.scandir(path) as it:
                        subdirs = [e.path for e in it if _is_dir(e)]
                except OSError:
                    pass  # the scan itself will meet it and say so
                if perf_counter_ns() - began >= CACHED_NS:
                    self._cached_run = 0
                else:
                    self._cached_run += 1
                    if self._cached_run >= CACHED_RUN:
                        self._stopped = True
            with self._lock:
                self._pending += len(subdirs) - 1
                for d in subdirs:
                    put(d)
                if self._pending == 0:
                    for _ in self._threads:
                        put(None)

    def stop(self) -> None:
        """Stops listing and waits for the threads (they drain the queue without listing)."""
        self._stopped = True
        for t in self._threads:
            t.join()


class Scanner:
    """A scan of one source folder, begun when made: the folders are listed ahead (see
    _Prefetch) while the caller does its other start-up work, then ``files()`` walks them.

    files() stops the listing threads when done; a caller that never calls it calls close().
    """

    def __init__(self, source: str, opts: ScanOptions) -> None:
        if not stat.S_ISDIR(os.stat(source).st_mode):
            raise NotADirectoryError(source)
        self.source = source
        self.opts = opts
        self._ahead = _Prefetch(source, LIST_THREADS) if LIST_THREADS else None

    def close(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.stop()

    def files(self, counts: ScanCounts, now_ns: int) -> list[SourceFile]:
        """Every selected regular file, in a stable order (sorted by name, depth first).

        Names are taken as the filesystem gives them (an ASCII name as it is). Files modified
        after ``now_ns - min_age`` are left.
        """
        try:
            return _walk(self.source, self.opts, counts, now_ns)
        finally:
            self.close()


def _walk(source: str, opts: ScanOptions, counts: ScanCounts, now_ns: int) -> list[SourceFile]:
    out: list[SourceFile] = []
    near_limit = (fmt.NAME_MAX_BYTES // 4, fmt.PATH_MAX_BYTES // 4)  # shorter is within the limits
    min_age_ns = int(opts.min_age * 1e9)
    filtered = bool(opts.include or opts.exclude)
    S_IFMT, S_IFREG, S_IFDIR, S_IFLNK = stat.S_IFMT, stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK
    # The folders being gone through, innermost last: (study path, its entries).
    stack: list[tuple[str, Iterator[os.DirEntry[str]]]] = []

    def enter(rel: str, path: str) -> None:
        try:
            with os.scandir(path) as it:
                listing = sorted(it, key=lambda e: e.name)
        except OSError as e:
            counts.unreadable += 1
            counts.problems.append(f"'{escape(rel or '.')}': cannot list ({e.strerror})")
            return
        stack.append((rel, iter(listing)))

    enter("", source)
    while stack:
        rel, items = stack[-1]
        nxt = next(items, None)
        if nxt is None:
            stack.pop()
            continue
        item = nxt
        name = item.name
        if not name.isascii():
            name = paths.from_os_name(name)
        rpath = f"{rel}/{name}" if rel else name
        try:
            st = item.stat(follow_symlinks=False)
        except OSError as err:
            counts.unreadable += 1
            counts.problems.append(f"'{escape(rpath)}': cannot stat ({err.strerror})")
            continue
        fmt_ = S_IFMT(st.st_mode)
        if fmt_ == S_IFLNK or (is_junction is not None and is_junction(item)):
            counts.symlinks += 1
            continue
        if len(name) > near_limit[0] or len(rpath) > near_limit[1]:
            try:  # no filesystem gives a name or path longer than the limits, but if one did
                paths.check(rpath)
            except paths.BadPath as err:
                counts.bad_names += 1
                counts.problems.append(f"'{escape(rpath)}': skipped, {err}")
                continue
        if fmt_ == S_IFDIR:
            enter(rpath, item.path)
            continue
        if fmt_ != S_IFREG:
            counts.special += 1
            continue
        if filtered and not selected(rpath, opts):
            counts.excluded += 1
            continue
        if min_age_ns and now_ns - st.st_mtime_ns < min_age_ns:
            counts.too_new += 1
            continue
        out.append(SourceFile(rpath, item.path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                              st.st_mode & 0o7777))
    return out


def _is_dir(e: os.DirEntry[str]) -> bool:
    try:
        return e.is_dir(follow_symlinks=False)  # from the listing itself where the OS says
    except OSError:
        return False


is_junction = getattr(os.DirEntry, "is_junction", None)  # Windows junctions (Python 3.12+)
