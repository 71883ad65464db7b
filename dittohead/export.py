"""Export: the read-only view of one study, written into a destination folder, adding only.

``versions/`` holds the real bytes, each file written once (temporary name, fsync, link with no
overwrite) and made read-only. ``submissions/`` entries are hard links to those files.
``current/`` entries are hard links too, replaced atomically (rename) when a newer version
arrives: the one kind of change an export makes to what it wrote before. Nothing is deleted,
and a file in DEST that the export did not expect is left alone and reported: in ``current/``
too, an entry is replaced only if it is provably the export's own (see ``_owned``).

DEST may be writable by other accounts (a shared study folder), so it is walked by descriptors
(``_Folders``): every folder below DEST is opened with O_NOFOLLOW relative to its parent's
descriptor, and every file is created, linked, renamed and looked at relative to its folder's,
never following a symlink. What the export writes is inside DEST by construction, not by a
check made before the write. Only DEST itself, the path the admin gave, is resolved as usual. A
symlink anywhere inside it (a folder or a file) is left alone and reported like any other entry
in the way, and what would have gone beneath it is left out.
The layout is documented in docs/view.md.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Callable

from dittohead import fsutil
from dittohead.errors import DittoheadError, IntegrityError
from dittohead.store.index import Version
from dittohead.store.repo import Store
from dittohead.view import (
    CONFLICT_SUFFIX,
    Dir,
    File,
    StudyView,
    version_name,
    version_os_mtime,
    write_version,
)

FILE_MODE = 0o444
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
# what the export calls relative to a folder (os.replace takes dir_fd as os.rename does, but
# is not listed in os.supports_dir_fd)
_AT_CALLS = (os.open, os.mkdir, os.link, os.rename, os.stat, os.unlink)
_WALKS_BY_DESCRIPTORS = (hasattr(os, "O_NOFOLLOW") and hasattr(os, "O_DIRECTORY")
                         and all(f in os.supports_dir_fd for f in _AT_CALLS))

# what opening a symlink or a file as a folder gives (ELOOP: a symlink, on some systems;
# EMLINK: a symlink with O_NOFOLLOW on FreeBSD)
_NOT_A_FOLDER = (errno.ENOTDIR, errno.ELOOP, errno.EMLINK)
# A folder below DEST that the exporting account may not open or write in: someone else's, in a
# shared destination. In the way, like a file there; never a reason to stop the whole export.
_NOT_OURS = (errno.EACCES, errno.EPERM)

Identity = tuple[int, int]  # (st_dev, st_ino): one file on disk, whatever its names


@dataclass
class ExportSummary:
    written: int = 0
    bytes: int = 0
    linked: int = 0
    current_updated: int = 0
    unchanged: int = 0
    conflicts: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # "PATH vN: why", versions not exported

    def line(self, dest: str) -> str:
        from dittohead.units import human_bytes

        s = (f"export: {self.written} version files written ({human_bytes(self.bytes)}), "
             f"{self.current_updated} current entries updated, {self.linked} links added, "
             f"{self.unchanged} already there; {dest}")
        if self.conflicts:
            s += f"; {len(self.conflicts)} files in the way left untouched"
        if self.damaged:
            s += (f"; {len(self.damaged)} versions not exported: damaged in the store "
                  "(run 'dittohead fsck --read-data')")
        return s

    def in_the_way(self, path: str) -> None:
        """Report ``path`` (once) as an entry in DEST that the export left alone."""
        if path not in self.conflicts:
            self.conflicts.append(path)


def _identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino)


class _Folders:
    """Open descriptors of the folders on the path being walked below DEST, reused while the
    walk (in sorted order) stays below them: a stack for the current path prefix.

    ``open(parts)`` gives the descriptor of DEST/parts[0]/parts[1]/..., opening each component
    with O_NOFOLLOW relative to its parent (and making it first with ``create``). Where a
    component is not a folder (a symlink, a file), that component is reported once as in the
    way and None is returned, now and for everything below it. ``close`` closes them all.

    At most ``MAX_OPEN`` stay open: a valid path may have 2,000 components, more than a process
    may often hold descriptors (1,024). Deeper, the shallowest are closed, and opened again,
    the same way, from the deepest one still open, if the walk goes back up to them.
    """

    MAX_OPEN = 64

    def __init__(self, root_fd: int, root: str, summary: ExportSummary) -> None:
        self.root_fd = root_fd
        self.root = root
        self.summary = summary
        self.names: list[str] = []
        self.fds: list[int | None] = []  # None: closed to stay within MAX_OPEN
        self.blocked: set[tuple[str, ...]] = set()

    def open(self, parts: Sequence[str], *, create: bool) -> int | None:
        keep = 0
        while keep < min(len(parts), len(self.names)) and self.names[keep] == parts[keep]:
            keep += 1
        self._close_from(keep)
        while len(self.names) < len(parts):
            here = (*self.names, parts[len(self.names)])
            if here in self.blocked:
                return None
            parent = self._deepest()
            if parent is None:
                return None
            fd = self._open_one(parent, here, create)
            if fd is None:
                return None
            self.names.append(here[-1])
            self.fds.append(fd)
            self._limit()
        return self._deepest()

    def _deepest(self) -> int | None:
        """The descriptor of the folder at the end of the stack, opened again if it was closed
        (None if it is no longer a folder: reported)."""
        if not self.fds:
            return self.root_fd
        if self.fds[-1] is not None:
            return self.fds[-1]
        start = max((i for i, fd in enumerate(self.fds) if fd is not None), default=-1)
        parent = self.root_fd if start < 0 else self.fds[start]
        for i in range(start + 1, len(self.fds)):
            assert parent is not None
            fd = self._open_one(parent, tuple(self.names[: i + 1]), False)
            if fd is None:
                self._close_from(i)
                return None
            self.fds[i] = parent = fd
        self._limit()
        return self.fds[-1]

    def _limit(self) -> None:
        open_ones = [i for i, fd in enumerate(self.fds) if fd is not None]
        for i in open_ones[: max(0, len(open_ones) - self.MAX_OPEN)]:
            fd = self.fds[i]
            assert fd is not None
            os.close(fd)
            self.fds[i] = None

    def path(self, parts: Sequence[str]) -> str:
        return os.path.join(self.root, *parts)

    def _open_one(self, parent: int, here: tuple[str, ...], create: bool) -> int | None:
        name = here[-1]
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                return None
        except OSError as e:
            if e.errno not in (*_NOT_A_FOLDER, *_NOT_OURS):
                raise
            self._in_the_way(here)
            return None
        try:
            os.mkdir(name, dir_fd=parent)
        except FileExistsError:  # made meanwhile: opening it decides
            pass
        except OSError as e:
            if e.errno not in _NOT_OURS:
                raise
            self._in_the_way(here)
            return None
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as e:
            if e.errno not in (*_NOT_A_FOLDER, *_NOT_OURS, errno.ENOENT):  # ENOENT: removed meanwhile
                raise
            self._in_the_way(here)
            return None

    def _in_the_way(self, here: tuple[str, ...]) -> None:
        self.blocked.add(here)
        self.summary.in_the_way(self.path(here))

    def _close_from(self, depth: int) -> None:
        while len(self.fds) > depth:
            fd = self.fds.pop()
            if fd is not None:
                os.close(fd)
            self.names.pop()

    def close(self) -> None:
        self._close_from(0)


def _owned(st: os.stat_result | None, version_files: Collection[Identity]) -> bool:
    """Whether the entry in current/ whose own (not followed) attributes are ``st`` is the
    export's earlier entry for a path whose version files in DEST/versions/ are
    ``version_files``, and so may be swapped or moved.

    The export's entries are hard links to a version file of the same path: the same inode
    (st_dev, st_ino), and nothing else counts. Bytes prove nothing, since anyone who can write
    in DEST can write a file with the bytes of an older version; so where the filesystem has no
    hard links (``_link_or_copy`` then copies), a copied entry is never replaced: it stays at
    the version it was copied from and is reported as in the way, like the user's own files,
    symlinks and folders, none of which are the export's to replace.
    """
    return st is not None and stat.S_ISREG(st.st_mode) and _identity(st) in version_files


def _move_aside(dir_fd: int, name: str, aside: str) -> bool:
    """Move the export's own current/ entry ``name`` to ``aside`` in the same open folder,
    never overwriting.

    Used when a path that was a file becomes a folder: the view then shows the folder under the
    name and the file as ``NAME~file``, and moving the old entry there gives the layout a fresh
    export gives. Only the name moves: the file stays the same hard link to its version. An
    ``aside`` that is already the same file (a run that stopped half-way) is kept, and the
    extra link dropped; anything else at ``aside`` leaves ``name`` where it is (False).
    """
    st, at = fsutil.lstat_at(dir_fd, name), fsutil.lstat_at(dir_fd, aside)
    if st is None or (at is not None and _identity(at) != _identity(st)):
        return False
    fsutil.link_new(name, aside, dir_fd=dir_fd)  # links (or renames), then drops the name ``name``
    return True


def _link_or_copy(src_fd: int, src: str, ident: Identity, dst_fd: int, dst: str) -> bool:
    """Make ``dst`` (in ``dst_fd``) a hard link to the version file ``src`` (in ``src_fd``),
    never overwriting, or a copy of it where hard links fail. False, with nothing made, if
    ``src`` is no longer the file ``ident`` it was (someone swapped it)."""
    st = fsutil.lstat_at(src_fd, src)
    if st is None or not stat.S_ISREG(st.st_mode) or _identity(st) != ident:
        return False
    try:
        os.link(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
        return True
    except FileExistsError:
        raise
    except OSError:
        pass
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=src_fd)
    with os.fdopen(fd, "rb") as fi:
        if _identity(os.fstat(fd)) != ident:
            return False
        with fsutil.new_file_at(dst_fd, dst, mode=FILE_MODE) as fo:
            while chunk := fi.read(1 << 20):
                fo.write(chunk)
    return True


def export_study(store: Store, study: str, dest: str,
                 progress: Callable[[int], None] | None = None) -> ExportSummary:
    """Write what is missing of the study's view into ``dest``; never fails because of what is
    already there.

    A path that was a file and is now also a folder (``data``, then ``data/f.txt``) is shown
    as the folder ``current/data/`` and the file ``current/data~file``. An earlier export left
    the file's entry at ``current/data``: if it is the export's own (``_owned``: the same inode
    as a version file of ``data``), it is moved to ``current/data~file`` (only its name
    changes; it is still a link to its version), so the destination ends as a fresh export
    would. If it is not (the user's file), it stays, is reported, and the folder's entries are
    left out of ``current/``; they are in versions/ and submissions/, and the next export adds
    them once the file is gone. The same holds for any file or symlink where a folder must go,
    in any of the three trees: reported once, the rest exported. The reverse (a folder that
    becomes a file) needs nothing special: the folder keeps its name and the file is added as
    ``data~file``.

    Everything inside ``dest`` is reached through descriptors, never by following a symlink
    (see the module's docstring); on a filesystem without hard links the entries of current/
    and submissions/ are copies, and a copy in current/ is never replaced by a newer version
    (``_owned``).
    """
    if not _WALKS_BY_DESCRIPTORS:
        raise DittoheadError("export needs a system that opens files relative to a folder "
                             "without following symlinks (openat, O_NOFOLLOW)")
    view = StudyView(store, study)
    summary = ExportSummary()
    dest = os.path.abspath(dest)
    os.makedirs(dest, exist_ok=True)
    root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)  # DEST itself: the admin's path
    folders = _Folders(root_fd, dest, summary)  # where the export writes
    sources = _Folders(root_fd, dest, summary)  # versions/, where links are made from
    try:
        _export(store, view, folders, sources, summary, progress)
    finally:
        folders.close()
        sources.close()
        fsutil.fsync_dir_fd(root_fd)
        os.close(root_fd)
    return summary


def _export(store: Store, view: StudyView, folders: _Folders, sources: _Folders,
            summary: ExportSummary, progress: Callable[[int], None] | None) -> None:
    ids: dict[tuple[str, int], Identity] = {}  # (path, n) -> its version file in DEST
    ours: dict[str, set[Identity]] = {}  # path -> its version files in DEST, the export's own

    def version_file(v: Version) -> list[str]:
        return ["versions", *v.path.split("/"), version_name(v)]

    def keep(v: Version, st: os.stat_result) -> None:
        ids[(v.path, v.n)] = _identity(st)
        ours.setdefault(v.path, set()).add(_identity(st))

    # 1. every version's bytes, written once
    euid = os.geteuid() if hasattr(os, "geteuid") else 0
    for vpath, node in view.walk(view.root.children["versions"], "versions"):
        if not isinstance(node, File):
            folders.open(vpath.split("/"), create=False)  # reports a symlink or file in the way
            continue
        v = node.version
        *parent, name = version_file(v)
        dir_fd = folders.open(parent, create=True)
        if dir_fd is None:
            continue  # something not a folder in the way: reported
        st = fsutil.lstat_at(dir_fd, name)
        if st is not None:
            # An earlier export's: a regular file of the version's size, owned by the account
            # that exports (no other account can make one it owns), never writable.
            if (stat.S_ISREG(st.st_mode) and st.st_size == v.size and st.st_uid == euid
                    and not st.st_mode & 0o222):
                keep(v, st)
                summary.unchanged += 1
            else:
                summary.in_the_way(folders.path([*parent, name]))
            continue
        t = version_os_mtime(v)
        try:
            with fsutil.new_file_at(dir_fd, name, mode=FILE_MODE, times=(t, t)) as f:
                write_version(store, v, f)
        except IntegrityError as e:  # no part of it stays (new_file_at); the rest goes on
            summary.damaged.append(f"{v.path} v{v.n}: {e}")
            continue
        except FileExistsError:  # made meanwhile by someone else
            summary.in_the_way(folders.path([*parent, name]))
            continue
        except OSError as e:
            if e.errno not in _NOT_OURS:
                raise
            summary.in_the_way(folders.path([*parent, name]))  # a folder not ours to write in
            continue
        st = fsutil.lstat_at(dir_fd, name)
        if st is not None:
            keep(v, st)
        summary.written += 1
        summary.bytes += v.size
        if progress:
            progress(v.size)

    # 2. submissions/: links to the version files; 3. current/: links swapped atomically
    for top in ("submissions", "current"):
        for vpath, node in view.walk(view.root.children[top], top):
            *parent, name = vpath.split("/")
            if isinstance(node, Dir):
                # current/PATH/ is a folder now; an old entry of ours for the file PATH moves
                # to PATH~file, where the view shows that file (see export_study).
                dir_fd = folders.open(parent, create=False) if top == "current" else None
                if (dir_fd is not None
                        and _owned(fsutil.lstat_at(dir_fd, name),
                                   ours.get(vpath[len("current/"):], set()))
                        and _move_aside(dir_fd, name, name + CONFLICT_SUFFIX)):
                    summary.current_updated += 1
                # A folder in the view: a symlink or a file in its place is reported even
                # where nothing is left to write beneath it.
                folders.open(vpath.split("/"), create=False)
                continue
            v = node.version
            ident = ids.get((v.path, v.n))
            if ident is None:
                continue  # not written: what was in its way is reported already
            *src_parent, src = version_file(v)
            dir_fd = folders.open(parent, create=True)
            if dir_fd is None:
                continue
            st = fsutil.lstat_at(dir_fd, name)
            if st is not None and _identity(st) == ident:
                summary.unchanged += 1
                continue
            src_fd = sources.open(src_parent, create=False)
            if src_fd is None:
                continue
            try:
                if st is None:
                    try:
                        if _link_or_copy(src_fd, src, ident, dir_fd, name):
                            summary.linked += 1
                        else:  # the version file was swapped since step 1
                            summary.in_the_way(folders.path(version_file(v)))
                    except FileExistsError:  # made meanwhile by someone else
                        summary.in_the_way(folders.path(vpath.split("/")))
                elif top == "current" and _owned(st, ours.get(v.path, set())):
                    tmp = fsutil.tmp_basename()
                    if _link_or_copy(src_fd, src, ident, dir_fd, tmp):
                        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                        summary.current_updated += 1
                    else:
                        summary.in_the_way(folders.path(version_file(v)))
                else:
                    summary.in_the_way(folders.path(vpath.split("/")))
            except OSError as e:
                if e.errno not in _NOT_OURS:
                    raise
                summary.in_the_way(folders.path(vpath.split("/")))  # a folder not ours to write in
