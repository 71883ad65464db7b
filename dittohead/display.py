"""How names that came from elsewhere are shown: one escape for every terminal and log line.

A submission's name, a path in a manifest, a site: each is chosen by a client, and may hold
bytes that are not UTF-8, control characters, C1 characters or bidi overrides that would move a
terminal's cursor or reorder what a reader sees. ``escape`` turns any of them into plain,
printable text, and reversibly: a backslash is doubled, a byte that is not part of valid UTF-8
becomes ``\\xNN``, and a character that is not printable becomes ``\\uNNNN`` (or ``\\UNNNNNNNN``).
"""

from __future__ import annotations


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
