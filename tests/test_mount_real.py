"""Real FUSE mounts (``dittohead mount`` / ``umount``), as root: the marked set (``-m mount``).

tests/test_mount_ops.py calls the adapter directly; here the kernel stands between the test and
dittohead, as it does for a study runner: every file of every version read through the mount
is what ``dittohead cat`` gives (a file that is also a folder, a name that is not UTF-8, an empty
file, a file of several chunks), ``cp -a`` and ``diff -r`` against an export, every change refused
with "Read-only file system", many processes and threads reading at once, a new ingest seen
without a remount while a file kept open keeps its version, ``--study``, ``log.jsonl``,
``--foreground`` ended by a signal, a busy ``umount`` and a mount whose process was killed, the
readers group with real accounts (the mount run as root, and once as the daemon's own account, in
a private mount namespace), and the one-line errors where FUSE is missing.

Every mount is made under a folder of this module's own (``/tmp/dittohead-mounttest-PID-*``)
and unmounted in a ``finally`` (``dittohead umount``, else ``fusermount3 -u -z``, else
``umount -l``); mounts that a killed earlier run left (their source ``dittohead:`` + such a
folder, whose test process is gone) are swept first. Without root, /dev/fuse, libfuse 3 or
mfusepy the mount tests skip, saying which; the tests of the errors for a missing FUSE run
everywhere.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import refusing_fs
from conftest import Server, store_snapshot

pytestmark = pytest.mark.mount

PYTHON = sys.executable
TEST_DIR_PREFIX = "/tmp/dittohead-mounttest-"
_TEST_SOURCE_RE = re.compile(r"^dittohead:" + re.escape(TEST_DIR_PREFIX) + r"(\d+)-")
FSTYPE = "fuse.dittohead"
ROFS = "Read-only file system"
DENIED = "Permission denied"
SEEN_WITHIN = 2.0  # seconds: a new ingest shows in a running mount (the issue)


def _why_no_fuse() -> str | None:
    """Why a real mount cannot be made here (the skip reason), or None."""
    if why := refusing_fs.unavailable():  # Linux, /dev/fuse, a libfuse, mfusepy
        return why
    if os.geteuid() != 0:
        return "real mounts are tested as root (allow_other without user_allow_other)"
    if not ctypes.util.find_library("fuse3"):
        return "no libfuse3: apt-get install fuse3"
    return None


NO_FUSE = _why_no_fuse()
needs_fuse = pytest.mark.skipif(NO_FUSE is not None, reason=NO_FUSE or "")


# -- mounts: made, found, unmounted, swept ---------------------------------------------------------


def _unoctal(field_: bytes) -> bytes:
    r"""A mountinfo field: space, tab, newline and backslash are written as \ooo."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field_)


def _mounts(pid: int | str = "self") -> list[tuple[str, str, str, str]]:
    """(mount point, type, source, super options) of each mount in ``pid``'s namespace."""
    out = []
    with open(f"/proc/{pid}/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            out.append((os.fsdecode(_unoctal(fields[4])), fields[sep + 1].decode(),
                        os.fsdecode(_unoctal(fields[sep + 2])), fields[sep + 3].decode()))
    return out


def _mount_at(mp: str | os.PathLike[str], pid: int | str = "self") -> tuple[str, str, str, str] | None:
    """The dittohead mount on ``mp`` (a dead one included, which os.path.ismount misses)."""
    mp = os.path.abspath(mp)
    found = [m for m in _mounts(pid) if m[0] == mp and m[1] == FSTYPE]
    return found[-1] if found else None


def _force_unmount(mp: str) -> None:
    """Detach ``mp`` now, busy or not (``fusermount3 -u -z``, else ``umount -l``)."""
    for argv in (["fusermount3", "-u", "-z", "--", mp], ["umount", "-l", "--", mp]):
        if _mount_at(mp) is None:
            return
        if shutil.which(argv[0]):
            subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)


def _unmount(mp: str | os.PathLike[str]) -> None:
    """``dittohead umount MP``; where that fails (a file still open), a lazy unmount."""
    mp = os.path.abspath(mp)
    if _mount_at(mp) is None:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        _dh("umount", mp, timeout=30)
    _force_unmount(mp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale() -> list[str]:
    """Unmount (lazily) the dittohead mounts of this module's folders whose test process is
    gone (a run that was killed), then remove those folders. Nothing else is touched."""
    swept = []
    for point, kind, source, _ in _mounts():
        m = _TEST_SOURCE_RE.match(source)
        if kind == FSTYPE and m and not _alive(int(m.group(1))):
            _force_unmount(point)
            swept.append(point)
    for name in os.listdir("/tmp"):
        path = "/tmp/" + name
        m = re.match(re.escape(TEST_DIR_PREFIX) + r"(\d+)-", path)
        if m and not _alive(int(m.group(1))) and not any(p.startswith(path + "/") for p, *_ in _mounts()):
            subprocess.run(["rm", "-rf", "--one-file-system", "--", path], check=False)
    return swept


def _mounts_of_this_run() -> list[str]:
    return [point for point, kind, source, _ in _mounts()
            if kind == FSTYPE and source.startswith(f"dittohead:{TEST_DIR_PREFIX}{os.getpid()}-")]


@pytest.fixture(scope="module", autouse=True)
def _swept() -> Iterator[None]:
    """Stale mounts swept before the module; none of its own left after it."""
    if NO_FUSE is None:
        _sweep_stale()
    yield
    if NO_FUSE is None:
        assert _mounts_of_this_run() == [], "mounts left behind"


@contextlib.contextmanager
def _test_dir() -> Iterator[Path]:
    """A folder of this module's own (0755, so that test accounts can traverse it), removed at
    the end with whatever is still mounted in it unmounted first."""
    path = Path(tempfile.mkdtemp(prefix=f"{os.path.basename(TEST_DIR_PREFIX)}{os.getpid()}-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        for point, kind, *_ in _mounts():
            if point.startswith(f"{path}/") and kind == FSTYPE:
                _unmount(point)
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=False)


@pytest.fixture
def tdir() -> Iterator[Path]:
    with _test_dir() as path:
        yield path


def _dh(*args: object, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m dittohead ARGS`` as a real process, as root (bytes stdout, text stderr)."""
    argv = [PYTHON, "-m", "dittohead", *(os.fspath(a) if isinstance(a, os.PathLike) else a for a in args)]
    cp = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False,
                        env=env if env is not None else dict(os.environ))
    return subprocess.CompletedProcess(cp.args, cp.returncode, cp.stdout, cp.stderr.decode("utf-8", "replace"))


def _said(cp: subprocess.CompletedProcess) -> str:
    out = cp.stdout if isinstance(cp.stdout, str) else cp.stdout[-2000:].decode("utf-8", "replace")
    return f"{cp.args!r}: exit {cp.returncode}\nstdout: {out[-2000:]}\nstderr: {cp.stderr[-3000:]}"


@contextlib.contextmanager
def _mounted(root: Path, mp: Path, *extra: str) -> Iterator[Path]:
    """``dittohead mount --store ROOT MP [EXTRA]`` (in the background, as root) for the block;
    always unmounted at its end."""
    mp.mkdir(parents=True, exist_ok=True)
    try:
        cp = _dh("mount", "--store", root, mp, *extra)
        assert cp.returncode == 0 and _mount_at(mp) is not None, _said(cp)
        yield mp
    finally:
        _unmount(mp)


# -- the study: what was sent, version by version -------------------------------------------------

NON_UTF8 = b"caf\xe9.txt"  # Latin-1 bytes: not UTF-8
BIG = random.Random(12).randbytes(6 << 20)  # > 4 MiB, the largest chunk: several chunks
BIG2 = BIG[: 3 << 20] + random.Random(13).randbytes(4096) + BIG[(3 << 20) + 4096:]
SUFFIX = b"~file"


@dataclass
class Model:
    """What the study should hold: each path's versions (bytes, oldest first), and each
    submission's files (seq -> path -> bytes)."""

    versions: dict[bytes, list[bytes]] = field(default_factory=dict)
    submissions: dict[int, dict[bytes, bytes]] = field(default_factory=dict)

    def current(self) -> dict[bytes, bytes]:
        """current/ as the view shows it: a file that is also a folder as NAME~file."""
        out = {}
        for path, vs in self.versions.items():
            folder = any(other.startswith(path + b"/") for other in self.versions)
            out[path + SUFFIX if folder else path] = vs[-1]
        return out


def _send(server: Server, src: Path, files: dict[bytes, bytes | None], model: Model, *,
          study: str = "s", site: str = "lab A/1") -> None:
    """Change ``src`` (None: delete), sync it into ``study`` and ingest; the model follows."""
    for rel, data in files.items():
        path = os.path.join(os.fsencode(src), rel)
        if data is None:
            os.unlink(path)
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    server.sync(src, study=study, site=site)
    server.ingest()
    seq = len(model.submissions) + 1
    model.submissions[seq] = {}
    for rel, data in files.items():
        if data is not None:
            vs = model.versions.setdefault(rel, [])
            if not vs or vs[-1] != data:
                vs.append(data)
                model.submissions[seq][rel] = data


@dataclass
class Shared:
    server: Server
    model: Model
    other: Model  # study t's
    base: Path
    mp: Path  # the whole store, mounted as root
    env: dict[str, str]


@pytest.fixture(scope="module")
def shared() -> Iterator[Shared]:
    """A store with study s (several versions of several files, a file that became a folder, a
    name that is not UTF-8, an empty file, a file of several chunks) and study t, mounted whole
    (as root) for the module's tests that only read."""
    if NO_FUSE is not None:
        pytest.skip(NO_FUSE)
    with _test_dir() as base:
        server = Server(base / "srv", state=base / "state").init(["s", "t"])
        model, other = Model(), Model()
        src = base / "src"
        _send(server, src, {b"a.txt": b"alpha, the first\n", b"notes/n.csv": b"x,y\n1,2\n",
                            b"data": b"data as a file\n", b"empty": b"", NON_UTF8: b"named in Latin-1\n",
                            b"big.bin": BIG}, model)
        _send(server, src, {b"a.txt": b"alpha, the second and longer\n", b"notes/n.csv": b"x,y\n1,2\n3,4\n",
                            b"data": None, b"data/f.txt": b"inside data, now a folder\n", b"big.bin": BIG2}, model)
        _send(server, src, {b"a.txt": b"alpha 3\n", NON_UTF8: b"named in Latin-1, again\n",
                            b"notes/deep/d.txt": b"deep\n"}, model, site="Brogden")
        _send(server, base / "src-t", {b"t.txt": b"study t\n"}, other, study="t")
        env = dict(os.environ, DITTOHEAD_STATE_DIR=str(server.state))
        env.pop("DITTOHEAD_STORE", None)
        with _mounted(server.root, base / "mnt") as mp:
            yield Shared(server, model, other, base, mp, env)


def _walk(top: Path) -> tuple[dict[bytes, bytes], set[bytes]]:
    """Every file under ``top`` (relative path bytes -> its bytes) and every folder."""
    files, folders = {}, set()
    btop = os.fsencode(top)
    for dirpath, dirnames, filenames in os.walk(btop):
        rel = os.path.relpath(dirpath, btop)
        for d in dirnames:
            folders.add(os.path.normpath(os.path.join(rel, d)))
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                data = f.read()
            assert len(data) == os.stat(path).st_size, path
            files[os.path.normpath(os.path.join(rel, name))] = data
    return files, folders


def _snapshot(top: Path) -> dict[bytes, tuple]:
    """Names, kinds, modes, owners, sizes and bytes of everything under ``top``."""
    out: dict[bytes, tuple] = {}
    files, folders = _walk(top)
    for rel in folders:
        st = os.stat(os.path.join(os.fsencode(top), rel))
        out[rel] = ("dir", st.st_mode, st.st_uid, st.st_gid)
    for rel, data in files.items():
        st = os.stat(os.path.join(os.fsencode(top), rel))
        out[rel] = ("file", st.st_mode, st.st_uid, st.st_gid, data)
    return out


# -- every file of every version ---------------------------------------------------------------------


@needs_fuse
def test_every_file_of_every_version_reads_as_cat_gives_it(shared: Shared) -> None:
    server, model = shared.server, shared.model
    files, folders = _walk(shared.mp / "s")
    cats: dict[tuple[bytes, int | None], bytes] = {}

    def cat(path: bytes, version: int | None = None) -> bytes:
        if (path, version) not in cats:
            cats[path, version] = server.cat(os.fsdecode(path), version=version)
        return cats[path, version]

    seq_to_n = {p: {v["seq"]: v["version"] for v in server.versions(os.fsdecode(p))} for p in model.versions}

    # current/: the latest version of every path, a file that is also a folder as NAME~file
    current = {rel[len(b"current/"):]: data for rel, data in files.items() if rel.startswith(b"current/")}
    assert current == model.current()
    assert b"data~file" in current and b"data" not in current and b"current/data" in folders
    for shown, data in current.items():
        path = shown[: -len(SUFFIX)] if shown.endswith(SUFFIX) and shown not in model.versions else shown
        assert data == cat(path), shown

    # versions/PATH/NNNN_...: every version of every path, in order
    found: dict[bytes, dict[int, bytes]] = {}
    for rel, data in files.items():
        if rel.startswith(b"versions/"):
            path, name = os.path.split(rel[len(b"versions/"):])
            assert re.fullmatch(rb"\d{4}_\d{8}T\d{6}Z_[A-Za-z0-9._-]+", os.path.splitext(name)[0]), rel
            found.setdefault(path, {})[int(name[:4])] = data
    assert set(found) == set(model.versions)
    for path, vs in model.versions.items():
        assert sorted(found[path]) == list(range(1, len(vs) + 1)), path
        for n, data in found[path].items():
            assert data == vs[n - 1] == cat(path, n), (path, n)

    # submissions/STAMP_SITE_SEQ/PATH: each submission's files, as received
    subs: dict[int, dict[bytes, bytes]] = {}
    for rel, data in files.items():
        if rel.startswith(b"submissions/"):
            sub, path = rel[len(b"submissions/"):].split(b"/", 1)
            seq = int(sub.rsplit(b"_", 1)[1])
            subs.setdefault(seq, {})[path] = data
            assert data == cat(path, seq_to_n[path][seq]), rel
    assert subs == {seq: f for seq, f in model.submissions.items() if f}

    assert {rel.split(b"/", 1)[0] for rel in files} == {b"current", b"versions", b"submissions", b"log.jsonl"}
    assert len(files) == 1 + len(current) + sum(len(vs) for vs in model.versions.values()) + sum(
        len(f) for f in model.submissions.values())
    # the particular cases the issue names, seen through the kernel
    assert current[NON_UTF8] == b"named in Latin-1, again\n"
    assert current[b"empty"] == b"" and os.stat(shared.mp / "s/current/empty").st_size == 0
    assert current[b"big.bin"] == BIG2 and found[b"big.bin"][1] == BIG
    # modes: nothing writable, the study open to everyone (no readers group)
    for rel in (b"current", b"current/a.txt", b"versions/big.bin", b"log.jsonl"):
        st = os.stat(os.path.join(os.fsencode(shared.mp / "s"), rel))
        assert stat.S_IMODE(st.st_mode) == (0o755 if stat.S_ISDIR(st.st_mode) else 0o444), rel


@needs_fuse
def test_the_whole_store_has_a_folder_per_study_and_each_its_log(shared: Shared) -> None:
    assert sorted(os.listdir(shared.mp)) == ["s", "t"]
    for study in ("s", "t"):
        assert sorted(os.listdir(shared.mp / study)) == ["current", "log.jsonl", "submissions", "versions"]
        log = (shared.mp / study / "log.jsonl").read_bytes()
        assert log.endswith(b"\n") and log.isascii()
        assert [json.loads(line) for line in log.splitlines()] == shared.server.log(study)
    assert (shared.mp / "t/current/t.txt").read_bytes() == b"study t\n"


# -- cp -a and diff -r against an export ---------------------------------------------------------------


@needs_fuse
def test_cp_a_and_diff_r_agree_with_an_export(shared: Shared) -> None:
    dest = shared.base / "export-s"
    cp = _dh("export", "--store", shared.server.root, "--study", "s", dest, env=shared.env)
    assert cp.returncode == 0, _said(cp)
    copy = shared.base / "copy-current"
    cp = subprocess.run(["cp", "-a", "--", f"{shared.mp}/s/current", str(copy)], capture_output=True, text=True,
                        stdin=subprocess.DEVNULL, check=False)
    assert cp.returncode == 0 and cp.stderr == "", _said(cp)
    assert os.path.exists(os.path.join(os.fsencode(copy), NON_UTF8))
    for a, b in ((copy, dest / "current"), (shared.mp / "s/current", dest / "current"), (shared.mp / "s", dest)):
        cp = subprocess.run(["diff", "-r", "--", str(a), str(b)], capture_output=True, stdin=subprocess.DEVNULL,
                            check=False)
        assert cp.returncode == 0 and cp.stdout == b"", (a, b, cp.stdout[-2000:], cp.stderr[-2000:])
    copied, _ = _walk(copy)
    assert copied == shared.model.current()
    # cp -a keeps the times the mount shows: each version's source mtime, as the export gives it
    # (the export sets times from a float: equal to within a microsecond)
    for rel in copied:
        times = [os.stat(os.path.join(os.fsencode(top), rel)).st_mtime_ns
                 for top in (shared.mp / "s/current", copy, dest / "current")]
        assert times[0] == times[1] and abs(times[0] - times[2]) < 1000, (rel, times)


# -- nothing changes ------------------------------------------------------------------------------------


_SETXATTR = """
import os, sys
try:
    os.setxattr(sys.argv[1], "user.x", b"1")
except OSError as e:
    sys.exit(f"setxattr: {e.strerror}")
"""


@needs_fuse
def test_every_change_is_refused_with_erofs_and_changes_nothing(shared: Shared) -> None:
    s = f"{shared.mp}/s"
    outside = shared.base / "outside.txt"
    outside.write_bytes(b"from outside\n")
    before, store_before = _snapshot(shared.mp), store_snapshot(shared.server.root)
    setxattr = (["setfattr", "-n", "user.x", "-v", "1", f"{s}/current/a.txt"] if shutil.which("setfattr") else
                [PYTHON, "-c", _SETXATTR, f"{s}/current/a.txt"])
    attempts = [
        ["touch", f"{s}/current/a.txt"],
        ["touch", f"{s}/current/new.txt"],
        ["mkdir", f"{s}/current/newdir"],
        ["mkdir", f"{shared.mp}/newstudy"],
        ["rm", "-f", f"{s}/current/a.txt"],
        ["rm", "-rf", f"{s}/current/notes"],
        ["rmdir", f"{s}/current/notes/deep"],
        ["mv", f"{s}/current/a.txt", f"{s}/current/b.txt"],
        ["mv", str(outside), f"{s}/current/"],
        ["cp", str(outside), f"{s}/current/"],
        ["ln", f"{s}/current/a.txt", f"{s}/current/hard"],
        ["ln", "-s", "a.txt", f"{s}/current/soft"],
        ["chmod", "600", f"{s}/current/a.txt"],
        ["chmod", "u+w", f"{s}/current/notes"],
        ["chown", "1:1", f"{s}/current/a.txt"],
        ["truncate", "-s", "0", f"{s}/current/a.txt"],
        ["sh", "-c", f"echo x > '{s}/current/a.txt'"],
        ["sh", "-c", f"echo x >> '{s}/current/big.bin'"],
        ["sh", "-c", f"echo x > '{s}/current/new.txt'"],
        setxattr,
    ]
    for argv in attempts:
        cp = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30, check=False)
        assert cp.returncode != 0 and ROFS in cp.stderr, _said(cp)
    assert outside.read_bytes() == b"from outside\n"  # mv left its source
    assert _snapshot(shared.mp) == before
    assert store_snapshot(shared.server.root) == store_before


# -- many readers at once ----------------------------------------------------------------------------------

_THREADS = """
import os, random, sys, threading, json
pairs = [(bytes.fromhex(m), bytes.fromhex(r)) for m, r in (a.split(":") for a in sys.argv[1:])]
refs = [open(r, "rb").read() for _, r in pairs]
shared_fds = [os.open(m, os.O_RDONLY) for m, _ in pairs]  # one descriptor per file, every thread's
errors, reads = [], [0]
lock = threading.Lock()

def reader(seed):
    rng = random.Random(seed)
    own = {}
    for _ in range(150):
        i = rng.randrange(len(pairs))
        how = rng.random()
        if how < 0.2:
            fd = os.open(pairs[i][0], os.O_RDONLY)
        elif how < 0.6:
            fd = own.get(i) or own.setdefault(i, os.open(pairs[i][0], os.O_RDONLY))
        else:
            fd = shared_fds[i]
        ref = refs[i]
        off = rng.randrange(0, len(ref) + 1)
        size = rng.choice([1, 511, 4096, 65536, 131075, 1 << 20, 3 << 20])
        try:
            got = os.pread(fd, size, off)
        except OSError as e:
            got = repr(e).encode()
        if fd not in own.values() and fd not in shared_fds:
            os.close(fd)
        with lock:
            reads[0] += 1
            if got != ref[off:off + size]:
                errors.append(f"{pairs[i][0]!r} at {off}+{size}: {len(got)} bytes")

threads = [threading.Thread(target=reader, args=(n,)) for n in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"reads": reads[0], "errors": errors[:10]}))
"""


@needs_fuse
def test_many_processes_and_threads_read_at_once(shared: Shared) -> None:
    s = os.fsencode(shared.mp / "s")
    version = next(n for n in os.listdir(s + b"/versions/big.bin") if n.startswith(b"0001_"))
    wanted = {b"current/big.bin": BIG2, b"versions/big.bin/" + version: BIG,
              b"current/" + NON_UTF8: shared.model.current()[NON_UTF8], b"current/a.txt": b"alpha 3\n",
              b"current/data/f.txt": b"inside data, now a folder\n", b"current/empty": b""}
    refs = shared.base / "refs"
    refs.mkdir(exist_ok=True)
    pairs = []
    for i, (rel, data) in enumerate(sorted(wanted.items())):
        (refs / str(i)).write_bytes(data)
        pairs.append((s + b"/" + rel, os.fsencode(refs / str(i)), data))
    procs = []
    for k in range(4):  # cat, each of every file (some at the same moment as another process)
        order = pairs[k:] + pairs[:k]
        argv = [b"sh", b"-c", b'for i in 1 2 3; do cat "$@" || exit 1; done', b"sh", *(m for m, _, _ in order)]
        want = b"".join(d for _, _, d in order) * 3
        procs.append((subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       stdin=subprocess.DEVNULL), want))
    threads = subprocess.Popen([PYTHON, "-c", _THREADS, *(f"{m.hex()}:{r.hex()}" for m, r, _ in pairs)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        for p, want in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0 and out == want, (p.args[-len(pairs):], len(out), len(want), err[-2000:])
        out, err = threads.communicate(timeout=60)
        assert threads.returncode == 0, err.decode("utf-8", "replace")[-3000:]
        doc = json.loads(out)
        assert doc["errors"] == [] and doc["reads"] == 8 * 150, doc
    finally:
        for p in [threads, *(p for p, _ in procs)]:
            if p.poll() is None:
                p.kill()
                p.wait()


# -- a new ingest, while mounted ---------------------------------------------------------------------------


OLD = {b"shrinks.bin": random.Random(1).randbytes(300_000), b"grows.txt": b"short\n",
       b"same-size.txt": b"version one\n"}
NEW = {b"shrinks.bin": b"now short\n", b"grows.txt": random.Random(2).randbytes(300_000),
       b"same-size.txt": b"version two\n"}


def _wait_for_new(cur: Path, since: float) -> float:
    """Seconds from ``since`` until current/ shows the second ingest (new.txt there, grows.txt
    its new bytes by a fresh open); fails after 10 s."""
    while True:
        if (cur / "new.txt").exists() and (cur / "grows.txt").read_bytes() == NEW[b"grows.txt"]:
            return time.monotonic() - since
        assert time.monotonic() - since < 10, "the new ingest did not show in 10 s"
        time.sleep(0.05)


@needs_fuse
def test_a_new_ingest_shows_within_2_s_without_a_remount(tdir: Path) -> None:
    server = Server(tdir / "srv", state=tdir / "state").init(["s"])
    model = Model()
    _send(server, tdir / "src", dict(OLD), model)
    with _mounted(server.root, tdir / "mnt") as mp:
        cur = mp / "s" / "current"
        assert {n: (cur / os.fsdecode(n)).read_bytes() for n in OLD} == OLD  # the kernel has them cached
        assert not (cur / "new.txt").exists()  # ... and that this name is not there
        assert len((mp / "s/log.jsonl").read_bytes().splitlines()) == 1
        _send(server, tdir / "src", {**NEW, b"new.txt": b"new\n"}, model)
        took = _wait_for_new(cur, time.monotonic())
        assert took <= SEEN_WITHIN, f"the new ingest showed after {took:.2f} s"
        assert {n: (cur / os.fsdecode(n)).read_bytes() for n in NEW} == NEW
        assert max(os.listdir(mp / "s/versions/grows.txt")).startswith("0002_")
        assert len(os.listdir(mp / "s/submissions")) == 2
        log = (mp / "s/log.jsonl").read_bytes()
        assert [json.loads(line) for line in log.splitlines()] == server.log()


@needs_fuse
def test_a_file_kept_open_across_an_ingest_reads_the_version_it_opened(tdir: Path) -> None:
    """current/PATH opened before an ingest that brings a new version of PATH keeps reading the
    version it opened (ops.py: "an open file keeps the version it opened"), whether the new one
    is shorter, longer or of the same size, and before as after a fresh open of that name has
    read the new one; the fresh open reads the new one."""
    server = Server(tdir / "srv", state=tdir / "state").init(["s"])
    model = Model()
    _send(server, tdir / "src", dict(OLD), model)
    with _mounted(server.root, tdir / "mnt") as mp:
        cur = mp / "s" / "current"
        fds = {name: os.open(cur / os.fsdecode(name), os.O_RDONLY) for name in OLD}
        log_fd = os.open(mp / "s" / "log.jsonl", os.O_RDONLY)
        try:
            assert {name: os.pread(fd, 1 << 20, 0) for name, fd in fds.items()} == OLD
            old_log = os.pread(log_fd, 1 << 20, 0)
            _send(server, tdir / "src", {**NEW, b"new.txt": b"new\n"}, model)
            _wait_for_new(cur, time.monotonic())

            def what(name: bytes, data: bytes) -> str:
                return ("the old version" if data == OLD[name] else "the NEW version" if data == NEW[name]
                        else f"{len(data)} bytes of neither" if data != OLD[name][:len(data)]
                        else f"the old version cut to {len(data)} of {len(OLD[name])} bytes")

            kept = {name: os.pread(fd, 1 << 20, 0) for name, fd in fds.items()}
            kept_log = os.pread(log_fd, 1 << 20, 0)
            fresh = {name: (cur / os.fsdecode(name)).read_bytes() for name in OLD}
            fresh_log = (mp / "s/log.jsonl").read_bytes()
            kept_after = {name: os.pread(fd, 1 << 20, 0) for name, fd in fds.items()}
            kept_log_after = os.pread(log_fd, 1 << 20, 0)
            assert fresh == NEW, "a fresh open reads the new version"
            assert fresh_log.startswith(old_log) and fresh_log.count(b"\n") == 2
            wrong = [f"{os.fsdecode(n)}: {what(n, kept[n])}, then after a fresh open {what(n, kept_after[n])}"
                     for n in OLD if kept[n] != OLD[n] or kept_after[n] != OLD[n]]
            # docs/study-runners.md: "A program that keeps log.jsonl open sees it as it was when opened"
            wrong += [f"log.jsonl: {len(got)} bytes ({len(got.splitlines())} lines) {when}, opened with "
                      f"{len(old_log)} bytes (1 line)"
                      for got, when in ((kept_log, "before a fresh open"), (kept_log_after, "after a fresh open"))
                      if got != old_log]
            assert not wrong, "descriptors opened before the ingest read: " + "; ".join(wrong)
        finally:
            for fd in [*fds.values(), log_fd]:
                os.close(fd)


# -- --study, and what cannot be mounted --------------------------------------------------------------------


@needs_fuse
def test_one_study_at_the_top_and_its_log(shared: Shared) -> None:
    with _mounted(shared.server.root, shared.base / "mnt-s", "--study", "s") as mp:
        assert sorted(os.listdir(mp)) == ["current", "log.jsonl", "submissions", "versions"]
        assert not (mp / "t").exists() and not (mp / "s").exists()
        assert (mp / "current/notes/deep/d.txt").read_bytes() == b"deep\n"
        assert (mp / "current/big.bin").read_bytes() == BIG2
        log = (mp / "log.jsonl").read_bytes()
        assert log.endswith(b"\n") and log.isascii() and log.count(b"\n") == len(shared.model.submissions)
        assert [json.loads(line) for line in log.splitlines()] == shared.server.log("s")
        assert os.stat(mp / "log.jsonl").st_size == len(log)
        # the mount point is taken: a second mount there is a usage error
        cp = _dh("mount", "--store", shared.server.root, mp, env=shared.env)
        assert cp.returncode == 2 and cp.stderr.count("\n") == 1 and "umount" in cp.stderr, _said(cp)
    assert _mount_at(shared.base / "mnt-s") is None
    cp = _dh("mount", "--store", shared.server.root, shared.base / "mnt-s", "--study", "nosuch", env=shared.env)
    assert cp.returncode == 6 and "Traceback" not in cp.stderr, _said(cp)
    assert _mount_at(shared.base / "mnt-s") is None
    cp = _dh("umount", shared.base / "mnt-s", env=shared.env)
    assert cp.returncode == 2 and cp.stderr.count("\n") == 1, _said(cp)


# -- --foreground, ended by a signal ---------------------------------------------------------------------------


def _foreground(server: Server, mp: Path) -> subprocess.Popen:
    """``dittohead mount --store ROOT MP --foreground`` as root, once the mount is up."""
    mp.mkdir(exist_ok=True)
    p = subprocess.Popen([PYTHON, "-m", "dittohead", "mount", "--store", str(server.root), str(mp), "--foreground"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, DITTOHEAD_STATE_DIR=str(server.state)))
    deadline = time.monotonic() + 20
    while _mount_at(mp) is None:
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            raise AssertionError(f"the mount did not come up: {p.communicate(timeout=5)}")
        time.sleep(0.02)
    return p


@needs_fuse
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM-with-a-file-open"])
def test_a_foreground_mount_ended_by_a_signal_unmounts_and_exits_0(tdir: Path, sig: signal.Signals) -> None:
    """SIGINT is what Ctrl-C sends; SIGTERM what ``systemctl stop`` sends, after a umount that a
    program's open file made fail (docs/mount.md, "Unmounting"). Either ends the mount: the mount
    point is no longer one, exit 0, and no message that the mount failed."""
    server = Server(tdir / "srv", state=tdir / "state").init(["s"])
    _send(server, tdir / "src", {b"a.txt": b"a\n"}, Model())
    mp = tdir / "mnt"
    p = _foreground(server, mp)
    held = None
    try:
        assert (mp / "s/current/a.txt").read_bytes() == b"a\n"
        if sig == signal.SIGTERM:
            held = os.open(mp / "s/current/a.txt", os.O_RDONLY)
            cp = _dh("umount", mp)
            assert cp.returncode == 1 and "open" in cp.stderr and cp.stderr.count("\n") == 1, _said(cp)
            assert _mount_at(mp) is not None and (mp / "s/current/a.txt").read_bytes() == b"a\n"
        p.send_signal(sig)
        _, err = p.communicate(timeout=20)
        said = err.decode("utf-8", "replace")
        assert _mount_at(mp) is None and not os.path.ismount(mp)
        assert p.returncode == 0, f"exit {p.returncode} after {sig.name}; stderr: {said!r}"
        assert "could not mount" not in said and "Traceback" not in said and said.count("\n") <= 1, said
    finally:
        if held is not None:
            os.close(held)
        if p.poll() is None:
            p.kill()
            p.wait()
        _unmount(mp)


@needs_fuse
def test_after_the_mount_process_is_killed_umount_clears_the_dead_mount(tdir: Path) -> None:
    """docs/mount.md, "After a crash": the mount point stays behind, dead; ``mount`` there says
    so (exit 2) and ``umount`` detaches it; then it mounts again."""
    server = Server(tdir / "srv", state=tdir / "state").init(["s"])
    _send(server, tdir / "src", {b"a.txt": b"a\n"}, Model())
    mp = tdir / "mnt"
    p = _foreground(server, mp)
    try:
        p.kill()
        p.wait(timeout=20)
        assert _mount_at(mp) is not None  # dead, but there
        with pytest.raises(OSError):
            os.stat(mp / "s")
        cp = _dh("mount", "--store", server.root, mp)
        assert cp.returncode == 2 and "umount" in cp.stderr and cp.stderr.count("\n") == 1, _said(cp)
        cp = _dh("umount", mp)
        assert cp.returncode == 0 and _mount_at(mp) is None, _said(cp)
        with _mounted(server.root, mp):
            assert (mp / "s/current/a.txt").read_bytes() == b"a\n"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        _unmount(mp)


# -- readers, with real accounts -----------------------------------------------------------------------------


@dataclass
class Deployment:
    accounts: object  # tests/accounts.py's Accounts
    base: Path
    root: Path
    data: dict[str, bytes]  # what study g and study o hold at current/

    def ident(self, acct) -> dict:
        return {"user": acct.uid, "group": acct.gid, "extra_groups": acct.groups, "umask": 0o022}

    def as_(self, acct, *argv: object, timeout: float = 60) -> subprocess.CompletedProcess:
        """``argv`` run as ``acct`` (its uid, groups and clean environment)."""
        argv_ = [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in argv]
        cp = subprocess.run(argv_, capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout, check=False,
                            env=self.accounts.env_for(acct), cwd=acct.home, **self.ident(acct))
        return subprocess.CompletedProcess(cp.args, cp.returncode, cp.stdout, cp.stderr.decode("utf-8", "replace"))

    def dh_as(self, acct, *args: object) -> subprocess.CompletedProcess:
        cp = self.accounts.run_as(acct, *args)
        assert cp.returncode == 0 and "Traceback" not in cp.stderr, _said(cp)
        return cp


@pytest.fixture(scope="module")
def dep(accounts) -> Iterator[Deployment]:
    """A server root made by the daemon's account: study g read by group ga only (``--readers``),
    study o by everyone; up_a sends to both, the daemon ingests."""
    if NO_FUSE is not None:
        pytest.skip(NO_FUSE)
    from accounts import make_dir

    with _test_dir() as base:
        srv = make_dir(base / "srv", accounts.daemon, 0o755)
        d = Deployment(accounts, base, srv / "root", {"x.txt": b"for ga's eyes\n", "sub/y.txt": b"deeper\n"})
        d.dh_as(accounts.daemon, "init", "--store", d.root)
        d.dh_as(accounts.daemon, "study", "add", "g", "--store", d.root, "--readers", accounts.ga.name)
        d.dh_as(accounts.daemon, "study", "add", "o", "--store", d.root)
        src = make_dir(base / "src", accounts.up_a, 0o700)
        make_dir(src / "sub", accounts.up_a, 0o700)
        for rel, data in d.data.items():
            (src / rel).write_bytes(data)
            os.chown(src / rel, accounts.up_a.uid, accounts.up_a.gid)
        for study in ("g", "o"):
            d.dh_as(accounts.up_a, "sync", src, "--study", study, "--to", d.root, "--site", "labA")
        d.dh_as(accounts.daemon, "watch", "--store", d.root, "--once")
        yield d


def _check_readers(dep: Deployment, top: Path, run=None) -> None:
    """Through ``top`` (a mount of the whole store): up_a, in ga, lists and reads study g; the
    reader, in no such group, is refused by the kernel; study o is everyone's."""
    run = run or dep.as_
    a, reader, daemon = dep.accounts.up_a, dep.accounts.reader, dep.accounts.daemon
    for who in (a, daemon):
        cp = run(who, "ls", top / "g" / "current")
        assert cp.returncode == 0 and cp.stdout.split() == [b"sub", b"x.txt"], (who.role, _said(cp))
        cp = run(who, "cat", top / "g/current/x.txt", top / "g/current/sub/y.txt")
        assert cp.returncode == 0 and cp.stdout == dep.data["x.txt"] + dep.data["sub/y.txt"], (who.role, _said(cp))
    cp = run(reader, "ls", top)
    assert cp.returncode == 0 and cp.stdout.split() == [b"g", b"o"], _said(cp)
    for argv in (["ls", top / "g"], ["ls", top / "g/current"], ["cat", top / "g/current/x.txt"],
                 ["stat", top / "g/current/sub"]):
        cp = run(reader, *argv)
        assert cp.returncode != 0 and DENIED in cp.stderr and cp.stdout == b"", _said(cp)
    cp = run(reader, "cat", top / "o/current/x.txt")
    assert cp.returncode == 0 and cp.stdout == dep.data["x.txt"], _said(cp)


@needs_fuse
def test_readers_group_through_a_root_mount_and_an_export_by_the_daemon(dep: Deployment) -> None:
    acc = dep.accounts
    with _mounted(dep.root, dep.base / "mnt") as mp:
        st = os.stat(mp / "g")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (acc.daemon.uid, acc.ga.gid, 0o2750)
        st = os.stat(mp / "g/current/x.txt")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (acc.daemon.uid, acc.ga.gid, 0o440)
        st = os.stat(mp / "o/current/x.txt")
        assert stat.S_IMODE(st.st_mode) == 0o444
        _check_readers(dep, mp)

        # the same study exported by the daemon's account: group ga, folders setgid 2750, files 0440
        from accounts import make_dir

        dest = make_dir(dep.base / "exports", acc.daemon, 0o755) / "g"
        dep.dh_as(acc.daemon, "export", "--store", dep.root, "--study", "g", dest)
        for dirpath, dirnames, filenames in os.walk(dest):
            st = os.stat(dirpath)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (acc.daemon.uid, acc.ga.gid, 0o2750), dirpath
            for name in filenames:
                st = os.stat(os.path.join(dirpath, name))
                assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (acc.ga.gid, 0o440), f"{dirpath}/{name}"
        cp = dep.as_(acc.up_a, "diff", "-r", mp / "g", dest)
        assert cp.returncode == 0 and cp.stdout == b"", _said(cp)
        cp = dep.as_(acc.up_a, "cat", dest / "current/x.txt")
        assert cp.returncode == 0 and cp.stdout == dep.data["x.txt"], _said(cp)
        for argv in (["ls", dest], ["cat", dest / "current/x.txt"], ["ls", dest / "versions"]):
            cp = dep.as_(acc.reader, *argv)
            assert cp.returncode != 0 and DENIED in cp.stderr and cp.stdout == b"", _said(cp)


@needs_fuse
def test_the_daemon_account_runs_the_mount_itself(dep: Deployment) -> None:
    """The mount run by the daemon's account, as in production (--foreground, as a systemd
    unit would). An account other than root needs ``user_allow_other`` in /etc/fuse.conf for
    allow_other, and libfuse 3 opens /dev/fuse itself (0666 on a usual host): neither may a test
    change for the machine, so the mount runs in a private mount namespace of its own (unshare)
    where /etc/fuse.conf has the line and /dev/fuse is such a node (bind mounts that nothing
    outside sees, gone with the namespace). Every account that reads it enters that namespace."""
    for tool in ("unshare", "nsenter", "setpriv"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} (util-linux) is needed to run the mount as the daemon in a private namespace")
    from accounts import make_dir

    acc = dep.accounts
    work = make_dir(dep.base / "ns", acc.daemon, 0o755)
    conf = work / "fuse.conf"
    with contextlib.suppress(FileNotFoundError):
        conf.write_bytes(Path("/etc/fuse.conf").read_bytes())
    with open(conf, "a") as f:
        f.write("\nuser_allow_other\n")
    os.chmod(conf, 0o644)
    binds = [(conf, "/etc/fuse.conf")]
    dev = os.stat("/dev/fuse")
    if stat.S_IMODE(dev.st_mode) & 0o006 != 0o006:  # as on a usual host: every account opens it
        node = work / "fuse-device"
        os.mknod(node, stat.S_IFCHR | 0o666, dev.st_rdev)
        os.chmod(node, 0o666)
        try:
            os.close(os.open(node, os.O_RDWR))
        except OSError as e:
            pytest.skip(f"a /dev/fuse node of the test's own cannot be opened here ({e.strerror})")
        binds.append((node, "/dev/fuse"))
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "sleep", "600"],
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    mount_proc = None
    try:
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{holder.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            if holder.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"unshare --mount failed here: {holder.communicate()[1].decode(errors='replace')}")
            time.sleep(0.01)
        ns = ["nsenter", "-t", str(holder.pid), "-m", "--"]
        for src, dst in binds:
            cp = subprocess.run([*ns, "mount", "--bind", str(src), dst], capture_output=True, text=True, check=False)
            if cp.returncode != 0:
                pytest.skip(f"cannot bind {dst} in a private namespace: {cp.stderr.strip()}")

        def as_in_ns(who, *argv: object) -> subprocess.CompletedProcess:
            return _run_in_ns(dep, ns, who, *argv)

        mp = make_dir(dep.base / "mnt-daemon", acc.daemon, 0o755)
        with open(work / "mount.log", "wb") as log:
            mount_proc = subprocess.Popen(
                [*ns, "setpriv", f"--reuid={acc.daemon.uid}", f"--regid={acc.daemon.gid}",
                 "--groups=" + ",".join(str(g) for g in acc.daemon.groups), "--",
                 acc.python, "-m", "dittohead", "mount", "--store", str(dep.root), str(mp), "--foreground"],
                env=acc.env_for(acc.daemon), cwd=acc.daemon.home, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while _mount_at(mp, holder.pid) is None:
            assert mount_proc.poll() is None and time.monotonic() < deadline, (work / "mount.log").read_text()
            time.sleep(0.02)
        assert _mount_at(mp) is None  # nothing of it outside the namespace
        options = _mount_at(mp, holder.pid)[3].split(",")
        assert f"user_id={acc.daemon.uid}" in options and "allow_other" in options, options
        _check_readers(dep, mp, as_in_ns)
        cp = as_in_ns(acc.daemon, acc.python, "-m", "dittohead", "umount", mp)
        assert cp.returncode == 0, _said(cp)
        assert mount_proc.wait(timeout=20) == 0, (work / "mount.log").read_text()
        assert _mount_at(mp, holder.pid) is None
    finally:
        for p in (mount_proc, holder):
            if p is not None and p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _run_in_ns(dep: Deployment, ns: list[str], who, *argv: object) -> subprocess.CompletedProcess:
    """``argv`` run as ``who`` inside the namespace ``ns`` enters (nsenter as root, then setpriv)."""
    argv_ = [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in argv]
    groups = ",".join(str(g) for g in who.groups)
    cp = subprocess.run([*ns, "setpriv", f"--reuid={who.uid}", f"--regid={who.gid}", f"--groups={groups}", "--",
                         *argv_], capture_output=True, stdin=subprocess.DEVNULL, timeout=60, check=False,
                        env=dep.accounts.env_for(who), cwd=who.home)
    return subprocess.CompletedProcess(cp.args, cp.returncode, cp.stdout, cp.stderr.decode("utf-8", "replace"))


# -- without FUSE: one line saying what to install; every other command works ---------------------------------

_WITHOUT = """
import os, sys
real_exists = os.path.exists
no_dev = sys.argv[1] == "no-dev"
os.path.exists = lambda p: (not no_dev) if os.fspath(p) == "/dev/fuse" else real_exists(p)
from dittohead.errors import DittoheadError
from dittohead.fuse.mount import MountUnavailable, load_mfusepy
try:
    load_mfusepy()
except MountUnavailable as e:
    assert isinstance(e, DittoheadError)
    print(str(e))
else:
    print("loaded")
sys.argv = ["dittohead", *sys.argv[2:]]
from dittohead.cli import main
main()
"""


@pytest.mark.parametrize("missing", ["no-dev", "no-libfuse"])
def test_without_fuse_the_mount_says_what_to_install_in_one_line(tmp_path: Path, missing: str) -> None:
    """Without /dev/fuse (os.path.exists says so), or with libfuse not found (FUSE_LIBRARY_PATH
    at a library that is not there): load_mfusepy raises MountUnavailable, and ``dittohead
    mount`` exits 1 with one line saying what to do, no traceback, nothing mounted."""
    server = Server(tmp_path, state=tmp_path / "state").init(["s"])
    mp = tmp_path / "mnt"
    mp.mkdir()
    env = dict(os.environ, DITTOHEAD_STATE_DIR=str(server.state))
    if missing == "no-libfuse":
        env["FUSE_LIBRARY_PATH"] = str(tmp_path / "nonexistent" / "libfuse3.so.3")
    cp = subprocess.run([PYTHON, "-c", _WITHOUT, missing, "mount", "--store", str(server.root), str(mp)],
                        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60, check=False)
    said = cp.stdout.splitlines()
    assert len(said) == 1 and said[0] != "loaded", _said(cp)
    want = ("/dev/fuse", "modprobe fuse") if missing == "no-dev" else ("libfuse", "apt-get install fuse3")
    assert all(w in said[0] for w in want), said
    assert cp.returncode == 1 and "Traceback" not in cp.stderr, _said(cp)
    lines = cp.stderr.splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in want), lines
    assert not os.path.ismount(mp)


_OTHERS = """
import json, os, sys
from click.testing import CliRunner
from dittohead.cli import cli
root, src, dest = sys.argv[1:4]
runner = CliRunner()
codes = {}
for args in (["--help"], ["mount", "--help"], ["umount", "--help"], ["init", "--store", root],
             ["study", "add", "s", "--store", root], ["sync", src, "--study", "s", "--to", root],
             ["watch", "--store", root, "--once"], ["ls", "--store", root, "--study", "s"],
             ["cat", "--store", root, "--study", "s", "a.txt"], ["versions", "--store", root, "--study", "s", "a.txt"],
             ["log", "--store", root, "--study", "s", "--json"], ["export", "--store", root, "--study", "s", dest],
             ["fsck", "--store", root]):
    r = runner.invoke(cli, args)
    codes[" ".join(args[:1])] = r.exit_code
print(json.dumps({"codes": codes, "fuse": sorted(m for m in sys.modules if "fuse" in m.lower())}))
"""


def test_every_other_command_works_without_importing_mfusepy(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"a\n")
    env = dict(os.environ, DITTOHEAD_STATE_DIR=str(tmp_path / "state"),
               FUSE_LIBRARY_PATH=str(tmp_path / "nonexistent" / "libfuse3.so.3"))
    cp = subprocess.run([PYTHON, "-c", _OTHERS, str(tmp_path / "root"), str(src), str(tmp_path / "dest")],
                        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=120, check=False)
    assert cp.returncode == 0, _said(cp)
    doc = json.loads(cp.stdout.splitlines()[-1])
    assert set(doc["codes"].values()) == {0}, doc
    assert doc["fuse"] == [], f"imported without a mount: {doc['fuse']}"
    assert (tmp_path / "dest/current/a.txt").read_bytes() == b"a\n"
