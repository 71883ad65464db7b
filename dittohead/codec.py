"""The one strict decoder for untrusted msgpack, and the matching encoder.

Every byte string that came from outside the store (an uploaded manifest, a pack trailer, a
have-segment read by a client) or that may be damaged (anything read back from disk) is decoded
here: explicit size limits, string keys only, UTF-8 strings, no extension types. Whatever goes
wrong becomes a ``FormatError`` naming what was being decoded.
"""

from __future__ import annotations

from typing import Any

import msgpack

from dittohead.errors import FormatError


def pack(obj: Any) -> bytes:
    """Encode deterministically (msgpack, bin type for bytes, str type for text)."""
    return msgpack.packb(obj, use_bin_type=True)


def no_ext(code: int, data: bytes) -> Any:
    raise FormatError(f"unexpected msgpack extension type {code}")


def format_error(e: BaseException, what: str) -> FormatError:
    """What went wrong while msgpack decoded ``what``, as the FormatError that says so."""
    if isinstance(e, FormatError):
        return FormatError(f"{what}: {e}")
    if isinstance(e, msgpack.ExtraData):
        return FormatError(f"{what}: trailing bytes after the object")
    if isinstance(e, (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException)):
        detail = f": {e}" if str(e) else ""
        return FormatError(f"{what}: not valid msgpack ({type(e).__name__}{detail})")
    return FormatError(f"{what}: not valid msgpack ({type(e).__name__})")


def _kinds() -> tuple[str, ...]:
    kinds = ["int"] * 256  # positive and negative fixint, uint and int 8..64
    for lo, hi, kind in ((0x80, 0x8F, "dict"), (0x90, 0x9F, "list"), (0xA0, 0xBF, "str"),
                         (0xC4, 0xC6, "bytes"), (0xC7, 0xC9, "ext"), (0xCA, 0xCB, "float"),
                         (0xD4, 0xD8, "ext"), (0xD9, 0xDB, "str"), (0xDC, 0xDD, "list"),
                         (0xDE, 0xDF, "dict")):
        kinds[lo : hi + 1] = [kind] * (hi - lo + 1)
    kinds[0xC0], kinds[0xC1], kinds[0xC2], kinds[0xC3] = "NoneType", "invalid", "bool", "bool"
    return tuple(kinds)


KIND = _kinds()
"""KIND[first byte] is the Python type name of the msgpack object that starts with that byte
(``"ext"`` for an extension type, ``"invalid"`` for 0xc1): a streaming decoder looks at it to
skip a container where it expects a scalar, without building it."""


def unpack(data: bytes, *, what: str, max_size: int, max_len: int = 1 << 24) -> Any:
    """Decode one msgpack object from ``data``, or raise FormatError.

    ``what`` names the thing for the message ("manifest", "pack trailer"); ``max_size`` bounds
    the input, ``max_len`` every array and map.
    """
    if len(data) > max_size:
        raise FormatError(f"{what}: {len(data)} bytes, more than the limit of {max_size}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=no_ext,
            max_str_len=max_size,
            max_bin_len=max_size,
            max_array_len=max_len,
            max_map_len=max_len,
            max_ext_len=0,
        )
    except Exception as e:  # noqa: BLE001  (msgpack documents that unpack may raise others)
        raise format_error(e, what) from None


# Field checkers for decoded maps: each raises FormatError naming the field.


def field(obj: dict, key: str, typ: type | tuple[type, ...], *, what: str) -> Any:
    if key not in obj:
        raise FormatError(f"{what}: missing field {key!r}")
    value = obj[key]
    if isinstance(value, bool) and typ is not bool:
        raise FormatError(f"{what}: field {key!r} has type bool")
    if not isinstance(value, typ):
        raise FormatError(f"{what}: field {key!r} has type {type(value).__name__}")
    return value


def uint(obj: dict, key: str, *, what: str, limit: int = 1 << 63) -> int:
    value = field(obj, key, int, what=what)
    if not 0 <= value < limit:
        raise FormatError(f"{what}: field {key!r} out of range: {value}")
    return value


def digest(obj: dict, key: str, *, what: str) -> bytes:
    value = field(obj, key, bytes, what=what)
    if len(value) != 32:
        raise FormatError(f"{what}: field {key!r} is {len(value)} bytes, not 32")
    return value


def text(obj: dict, key: str, *, what: str, limit: int) -> str:
    value = field(obj, key, str, what=what)
    if len(value) > limit:
        raise FormatError(f"{what}: field {key!r} longer than {limit} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise FormatError(f"{what}: field {key!r} contains control characters")
    return value


def as_map(obj: Any, *, what: str) -> dict:
    """A decoded map whose keys are all text (msgpack's strict_map_key still admits bytes)."""
    if not isinstance(obj, dict):
        raise FormatError(f"{what}: expected a map, got {type(obj).__name__}")
    for key in obj:
        if not isinstance(key, str):
            raise FormatError(f"{what}: a map key is {type(key).__name__}, not text")
    return obj
