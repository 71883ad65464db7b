"""Durable, no-overwrite file operations (invariant 1).

New files are written under a temporary name, fsynced, then linked into place: ``os.link``
fails if the target exists, so nothing is ever overwritten, and a crash leaves at worst a
temporary file, never a half-written one under its real name.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from typing import BinaryIO


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_name(directory: str | os.PathLike[str], hint: str = "") -> str:
    return os.path.join(directory, f".tmp-{hint}{os.urandom(8).hex()}")


# What creating a name gives where the filesystem will not hold that name (an SMB share, a FAT
# disk: a ':' or a trailing dot; any filesystem: a name too long)...
REFUSED_NAME = (errno.EINVAL, errno.EILSEQ, errno.ENAMETOOLONG)
# ...and what it may give instead, in a folder known to be there and writable: EPERM (a FAT
# disk), EACCES, ENOENT (Linux's SMB client, for the server's STATUS_OBJECT_NAME_INVALID).
REFUSED_NAME_TOO = (errno.EPERM, errno.EACCES, errno.ENOENT)


def link_new(tmp: str, dest: str, *, dir_fd: int | None = None, alt: Callable[[], str] | None = None,
             sync: bool = True) -> bool:
    """Put the finished file ``tmp`` at ``dest`` without overwriting; remove ``tmp``. With
    ``dir_fd``, both are names in that open folder (``tmp_basename``), and no symlink in them is
    followed. Where the filesystem refuses the name ``dest`` (``tmp`` beside it was made, so it
    is the name), ``alt()`` gives the name to use instead, if ``alt`` is given.

    Returns True if the file was put in place, False if its name existed already (the caller
    decides whether an existing file is acceptable: for content-addressed names it is).
    """
    try:
        placed = _place(tmp, dest, dir_fd)
    except OSError as e:
        if alt is None or e.errno not in (*REFUSED_NAME, *REFUSED_NAME_TOO):
            raise
        other = alt()
        if other == dest:
            raise
        placed = _place(tmp, other, dir_fd)
    if placed is not None:  # linked, or the name was taken: tmp is still there
        os.unlink(tmp, dir_fd=dir_fd)
    if sync:  # else the caller makes the folder durable later (sync_filesystem)
        if dir_fd is None:
            fsync_dir(os.path.dirname(dest))
        else:
            fsync_dir_fd(dir_fd)
    return placed is not False


def sync_filesystem(fd: int) -> None:
    """Make everything written on the filesystem of the open file ``fd`` durable, at once
    (syncfs(2) on Linux; sync(2) elsewhere): one call for a batch of files written without an
    fsync each."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.syncfs(fd) == 0:
            return
    except (OSError, AttributeError):
        pass
    os.sync()


def _place(tmp: str, dest: str, dir_fd: int | None) -> bool | None:
    """Link ``tmp`` to ``dest`` (True), or find ``dest`` taken (False); on a filesystem without
    hard links, rename ``tmp`` to a free ``dest`` (None: ``tmp`` is gone)."""
    try:
        os.link(tmp, dest, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
    # A filesystem without hard links: rename, after checking (single writer, under lock).
    try:
        os.stat(dest, dir_fd=dir_fd, follow_symlinks=False)
        return False
    except FileNotFoundError:
        os.rename(tmp, dest, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return None


@contextlib.contextmanager
def new_file(dest: str, *, mode: int = 0o644, tmp_dir: str | None = None) -> Iterator[BinaryIO]:
    """Write a new file durably: yields a file; on clean exit, fsync and link to ``dest``.

    The file gets ``mode`` exactly, whatever the umask (a daemon run with umask 077 would
    otherwise publish receipts and have-segments that no collector can read).
    Raises FileExistsError if ``dest`` exists (checked again at the link).
    """
    directory = tmp_dir or os.path.dirname(dest)
    tmp = tmp_name(directory)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if not link_new(tmp, dest):
            raise FileExistsError(errno.EEXIST, "file exists", dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_new(dest: str, data: bytes, *, mode: int = 0o644, exist_ok: bool = False) -> bool:
    """Write ``data`` as a new durable file; with ``exist_ok``, an existing ``dest`` is kept."""
    try:
        with new_file(dest, mode=mode) as f:
            f.write(data)
        return True
    except FileExistsError:
        if exist_ok:
            return False
        raise


def replace_file(dest: str, data: bytes, *, mode: int = 0o600, durable: bool = True) -> None:
    """Write ``data`` over ``dest`` (a file of this account's own state) whole: into a new
    temporary file beside it (``mode``, never through a symlink), fsync, rename over ``dest``,
    fsync the folder. ``durable`` False skips both fsyncs, for a file a crash may take back to an
    older whole version (a report of how things stand, written often). Raises OSError; no
    temporary file is left behind."""
    directory = os.path.dirname(dest)
    tmp = tmp_name(directory)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(directory)


def read_limited(path: str, limit: int, *, follow: bool = False) -> bytes:
    """Read a whole regular file of at most ``limit`` bytes, never following a symlink."""
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as f:
        if os.fstat(fd).st_size > limit:
            raise ValueError(f"{path}: larger than {limit} bytes")
        data = f.read()
    if len(data) > limit:
        raise ValueError(f"{path}: larger than {limit} bytes")
    return data


# Relative to an open folder (``dir_fd``): for folders another account can change, where a path
# walked twice could lead somewhere else between the two walks (a folder swapped for a symlink).
# Nothing below follows a symlink in ``name``.


def tmp_basename(hint: str = "") -> str:
    """A fresh temporary file name, without a folder (``tmp_name``'s last part)."""
    return f".tmp-{hint}{os.urandom(8).hex()}"


def fsync_dir_fd(dir_fd: int) -> None:
    """Make the entries of an open folder durable (errors ignored, as ``fsync_dir`` does)."""
    with contextlib.suppress(OSError):
        os.fsync(dir_fd)


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """``name``'s own attributes in the open folder ``dir_fd`` (a symlink's, not its target's);
    None if there is no such entry."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def new_file_at(dir_fd: int, name: str, *, mode: int = 0o644, times: tuple[float, float] | None = None,
                alt: Callable[[], str] | None = None) -> Iterator[BinaryIO]:
    """``new_file`` inside one open folder: yields a file; on clean exit, sets its (atime,
    mtime) to ``times`` if given, fsyncs it and links it to ``name`` in ``dir_fd`` (or to
    ``alt()`` where the filesystem refuses ``name``: ``link_new``).

    The temporary file is created there with O_EXCL|O_NOFOLLOW. Raises FileExistsError if
    ``name`` exists (checked at the link); on any error the temporary file is removed.
    """
    tmp = tmp_basename()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, mode, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if times is not None:
                os.utime(f.fileno(), times)
            os.fsync(f.fileno())
        if not link_new(tmp, name, dir_fd=dir_fd, alt=alt):
            raise FileExistsError(errno.EEXIST, "file exists", name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
