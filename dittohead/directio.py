"""Bulk file I/O around the page cache: O_DIRECT where the platform and the filesystem allow it.

dittohead moves each byte of a study once: from a source file into a pack, and on the server
from an uploaded pack into a store pack. Through the page cache, that costs the kernel more CPU
than chunking and hashing cost dittohead (the figures: benchmarks/README.md, "Figures behind the
code's choices"). Bulk data read once has nothing to gain from the cache, and a collector's
machine keeps its cache for the programs it runs.

The server reads its packs (ingest's uploads, fsck's store) the other way: through the cache,
told that the read is sequential (``advise``), and dropping them after. There the kernel's
read-ahead keeps more of the disk busy than direct reads, a pack at a time, do: faster on the
benchmark store, for some kernel time the server can spare (same place).

O_DIRECT is used only on a local disk's filesystem (``local_disk``: ext2/3/4, XFS, Btrfs, F2FS,
ZFS), never on a network or FUSE one: on an NFS or SMB share a direct write is a synchronous
round trip to the server, and a FUSE filesystem hands every direct request to a process.
Everything here falls back to ordinary buffered I/O, silently and per file: where O_DIRECT does
not exist (Windows, macOS), on any other filesystem, where a filesystem refuses it, and for the
unaligned tail of a file. Direct I/O needs page-aligned buffers and
sizes: the buffers here are anonymous ``mmap`` regions, which are.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from dittohead.hashing import blake3

ALIGN = 4096  # the largest logical block size in common use; a multiple of the smaller ones
BLOCK = 4 << 20  # bytes read per system call on the streaming paths
WRITE_BLOCK = 2 << 20  # bytes written per call: a sync has two packs' buffers at once, so half
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)


def round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def aligned_buffer(size: int) -> mmap.mmap:
    """A zero-filled, page-aligned buffer of at least ``size`` bytes."""
    return mmap.mmap(-1, max(ALIGN, round_up(size)))


# statfs(2) f_type of the filesystems of local disks, where direct I/O is worth it.
LOCAL_DISK_FILESYSTEMS = frozenset({
    0xEF53,  # ext2, ext3, ext4
    0x58465342,  # XFS
    0x9123683E,  # Btrfs
    0xF2F52010,  # F2FS
    0x2FC12FC1,  # ZFS
})
_fs_types: dict[int, int | None] = {}  # st_dev -> f_type (None: unknown)
_folders: dict[str, bool] = {}  # folder -> local_disk, for the files of a folder opened one by one


def _fs_type(path: str) -> int | None:
    """statfs(2)'s f_type for the filesystem of ``path`` (Linux; None elsewhere or on failure)."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        buf = ctypes.create_string_buffer(256)  # struct statfs, f_type first (a long)
        if libc.statfs(os.fsencode(path), buf) != 0:
            return None
        return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF
    except (OSError, AttributeError):
        return None


def local_disk(path: str) -> bool:
    """Whether the file ``path`` (or a file about to be made there) is on a local disk's
    filesystem (``LOCAL_DISK_FILESYSTEMS``): that of its folder, looked up once per folder."""
    folder = os.path.dirname(path) or "."
    known = _folders.get(folder)
    if known is None:
        try:
            dev = os.stat(folder).st_dev
        except OSError:
            return False
        if dev not in _fs_types:
            _fs_types[dev] = _fs_type(folder)
        known = _folders[folder] = _fs_types[dev] in LOCAL_DISK_FILESYSTEMS
        if len(_folders) > 4096:  # a scan of many folders: keep the memory bounded
            _folders.clear()
    return known


def open_fd(path: str, flags: int, mode: int = 0o777, *, direct: bool = True) -> int:
    """``os.open``, with O_DIRECT added when ``direct``, on a local disk's filesystem
    (``local_disk``), where the filesystem accepts it."""
    if direct and _O_DIRECT and local_disk(path):
        try:
            return os.open(path, flags | _O_DIRECT, mode)
        except OSError as e:
            if e.errno not in _REFUSED:
                raise
    return os.open(path, flags, mode)


def is_direct(fd: int) -> bool:
    if not _O_DIRECT:
        return False
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & _O_DIRECT)


def undirect(fd: int) -> None:
    """Turn O_DIRECT off for an open file (Linux allows this through F_SETFL)."""
    if _O_DIRECT:
        import fcntl

        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if flags & _O_DIRECT:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~_O_DIRECT)


def advise(fd: int, *advice: str) -> None:
    """posix_fadvise(2) for the whole file, by name ("SEQUENTIAL", "DONTNEED"), where the
    platform has it (not Windows, not macOS). Advice only: a call the kernel refuses is not an
    error; a name posix_fadvise does not know is (a typo here would pass unseen otherwise)."""
    if hasattr(os, "posix_fadvise"):
        for name in advice:
            value = getattr(os, "POSIX_FADV_" + name)
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, value)


def _readinto(fd: int, view: memoryview) -> int:
    """One read(2) into ``view``; a filesystem that refuses the direct read gets a buffered one."""
    while True:
        try:
            return os.readv(fd, [view])  # (Python retries a call a signal interrupts itself)
        except OSError as e:
            if e.errno not in _REFUSED or not is_direct(fd):
                raise
            undirect(fd)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        try:
            n = os.write(fd, view)
        except OSError as e:
            if e.errno not in _REFUSED or not is_direct(fd):
                raise
            undirect(fd)
            continue
        view = view[n:]


if not hasattr(os, "readv"):  # Windows: no readv, and no O_DIRECT either
    def _readinto(fd: int, view: memoryview) -> int:  # type: ignore[misc]
        with open(fd, "rb", buffering=0, closefd=False) as f:
            return f.readinto(view) or 0


def _read_hash(fd: int, view: memoryview, hasher: Any) -> int:
    n = _readinto(fd, view)
    if hasher is not None and n > 0:
        hasher.update(view[:n])
    return n


def _pread(fd: int, view: memoryview, offset: int) -> int:
    """One pread(2) into ``view`` at ``offset``; a refused direct read is retried buffered.

    Several run at once on one fd (a Reader's ``depth``): a read refused while the fd was
    direct may find it already made buffered by another thread's refusal, so a refusal earns
    one retry whether or not the fd is still direct when it is looked at.
    """
    retried = False
    while True:
        try:
            return os.preadv(fd, [view], offset)
        except OSError as e:
            if e.errno not in _REFUSED or retried:
                raise
            if is_direct(fd):
                undirect(fd)
            retried = True


def _hash_write(fd: int, view: memoryview, hasher: Any) -> None:
    if hasher is not None:
        hasher.update(view)
    _write_all(fd, view)


_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _io_pool() -> ThreadPoolExecutor:
    """The threads that read ahead and write behind (each Reader or Writer keeps at most one
    request in flight, so its reads or writes stay in order)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(4, thread_name_prefix="dittohead-io")
        return _pool


_spare: dict[int, list[mmap.mmap]] = {}  # buffers given back, by size, kept for the next Reader or Writer
_SPARE_MAX = 2  # of each size


def _after_fork_in_child() -> None:
    """A forked child (fsck's hashing workers) has none of its parent's threads: it must not
    inherit the parent's pool object (work queued there would never run) nor a lock that one of
    those threads held at the fork."""
    global _pool, _pool_lock, _local
    _pool, _pool_lock, _local = None, threading.Lock(), threading.local()
    _spare.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _take_block(size: int) -> mmap.mmap:
    with _pool_lock:
        spare = _spare.get(size)
        if spare:
            return spare.pop()
    return aligned_buffer(size)


def _give_back(buf: mmap.mmap) -> None:
    with _pool_lock:
        spare = _spare.setdefault(len(buf), [])
        if len(spare) < _SPARE_MAX:
            spare.append(buf)
            return
    # A slice of it may outlive its Reader or Writer in an exception's traceback (an error
    # raised on an I/O thread): then the mapping goes when that does, not here.
    with contextlib.suppress(BufferError):
        buf.close()


def read_small(path: str, flags: int, limit: int) -> tuple[bytes, os.stat_result, os.stat_result]:
    """A file's first ``limit`` + 1 bytes at most, with its stat before and after the read.

    Into a per-thread aligned buffer; callers read many small files at once on several
    threads (a cold disk serves a queue of requests faster than one at a time).
    """
    want = limit + 1
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < want:
        buf = _local.buf = aligned_buffer(want)
    fd = open_fd(path, flags)
    try:
        st = os.fstat(fd)
        end = min(want, st.st_size)  # read on only if a read comes back short of this
        with memoryview(buf) as view:
            got = 0
            while got < want:
                n = _readinto(fd, view[got : round_up(want)])
                if n <= 0:
                    break
                got += n
                if got >= end:
                    break
                if got % ALIGN:
                    undirect(fd)  # a short read that was not the end: go on from an unaligned offset
            data = bytes(view[: min(got, want)])
        st2 = os.fstat(fd)
        return data, st, st2
    finally:
        os.close(fd)


def _release(fd: int, views: list[memoryview], bufs: list[mmap.mmap]) -> int:
    """A Reader's or Writer's end: its buffers given back (the lists emptied), its file closed.

    A view still exported (a slice of it alive in an exception's traceback: Ctrl-C in the
    middle of a read) cannot be released; then none of the buffers is given back for reuse,
    and each goes when the last reference to it does (raising BufferError here would hide the
    exception being handled)."""
    in_use = False
    for v in views:
        try:
            v.release()
        except BufferError:
            in_use = True
    for b in bufs if not in_use else ():
        _give_back(b)
    views.clear()
    bufs.clear()
    if fd >= 0:
        os.close(fd)
    return -1


class Reader:
    """Reads one open file sequentially in large blocks, ``depth`` blocks read ahead on threads.

    Reads from the start of the file. Offers ``readinto`` (what ``pyfastcdc``'s ``cut_stream``
    prefers), ``next_block`` and ``read``. Owns ``fd`` and closes it. With ``hashed``, it also
    hashes the whole file as it reads it, on the reading thread (``digest``).

    One read in flight (``depth`` 1, the default) keeps a disk busy for one reader whose consumer
    is quick. A disk that serves a queue faster than one request at a time (fsck's hashing
    workers read the store's packs, and there are only two of them) wants more: with ``depth``
    above 1 the reads go at their offsets (``pread``), ``depth`` at once. A read that comes back
    short (the end, as it was when read) voids those beyond it, and reading goes on from where it
    stopped, as with one read in flight. Platforms without ``preadv`` (Windows) read one ahead.
    """

    def __init__(self, fd: int, *, hashed: bool = False, depth: int = 1) -> None:
        if depth < 1:
            raise ValueError("a Reader reads at least one block ahead")
        if hashed and depth > 1:
            raise ValueError("a hashed Reader hashes in order: one read in flight")
        self.fd = fd
        self._hasher = blake3() if hashed else None
        self._depth = depth if hasattr(os, "preadv") else 1
        os.lseek(fd, 0, os.SEEK_SET)
        self._bufs = [_take_block(BLOCK) for _ in range(self._depth + 1)]
        self._views = [memoryview(b) for b in self._bufs]
        self._cur = 0
        self._have = 0  # bytes in the current buffer
        self._pos = 0  # bytes of it already handed out
        self._offset = 0  # the file offset the next read starts at
        self._inflight: deque[tuple[Future[int], int, int]] = deque()  # (read, buffer, offset), in order
        self._issue(range(1, self._depth + 1))

    def _issue(self, bufs: Iterable[int]) -> None:
        for i in bufs:
            view = self._views[i]
            if self._depth == 1:  # the file's own offset, which is self._offset
                fut = _io_pool().submit(_read_hash, self.fd, view, self._hasher)
            else:
                fut = _io_pool().submit(_pread, self.fd, view, self._offset)
            self._inflight.append((fut, i, self._offset))
            self._offset += len(view)

    def _advance(self) -> None:
        fut, i, offset = self._inflight.popleft()
        n = fut.result()
        free, self._cur = self._cur, i
        self._have, self._pos = n, 0
        if n == len(self._views[i]):
            self._issue([free])
            return
        # The end, or a short read: the reads beyond it are void; go on from where it stopped.
        idle = [free, *self._settle()]
        self._offset = offset + n
        if n == 0:
            return  # the end
        if n % ALIGN:
            undirect(self.fd)  # the next read starts unaligned
        self._issue(idle)

    def _settle(self) -> list[int]:
        """Wait for the reads in flight (their results void); their buffers, free again."""
        bufs = []
        while self._inflight:
            fut, i, _ = self._inflight.popleft()
            with contextlib.suppress(Exception):
                fut.result()
            bufs.append(i)
        return bufs

    def _check_open(self) -> None:
        if self.fd < 0:
            raise ValueError("I/O on a closed Reader")

    def readinto(self, b: memoryview | bytearray) -> int:
        self._check_open()
        while self._pos >= self._have:
            if not self._inflight:
                return 0
            self._advance()
        n = min(len(b), self._have - self._pos)
        b[:n] = self._views[self._cur][self._pos : self._pos + n]
        self._pos += n
        return n

    def next_block(self) -> memoryview:
        """The next unread part of the file, as read: valid until the next call; empty at the end.
        (Hashing straight from the read buffers saves ``readinto``'s copy.)"""
        self._check_open()
        while self._pos >= self._have:
            if not self._inflight:
                return memoryview(b"")
            self._advance()
        view = self._views[self._cur][self._pos : self._have]
        self._pos = self._have
        return view

    def digest(self) -> bytes:
        """BLAKE3 of the whole file (with ``hashed``): reads on to its end, handing nothing out."""
        if self._hasher is None:
            raise ValueError("this Reader does not hash")
        self._check_open()
        while self._inflight:
            self._advance()
        self._pos = self._have
        return self._hasher.digest()

    def read(self, n: int) -> bytes:
        out = bytearray(n)
        got = 0
        while got < n and (k := self.readinto(memoryview(out)[got:])):
            got += k
        return bytes(out[:got])

    def close(self) -> None:
        self._settle()
        self.fd = _release(self.fd, self._views, self._bufs)


class Writer:
    """Writes a new file sequentially through two aligned buffers, one written out on a thread.

    ``write`` copies into the filling buffer; a full buffer goes to the disk (direct where the
    filesystem allows) while the other fills. ``finish`` writes the rest (the unaligned tail
    buffered), fsyncs and closes. Owns ``fd``.

    With ``hashed``, it also hashes what it writes (BLAKE3, ``digest``), on the writing thread
    and a block at a time: hashing many small writes one by one on the caller's thread costs
    more in handing the interpreter lock around than in hashing.
    """

    def __init__(self, fd: int, *, hashed: bool = False) -> None:
        self.fd = fd
        self._hasher = blake3() if hashed else None
        self._bufs = [_take_block(WRITE_BLOCK), _take_block(WRITE_BLOCK)]
        self._views = [memoryview(b) for b in self._bufs]
        self._busy: Future[None] | None = None  # the other buffer's write, if in flight
        self._cur = 0
        self._fill = 0
        self.size = 0

    def _check_open(self) -> None:
        if self.fd < 0:
            raise ValueError("I/O on a closed Writer")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._check_open()
        src = memoryview(data).cast("B")
        total = len(src)
        while src:
            view = self._views[self._cur]
            n = min(len(src), len(view) - self._fill)
            view[self._fill : self._fill + n] = src[:n]
            self._fill += n
            src = src[n:]
            if self._fill == len(view):
                self._settle()
                self._busy = _io_pool().submit(_hash_write, self.fd, view, self._hasher)
                self._cur, self._fill = 1 - self._cur, 0
        self.size += total
        return total

    def _settle(self) -> None:
        fut, self._busy = self._busy, None
        if fut is not None:
            fut.result()

    def digest(self) -> bytes:
        """BLAKE3 of everything written so far (with ``hashed``)."""
        if self._hasher is None:
            raise ValueError("this Writer does not hash")
        self._check_open()
        self._settle()
        h = self._hasher.copy()
        h.update(self._views[self._cur][: self._fill])
        return h.digest()

    def finish(self) -> None:
        """Write what is buffered, fsync, close: the file is complete and durable."""
        self._check_open()
        try:
            self._settle()
            aligned = self._fill - self._fill % ALIGN
            view = self._views[self._cur]
            if aligned:
                _write_all(self.fd, view[:aligned])
            if self._fill > aligned:
                undirect(self.fd)
                _write_all(self.fd, view[aligned : self._fill])
            os.fsync(self.fd)
        finally:
            self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._settle()
        self.fd = _release(self.fd, self._views, self._bufs)
