"""How names that came from elsewhere are shown: one escape for every terminal and log line.

A submission's name, a path in a manifest, a site: each is chosen by a client, and may hold
bytes that are not UTF-8, control characters, C1 characters or bidi overrides that would move a
terminal's cursor or reorder what a reader sees. ``escape`` turns any of them into plain,
printable text, and reversibly: a backslash is doubled, a byte that is not part of valid UTF-8
becomes ``\\xNN``, and a character that is not printable becomes ``\\uNNNN`` (or ``\\UNNNNNNNN``).
"""

from __future__ import annotations

import re


def _char(c: str) -> str:
    o = ord(c)
    if c == "\\":
        return "\\\\"
    if 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8, kept by surrogateescape
        return f"\\x{o - 0xDC00:02x}"
    if c.isprintable() and c != "\u00ad":  # printable, and not a soft hyphen (invisible)
        return c
    return f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}"


def escape(name: bytes | str) -> str:
    """``name`` as printable text; ``str`` names may carry surrogateescape'd bytes."""
    text = name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text
    return "".join(_char(c) for c in text)


def unescape(text: str) -> bytes:
    """The name bytes ``escape`` was given (UTF-8 for a ``str`` name); ValueError if ``text``
    is not something ``escape`` returns."""
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            out += c.encode("utf-8", "surrogatepass")
            i += 1
            continue
        kind = text[i + 1 : i + 2]
        width = {"\\": 0, "x": 2, "u": 4, "U": 8}.get(kind)
        if width is None:
            raise ValueError(f"not an escaped name: {text!r}")
        digits = text[i + 2 : i + 2 + width]
        if len(digits) != width or (width and not all(d in "0123456789abcdef" for d in digits)):
            raise ValueError(f"not an escaped name: {text!r}")
        if kind == "\\":
            out += b"\\"
        elif kind == "x":
            out.append(int(digits, 16))
        else:
            out += chr(int(digits, 16)).encode("utf-8", "surrogatepass")
        i += 2 + width
    return bytes(out)


# -- names a destination refuses (an export to an SMB share, a FAT disk) -------------------------

_PORTABLE = re.compile(r"[A-Za-z0-9 !#$&'()+,\-.;=@\[\]^_`{}~]+")
_PORTABLE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 !#$&'()+,-.;=@[]^_`{}~")
_DEVICES = frozenset({"CON", "PRN", "AUX", "NUL", *(f"{d}{i}" for d in ("COM", "LPT") for i in range(1, 10))})
PORTABLE_NAME_MAX = 255


def portable_name(name: str) -> str:
    """``name`` (a study name: str, surrogateescape'd bytes) as a name that Windows, an SMB share
    and a FAT disk all hold: ASCII; every byte outside letters, digits and `` !#$&'()+,-.;=@[]^_`{}~``
    becomes ``%XX`` (``%`` too); a trailing ``.`` or space becomes ``%2E`` or ``%20``; a device
    name (``CON``, ``NUL``, ``COM1``, ``LPT1``..., with or without an extension) has its first
    letter escaped; a result over 255 bytes is cut and ends in ``~`` and 16 hex digits of its
    BLAKE3. A name that needs none of this is returned as it is (docs/view.md, "Names a
    destination refuses")."""
    if _PORTABLE.fullmatch(name) and name[-1] not in ". " and name.split(".", 1)[0].rstrip(" ").upper() not in _DEVICES \
            and len(name) <= PORTABLE_NAME_MAX:
        return name
    raw = name.encode("utf-8", "surrogateescape")
    out = "".join(chr(b) if b in _PORTABLE_BYTES else f"%{b:02X}" for b in raw)
    if out[-1] in ". ":
        out = out[:-1] + f"%{ord(out[-1]):02X}"
    if out.split(".", 1)[0].rstrip(" ").upper() in _DEVICES:
        out = f"%{ord(out[0]):02X}" + out[1:]
    if len(out) > PORTABLE_NAME_MAX:
        from dittohead.hashing import blake3

        out = out[: PORTABLE_NAME_MAX - 17] + "~" + blake3(raw).hexdigest()[:16]
    return out


def json_path(path: str, key: str = "path") -> dict[str, str]:
    """A study path in a JSON document: ``key`` holds its text (a byte that is not UTF-8 is
    written as a lone surrogate, \\udc80-\\udcff, as Python and borg write it), and, only
    for such a path, ``key + "_b64"`` its exact bytes in base64, for scripts in any language
    (docs/view.md, "Paths as printed, and as typed")."""
    out = {key: path}
    if not path.isascii():
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            import base64

            out[key + "_b64"] = base64.b64encode(path.encode("utf-8", "surrogateescape")).decode("ascii")
    return out
