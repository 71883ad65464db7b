"""Scanning a source folder: which files to consider, never following links.

Symlinks, FIFOs, sockets and devices are never followed or read: they are counted as skipped.
Globs match the path relative to SOURCE in POSIX form; a pattern without "/" also matches the
file's name alone (so ``--exclude '*.tmp'`` works at any depth). ``**`` matches across folders.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

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


@dataclass(frozen=True)
class SourceFile:
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


def scan(source: str, opts: ScanOptions, counts: ScanCounts, now_ns: int) -> Iterator[SourceFile]:
    """Every selected regular file under ``source``, in a stable order."""
    seen: set[str] = set()
    min_age_ns = int(opts.min_age * 1e9)

    def walk(dir_os: str, rel: str) -> Iterator[SourceFile]:
        try:
            with os.scandir(dir_os) as it:
                items = sorted(it, key=lambda e: e.name)
        except OSError as e:
            counts.unreadable += 1
            counts.problems.append(f"{rel or '.'}: cannot list ({e.strerror})")
            return
        for item in items:
            name = paths.normalize(item.name, os.sep)
            rpath = f"{rel}/{name}" if rel else name
            try:
                st = item.stat(follow_symlinks=False)
            except OSError as err:
                counts.unreadable += 1
                counts.problems.append(f"{rpath}: cannot stat ({err.strerror})")
                continue
            if stat.S_ISLNK(st.st_mode) or getattr(item, "is_junction", lambda: False)():
                counts.symlinks += 1
                continue
            if stat.S_ISDIR(st.st_mode):
                yield from walk(item.path, rpath)
                continue
            if not stat.S_ISREG(st.st_mode):
                counts.special += 1
                continue
            try:
                paths.check(rpath)
            except paths.BadPath as err:
                counts.bad_names += 1
                counts.problems.append(f"{rpath!r}: skipped, {err}")
                continue
            if not selected(rpath, opts):
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
            yield SourceFile(rpath, item.path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                             stat.S_IMODE(st.st_mode))

    st = os.stat(source)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(source)
    yield from walk(source, "")
