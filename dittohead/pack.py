"""Packs: many chunks in one self-describing file (format version 1).

Layout: HEADER (magic, version) · chunk bytes back to back · TRAILER (msgpack list of
[chunk id, offset, length, codec]) · FOOTER (trailer length, BLAKE3-256 of the trailer, magic).
The trailer's entries must tile the data region exactly, so every byte of a pack is covered by a
check: the header by its magic and version, the data by the chunk ids, the trailer by its hash,
the footer by its magic and the consistency of the rest. A pack's id is the BLAKE3-256 of its
whole bytes; client uploads and server-written store packs share this one format.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from dittohead import codec
from dittohead import format as fmt
from dittohead.errors import FormatError, IntegrityError, UnsupportedFormat
from dittohead.hashing import blake3


@dataclass(frozen=True)
class PackEntry:
    id: bytes
    offset: int
    length: int
    codec: int = fmt.CODEC_RAW


class Sink(Protocol):
    def write(self, data: bytes | memoryview, /) -> int: ...


class PackWriter:
    """Writes one pack to a binary file, sequentially; ``finish`` returns the pack id."""

    def __init__(self, f: Sink) -> None:
        self._f = f
        # A sink that hashes what it writes (directio.Writer, off this thread) gives the pack id.
        self._sink_digest: Callable[[], bytes] | None = getattr(f, "digest", None)
        self._hasher = None if self._sink_digest else blake3()
        self._entries: list[PackEntry] = []
        self._offset = 0
        self._ids: set[bytes] = set()
        self._write(fmt.PACK_HEADER.pack(fmt.PACK_MAGIC, fmt.FORMAT_VERSION))

    def _write(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        if self._hasher is not None:
            self._hasher.update(data)
        self._offset += len(data)

    @property
    def data_size(self) -> int:
        return self._offset - fmt.PACK_HEADER.size

    @property
    def count(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> list[PackEntry]:
        return list(self._entries)

    def full(self) -> bool:
        return self.data_size >= fmt.PACK_TARGET_SIZE or self.count >= fmt.PACK_TARGET_CHUNKS

    def add(self, chunk_id: bytes, data: bytes | memoryview) -> PackEntry:
        """Append a chunk (a chunk already in this pack is not added twice)."""
        if chunk_id in self._ids:
            return next(e for e in self._entries if e.id == chunk_id)
        entry = PackEntry(chunk_id, self._offset, len(data))
        self._write(data)
        self._entries.append(entry)
        self._ids.add(chunk_id)
        return entry

    def finish(self) -> tuple[bytes, int]:
        """Write trailer and footer; returns (pack id, pack size). The caller fsyncs/closes."""
        trailer = encode_trailer(self._entries)
        self._write(trailer)
        self._write(fmt.PACK_FOOTER.pack(len(trailer), blake3(trailer).digest(), fmt.PACK_MAGIC))
        if self._sink_digest is not None:
            return self._sink_digest(), self._offset
        assert self._hasher is not None
        return self._hasher.digest(), self._offset


def encode_trailer(entries: list[PackEntry]) -> bytes:
    return codec.pack([[e.id, e.offset, e.length, e.codec] for e in entries])


def canonical_tail(entries: list[PackEntry]) -> bytes:
    """The trailer and footer PackWriter writes after these entries."""
    trailer = encode_trailer(entries)
    return trailer + fmt.PACK_FOOTER.pack(len(trailer), blake3(trailer).digest(), fmt.PACK_MAGIC)


def is_canonical(f: BinaryIO, entries: list[PackEntry]) -> bool:
    """Is this pack (its trailer accepted by read_entries) byte for byte what PackWriter writes
    for these entries, the chunks' bytes aside (those are checked against their ids)?"""
    if not entries:
        return False
    tail = canonical_tail(entries)
    size = os.fstat(f.fileno()).st_size
    if size != entries[-1].offset + entries[-1].length + len(tail):
        return False
    f.seek(0)
    if f.read(fmt.PACK_HEADER.size) != fmt.PACK_HEADER.pack(fmt.PACK_MAGIC, fmt.FORMAT_VERSION):
        return False
    f.seek(size - len(tail))
    return f.read(len(tail)) == tail


def parse_pack_tail(header: bytes, tail: bytes, size: int, *, what: str) -> list[PackEntry]:
    """Validate a pack from its first bytes, its last bytes and its size.

    ``tail`` must hold at least the footer and trailer (``read_entries`` reads enough).
    Raises FormatError (UnsupportedFormat for an unknown version) naming ``what``.
    """
    hsize, fsize = fmt.PACK_HEADER.size, fmt.PACK_FOOTER.size
    if size < hsize + fsize:
        raise FormatError(f"{what}: {size} bytes, too short to be a pack")
    if size > fmt.PACK_MAX_SIZE:
        raise FormatError(f"{what}: {size} bytes, larger than the pack limit")
    magic, version = fmt.PACK_HEADER.unpack(header[:hsize])
    if magic != fmt.PACK_MAGIC:
        raise FormatError(f"{what}: not a pack (bad header magic)")
    if version not in fmt.SUPPORTED_VERSIONS:
        raise UnsupportedFormat(f"{what}: pack format version {version} is not supported")
    tlen, thash, fmagic = fmt.PACK_FOOTER.unpack(tail[-fsize:])
    if fmagic != fmt.PACK_MAGIC:
        raise FormatError(f"{what}: bad footer magic (truncated or damaged pack)")
    if tlen > fmt.PACK_MAX_TRAILER or hsize + tlen + fsize > size or tlen + fsize > len(tail):
        raise FormatError(f"{what}: trailer length {tlen} does not fit the pack")
    trailer = tail[len(tail) - fsize - tlen : len(tail) - fsize]
    if blake3(trailer).digest() != thash:
        raise FormatError(f"{what}: trailer checksum mismatch")
    raw = codec.unpack(trailer, what=f"{what} trailer", max_size=fmt.PACK_MAX_TRAILER,
                       max_len=fmt.PACK_MAX_ENTRIES)
    if not isinstance(raw, list):
        raise FormatError(f"{what}: trailer is not a list")
    entries: list[PackEntry] = []
    expect = hsize
    seen: set[bytes] = set()
    for i, item in enumerate(raw):
        if not (isinstance(item, list) and len(item) == 4):
            raise FormatError(f"{what}: trailer entry {i} is not [id, offset, length, codec]")
        cid, off, length, cod = item
        if not (isinstance(cid, bytes) and len(cid) == fmt.HASH_SIZE):
            raise FormatError(f"{what}: trailer entry {i}: chunk id is not 32 bytes")
        for v in (off, length, cod):
            if not isinstance(v, int) or isinstance(v, bool):
                raise FormatError(f"{what}: trailer entry {i}: offset, length and codec must be integers")
        if cod not in fmt.CODECS:
            raise FormatError(f"{what}: trailer entry {i}: unknown codec {cod}")
        if off != expect:
            raise FormatError(f"{what}: trailer entry {i}: offset {off}, expected {expect}")
        if not 0 < length <= fmt.CHUNK_MAX:
            raise FormatError(f"{what}: trailer entry {i}: chunk length {length} out of range")
        if cid in seen:
            raise FormatError(f"{what}: trailer entry {i}: chunk {cid.hex()} appears twice")
        seen.add(cid)
        entries.append(PackEntry(cid, off, length, cod))
        expect = off + length
    if expect != size - fsize - tlen:
        raise FormatError(f"{what}: chunk data ends at {expect}, trailer starts at {size - fsize - tlen}")
    return entries


def read_entries(f: BinaryIO, *, what: str) -> list[PackEntry]:
    """Read and validate the trailer of an open pack file."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    header = f.read(fmt.PACK_HEADER.size)
    if len(header) < fmt.PACK_HEADER.size:
        raise FormatError(f"{what}: too short to be a pack")
    f.seek(max(0, size - fmt.PACK_FOOTER.size))
    footer = f.read(fmt.PACK_FOOTER.size)
    if len(footer) < fmt.PACK_FOOTER.size:
        raise FormatError(f"{what}: too short to be a pack")
    tlen = fmt.PACK_FOOTER.unpack(footer)[0]
    want = min(size - fmt.PACK_HEADER.size, tlen + fmt.PACK_FOOTER.size, fmt.PACK_MAX_TRAILER + fmt.PACK_FOOTER.size)
    f.seek(size - want)
    tail = f.read(want)
    return parse_pack_tail(header, tail, size, what=what)


def read_entries_by_range(size: int, read_range: Callable[[int, int], bytes], *, what: str) -> list[PackEntry]:
    """``read_entries`` of a pack of ``size`` bytes read by ranges (``read_range(offset,
    length)``: an object store's ranged read), in three reads: header, footer, trailer."""
    header = read_range(0, fmt.PACK_HEADER.size)
    footer = read_range(max(0, size - fmt.PACK_FOOTER.size), fmt.PACK_FOOTER.size)
    if len(header) < fmt.PACK_HEADER.size or len(footer) < fmt.PACK_FOOTER.size:
        raise FormatError(f"{what}: too short to be a pack")
    tlen = fmt.PACK_FOOTER.unpack(footer)[0]
    want = min(size - fmt.PACK_HEADER.size, tlen + fmt.PACK_FOOTER.size, fmt.PACK_MAX_TRAILER + fmt.PACK_FOOTER.size)
    return parse_pack_tail(header, read_range(size - want, want), size, what=what)


def read_chunk(f: BinaryIO, entry: PackEntry, *, what: str) -> bytes:
    """Read one chunk and check it against its id; IntegrityError on mismatch."""
    f.seek(entry.offset)
    data = f.read(entry.length)
    if len(data) != entry.length or blake3(data).digest() != entry.id:
        raise IntegrityError(f"{what}: chunk {entry.id.hex()} at offset {entry.offset} does not match its id")
    return data


class Stream(Protocol):
    def readinto(self, b: memoryview, /) -> int: ...


def iter_verified(r: Stream, entries: list[PackEntry], *, what: str) -> Iterator[tuple[PackEntry, memoryview]]:
    """Every chunk of a pack in order, each checked against its id, from a stream at the pack's
    start (one sequential read); a chunk's bytes are only valid until the next is read (one
    buffer serves them all). IntegrityError on a mismatch."""
    view = memoryview(bytearray(max([fmt.PACK_HEADER.size, *(e.length for e in entries)])))
    _read_exactly(r, view[: fmt.PACK_HEADER.size])  # the header, checked by read_entries
    for entry in entries:
        data = view[: entry.length]
        if _read_exactly(r, data) != entry.length or blake3(data).digest() != entry.id:
            raise IntegrityError(f"{what}: chunk {entry.id.hex()} at offset {entry.offset} does not match its id")
        yield entry, data


def _read_exactly(r: Stream, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = r.readinto(view[got:])
        if not n:
            break
        got += n
    return got
