"""What the mount answers: the view (dittohead/view.py) as files and folders, read-only.

``MountOps`` takes paths as the kernel gives them (``/STUDY/current/a/b.txt``, or without the
study's name for a mount of one study) and returns attributes (``Attr``), listings and bytes,
raising ``OSError`` with an errno where FUSE wants one. It imports no FUSE: the tests call it directly,
and ``dittohead.fuse.mount`` hands it to mfusepy.

- **Who sees what**: each study's folders and files carry the owner, group and modes its
  settings give (``StudyView.access``); the mount runs with ``default_permissions``, so the
  kernel refuses everyone else. The mount's top folder lists the studies (0755).
- **Cost**: a lookup or a listing costs index queries (the view), never a query for the
  study's last submission: that is looked up at most every ``REFRESH`` seconds, so a new
  ingest shows within that, plus the kernel's own cache of attributes (``mount.ATTR_TIMEOUT``).
  A listing gives every entry's attributes with its name (the kernel's readdirplus: ``find``
  and ``du`` need no look-up per entry), and its nodes are kept (``NODE_CACHE`` of them, least
  recently used out, while the study's last submission is the one they were read at) for the
  look-ups that come later. A folder too long for one of the kernel's readdir calls is listed
  on from where the last call stopped (``readdir_from``; ``LISTINGS`` listings kept).
- **Reads**: an open file keeps the version it opened, even after a newer one is ingested.
  Every chunk is verified against its id before a byte of it is returned; a mismatch is EIO
  and one log line, never wrong bytes. One cache of verified chunks serves every open file
  (``CHUNK_CACHE`` bytes); a file read sequentially has the chunks of its next ``READ_AHEAD``
  bytes read and verified ahead, on ``READERS`` threads.
- **Writes**: every call that would change anything fails with EROFS (the mount is ``ro`` too,
  so the kernel refuses most of them before they get here).
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

from dittohead.display import escape
from dittohead.errors import DittoheadError, IntegrityError, NotFound
from dittohead.store.repo import Store
from dittohead.view import (
    Access,
    ChunkCache,
    Dir,
    File,
    FileReader,
    LogFile,
    Node,
    StoreView,
    StudyView,
)

log = logging.getLogger("dittohead.mount")

NODE_CACHE = 32_768  # nodes kept from listings and look-ups (about 2 kB each, with their keys)
LISTINGS = 64  # listings kept for readdir calls that go on where one stopped ...
LISTED_ENTRIES = 1 << 17  # ... holding this many entries in all (the newest is always kept)
REFRESH = 0.5  # seconds between looks at a study's last submission
CHUNK_CACHE = 64 << 20  # bytes of verified chunks, for every open file together
READ_AHEAD = 16 << 20  # bytes read and verified ahead of a sequential reader (benchmarks/README.md)
READERS = 8  # threads reading ahead, for every open file together
BLOCK_SIZE = 128 * 1024  # st_blksize: what a reader is told to read at a time
TOP_MODE = 0o755
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_UNREAD = Access(0, 0, 0o755, 0o444)  # a study's access before its first look


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class Attr(NamedTuple):
    """What ``stat`` shows of a path of the mount (times in ns; the access time is the mtime)."""

    st_mode: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_size: int
    st_mtime: int
    st_ctime: int

    @property
    def st_blocks(self) -> int:
        return (self.st_size + 511) // 512

    @property
    def st_atime(self) -> int:
        return self.st_mtime


_Listing = list[tuple[str, Attr]]


@dataclass
class _Study:
    view: StudyView
    seq: int = -1  # the last submission the kept nodes were read at
    checked: float = 0.0  # when that was last looked up (time.monotonic)
    access: Access = _UNREAD  # its owner, group and modes, as then


@dataclass
class _Handle:
    node: Node
    reader: FileReader | None  # None for the log
    changes: bool  # the path may show other bytes later (current/, log.jsonl): keep no cache of it
    next_offset: int = 0  # where a sequential reader reads next
    ahead: int = -1  # the last chunk index read ahead


class MountOps:
    """The mount's answers for a store (every study, one folder each) or for one study (its
    folders at the top). Safe to call from many threads at once."""

    def __init__(self, store: Store, study: str | None = None) -> None:
        self.store = store
        self.only = study
        self._studies: dict[str, _Study] = {}
        self._nodes: OrderedDict[str, tuple[int, Node]] = OrderedDict()  # path -> (seq, node)
        self._listings: OrderedDict[int, _Listing] = OrderedDict()  # number -> listing (readdir_from)
        self._listed = 0  # entries in them
        self._listing_number = 0
        self._lock = threading.Lock()
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self.cache = SharedChunks(CHUNK_CACHE)
        self._ahead = ThreadPoolExecutor(READERS, thread_name_prefix="dittohead-readahead")
        self._top_times = time.time_ns()
        self._uid, self._gid = _owner(store)
        if study is not None:
            self._study(study)  # NotFound now, not at the first look

    def close(self) -> None:
        """Stop reading ahead, and wait for the reads in flight: the store may be closed next,
        and a connection closed under a thread that is using it crashes SQLite."""
        self._ahead.shutdown(wait=True, cancel_futures=True)

    # -- paths

    def _split(self, path: str) -> tuple[str | None, str]:
        """(study, view path) for a mount path; (None, "") for the top of a mount of every study."""
        parts = [p for p in path.split("/") if p]
        if self.only is not None:
            return self.only, "/".join(parts)
        if not parts:
            return None, ""
        return parts[0], "/".join(parts[1:])

    def _study(self, name: str) -> _Study:
        s = self._studies.get(name)
        if s is None:
            if self.only is None and name not in self._study_names():
                raise _err(errno.ENOENT)
            try:
                view = StudyView(self.store, name)
            except NotFound:
                raise _err(errno.ENOENT) from None
            with self._lock:
                s = self._studies.setdefault(name, _Study(view))
        return s

    def _study_names(self) -> list[str]:
        return StoreView(self.store).studies()

    def _current_seq(self, s: _Study) -> int:
        """The study's last submission (and its owner, group and modes), looked up at most every
        REFRESH seconds."""
        now = time.monotonic()
        if now - s.checked >= REFRESH:
            self.store.use_real_index()  # a mount started before the store's first ingest
            s.seq, s.access, s.checked = s.view.refresh(), s.view.access, now
        return s.seq

    def _node(self, path: str) -> tuple[_Study, Node]:
        name, vpath = self._split(path)
        if name is None:
            raise _err(errno.ENOENT)
        s = self._study(name)
        seq = self._current_seq(s)
        key = f"{name}\0{vpath}"
        with self._lock:
            kept = self._nodes.get(key)
            if kept is not None and kept[0] == seq:
                self._nodes.move_to_end(key)
                return s, kept[1]
        try:
            node = s.view.lookup(vpath, refresh=False)  # _current_seq refreshed it
        except NotFound:
            raise _err(errno.ENOENT) from None
        except DittoheadError as e:
            log.error("%s: %s", escape(path), e)
            raise _err(errno.EIO) from None
        self._keep(key, seq, node)
        return s, node

    def _keep(self, key: str, seq: int, node: Node) -> None:
        with self._lock:
            self._nodes[key] = (seq, node)
            self._nodes.move_to_end(key)
            while len(self._nodes) > NODE_CACHE:
                self._nodes.popitem(last=False)

    # -- attributes

    def _top_stat(self) -> Attr:
        t = self._top_times
        return Attr(stat.S_IFDIR | TOP_MODE, 2, self._uid, self._gid, 0, t, t)

    def _stat(self, s: _Study, node: Node) -> Attr:
        a = s.access
        if isinstance(node, Dir):
            t = node.mtime_ns or self._top_times  # a study with no submission yet: the mount's start
            return Attr(stat.S_IFDIR | a.dir_mode, 2, a.uid, a.gid, 0, t, t)
        size, mtime, ctime = _file_times(node)
        return Attr(stat.S_IFREG | a.file_mode, 1, a.uid, a.gid, size, mtime, ctime)

    def getattr(self, path: str, fh: int | None = None) -> Attr:
        name, _ = self._split(path)
        if fh is not None:
            h = self._handles.get(fh)
            if h is not None and name is not None:
                return self._stat(self._study(name), h.node)
        if name is None:
            return self._top_stat()
        s, node = self._node(path)
        return self._stat(s, node)

    def readdir(self, path: str) -> _Listing:
        """The folder's entries, "." and ".." first, with their attributes."""
        return [(n, a) for n, a, _ in self.readdir_from(path, 0)]

    def readdir_from(self, path: str, offset: int) -> Iterator[tuple[str, Attr, int]]:
        """The folder's entries from ``offset`` on, each with the offset the next call gives to
        go on after it: 0 lists the folder afresh, and a later offset goes on in that same
        listing (kept, ``LISTINGS``), so one reading of a folder never meets an entry twice, even
        when an ingest adds names meanwhile. An offset is the listing's number (high 32 bits)
        and the entry's place in it; a listing no longer kept is made again."""
        number, start = divmod(offset, 1 << 32)
        with self._lock:
            listing = self._listings.get(number) if offset else None
        if listing is None:
            listing = self._list(path)
            number = self._keep_listing(listing)
        for i in range(start, len(listing)):
            name, attr = listing[i]
            yield name, attr, (number << 32) | (i + 1)

    def _keep_listing(self, listing: _Listing) -> int:
        with self._lock:
            self._listing_number = self._listing_number % 0x7FFF_FFFF + 1  # offsets stay positive
            number = self._listing_number
            self._listings[number] = listing
            self._listed += len(listing)
            while len(self._listings) > 1 and (len(self._listings) > LISTINGS or self._listed > LISTED_ENTRIES):
                _, old = self._listings.popitem(last=False)
                self._listed -= len(old)
        return number

    def _list(self, path: str) -> _Listing:
        name, vpath = self._split(path)
        if name is None:
            top = self._top_stat()
            out = [(".", top), ("..", top)]
            for n in self._study_names():
                try:
                    out.append((n, self.getattr(f"/{n}")))
                except OSError:
                    continue
            return out
        s, node = self._node(path)
        if not isinstance(node, Dir):
            raise _err(errno.ENOTDIR)
        try:
            listed = s.view.children(node, refresh=False)
        except NotFound:
            raise _err(errno.ENOENT) from None
        seq = s.seq
        here = self._stat(s, node)
        out = [(".", here), ("..", here)]
        prefix = f"{name}\0{vpath}/" if vpath else f"{name}\0"
        out += [(child, self._stat(s, cnode)) for child, cnode in listed]
        with self._lock:  # kept for the look-ups that come after the kernel's cache of them
            self._nodes.update((prefix + child, (seq, cnode)) for child, cnode in listed)
            while len(self._nodes) > NODE_CACHE:
                self._nodes.popitem(last=False)
        return out

    def statfs(self, path: str) -> dict:
        st = os.statvfs(self.store.root.path)
        return {"f_bsize": st.f_bsize, "f_frsize": st.f_frsize, "f_blocks": st.f_blocks, "f_bfree": 0,
                "f_bavail": 0, "f_files": st.f_files, "f_ffree": 0, "f_favail": 0, "f_namemax": 1024}

    def access(self, path: str, amode: int) -> int:
        if amode & os.W_OK:
            raise _err(errno.EROFS)
        return 0

    # -- reading

    def open(self, path: str, flags: int) -> int:
        if flags & _WRITE_FLAGS:
            raise _err(errno.EROFS)
        _, node = self._node(path)
        if isinstance(node, Dir):
            raise _err(errno.EISDIR)
        reader = FileReader(self.store, node.version, self.cache) if isinstance(node, File) else None
        _, vpath = self._split(path)
        changes = reader is None or vpath.split("/", 1)[0] == "current"
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = _Handle(node, reader, changes)
        return fh

    def changes(self, fh: int) -> bool:
        """Whether the open file ``fh``'s path may show other bytes later (a new version in
        current/, new lines in the log): the kernel must then keep no cache of it, or a file
        kept open would read a newer version's bytes (``mount`` opens it with direct_io). A
        version's file in versions/ or submissions/ never changes: the kernel may keep it."""
        h = self._handles.get(fh)
        return h is None or h.changes

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return b"".join(data[start:end] for data, start, end in self.read_pieces(path, size, offset, fh))

    def read_pieces(self, path: str, size: int, offset: int, fh: int) -> list[tuple[bytes, int, int]]:
        """``read``'s bytes as (bytes, start, end) pieces, in order, not copied out of the
        verified chunks they are in (the mount copies them once, into the kernel's buffer)."""
        h = self._handles.get(fh)
        if h is None:
            raise _err(errno.EBADF)
        try:
            if h.reader is None:
                name, _ = self._split(path)
                assert name is not None and isinstance(h.node, LogFile)
                log_bytes = self._study(name).view.read_log(h.node, offset, size)
                return [(log_bytes, 0, len(log_bytes))]
            pieces = h.reader.pieces(offset, size)
        except IntegrityError as e:
            log.error("%s: %s", escape(path), e)
            raise _err(errno.EIO) from None
        except OSError as e:
            log.error("%s: cannot read the store: %s", escape(path), e.strerror or e)
            raise _err(errno.EIO) from None
        end = offset + sum(e - s for _, s, e in pieces)
        if offset == h.next_offset:  # sequential: read the next chunks ahead
            self._read_ahead(h, end)
        h.next_offset = end
        return pieces

    def _read_ahead(self, h: _Handle, end: int) -> None:
        """Have the chunks of the READ_AHEAD bytes after ``end`` read and verified, on the
        read-ahead threads, each once."""
        r = h.reader
        if r is None or not r.chunks:
            return
        i = bisect.bisect_right(r.offsets, max(0, end - 1))  # the chunk after the one read last
        j = max(i, h.ahead + 1)
        while j < len(r.chunks) and r.offsets[j] < end + READ_AHEAD:
            h.ahead = j
            self._ahead.submit(_warm, self.cache, self.store, r.chunks[j][0])
            j += 1

    def release(self, path: str, fh: int) -> int:
        with self._lock:
            self._handles.pop(fh, None)
        return 0

    # -- nothing changes

    def _refuse(self, *args: object) -> int:
        raise _err(errno.EROFS)

    chmod = chown = create = link = mkdir = mknod = rename = rmdir = symlink = _refuse
    truncate = unlink = utimens = write = setxattr = removexattr = _refuse


class SharedChunks(ChunkCache):
    """The mount's chunk cache: a chunk being read (by a reader, or ahead of one) is read once;
    whoever else asks for it meanwhile waits for that read instead of reading it again."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self._reading: dict[bytes, threading.Event] = {}
        self._reading_lock = threading.Lock()

    def get(self, store: Store, cid: bytes) -> bytes:
        while True:
            with self._reading_lock:
                busy = self._reading.get(cid)
                if busy is None:
                    mine = self._reading[cid] = threading.Event()
                    break
            busy.wait()
            with self._lock:
                data = self._items.get(cid)
            if data is not None:
                return data
            # the read failed, or the chunk left the cache already: read it (again) ourselves
        try:
            return super().get(store, cid)
        finally:
            with self._reading_lock:
                del self._reading[cid]
            mine.set()


def _warm(cache: ChunkCache, store: Store, cid: bytes) -> None:
    try:
        cache.get(store, cid)
    except (DittoheadError, OSError):
        pass  # the reader that needs it meets the error itself, and says it


def _owner(store: Store) -> tuple[int, int]:
    st = os.stat(store.root.store)
    return st.st_uid, st.st_gid


def _file_times(node: File | LogFile) -> tuple[int, int, int]:
    """(size, mtime, ctime) in ns of a file node: a version's size and the time its source file
    had (else its ingest time), changed at its ingest; the log's size and last ingest."""
    if isinstance(node, File):
        v = node.version
        return v.size, (v.mtime_ns if v.mtime_ns > 0 else v.ingested_ns), v.ingested_ns
    return node.size, node.mtime_ns, node.mtime_ns
