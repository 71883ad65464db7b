"""Paths inside a study: the exact name bytes a source gave, and the few rules that keep them safe.

A study path is a sequence of names joined by ``/``, each name the bytes the source filesystem
gave, nothing normalized (docs/format.md, "Paths"). In memory it is a ``str``: the bytes decoded
as UTF-8 with ``surrogateescape``, so that a byte that is not UTF-8 stays a lone surrogate
(U+DC80-U+DCFF) and ``to_bytes`` gives the bytes back exactly (this is how Python itself names
files on POSIX). Only what is unsafe is refused: an absolute path, an empty, ``.`` or ``..``
name, NUL, and names and paths over the limits of ``dittohead.format``. These rules live here
and nowhere else.
"""

from __future__ import annotations

import bisect
import os

from dittohead import format as fmt
from dittohead.display import escape


class BadPath(ValueError):
    """A path that breaks a rule; the message says which."""


def _q(path: object) -> str:
    """A path in a message: quoted, and escaped as everything dittohead prints (``display``)."""
    return f"'{escape(path)}'" if isinstance(path, (str, bytes)) else repr(path)


def to_bytes(path: str) -> bytes:
    """A study path's bytes (raises UnicodeEncodeError for a str no decode could give)."""
    return path.encode("utf-8", "surrogateescape")


def from_bytes(data: bytes) -> str:
    """The study path whose bytes are ``data`` (any bytes: never fails)."""
    return data.decode("utf-8", "surrogateescape")


def from_windows_name(name: str) -> str:
    """A name as Windows lists it (or a command-line argument: UTF-16, unpaired surrogates
    included) in its WTF-8 form: UTF-8, with an unpaired surrogate encoded as if it were a
    character (3 bytes). ``to_bytes(...).decode("utf-8", "surrogatepass")`` gives it back."""
    return name if name.isascii() else from_bytes(name.encode("utf-8", "surrogatepass"))


def from_posix_name(name: str) -> str:
    """A name as a POSIX system lists it (or a command-line argument): its bytes, exactly,
    whatever the locale."""
    return name if name.isascii() else from_bytes(os.fsencode(name))


from_os_name = from_windows_name if os.name == "nt" else from_posix_name


def check(path: object) -> str:
    """Return ``path`` if it is a valid study path (a str as ``from_bytes`` makes), else raise
    BadPath naming the rule."""
    if not isinstance(path, str):
        raise BadPath(f"path is not a string: {_q(path)}")
    if not path:
        raise BadPath("empty path")
    if path[0] == "/":
        raise BadPath(f"absolute path: {_q(path)}")
    if "\x00" in path:
        raise BadPath(f"path contains NUL: {_q(path)}")
    if path.isascii():
        size = len(path)
    else:
        try:
            size = len(to_bytes(path))
        except UnicodeEncodeError:
            raise BadPath(f"path is not made of bytes: {_q(path)}") from None
    if size > fmt.PATH_MAX_BYTES:
        raise BadPath(f"path longer than {fmt.PATH_MAX_BYTES} bytes: {_q(path[:80])}...")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise BadPath(f"path has an empty, '.' or '..' component: {_q(path)}")
        if len(part) > fmt.NAME_MAX_BYTES // 4 and len(to_bytes(part)) > fmt.NAME_MAX_BYTES:
            raise BadPath(f"path component longer than {fmt.NAME_MAX_BYTES} bytes: {_q(part[:80])}...")
    return path


def check_tree(paths: list[str]) -> None:
    """No duplicates, and no path that is also a folder of another (a file cannot be both).

    Each path's descendants are found by one bisection of the sorted paths for ``path + "/"``:
    the cost follows the number of paths and their bytes, not their depth, and nothing but the
    sorted list of references is made (a manifest may hold 200,000 paths)."""
    seen: set[str] = set()
    for p in paths:
        if p in seen:
            raise BadPath(f"duplicate path: {_q(p)}")
        seen.add(p)
    ordered = sorted(paths)
    for p in ordered:
        below = p + "/"
        i = bisect.bisect_left(ordered, below)
        if i < len(ordered) and ordered[i].startswith(below):
            raise BadPath(f"path {_q(p)} is a file and also a folder of {_q(ordered[i])}")


def as_typed(path: str) -> str:
    """A path as someone typed it (``cat``, ``versions``) to the study path it names: its bytes
    as given (a raw argument), no leading, trailing or doubled ``/``, no ``.`` parts. ``..`` is
    left alone: it names nothing in a study."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return "/".join(parts)

