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

What is here is what paid on the benchmark (same place): direct reads of large source files and
direct writes of packs, with one request in flight on a thread per file (the server's buffered
reads of packs go through the same ``Reader``). Two things measured no faster and went: direct
reads of small files (the client's reader reads them buffered) and more than one read in
flight per file (tried for fsck's packs).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from dittohead.hashing import blake3

ALIGN = 4096  # the largest logical block size in common use; a multiple of the smaller ones
BLOCK = 4 << 20  # bytes read per system call on the streaming paths
WRITE_BLOCK = 2 << 20  # bytes written per call: a sync has two packs' buffers at once, so half
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)


def aligned_buffer(size: int) -> mmap.mmap:
    """A zero-filled, page-aligned buffer of at least ``size`` bytes."""
    return mmap.mmap(-1, max(ALIGN, -(-size // ALIGN) * ALIGN))


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


def _hash_write(fd: int, view: memoryview, hasher: Any) -> None:
    if hasher is not None:
        hasher.update(view)
    _write_all(fd, view)


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
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()
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
    """Reads one open file sequentially in large blocks, the next block read ahead on a thread.

    Reads from the start of the file. Offers ``readinto`` (what ``pyfastcdc``'s ``cut_stream``
    prefers), ``next_block`` and ``read``. Owns ``fd`` and closes it. With ``hashed``, it also
    hashes the whole file as it reads it, on the reading thread (``digest``).

    One read in flight keeps the disk busy while the consumer chunks or hashes the block before.
    A read that comes back short (the end of the file as it was then, or a filesystem that moved
    less than asked) is followed by another from where it stopped, buffered if that is unaligned;
    reading ends at a read that returns nothing, so a file that grows is read on.
    """

    def __init__(self, fd: int, *, hashed: bool = False) -> None:
        self.fd = fd
        self._hasher = blake3() if hashed else None
        os.lseek(fd, 0, os.SEEK_SET)
        self._bufs = [_take_block(BLOCK), _take_block(BLOCK)]
        self._views = [memoryview(b) for b in self._bufs]
        self._cur = 0  # the buffer being handed out; the other is being read into
        self._have = 0  # bytes in the current buffer
        self._pos = 0  # bytes of it already handed out
        self._next: Future[int] | None = None  # the read in flight
        self._issue()

    def _issue(self) -> None:
        self._next = _io_pool().submit(_read_hash, self.fd, self._views[1 - self._cur], self._hasher)

    def _advance(self) -> bool:
        """The block read ahead made current, the next read put in flight; False at the end."""
        if self._next is None:
            return False
        n = self._next.result()
        self._next = None
        self._cur, self._have, self._pos = 1 - self._cur, n, 0
        if n == 0:
            return False
        if n % ALIGN:
            undirect(self.fd)  # the next read starts unaligned
        self._issue()
        return True

    def _settle(self) -> None:
        """Wait for the read in flight, if any (its result void)."""
        fut, self._next = self._next, None
        if fut is not None:
            with contextlib.suppress(Exception):
                fut.result()

    def _check_open(self) -> None:
        if self.fd < 0:
            raise ValueError("I/O on a closed Reader")

    def readinto(self, b: memoryview | bytearray) -> int:
        self._check_open()
        while self._pos >= self._have:
            if not self._advance():
                return 0
        n = min(len(b), self._have - self._pos)
        b[:n] = self._views[self._cur][self._pos : self._pos + n]
        self._pos += n
        return n

    def next_block(self) -> memoryview:
        """The next unread part of the file, as read: valid until the next call; empty at the end.
        (Hashing straight from the read buffers saves ``readinto``'s copy.)"""
        self._check_open()
        while self._pos >= self._have:
            if not self._advance():
                return memoryview(b"")
        view = self._views[self._cur][self._pos : self._have]
        self._pos = self._have
        return view

    def digest(self) -> bytes:
        """BLAKE3 of the whole file (with ``hashed``): reads on to its end, handing nothing out."""
        if self._hasher is None:
            raise ValueError("this Reader does not hash")
        self._check_open()
        while self._advance():
            pass
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
