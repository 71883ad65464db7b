"""Tests of ``dittohead.directio`` (bulk file I/O with O_DIRECT, falling back to buffered I/O), and
of the client's buffered read of small files (``dittohead.client.reader.read_small``).

All on real files, in pytest's tmp dir and (where it exists) in a dir on /dev/shm (tmpfs).

Covered:
- open_fd / is_direct / undirect / advise: O_DIRECT is really set wherever the filesystem accepts
  it (checked against an independent raw probe, so a silent fallback everywhere fails), the
  flag round-trips, and the fallbacks: a platform without O_DIRECT, a filesystem that refuses it
  at open, and one that accepts the open but refuses the reads and writes (EINVAL); other errors
  are raised, not swallowed.
- Writer: data written in pieces of arbitrary sizes (file sizes 0, 1, ALIGN±1, ALIGN, BLOCK±1,
  BLOCK, 2*BLOCK+5 and random; random split points, as a hypothesis property) is byte-identical
  on disk after finish(), with the exact size; digest() (hashed=True, before finish, also
  mid-stream) is BLAKE3 of what was written; close() without finish abandons quietly; direct and
  plain fds alike.
- Reader: readinto with buffers of random sizes, and read(n), return exactly the file's bytes, for
  the same sizes, from direct and plain fds, from the start whatever the fd's offset; a file that
  grows while it is read gives a prefix of its final content; read errors that are not a refusal
  of O_DIRECT are raised.
- read_small: the first limit+1 bytes at most with stat before and after, for sizes 0, 1, ALIGN,
  limit, limit+1, limit+5000, several limits, also when reads come back short; a symlink is
  not followed.
- pyfastcdc: Chunker().cut_stream(Reader(fd), size) cuts exactly as Chunker().cut_bytes(data).
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dittohead import directio
from dittohead import format as fmt
from dittohead.chunking import Chunker
from dittohead.client.reader import read_small
from dittohead.hashing import blake3

ALIGN, BLOCK = directio.ALIGN, directio.BLOCK
SIZES = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, directio.WRITE_BLOCK - 1, directio.WRITE_BLOCK + 1, BLOCK - 1, BLOCK,
         BLOCK + 1, 2 * BLOCK + 5]
WFLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
HAS_O_DIRECT = hasattr(os, "O_DIRECT")
_names = itertools.count()


def raw_accepts_direct(d: Path) -> bool:
    """Whether ``d``'s filesystem takes O_DIRECT, probed without directio."""
    if not HAS_O_DIRECT:
        return False
    import fcntl

    p = d / f".probe{next(_names)}"
    try:
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
    finally:
        os.close(fd)
        os.unlink(p)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Scratch dirs by filesystem: "disk" (pytest's tmp dir) and "shm" (tmpfs), if present."""
    out = {"disk": tmp_path_factory.mktemp("directio")}
    shm = None
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        shm = Path(tempfile.mkdtemp(prefix="dittohead-test-", dir="/dev/shm"))
        out["shm"] = shm
    yield out
    if shm is not None:
        shutil.rmtree(shm, ignore_errors=True)


def on_local_disk(d: Path) -> bool:
    """Whether ``d`` is on a local disk's filesystem, by the mount table (not by directio)."""
    best, fstype = "", ""
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            point = fields[1].replace("\\040", " ")
            if (str(d) == point or str(d).startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, fstype = point, fields[2]
    return fstype in ("ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs")


@pytest.fixture(scope="module")
def accepts(dirs: dict[str, Path]) -> dict[str, bool]:
    """Where directio opens files direct: the filesystem takes O_DIRECT, and it is a local
    disk's (directio never uses it on tmpfs, FUSE or a network share)."""
    return {k: raw_accepts_direct(d) and (not os.path.exists("/proc/self/mounts") or on_local_disk(d))
            for k, d in dirs.items()}


@pytest.fixture(params=["disk", "shm"])
def where(request: pytest.FixtureRequest, dirs: dict[str, Path]) -> str:
    if request.param not in dirs:
        pytest.skip("no writable /dev/shm")
    return request.param


def data_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def new_path(d: Path) -> str:
    return str(d / f"f{next(_names)}")


def open_write(path: str, direct: bool) -> int:
    if direct:
        return directio.open_fd(path, WFLAGS, 0o600)
    return os.open(path, WFLAGS, 0o600)


def open_read(path: str, direct: bool) -> int:
    return directio.open_fd(path, os.O_RDONLY) if direct else os.open(path, os.O_RDONLY)


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        return e.errno == errno.EBADF
    return False


def write_pieces(path: str, data: bytes, cuts: list[int], *, direct: bool) -> tuple[bytes, bool]:
    """Write ``data`` split at ``cuts`` through a hashed Writer, checking a mid-stream digest.

    Returns the digest taken before finish, and whether the fd was still direct then.
    """
    w = directio.Writer(open_write(path, direct), hashed=True)
    bounds = [0, *sorted(cuts), len(data)]
    mid = len(bounds) // 2
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        if i == mid:
            assert w.digest() == blake3(data[:a]).digest()
        assert w.write(memoryview(data)[a:b]) == b - a
    assert w.size == len(data)
    fd = w.fd
    direct_before_finish = directio.is_direct(fd)
    digest = w.digest()
    w.finish()
    assert closed(fd)
    return digest, direct_before_finish


# --- open_fd, is_direct, undirect, advise ---------------------------------------------------


def test_open_fd_is_direct_where_the_filesystem_accepts_it(
    where: str, dirs: dict[str, Path], accepts: dict[str, bool]
) -> None:
    if HAS_O_DIRECT and where == "disk":
        assert accepts["disk"], "tmp dir refuses O_DIRECT: the direct paths go untested here"
    path = new_path(dirs[where])
    fd = directio.open_fd(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert directio.is_direct(fd) == accepts[where]
    finally:
        os.close(fd)
    fd = directio.open_fd(path, os.O_RDONLY)
    try:
        assert directio.is_direct(fd) == accepts[where]
    finally:
        os.close(fd)
    fd = directio.open_fd(path, os.O_RDONLY, direct=False)
    try:
        assert not directio.is_direct(fd)
    finally:
        os.close(fd)


def test_undirect_round_trip(
    where: str, dirs: dict[str, Path], accepts: dict[str, bool]
) -> None:
    path = new_path(dirs[where])
    fd = directio.open_fd(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert directio.is_direct(fd) == accepts[where]
        directio.undirect(fd)
        assert not directio.is_direct(fd)
        directio.undirect(fd)  # idempotent
        assert not directio.is_direct(fd)
    finally:
        os.close(fd)


def test_advise(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Advice changes no bytes; a name posix_fadvise lacks is an error; a platform without
    posix_fadvise (Windows, macOS) gets nothing and no error."""
    data = data_of(BLOCK + 3, seed=8)
    (tmp_path / "f").write_bytes(data)
    with open(tmp_path / "f", "rb") as f:
        directio.advise(f.fileno(), "SEQUENTIAL", "DONTNEED")
        assert f.read() == data
        if hasattr(os, "posix_fadvise"):
            with pytest.raises(AttributeError):
                directio.advise(f.fileno(), "SEQUENTAIL")
            monkeypatch.delattr(os, "posix_fadvise")
        directio.advise(f.fileno(), "SEQUENTIAL", "SEQUENTAIL")


def test_open_fd_raises_errors_other_than_a_refusal(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        directio.open_fd(str(tmp_path / "missing"), os.O_RDONLY)
    with pytest.raises(FileExistsError):
        directio.open_fd(str(tmp_path), os.O_WRONLY | os.O_CREAT | os.O_EXCL)


def test_platform_without_o_direct(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(directio, "_O_DIRECT", 0)
    data = data_of(BLOCK + ALIGN + 1, seed=7)
    path = str(tmp_path / "f")
    fd = directio.open_fd(path, WFLAGS, 0o600)
    assert not directio.is_direct(fd)
    if HAS_O_DIRECT:  # the module must not set the flag it believes it lacks
        import fcntl

        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    directio.undirect(fd)
    w = directio.Writer(fd)
    w.write(data)
    w.finish()
    assert Path(path).read_bytes() == data
    r = directio.Reader(directio.open_fd(path, os.O_RDONLY))
    try:
        assert r.read(len(data) + 1) == data
    finally:
        r.close()


@pytest.mark.skipif(not HAS_O_DIRECT, reason="no O_DIRECT on this platform")
def test_filesystem_refusing_o_direct_at_open(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_open = os.open

    def refusing_open(path, flags, mode=0o777, **kw):  # type: ignore[no-untyped-def]
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", refusing_open)
    data = data_of(BLOCK + 3, seed=8)
    path = str(tmp_path / "f")
    fd = directio.open_fd(path, WFLAGS, 0o600)
    assert not directio.is_direct(fd)
    w = directio.Writer(fd, hashed=True)
    w.write(data)
    assert w.digest() == blake3(data).digest()
    w.finish()
    fd = directio.open_fd(path, os.O_RDONLY)
    assert not directio.is_direct(fd)
    r = directio.Reader(fd)
    try:
        assert r.read(len(data) + 1) == data
    finally:
        r.close()


@pytest.mark.skipif(not HAS_O_DIRECT, reason="no O_DIRECT on this platform")
def test_filesystem_refusing_direct_reads_and_writes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, accepts: dict[str, bool]
) -> None:
    """A filesystem that accepts O_DIRECT at open but fails the I/O with EINVAL."""
    if not accepts["disk"]:
        pytest.skip("tmp dir refuses O_DIRECT")
    real_write, real_readv = os.write, os.readv
    refused: list[str] = []

    def write(fd, data):  # type: ignore[no-untyped-def]
        if directio.is_direct(fd):
            refused.append("write")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    def readv(fd, bufs):  # type: ignore[no-untyped-def]
        if directio.is_direct(fd):
            refused.append("read")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_readv(fd, bufs)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "readv", readv)
    data = data_of(2 * BLOCK + 5, seed=9)
    path = str(tmp_path / "f")
    fd = directio.open_fd(path, WFLAGS, 0o600)
    assert directio.is_direct(fd)
    w = directio.Writer(fd, hashed=True)
    w.write(data)
    assert w.digest() == blake3(data).digest()
    w.finish()
    assert "write" in refused
    assert Path(path).read_bytes() == data
    fd = directio.open_fd(path, os.O_RDONLY)
    assert directio.is_direct(fd)
    r = directio.Reader(fd)
    try:
        assert r.read(len(data) + 1) == data
    finally:
        r.close()
    assert "read" in refused


@pytest.fixture
def short_io(monkeypatch: pytest.MonkeyPatch) -> None:
    """read(2) and write(2) that move fewer bytes than asked (a network filesystem, a signal).

    A short read moves the offset back over what it read past its count, so it needs no
    particular alignment; a short write to a direct fd stays aligned.
    """
    real_write, real_readv, real_read = os.write, os.readv, os.read
    caps = itertools.cycle([1000, 3 * ALIGN, 5, BLOCK // 2 + 1])

    def write(fd, data):  # type: ignore[no-untyped-def]
        cap = 3 * ALIGN if directio.is_direct(fd) else 1001
        return real_write(fd, memoryview(data)[:cap])

    def readv(fd, bufs):  # type: ignore[no-untyped-def]
        n, cap = real_readv(fd, bufs), next(caps)
        if n > cap:
            os.lseek(fd, cap - n, os.SEEK_CUR)
            return cap
        return n

    def read(fd, n):  # type: ignore[no-untyped-def]
        return real_read(fd, min(n, next(caps)))

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "readv", readv)
    monkeypatch.setattr(os, "read", read)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "plain"])
@pytest.mark.parametrize("size", [ALIGN + 1, 300_000, BLOCK + 7])
def test_short_reads_and_writes(
    short_io: None, tmp_path: Path, accepts: dict[str, bool], size: int, direct: bool
) -> None:
    data = data_of(size, seed=13)
    path = str(tmp_path / "f")
    digest, still_direct = write_pieces(path, data, [size // 3], direct=direct)
    assert digest == blake3(data).digest()
    assert still_direct == (direct and accepts["disk"])
    assert Path(path).read_bytes() == data
    r = directio.Reader(open_read(path, direct))
    try:
        assert r.read(size + 1) == data
    finally:
        r.close()
    for limit in (10, 2000, ALIGN, size - 1, size, size + 10):
        assert read_small(path, limit)[0] == data[: limit + 1], limit


# --- Writer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "plain"])
@pytest.mark.parametrize("size", SIZES)
def test_writer_sizes(
    size: int, direct: bool, where: str, dirs: dict[str, Path], accepts: dict[str, bool]
) -> None:
    data = data_of(size, seed=size)
    path = new_path(dirs[where])
    stride = 65537 if size > BLOCK else 1021
    cuts = [*range(0, size, stride), size // 2, size // 2]  # with empty writes
    digest, still_direct = write_pieces(path, data, cuts, direct=direct)
    assert digest == blake3(data).digest()
    # full blocks went out direct: a Writer on a direct fd did not fall back to buffered writes
    assert still_direct == (direct and accepts[where])
    assert os.stat(path).st_size == size
    assert Path(path).read_bytes() == data
    os.unlink(path)


@st.composite
def sizes_and_cuts(draw: st.DrawFn) -> tuple[int, list[int]]:
    size = draw(st.sampled_from(SIZES) | st.integers(0, 2 * BLOCK + 5))
    cuts = draw(st.lists(st.integers(0, size), max_size=12))
    cuts += draw(st.lists(st.sampled_from([ALIGN, BLOCK - 1, BLOCK, BLOCK + 1]), max_size=2))
    return size, [min(c, size) for c in cuts]


@settings(max_examples=60, deadline=None)
@given(sc=sizes_and_cuts(), direct=st.booleans(), fs=st.sampled_from(["disk", "shm"]),
       seed=st.integers(0, 2**32))
def test_writer_random_splits(
    dirs: dict[str, Path], sc: tuple[int, list[int]], direct: bool, fs: str, seed: int
) -> None:
    size, cuts = sc
    d = dirs.get(fs, dirs["disk"])
    data = data_of(size, seed)
    path = new_path(d)
    try:
        assert write_pieces(path, data, cuts, direct=direct)[0] == blake3(data).digest()
        assert os.stat(path).st_size == size
        assert Path(path).read_bytes() == data
    finally:
        os.unlink(path)


def test_writer_digest_needs_hashed(tmp_path: Path) -> None:
    w = directio.Writer(open_write(str(tmp_path / "f"), True))
    w.write(b"x" * 10)
    with pytest.raises(ValueError):
        w.digest()
    w.finish()
    assert (tmp_path / "f").read_bytes() == b"x" * 10


@pytest.mark.parametrize("size", [0, ALIGN + 1, BLOCK, 2 * BLOCK + 5])
def test_writer_close_without_finish_abandons(tmp_path: Path, size: int) -> None:
    w = directio.Writer(open_write(str(tmp_path / "f"), True), hashed=True)
    w.write(data_of(size))  # the last full block may still be in flight
    fd = w.fd
    w.close()
    assert closed(fd)
    w.close()  # twice is harmless
    assert os.stat(tmp_path / "f").st_size <= size


# --- Reader ----------------------------------------------------------------------------------


def read_all(r: directio.Reader, rng: random.Random, *, use_read: bool) -> bytes:
    out = bytearray()
    while True:
        n = rng.choice([1, ALIGN - 1, ALIGN, 65536 + 3, BLOCK + 1, rng.randrange(1, 3 * BLOCK)])
        if use_read:
            b = r.read(n)
            assert len(b) <= n
        else:
            buf = bytearray(n)
            k = r.readinto(memoryview(buf))
            assert 0 <= k <= n
            b = bytes(buf[:k])
        if not b:
            return bytes(out)
        out += b


@pytest.mark.parametrize("use_read", [False, True], ids=["readinto", "read"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "plain"])
@pytest.mark.parametrize("size", SIZES)
def test_reader_sizes(
    size: int,
    direct: bool,
    use_read: bool,
    where: str,
    dirs: dict[str, Path],
    accepts: dict[str, bool],
) -> None:
    data = data_of(size, seed=size + 1)
    path = new_path(dirs[where])
    Path(path).write_bytes(data)
    r = directio.Reader(open_read(path, direct))
    fd = r.fd
    try:
        assert directio.is_direct(fd) == (direct and accepts[where])
        assert read_all(r, random.Random(size), use_read=use_read) == data
        assert r.readinto(bytearray(10)) == 0 and r.read(10) == b""  # stays at the end
        if size % ALIGN == 0:  # no unaligned tail: it never had reason to leave O_DIRECT
            assert directio.is_direct(fd) == (direct and accepts[where])
    finally:
        r.close()
    assert closed(fd)
    r.close()  # twice is harmless
    os.unlink(path)


@settings(max_examples=60, deadline=None)
@given(size=st.sampled_from(SIZES) | st.integers(0, 2 * BLOCK + 5), direct=st.booleans(),
       use_read=st.booleans(), seed=st.integers(0, 2**32))
def test_reader_random(
    dirs: dict[str, Path], size: int, direct: bool, use_read: bool, seed: int
) -> None:
    data = data_of(size, seed)
    path = new_path(dirs["disk"])
    Path(path).write_bytes(data)
    r = directio.Reader(open_read(path, direct))
    try:
        assert read_all(r, random.Random(seed), use_read=use_read) == data
    finally:
        r.close()
        os.unlink(path)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "plain"])
def test_reader_starts_at_the_beginning(tmp_path: Path, direct: bool) -> None:
    data = data_of(BLOCK + 10)
    (tmp_path / "f").write_bytes(data)
    fd = open_read(str(tmp_path / "f"), direct)
    os.lseek(fd, 3 * ALIGN, os.SEEK_SET)
    r = directio.Reader(fd)
    try:
        assert r.read(len(data) + 1) == data
    finally:
        r.close()


def test_reader_close_midway(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(data_of(5 * BLOCK + 1))
    r = directio.Reader(open_read(str(tmp_path / "f"), True))
    fd = r.fd
    assert r.read(ALIGN + 1) == data_of(5 * BLOCK + 1)[: ALIGN + 1]  # reads ahead are in flight
    r.close()
    assert closed(fd)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "plain"])
@pytest.mark.parametrize("initial", [0, 1, ALIGN, ALIGN + 3, BLOCK - 1, BLOCK, 2 * BLOCK])
def test_reader_on_a_growing_file(
    initial: int, direct: bool, where: str, dirs: dict[str, Path]
) -> None:
    rng = random.Random(initial)
    content = bytearray(data_of(initial, seed=3))
    path = new_path(dirs[where])
    Path(path).write_bytes(content)
    r = directio.Reader(open_read(path, direct))
    got = bytearray()
    try:
        with open(path, "ab", buffering=0) as app:
            for i in itertools.count():
                buf = bytearray(rng.choice([1, 777, ALIGN + 1, 100_003, BLOCK]))
                k = r.readinto(memoryview(buf))
                if k == 0:
                    break
                got += buf[:k]
                if i < 40:  # unaligned appends between reads
                    extra = rng.randbytes(rng.choice([1, 5, ALIGN - 1, ALIGN + 7, 50_001]))
                    app.write(extra)
                    content += extra
    finally:
        r.close()
    assert len(got) >= initial
    assert got == content[: len(got)]
    os.unlink(path)


def test_reader_raises_real_errors(tmp_path: Path) -> None:
    """A read that fails for another reason than a refused O_DIRECT is raised, not swallowed."""
    fd = directio.open_fd(str(tmp_path / "f"), os.O_WRONLY | os.O_CREAT, 0o600)
    r = directio.Reader(fd)  # write-only: read(2) fails with EBADF
    with pytest.raises(OSError) as e:
        r.read(10)
    assert e.value.errno == errno.EBADF
    r.close()
    assert closed(fd)


# --- read_small (dittohead.client.reader, buffered) ----------------------------------------


LIMITS = [0, 100, ALIGN - 1, ALIGN, 3 * ALIGN + 5, fmt.CHUNK_MIN, 300_000]


def small_sizes(limit: int) -> list[int]:
    return sorted({0, 1, ALIGN, limit, limit + 1, limit + 5000})


@pytest.mark.parametrize("limit", LIMITS)
def test_read_small(limit: int, where: str, dirs: dict[str, Path]) -> None:
    for size in small_sizes(limit):
        data = data_of(size, seed=size)
        path = new_path(dirs[where])
        Path(path).write_bytes(data)
        got, st1, st2 = read_small(path, limit)
        assert got == data[: limit + 1], (size, limit)
        assert st1.st_size == st2.st_size == size
        assert st1.st_ino == st2.st_ino == os.stat(path).st_ino
        assert st1.st_mtime_ns == st2.st_mtime_ns
        os.unlink(path)


def test_read_small_stats_before_and_after_the_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A file that grows while it is read shows it: one stat is taken before the read, one after."""
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    real_read = os.read

    def read(fd, n):  # type: ignore[no-untyped-def]
        data = real_read(fd, n)
        with open(path, "ab") as f:
            f.write(b"more")
        return data

    monkeypatch.setattr(os, "read", read)
    got, st1, st2 = read_small(str(path), 100)
    assert (got, st1.st_size, st2.st_size) == (b"abc", 3, 7)


def test_read_small_does_not_follow_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    (tmp_path / "link").symlink_to("f")
    assert read_small(str(tmp_path / "f"), 10)[0] == b"abc"
    if hasattr(os, "O_NOFOLLOW"):
        with pytest.raises(OSError) as e:
            read_small(str(tmp_path / "link"), 10)
        assert e.value.errno == errno.ELOOP
    with pytest.raises(FileNotFoundError):
        read_small(str(tmp_path / "missing"), 10)


# --- pyfastcdc ------------------------------------------------------------------------------


def chunks(it: Iterator) -> list[tuple[bytes, bytes]]:
    return [(c.id, bytes(c.data)) for c in it]  # a streamed chunk's data lives until the next


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "plain"])
@pytest.mark.parametrize(
    "size", [0, fmt.CHUNK_MIN, fmt.CHUNK_MIN + 1, 2 * BLOCK + 12345, 3 * BLOCK]
)
def test_cut_stream_over_reader_equals_cut_bytes(tmp_path: Path, size: int, direct: bool) -> None:
    data = data_of(size, seed=42)
    (tmp_path / "f").write_bytes(data)
    want = chunks(Chunker().cut_bytes(data))
    assert b"".join(c for _, c in want) == data
    for hint in {size, 10}:  # 10: the file grew after its stat
        r = directio.Reader(open_read(str(tmp_path / "f"), direct))
        try:
            assert chunks(Chunker().cut_stream(r, hint)) == want, hint
        finally:
            r.close()


def _read_all_in_child(path: str) -> bytes:
    r = directio.Reader(directio.open_fd(path, os.O_RDONLY))
    try:
        return r.read(1 << 30)
    finally:
        r.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork (POSIX)")
def test_a_forked_child_reads_with_its_own_threads(tmp_path: Path) -> None:
    """fsck's workers are forked from a process whose I/O threads are running: a child must
    not inherit the parent's thread pool (its work would never run) or a lock held at the fork."""
    import multiprocessing

    data = data_of(3 * BLOCK + 5, seed=11)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert _read_all_in_child(str(path)) == data  # the parent's pool now exists, with threads
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_read_all_in_child, (str(path),))
        assert got.get(timeout=60) == data


def test_a_buffer_still_viewed_is_dropped_not_closed() -> None:
    """An error raised on an I/O thread keeps a slice of a buffer alive in its traceback while
    the Reader or Writer closes: giving the buffer back must not raise (BufferError)."""
    extra = [directio.aligned_buffer(directio.BLOCK) for _ in range(directio._SPARE_MAX + 1)]
    held = memoryview(extra[-1])[10:20]
    for b in extra:
        directio._give_back(b)  # the last one finds the spare list full and is closed, or dropped
    assert bytes(held) == bytes(10)


def test_io_after_close_is_a_clear_error(tmp_path: Path) -> None:
    """As with Python's own files: a ValueError naming the closed object, whether or not its
    buffers were drained, and a second close is harmless."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * directio.BLOCK + 5))
    for drained in (False, True):
        r = directio.Reader(directio.open_fd(str(src), os.O_RDONLY), hashed=True)
        if drained:
            while r.next_block():
                pass
        else:
            r.read(10)  # part of the first block is still unread
        r.close()
        for method, args in (("readinto", (bytearray(10),)), ("next_block", ()), ("read", (1,)), ("digest", ())):
            with pytest.raises(ValueError, match="closed Reader"):
                getattr(r, method)(*args)
        r.close()
    w = directio.Writer(directio.open_fd(str(tmp_path / "out"), os.O_WRONLY | os.O_CREAT), hashed=True)
    w.write(b"x" * 100)
    w.finish()
    for method, args in (("write", (b"y",)), ("finish", ()), ("digest", ())):
        with pytest.raises(ValueError, match="closed Writer"):
            getattr(w, method)(*args)
    w.close()
    assert (tmp_path / "out").read_bytes() == b"x" * 100


def test_direct_io_only_on_a_local_disks_filesystem(tmp_path: Path) -> None:
    """O_DIRECT on ext4/XFS/Btrfs...; never on a FUSE filesystem (a process serves every
    request) or a network share, nor tmpfs: there a file is opened buffered (statfs decides)."""
    import refusing_fs

    local = tmp_path / "local.bin"
    local.write_bytes(b"x" * 8192)
    if not directio._O_DIRECT or not directio.local_disk(str(local)):
        pytest.skip("no O_DIRECT here, or the tmp folder is not on a local disk's filesystem")
    fd = directio.open_fd(str(local), os.O_RDONLY)
    try:
        assert directio.is_direct(fd)
    finally:
        os.close(fd)
    why = refusing_fs.unavailable()
    if why:
        pytest.skip(why)
    with refusing_fs.mounted(tmp_path / "backing", tmp_path / "fuse") as mnt:
        on_fuse = Path(mnt) / "file.bin"
        on_fuse.write_bytes(b"y" * 8192)
        assert not directio.local_disk(str(on_fuse))
        fd = directio.open_fd(str(on_fuse), os.O_RDONLY)
        try:
            assert not directio.is_direct(fd)
            assert os.read(fd, 10) == b"y" * 10
        finally:
            os.close(fd)
