"""Export: the read-only view of one study, written into a destination folder, adding only.

``versions/`` holds the real bytes, each file written once under a temporary name, made read-only,
made durable with the others of its batch (one sync of DEST's filesystem, not an fsync a file),
then linked into place with no overwrite: a file under a version's name is always whole. ``submissions/`` entries are hard links to those files.
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

The view is walked from the index (``StudyView``), one folder's listing at a time, so memory
follows the depth of a path and the size of one folder, not the study's history. After a clean
export, the next one into the same DEST goes through only what the submissions since brought
(``_Exporter.since``, ``_LastExport``); ``verify`` goes through everything.

Every name is written as its exact bytes. Where DEST refuses a name (an SMB share or a FAT disk:
a ':', a trailing dot, ``CON``; any filesystem: a name too long), that one name is written as
``display.portable_name`` gives it, and listed in ``DEST/escaped-names.tsv`` (``_Escapes``).
The layout is documented in docs/view.md.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from dittohead import fsutil, paths
from dittohead.display import escape, portable_name, unescape
from dittohead.errors import DittoheadError, IntegrityError
from dittohead.store.index import Version
from dittohead.store.layout import is_member
from dittohead.store.repo import Store
from dittohead.view import (
    CONFLICT_SUFFIX,
    LOG_NAME,
    OPEN_DIR_MODE,
    Access,
    Dir,
    File,
    StudyView,
    log_line,
    render_log,
    version_name,
    version_os_mtime,
    write_version,
)

FILE_MODE = 0o444  # a version file without a readers group (as the umask leaves it)
# Version files made durable together (one sync of DEST's filesystem), then linked into place.
FLUSH_BYTES = 256 * 1024 * 1024
FLUSH_FILES = 4096
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
# What making a name gives where DEST will not hold that name: made again as portable_name's
# (in a folder that is there: if it was not, or not ours, making that fails too, and says so).
_REFUSED = (*fsutil.REFUSED_NAME, *fsutil.REFUSED_NAME_TOO)
NAMES_FILE = "escaped-names.tsv"
NAMES_HEADER = ("# dittohead export: names this destination refused, written escaped instead (docs/view.md).\n"
                "# One line each: the path as written<TAB>the path in the view; both relative to this folder,\n"
                "# in dittohead's escape (a backslash doubled, \\xNN a byte, \\uNNNN a character).\n")

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
    escaped_new: int = 0  # names DEST refused, written escaped and listed in NAMES_FILE by this export
    since: int | None = None  # this export looked only at what came after submission #since
    log_lines: int = 0  # lines added to DEST/log.jsonl
    access_set: int = 0  # folders and files of earlier exports given the study's group and modes (verify)

    @property
    def clean(self) -> bool:
        """Nothing left in the way and nothing left out as damaged: DEST holds the whole view."""
        return not self.conflicts and not self.damaged

    def line(self, dest: str) -> str:
        from dittohead.units import human_bytes

        s = (f"export: {self.written} version files written ({human_bytes(self.bytes)}), "
             f"{self.current_updated} current entries updated, {self.linked} links added, "
             f"{self.unchanged} already there; {dest}")
        if self.since is not None:
            s += f" (what is new since submission #{self.since}; 'export --verify' checks it all)"
        if self.conflicts:
            s += f"; {len(self.conflicts)} files in the way left untouched"
        if self.damaged:
            s += (f"; {len(self.damaged)} versions not exported: damaged in the store "
                  "(run 'dittohead fsck --read-data')")
        if self.access_set:
            s += f"; {self.access_set} earlier folders and files given the study's group and modes"
        if self.escaped_new:
            s += (f"; {self.escaped_new} names this destination refuses written escaped "
                  f"(listed in {os.path.join(dest, NAMES_FILE)})")
        return s

    def in_the_way(self, path: str) -> None:
        """Report ``path`` (once) as an entry in DEST that the export left alone."""
        if path not in self.conflicts:
            self.conflicts.append(path)


def _identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino)


def _lookup(dir_fd: int, name: str, alt: str | None = None) -> tuple[str, os.stat_result | None]:
    """The entry in the open folder ``dir_fd`` under ``name``, or else under ``alt``: the name
    it goes by, and its own attributes (``name`` and None if there is none)."""
    for candidate in (name, alt) if alt else (name,):
        try:
            return candidate, os.stat(candidate, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno not in fsutil.REFUSED_NAME:  # a name DEST refuses is not there
                raise
    return name, None


class _Perms:
    """The group and modes the export gives what it writes: the view's (``StudyView.access``;
    docs/view.md, "Who reads it").

    With a readers group, every folder it makes is setgid in that group (2750) and every file
    0440, set through the descriptor it made them with (fchown, fchmod: no second walk);
    escaped-names.tsv, which it appends to, is 0640 (0644 without), and log.jsonl is writable
    by its owner only while lines are added to it. Without one, folders keep mkdir's mode and
    files FILE_MODE, as the umask leaves them (what every export wrote before readers existed).
    With ``repair`` (``export --verify``), what an earlier export made, met on the way (DEST
    itself included), is given them too (0755 and 0444 without readers): the exporting
    account's own folders and files only, never anyone else's in a shared DEST."""

    def __init__(self, access: Access, readers: str | None, repair: bool, summary: ExportSummary) -> None:
        self.readers = readers
        self.gid = access.gid if readers else None
        self.dir_mode = access.dir_mode if readers else OPEN_DIR_MODE
        self.file_mode = access.file_mode if readers else FILE_MODE
        self.repair = repair
        self.active = self.gid is not None or repair  # anything to do beyond the modes made with
        self.summary = summary
        self.euid = os.geteuid()
        if self.gid is not None and not is_member(self.gid):
            raise DittoheadError(self._not_member())

    def _not_member(self, where: str = "") -> str:
        return (f"{where}cannot give the export's files to group {self.readers} (the study's readers): "
                f"the account that exports must be a member of it (usermod -aG {self.readers} ACCOUNT, "
                "then sign in again)")

    def _chown(self, fd: int, where: str) -> None:
        assert self.gid is not None
        try:
            os.fchown(fd, -1, self.gid)
        except PermissionError:
            raise DittoheadError(self._not_member(f"{escape(where)}: ") + " (or DEST's filesystem keeps "
                                 "no groups)") from None

    def new_folder(self, fd: int, where: str) -> None:
        """A folder the export has just made."""
        if self.gid is not None:
            self._chown(fd, where)  # first: chown may clear set-id bits
            os.fchmod(fd, self.dir_mode)

    def new_file(self, fd: int, where: str, writable: bool = False) -> None:
        """A file the export has just made (``writable``: one it appends to, for its owner)."""
        if self.gid is not None:
            self._chown(fd, where)
            os.fchmod(fd, self.file_mode | (0o200 if writable else 0))

    def folder(self, fd: int, where: str) -> None:
        """A folder found there (with ``repair``: given the group and mode, if it is ours)."""
        if self.repair:
            self._fix(fd, os.fstat(fd), self.dir_mode, where)

    def file(self, fd: int, st: os.stat_result, where: str, writable: bool = False) -> None:
        """A file found there, whose attributes are ``st`` (with ``repair``: as ``folder``)."""
        if self.repair:
            self._fix(fd, st, self.file_mode | (0o200 if writable else 0), where)

    def file_wrong(self, st: os.stat_result) -> bool:
        """Whether ``repair`` would change the file whose attributes are ``st``."""
        return self.repair and self._wrong(st, self.file_mode)

    def _wrong(self, st: os.stat_result, mode: int) -> bool:
        return st.st_uid == self.euid and (
            stat.S_IMODE(st.st_mode) != mode or (self.gid is not None and st.st_gid != self.gid))

    def _fix(self, fd: int, st: os.stat_result, mode: int, where: str) -> None:
        if not self._wrong(st, mode):
            return
        if self.gid is not None and st.st_gid != self.gid:
            self._chown(fd, where)
        os.fchmod(fd, mode)
        self.summary.access_set += 1


class _Escapes:
    """The names DEST refused, and the escaped names written instead: DEST/NAMES_FILE, read as
    the export begins, added to (and made durable) before an escaped file is linked into place.

    An escaped name is looked for only where this list gives it to that very path: a study may
    hold both ``a:b`` and ``a%3Ab``, and on a destination that holds ``a:b`` the file
    ``a%3Ab`` is the other path's, never ``a:b``'s.
    """

    def __init__(self, root_fd: int, perms: _Perms | None = None) -> None:
        self.root_fd = root_fd
        self.perms = perms
        self.known: dict[str, str] = {}  # view path -> path as written
        self.added = 0
        try:
            fd = os.open(NAMES_FILE, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=root_fd)
        except FileNotFoundError:
            return
        if perms is not None:
            perms.file(fd, os.fstat(fd), NAMES_FILE, writable=True)
        with os.fdopen(fd, encoding="utf-8", errors="replace", newline="\n") as f:
            for line in f:
                written, tab, view = line.rstrip("\n").partition("\t")
                if line.startswith("#") or not tab:
                    continue
                try:
                    self.known[paths.from_bytes(unescape(view))] = paths.from_bytes(unescape(written))
                except ValueError:
                    continue  # not a line the export wrote: ignored

    def alt(self, view: str, written: str) -> str | None:
        """The escaped name this list gives the view path ``view`` whose escaped path would be
        ``written`` (its last name, if the list says so; None if not)."""
        return written.rsplit("/", 1)[-1] if self.known.get(view) == written else None

    def record(self, view: str, written: str) -> None:
        """List ``view`` as written at ``written`` (once)."""
        if self.known.get(view) == written:
            return
        fd = os.open(NAMES_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644,
                     dir_fd=self.root_fd)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            if not os.fstat(fd).st_size:
                if self.perms is not None:
                    self.perms.new_file(fd, NAMES_FILE, writable=True)
                f.write(NAMES_HEADER)
            f.write(f"{escape(written)}\t{escape(view)}\n")
            f.flush()
            os.fsync(fd)
        self.known[view] = written
        self.added += 1


class _Folders:
    """Open descriptors of the folders on the path being walked below DEST, reused while the
    walk (in sorted order) stays below them: a stack for the current path prefix.

    ``open(parts)`` gives the descriptor of DEST/parts[0]/parts[1]/..., opening each component
    with O_NOFOLLOW relative to its parent (and making it first with ``create``). Where a
    component is not a folder (a symlink, a file), that component is reported once as in the
    way and None is returned, now and for everything below it. ``close`` closes them all.
    ``parts`` are the view's names; a folder whose name DEST refused is made, and found, under
    its ``portable_name`` (``disk`` holds the names as written; see ``_Escapes``).

    At most ``MAX_OPEN`` stay open: a valid path may have 2,000 components, more than a process
    may often hold descriptors (1,024). Deeper, the shallowest are closed, and opened again,
    the same way, from the deepest one still open, if the walk goes back up to them.
    """

    MAX_OPEN = 64

    def __init__(self, root_fd: int, root: str, summary: ExportSummary, escapes: _Escapes,
                 in_view: Callable[[Sequence[str]], bool], perms: _Perms | None = None) -> None:
        self.root_fd = root_fd
        self.perms = perms  # given to the folders it opens (made, or found: _Perms)
        self.root = root
        self.summary = summary
        self.escapes = escapes
        self.in_view = in_view  # whether the view holds an entry of these parts
        self.names: list[str] = []
        self.disk: list[str] = []  # the same folders' names in DEST (escaped where it refused one)
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
            opened = self._open_one(parent, here, create)
            if opened is None:
                return None
            self.names.append(here[-1])
            self.disk.append(opened[1])
            self.fds.append(opened[0])
            self._limit()
        return self._deepest()

    def written(self, name: str) -> str:
        """The path, relative to DEST, of ``name`` (as written) in the folder last opened."""
        return "/".join((*self.disk, name))

    def alt(self, parts: Sequence[str]) -> str | None:
        """The escaped name under which the entry ``parts`` (in the folder last opened, which
        is ``parts[:-1]``) was written, if it was."""
        alt = portable_name(parts[-1])
        return self.escapes.alt("/".join(parts), self.written(alt)) if alt != parts[-1] else None

    def find(self, dir_fd: int, parts: Sequence[str]) -> tuple[str, os.stat_result | None]:
        """``_lookup`` of the entry ``parts`` in its open folder ``dir_fd``."""
        return _lookup(dir_fd, parts[-1], self.alt(parts))

    def portable(self, parts: Sequence[str]) -> str:
        """The name to write the entry ``parts`` under where DEST refuses its own: its
        ``portable_name``, unless that is the name of another entry of the same folder in the
        view (then its own again: nothing can be written for it, and it is reported)."""
        alt = portable_name(parts[-1])
        return parts[-1] if alt == parts[-1] or self.in_view((*parts[:-1], alt)) else alt

    def escaper(self, parts: Sequence[str]) -> Callable[[], str]:
        """``portable`` for a file, listed (``_Escapes.record``) before it is made."""
        def escaped() -> str:
            alt = self.portable(parts)
            if alt != parts[-1]:
                self.escapes.record("/".join(parts), self.written(alt))
            return alt
        return escaped

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
            try:  # by the name it was found under: it is there, unless someone moved it
                fd = os.open(self.disk[i], _DIR_FLAGS, dir_fd=parent)
            except OSError as e:
                if e.errno not in (*_NOT_A_FOLDER, *_NOT_OURS, errno.ENOENT):
                    raise
                self._in_the_way(tuple(self.names[: i + 1]))
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

    def _open_one(self, parent: int, here: tuple[str, ...], create: bool) -> tuple[int, str] | None:
        """The folder ``here`` (opened, and its name in DEST), made first with ``create``."""
        name = here[-1]
        known = self.alt(here)
        for candidate in (name, known) if known else (name,):
            try:
                return self._opened(os.open(candidate, _DIR_FLAGS, dir_fd=parent), here, candidate, made=False)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno in fsutil.REFUSED_NAME:
                    continue  # a name DEST refuses is not there
                if e.errno not in (*_NOT_A_FOLDER, *_NOT_OURS):
                    raise
                self._in_the_way(here)
                return None
        if not create:
            return None
        alt = self.portable(here)
        names = (name, alt) if alt != name else (name,)
        for candidate in names:
            made = True
            try:
                os.mkdir(candidate, dir_fd=parent)
            except FileExistsError:  # made meanwhile: opening it decides
                made = False
            except OSError as e:
                if candidate == name and len(names) > 1 and e.errno in _REFUSED:
                    continue  # DEST refuses the name: the escaped one, then
                if e.errno not in _REFUSED:
                    raise
                self._in_the_way(here)
                return None
            try:
                return self._opened(os.open(candidate, _DIR_FLAGS, dir_fd=parent), here, candidate, made=made)
            except OSError as e:
                if e.errno not in (*_NOT_A_FOLDER, *_NOT_OURS, errno.ENOENT):  # ENOENT: removed meanwhile
                    raise
                self._in_the_way(here)
                return None
        return None  # not reached: the last candidate returns or reports

    def _opened(self, fd: int, here: tuple[str, ...], on_disk: str, made: bool) -> tuple[int, str]:
        if self.perms is not None and self.perms.active:
            try:
                where = self.path((*self.disk, on_disk))  # self.disk: the folders above it
                if made:
                    self.perms.new_folder(fd, where)
                else:
                    self.perms.folder(fd, where)
            except BaseException:
                os.close(fd)
                raise
        if on_disk != here[-1]:  # made (or found made by a run that stopped) under the escaped name
            self.escapes.record("/".join(here), self.written(on_disk))
        return fd, on_disk

    def _in_the_way(self, here: tuple[str, ...]) -> None:
        self.blocked.add(here)
        self.summary.in_the_way(self.path(here))

    def _close_from(self, depth: int) -> None:
        while len(self.fds) > depth:
            fd = self.fds.pop()
            if fd is not None:
                os.close(fd)
            self.names.pop()
            self.disk.pop()

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


def _move_aside(folders: _Folders, dir_fd: int, parts: Sequence[str]) -> bool:
    """Move the export's own current/ entry ``name`` to ``aside`` in the same open folder,
    never overwriting.

    Used when a path that was a file becomes a folder: the view then shows the folder under the
    name and the file as ``NAME~file``, and moving the old entry there gives the layout a fresh
    export gives. Only the name moves: the file stays the same hard link to its version. An
    ``aside`` that is already the same file (a run that stopped half-way) is kept, and the
    extra link dropped; anything else at ``aside`` leaves ``name`` where it is (False).
    """
    aside = (*parts[:-1], parts[-1] + CONFLICT_SUFFIX)
    (name, st), (_, at) = folders.find(dir_fd, parts), folders.find(dir_fd, aside)
    if st is None or (at is not None and _identity(at) != _identity(st)):
        return False
    # links (or renames), then drops the name ``name``
    fsutil.link_new(name, aside[-1], dir_fd=dir_fd, alt=folders.escaper(aside))
    return True


def _link_or_copy(src_fd: int, src: str, ident: Identity, dst_fd: int, dst: str,
                  alt: Callable[[], str] | None = None, perms: _Perms | None = None) -> bool:
    """Make ``dst`` (in ``dst_fd``) a hard link to the version file ``src`` (in ``src_fd``),
    never overwriting, or a copy of it where hard links fail; where the destination refuses
    the name ``dst``, under the name ``alt()`` gives. False, with nothing made, if ``src`` is
    no longer the file ``ident`` it was (someone swapped it)."""
    st = fsutil.lstat_at(src_fd, src)
    if st is None or not stat.S_ISREG(st.st_mode) or _identity(st) != ident:
        return False
    try:
        os.link(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
        return True
    except FileExistsError:
        raise
    except OSError as e:
        if alt is not None and e.errno in (*fsutil.REFUSED_NAME, errno.ENOENT) and (other := alt()) != dst:
            with contextlib.suppress(OSError):
                os.link(src, other, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
                return True
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=src_fd)
    with os.fdopen(fd, "rb") as fi:
        if _identity(os.fstat(fd)) != ident:
            return False
        with fsutil.new_file_at(dst_fd, dst, mode=perms.file_mode if perms else FILE_MODE, alt=alt) as fo:
            if perms is not None:
                perms.new_file(fo.fileno(), dst)
            while chunk := fi.read(1 << 20):
                fo.write(chunk)
    return True


def last_clean_export(store: Store, study: str, dest: str) -> int | None:
    """The last submission of ``study`` that this account's last export into ``dest`` wrote, if
    that export ended clean and DEST is as it left it (``_LastExport``); else None. Costs one
    small file read and a few stats of DEST. Raises OSError where DEST cannot be opened."""
    dest = os.path.abspath(dest)  # as export_study keys its record
    fd = os.open(dest, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        return _LastExport(store, study, dest).load(fd)
    finally:
        os.close(fd)


class _LastExport:
    """What the exporting account remembers of its last export of a study into DEST that ended
    clean (``ExportSummary.clean``): the last submission it exported, and DEST as it left it.

    Kept in the account's own state folder (the client's, ``DITTOHEAD_STATE_DIR``), never in
    DEST: nobody else can write it, and DEST holds the view and nothing else. It is trusted only
    while DEST, and its current/, submissions/ and versions/ folders, are the very folders that
    export left (device, inode) with no entry added, removed or renamed in them since (mtime):
    a DEST emptied or made anew, or a file put in or taken out at its top, makes the next export
    look at everything again. What it cannot see (an entry removed deeper down) is put back by
    ``export --verify``, which looks at everything.
    """

    VERSION = 1

    def __init__(self, store: Store, study: str, dest: str) -> None:
        from dittohead.client.cache import state_dir
        from dittohead.hashing import digest

        self.key = {"version": self.VERSION, "store": store.config.store_id, "study": study, "dest": dest}
        name = digest(json.dumps(self.key, sort_keys=True).encode()).hex()[:32]
        self.path = os.path.join(state_dir(), "exports", f"{name}.json")

    @staticmethod
    def _fingerprint(root_fd: int) -> list[list[int]] | None:
        out = []
        for name in (None, "current", "submissions", "versions"):
            try:
                st = os.fstat(root_fd) if name is None else os.stat(name, dir_fd=root_fd, follow_symlinks=False)
            except OSError:
                return None
            if not stat.S_ISDIR(st.st_mode):
                return None
            out.append([st.st_dev, st.st_ino, st.st_mtime_ns])
        return out

    def load(self, root_fd: int) -> int | None:
        """The last submission the last clean export wrote, if DEST is as it left it."""
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or {k: doc.get(k) for k in self.key} != self.key:
            return None
        seq = doc.get("seq")
        if not isinstance(seq, int) or seq < 0 or doc.get("dest_folders") != self._fingerprint(root_fd):
            return None
        return seq

    def save(self, seq: int, root_fd: int) -> None:
        """Remember ``seq`` and DEST as it is now (after the export, made durable); a state
        folder that cannot be written only costs the next export its shortcut."""
        fingerprint = self._fingerprint(root_fd)
        if fingerprint is None:
            return
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{fsutil.tmp_basename()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({**self.key, "seq": seq, "dest_folders": fingerprint}, f)
            os.replace(tmp, self.path)

    def forget(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def export_study(store: Store, study: str, dest: str,
                 progress: Callable[[int], None] | None = None, *, verify: bool = False) -> ExportSummary:
    """Write what is missing of the study's view into ``dest``; never fails because of what is
    already there.

    After an export into ``dest`` that ended clean, the next one looks only at what the
    submissions since brought (``_Exporter.since``), where DEST is as that export left it
    (``_LastExport``); ``verify``, or an earlier export that left anything in the way or out,
    makes it look at everything (``_Exporter.everything``), and put back what is missing.

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
    if os.name == "posix" and sys.getfilesystemencoding().replace("-", "").lower() != "utf8":
        raise DittoheadError(  # names would not be written as their bytes
            f"export writes every name as its bytes and needs Python's UTF-8 mode where the locale's "
            f"encoding is {sys.getfilesystemencoding()}: set PYTHONUTF8=1")
    dest = os.path.abspath(dest)
    perms = _Perms(view.access, store.root.study_settings(study).readers, verify, summary)
    made = not os.path.isdir(dest)
    os.makedirs(dest, exist_ok=True)
    root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)  # DEST itself: the admin's path
    try:
        if made:
            perms.new_folder(root_fd, dest)
        else:
            perms.folder(root_fd, dest)
    except BaseException:
        os.close(root_fd)
        raise
    last = _LastExport(store, study, dest)
    upto = view.last_seq  # what this export covers at least (a later ingest: the next one's)
    after = None if verify else last.load(root_fd)
    if after is not None and after > upto:
        after = None  # an index behind DEST: everything, then
    last.forget()  # until this export ends clean
    completed = False
    try:
        escapes = _Escapes(root_fd, perms)

        def in_view(parts: Sequence[str]) -> bool:
            return view.exists("/".join(parts))

        folders = _Folders(root_fd, dest, summary, escapes, in_view, perms)  # where the export writes
        sources = _Folders(root_fd, dest, summary, escapes, in_view)  # versions/, where links are made from
        try:
            exporter = _Exporter(store, view, folders, sources, summary, progress, perms)
            if after is None:
                exporter.everything()
            else:
                summary.since = after
                exporter.since(after, upto)
            _export_log(store, study, root_fd, dest, upto, after, perms, summary)
            completed = True
        finally:
            folders.close()
            sources.close()
            summary.escaped_new = escapes.added
    finally:
        fsutil.sync_filesystem(root_fd)  # the links of current/ and submissions/, and the folders
        if completed and summary.clean:
            last.save(upto, root_fd)
        os.close(root_fd)
    return summary


def _export_log(store: Store, study: str, root_fd: int, dest: str, upto: int, after: int | None,
                perms: _Perms, summary: ExportSummary) -> None:
    """DEST/log.jsonl through submission ``upto``: made, or appended to with the lines it lacks.

    The bytes already there never change. The file counts as the export's own only if it is a
    regular file owned by the exporting account; its bytes must be the start of the log as the
    view renders it (a line cut short by a crash is finished), or else it is left as it is and
    reported in the way. After a clean export (``after``), only its last line is compared, with
    the line its submission renders to, and only the lines after it are rendered: the cost of
    what is new, not of the study's history. The file is read-only (``_Perms``), made writable
    for its owner only while lines are added."""
    where = os.path.join(dest, LOG_NAME)
    try:
        fd = os.open(LOG_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=root_fd)
    except FileNotFoundError:
        data = render_log(store, study, 0, upto)
        try:
            with fsutil.new_file_at(root_fd, LOG_NAME, mode=perms.file_mode) as f:
                perms.new_file(f.fileno(), where)
                f.write(data)
        except FileExistsError:  # made meanwhile by someone else
            summary.in_the_way(where)
            return
        summary.log_lines += data.count(b"\n")
        return
    except OSError as e:
        if e.errno not in (*_NOT_A_FOLDER, *_NOT_OURS, errno.ENXIO):
            raise
        summary.in_the_way(where)  # a symlink, or not ours to read
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != perms.euid:
            summary.in_the_way(where)
            return
        more = _log_to_add(store, study, fd, st.st_size, upto, after)
        if more is None:
            summary.in_the_way(where)
            return
        if more:
            mode = stat.S_IMODE(st.st_mode)
            os.fchmod(fd, mode | 0o200)  # writable, for its owner, while it is appended to
            wfd = os.open(LOG_NAME, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=root_fd)
            try:
                now = os.fstat(wfd)
                if _identity(now) != _identity(st) or now.st_size != st.st_size:  # swapped, or another export's
                    summary.in_the_way(where)
                    return
                view = memoryview(more)
                while view:
                    view = view[os.write(wfd, view):]
            finally:
                os.close(wfd)
                os.fchmod(fd, mode)
            summary.log_lines += more.count(b"\n")
        perms.file(fd, os.fstat(fd), where)
    finally:
        os.close(fd)


def _log_to_add(store: Store, study: str, fd: int, size: int, upto: int, after: int | None) -> bytes | None:
    """What DEST's log.jsonl (``fd``, ``size`` bytes) lacks of the log through ``upto``; None
    if what is there is not the start of the log."""
    if size == 0:
        return render_log(store, study, 0, upto)
    if after is not None:  # after a clean export: its last line, and the lines since
        tail = os.pread(fd, min(size, 1 << 16), max(0, size - (1 << 16)))
        if tail.endswith(b"\n") and (b"\n" in tail[:-1] or len(tail) == size):
            last = tail[:-1].rsplit(b"\n", 1)[-1] + b"\n"
            try:
                seq = json.loads(last)["seq"]
            except (ValueError, KeyError, TypeError):
                seq = None
            s = store.index.submission(study, seq) if isinstance(seq, int) else None
            if s is not None and log_line(s) == last:
                return render_log(store, study, seq, upto) if seq < upto else b""
    # everything: the whole file against the whole log
    want = render_log(store, study, 0, upto)
    have = os.pread(fd, size + 1, 0)
    if len(have) != size:
        return None  # changed while read
    if want.startswith(have):
        return want[len(have):]
    if have.startswith(want):
        return b""  # an index behind DEST: the next export
    return None


class _VersionFiles:
    """The version files in DEST/versions/ that the export may link to, found again where they
    are needed rather than remembered: the export holds one folder's listing per level of the
    view, never a table of the study's versions.

    A file at a version's place counts as that version if it is what an export wrote there: a
    regular file of the version's size, owned by the account that exports (no other account can
    make one it owns), never writable (``earlier``). A file this export has just written counts
    too, however the filesystem shows it (a share may show every file writable, or owned by
    another account): those few are remembered (``written``) only where the filesystem does not
    show them as an earlier export's, which on a local disk is never.
    """

    def __init__(self, view: StudyView, sources: _Folders) -> None:
        self.view = view
        self.sources = sources  # versions/, opened apart from where the export writes
        self.euid = os.geteuid() if hasattr(os, "geteuid") else 0
        self.written: set[Identity] = set()

    @staticmethod
    def parts(v: Version) -> list[str]:
        """Where ``v``'s version file goes: versions/PATH/NAME (or NAME~file, where a folder of
        the view has NAME: the walk over versions/ gives that)."""
        return ["versions", *v.path.split("/"), version_name(v)]

    def earlier(self, v: Version, st: os.stat_result) -> bool:
        return (stat.S_ISREG(st.st_mode) and st.st_size == v.size and st.st_uid == self.euid
                and not st.st_mode & 0o222)

    def wrote(self, v: Version, st: os.stat_result) -> None:
        if not self.earlier(v, st):
            self.written.add(_identity(st))

    def find(self, v: Version) -> tuple[int, str, Identity] | None:
        """``v``'s version file: its folder's descriptor (in ``sources``), its name there and
        its identity; None where it was not written (damaged in the store) or what is there is
        not the export's (reported by the pass over versions/)."""
        *parent, _ = where = self.parts(v)
        src_fd = self.sources.open(parent, create=False)
        if src_fd is None:
            return None
        name, st = self.sources.find(src_fd, where)
        if st is not None and stat.S_ISDIR(st.st_mode):  # the view's folder of that name: NAME~file
            name, st = self.sources.find(src_fd, [*parent, where[-1] + CONFLICT_SUFFIX])
        if st is None or not (self.earlier(v, st) or (stat.S_ISREG(st.st_mode) and _identity(st) in self.written)):
            return None
        return src_fd, name, _identity(st)

    def of_path(self, path: str) -> set[Identity]:
        """The identities of every version file of the study path ``path`` in DEST."""
        out = set()
        for v in self.view.store.index.versions(self.view.study, path):
            found = self.find(v)
            if found is not None:
                out.add(found[2])
        return out


class _Exporter:
    """What the export does for each entry of the view, and the two ways it goes through them:
    ``everything`` (three walks of the view) and ``since`` (only what submissions after an
    earlier export brought)."""

    def __init__(self, store: Store, view: StudyView, folders: _Folders, sources: _Folders,
                 summary: ExportSummary, progress: Callable[[int], None] | None, perms: _Perms) -> None:
        self.store = store
        self.perms = perms
        self.view = view
        self.folders = folders
        self.summary = summary
        self.progress = progress
        self.files = _VersionFiles(view, sources)
        # Version files written, not yet durable nor under their names: (view path, temporary
        # name) each, made durable together and then linked into place (flush).
        self.pending: list[tuple[list[str], str, Version]] = []
        self.pending_bytes = 0

    def flush(self) -> None:
        """Make the version files written since the last flush durable with one sync of DEST's
        filesystem, then link each into place: a file under a version's name is always whole,
        and a crash costs at most the batch's temporary files (``.tmp-*``), never an fsync per
        file (the one cost that kept a full export from a copy's speed)."""
        if not self.pending:
            return
        folders, summary = self.folders, self.summary
        fsutil.sync_filesystem(folders.root_fd)
        for where, tmp, v in self.pending:
            *parent, name = where
            dir_fd = folders.open(parent, create=False)
            if dir_fd is None:
                continue  # taken away meanwhile: reported
            try:
                if not fsutil.link_new(tmp, name, dir_fd=dir_fd, alt=folders.escaper(where), sync=False):
                    summary.in_the_way(folders.path(where))  # made meanwhile by someone else
                    continue
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                if e.errno not in _REFUSED:
                    raise
                summary.in_the_way(folders.path(where))  # a name DEST refuses, with no free escaped name
                continue
            st = folders.find(dir_fd, where)[1]
            if st is not None:
                self.files.wrote(v, st)
            summary.written += 1
            summary.bytes += v.size
        self.pending.clear()
        self.pending_bytes = 0

    def everything(self) -> None:
        """Three walks of the view (each folder's entries sorted): versions/ first, writing
        each version's bytes once, then submissions/ and current/, linking to those files."""
        for vpath, node in self.view.walk("versions"):
            if isinstance(node, Dir):
                self.folders.open(vpath.split("/"), create=False)  # reports a symlink or file in the way
            elif isinstance(node, File):
                self.version(vpath.split("/"), node.version)
        self.flush()
        for top in ("submissions", "current"):
            for vpath, node in self.view.walk(top):
                if isinstance(node, Dir):
                    self.folder(vpath.split("/"))
                elif isinstance(node, File):
                    self.entry(vpath.split("/"), node.version)

    def since(self, after: int, upto: int) -> None:
        """What submissions ``after`` + 1 to ``upto`` brought, as ``everything`` would do it,
        looking at nothing else: their new versions' files, their folders in submissions/, and
        the current/ entries of the paths they changed (with the entry of a file that a new path
        made a folder too, moved aside to NAME~file as ``folder`` does)."""
        view = self.view
        idx = view.store.index
        aside: set[str] = set()  # folders that new paths made of what were files
        for v in idx.versions_brought(view.study, after, upto):
            self.version(view.version_path(v).split("/"), v)
            if v.n == 1:  # a new path: the folders above it may have been files until now
                aside.update(view.folders_that_are_files(v.path))
        self.flush()
        for seq in range(after + 1, upto + 1):
            top = view.submission_path(seq)
            if top is None:
                continue
            self.folder(top.split("/"))
            for vpath, node in view.walk(top):
                if isinstance(node, Dir):
                    self.folder(vpath.split("/"))
                elif isinstance(node, File):
                    self.entry(vpath.split("/"), node.version)
        for folder in sorted(aside, key=lambda p: p.count("/")):  # shallowest first
            self.folder(f"current/{folder}".split("/"))
            file = idx.latest_version(view.study, folder)
            shown = view.current_path(folder)
            if file is not None and shown is not None:
                self.entry(shown.split("/"), file)
        for path, n in idx.paths_changed(view.study, after, upto):
            shown = view.current_path(path)
            file = idx.version(view.study, path, n)
            if file is not None and shown is not None:
                self.entry(shown.split("/"), file)

    def version(self, where: list[str], v: Version) -> None:
        """Write ``v``'s bytes at the view path ``where`` in versions/, unless an earlier
        export's file is there (or something else is: in the way)."""
        folders, summary = self.folders, self.summary
        dir_fd = folders.open(where[:-1], create=True)
        if dir_fd is None:
            return  # something not a folder in the way: reported
        st = folders.find(dir_fd, where)[1]
        if st is not None:
            # An earlier export's (_VersionFiles.earlier), or in the way.
            if self.files.earlier(v, st):
                summary.unchanged += 1
                if self.perms.file_wrong(st):
                    self.repair(dir_fd, folders.find(dir_fd, where)[0], st, folders.path(where))
            else:
                summary.in_the_way(folders.path(where))
            return
        t = version_os_mtime(v)
        tmp = fsutil.tmp_basename()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, self.perms.file_mode,
                         dir_fd=dir_fd)
        except OSError as e:
            if e.errno not in _REFUSED:
                raise
            summary.in_the_way(folders.path(where))  # a folder not ours to write in
            return
        try:
            with os.fdopen(fd, "wb") as f:
                if self.perms.active:
                    self.perms.new_file(f.fileno(), folders.path(where))
                write_version(self.store, v, f)
                f.flush()
                os.utime(f.fileno(), (t, t))
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            if not isinstance(e, IntegrityError):
                raise
            summary.damaged.append(f"{v.path} v{v.n}: {e}")  # no part of it stays; the rest goes on
            return
        self.pending.append((where, tmp, v))
        self.pending_bytes += v.size
        if self.progress:
            self.progress(v.size)
        if self.pending_bytes >= FLUSH_BYTES or len(self.pending) >= FLUSH_FILES:
            self.flush()

    def repair(self, dir_fd: int, name: str, st: os.stat_result, where: str) -> None:
        """Give an earlier export's version file ``name`` in ``dir_fd``, whose attributes were
        ``st``, the study's group and mode (``_Perms``): opened without following a symlink,
        and only if it is still that file."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError:
            return  # gone or swapped meanwhile: the next --verify
        try:
            now = os.fstat(fd)
            if _identity(now) == _identity(st):
                self.perms.file(fd, now, where)
        finally:
            os.close(fd)

    def folder(self, here: list[str]) -> None:
        """A folder of submissions/ or current/ (``here``: its view path's names)."""
        folders = self.folders
        if here[0] == "current" and len(here) > 1:
            # current/PATH/ is a folder now; an old entry of ours for the file PATH moves to
            # PATH~file, where the view shows that file (see export_study).
            dir_fd = folders.open(here[:-1], create=False)
            if dir_fd is not None:
                st = folders.find(dir_fd, here)[1]
                if (st is not None and stat.S_ISREG(st.st_mode)
                        and _owned(st, self.files.of_path("/".join(here[1:])))
                        and _move_aside(folders, dir_fd, here)):
                    self.summary.current_updated += 1
        # A folder in the view: a symlink or a file in its place is reported even where nothing
        # is left to write beneath it.
        folders.open(here, create=False)

    def entry(self, here: list[str], v: Version) -> None:
        """The entry ``here`` (view path's names) of submissions/ or current/: a link to the
        version file of ``v``; in current/, an earlier link of ours is swapped to it."""
        folders, summary, files = self.folders, self.summary, self.files
        *parent, name = here
        found = files.find(v)
        if found is None:
            return  # not written: what was in its way is reported already
        src_fd, src, ident = found
        dir_fd = folders.open(parent, create=True)
        if dir_fd is None:
            return
        on_disk, st = folders.find(dir_fd, here)
        if st is not None and _identity(st) == ident:
            summary.unchanged += 1
            return
        try:
            if st is None:
                try:
                    if _link_or_copy(src_fd, src, ident, dir_fd, name, folders.escaper(here), self.perms):
                        summary.linked += 1
                    else:  # the version file was swapped since it was written
                        summary.in_the_way(folders.path(files.parts(v)))
                except FileExistsError:  # made meanwhile by someone else
                    summary.in_the_way(folders.path(here))
            elif here[0] == "current" and _owned(st, files.of_path(v.path)):
                found = files.find(v)  # again: of_path moved ``sources``
                if found is None:
                    return
                src_fd, src, ident = found
                tmp = fsutil.tmp_basename()
                if _link_or_copy(src_fd, src, ident, dir_fd, tmp, perms=self.perms):
                    os.replace(tmp, on_disk, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                    summary.current_updated += 1
                else:
                    summary.in_the_way(folders.path(files.parts(v)))
            else:
                summary.in_the_way(folders.path(here))
        except OSError as e:
            if e.errno not in _REFUSED:
                raise
            # a folder not ours to write in, or a name DEST refuses with no free escaped name
            summary.in_the_way(folders.path(here))
