"""The transport contract (dittohead/client/transport.py's docstring), one suite for every
transport: the local path and SFTP to a real sshd, signed in as a real uploader account.

Each test gets a ``World``: a server root made by the daemon's account with study ``foo``, and a
transport to it. What the transport left on the server is looked at as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from accounts import Accounts, make_dir
from sshd import ssh_accounts, sshd_server  # noqa: F401  (fixtures)

from dittohead import format as fmt
from dittohead.client import ssh
from dittohead.client.transport import GONE, IN_INBOX, IN_STAGING, LocalTransport, Transport
from dittohead.errors import FormatError, NoSuchStudy, TransportError
from dittohead.hashing import blake3

STUDY = "foo"
NAME = "20261129T000000Z-0123456789ab"


@dataclass
class World:
    kind: str
    root: Path
    t: Transport

    def box(self, *parts: str) -> Path:
        return self.root.joinpath("dropbox", STUDY, *parts)

    def staging(self) -> Path:
        return self.box("inbox", fmt.STAGING_PREFIX + NAME)


def _make_root(accounts: Accounts, base: Path) -> Path:
    root = make_dir(base / "root", accounts.daemon, 0o755)
    for args in (("init", "--store", root), ("study", "add", STUDY, "--store", root)):
        cp = accounts.run_as(accounts.daemon, *args)
        assert cp.returncode == 0, cp.stderr
    return root


def _sftp(sshd, accounts: Accounts, root: Path, timeout: float = 10.0):
    from sshd import make_client_key

    from dittohead.client.sftp import open_sftp

    key = make_client_key(accounts.up_a)
    sshd.authorize(accounts.up_a, key)
    sshd.write_known_hosts(Path(os.environ["DITTOHEAD_STATE_DIR"]) / "known_hosts")
    return open_sftp(sshd.url(accounts.up_a, str(root)), ssh.NoPrompts(), identity=str(key.private), timeout=timeout)


@pytest.fixture(params=["local", "sftp"])
def world(request: pytest.FixtureRequest, acct_dir: Path, accounts: Accounts) -> Iterator[World]:
    root = _make_root(accounts, acct_dir)
    if request.param == "local":
        t: Transport = LocalTransport(str(root))
    else:
        request.getfixturevalue("ssh_accounts")
        t = _sftp(request.getfixturevalue("sshd_server"), accounts, root)
    try:
        t.check_study(STUDY)
        yield World(request.param, root, t)
    finally:
        t.close()


def _as_daemon(accounts: Accounts, path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chown(path, accounts.daemon.uid, accounts.daemon.gid)


def test_key_names_the_destination(world: World) -> None:
    key = world.t.key()
    assert key.startswith("file://" if world.kind == "local" else "sftp://")
    assert key.endswith(str(world.root))


def test_no_such_study(world: World) -> None:
    with pytest.raises(NoSuchStudy, match="no study 'bar'"):
        world.t.check_study("bar")


def test_have_segments(world: World, accounts: Accounts) -> None:
    assert world.t.list_have(STUDY) == []
    _as_daemon(accounts, world.box("have", "0002" + fmt.HAVE_SUFFIX), b"two")
    _as_daemon(accounts, world.box("have", "0001" + fmt.HAVE_SUFFIX), b"one")
    _as_daemon(accounts, world.box("have", ".0003" + fmt.HAVE_SUFFIX + ".tmp"), b"being written")
    _as_daemon(accounts, world.box("have", "other"), b"not a segment")
    assert world.t.list_have(STUDY) == ["0001" + fmt.HAVE_SUFFIX, "0002" + fmt.HAVE_SUFFIX]
    assert world.t.read_have(STUDY, "0002" + fmt.HAVE_SUFFIX) == b"two"
    with pytest.raises(FileNotFoundError):
        world.t.read_have(STUDY, "0009" + fmt.HAVE_SUFFIX)
    big = world.box("have", "0004" + fmt.HAVE_SUFFIX)
    with open(big, "wb") as f:
        f.truncate(fmt.HAVE_MAX_SIZE + 1)
    with pytest.raises(FormatError, match="larger than"):
        world.t.read_have(STUDY, big.name)


def test_have_folder_missing_is_no_segments(world: World) -> None:
    shutil.rmtree(world.box("have"))
    assert world.t.list_have(STUDY) == []


def test_receipts(world: World, accounts: Accounts) -> None:
    assert world.t.read_receipt(STUDY, NAME) is None
    _as_daemon(accounts, world.box("receipts", NAME), b"receipt bytes")
    assert world.t.read_receipt(STUDY, NAME) == b"receipt bytes"


def test_a_submission_from_staging_to_inbox(world: World) -> None:
    t = world.t
    assert t.submission_state(STUDY, NAME) == GONE
    t.make_staging(STUDY, NAME)
    t.make_staging(STUDY, NAME)  # again: nothing happens
    assert t.submission_state(STUDY, NAME) == IN_STAGING
    assert t.list_staging(STUDY, NAME) == {}
    t.put(STUDY, NAME, fmt.MANIFEST_NAME, b"first")
    t.put(STUDY, NAME, fmt.MANIFEST_NAME, memoryview(b"second manifest"))  # a resumed run writes it again
    assert t.list_staging(STUDY, NAME) == {fmt.MANIFEST_NAME: len(b"second manifest")}
    st = world.staging().stat()
    assert stat.S_IMODE(st.st_mode) & 0o777 == 0o750
    assert st.st_gid == world.box("inbox").stat().st_gid  # the inbox's group (setgid)
    f = world.staging() / fmt.MANIFEST_NAME
    assert f.read_bytes() == b"second manifest"
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    t.commit(STUDY, NAME)
    assert t.submission_state(STUDY, NAME) == IN_INBOX
    done = world.box("inbox", NAME)
    assert stat.S_IMODE(done.stat().st_mode) & 0o777 == 0o770
    assert (done / fmt.MANIFEST_NAME).read_bytes() == b"second manifest"
    assert not world.staging().exists()


def test_staging_in_the_way(world: World) -> None:
    world.staging().write_bytes(b"a file, not a folder")
    with pytest.raises(TransportError, match="not a folder"):
        world.t.make_staging(STUDY, NAME)


@pytest.mark.parametrize("pieces", [[], [b"x"], [b"a" * 100, b"b" * (3 << 20), b"c" * 7], [os.urandom(1 << 20)] * 3])
def test_upload(world: World, pieces: list[bytes]) -> None:
    t = world.t
    t.make_staging(STUDY, NAME)
    up = t.open_upload(STUDY, NAME)
    for p in pieces:
        assert up.write(memoryview(p)) == len(p)
    data = b"".join(pieces)
    digest = getattr(up, "digest", None)
    if digest is not None:
        assert digest() == blake3(data).digest()
    assert [p.name for p in world.staging().iterdir() if p.name.endswith(".pack")] == []
    up.finish("x.pack")
    assert [p.name for p in world.staging().iterdir()] == ["x.pack"]  # no temporary left
    f = world.staging() / "x.pack"
    assert f.read_bytes() == data
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    assert t.list_staging(STUDY, NAME) == {"x.pack": len(data)}


def test_upload_aborted_leaves_nothing(world: World) -> None:
    t = world.t
    t.make_staging(STUDY, NAME)
    up = t.open_upload(STUDY, NAME)
    up.write(b"y" * (2 << 20))
    up.abort()
    assert list(world.staging().iterdir()) == []


def test_finish_on_another_thread_while_the_next_is_written(world: World) -> None:
    """The Packer's pattern: one upload finishes on its thread while the next is written."""
    t = world.t
    t.make_staging(STUDY, NAME)
    datas = [os.urandom((1 << 20) + i * 4097) for i in range(6)]
    errors: list[BaseException] = []
    finishing: threading.Thread | None = None
    for i, data in enumerate(datas):
        up = t.open_upload(STUDY, NAME)
        for off in range(0, len(data), 65536):
            up.write(data[off : off + 65536])
        if finishing is not None:
            finishing.join()
        finishing = threading.Thread(target=lambda u=up, n=f"{i}.pack": _catch(errors, u.finish, n))
        finishing.start()
    assert finishing is not None
    finishing.join()
    assert errors == []
    for i, data in enumerate(datas):
        assert (world.staging() / f"{i}.pack").read_bytes() == data


def _catch(errors: list[BaseException], f, *args) -> None:
    try:
        f(*args)
    except BaseException as e:  # noqa: BLE001 - handed to the test's thread
        errors.append(e)


def test_remove_and_remove_staging(world: World) -> None:
    t = world.t
    t.remove_staging(STUDY, NAME)  # not there: nothing happens
    t.make_staging(STUDY, NAME)
    t.put(STUDY, NAME, "a", b"1")
    t.put(STUDY, NAME, "b", b"2")
    t.remove(STUDY, NAME, "a")
    t.remove(STUDY, NAME, "a")  # again: nothing happens
    assert t.list_staging(STUDY, NAME) == {"b": 1}
    t.remove_staging(STUDY, NAME)
    assert not world.staging().exists()
    assert t.submission_state(STUDY, NAME) == GONE
    with pytest.raises(FileNotFoundError):
        t.list_staging(STUDY, NAME)


def test_a_root_that_is_not_there(world: World, accounts: Accounts, request: pytest.FixtureRequest) -> None:
    if world.kind == "local":
        t: Transport = LocalTransport(str(world.root / "nope"))
    else:
        t = _sftp(request.getfixturevalue("sshd_server"), accounts, world.root / "nope")
    try:
        with pytest.raises(TransportError, match="no such folder"):
            t.check_study(STUDY)
    finally:
        t.close()


# -- the link failing (SFTP only: a local path has no link to lose)


def test_a_lost_connection_is_a_transport_error(acct_dir: Path, accounts: Accounts,
                                                 request: pytest.FixtureRequest) -> None:
    request.getfixturevalue("ssh_accounts")
    sshd = request.getfixturevalue("sshd_server")
    t = _sftp(sshd, accounts, _make_root(accounts, acct_dir))
    try:
        t.check_study(STUDY)
        t.make_staging(STUDY, NAME)
        up = t.open_upload(STUDY, NAME)
        up.write(b"z" * (1 << 20))
        assert sshd.kill_connection(accounts.up_a)
        with pytest.raises(TransportError, match="connection|answer"):
            up.write(b"z" * (2 << 20))
            up.finish("z.pack")
        with pytest.raises(TransportError):
            t.list_staging(STUDY, NAME)
    finally:
        t.close()


def test_a_server_that_stops_answering_is_a_transport_error_in_bounded_time(
        acct_dir: Path, accounts: Accounts, request: pytest.FixtureRequest) -> None:
    request.getfixturevalue("ssh_accounts")
    sshd = request.getfixturevalue("sshd_server")
    root = _make_root(accounts, acct_dir)
    t = _sftp(sshd, accounts, root, timeout=2.0)
    conns = sshd.connections(accounts.up_a)
    assert conns
    pids = [pid for c in conns for pid in c.pids]
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)  # the server is there, and says nothing
        start = time.monotonic()
        with pytest.raises(TransportError, match="no answer in time|connection"):
            t.check_study(STUDY)
        assert time.monotonic() - start < 8
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        t.close()
        sshd.kill_connection(accounts.up_a)


def test_a_full_disk_fails_the_upload(acct_dir: Path, accounts: Accounts, request: pytest.FixtureRequest) -> None:
    """A write the server refuses (no space left) fails the upload: its answer is not dropped."""
    request.getfixturevalue("ssh_accounts")
    sshd = request.getfixturevalue("sshd_server")
    small = acct_dir / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(small)],
                      check=False, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        os.chown(small, accounts.daemon.uid, accounts.daemon.gid)
        root = _make_root(accounts, small)
        t = _sftp(sshd, accounts, root)
        try:
            t.check_study(STUDY)
            t.make_staging(STUDY, NAME)
            up = t.open_upload(STUDY, NAME)
            with pytest.raises((OSError, TransportError)):
                for _ in range(4):
                    up.write(os.urandom(1 << 20))
                up.finish("big.pack")
            assert not (root / "dropbox" / STUDY / "inbox" / (fmt.STAGING_PREFIX + NAME) / "big.pack").exists()
        finally:
            t.close()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
