"""Running the mount: ``MountOps`` handed to libfuse through mfusepy; and unmounting.

libfuse runs one thread (``nothreads``): a call from one of its own threads would enter Python
through ctypes with a new thread state each time, and handing the interpreter lock between
threads costs more than it gains on a read-only mount whose reads are answered from verified
chunks read ahead on threads of dittohead's own (``ops.READ_AHEAD``). Measured on a study of
10,000 files and 17,700 versions (benchmarks/README.md, "The mount"): ``find versions/`` 2.7 to
3.5 s against 3.4 to 5.2 s with libfuse's threads, and a 150 MiB file read in 0.21 to 0.25 s
against 0.23 to 0.33 s.

The mount is read-only (``ro``), shown to every account (``allow_other``: an account other
than root needs ``user_allow_other`` in /etc/fuse.conf) with the kernel checking each study's
owner, group and modes (``default_permissions``). The kernel keeps attributes and names for
``ATTR_TIMEOUT`` seconds: with ``ops.REFRESH``, a new ingest shows within 2 s.

libfuse 3 is loaded where it is installed (mfusepy takes 2 first by default), else 2; without
either, or without /dev/fuse, ``MountUnavailable`` says what to install. Nothing else in
dittohead imports this module, so every other command works without FUSE.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import subprocess
import sys
from typing import Any

from dittohead.errors import DittoheadError, NoSuchStudy, UsageError
from dittohead.format import CHUNK_MAX
from dittohead.fuse.ops import BLOCK_SIZE, CHUNK_CACHE, Attr, MountOps
from dittohead.store.repo import Store

log = logging.getLogger("dittohead.mount")

ATTR_TIMEOUT = 1.0  # seconds the kernel keeps a name's attributes (and the name itself)
NEGATIVE_TIMEOUT = 1.0  # ... and that a name does not exist
FSNAME = "dittohead"


class MountUnavailable(DittoheadError):
    """FUSE cannot be used here: what to install or load."""


def load_mfusepy() -> Any:
    """mfusepy, with libfuse 3 where installed; MountUnavailable with what to install."""
    if not sys.platform.startswith("linux") and not sys.platform.startswith("freebsd"):
        raise MountUnavailable(f"the mount needs Linux with FUSE (this is {sys.platform}); use 'dittohead export'")
    if not os.path.exists("/dev/fuse"):
        raise MountUnavailable("no /dev/fuse: load the fuse kernel module (modprobe fuse), or, in a "
                               "container, give it /dev/fuse; 'dittohead export' works without it")
    if "FUSE_LIBRARY_PATH" not in os.environ and ctypes.util.find_library("fuse3"):
        os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    try:
        import mfusepy
    except ImportError:
        raise MountUnavailable("mfusepy is not installed: pip install mfusepy") from None
    except OSError as e:  # mfusepy found no libfuse
        raise MountUnavailable(f"libfuse is not installed ({e}): on Debian, apt-get install fuse3") from None
    return mfusepy


FILL_DIR_PLUS = 1 << 1  # libfuse 3's FUSE_FILL_DIR_PLUS: this entry's attributes are whole
READDIR_PLUS = 1 << 0  # libfuse 3's FUSE_READDIR_PLUS: the kernel asks for them (readdirplus)
CAP_READDIRPLUS_AUTO = 1 << 14  # libfuse 3's FUSE_CAP_READDIRPLUS_AUTO
_NS = 10**9
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def fuse_class(mfusepy: Any, ops: MountOps) -> Any:
    """mfusepy's ``FUSE``, with getattr and readdir answered straight into libfuse's structures
    from ``ops``' ``Attr`` values, and every listed entry's attributes given with its name.

    Measured on bench.py's study (benchmarks/README.md, "The mount"): mfusepy's own readdir
    passes the kernel a name and a type only, so ``find`` and ``du`` cost the kernel a look-up
    (a round trip and a getattr) per folder and ``du`` one per file as well; and its attributes
    go through a dict per call. libfuse 3 gives a listing's attributes to the kernel (its
    readdirplus) only for entries given with an offset, hence ``ops.readdir_from``. A read is
    copied once, from the verified chunks into libfuse's buffer (mfusepy's copies it twice)."""

    c_stat = mfusepy.c_stat
    major = int(getattr(mfusepy, "fuse_version_major", 2))

    def fill(st: Any, a: Attr) -> None:
        st.st_mode, st.st_nlink, st.st_uid, st.st_gid = a.st_mode, a.st_nlink, a.st_uid, a.st_gid
        st.st_size, st.st_blocks, st.st_blksize = a.st_size, (a.st_size + 511) // 512, BLOCK_SIZE
        st.st_mtimespec.tv_sec, st.st_mtimespec.tv_nsec = divmod(a.st_mtime, _NS)
        st.st_atimespec.tv_sec, st.st_atimespec.tv_nsec = st.st_mtimespec.tv_sec, st.st_mtimespec.tv_nsec
        st.st_ctimespec.tv_sec, st.st_ctimespec.tv_nsec = divmod(a.st_ctime, _NS)

    class DittoheadFUSE(mfusepy.FUSE):
        def _path(self, path: bytes | None) -> str:
            return "" if path is None else path.decode(self.encoding, self.errors)

        def fgetattr(self, path: bytes | None, buf: Any, fip: Any) -> int:
            fill(buf.contents, ops.getattr(self._path(path), fip.contents.fh if fip else None))
            return 0

        def _fill_dir(self, path: bytes | None, buf: Any, filler: Any, offset: int, flags: int | None) -> int:
            st = c_stat()
            encoding, errors = self.encoding, self.errors
            for name, attr, after in ops.readdir_from(self._path(path), offset):
                fill(st, attr)
                full = (filler(buf, name.encode(encoding, errors), st, after) if flags is None
                        else filler(buf, name.encode(encoding, errors), st, after, flags))
                if full:
                    break
            return 0

        def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
            dst = ctypes.cast(buf, ctypes.c_void_p).value or 0
            done = 0
            for data, start, end in ops.read_pieces(self._path(path), size, offset, fip.contents.fh):
                src = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0  # data's own bytes
                ctypes.memmove(dst + done, src + start, end - start)
                done += end - start
            return done

        if major == 3:
            def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any,
                               flags: int) -> int:
                return self._fill_dir(path, buf, filler, offset, FILL_DIR_PLUS if flags & READDIR_PLUS else 0)
        else:
            def readdir_fuse_2(self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any) -> int:
                return self._fill_dir(path, buf, filler, offset, None)

    return DittoheadFUSE


def adapter(mfusepy: Any, ops: MountOps) -> Any:
    """An mfusepy Operations object answering with ``ops``: only the calls ``ops`` answers are
    registered with libfuse (getattr, readdir and read are answered by ``fuse_class``'s own
    methods, without it). Its ``mounted`` says whether libfuse got as far as running it."""

    class DittoheadFS(mfusepy.Operations):
        use_ns = True  # times in integer nanoseconds
        mounted = False

        def init_with_config(self, conn: Any, config: Any) -> None:
            DittoheadFS.mounted = True
            if config is not None:  # libfuse 3
                config.entry_timeout = config.attr_timeout = ATTR_TIMEOUT
                config.negative_timeout = NEGATIVE_TIMEOUT
                # Every listing with its attributes, not only a folder's first part (the
                # kernel's "auto" mode): du of a folder of 10,000 files cost 9,225 LOOKUPs.
                conn.want &= ~CAP_READDIRPLUS_AUTO

        def _answered_by_fuse_class(self, *args: object) -> int:
            raise NotImplementedError("fuse_class answers this call")

        # Defined so that mfusepy registers them with libfuse; fuse_class's methods answer them.
        getattr = readdir = read = _answered_by_fuse_class

        def open(self, path: str, fi: Any) -> int:  # raw_fi: the kernel's caching is set per file
            fi.fh = ops.open(path, fi.flags)
            if ops.changes(fi.fh):
                fi.direct_io = 1  # the kernel keeps no pages: each fd reads its own version
            else:
                fi.keep_cache = 1  # a version's bytes never change: keep them across opens
            return 0

        def release(self, path: str, fi: Any) -> int:
            return ops.release(path, fi.fh)

        def statfs(self, path: str) -> dict:
            return ops.statfs(path)

        def access(self, path: str, amode: int) -> int:
            return ops.access(path, amode)

        def destroy(self, path: str) -> None:
            ops.close()

        def _refuse(self, *args: object) -> int:
            return ops._refuse()

        chmod = chown = create = link = mkdir = mknod = rename = rmdir = symlink = _refuse
        truncate = unlink = utimens = write = setxattr = removexattr = _refuse

    return DittoheadFS()


def _dead_mount(path: str) -> bool:
    """A FUSE mount whose process has ended: the kernel answers "not connected"."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def check_mountpoint(mountpoint: str) -> str:
    path = os.path.abspath(mountpoint)
    if _dead_mount(path):
        raise UsageError(f"{mountpoint}: a mount whose process has ended is still there: "
                         f"'dittohead umount {mountpoint}' first")
    if not os.path.isdir(path):
        raise UsageError(f"{mountpoint}: no such folder (make it first: mkdir)")
    if os.path.ismount(path):
        raise UsageError(f"{mountpoint}: something is mounted there already (dittohead umount {mountpoint})")
    return path


def mount(root: str, mountpoint: str, study: str | None = None, *, foreground: bool = False) -> None:
    """Mount ``root``'s store (every study, or ``study``) read-only at ``mountpoint``. In the
    foreground it returns once unmounted (Ctrl-C unmounts); else once the mount is up, the
    filesystem running on in a process of its own."""
    mfusepy = load_mfusepy()
    path = check_mountpoint(mountpoint)
    with contextlib.closing(Store.open(root)) as probe:  # the store and the study exist
        probe.root.config()
        if study is not None and study not in probe.root.studies() and study not in probe.log_studies():
            raise NoSuchStudy(f"no study {study!r} in {root}")
    _keep_freed_chunk_memory()
    # A fresh Store: its index connections are made by the threads that use them, after libfuse
    # has forked into the background.
    store = Store.open(root)
    ops = MountOps(store, study)
    options: dict[str, Any] = {
        "foreground": foreground, "nothreads": True, "ro": True, "allow_other": _allow_other(), "default_permissions": True,
        "fsname": f"{FSNAME}:{os.path.abspath(root)}", "subtype": FSNAME, "noatime": True,
    }
    if _libfuse_major(mfusepy) == 2:
        options.update(entry_timeout=ATTR_TIMEOUT, attr_timeout=ATTR_TIMEOUT, negative_timeout=NEGATIVE_TIMEOUT)
    if not foreground:
        _log_to_syslog()
    fs = adapter(mfusepy, ops)
    try:
        fuse_class(mfusepy, ops)(fs, path, raw_fi=True, **options)
    except RuntimeError as e:  # libfuse's loop ended with an error status
        # Ended by a signal (Ctrl-C, SIGTERM) after it ran, libfuse 3 says 8 and has unmounted.
        if not fs.mounted or os.path.ismount(path):
            raise MountUnavailable(f"{mountpoint}: libfuse could not mount it (status {e}; its own "
                                   "message, if any, is above)") from None
    finally:
        ops.close()
        store.close()


def _keep_freed_chunk_memory() -> None:
    """Have glibc's malloc reuse the memory of chunks the cache dropped. A mount allocates a
    bytes object of 0.25-4 MiB for every chunk it reads, all day; glibc gives each a fresh mmap
    (pages faulted in and zeroed one by one) until its dynamic threshold moves, and hands freed
    heap memory back to the kernel above 2x that threshold. Measured in-process, 150 MiB read
    cold (benchmarks/README.md, "The mount"): 37,600-38,200 page faults and 0.17-0.21 s of CPU
    for a first read, 24,800-25,600 and 0.15-0.16 s with this; 14,000-15,100 and 0.13-0.14 s for
    the next read, 6,100-8,300 and 0.12-0.13 s with this. Nothing on a C library without
    mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 2 * CHUNK_MAX)  # chunks from the heap, not an mmap each
    mallopt(M_TRIM_THRESHOLD, 2 * CHUNK_CACHE)  # freed chunks' memory kept for the next ones


def _log_to_syslog() -> None:
    """In the background nothing reads stderr (libfuse points it at /dev/null): errors (a
    damaged chunk) go to syslog, where there is one."""
    if not os.path.exists("/dev/log"):
        return
    import logging.handlers

    handler = logging.handlers.SysLogHandler(address="/dev/log")
    handler.setFormatter(logging.Formatter("dittohead-mount: %(message)s"))
    logging.getLogger("dittohead").addHandler(handler)


def _allow_other() -> bool:
    """allow_other, where this account may ask for it (root, or user_allow_other in fuse.conf)."""
    if os.geteuid() == 0:
        return True
    with contextlib.suppress(OSError), open("/etc/fuse.conf", encoding="utf-8") as f:
        if any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f):
            return True
    log.warning("only this account will see the mount: add user_allow_other to /etc/fuse.conf "
                "for the study's readers to see it too")
    return False


def _libfuse_major(mfusepy: Any) -> int:
    return int(getattr(mfusepy, "fuse_version_major", 2))


def umount(mountpoint: str) -> None:
    """Unmount a dittohead mount (fusermount3 -u, else fusermount -u, else umount)."""
    path = os.path.abspath(mountpoint)
    dead = _dead_mount(path)
    if not dead and not os.path.ismount(path):
        raise UsageError(f"{mountpoint}: nothing is mounted there")
    for tool in ("fusermount3", "fusermount"):
        exe = shutil.which(tool) or (f"/usr/bin/{tool}" if os.path.exists(f"/usr/bin/{tool}") else None)
        if exe:
            argv = [exe, "-u", *(["-z"] if dead else []), path]
            break
    else:
        argv = ["umount", *(["-l"] if dead else []), path]
    cp = subprocess.run(argv, capture_output=True, text=True, check=False)
    if cp.returncode != 0:
        why = cp.stderr.strip().splitlines()[-1] if cp.stderr.strip() else f"{argv[0]} exited {cp.returncode}"
        raise DittoheadError(f"{mountpoint}: cannot unmount: {why} (a program still has a file open there?)")
