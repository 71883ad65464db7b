"""The read-only view: one layout of a study's history, for the FUSE mount and the export.

    current/PATH                              the latest version of every path ever received
    versions/PATH/NNNN_STAMP_SITE.EXT         every version; NNNN from 0001, STAMP the server's
                                              ingest time (UTC), SITE as the client named it
    submissions/STAMP_SITE_SEQ/PATH           each submission's files, as received

The view is built from the index (path -> versions; invariant 9), never by replaying manifests.
Where one name is a file in one submission and a folder in another (``a`` then ``a/b``), the
folder keeps the name and the file is shown as ``a~file``. Reading goes through ``FileReader``:
chunk offsets precomputed, the chunk found by bisection, every chunk verified on read.
This module imports no FUSE and no transport.
"""

from __future__ import annotations

import bisect
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from dittohead.chunking import unpack_chunk_list
from dittohead.errors import NotFound
from dittohead.store.index import Version
from dittohead.store.repo import Store
from dittohead.units import utc_stamp

CONFLICT_SUFFIX = "~file"
_SITE_BAD = re.compile(r"[^A-Za-z0-9._-]+")


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


@dataclass
class Dir:
    children: dict[str, Node] = field(default_factory=dict)
    mtime_ns: int = 0


@dataclass(frozen=True)
class File:
    version: Version


Node = Dir | File


def _insert(root: Dir, parts: list[str], leaf: Node, mtime_ns: int) -> None:
    d = root
    d.mtime_ns = max(d.mtime_ns, mtime_ns)
    for name in parts[:-1]:
        child = d.children.get(name)
        if isinstance(child, File):  # a file where a folder must go: the folder wins the name
            d.children[name + CONFLICT_SUFFIX] = child
            child = None
        if child is None:
            child = d.children[name] = Dir()
        d = child
        d.mtime_ns = max(d.mtime_ns, mtime_ns)
    name = parts[-1]
    if isinstance(d.children.get(name), Dir):
        name += CONFLICT_SUFFIX
    d.children[name] = leaf


class StudyView:
    """The tree of one study, built once from the index."""

    def __init__(self, store: Store, study: str) -> None:
        self.store = store
        self.study = study
        self.root = Dir()
        idx = store.index
        versions = idx.all_versions(study)
        by_key = {(v.path, v.n): v for v in versions}
        current, vers, subs = Dir(), Dir(), Dir()
        latest: dict[str, Version] = {}
        for v in versions:
            latest[v.path] = v  # ordered by path, n
            _insert(vers, v.path.split("/") + [version_name(v)], File(v), v.ingested_ns)
        for v in latest.values():
            _insert(current, v.path.split("/"), File(v), v.ingested_ns)
        submissions = {s.seq: s for s in idx.submissions(study)}
        for seq, path, n in idx.entries(study):
            s = submissions[seq]
            top = submission_dir_name(seq, s.ingested_ns, s.site)
            _insert(subs, [top] + path.split("/"), File(by_key[(path, n)]), s.ingested_ns)
        self.root.children = {"current": current, "versions": vers, "submissions": subs}
        self.root.mtime_ns = max(current.mtime_ns, vers.mtime_ns, subs.mtime_ns)
        self.latest = latest

    def lookup(self, path: str) -> Node:
        node: Node = self.root
        for part in (p for p in path.split("/") if p):
            if not isinstance(node, Dir) or part not in node.children:
                raise NotFound(f"{self.study}: no such path in the view: {path}")
            node = node.children[part]
        return node

    def walk(self, node: Node | None = None, prefix: str = "") -> Iterator[tuple[str, Node]]:
        """(view path, node) for every node below ``node``, parents first, in sorted order; with
        a stack, not recursion: a valid path may have more components than Python's recursion
        limit allows frames."""

        def below(path: str, n: Node) -> list[tuple[str, Node]]:
            if not isinstance(n, Dir):
                return []
            return [(f"{path}/{name}" if path else name, n.children[name])
                    for name in sorted(n.children, reverse=True)]

        stack = below(prefix, node or self.root)
        while stack:
            path, child = stack.pop()
            yield path, child
            stack.extend(below(path, child))

    def open(self, version: Version) -> FileReader:
        return FileReader(self.store, version)


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
    """A small LRU of verified chunks, shared by readers."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, store: Store, cid: bytes) -> bytes:
        data = self._items.get(cid)
        if data is not None:
            self._items.move_to_end(cid)
            return data
        data = store.read_chunk(cid)
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
        if offset >= self.size or size <= 0:
            return b""
        end = min(self.size, offset + size)
        i = bisect.bisect_right(self.offsets, offset) - 1
        out = []
        while i < len(self.chunks) and self.offsets[i] < end:
            data = self.cache.get(self.store, self.chunks[i][0])
            start = self.offsets[i]
            out.append(data[max(0, offset - start) : end - start])
            i += 1
        return b"".join(out)

    def iter_all(self) -> Iterator[bytes]:
        for cid, _ in self.chunks:
            yield self.store.read_chunk(cid)


def write_version(store: Store, version: Version, f) -> None:
    """Stream one version's verified bytes to a binary file."""
    for data in FileReader(store, version).iter_all():
        f.write(data)


def version_os_mtime(version: Version) -> float:
    return version.mtime_ns / 1e9 if version.mtime_ns > 0 else version.ingested_ns / 1e9


__all__ = ["Dir", "File", "FileReader", "StoreView", "StudyView", "version_name"]
