"""A test destination that refuses names the way a Windows (SMB) share does: a FUSE passthrough.

``RefusingFS`` (mfusepy) shows a backing folder as it is, except that it refuses, with EINVAL (or
the errno ``mounted`` is given), to make a name that Windows would not hold: ``create``,
``mknod``, ``mkdir``, ``symlink``, and the new name of ``link`` and ``rename``. Such a name
(``windows_refuses``) holds one of ``\\:*?"<>|`` or a byte 0x00-0x1f, ends with '.' or ' ', is a
device name (CON, PRN, AUX, NUL, COM1-9, LPT1-9, in any case, also with an extension and with
spaces before it: ``con.txt``, ``NUL.tar.gz``, ``AUX .c``), is longer than 255 bytes, or is not
valid UTF-8. Looking such a name up gives ENOENT, and a listing leaves it out (a share never
holds one). Everything else goes through to the backing folder as it is: files are opened there
and their descriptors kept (read, write, fsync, ftruncate and fstat go to them), times, modes,
hard links (``use_ino``: the inode numbers are the backing folder's, so two names of one file
show one ``st_ino``), renames with their flags (RENAME_NOREPLACE). The kernel caches nothing
(attr, entry and negative timeouts 0): what a caller sees is what the folder holds now.

The filesystem runs in a process of its own, ``python tests/refusing_fs.py BACKING MOUNTPOINT
TAG [ERRNO]``, in the foreground and single-threaded (a crash in it cannot take the test run
down, and the test's own calls into the mount cannot deadlock against it), on libfuse3 where it
is installed (else libfuse2). ``mounted(backing, mountpoint)`` starts it, waits for the mount,
and always unmounts it (``fusermount3 -u``, else ``fusermount -u``, else ``umount``; lazily if
it is busy) and reaps the process, in a ``finally``; ``auto_unmount`` unmounts it too if the
process dies. Mounts are named ``dittohead-refusing-PID`` (PID: the test process that made them);
``sweep_stale`` unmounts those whose test process is gone, left by a run that was killed.
``unavailable()`` says why FUSE cannot be used here, or None.

This module imports mfusepy only in the filesystem's own process, so that a test module can use
``windows_refuses`` and ``unavailable`` without it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

SUBTYPE = "dittohead-refusing"  # the mount's type is fuse.SUBTYPE
FSNAME_PREFIX = SUBTYPE + "-"  # its source, FSNAME_PREFIX + the pid of the test process

# -- what Windows refuses ------------------------------------------------------------------------

WINDOWS_FORBIDDEN = frozenset(b'\\:*?"<>|') | frozenset(range(0x20))
WINDOWS_DEVICES = frozenset(["CON", "PRN", "AUX", "NUL"]
                            + [f"{d}{i}" for d in ("COM", "LPT") for i in range(1, 10)])
WINDOWS_NAME_MAX = 255  # bytes, here (Windows counts UTF-16 units)


def windows_refuses(name: bytes) -> bool:
    """Whether a Windows share refuses ``name`` (one name, its bytes) for a new file or folder."""
    if not name or len(name) > WINDOWS_NAME_MAX:
        return True
    if any(b in WINDOWS_FORBIDDEN for b in name):
        return True
    if name.endswith((b".", b" ")) and name not in (b".", b".."):
        return True
    if name.split(b".", 1)[0].rstrip(b" ").upper().decode("latin-1") in WINDOWS_DEVICES:
        return True
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


# -- the filesystem (runs in its own process: ``serve``) ------------------------------------------

# utimensat's special nanosecond values (Linux)
_UTIME_NOW = (1 << 30) - 1
_UTIME_OMIT = (1 << 30) - 2
_STAT_KEYS = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_rdev",
              "st_blksize", "st_blocks")


def _attrs(st: os.stat_result) -> dict[str, Any]:
    d: dict[str, Any] = {k: getattr(st, k) for k in _STAT_KEYS if hasattr(st, k)}
    d["st_atime"], d["st_mtime"], d["st_ctime"] = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
    return d


def _raise(err: int) -> NoReturn:
    raise OSError(err, os.strerror(err))


def _make_fs(backing: str, refuse_errno: int = errno.EINVAL) -> Any:
    """The Operations object and the FUSE class to run it (mfusepy is imported here: only in
    the filesystem's process). A name Windows refuses is refused with ``refuse_errno``."""
    import mfusepy

    root = os.fsencode(os.path.abspath(backing))
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    at_fdcwd = -100

    class RefusingFS(mfusepy.Operations):
        use_ns = True  # times in integer nanoseconds

        # paths: mfusepy gives str decoded as UTF-8 with surrogateescape; back to exact bytes
        def _path(self, path: str) -> bytes:
            """The backing path; ENOENT if any name on it is one the share never holds."""
            b = path.encode("utf-8", "surrogateescape")
            parts = [p for p in b.split(b"/") if p]
            if any(windows_refuses(p) for p in parts):
                _raise(errno.ENOENT)
            return os.path.join(root, *parts) if parts else root

        def _new(self, path: str) -> bytes:
            """The backing path of a name about to be made; EINVAL if the share refuses it."""
            b = path.encode("utf-8", "surrogateescape")
            parent, _, name = b.rstrip(b"/").rpartition(b"/")
            if windows_refuses(name):
                _raise(refuse_errno)
            return os.path.join(self._path(parent.decode("utf-8", "surrogateescape")), name)

        # -- attributes
        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            if fh is not None:
                return _attrs(os.fstat(fh))
            return _attrs(os.lstat(self._path(path)))

        def access(self, path: str, amode: int) -> int:
            if not os.access(self._path(path), amode, follow_symlinks=False):
                _raise(errno.EACCES)
            return 0

        def chmod(self, path: str, mode: int) -> int:
            os.chmod(self._path(path), mode)
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            os.chown(self._path(path), uid, gid, follow_symlinks=False)
            return 0

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            if fh is not None:
                os.ftruncate(fh, length)
            else:
                os.truncate(self._path(path), length)
            return 0

        def utimens(self, path: str, times: Any = None) -> int:
            p = self._path(path)
            if times is None:
                os.utime(p, follow_symlinks=False)
                return 0
            st = os.lstat(p)
            now = time.time_ns()
            ns = []
            for (sec, nsec), old in zip(times, (st.st_atime_ns, st.st_mtime_ns)):
                ns.append(now if nsec == _UTIME_NOW else old if nsec == _UTIME_OMIT
                          else sec * 10**9 + nsec)
            os.utime(p, ns=(ns[0], ns[1]), follow_symlinks=False)
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            sv = os.statvfs(self._path(path))
            return {k: getattr(sv, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree",
                                                 "f_bavail", "f_files", "f_ffree", "f_favail",
                                                 "f_flag", "f_namemax")}

        # -- names: made (checked), removed, read
        def mknod(self, path: str, mode: int, dev: int) -> int:
            os.mknod(self._new(path), mode, dev)
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            os.mkdir(self._new(path), mode)
            return 0

        def symlink(self, target: str, source: str) -> int:
            """``target`` is the new link's path, ``source`` what it points to."""
            os.symlink(source.encode("utf-8", "surrogateescape"), self._new(target))
            return 0

        def link(self, target: str, source: str) -> int:
            """``target`` is the new name of the file ``source``."""
            os.link(self._path(source), self._new(target), follow_symlinks=False)
            return 0

        def rename(self, old: str, new: str, flags: int = 0) -> int:
            src, dst = self._path(old), self._new(new)
            if not flags:
                os.rename(src, dst)
                return 0
            if renameat2 is None:
                _raise(errno.EINVAL)
            if renameat2(at_fdcwd, src, at_fdcwd, dst, ctypes.c_uint(flags)) != 0:
                _raise(ctypes.get_errno())
            return 0

        def unlink(self, path: str) -> int:
            os.unlink(self._path(path))
            return 0

        def rmdir(self, path: str) -> int:
            os.rmdir(self._path(path))
            return 0

        def readlink(self, path: str) -> str:
            return os.readlink(self._path(path)).decode("utf-8", "surrogateescape")

        # -- files, by descriptor
        def create(self, path: str, mode: int, flags: int = os.O_WRONLY) -> int:
            return os.open(self._new(path), flags | os.O_CREAT, mode)

        def open(self, path: str, flags: int) -> int:
            return os.open(self._path(path), flags & ~(os.O_CREAT | os.O_EXCL))

        def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
            return os.pread(fh, size, offset)

        def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
            return os.pwrite(fh, data, offset)

        def flush(self, path: str | None, fh: int) -> int:
            return 0

        def fsync(self, path: str | None, datasync: int, fh: int) -> int:
            (os.fdatasync if datasync else os.fsync)(fh)
            return 0

        def release(self, path: str | None, fh: int) -> int:
            os.close(fh)
            return 0

        # -- folders
        def opendir(self, path: str) -> int:
            p = self._path(path)
            if not os.path.isdir(p):
                _raise(errno.ENOTDIR)
            return 0

        def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
            """The entries with their inode numbers and types (``use_ino``: an entry with
            inode 0 would be dropped by readdir(3))."""
            p = self._path(path)
            here = os.lstat(p)
            out = [(".", {"st_ino": here.st_ino, "st_mode": here.st_mode}, 0),
                   ("..", {"st_ino": 1, "st_mode": here.st_mode}, 0)]
            with os.scandir(p) as it:
                for e in it:
                    if windows_refuses(e.name):
                        continue
                    mode = e.stat(follow_symlinks=False).st_mode
                    out.append((e.name.decode("utf-8", "surrogateescape"),
                                {"st_ino": e.inode(), "st_mode": mode}, 0))
            return out

        def releasedir(self, path: str | None, fh: int) -> int:
            return 0

        def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
            if path is None:
                return 0
            fd = os.open(self._path(path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return 0

    class _FUSE(mfusepy.FUSE):
        """mfusepy's FUSE, but passing rename's flags on (mfusepy 3.1 drops them, which would
        turn a RENAME_NOREPLACE into a rename that overwrites) and utimens' times as given
        (UTIME_NOW and UTIME_OMIT kept)."""

        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            return self.operations.rename(old.decode(self.encoding, self.errors),
                                          new.decode(self.encoding, self.errors), flags)

        def utimens_fuse_2(self, path: bytes | None, buf: Any) -> int:
            times = None
            if buf:
                times = tuple((t.tv_sec, t.tv_nsec)
                              for t in (buf.contents.actime, buf.contents.modtime))
            return self.operations.utimens(
                None if path is None else path.decode(self.encoding, self.errors), times)

    return RefusingFS(), _FUSE


def serve(backing: str, mountpoint: str, tag: str, refuse_errno: str = "EINVAL") -> None:
    """Mount the refusing view of ``backing`` on ``mountpoint`` and serve it until unmounted."""
    ops, fuse_cls = _make_fs(backing, getattr(errno, refuse_errno))
    fuse_cls(
        ops, mountpoint,
        foreground=True, nothreads=True,
        fsname=tag, subtype=SUBTYPE,
        use_ino=True, hard_remove=True,
        attr_timeout=0, entry_timeout=0, negative_timeout=0,
        auto_unmount=True,
    )


# -- the harness the tests use ---------------------------------------------------------------------


def _library_env() -> dict[str, str]:
    """The environment that makes mfusepy load libfuse3 where it is installed (by default it
    takes libfuse2 first, if both are)."""
    env = dict(os.environ)
    if "FUSE_LIBRARY_PATH" not in env and ctypes.util.find_library("fuse3"):
        env["FUSE_LIBRARY_NAME"] = "fuse3"
    return env


def unavailable() -> str | None:
    """Why the refusing filesystem cannot be mounted here (a reason to skip), or None."""
    if sys.platform != "linux":
        return f"a FUSE test destination needs Linux (this is {sys.platform})"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (load the fuse module, or give the container the device)"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        return f"/dev/fuse cannot be opened: {e.strerror}"
    if not (ctypes.util.find_library("fuse3") or ctypes.util.find_library("fuse")):
        return "no libfuse (Debian: apt-get install fuse3)"
    if importlib.util.find_spec("mfusepy") is None:
        return "mfusepy is not installed (pip install -e '.[test]')"
    if os.geteuid() != 0 and not (shutil.which("fusermount3") or shutil.which("fusermount")):
        return "no fusermount3 to mount FUSE as an ordinary user (Debian: apt-get install fuse3)"
    return None


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, type, source) of each mount this process sees."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            point = _unoctal(fields[4])
            out.append((point, fields[sep + 1].decode(), _unoctal(fields[sep + 2])))
    return out


def _unoctal(field: bytes) -> str:
    """A mountinfo field: space, tab, newline and backslash are written as \\ooo."""
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i:i + 1] == b"\\" and field[i + 1:i + 4].isdigit():
            out.append(int(field[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return os.fsdecode(bytes(out))


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    mp = os.path.abspath(mountpoint)
    return any(point == mp and kind == "fuse." + SUBTYPE for point, kind, _src in _mounts())


def _unmount(mountpoint: str, lazy: bool = False) -> bool:
    """Unmount ``mountpoint``; True if a tool said it did."""
    tools = []
    for tool in ("fusermount3", "fusermount"):
        if shutil.which(tool):
            tools.append([tool, "-u", *(["-z"] if lazy else []), "--", mountpoint])
    if os.geteuid() == 0 and shutil.which("umount"):
        tools.append(["umount", *(["-l"] if lazy else []), "--", mountpoint])
    for argv in tools:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False)
        if done.returncode == 0:
            return True
    return False


def sweep_stale() -> list[str]:
    """Unmount (lazily) the refusing mounts left by test processes that are gone; their
    filesystem processes then end by themselves. Returns the mount points."""
    swept = []
    for point, kind, source in _mounts():
        if kind != "fuse." + SUBTYPE or not source.startswith(FSNAME_PREFIX):
            continue
        owner = source[len(FSNAME_PREFIX):]
        if owner.isdigit():
            try:
                os.kill(int(owner), 0)
                continue  # its test process still runs (another session's): not ours to touch
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        if _unmount(point, lazy=True):
            swept.append(point)
    return swept


@contextlib.contextmanager
def mounted(backing: str | os.PathLike[str], mountpoint: str | os.PathLike[str],
            refuse_errno: str = "EINVAL", timeout: float = 15.0) -> Iterator[Path]:
    """Mount the refusing view of ``backing`` on ``mountpoint`` (both made if missing) for the
    ``with`` block; always unmounted, its process reaped, when the block ends. A name Windows
    refuses is refused with the errno named ``refuse_errno``: EINVAL (a FAT disk, or
    ``windows_refuses`` as most clients report it), or ENOENT, as Linux's cifs client reports an
    SMB server's STATUS_OBJECT_NAME_INVALID (fs/smb/client/smb2maperror.c)."""
    assert isinstance(getattr(errno, refuse_errno, None), int), refuse_errno
    backing, mountpoint = os.path.abspath(backing), os.path.abspath(mountpoint)
    os.makedirs(backing, exist_ok=True)
    os.makedirs(mountpoint, exist_ok=True)
    tag = f"{FSNAME_PREFIX}{os.getpid()}"
    log_path = os.path.join(os.path.dirname(mountpoint), os.path.basename(mountpoint) + ".log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), backing, mountpoint, tag, refuse_errno],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_library_env(),
        )
    try:
        deadline = time.monotonic() + timeout
        while not is_mounted(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(log_path, "rb") as f:
                    said = f.read().decode("utf-8", "replace")[-3000:]
                raise RuntimeError(f"the refusing filesystem did not mount on {mountpoint} "
                                   f"(exit {proc.poll()}):\n{said}")
            time.sleep(0.02)
        yield Path(mountpoint)
    finally:
        if is_mounted(mountpoint) and not _unmount(mountpoint):
            _unmount(mountpoint, lazy=True)  # busy (a descriptor still open): detach it now
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    serve(*sys.argv[1:5])
