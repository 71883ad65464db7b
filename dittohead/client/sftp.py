"""The SFTP transport: the drop box of a server reached over SSH (paramiko), for sftp:// addresses.

It does what ``LocalTransport`` does, with the same files in the same order (the contract:
``dittohead/client/transport.py``). The address's path names the server root, or, for an account
chrooted into the drop boxes, the folder that holds the studies' drop boxes: ``check_study``
looks for ``dropbox/STUDY/inbox`` under it, then ``STUDY/inbox``.

Requests go out on one SFTP channel, one at a time: paramiko's ``SFTPClient`` is not safe when
two threads wait for answers at once (paramiko#1836), and a sync uses two (the sync's, and the
Packer's, which finishes one pack while the next is written). Every call holds ``_lock``.

Uploads are written in requests of up to ``limits@openssh.com``'s largest write (else 32 KiB),
many in flight at once (``MAX_INFLIGHT``); their answers are collected as they come and checked
before the file is finished: an error the server reports for any one write (a full disk) fails
the upload. paramiko's own pipelined writes are not used: they drop the answers that another
request's wait reads first, errors among them. A finished file is made durable with
``fsync@openssh.com`` before it is renamed to its final name; a server without that extension
(not OpenSSH) gets a warning once: a crash of that server may then tear a pack, which the daemon
rejects, and the collector's next sync sends the submission again.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import secrets
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import paramiko
from paramiko.message import Message
from paramiko.sftp import (
    CMD_CLOSE,
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_FSETSTAT,
    CMD_HANDLE,
    CMD_INIT,
    CMD_OPEN,
    CMD_STATUS,
    CMD_VERSION,
    CMD_WRITE,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_EXCL,
    SFTP_FLAG_TRUNC,
    SFTP_FLAG_WRITE,
    SFTP_NO_SUCH_FILE,
    SFTP_OK,
    SFTP_PERMISSION_DENIED,
    SFTPError,
)
from paramiko.sftp_attr import SFTPAttributes

from dittohead import format as fmt
from dittohead.client import ssh
from dittohead.client.transport import (
    COMMITTED_DIR_MODE,
    GONE,
    IN_INBOX,
    IN_STAGING,
    STAGING_DIR_MODE,
    STAGING_FILE_MODE,
)
from dittohead.errors import FormatError, NoSuchStudy, TransportError
from dittohead.hashing import blake3

log = logging.getLogger("dittohead.sftp")

SFTP_VERSION = 3
WRITE_SIZE = 32768  # the write every SFTP server takes (draft-ietf-secsh-filexfer-02)
WRITE_SIZE_MAX = 255 * 1024  # larger requests than this gain nothing; OpenSSH takes 255 KiB
MAX_INFLIGHT = 64  # write requests not yet answered, per upload
BLOCK = 1 << 20  # bytes handed to the sending thread at a time


class _SFTP(paramiko.SFTPClient):
    """paramiko's client, keeping the extensions the server names in its version packet
    (paramiko reads and drops them)."""

    extensions: dict[str, bytes]

    def _send_version(self) -> int:
        m = Message()
        m.add_int(SFTP_VERSION)
        self._send_packet(CMD_INIT, m)
        t, data = self._read_packet()
        if t != CMD_VERSION:
            raise SFTPError("Incompatible sftp protocol")
        msg = Message(data)
        version = msg.get_int()
        self.extensions = {}
        with contextlib.suppress(Exception):  # a malformed list only means no extensions
            while msg.get_remainder():
                name = msg.get_string().decode("ascii", "replace")
                self.extensions[name] = msg.get_string()
        return version


class _Answers:
    """The answers to one upload's requests that nobody waits for: counted, first error kept.
    paramiko's reader calls ``_async_response`` for each, under the transport's lock."""

    def __init__(self) -> None:
        self.pending = 0
        self.error: OSError | None = None

    def _async_response(self, t: int, msg: Message, num: int) -> None:
        self.pending -= 1
        if self.error is None and t == CMD_STATUS:
            code, text = msg.get_int(), msg.get_text()
            if code != SFTP_OK:
                self.error = _status_error(code, text)


def _status_error(code: int, text: str) -> OSError:
    import errno

    if code == SFTP_NO_SUCH_FILE:
        return FileNotFoundError(errno.ENOENT, text)
    if code == SFTP_PERMISSION_DENIED:
        return PermissionError(errno.EACCES, text)
    return OSError(f"the server refused: {text or 'failure'}")


class SFTPTransport:
    """A server root (or a folder of drop boxes) on an SSH server."""

    def __init__(self, session: ssh.Session, path: str) -> None:
        self.session = session
        self.path = path.rstrip("/") or "/"
        r = session.target
        self.where = f"{r.user}@{r.shown}"
        self._key = f"sftp://{r.user}@{ssh.host_key_name(r.host, r.port)}{self.path}"
        self._lock = threading.RLock()
        self._boxes: dict[str, str] = {}
        self._sender: ThreadPoolExecutor | None = None
        self._warned_fsync = False
        try:
            with self._op():
                chan = session.transport.open_session(timeout=session.timeout)
                chan.settimeout(session.timeout)
                chan.invoke_subsystem("sftp")
                self.sftp = _SFTP(chan)
        except TransportError as e:
            raise TransportError(f"{e}: signed in, but the server ended the SFTP session at once (a "
                                 "ChrootDirectory sshd refuses, or no sftp subsystem: its admin finds why in "
                                 "sshd's log)") from None
        ext = self.sftp.extensions
        self.has_fsync = "fsync@openssh.com" in ext
        self.has_posix_rename = "posix-rename@openssh.com" in ext
        self.write_size = WRITE_SIZE
        if "limits@openssh.com" in ext:
            with contextlib.suppress(Exception), self._op():
                t, msg = self.sftp._request(CMD_EXTENDED, "limits@openssh.com")
                if t == CMD_EXTENDED_REPLY:
                    msg.get_int64()  # max packet length
                    msg.get_int64()  # max read length
                    max_write = msg.get_int64()
                    if max_write >= WRITE_SIZE:
                        self.write_size = min(max_write, WRITE_SIZE_MAX)

    # -- plumbing

    @contextlib.contextmanager
    def _op(self) -> Iterator[None]:
        """One step on the link: serialized, and a failed link is a ``TransportError``."""
        with self._lock:
            try:
                with ssh.link_errors(self.where):
                    yield
            except OSError:
                if not self.session.transport.is_active():
                    raise TransportError(f"{self.where}: the connection was lost") from None
                raise

    def _join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def _box(self, study: str, *parts: str) -> str:
        box = self._boxes.get(study)
        if box is None:
            self.check_study(study)
            box = self._boxes[study]
        return posixpath.join(box, *parts)

    def _staging(self, study: str, name: str) -> str:
        return self._box(study, "inbox", fmt.STAGING_PREFIX + name)

    def _stat(self, path: str) -> paramiko.SFTPAttributes | None:
        try:
            with self._op():
                return self.sftp.stat(path)
        except FileNotFoundError:
            return None

    def _lstat(self, path: str) -> paramiko.SFTPAttributes | None:
        try:
            with self._op():
                return self.sftp.lstat(path)
        except FileNotFoundError:
            return None

    def _read(self, path: str, limit: int) -> bytes:
        with self._op(), self.sftp.open(path, "rb") as f:
            size = f.stat().st_size or 0
            if size > limit:
                raise FormatError(f"{path}: larger than {limit} bytes")
            if size:
                f.prefetch(size)
            data = f.read(limit + 1)
        if len(data) > limit:
            raise FormatError(f"{path}: larger than {limit} bytes")
        return data

    def _open_write(self, path: str, mode: int, *, exclusive: bool) -> bytes:
        """Open ``path`` for writing, created with ``mode``; the handle."""
        flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | (SFTP_FLAG_EXCL if exclusive else SFTP_FLAG_TRUNC)
        attrs = SFTPAttributes()
        attrs.st_mode = mode
        with self._op():
            t, msg = self.sftp._request(CMD_OPEN, path, flags, attrs)
            if t != CMD_HANDLE:
                raise SFTPError("Expected handle")
            return msg.get_binary()

    def _finish_file(self, handle: bytes, answers: _Answers, tmp: str, final: str) -> None:
        """Wait for every answer, fsync, close, rename ``tmp`` to ``final``."""
        with self._op():
            try:
                while answers.pending > 0:
                    self.sftp._read_response()
                if answers.error is not None:
                    raise answers.error
                if self.has_fsync:
                    self.sftp._request(CMD_EXTENDED, "fsync@openssh.com", handle)
                elif not self._warned_fsync:
                    self._warned_fsync = True
                    log.warning("%s does not offer fsync@openssh.com: uploads are as durable as its "
                                "filesystem makes them (a crash of the server may cost a resend)", self.where)
            finally:
                with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                    self.sftp._request(CMD_CLOSE, handle)
            self._rename(tmp, final)

    def _rename(self, src: str, dst: str) -> None:
        if self.has_posix_rename:
            self.sftp.posix_rename(src, dst)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.sftp.remove(dst)
            self.sftp.rename(src, dst)

    def _send(self, handle: bytes, answers: _Answers, offset: int, data: bytes) -> None:
        """One write request, not waited for (under the lock)."""
        self.sftp._async_request(answers, CMD_WRITE, handle, paramiko.sftp_client.int64(offset), data)
        answers.pending += 1
        while answers.pending > MAX_INFLIGHT:
            self.sftp._read_response()

    def sender(self) -> ThreadPoolExecutor:
        if self._sender is None:
            self._sender = ThreadPoolExecutor(1, thread_name_prefix="dittohead-sftp")
        return self._sender

    # -- the Transport protocol

    def key(self) -> str:
        return self._key

    def check_study(self, study: str) -> None:
        root = self._stat(self.path)
        if root is None or not stat.S_ISDIR(root.st_mode or 0):
            what = "no such folder" if root is None else "not a folder"
            raise TransportError(f"{self.where}: {self.path}: {what} (the address names the server root)")
        dropbox = self._stat(self._join("dropbox"))
        base = self._join("dropbox") if dropbox is not None and stat.S_ISDIR(dropbox.st_mode or 0) else self.path
        try:
            inbox = self._stat(posixpath.join(base, study, "inbox"))
        except PermissionError:
            raise TransportError(f"{self.where}: study {study!r} does not admit this account (permission "
                                 "denied: the admin admits a group of uploaders with 'study add --uploaders')") from None
        if inbox is None or not stat.S_ISDIR(inbox.st_mode or 0):
            raise NoSuchStudy(f"{self.where}: no study {study!r} in {self.path} (the admin adds it with 'dittohead study add')")
        self._boxes[study] = posixpath.join(base, study)

    def list_have(self, study: str) -> list[str]:
        try:
            with self._op():
                names = self.sftp.listdir(self._box(study, "have"))
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(fmt.HAVE_SUFFIX) and not n.startswith("."))

    def read_have(self, study: str, segment: str) -> bytes:
        return self._read(self._box(study, "have", segment), fmt.HAVE_MAX_SIZE)

    def read_receipt(self, study: str, name: str) -> bytes | None:
        try:
            return self._read(self._box(study, "receipts", name), fmt.RECEIPT_MAX_SIZE)
        except FileNotFoundError:
            return None

    def submission_state(self, study: str, name: str) -> str:
        if self._lstat(self._staging(study, name)) is not None:
            return IN_STAGING
        if self._lstat(self._box(study, "inbox", name)) is not None:
            return IN_INBOX
        return GONE

    def make_staging(self, study: str, name: str) -> None:
        path = self._staging(study, name)
        try:
            with self._op():
                self.sftp.mkdir(path, STAGING_DIR_MODE)
        except OSError:
            st = self._lstat(path)
            if st is None:
                raise
            if not stat.S_ISDIR(st.st_mode or 0):
                raise TransportError(f"{self.where}: {path}: exists and is not a folder") from None

    def list_staging(self, study: str, name: str) -> dict[str, int]:
        with self._op():
            return {a.filename: a.st_size or 0 for a in self.sftp.listdir_attr(self._staging(study, name))}

    def put(self, study: str, name: str, filename: str, data: memoryview | bytes) -> None:
        directory = self._staging(study, name)
        tmp = posixpath.join(directory, f".tmp-{filename}")
        handle = self._open_write(tmp, STAGING_FILE_MODE, exclusive=False)
        answers = _Answers()
        try:
            with self._op():
                self._send_fsetstat(handle, answers)
                view = memoryview(data).cast("B")
                for off in range(0, len(view), self.write_size):
                    self._send(handle, answers, off, bytes(view[off : off + self.write_size]))
            self._finish_file(handle, answers, tmp, posixpath.join(directory, filename))
        except BaseException:
            with contextlib.suppress(Exception), self._op():
                self.sftp.remove(tmp)
            raise

    def _send_fsetstat(self, handle: bytes, answers: _Answers) -> None:
        """The file's mode, whatever the server's umask made of it (the daemon reads it through
        its group): one request, its answer checked with the writes'."""
        attrs = SFTPAttributes()
        attrs.st_mode = STAGING_FILE_MODE
        self.sftp._async_request(answers, CMD_FSETSTAT, handle, attrs)
        answers.pending += 1

    def open_upload(self, study: str, name: str) -> SFTPUpload:
        return SFTPUpload(self, self._staging(study, name))

    def remove(self, study: str, name: str, filename: str) -> None:
        with contextlib.suppress(FileNotFoundError), self._op():
            self.sftp.remove(posixpath.join(self._staging(study, name), filename))

    def remove_staging(self, study: str, name: str) -> None:
        path = self._staging(study, name)
        with contextlib.suppress(OSError):
            with self._op():
                names = self.sftp.listdir(path)
            for n in names:
                with contextlib.suppress(OSError), self._op():
                    self.sftp.remove(posixpath.join(path, n))
            with self._op():
                self.sftp.rmdir(path)

    def commit(self, study: str, name: str) -> None:
        staging = self._staging(study, name)
        with contextlib.suppress(PermissionError), self._op():
            self.sftp.chmod(staging, COMMITTED_DIR_MODE)
        with self._op():
            self.sftp.rename(staging, self._box(study, "inbox", name))

    def close(self) -> None:
        if self._sender is not None:
            self._sender.shutdown(wait=True)
            self._sender = None
        with contextlib.suppress(Exception):
            self.sftp.close()
        self.session.close()


class SFTPUpload:
    """A pack being written into a staging folder under a temporary name. ``write`` gathers
    ``BLOCK`` bytes and hands them to the transport's sending thread, which hashes them (the pack
    id: ``digest``) and sends them in write requests; ``finish`` (on the Packer's thread) waits
    for every answer, fsyncs and renames."""

    def __init__(self, t: SFTPTransport, directory: str) -> None:
        self.t = t
        self.directory = directory
        self.tmp = posixpath.join(directory, "upload-" + secrets.token_hex(8))
        self.handle = t._open_write(self.tmp, STAGING_FILE_MODE, exclusive=True)
        self.answers = _Answers()
        self.offset = 0
        self._buf = bytearray()
        self._busy: Future[None] | None = None
        self._hasher = blake3()
        self._closed = False
        with t._op():
            t._send_fsetstat(self.handle, self.answers)

    def write(self, data: bytes | memoryview) -> int:
        self._buf += data
        if len(self._buf) >= BLOCK:
            self._hand_over()
        return len(data)

    def _hand_over(self) -> None:
        block, offset = bytes(self._buf), self.offset
        self._buf.clear()
        self.offset += len(block)
        self._settle()
        self._busy = self.t.sender().submit(self._send_block, block, offset)

    def _send_block(self, block: bytes, offset: int) -> None:
        self._hasher.update(block)
        size = self.t.write_size
        with self.t._op():
            for i in range(0, len(block), size):
                self.t._send(self.handle, self.answers, offset + i, block[i : i + size])

    def _settle(self) -> None:
        fut, self._busy = self._busy, None
        if fut is not None:
            fut.result()

    def digest(self) -> bytes:
        self._settle()
        h = self._hasher.copy()
        h.update(self._buf)
        return h.digest()

    def finish(self, filename: str) -> None:
        if self._buf:
            self._hand_over()
        self._settle()
        self._closed = True
        self.t._finish_file(self.handle, self.answers, self.tmp, posixpath.join(self.directory, filename))

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._settle()
        with contextlib.suppress(Exception), self.t._op():
            if not self._closed:
                self._closed = True
                self.t.sftp._request(CMD_CLOSE, self.handle)
            self.t.sftp.remove(self.tmp)


def open_sftp(dest: str, prompts: ssh.Prompts, *, identity: str | None = None, jump: str | None = None,
              password: Callable[[str], str | None] | None = None,
              timeout: float = ssh.DEFAULT_TIMEOUT) -> SFTPTransport:
    addr = ssh.parse_url(dest)
    target = ssh.resolve(addr, identity=identity, jump=ssh.parse_jump(jump) if jump else None)
    session = ssh.connect(target, prompts, password=password, timeout=timeout)
    try:
        return SFTPTransport(session, addr.path)
    except BaseException:
        session.close()
        raise

