"""The small object-storage interface behind the store, and its local-directory backend.

The store keeps packs, manifests and study-log records as named objects: ``packs/AB/ID.pack``,
``manifests/AB/ID`` (AB: the id's first two hex digits) and ``studies/NAME/SEQ.rec``, laid out
as docs/format.md says ("Pack", "Manifest", "Study log"). Every object is created once, whole,
and never overwritten or changed: the operations are those an object store offers (whole and
ranged reads, listing by prefix, create-if-absent), so that an S3-compatible backend implements
this interface and nothing else. A study's settings (``studies/NAME.json``) and the index are
files beside these objects, not objects (``dittohead/store/layout.py``); so is the study log of
dittohead 0.1 and 0.2 (``studies/NAME.log``), read, never written (``dittohead/studylog.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Protocol

from dittohead import directio, fsutil
from dittohead.errors import FormatError, StoreError


class TmpFile(Protocol):
    """A new local file being written for ``put_file``."""

    def write(self, data: bytes | memoryview, /) -> int: ...
    def finish(self) -> None: ...  # complete, fsynced and closed
    def close(self) -> None: ...  # abandoned


class ObjectStore(Protocol):
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def get(self, key: str, limit: int) -> bytes: ...
    def read_range(self, key: str, offset: int, length: int) -> bytes: ...
    def list(self, prefix: str) -> Iterator[str]: ...
    def put_bytes(self, key: str, data: bytes) -> bool: ...
    def put_file(self, key: str, tmp_path: str) -> bool: ...
    def new_tmp(self) -> tuple[str, TmpFile]: ...
    def names(self, prefix: str) -> Iterator[str]: ...
    # A backend on this machine's disks may also say where an object is, and take a finished file
    # of the same filesystem as an object without a copy; one that is not returns None.
    def local_path(self, key: str) -> str | None: ...
    def local_device(self) -> int | None: ...
    def adopt_file(self, key: str, path: str, *, mode: int) -> bool: ...


class LocalObjectStore:
    """Objects as files under a directory; writes are durable and never overwrite."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.tmp_dir = os.path.join(root, "tmp")

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"bad object key {key!r}")
        return os.path.join(self.root, *key.split("/"))

    def local_path(self, key: str) -> str | None:
        """Where the object is on this machine's disk (it may not exist)."""
        return self._path(key)

    def local_device(self) -> int | None:
        """The filesystem the objects are on (``st_dev``): a file there can be adopted."""
        return os.stat(self.root).st_dev

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def size(self, key: str) -> int:
        return os.stat(self._path(key)).st_size

    def get(self, key: str, limit: int) -> bytes:
        """The whole object; FormatError if it is larger than ``limit`` (damage, for anything
        the store holds), FileNotFoundError if there is none."""
        try:
            return fsutil.read_limited(self._path(key), limit)
        except ValueError:
            raise FormatError(f"{key}: larger than the limit of {limit} bytes") from None

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        with open(self._path(key), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def list(self, prefix: str) -> Iterator[str]:
        """Keys under a folder-like prefix ("packs", "studies"), sorted, temporaries skipped."""
        base = self._path(prefix)
        if not os.path.isdir(base):
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for name in sorted(filenames):
                if not name.startswith(".tmp-"):
                    yield f"{rel}/{name}"

    def names(self, prefix: str) -> Iterator[str]:
        """The names directly under a folder-like prefix, sorted: an object's name, or a
        deeper prefix's with "/" after it (what an object store lists with a delimiter)."""
        try:
            with os.scandir(self._path(prefix)) as it:
                names = [e.name + "/" if e.is_dir(follow_symlinks=False) else e.name
                         for e in it if not e.name.startswith(".tmp-")]
        except (FileNotFoundError, NotADirectoryError):
            return
        yield from sorted(names)

    def _ensure_parent(self, path: str) -> None:
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700, exist_ok=True)
            fsutil.fsync_dir(os.path.dirname(parent))

    def new_tmp(self) -> tuple[str, TmpFile]:
        """A temporary file for ``put_file``, written around the page cache (``directio``):
        a new pack is read again only by fsck and by reads long after."""
        os.makedirs(self.tmp_dir, mode=0o700, exist_ok=True)
        path = fsutil.tmp_name(self.tmp_dir)
        fd = directio.open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return path, directio.Writer(fd, hashed=True)

    def put_file(self, key: str, tmp_path: str) -> bool:
        """Move a finished (already fsynced) temporary file into place; False if it existed."""
        dest = self._path(key)
        self._ensure_parent(dest)
        return fsutil.link_new(tmp_path, dest)

    def adopt_file(self, key: str, path: str, *, mode: int) -> bool:
        """Put the existing file ``path`` (same filesystem) at ``key`` as a second hard link, after
        setting its mode and making it durable; never overwrites. False if ``key`` existed.
        The caller removes ``path`` once the link is committed to."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fchmod(fd, mode)
            os.fsync(fd)
            directio.advise(fd, "DONTNEED")  # written once; read again only by fsck, much later
        finally:
            os.close(fd)
        dest = self._path(key)
        self._ensure_parent(dest)
        try:
            os.link(path, dest)
            created = True
        except FileExistsError:
            created = False
        fsutil.fsync_dir(os.path.dirname(dest))
        return created

    def put_bytes(self, key: str, data: bytes) -> bool:
        dest = self._path(key)
        self._ensure_parent(dest)
        return fsutil.write_new(dest, data, mode=0o600, exist_ok=True)
