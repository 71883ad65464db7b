"""The read-only view: one layout of a study's history, for the FUSE mount and the export.

    current/PATH                              the latest version of every path ever received
    versions/PATH/NNNN_STAMP_SITE.EXT         every version; NNNN from 0001, STAMP the server's
                                              ingest time (UTC), SITE as the client named it
    submissions/STAMP_SITE_SEQ/PATH           each submission's files, as received

The view is answered from the index (path -> versions; invariant 9), never by replaying
manifests and never by building the study's tree: opening one costs nothing, ``lookup`` of a
path costs a few indexed queries (one per area, plus the hashing of its names), and listing a
folder (``children``, ``list``) costs one query whose rows are what it lists (the index's tree
table: see dittohead/store/index.py). Every call reads the index as it is then, so a view kept
open (by the mount) shows each new ingest as soon as it is in the index; ``last_seq`` says which
submission it has seen last, and folders' times follow it. Nothing here recurses on a path's
depth, and ``walk`` keeps one folder's listing per level, not the study.

The study's top folder also holds ``log.jsonl`` (``LOG_NAME``): the study's log, one JSON object
per ingested submission in seq order (``submission_record``, what ``dittohead log --json`` gives),
so that a study runner, who may not read the store, reads from the mount what ``log`` tells an
admin. It is rendered once per view and then only appended to (``StudyView.read_log``).

Who may read the view is the study's setting (``study add/set --readers GROUP``):
``StudyView.access`` gives the owner, group and modes that the mount shows and the export writes.

Where one name is a file in one submission and a folder in another (``a`` then ``a/b``), the
folder keeps the name and the file is shown as ``a~file`` (in ``versions/PATH/``, a version file
whose name is that of a folder there is shown so too), unless the folder also holds a path of
that very name: that one keeps it, and the file is shown only in ``versions/``. Reading goes
through ``FileReader``: chunk offsets precomputed, the chunk found by bisection, every chunk
verified on read. This module imports no FUSE and no transport.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

from dittohead.chunking import unpack_chunk_list
from dittohead.display import escape
from dittohead.errors import NotFound, StoreError, UsageError
from dittohead.paths import from_bytes, to_bytes
from dittohead.store.index import (
    FILE,
    FOLDER,
    TOP_KEY,
    FolderChain,
    Submission,
    Version,
    folder_key,
)
from dittohead.store.layout import group_id
from dittohead.store.repo import Store
from dittohead.units import utc_iso, utc_stamp

CONFLICT_SUFFIX = "~file"
_SUFFIX = CONFLICT_SUFFIX.encode()
_SITE_BAD = re.compile(r"[^A-Za-z0-9._-]+")
AREAS = ("current", "submissions", "versions")  # the study's top folder's folders, sorted
LOG_NAME = "log.jsonl"  # the study's log, beside them
# Who reads a study's view (StudyView.access): with a readers group, its members only; without,
# everyone who can reach the mount or the export.
READERS_DIR_MODE = 0o2750
READERS_FILE_MODE = 0o440
OPEN_DIR_MODE = 0o755
OPEN_FILE_MODE = 0o444
# A log.jsonl rendered by more new submissions than this at once lists them in one query.
_LOG_BULK = 64


@functools.lru_cache(maxsize=256)
def site_slug(site: str) -> str:
    slug = _SITE_BAD.sub("-", site).strip("-.")
    return slug[:40] or "site"


def version_name(v: Version) -> str:
    base = v.path.rsplit("/", 1)[-1]
    dot = base.rfind(".")
    ext = base[dot:] if dot > 0 else ""
    return f"{v.n:04d}_{utc_stamp(v.ingested_ns)}_{site_slug(v.site)}{ext}"


def submission_dir_name(seq: int, ingested_ns: int, site: str) -> str:
    return f"{utc_stamp(ingested_ns)}_{site_slug(site)}_{seq:06d}"


@dataclass(frozen=True)
class Dir:
    """A folder of the view: what it takes to list it, not its contents.

    ``area`` is where it is: "" the study's top folder, "current", "versions", "submissions"
    (the folder of the submissions), or "submission" (in submission ``seq``'s folder). ``path`` is
    its study path within its area ("" at the area's top) and ``key`` that path's key in the
    index's tree table. ``mtime_ns``: the ingest time of the study's latest submission (of
    submission ``seq``, in its own folder). ``kinds``, in versions/: what ``path`` is in the
    study's tree, where known (a folder, a file or both: which of its folders and version files
    there are to list)."""

    area: str = ""
    path: str = ""
    key: bytes = TOP_KEY
    seq: int = 0
    mtime_ns: int = 0
    kinds: frozenset[int] = frozenset((FOLDER, FILE))


@dataclass(frozen=True)
class File:
    version: Version


@dataclass(frozen=True)
class LogFile:
    """The study's ``log.jsonl`` as it was when this node was made: through submission ``seq``
    (0: none yet), ``size`` bytes long, ``mtime_ns`` that submission's ingest time. Later
    submissions only append lines, so its first ``size`` bytes never change (``read_log``)."""

    seq: int
    size: int
    mtime_ns: int


Node = Dir | File | LogFile


@dataclass(frozen=True)
class Access:
    """The owner, group and modes of a study's view, in the mount and in the export: the owner
    of store/ (the daemon's account); the study's readers group, or store/'s group without one;
    with readers folders setgid 2750 and files 0440 (nothing for others), without 0755 and 0444."""

    uid: int
    gid: int
    dir_mode: int
    file_mode: int


def submission_record(s: Submission) -> dict[str, Any]:
    """One submission as ``dittohead log --json`` lists it, and as a line of log.jsonl."""
    return {"seq": s.seq, "name": s.name, "ingested_ns": s.ingested_ns, "ingested": utc_iso(s.ingested_ns),
            "site": s.site, "user": s.user, "host": s.host, "client_created_ns": s.created_ns,
            "files": s.files, "bytes": s.size, "new_versions": s.new_versions,
            "new_chunk_bytes": s.new_chunk_bytes, "manifest": s.manifest.hex()}


def log_line(s: Submission) -> bytes:
    """The line of log.jsonl for ``s``: its ``submission_record`` as one line of ASCII JSON
    (anything else escaped, as ``--json`` prints it), ending in a newline."""
    return json.dumps(submission_record(s), ensure_ascii=True).encode("ascii") + b"\n"


def render_log(store: Store, study: str, after: int, upto: int) -> bytes:
    """The lines of log.jsonl for submissions ``after`` + 1 to ``upto``, in seq order."""
    return b"".join(log_line(s) for s in _submissions(store, study, after, upto))


def _submissions(store: Store, study: str, after: int, upto: int) -> list[Submission]:
    """Submissions ``after`` + 1 to ``upto`` of ``study``: one query for many, point look-ups
    for a few (what a view kept open meets: one or two new ones at a time)."""
    idx = store.index
    if upto - after > _LOG_BULK:
        return [s for s in idx.submissions(study) if after < s.seq <= upto]
    return [s for seq in range(after + 1, upto + 1) if (s := idx.submission(study, seq)) is not None]


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _shown(folders: Collection[bytes], files: dict[bytes, Version]) -> list[tuple[bytes, Version]]:
    """The files of one folder under the names the view shows them by: a file whose name is
    also a folder's as ``NAME~file``, unless that name is another entry's (then not at all)."""
    out = []
    for name, v in files.items():
        if name in folders:
            name += _SUFFIX
            if name in folders or name in files:
                continue
        out.append((name, v))
    return out


class StudyView:
    """One study's view, answered from the index on each call (nothing is built up front).

    Safe to use from several threads: it holds the latest submission it has seen, the study's
    log.jsonl as rendered so far (under a lock) and its access as last read, and reads through
    ``store.index``, the calling thread's own connection to the index."""

    def __init__(self, store: Store, study: str) -> None:
        self.store = store
        self.study = study
        self._seen = (-1, 0)  # (last seq, its ingest time), as last read
        self.cache = ChunkCache()  # one for every file this view opens, from every thread
        # log.jsonl through submission _log_seq, and that one's ingest time; only ever appended to
        self._log = bytearray()
        self._log_seq = 0
        self._log_mtime = 0
        self._log_lock = threading.Lock()
        self._access: tuple[tuple, Access] | None = None  # (what it was read from, the access)

    # -- who reads it
    @property
    def access(self) -> Access:
        """The owner, group and modes of this study's view (``Access``), as its settings say now.

        Costs two stat calls (store/ and the study's settings file); the settings are read again
        only when their file changed (inode, size, times), so a change (``study set``) shows at
        the next call. A readers group that no longer exists, or settings that cannot be read,
        leave the view closed: store/'s group, with the readers' modes."""
        root = self.store.root
        top = os.stat(root.store)
        try:
            st = os.stat(root.settings_path(self.study))
            file_key: tuple | None = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except FileNotFoundError:
            file_key = None
        key = (top.st_uid, top.st_gid, file_key)
        cached = self._access
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            readers = root.study_settings(self.study).readers if file_key else None
            gid = group_id(readers) if readers else top.st_gid
        except (StoreError, UsageError):
            readers, gid = "?", top.st_gid
        if readers:
            access = Access(top.st_uid, gid, READERS_DIR_MODE, READERS_FILE_MODE)
        else:
            access = Access(top.st_uid, gid, OPEN_DIR_MODE, OPEN_FILE_MODE)
        self._access = (key, access)
        return access

    # -- the study's log
    def log_file(self) -> LogFile:
        """log.jsonl as of now (``LogFile``): what the index holds, rendered as far as that."""
        return self._log_file(self.refresh())

    def _log_file(self, seq: int) -> LogFile:
        with self._log_lock:
            if seq > self._log_seq:
                self._render_log(seq)
            return LogFile(self._log_seq, len(self._log), self._log_mtime)

    def _render_log(self, upto: int) -> None:
        """Append the lines of the submissions after ``_log_seq`` up to ``upto`` (lock held)."""
        for s in _submissions(self.store, self.study, self._log_seq, upto):
            self._log += log_line(s)
            self._log_mtime = s.ingested_ns
        self._log_seq = upto

    def read_log(self, node: LogFile, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` of log.jsonl as it was at ``node`` (through
        ``node.seq``): an open file keeps reading what it opened, however many submissions
        came since."""
        end = min(node.size, offset + size)
        if offset < 0 or offset >= end:
            return b""
        with self._log_lock:
            if len(self._log) < node.size:  # a node of another view of the study
                self._render_log(node.seq)
            return bytes(self._log[offset:end])

    # -- what the index holds now
    def refresh(self) -> int:
        """Read the study's latest submission from the index (a new ingest shows from now on in
        folders' times); returns its seq."""
        self._seen = self.store.index.latest_ingest(self.study)
        return self._seen[0]

    @property
    def last_seq(self) -> int:
        return self.refresh()

    @property
    def root(self) -> Dir:
        self.refresh()
        return Dir(mtime_ns=self._seen[1])

    # -- one path
    def lookup(self, path: str, *, refresh: bool = True) -> Node:
        """The node at the view path ``path`` (``current/a/b.txt``); NotFound if there is none.
        ``refresh`` False answers as of the last ``refresh`` (a caller that refreshes on a
        schedule of its own, as the mount does, saves a query a call)."""
        parts = [p for p in path.split("/") if p]
        if refresh:
            self.refresh()
        node: Node | None = None
        try:
            node = self._lookup(parts)
        except UnicodeEncodeError:  # a str no name's bytes decode to: no such name
            node = None
        if node is None:
            raise NotFound(f"{self.study}: no such path in the view: {escape(path)}")
        return node

    def exists(self, path: str) -> bool:
        try:
            self.lookup(path)
        except NotFound:
            return False
        return True

    def _lookup(self, parts: list[str]) -> Node | None:
        mtime = self._seen[1]
        if not parts:
            return Dir(mtime_ns=mtime)
        area, rest = parts[0], parts[1:]
        if area == LOG_NAME:
            return None if rest else self._log_file(self._seen[0])
        if area == "current":
            return self._in_tree("current", 0, rest, mtime)
        if area == "versions":
            return self._in_versions(rest, mtime)
        if area != "submissions":
            return None
        if not rest:
            return Dir("submissions", mtime_ns=mtime)
        seq = self._submission_named(rest[0])
        if seq is None:
            return None
        return self._in_tree("submission", seq[0], rest[1:], seq[1])

    def _submission_named(self, name: str) -> tuple[int, int] | None:
        """(seq, ingest time) of the submission whose folder is ``name``."""
        tail = name.rsplit("_", 1)[-1]
        if not (tail.isascii() and tail.isdigit()):
            return None
        s = self.store.index.submission(self.study, int(tail))
        if s is None or submission_dir_name(s.seq, s.ingested_ns, s.site) != name:
            return None
        return s.seq, s.ingested_ns

    @staticmethod
    def _keys(names: list[bytes]) -> list[bytes]:
        """keys[i]: the key of the folder names[:i] (keys[0] the top), for i up to len(names)-1."""
        chain = FolderChain()
        chain.descend(names)
        return chain.keys

    def _in_tree(self, area: str, seq: int, parts: list[str], mtime: int) -> Node | None:
        """``parts`` in the tree of current/ (seq 0) or of submission ``seq``."""
        if not parts:
            return Dir(area, seq=seq, mtime_ns=mtime)
        idx = self.store.index
        names = [to_bytes(p) for p in parts]
        keys = self._keys(names)
        if len(names) > 1 and FOLDER not in idx.tree_kinds(self.study, seq, keys[-2], names[-2]):
            return None
        folder, name = "/".join(parts[:-1]), names[-1]
        kinds = idx.tree_kinds(self.study, seq, keys[-1], name)
        if FOLDER in kinds:
            return Dir(area, "/".join(parts), folder_key(keys[-1], name), seq, mtime)
        if FILE not in kinds:
            # a file shown as NAME~file: NAME is a file and a folder, and no entry is NAME~file
            if not name.endswith(_SUFFIX) or idx.tree_kinds(self.study, seq, keys[-1], name[:-len(_SUFFIX)]) != {FOLDER, FILE}:
                return None
            name = name[:-len(_SUFFIX)]
        path = _join(folder, from_bytes(name))
        v = (idx.latest_version(self.study, path) if seq == 0 else idx.entry_version(self.study, seq, path))
        return File(v) if v else None

    def _in_versions(self, parts: list[str], mtime: int) -> Node | None:
        """``parts`` below versions/: a folder for every file and folder of the study, and in
        a file's folder its version files."""
        if not parts:
            return Dir("versions", mtime_ns=mtime)
        idx = self.store.index
        names = [to_bytes(p) for p in parts]
        keys = self._keys(names)
        if len(names) > 1 and not idx.tree_kinds(self.study, 0, keys[-2], names[-2]):
            return None
        if kinds := idx.tree_kinds(self.study, 0, keys[-1], names[-1]):
            return Dir("versions", "/".join(parts), folder_key(keys[-1], names[-1]), 0, mtime, frozenset(kinds))
        if len(parts) < 2:
            return None
        path, name = "/".join(parts[:-1]), parts[-1]
        v = self._version_named(path, name)
        if v is None and name.endswith(CONFLICT_SUFFIX):  # a version file whose name a folder has
            base = name[:-len(CONFLICT_SUFFIX)]
            v = self._version_named(path, base)
            if v is not None and not idx.tree_kinds(self.study, 0, keys[-1], to_bytes(base)):
                v = None
        return File(v) if v else None

    # -- where a version or a path is shown (for an export that writes only what is new)
    def kinds(self, path: str) -> set[int]:
        """What the study path ``path`` is in the study's tree: {FOLDER}, {FILE}, both or none."""
        names = to_bytes(path).split(b"/")
        return self.store.index.tree_kinds(self.study, 0, self._keys(names)[-1], names[-1])

    def version_path(self, v: Version) -> str:
        """The view path of ``v``'s version file: versions/PATH/NAME, or NAME~file where a
        folder there has NAME."""
        name = version_name(v)
        if self.kinds(f"{v.path}/{name}"):
            name += CONFLICT_SUFFIX
        return f"versions/{v.path}/{name}"

    def current_path(self, path: str) -> str | None:
        """The view path under which current/ shows the file ``path``: current/PATH, or
        current/PATH~file where PATH is also a folder (None where another entry has that name)."""
        if FOLDER not in self.kinds(path):
            return f"current/{path}"
        if self.kinds(path + CONFLICT_SUFFIX):
            return None
        return f"current/{path}{CONFLICT_SUFFIX}"

    def folders_that_are_files(self, path: str) -> list[str]:
        """The folders above the study path ``path`` that are also files of the study (shown as
        NAME~file), shallowest first."""
        names = to_bytes(path).split(b"/")
        keys = self._keys(names)
        idx = self.store.index
        return ["/".join(path.split("/")[:i]) for i in range(1, len(names))
                if idx.tree_kinds(self.study, 0, keys[i - 1], names[i - 1]) == {FOLDER, FILE}]

    def submission_path(self, seq: int) -> str | None:
        """The view path of submission ``seq``'s folder (None if there is no such submission)."""
        s = self.store.index.submission(self.study, seq)
        return None if s is None else f"submissions/{submission_dir_name(s.seq, s.ingested_ns, s.site)}"

    def _version_named(self, path: str, name: str) -> Version | None:
        number = name.split("_", 1)[0]
        if not (number.isascii() and number.isdigit()):
            return None
        v = self.store.index.version(self.study, path, int(number))
        return v if v is not None and version_name(v) == name else None

    # -- one folder
    def listdir(self, path: str = "") -> list[tuple[str, Node]]:
        """The entries of the view folder ``path``: (name, node), sorted by the names' bytes.
        NotFound if ``path`` is not a folder."""
        node = self.lookup(path)
        if not isinstance(node, Dir):
            raise NotFound(f"{self.study}: not a folder in the view: {escape(path)}")
        return self.children(node)

    def children(self, d: Dir, *, refresh: bool = True) -> list[tuple[str, Node]]:
        """The entries of the folder ``d`` (as ``lookup`` or an earlier listing gave it), sorted
        by the names' bytes: one query for what it lists (``refresh``: as ``lookup``)."""
        idx = self.store.index
        if refresh:
            self.refresh()
        mtime = self._seen[1]
        out: list[tuple[bytes, Node]]
        if d.area == "":
            top: list[tuple[str, Node]] = [(a, Dir(a, mtime_ns=mtime)) for a in AREAS]
            top.append((LOG_NAME, self._log_file(self._seen[0])))
            return sorted(top, key=lambda e: e[0].encode())
        if d.area == "submissions":
            subs = [(submission_dir_name(s.seq, s.ingested_ns, s.site), Dir("submission", seq=s.seq, mtime_ns=s.ingested_ns))
                    for s in idx.submissions(self.study)]
            return sorted(subs, key=lambda e: e[0].encode())
        if d.area == "versions":
            kinds: dict[bytes, set[int]] = {}
            if FOLDER in d.kinds:
                for name, kind in idx.tree_names(self.study, 0, d.key):
                    kinds.setdefault(name, set()).add(kind)
            out = [(name, Dir("versions", _join(d.path, from_bytes(name)), folder_key(d.key, name), 0, mtime, frozenset(k)))
                   for name, k in kinds.items()]
            if d.path and FILE in d.kinds:
                files = {to_bytes(version_name(v)): v for v in idx.versions(self.study, d.path)}
                out += [(name, File(v)) for name, v in _shown(kinds.keys(), files)]
        else:
            mtime = mtime if d.area == "current" else d.mtime_ns
            prefix = to_bytes(d.path) + b"/" if d.path else b""
            folders: set[bytes] = set()
            found: dict[bytes, Version] = {}
            for name, kind, v in idx.tree_list(self.study, d.seq, d.key, prefix):
                if kind == FOLDER:
                    folders.add(name)
                elif v is not None:
                    found[name] = v
            out = [(name, Dir(d.area, _join(d.path, from_bytes(name)), folder_key(d.key, name), d.seq, mtime))
                   for name in folders]
            out += [(name, File(v)) for name, v in _shown(folders, found)]
        out.sort(key=lambda e: e[0])
        return [(from_bytes(name), node) for name, node in out]

    def walk(self, path: str = "", node: Node | None = None) -> Iterator[tuple[str, Node]]:
        """(view path, node) for every node below the folder ``path`` (or ``node``, found
        there), parents first, each folder's entries sorted by their names' bytes. With a stack of
        listings, not recursion (a valid path may have more components than Python allows
        frames), and an entry is dropped from its listing as it is given out, so what is held
        is the rest of one listing per level of the folder being walked."""
        top = node if node is not None else self.lookup(path)
        if not isinstance(top, Dir):
            return
        base = "/".join(p for p in path.split("/") if p)
        below: list[str] = []  # the names of the folder being listed, below ``base``
        stack = [self.children(top)[::-1]]  # stack[i]: the rest of the listing of base/below[:i]
        while stack:
            rest = stack[-1]
            if not rest:
                stack.pop()
                if below:
                    below.pop()
                continue
            name, child = rest.pop()
            yield "/".join((base, *below, name) if base else (*below, name)), child
            if isinstance(child, Dir):
                below.append(name)
                stack.append(self.children(child)[::-1])

    def open(self, version: Version) -> FileReader:
        """A reader of ``version`` that shares the view's chunk cache (``ChunkCache``)."""
        return FileReader(self.store, version, self.cache)


class StoreView:
    """Every study of a store, one folder each (the mount without --study)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._views: dict[str, StudyView] = {}

    def studies(self) -> list[str]:
        return sorted(set(self.store.index.studies()) | set(self.store.root.studies()))

    def study(self, name: str) -> StudyView:
        if name not in self._views:
            if name not in self.studies():
                raise NotFound(f"no study {name!r}")
            self._views[name] = StudyView(self.store, name)
        return self._views[name]


class ChunkCache:
    """An LRU of verified chunks of bounded size, one for every file a view opens, safe to call
    from many threads: a chunk is read and verified outside the lock (two threads may read the
    same one at once; both get good bytes), and the lock only guards the LRU."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, store: Store, cid: bytes) -> bytes:
        with self._lock:
            data = self._items.get(cid)
            if data is not None:
                self._items.move_to_end(cid)
                return data
        data = store.read_chunk(cid)  # verified against its id
        with self._lock:
            if cid not in self._items:
                self._items[cid] = data
                self.bytes += len(data)
                while self.bytes > self.max_bytes and len(self._items) > 1:
                    _, old = self._items.popitem(last=False)
                    self.bytes -= len(old)
        return data


class FileReader:
    """Random access to one version's bytes; every chunk is verified against its id."""

    def __init__(self, store: Store, version: Version, cache: ChunkCache | None = None) -> None:
        self.store = store
        self.version = version
        self.chunks = unpack_chunk_list(version.chunks)
        self.offsets = []
        pos = 0
        for _, length in self.chunks:
            self.offsets.append(pos)
            pos += length
        self.size = pos
        self.cache = cache or ChunkCache(8 * 1024 * 1024)

    def read(self, offset: int, size: int) -> bytes:
        return b"".join(data[start:end] for data, start, end in self.pieces(offset, size))

    def pieces(self, offset: int, size: int) -> list[tuple[bytes, int, int]]:
        """The ``size`` bytes at ``offset`` (fewer at the end) as (verified chunk, start, end)
        pieces, in order, not copied out of the chunks."""
        if offset >= self.size or size <= 0:
            return []
        end = min(self.size, offset + size)
        i = bisect.bisect_right(self.offsets, offset) - 1
        out = []
        while i < len(self.chunks) and self.offsets[i] < end:
            data = self.cache.get(self.store, self.chunks[i][0])
            start = self.offsets[i]
            out.append((data, max(0, offset - start), min(len(data), end - start)))
            i += 1
        return out

    def iter_all(self) -> Iterator[bytes]:
        for cid, _ in self.chunks:
            yield self.store.read_chunk(cid)


def write_version(store: Store, version: Version, f) -> None:
    """Stream one version's verified bytes to a binary file."""
    for data in FileReader(store, version).iter_all():
        f.write(data)


def version_os_mtime(version: Version) -> float:
    return version.mtime_ns / 1e9 if version.mtime_ns > 0 else version.ingested_ns / 1e9


__all__ = ["LOG_NAME", "Access", "Dir", "File", "FileReader", "LogFile", "Node", "StoreView", "StudyView",
           "log_line", "render_log", "submission_dir_name", "submission_record", "version_name"]
