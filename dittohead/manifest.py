"""Manifests: what one submission says about its files (format version 1).

A manifest is a msgpack map (``format``, ``kind``, ``study``, ``site``, ``user``, ``host``,
``created_ns``, ``entries``); each entry is a map (``path``, ``size``, ``mtime_ns``, ``mode``,
``hash``, ``chunks`` = list of [chunk id, length]). Its id is the BLAKE3-256 of its bytes.
``decode`` is strict: a manifest from a client is untrusted, and every rule that can be checked
without the store is checked here (types, limits, paths, sizes add up, an empty file's hash).
Client-reported times (``created_ns``, ``mtime_ns``) are kept as information only (invariant 8).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dittohead import codec, paths
from dittohead import format as fmt
from dittohead.errors import FormatError, UnsupportedFormat
from dittohead.hashing import EMPTY_HASH, digest

ChunkRef = tuple[bytes, int]


@dataclass(frozen=True)
class Entry:
    path: str
    size: int
    mtime_ns: int
    mode: int
    hash: bytes
    chunks: tuple[ChunkRef, ...]


@dataclass(frozen=True)
class Manifest:
    study: str
    site: str
    user: str
    host: str
    created_ns: int
    entries: tuple[Entry, ...] = field(default=())


def encode(m: Manifest) -> bytes:
    return codec.pack(
        {
            "format": fmt.FORMAT_VERSION,
            "kind": fmt.MANIFEST_KIND,
            "study": m.study,
            "site": m.site,
            "user": m.user,
            "host": m.host,
            "created_ns": m.created_ns,
            "entries": [
                {
                    "path": e.path,
                    "size": e.size,
                    "mtime_ns": e.mtime_ns,
                    "mode": e.mode,
                    "hash": e.hash,
                    "chunks": [[cid, n] for cid, n in e.chunks],
                }
                for e in m.entries
            ],
        }
    )


def manifest_id(data: bytes) -> bytes:
    return digest(data)


def _int(obj: dict, key: str, what: str, lo: int, hi: int) -> int:
    v = codec.field(obj, key, int, what=what)
    if not lo <= v <= hi:
        raise FormatError(f"{what}: field {key!r} out of range: {v}")
    return v


def _entry_checked(raw: Any, i: int) -> Entry:
    """Check an entry field by field, naming the first rule it breaks."""
    what = f"manifest entry {i}"
    e = codec.as_map(raw, what=what)
    try:
        path = paths.check(codec.field(e, "path", str, what=what))
    except paths.BadPath as exc:
        raise FormatError(f"{what}: {exc}") from None
    what = f"manifest entry {path!r}"
    size = _int(e, "size", what, 0, 1 << 62)
    mtime_ns = _int(e, "mtime_ns", what, -(1 << 63), (1 << 63) - 1)
    mode = _int(e, "mode", what, 0, 0o7777)
    fhash = codec.digest(e, "hash", what=what)
    raw_chunks = codec.field(e, "chunks", list, what=what)
    if len(raw_chunks) > fmt.MANIFEST_MAX_CHUNKS_PER_FILE:
        raise FormatError(f"{what}: too many chunks")
    chunks: list[ChunkRef] = []
    total = 0
    for j, c in enumerate(raw_chunks):
        if not (isinstance(c, list) and len(c) == 2 and isinstance(c[0], bytes) and len(c[0]) == fmt.HASH_SIZE
                and isinstance(c[1], int) and not isinstance(c[1], bool)):
            raise FormatError(f"{what}: chunk {j} is not [32-byte id, length]")
        if not 0 < c[1] <= fmt.CHUNK_MAX:
            raise FormatError(f"{what}: chunk {j} has length {c[1]}, out of range")
        chunks.append((c[0], c[1]))
        total += c[1]
    if total != size:
        raise FormatError(f"{what}: chunk lengths add up to {total}, size says {size}")
    if size == 0 and fhash != EMPTY_HASH:
        raise FormatError(f"{what}: empty file with the wrong hash")
    extra = set(e) - {"path", "size", "mtime_ns", "mode", "hash", "chunks"}
    if extra:
        raise FormatError(f"{what}: unknown fields {sorted(extra)}")
    return Entry(path, size, mtime_ns, mode, fhash, tuple(chunks))


_ENTRY_KEYS = frozenset({"path", "size", "mtime_ns", "mode", "hash", "chunks"})
_I64 = (-(1 << 63), (1 << 63) - 1)


def _entry(raw: Any, i: int) -> Entry:
    """The same rules as ``_entry_checked``, tested in one pass; any doubt goes to the slow
    checker, which names the rule broken (``type(x) is int`` also refuses bool)."""
    try:
        if type(raw) is dict and raw.keys() == _ENTRY_KEYS:
            path, size, mtime_ns, mode = raw["path"], raw["size"], raw["mtime_ns"], raw["mode"]
            fhash, raw_chunks = raw["hash"], raw["chunks"]
            if (type(path) is str and type(size) is int and 0 <= size <= 1 << 62
                    and type(mtime_ns) is int and _I64[0] <= mtime_ns <= _I64[1]
                    and type(mode) is int and 0 <= mode <= 0o7777
                    and type(fhash) is bytes and len(fhash) == fmt.HASH_SIZE
                    and type(raw_chunks) is list and len(raw_chunks) <= fmt.MANIFEST_MAX_CHUNKS_PER_FILE):
                chunks = []
                total = 0
                for c in raw_chunks:
                    if not (type(c) is list and len(c) == 2 and type(c[0]) is bytes and len(c[0]) == fmt.HASH_SIZE
                            and type(c[1]) is int and 0 < c[1] <= fmt.CHUNK_MAX):
                        break
                    chunks.append((c[0], c[1]))
                    total += c[1]
                else:
                    if total == size and (size or fhash == EMPTY_HASH):
                        return Entry(paths.check(path), size, mtime_ns, mode, fhash, tuple(chunks))
    except paths.BadPath:
        pass
    return _entry_checked(raw, i)


def decode(data: bytes) -> Manifest:
    """Decode and check an untrusted manifest; FormatError says what is wrong."""
    raw = codec.unpack(data, what="manifest", max_size=fmt.MANIFEST_MAX_SIZE,
                       max_len=max(fmt.MANIFEST_MAX_ENTRIES, fmt.MANIFEST_MAX_CHUNKS_PER_FILE))
    m = codec.as_map(raw, what="manifest")
    version = codec.field(m, "format", int, what="manifest")
    if version not in fmt.SUPPORTED_VERSIONS:
        raise UnsupportedFormat(f"manifest: format version {version} is not supported")
    if codec.field(m, "kind", str, what="manifest") != fmt.MANIFEST_KIND:
        raise FormatError("manifest: kind is not 'manifest'")
    study = codec.text(m, "study", what="manifest", limit=fmt.TEXT_MAX)
    site = codec.text(m, "site", what="manifest", limit=fmt.TEXT_MAX)
    user = codec.text(m, "user", what="manifest", limit=fmt.TEXT_MAX)
    host = codec.text(m, "host", what="manifest", limit=fmt.TEXT_MAX)
    created_ns = _int(m, "created_ns", "manifest", -(1 << 63), (1 << 63) - 1)
    raw_entries = codec.field(m, "entries", list, what="manifest")
    if len(raw_entries) > fmt.MANIFEST_MAX_ENTRIES:
        raise FormatError("manifest: too many entries")
    extra = set(m) - {"format", "kind", "study", "site", "user", "host", "created_ns", "entries"}
    if extra:
        raise FormatError(f"manifest: unknown fields {sorted(extra)}")
    entries = tuple(_entry(e, i) for i, e in enumerate(raw_entries))
    try:
        paths.check_tree([e.path for e in entries])
    except paths.BadPath as exc:
        raise FormatError(f"manifest: {exc}") from None
    return Manifest(study, site, user, host, created_ns, entries)
