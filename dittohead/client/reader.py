"""Reading a sync's new and changed source files: chunked and hashed, each byte read once.

Small files (one chunk at most) are read ahead, buffered, in batches on threads; larger ones are
streamed through the chunker, around the page cache where it pays (``directio``). A file that
changes while it is read is reported, never half-sent. Imported only when a sync has something
to read.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from dittohead import directio
from dittohead import format as fmt
from dittohead.chunking import Chunk, Chunker
from dittohead.client.scan import SourceFile
from dittohead.hashing import EMPTY_HASH, blake3

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
PREFETCH_THREADS = 4  # small files are read ahead, several at once: a cold disk serves them faster
PREFETCH_BATCH = 16  # files per task: one hand-over between threads per batch, not per file
PREFETCH_WINDOW = 64  # files read ahead at most (each at most CHUNK_MIN bytes: 16 MiB in all)

Slurped = tuple[bytes, bytes, os.stat_result, os.stat_result]  # data, BLAKE3 of it, stat before, after


def read_small(path: str, limit: int) -> tuple[bytes, os.stat_result, os.stat_result]:
    """A file's first ``limit`` + 1 bytes at most, with its stat before and after the read.

    Buffered: read around the page cache, small files took no less time (benchmarks/README.md,
    "Figures behind the code's choices"). One read(2) as a rule, of the size the first stat
    gives (asking for ``limit`` + 1 bytes of every file costs a large allocation each time); a
    file that grew meanwhile shows in the second stat.
    """
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        want = min(limit + 1, st.st_size)
        data = os.read(fd, max(want, 1))  # (one byte of a file empty at the stat: it may not be)
        while len(data) < want:  # a short read that was not the end
            more = os.read(fd, want - len(data))
            if not more:
                break
            data += more
        return data, st, os.fstat(fd)
    finally:
        os.close(fd)


def _slurp(paths: list[str]) -> list[Slurped | OSError]:
    """Small files' bytes (at most CHUNK_MIN + 1 of each), their hashes, and their stat before
    and after. Hashed here, on the reading thread: a small file's hash is its one chunk's id."""
    out: list[Slurped | OSError] = []
    for path in paths:
        try:
            data, st, st2 = read_small(path, fmt.CHUNK_MIN)
        except OSError as e:
            out.append(e)
            continue
        out.append((data, blake3(data).digest(), st, st2))
    return out


class _Slot:
    """One file's place in a batch being read ahead."""

    def __init__(self, batch: Future[list[Slurped | OSError]], i: int) -> None:
        self.batch, self.i = batch, i

    def result(self) -> Slurped:
        got = self.batch.result()[self.i]
        if isinstance(got, OSError):
            raise got
        return got


class SmallFiles:
    """Reads the small files among ``files`` ahead, in order, in batches on worker threads."""

    def __init__(self, files: list[SourceFile]) -> None:
        self.queue = deque(sf for sf in files if sf.size <= fmt.CHUNK_MIN)
        self.pending: dict[str, _Slot] = {}
        self.pool = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="dittohead-read") if self.queue else None
        self._fill()

    def _fill(self) -> None:
        while self.pool is not None and self.queue and len(self.pending) + PREFETCH_BATCH <= PREFETCH_WINDOW:
            batch = [self.queue.popleft() for _ in range(min(PREFETCH_BATCH, len(self.queue)))]
            fut = self.pool.submit(_slurp, [sf.os_path for sf in batch])
            for i, sf in enumerate(batch):
                self.pending[sf.path] = _Slot(fut, i)

    def take(self, sf: SourceFile) -> _Slot | None:
        slot = self.pending.pop(sf.path, None)
        self._fill()
        return slot

    def close(self) -> None:
        if self.pool is not None:
            for slot in self.pending.values():
                slot.batch.cancel()
            self.pool.shutdown(wait=True)
            self.pool = None


def _small_file(got: Slurped, on_chunk: Callable[[Chunk], None],
                advance: Callable[[int], None]) -> tuple[bytes, list[tuple[bytes, int]], os.stat_result] | None:
    data, digest, st, st2 = got
    if len(data) != st.st_size or (st2.st_size, st2.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        return None
    advance(len(data))
    if not data:
        return EMPTY_HASH, [], st
    on_chunk(Chunk(digest, data))  # a file of one chunk: the chunk's id is the file's hash
    return digest, [(digest, len(data))], st


def read(sf: SourceFile, chunker: Chunker, on_chunk: Callable[[Chunk], None],
         advance: Callable[[int], None], prefetched: _Slot | None = None,
          ) -> tuple[bytes, list[tuple[bytes, int]], os.stat_result] | None:
    """Chunk and hash one file; None if it changed while being read."""
    if prefetched is not None:
        got = prefetched.result()
        if len(got[0]) <= fmt.CHUNK_MIN:
            return _small_file(got, on_chunk, advance)
        # It grew past one chunk since the scan: read it as a large file.
    f = directio.Reader(directio.open_fd(sf.os_path, _OPEN_FLAGS))
    try:
        st = os.fstat(f.fd)
        # A file of one chunk (up to CHUNK_MIN bytes) has its chunk id as its file hash.
        h = blake3() if st.st_size > fmt.CHUNK_MIN else None
        chunks: list[tuple[bytes, int]] = []
        total = 0
        for c in chunker.cut_stream(f, st.st_size):
            if h is not None:
                h.update(c.data)
            chunks.append((c.id, c.length))
            total += c.length
            on_chunk(c)
            advance(c.length)
        st2 = os.fstat(f.fd)
    finally:
        f.close()
    if total != st.st_size or (st2.st_size, st2.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        return None
    if h is not None:
        fhash = h.digest()
    elif len(chunks) == 1:
        fhash = chunks[0][0]
    elif not chunks:
        fhash = EMPTY_HASH
    else:
        return None  # grew past CHUNK_MIN while being read: changing
    return fhash, chunks, st
