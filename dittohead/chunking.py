"""Content-defined chunking: FastCDC 2020 through pyfastcdc, with the format's fixed parameters.

Every client must cut the same bytes the same way, so the parameters come from
``dittohead.format`` only. A file no longer than CHUNK_MIN is one chunk (FastCDC never cuts below
its minimum), which lets small files skip the chunker and its buffer allocation entirely.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pyfastcdc import FastCDC


from dittohead import format as fmt
from dittohead.hashing import blake3


class Stream(Protocol):
    def read(self, n: int, /) -> bytes: ...
    def readinto(self, b: memoryview, /) -> int: ...


@dataclass(frozen=True)
class Chunk:
    """A cut piece of a file: its id (BLAKE3-256), its bytes, its length."""

    id: bytes
    data: bytes | memoryview  # from cut_stream: valid only until the next chunk is cut

    @property
    def length(self) -> int:
        return len(self.data)


_CHUNKREF = struct.Struct("<32sI")  # a chunk list's entry: id, length


def pack_chunk_list(chunks: Iterable[tuple[bytes, int]]) -> bytes:
    """A file's chunks, (id, length) in order, packed for a local SQLite table (the server's
    index, the client's cache): 36 bytes each. Not part of the store's format."""
    return b"".join(_CHUNKREF.pack(cid, n) for cid, n in chunks)


def unpack_chunk_list(blob: bytes) -> list[tuple[bytes, int]]:
    return [_CHUNKREF.unpack_from(blob, i) for i in range(0, len(blob), _CHUNKREF.size)]


def make_chunker() -> FastCDC:
    from pyfastcdc import FastCDC  # here: only files larger than one chunk need it

    return FastCDC(
        fmt.CHUNK_AVG,
        min_size=fmt.CHUNK_MIN,
        max_size=fmt.CHUNK_MAX,
        normalized_chunking=fmt.CHUNK_NORMALIZATION,  # type: ignore[arg-type]
        seed=fmt.CHUNK_SEED,
    )


@dataclass
class ChunkedFile:
    """The result of reading one file: its chunks' ids and lengths, its hash, its size."""

    chunks: list[tuple[bytes, int]]
    hash: bytes
    size: int


class Chunker:
    """Cuts files into chunks; reuse one instance for many files (not thread-safe)."""

    def __init__(self) -> None:
        self._made: FastCDC | None = None

    @property
    def _cdc(self) -> FastCDC:
        if self._made is None:
            self._made = make_chunker()
        return self._made

    def cut_bytes(self, data: bytes | bytearray | memoryview) -> Iterator[Chunk]:
        """Cut an in-memory buffer (used by tests and by small files)."""
        if len(data) == 0:
            return
        if len(data) <= fmt.CHUNK_MIN:
            b = bytes(data)
            yield Chunk(blake3(b).digest(), b)
            return
        for c in self._cdc.cut_buf(data):
            b = bytes(c.data)
            yield Chunk(blake3(b).digest(), b)

    def cut_stream(self, f: Stream, size_hint: int) -> Iterator[Chunk]:
        """Cut an open binary file; ``size_hint`` (from fstat) picks the small-file fast path.

        A yielded chunk's data is only valid until the next one is cut. The whole-file hash is the caller's to compute
        (see ``read_file``), since it needs the bytes in order anyway.
        """
        if size_hint <= fmt.CHUNK_MIN:
            data = _read_up_to(f, fmt.CHUNK_MIN + 1)
            if len(data) <= fmt.CHUNK_MIN:
                yield from self.cut_bytes(data)
                return
            # The file grew past the minimum between stat and read: cut it, bytes read first.
            f = _Prepended(data, f)
        for c in self._cdc.cut_stream(f):
            yield Chunk(blake3(c.data).digest(), c.data)


class _Prepended:
    """A stream that serves ``head`` and then the rest of ``f``."""

    def __init__(self, head: bytes, f: Stream) -> None:
        self.head, self.f = memoryview(head), f

    def readinto(self, b: memoryview) -> int:
        if not self.head:
            return self.f.readinto(b)
        n = min(len(b), len(self.head))
        b[:n] = self.head[:n]
        self.head = self.head[n:]
        return n

    def read(self, n: int) -> bytes:
        out = bytearray(n)
        return bytes(out[: self.readinto(memoryview(out))])


def _read_up_to(f: Stream, n: int) -> bytes:
    """Read ``n`` bytes or to the end: an unbuffered read (a network share) may return fewer."""
    parts, got = [], 0
    while got < n:
        b = f.read(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)
