"""Scanning a source folder: which files to consider, never following links.

Symlinks, FIFOs, sockets and devices are never followed or read: they are counted as skipped.
Globs match the path relative to SOURCE in POSIX form; a pattern without "/" also matches the
file's name alone (so ``--exclude '*.tmp'`` works at any depth). ``**`` matches across folders.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

from dittohead import paths


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
    path: str  # study path: relative, POSIX, NFC
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


LIST_THREADS = 4  # folders listed and stat'ed ahead at once: a cold disk answers a queue faster

Listed = list[os.DirEntry[str]]  # sorted by name


WARM_EVERY = 16  # a listing thread stats one entry in so many: see _list


def _list(dir_os: str) -> list[os.DirEntry[str]]:
    """A folder's entries, sorted by name.

    Every WARM_EVERY-th entry is lstat'ed here (DirEntry keeps the result): that reads its
    inode's block from a cold disk, and with it its neighbours', so the scanning thread's own
    lstat of the others finds them cached. Stat-ing every entry here instead passes the
    interpreter lock between threads around each call, which costs more than it saves.
    """
    with os.scandir(dir_os) as it:
        items = sorted(it, key=lambda e: e.name)
    for e in items[::WARM_EVERY]:
        with contextlib.suppress(OSError):
            e.stat(follow_symlinks=False)
    return items


def scan(source: str, opts: ScanOptions, counts: ScanCounts, now_ns: int) -> list[SourceFile]:
    """Every selected regular file under ``source``, in a stable order (sorted by name, depth first).

    This is most of a no-change sync, and most of that is waiting for a cold disk: folders are
    listed and their entries stat'ed on threads, every subfolder queued as soon as its parent
    is read. Each name is checked once, as it is met (its folder's path was checked already),
    and an ASCII name skips normalisation.
    """
    if not stat.S_ISDIR(os.stat(source).st_mode):
        raise NotADirectoryError(source)
    out: list[SourceFile] = []
    seen: set[str] = set()
    min_age_ns = int(opts.min_age * 1e9)
    filtered = bool(opts.include or opts.exclude)
    S_IFMT, S_IFREG, S_IFDIR, S_IFLNK = stat.S_IFMT, stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK
    # The folders being gone through, innermost last: (study path, its entries, its subfolders' listings).
    stack: list[tuple[str, Iterator[os.DirEntry[str]], dict[str, Future[Listed]]]] = []
    with ThreadPoolExecutor(LIST_THREADS, thread_name_prefix="dittohead-scan") as pool:

        def enter(rel: str, path: str, fut: Future[Listed] | None) -> None:
            try:
                # Not begun yet (queued behind its siblings): list it here rather than wait.
                listing = _list(path) if fut is None or fut.cancel() else fut.result()
            except OSError as e:
                counts.unreadable += 1
                counts.problems.append(f"{rel or '.'}: cannot list ({e.strerror})")
                return
            subdirs = {item.path: pool.submit(_list, item.path) for item in listing if _is_dir(item)}
            stack.append((rel, iter(listing), subdirs))

        enter("", source, None)
        while stack:
            rel, items, subdirs = stack[-1]
            nxt = next(items, None)
            if nxt is None:
                stack.pop()
                continue
            item = nxt
            name = item.name
            if not name.isascii() or os.sep != "/":
                name = paths.normalize(name, os.sep)
            rpath = f"{rel}/{name}" if rel else name
            try:
                st = item.stat(follow_symlinks=False)
            except OSError as err:
                counts.unreadable += 1
                counts.problems.append(f"{rpath}: cannot stat ({err.strerror})")
                continue
            fmt_ = S_IFMT(st.st_mode)
            if fmt_ == S_IFLNK or (is_junction is not None and is_junction(item)):
                counts.symlinks += 1
                continue
            try:
                paths.check_name(name, rpath)
            except paths.BadPath as err:
                counts.bad_names += 1
                counts.problems.append(f"{rpath!r}: skipped, {err}")
                continue
            if fmt_ == S_IFDIR:
                enter(rpath, item.path, subdirs.pop(item.path, None))
                continue
            if fmt_ != S_IFREG:
                counts.special += 1
                continue
            if filtered and not selected(rpath, opts):
                counts.excluded += 1
                continue
            if rpath in seen:
                counts.bad_names += 1
                counts.problems.append(f"{rpath!r}: skipped, two names normalise to the same path")
                continue
            seen.add(rpath)
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
