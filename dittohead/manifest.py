"""Manifests: what one submission says about its files (format versions 1 and 2).

A manifest is a msgpack map (``format``, ``kind``, ``study``, ``site``, ``user``, ``host``,
``created_ns``, ``entries``); each entry is a map (``path``, ``size``, ``mtime_ns``, ``mode``,
``hash``, ``chunks`` = list of [chunk id, length]). Its id is the BLAKE3-256 of its bytes.
A path is bin (the exact name bytes) in version 2, str in version 1; decoded, it is a study path
(``dittohead.paths``: a str that gives the bytes back).
``decode`` is strict: a manifest from a client is untrusted, and every rule that can be checked
without the store is checked here (types, limits, paths, sizes add up, an empty file's hash).
Client-reported times (``created_ns``, ``mtime_ns``) are kept as information only (invariant 8).

``decode`` streams: the raw msgpack tree of a whole manifest never exists at once, only one
entry's at a time, and each entry is kept compact (``Entry``, a named tuple; its chunk list a
``Chunks``, 36 bytes a chunk). Its memory is bounded by the manifest's limits: see
docs/format.md, "Manifest", and benchmarks/manifest_memory.py for the figures.
"""

from __future__ import annotations

import io
import struct
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

from dittohead import codec, paths
from dittohead import format as fmt
from dittohead.display import escape
from dittohead.errors import FormatError, UnsupportedFormat
from dittohead.hashing import EMPTY_HASH, digest

ChunkRef = tuple[bytes, int]

_REF = struct.Struct("<32sI")  # a chunk in a Chunks blob: id, length (the layout of chunking.pack_chunk_list)


class Chunks(Sequence):
    """A file's chunk list, (chunk id, length) pairs in order, kept as one bytes object of 36
    bytes a chunk: a decoded manifest may hold millions, and a tuple of tuples costs ~170 bytes
    a chunk. It reads like a tuple of pairs, and compares equal to one."""

    __slots__ = ("_blob",)

    def __init__(self, refs: Iterable[ChunkRef] = ()) -> None:
        self._blob = b"".join(_REF.pack(cid, n) for cid, n in refs)

    @classmethod
    def from_blob(cls, blob: bytes) -> Chunks:
        """Chunks whose ``blob`` is given (36 bytes a chunk: id, then length as u32le)."""
        if len(blob) % _REF.size:
            raise ValueError("a chunk blob is a multiple of 36 bytes")
        obj = cls.__new__(cls)
        obj._blob = blob
        return obj

    @property
    def blob(self) -> bytes:
        """The chunks as ``chunking.pack_chunk_list`` packs them."""
        return self._blob

    def __len__(self) -> int:
        return len(self._blob) // _REF.size

    def __iter__(self) -> Iterator[ChunkRef]:
        return _REF.iter_unpack(self._blob)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return tuple(self)[i]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("chunk index out of range")
        return _REF.unpack_from(self._blob, i * _REF.size)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Chunks):
            return self._blob == other._blob
        if isinstance(other, (tuple, list)):
            return len(other) == len(self) and all(
                isinstance(o, (tuple, list)) and tuple(o) == s for s, o in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"Chunks({tuple(self)!r})"

    def __reduce__(self):
        return (Chunks.from_blob, (self._blob,))


class Entry(NamedTuple):
    """One file of a submission. ``chunks`` is a ``Chunks`` when decoded; any sequence of
    (chunk id, length) pairs (a tuple) when built by a client."""

    path: str  # a study path (dittohead.paths): to_bytes(path) is what the source gave
    size: int
    mtime_ns: int
    mode: int
    hash: bytes
    chunks: Sequence[ChunkRef]


@dataclass(frozen=True)
class Manifest:
    study: str
    site: str
    user: str
    host: str
    created_ns: int
    entries: tuple[Entry, ...] = field(default=())


def _entry_map(e: Entry) -> dict:
    return {
        "path": paths.to_bytes(e.path),
        "size": e.size,
        "mtime_ns": e.mtime_ns,
        "mode": e.mode,
        "hash": e.hash,
        "chunks": [[cid, n] for cid, n in e.chunks],
    }


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
            "entries": [_entry_map(e) for e in m.entries],
        }
    )


def manifest_id(data: bytes) -> bytes:
    return digest(data)


# -- sizes, for a client that must keep its manifests within the limits ------------------------

ENTRY_OVERHEAD_MAX = 102
"""The most an entry's encoding adds to its path's bytes and 40 bytes a chunk: a 6-key map
header (1), the keys (36), the path's bin header (5), size and mtime_ns (9 each), mode (3), the
hash (34), the chunk list's array header (5)."""
CHUNK_REF_MAX = 40  # [id, length]: array header (1), bin 32 (34), length up to 4 MiB (5)


def entry_size_max(path_bytes: int, nchunks: int) -> int:
    """An upper bound of the bytes ``encode`` writes for an entry whose path is ``path_bytes``
    bytes long, with ``nchunks`` chunks (exact but for smaller ints and shorter headers)."""
    return ENTRY_OVERHEAD_MAX + path_bytes + CHUNK_REF_MAX * nchunks


def header_size_max(m: Manifest) -> int:
    """An upper bound of the bytes ``encode(m)`` writes besides its entries (whatever its
    ``created_ns``, however many entries)."""
    probe = Manifest(m.study, m.site, m.user, m.host, -(1 << 63), ())
    return len(encode(probe)) - 1 + 5  # the empty list's header (1) becomes an array32's (5)


# -- decoding --------------------------------------------------------------------------------


def _int(obj: dict, key: str, what: str, lo: int, hi: int) -> int:
    v = codec.field(obj, key, int, what=what)
    if not lo <= v <= hi:
        raise FormatError(f"{what}: field {key!r} out of range: {v}")
    return v


class _ChunkScan:
    """An entry's chunk list as the streaming decoder met it: the valid chunks packed, their
    total length, and the first rule a chunk broke (its message), if any."""

    __slots__ = ("blob", "count", "error", "total")

    def __init__(self, count: int) -> None:
        self.count = count
        self.blob = bytearray()
        self.total = 0
        self.error = ""


def _path(raw: Any) -> str:
    """A manifest's path as a study path: format 2's bytes decoded, format 1's str as it is."""
    return paths.from_bytes(raw) if isinstance(raw, bytes) else raw


def _entry_checked(raw: Any, i: int, path_type: type) -> Entry:
    """Check an entry field by field, naming the first rule it breaks."""
    what = f"manifest entry {i}"
    e = codec.as_map(raw, what=what)
    try:
        path = paths.check(_path(codec.field(e, "path", path_type, what=what)))
    except paths.BadPath as exc:
        raise FormatError(f"{what}: {exc}") from None
    what = f"manifest entry '{escape(path)}'"
    size = _int(e, "size", what, 0, 1 << 62)
    mtime_ns = _int(e, "mtime_ns", what, -(1 << 63), (1 << 63) - 1)
    mode = _int(e, "mode", what, 0, 0o7777)
    fhash = codec.digest(e, "hash", what=what)
    scan = e.get("chunks")
    if isinstance(scan, _ChunkScan):  # a long list, checked as it streamed past
        if scan.count > fmt.MANIFEST_MAX_CHUNKS_PER_FILE:
            raise FormatError(f"{what}: too many chunks")
        if scan.error:
            raise FormatError(f"{what}: {scan.error}")
        chunks = Chunks.from_blob(bytes(scan.blob))
        total = scan.total
    else:
        raw_chunks = codec.field(e, "chunks", list, what=what)
        if len(raw_chunks) > fmt.MANIFEST_MAX_CHUNKS_PER_FILE:
            raise FormatError(f"{what}: too many chunks")
        refs: list[ChunkRef] = []
        total = 0
        for j, c in enumerate(raw_chunks):
            if not (isinstance(c, list) and len(c) == 2 and isinstance(c[0], bytes) and len(c[0]) == fmt.HASH_SIZE
                    and isinstance(c[1], int) and not isinstance(c[1], bool)):
                raise FormatError(f"{what}: chunk {j} is not [32-byte id, length]")
            if not 0 < c[1] <= fmt.CHUNK_MAX:
                raise FormatError(f"{what}: chunk {j} has length {c[1]}, out of range")
            refs.append((c[0], c[1]))
            total += c[1]
        chunks = Chunks(refs)
    if total != size:
        raise FormatError(f"{what}: chunk lengths add up to {total}, size says {size}")
    if size == 0 and fhash != EMPTY_HASH:
        raise FormatError(f"{what}: empty file with the wrong hash")
    extra = set(e) - _ENTRY_KEYS
    if extra:
        raise FormatError(f"{what}: unknown fields {sorted(extra)}")
    return Entry(path, size, mtime_ns, mode, fhash, chunks)


_ENTRY_KEYS = frozenset({"path", "size", "mtime_ns", "mode", "hash", "chunks"})
_HEADER_KEYS = frozenset({"format", "kind", "study", "site", "user", "host", "created_ns"})
_I64 = (-(1 << 63), (1 << 63) - 1)
_new_entry = Entry._make
_pack_ref = _REF.pack


def _entry(raw: Any, i: int, modes: dict[int, int], path_type: type) -> Entry:
    """The same rules as ``_entry_checked``, tested in one pass; any doubt goes to the slow
    checker, which names the rule broken (``type(x) is int`` also refuses bool). ``modes``
    shares one int object per distinct mode among the entries."""
    try:
        if type(raw) is dict and raw.keys() == _ENTRY_KEYS:
            path, size, mtime_ns, mode = raw["path"], raw["size"], raw["mtime_ns"], raw["mode"]
            fhash, raw_chunks = raw["hash"], raw["chunks"]
            if (type(path) is path_type and type(size) is int and 0 <= size <= 1 << 62
                    and type(mtime_ns) is int and _I64[0] <= mtime_ns <= _I64[1]
                    and type(mode) is int and 0 <= mode <= 0o7777
                    and type(fhash) is bytes and len(fhash) == fmt.HASH_SIZE
                    and type(raw_chunks) is list and len(raw_chunks) <= fmt.MANIFEST_MAX_CHUNKS_PER_FILE):
                parts = []
                total = 0
                for c in raw_chunks:
                    if not (type(c) is list and len(c) == 2 and type(c[0]) is bytes and len(c[0]) == fmt.HASH_SIZE
                            and type(c[1]) is int and 0 < c[1] <= fmt.CHUNK_MAX):
                        break
                    parts.append(_pack_ref(c[0], c[1]))
                    total += c[1]
                else:
                    if total == size and (size or fhash == EMPTY_HASH):
                        blob = parts[0] if len(parts) == 1 else b"".join(parts)
                        return _new_entry((paths.check(_path(path)), size, mtime_ns, modes.setdefault(mode, mode),
                                           fhash, Chunks.from_blob(blob)))
    except paths.BadPath:
        pass
    return _entry_checked(raw, i, path_type)


class _Stream:
    """msgpack read one object at a time from ``data[start:]``, with a look at the first byte of
    the next object (``kind``), so that a container where a scalar belongs is skipped, never
    built: what one object costs is then bounded by its bytes. Every failure is a FormatError
    about the manifest, worded as ``codec.unpack`` words it."""

    __slots__ = ("base", "data", "u")

    def __init__(self, data: bytes, start: int) -> None:
        f = io.BytesIO(data)  # shares the bytes, no copy
        f.seek(start)
        room = max(1, len(data) - start)
        self.data, self.base = data, start
        self.u = msgpack.Unpacker(
            f, raw=False, strict_map_key=True, ext_hook=codec.no_ext, read_size=min(room, 1 << 16),
            max_buffer_size=room, max_str_len=room, max_bin_len=room,
            max_array_len=0, max_map_len=0, max_ext_len=0,  # containers are read by their headers
        )

    def pos(self) -> int:
        return self.base + self.u.tell()

    def kind(self) -> str:
        p = self.pos()
        if p >= len(self.data):
            raise FormatError("manifest: not valid msgpack (truncated)")
        return codec.KIND[self.data[p]]

    def _call(self, fn):
        try:
            return fn()
        except FormatError:
            raise
        except Exception as e:  # noqa: BLE001  (as codec.unpack)
            raise codec.format_error(e, "manifest") from None

    def unpack(self) -> Any:
        return self._call(self.u.unpack)

    def skip(self) -> None:
        self._call(self.u.skip)

    def map_header(self) -> int:
        return self._call(self.u.read_map_header)

    def array_header(self) -> int:
        n = self._call(self.u.read_array_header)
        left = len(self.data) - self.pos()
        if n > left:  # each item takes a byte at least
            raise FormatError(f"manifest: not valid msgpack (a list of {n} items in {left} bytes)")
        return n

    def key(self) -> str | bytes:
        """A map key: text or bytes, as msgpack's strict_map_key admits (``as_map`` refuses bytes)."""
        kind = self.kind()
        if kind not in ("str", "bytes"):
            raise FormatError(f"manifest: not valid msgpack (ValueError: {kind} is not allowed for map key)")
        return self.unpack()

    def scalar(self) -> Any:
        """The next object if it is a scalar; a container is skipped and stands as an empty one
        of its type (only its type is ever reported)."""
        kind = self.kind()
        if kind == "list":
            self.skip()
            return []
        if kind == "dict":
            self.skip()
            return {}
        return self.unpack()

    def chunk_list(self) -> Any:
        """An entry's ``chunks``: a _ChunkScan for a list, else what ``scalar`` gives."""
        if self.kind() != "list":
            return self.scalar()
        scan = _ChunkScan(self.array_header())
        if scan.count > fmt.MANIFEST_MAX_CHUNKS_PER_FILE:
            scan.error = "too many chunks"
        blob = scan.blob
        for j in range(scan.count):
            if scan.error:
                self.skip()
                continue
            pair = []  # [id, length], only if that is what the chunk is
            if self.kind() == "list":
                n = self.array_header()
                for k in range(n):
                    if n == 2 and self.kind() == ("bytes", "int")[k]:
                        pair.append(self.unpack())
                    else:
                        self.skip()
            else:
                self.skip()
            if len(pair) != 2 or len(pair[0]) != fmt.HASH_SIZE:
                scan.error = f"chunk {j} is not [32-byte id, length]"
            elif not 0 < pair[1] <= fmt.CHUNK_MAX:
                scan.error = f"chunk {j} has length {pair[1]}, out of range"
            else:
                blob += pair[0]
                blob += pair[1].to_bytes(4, "little")
                scan.total += pair[1]
        return scan


class _EntryList:
    """Where the entries are: the offset of the first, and where each one ends."""

    __slots__ = ("ends", "start")

    def __init__(self, start: int, ends: array) -> None:
        self.start, self.ends = start, ends


_SMALL_ENTRY = 64 * 1024  # an entry this long or shorter is decoded whole (its objects: at most ~4 MB)
_SMALL_OPTS: dict[str, Any] = {
    "raw": False, "strict_map_key": True, "ext_hook": codec.no_ext, "max_ext_len": 0,
    "max_str_len": _SMALL_ENTRY, "max_bin_len": _SMALL_ENTRY,
    "max_array_len": _SMALL_ENTRY, "max_map_len": _SMALL_ENTRY,
}


def _large_entry(data: bytes, start: int, i: int, path_type: type) -> Entry:
    """An entry longer than _SMALL_ENTRY (a file of many chunks), read field by field."""
    s = _Stream(data, start)
    kind = s.kind()
    if kind != "dict":
        s.scalar()  # invalid msgpack says so first
        raise FormatError(f"manifest entry {i}: expected a map, got {kind}")
    e: dict = {}
    for _ in range(s.map_header()):
        key = s.key()
        if key == "chunks":
            e[key] = s.chunk_list()
        elif key in _ENTRY_KEYS:
            e[key] = s.scalar()
        else:
            s.skip()
            e[key] = None
    return _entry_checked(e, i, path_type)


def _entries(data: bytes, where: _EntryList, path_type: type) -> Iterator[Entry]:
    view = memoryview(data)
    unpackb = msgpack.unpackb
    modes: dict[int, int] = {}
    start = where.start
    for i, end in enumerate(where.ends):
        if end - start <= _SMALL_ENTRY:
            try:
                raw = unpackb(view[start:end], **_SMALL_OPTS)
            except Exception as e:  # noqa: BLE001  (as codec.unpack)
                raise codec.format_error(e, "manifest") from None
            yield _entry(raw, i, modes, path_type)
        else:
            yield _large_entry(data, start, i, path_type)
        start = end


def decode(data: bytes, *, stored: bool = False) -> Manifest:
    """Decode and check an untrusted manifest; FormatError says what is wrong.

    The limits are those of a submission (``MANIFEST_MAX_SIZE``, ``MANIFEST_MAX_ENTRIES``);
    with ``stored``, those under which the store's own manifests were accepted
    (``STORED_MANIFEST_MAX_SIZE``, ``STORED_MANIFEST_MAX_ENTRIES``). Every other rule is the same.
    """
    if stored:
        max_size, max_entries = fmt.STORED_MANIFEST_MAX_SIZE, fmt.STORED_MANIFEST_MAX_ENTRIES
    else:
        max_size, max_entries = fmt.MANIFEST_MAX_SIZE, fmt.MANIFEST_MAX_ENTRIES
    if len(data) > max_size:
        raise FormatError(f"manifest: {len(data)} bytes, more than the limit of {max_size}")
    data = bytes(data)  # a no-op for bytes (a bytearray or memoryview is copied once)

    # Pass 1: the top-level map. The header's fields are decoded (a container where a scalar
    # belongs is skipped, never built); the entries are only found and checked to be sound
    # msgpack, one at a time, their ends noted; unknown fields are skipped.
    s = _Stream(data, 0)
    kind = s.kind()
    if kind != "dict":
        s.scalar()
        if s.pos() != len(data):
            raise FormatError("manifest: trailing bytes after the object")
        raise FormatError(f"manifest: expected a map, got {kind}")
    m: dict = {}
    for _ in range(s.map_header()):
        key = s.key()
        if key == "entries" and s.kind() == "list":
            n = s.array_header()
            if n > max_entries:
                if "format" in m:  # a manifest of another version may have other limits
                    _check_version(m)
                raise FormatError("manifest: too many entries")
            start = s.pos()
            ends = array("I")  # the limits keep offsets below 4 GiB
            for _ in range(n):
                s.skip()
                ends.append(s.pos())
            m[key] = _EntryList(start, ends)
        elif key in _HEADER_KEYS or key == "entries":
            m[key] = s.scalar()
        else:
            s.skip()
            m[key] = None
    if s.pos() != len(data):
        raise FormatError("manifest: trailing bytes after the object")
    del s  # its buffer, as large as the largest entry was

    # The header, checked in a fixed order (each message names the first rule broken).
    codec.as_map(m, what="manifest")
    path_type = str if _check_version(m) == 1 else bytes
    if codec.field(m, "kind", str, what="manifest") != fmt.MANIFEST_KIND:
        raise FormatError("manifest: kind is not 'manifest'")
    study = codec.text(m, "study", what="manifest", limit=fmt.TEXT_MAX)
    site = codec.text(m, "site", what="manifest", limit=fmt.TEXT_MAX)
    user = codec.text(m, "user", what="manifest", limit=fmt.TEXT_MAX)
    host = codec.text(m, "host", what="manifest", limit=fmt.TEXT_MAX)
    created_ns = _int(m, "created_ns", "manifest", -(1 << 63), (1 << 63) - 1)
    where = m.get("entries")
    if not isinstance(where, _EntryList):
        codec.field(m, "entries", list, what="manifest")  # missing, or another type: it says which
        raise FormatError("manifest: field 'entries' is not a list")  # not reached
    extra = set(m) - _HEADER_KEYS - {"entries"}
    if extra:
        raise FormatError(f"manifest: unknown fields {sorted(extra)}")

    # Pass 2: the entries, one at a time.
    entries = tuple(_entries(data, where, path_type))
    del where
    try:
        paths.check_tree([e.path for e in entries])
    except paths.BadPath as exc:
        raise FormatError(f"manifest: {exc}") from None
    return Manifest(study, site, user, host, created_ns, entries)


def _check_version(m: dict) -> int:
    version = codec.field(m, "format", int, what="manifest")
    if version not in fmt.SUPPORTED_VERSIONS:
        raise UnsupportedFormat(f"manifest: format version {version} is not supported")
    return version
