"""Paths inside a study: relative, POSIX, NFC; validated wherever they cross a trust boundary.

A valid path has one or more components separated by "/", none empty, "." or "..", no NUL or
other control character, no backslash (it would become a separator on Windows), each component
at most 255 bytes of UTF-8 and the whole at most 4096, and it is in Unicode NFC.
"""

from __future__ import annotations

import re
import unicodedata

from dittohead import format as fmt
from dittohead.display import escape


class BadPath(ValueError):
    """A path that breaks a rule; the message says which."""


def _q(path: object) -> str:
    """A path in a message: quoted, and escaped as everything dittohead prints (``display``)."""
    return f"'{escape(path)}'" if isinstance(path, str) else repr(path)


_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\\]")


def _check_chars(text: str, path: str) -> None:
    bad = _FORBIDDEN.search(text)
    if bad:
        c = bad.group()
        what = "NUL" if c == "\x00" else "a backslash" if c == "\\" else "a control character"
        raise BadPath(f"path contains {what}: {_q(path)}")


def check(path: object) -> str:
    """Return ``path`` if it is a valid study path, else raise BadPath naming the rule."""
    if not isinstance(path, str):
        raise BadPath(f"path is not a string: {_q(path)}")
    if not path:
        raise BadPath("empty path")
    if path[0] == "/":
        raise BadPath(f"absolute path: {_q(path)}")
    _check_chars(path, path)
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise BadPath(f"path is not valid Unicode: {_q(path)}") from None
    if len(encoded) > fmt.PATH_MAX_BYTES:
        raise BadPath(f"path longer than {fmt.PATH_MAX_BYTES} bytes: {_q(path[:80])}...")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise BadPath(f"path has an empty, '.' or '..' component: {_q(path)}")
        if len(part) * 4 > fmt.NAME_MAX_BYTES and len(part.encode("utf-8")) > fmt.NAME_MAX_BYTES:
            raise BadPath(f"path component longer than {fmt.NAME_MAX_BYTES} bytes: {part[:80]!r}...")
    if not path.isascii() and not unicodedata.is_normalized("NFC", path):
        raise BadPath(f"path is not in Unicode NFC: {_q(path)}")
    return path


def check_name(name: str, path: str) -> None:
    """Check one component ``name`` of ``path``, whose folder was checked already (a scan checks
    each name once, as it meets it, instead of every path from its root). Same rules and
    messages as ``check``."""
    if name in ("", ".", ".."):
        raise BadPath(f"path has an empty, '.' or '..' component: {_q(path)}")
    _check_chars(name, path)
    if name.isascii():
        size = len(name)
    else:
        try:
            size = len(name.encode("utf-8"))
        except UnicodeEncodeError:
            raise BadPath(f"path is not valid Unicode: {_q(path)}") from None
        if not unicodedata.is_normalized("NFC", name):
            raise BadPath(f"path is not in Unicode NFC: {_q(path)}")
    if size > fmt.NAME_MAX_BYTES:
        raise BadPath(f"path component longer than {fmt.NAME_MAX_BYTES} bytes: {name[:80]!r}...")
    if len(path) * 4 > fmt.PATH_MAX_BYTES and len(path.encode("utf-8", "surrogatepass")) > fmt.PATH_MAX_BYTES:
        raise BadPath(f"path longer than {fmt.PATH_MAX_BYTES} bytes: {_q(path[:80])}...")


def check_tree(paths: list[str]) -> None:
    """No duplicates, and no path that is also a folder of another (a file cannot be both)."""
    seen: set[str] = set()
    for p in paths:
        if p in seen:
            raise BadPath(f"duplicate path: {_q(p)}")
        seen.add(p)
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in seen:
                raise BadPath(f"path {_q(prefix)} is a file and also a folder of {_q(p)}")


def normalize(rel_os_path: str, sep: str) -> str:
    """A relative OS path (client side) to a study path: POSIX separators, NFC."""
    posix = rel_os_path.replace(sep, "/") if sep != "/" else rel_os_path
    return unicodedata.normalize("NFC", posix)


def as_typed(path: str) -> str:
    """A path as a study runner types it (``cat``, ``versions``) to the study path it names:
    NFC (a shell on macOS may hand over NFD), no leading, trailing or doubled ``/``, no ``.``
    parts. ``..`` is left alone: it names nothing in a study."""
    parts = [p for p in unicodedata.normalize("NFC", path).split("/") if p not in ("", ".")]
    return "/".join(parts)
