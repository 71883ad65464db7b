"""BLAKE3-256, the one hash of format version 1, with a hashlib-like feel."""

from __future__ import annotations

from blake3 import blake3

from dittohead.format import HASH_SIZE

__all__ = ["EMPTY_HASH", "blake3", "digest", "hexid", "parse_hexid"]


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """The 32-byte BLAKE3 digest of ``data``."""
    return blake3(data).digest()


def hexid(raw: bytes) -> str:
    return raw.hex()


def parse_hexid(text: str) -> bytes:
    """A 64-character lower-case hex id back to its 32 bytes, or ValueError."""
    if len(text) != 2 * HASH_SIZE or text != text.lower():
        raise ValueError(f"not a {2 * HASH_SIZE}-digit lower-case hex id: {text!r}")
    return bytes.fromhex(text)


EMPTY_HASH = digest(b"")
