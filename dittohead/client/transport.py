"""Transports: how a client reaches a server root's drop box.

The inbox is the protocol. Every transport does the same few things, in the same order: read the
study's have-segments and receipts, create a staging folder ``inbox/.NAME``, upload files into it
(each under a temporary name, renamed when complete), and commit by renaming ``.NAME`` to
``NAME``. ``LocalTransport`` serves a local path or a mounted share; ``SFTPTransport``
(``dittohead/client/sftp.py``) an SSH server. A client never reads the store.

The contract every transport keeps (``tests/test_transport_contract.py`` holds each to it):

- **Not there** is ``FileNotFoundError`` (``list_staging`` of a staging folder that is gone,
  ``read_have`` of a segment that is gone), ``None`` (``read_receipt``), ``GONE``
  (``submission_state``) or ``[]`` (``list_have`` of a study with no ``have/``); ``remove`` and
  ``remove_staging`` of what is not there do nothing.
- **The link failed** (a share unmounted, a connection lost, a server that stopped answering for
  the transport's timeout) is ``TransportError`` with a one-line reason, never a hang.
- **Refused** (no permission, a full disk, a name in the way) is ``PermissionError`` or another
  ``OSError``, or ``TransportError``; a study the account may not enter is ``TransportError``, a
  study that does not exist ``NoSuchStudy``. A have-segment or receipt larger than its limit is
  ``FormatError``.
- **Threads:** every call is made from the sync's thread, except ``Upload.finish`` and
  ``Upload.abort``, which the Packer calls on its upload thread while the sync's thread may be
  writing the next ``Upload``. A transport serializes what its link cannot do at once.
- **Durable:** when ``Upload.finish`` or ``put`` returns, the file is complete under its final
  name and on the server's disk (fsync, or ``fsync@openssh.com``); when ``commit`` returns, the
  rename is done (and, locally, the inbox fsynced).
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import Protocol

from dittohead import directio, fsutil
from dittohead import format as fmt
from dittohead.errors import FormatError, NoSuchStudy, TransportError

# A staging folder is made 0750 and gets the inbox's group (the daemon's: the inbox is setgid),
# and so does every file written into it (0640): the daemon reads them through that group. At the
# commit the folder is made 0770, so that the daemon can also empty and remove it once it has
# taken its copy (docs/server-root.md). Not earlier: a chmod by an account outside the group
# clears the folder's setgid bit, and files made after it would get the uploader's group.
STAGING_DIR_MODE = 0o750
STAGING_FILE_MODE = 0o640
COMMITTED_DIR_MODE = 0o770

# What submission_state can answer.
IN_STAGING = "staging"
IN_INBOX = "inbox"
GONE = "gone"


class Transport(Protocol):
    def key(self) -> str: ...
    def check_study(self, study: str) -> None: ...
    def list_have(self, study: str) -> list[str]: ...
    def read_have(self, study: str, segment: str) -> bytes: ...
    def read_receipt(self, study: str, name: str) -> bytes | None: ...
    def submission_state(self, study: str, name: str) -> str: ...
    def make_staging(self, study: str, name: str) -> None: ...
    def list_staging(self, study: str, name: str) -> dict[str, int]: ...
    def put(self, study: str, name: str, filename: str, data: memoryview | bytes) -> None: ...
    def open_upload(self, study: str, name: str) -> Upload: ...
    def remove(self, study: str, name: str, filename: str) -> None: ...
    def remove_staging(self, study: str, name: str) -> None: ...
    def commit(self, study: str, name: str) -> None: ...
    def close(self) -> None: ...


class Upload(Protocol):
    """A file being written into a staging folder under a temporary name."""

    def write(self, data: bytes | memoryview) -> int: ...
    def finish(self, filename: str) -> None: ...
    def abort(self) -> None: ...


class LocalUpload:
    """Written around the page cache where the share allows (``directio``): a pack is read by
    the server once, and the collector's machine keeps its cache for its own programs."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.tmp = fsutil.tmp_name(directory, "upload-")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        fd = directio.open_fd(self.tmp, flags, STAGING_FILE_MODE)
        _set_mode(fd, STAGING_FILE_MODE)
        self.w = directio.Writer(fd, hashed=True)

    def write(self, data: bytes | memoryview) -> int:
        return self.w.write(data)

    def digest(self) -> bytes:
        """BLAKE3 of what was written (the pack id), hashed off the caller's thread."""
        return self.w.digest()

    def finish(self, filename: str) -> None:
        self.w.finish()
        os.replace(self.tmp, os.path.join(self.directory, filename))

    def abort(self) -> None:
        self.w.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class LocalTransport:
    """A server root reachable as a local path (or a mounted share)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def key(self) -> str:
        return "file://" + self.root

    def _box(self, study: str, *parts: str) -> str:
        return os.path.join(self.root, "dropbox", study, *parts)

    def _staging(self, study: str, name: str) -> str:
        return self._box(study, "inbox", fmt.STAGING_PREFIX + name)

    def check_study(self, study: str) -> None:
        if not os.path.isdir(self.root):
            if os.path.exists(self.root):
                raise TransportError(f"{self.root}: not a folder (the destination is a server root's folder)")
            raise TransportError(f"{self.root}: no such folder (is the share mounted?)")
        if not os.path.isdir(os.path.join(self.root, "dropbox")):
            raise TransportError(f"{self.root}: not a dittohead server root")
        try:
            is_dir = stat.S_ISDIR(os.stat(self._box(study, "inbox")).st_mode)
        except PermissionError:
            raise TransportError(f"{self.root}: study {study!r} does not admit this account (permission "
                                 "denied: the admin admits a group of uploaders with 'study add --uploaders')") from None
        except OSError:
            is_dir = False
        if not is_dir:
            raise NoSuchStudy(f"{self.root}: no study {study!r} (the admin adds it with 'dittohead study add')")

    def list_have(self, study: str) -> list[str]:
        try:
            names = os.listdir(self._box(study, "have"))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise TransportError(f"cannot list have-segments: {e.strerror}") from None
        return sorted(n for n in names if n.endswith(fmt.HAVE_SUFFIX) and not n.startswith("."))

    def read_have(self, study: str, segment: str) -> bytes:
        return _read_limited(self._box(study, "have", segment), fmt.HAVE_MAX_SIZE)

    def read_receipt(self, study: str, name: str) -> bytes | None:
        try:
            return _read_limited(self._box(study, "receipts", name), fmt.RECEIPT_MAX_SIZE)
        except FileNotFoundError:
            return None

    def submission_state(self, study: str, name: str) -> str:
        if os.path.lexists(self._staging(study, name)):
            return IN_STAGING
        if os.path.lexists(self._box(study, "inbox", name)):
            return IN_INBOX
        return GONE

    def make_staging(self, study: str, name: str) -> None:
        path = self._staging(study, name)
        try:
            os.mkdir(path, STAGING_DIR_MODE)
        except FileExistsError:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                raise TransportError(f"{path}: exists and is not a folder") from None

    def list_staging(self, study: str, name: str) -> dict[str, int]:
        path = self._staging(study, name)
        out = {}
        with os.scandir(path) as it:
            for e in it:
                out[e.name] = e.stat(follow_symlinks=False).st_size
        return out

    def put(self, study: str, name: str, filename: str, data: memoryview | bytes) -> None:
        """Write ``filename`` into the staging folder; it appears under its name only when complete."""
        directory = self._staging(study, name)
        tmp = os.path.join(directory, f".tmp-{filename}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), STAGING_FILE_MODE)
        try:
            _set_mode(fd, STAGING_FILE_MODE)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(directory, filename))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def open_upload(self, study: str, name: str) -> LocalUpload:
        return LocalUpload(self._staging(study, name))

    def remove(self, study: str, name: str, filename: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._staging(study, name), filename))

    def remove_staging(self, study: str, name: str) -> None:
        import shutil  # here: it imports the archive modules, which a sync does not need

        shutil.rmtree(self._staging(study, name), ignore_errors=True)

    def commit(self, study: str, name: str) -> None:
        inbox = self._box(study, "inbox")
        staging = self._staging(study, name)
        with contextlib.suppress(NotImplementedError, PermissionError):
            if os.name == "posix":
                os.chmod(staging, COMMITTED_DIR_MODE)
        fsutil.fsync_dir(staging)
        os.rename(staging, os.path.join(inbox, name))
        fsutil.fsync_dir(inbox)

    def close(self) -> None:
        pass


def _read_limited(path: str, limit: int) -> bytes:
    try:
        return fsutil.read_limited(path, limit)
    except ValueError as e:  # larger than the limit
        raise FormatError(str(e)) from None


def _set_mode(fd: int, mode: int) -> None:
    """The mode the daemon needs to read the file, whatever the collector's umask (POSIX)."""
    if os.name == "posix":
        with contextlib.suppress(OSError):
            os.fchmod(fd, mode)


def open_transport(dest: str, *, sftp: dict | None = None) -> Transport:
    """A transport for a destination given on the command line; ``sftp`` holds the keyword
    arguments of ``dittohead.client.sftp.open_sftp`` (how to sign in) for an sftp:// one."""
    if dest.startswith("sftp://"):
        from dittohead.client.sftp import open_sftp  # here: paramiko is imported only for sftp://

        return open_sftp(dest, **(sftp or {}))
    if "://" in dest:
        raise TransportError(f"unsupported destination {dest!r}: use a local path or sftp://user@host/path")
    return LocalTransport(dest)
