"""Taking a committed submission out of the inbox: by descriptors, into copies the daemon owns.

An uploader owns the folder it committed and everything in it, and keeps that ownership after
the commit: it may rename, truncate or swap its files, add folders, or hold descriptors open,
at any time. So nothing of it is trusted or kept (invariant 6). The daemon

1. lists the inbox by name bytes: a name is checked before it is used anywhere;
2. opens the folder relative to the inbox's descriptor (``O_DIRECTORY|O_NOFOLLOW``), lists it
   through that descriptor, opens each entry relative to it (``O_NOFOLLOW|O_NONBLOCK``), checks
   what it opened with ``fstat`` (a regular, singly-linked file with a name a submission may
   hold, within the size limits) and copies its bytes into a file of its own, in a folder of its
   own (``processing/NAME/``; ``copy_file_range``, in the kernel): every path is opened once,
   and the verification then reads only those copies;
3. once the submission is ingested or rejected, empties and removes the uploader's folder (the
   inbox's setgid group and the client's group-writable folder let it), or, where the uploader
   has made that impossible, renames it within the inbox to a dot name, where nothing reads it.

Errors are sorted by whose they are: anything wrong with what the uploader left, including a
read of its files that fails, is the submission's and rejects it (``RejectedSubmission``); a
failure to write the daemon's own copies (a full disk) is the server's, and is raised as it is.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
from collections.abc import Iterator
from concurrent.futures import Future

from dittohead import directio
from dittohead import format as fmt
from dittohead.display import escape
from dittohead.errors import RejectedSubmission

log = logging.getLogger(__name__)

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO put in place of a folder or file never blocks
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS = os.O_RDONLY | _NOFOLLOW | _NONBLOCK | getattr(os, "O_CLOEXEC", 0)
COPY_MODE = 0o600
_NOT_REGULAR = "not a regular file (folder, FIFO, socket or device)"
# Set aside in the inbox: a dot name (ignored like a client's staging folder) that no client
# makes, as a submission name starts with a letter or digit.
LEFT_PREFIX = ".~left-"
# errnos of a failed copy that are the server's trouble (its disk), never the submission's.
_SERVER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def _ascii_name(raw: bytes, *patterns: re.Pattern[str] | str) -> str | None:
    """``raw`` as text if it is ASCII and matches one of ``patterns`` (a pattern, or a name
    as it is), else None."""
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    ok = any(p == name if isinstance(p, str) else p.match(name) for p in patterns)
    return name if ok else None


def submission_name(raw: bytes) -> str | None:
    """The submission name ``raw`` stands for, or None if it is not a valid one."""
    return _ascii_name(raw, fmt.SUBMISSION_NAME_RE)


def submission_file_name(raw: bytes) -> str | None:
    """The name of a file a submission may hold (``manifest``, ``<pack id>.pack``), or None."""
    return _ascii_name(raw, fmt.MANIFEST_NAME, fmt.PACK_FILE_RE)


def arrivals(inbox: str) -> list[tuple[int, bytes]]:
    """The committed entries of an inbox, as (ctime_ns, name bytes), oldest first. An entry
    that cannot even be looked at (gone meanwhile; a filesystem mounted over it) is left out."""
    out = []
    with contextlib.suppress(FileNotFoundError), os.scandir(os.fsencode(inbox)) as it:
        for e in it:
            if e.name.startswith(b"."):
                continue  # a client's staging folder, or one set aside
            try:
                out.append((e.stat(follow_symlinks=False).st_ctime_ns, e.name))
            except OSError as err:
                if not isinstance(err, FileNotFoundError):
                    log.warning("inbox entry %s left alone: %s", escape(e.name), err.strerror)
    out.sort()
    return out


def _rejected(what: str, e: OSError) -> RejectedSubmission:
    why = {errno.ELOOP: "a symlink", errno.ENOTDIR: "not a folder",
           errno.EACCES: "permission denied (the daemon's group must be able to read it)",
           errno.ENOENT: "removed before it was taken"}.get(e.errno or 0, e.strerror or str(e))
    return RejectedSubmission(f"{what}: {why}")


def open_submission(inbox: str, raw: bytes) -> int:
    """A descriptor of the committed folder ``inbox/raw``, never through a symlink."""
    inbox_fd = os.open(inbox, _DIR_FLAGS)
    try:
        return os.open(raw, _DIR_FLAGS, dir_fd=inbox_fd)
    except OSError as e:
        kind = _kind(inbox_fd, raw)
        if kind == "symlink":
            raise RejectedSubmission("the submission is a symlink") from None
        if kind in ("file", "special") or e.errno == errno.ENOTDIR:
            raise RejectedSubmission("the submission is not a folder") from None
        raise _rejected("the submission", e) from None
    finally:
        os.close(inbox_fd)


def _kind(dir_fd: int, raw: bytes | str) -> str | None:
    """"symlink", "folder", "file" or "special" (FIFO, socket, device) for an entry, None if it
    cannot be looked at: a look, for a reason's words only."""
    try:
        mode = os.stat(raw, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        return None
    if stat.S_ISLNK(mode):
        return "symlink"
    return "folder" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "special"


def read_small(dir_fd: int, name: str, limit: int) -> bytes:
    """A regular file of at most ``limit`` bytes in the folder ``dir_fd``, read once."""
    fd = _open_entry(dir_fd, name)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise RejectedSubmission(f"{name}: larger than the limit of {limit} bytes")
        data = bytearray()
        while len(data) <= limit:
            more = os.read(fd, limit + 1 - len(data))
            if not more:
                break
            data += more
        if len(data) > limit:
            raise RejectedSubmission(f"{name}: larger than the limit of {limit} bytes")
        return bytes(data)
    except OSError as e:
        raise _rejected(name, e) from None
    finally:
        os.close(fd)


def _open_entry(dir_fd: int, name: str) -> int:
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if _kind(dir_fd, name) == "special":  # a socket cannot be opened
            raise RejectedSubmission(f"{name}: {_NOT_REGULAR}") from None
        raise _rejected(name, e) from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = _NOT_REGULAR
    elif st.st_nlink != 1:
        problem = f"a hard link (link count {st.st_nlink})"
    if problem:
        os.close(fd)
        raise RejectedSubmission(f"{name}: {problem}")
    return fd


def _entry_names(sub_fd: int) -> Iterator[bytes]:
    with os.scandir(sub_fd) as it:  # names as str (surrogateescape): encoded back exactly
        for e in it:
            yield os.fsencode(e.name)


def take(inbox: str, raw: bytes, dest: str) -> Taking:
    """Start copying the committed submission ``inbox/raw`` into the daemon's own folder ``dest``:
    the manifest at once, the packs on a thread (``Taking``).

    Raises RejectedSubmission for anything wrong with the submission (its shape, a file that
    cannot be read, one that grows or shrinks while it is copied); an OSError for the daemon's
    own side. ``Taking.ready`` raises the same for a pack.
    """
    sub_fd = open_submission(inbox, raw)
    try:
        try:
            names = sorted(set(_entry_names(sub_fd)))  # a name seen twice (renamed meanwhile): once
        except OSError as e:
            raise _rejected("the submission", e) from None
        packs: list[tuple[int, str]] = []
        for b in names:
            name = submission_file_name(b)
            if name is None:
                raise RejectedSubmission(f"{escape(b)}: {_unexpected(sub_fd, b)}")
            if name != fmt.MANIFEST_NAME:
                packs.append((_order(sub_fd, name), name))
        if len(packs) == len(names):
            raise RejectedSubmission("no manifest (empty or incomplete submission)")
        _copy(sub_fd, fmt.MANIFEST_NAME, dest)
        return Taking(sub_fd, dest, [name for _, name in sorted(packs)])
    except BaseException:
        os.close(sub_fd)
        raise


def _order(sub_fd: int, name: str) -> int:
    """The uploader's mtime of a pack: the order it wrote its packs in (a hint only, for the
    file hashes to be computed as the chunks stream past)."""
    try:
        return os.stat(name, dir_fd=sub_fd, follow_symlinks=False).st_mtime_ns
    except OSError:
        return 0


class Taking:
    """A submission being taken: the manifest is copied, the packs are copied on a thread, one
    after another, in order, at most ``AHEAD`` ahead of the one the caller waits for, so that
    copying (in the kernel) and verifying (hashing) overlap. Close it (``with``) when done."""

    AHEAD = 2

    def __init__(self, sub_fd: int, dest: str, packs: list[str]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._sub_fd = sub_fd
        self._dest = dest
        self.packs = packs
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dittohead-take")
        self._futures: list[Future[None]] = []

    def ready(self, i: int) -> None:
        """Wait for pack ``i`` (of ``packs``) to be copied."""
        while len(self._futures) < min(len(self.packs), i + 1 + self.AHEAD):
            name = self.packs[len(self._futures)]
            self._futures.append(self._pool.submit(_copy, self._sub_fd, name, self._dest))
        self._futures[i].result()

    def close(self) -> None:
        for f in self._futures:
            f.cancel()
        self._pool.shutdown(wait=True)
        os.close(self._sub_fd)

    def __enter__(self) -> Taking:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unexpected(sub_fd: int, raw: bytes) -> str:
    """What an entry no submission holds is, for the reason (a look only: it is rejected)."""
    kind = _kind(sub_fd, raw)
    return ("a symlink" if kind == "symlink" else _NOT_REGULAR if kind in ("folder", "special")
            else "unexpected file in a submission")


def _copy(sub_fd: int, name: str, dest: str) -> None:
    limit = fmt.MANIFEST_MAX_SIZE if name == fmt.MANIFEST_NAME else fmt.PACK_MAX_SIZE
    src = _open_entry(sub_fd, name)
    try:
        st = os.fstat(src)
        if st.st_size > limit:
            kind = "manifest" if name == fmt.MANIFEST_NAME else "pack"
            raise RejectedSubmission(f"{name}: {st.st_size} bytes, larger than the {kind} limit")
        out = os.open(os.path.join(dest, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
                      | getattr(os, "O_CLOEXEC", 0), COPY_MODE)
        try:
            copied = _copy_fd(src, out, limit + 1, name)
        finally:
            os.close(out)
        if copied != st.st_size:
            raise RejectedSubmission(f"{name}: changed while it was being taken ({st.st_size} bytes "
                                     f"when opened, {copied} read)")
        directio.advise(src, "DONTNEED")  # read once, never again
    finally:
        os.close(src)


def _copy_fd(src: int, out: int, limit: int, name: str) -> int:
    """Copy up to ``limit`` bytes; in the kernel where it can (no reflink on ext4: a copy of
    the page cache; a reflink on XFS and Btrfs), read and write where it cannot."""
    done = 0
    kernel = hasattr(os, "copy_file_range")
    while done < limit:
        try:
            if kernel:
                try:
                    n = os.copy_file_range(src, out, min(limit - done, 1 << 30))
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
                        raise
                    kernel = False
                    continue
            else:
                data = os.read(src, min(limit - done, directio.BLOCK))
                n = len(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(out, view):]
        except OSError as e:
            if e.errno in _SERVER_ERRNOS:
                raise  # the disk of the daemon's copy: not the submission's fault
            raise _rejected(name, e) from None
        if n == 0:
            break
        done += n
    return done


def release(inbox: str, raw: bytes) -> str:
    """Remove the uploader's folder ``inbox/raw`` (or whatever stands under that name), once the
    daemon is done with it; where that cannot be done, rename it within the inbox to a dot name
    that nothing reads. Returns what happened, for the log; never raises for what the uploader
    did (it may have removed, replaced or locked its folder meanwhile, or filled it with more).

    The folder is opened once (no symlink followed, no FIFO waited on) and only its own entries
    are removed (files, and folders that are empty): a submission holds files, and anything
    else the uploader made in it (a folder with something in it) leaves the folder set aside,
    never walked.
    """
    try:
        inbox_fd = os.open(inbox, _DIR_FLAGS)
    except OSError as e:
        return f"inbox not opened: {e.strerror}"
    try:
        try:
            os.unlink(raw, dir_fd=inbox_fd)  # not a folder: a symlink, a file, a FIFO
            return "removed"
        except FileNotFoundError:
            return "gone already"
        except OSError:
            pass
        try:
            _empty(inbox_fd, raw)
            os.rmdir(raw, dir_fd=inbox_fd)
            return "removed"
        except OSError as e:  # whatever it is, the folder is set aside below
            log.debug("emptying the uploader's folder %s: %s", escape(raw), e.strerror)
        aside = f"{LEFT_PREFIX}{os.urandom(8).hex()}"
        try:
            os.rename(raw, aside, src_dir_fd=inbox_fd, dst_dir_fd=inbox_fd)
        except OSError as e:
            return f"left in place ({e.strerror})"
        log.warning("could not empty the uploader's folder %s; renamed it to %s in the inbox",
                    escape(raw), aside)
        return f"set aside as {aside}"
    finally:
        os.close(inbox_fd)


def _empty(inbox_fd: int, raw: bytes) -> None:
    """Remove the entries of the folder ``inbox/raw``, by its descriptor: files, and folders
    that are empty (OSError if it cannot)."""
    fd = os.open(raw, _DIR_FLAGS, dir_fd=inbox_fd)
    try:
        for name in list(_entry_names(fd)):
            try:
                os.unlink(name, dir_fd=fd)
            except (IsADirectoryError, PermissionError):  # a folder (EPERM on some systems)
                os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)
