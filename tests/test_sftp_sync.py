"""`dittohead sync --to sftp://...` as a collector meets it: the host-key question, signing in, a
terminal or none, a gateway, a link that dies, a run cut short and resumed.

Each sync runs as the uploader account (tests/accounts.py) against a real sshd (tests/sshd.py),
with a state folder of its own per test; the daemon's account owns the server root and ingests.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from accounts import Account, Accounts, make_dir
from conftest import SUBMISSION_RE
from sshd import Sshd, jump, make_client_key, make_sshd, ssh_accounts, sshd_server  # noqa: F401  (fixtures)

from dittohead import format as fmt

STUDY = "s"


@dataclass
class Lab:
    accounts: Accounts
    base: Path
    root: Path
    sshd: Sshd
    src: Path
    state: Path

    @property
    def up(self) -> Account:
        return self.accounts.up_a

    @property
    def password(self) -> str:
        return self.accounts.passwords[self.up.name]

    def url(self, sshd: Sshd | None = None) -> str:
        return (sshd or self.sshd).url(self.up, str(self.root))

    def env(self, **extra: str) -> dict[str, str]:
        return {"DITTOHEAD_STATE_DIR": str(self.state), **extra}

    def sync(self, *args: object, input: str | None = None, env: dict[str, str] | None = None,
             timeout: float = 120, sshd: Sshd | None = None) -> subprocess.CompletedProcess:
        cp = self.accounts.run_as(self.up, "sync", self.src, "--study", STUDY, "--to", self.url(sshd),
                                  "--site", "lab", *args, input=input, env=env or self.env(), timeout=timeout)
        assert "Traceback" not in cp.stderr and "internal error" not in cp.stderr, cp.stderr
        return cp

    def trust(self, sshd: Sshd | None = None) -> None:
        (sshd or self.sshd).write_known_hosts(self.state / "known_hosts", owner=self.up)

    def write(self, rel: str, data: bytes) -> None:
        path = self.src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        for p in [path, *path.relative_to(self.src).parents]:
            os.chown(self.src / p, self.up.uid, self.up.gid)

    def inbox(self) -> list[str]:
        return sorted(os.listdir(self.root / "dropbox" / STUDY / "inbox"))

    def as_daemon(self, *args: object) -> subprocess.CompletedProcess:
        cp = self.accounts.run_as(self.accounts.daemon, *args, raw_stdout=args[0] == "cat")
        assert cp.returncode == 0, cp.stderr
        return cp


def _ssh_dir(lab: Lab) -> Path:
    d = lab.up.home / ".ssh"
    return d if d.is_dir() else make_dir(d, lab.up, 0o700)


@pytest.fixture
def lab(ssh_accounts: Accounts, sshd_server: Sshd, acct_dir: Path) -> Iterator[Lab]:  # noqa: F811
    a = ssh_accounts
    root = make_dir(acct_dir / "root", a.daemon, 0o755)
    for args in (("init", "--store", root), ("study", "add", STUDY, "--store", root)):
        cp = a.run_as(a.daemon, *args)
        assert cp.returncode == 0, cp.stderr
    src = make_dir(acct_dir / "src", a.up_a, 0o700)
    state = make_dir(acct_dir / "state", a.up_a, 0o700)
    lab = Lab(a, acct_dir, root, sshd_server, src, state)
    lab.write("a/one.txt", b"one\n")
    lab.write("b.bin", os.urandom(3 << 20))
    yield lab
    sshd_server.kill_connection(a.up_a)


# -- the server's key


def test_unknown_host_without_a_terminal_is_refused_then_trusted(lab: Lab) -> None:
    cp = lab.sync("--password-stdin", input=lab.password + "\n")
    assert cp.returncode == 1
    assert len(cp.stderr.strip().splitlines()) == 1, cp.stderr
    fp = lab.sshd.fingerprint()
    assert fp in cp.stderr and f"dittohead trust-host 127.0.0.1:{lab.sshd.port}" in cp.stderr
    assert lab.inbox() == []  # nothing was sent
    # trust-host prints the fingerprint it records, which is the server's.
    cp = lab.accounts.run_as(lab.up, "trust-host", f"127.0.0.1:{lab.sshd.port}", env=lab.env())
    assert cp.returncode == 0, cp.stderr
    assert fp in cp.stdout and "trusted" in cp.stdout
    assert f"[127.0.0.1]:{lab.sshd.port} ssh-ed25519 " in (lab.state / "known_hosts").read_text()
    cp = lab.accounts.run_as(lab.up, "trust-host", f"127.0.0.1:{lab.sshd.port}", env=lab.env())
    assert cp.returncode == 0 and "already trusted" in cp.stdout
    cp = lab.sync("--password-stdin", input=lab.password + "\n")
    assert cp.returncode == 0, cp.stderr
    assert SUBMISSION_RE.search(cp.stdout)


def test_trust_host_with_the_fingerprint_the_admin_gave(lab: Lab) -> None:
    where = f"127.0.0.1:{lab.sshd.port}"
    wrong = "SHA256:" + "A" * 43
    cp = lab.accounts.run_as(lab.up, "trust-host", where, "--fingerprint", wrong, env=lab.env())
    assert cp.returncode == 1 and wrong in cp.stderr and lab.sshd.fingerprint() in cp.stderr
    assert not (lab.state / "known_hosts").exists()
    cp = lab.accounts.run_as(lab.up, "trust-host", where, "--fingerprint", lab.sshd.fingerprint(), env=lab.env())
    assert cp.returncode == 0, cp.stderr
    assert lab.sync("--password-stdin", input=lab.password + "\n").returncode == 0


def test_a_changed_host_key_is_refused_loudly(lab: Lab) -> None:
    other = make_client_key(lab.up, name="not-the-host-key")  # any ed25519 key that is not the server's
    (lab.state / "known_hosts").write_text(f"[127.0.0.1]:{lab.sshd.port} {other.public_line.split()[0]} "
                                           f"{other.public_line.split()[1]}\n")
    os.chown(lab.state / "known_hosts", lab.up.uid, lab.up.gid)
    cp = lab.sync("--password-stdin", input=lab.password + "\n")
    assert cp.returncode == 1 and "CHANGED" in cp.stderr and lab.sshd.fingerprint() in cp.stderr
    assert lab.inbox() == []
    cp = lab.accounts.run_as(lab.up, "trust-host", f"127.0.0.1:{lab.sshd.port}", env=lab.env())
    assert cp.returncode == 1 and "CHANGED" in cp.stderr
    cp = lab.accounts.run_as(lab.up, "trust-host", "--replace", f"127.0.0.1:{lab.sshd.port}", env=lab.env())
    assert cp.returncode == 0, cp.stderr
    assert lab.sync("--password-stdin", input=lab.password + "\n").returncode == 0


def test_known_hosts_of_the_account_is_read(lab: Lab) -> None:
    ssh_dir = _ssh_dir(lab)
    lab.sshd.write_known_hosts(ssh_dir / "known_hosts", owner=lab.up)
    try:
        cp = lab.sync("--password-stdin", input=lab.password + "\n")
        assert cp.returncode == 0, cp.stderr
        assert not (lab.state / "known_hosts").exists()
    finally:
        (ssh_dir / "known_hosts").unlink()


# -- signing in


def test_password_on_a_terminal_and_the_host_key_question(lab: Lab) -> None:
    """On a terminal: the fingerprint and a question, then the password prompt (not echoed)."""
    a = lab.accounts
    argv = [*a._argv("-m", "dittohead"), "sync", str(lab.src), "--study", STUDY, "--to", lab.url(), "--site", "lab"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: become the uploader, on the terminal pty made
        try:
            os.setgroups(list(lab.up.groups))
            os.setgid(lab.up.gid)
            os.setuid(lab.up.uid)
            os.chdir(lab.up.home)
            os.execve(argv[0], argv, a.env_for(lab.up, lab.env()))
        finally:
            os._exit(127)
    out = b""
    try:
        out += _expect(fd, rb"\[y/N\]: ")
        assert lab.sshd.fingerprint().encode() in out
        os.write(fd, b"y\n")
        out += _expect(fd, rb"password: ")
        os.write(fd, lab.password.encode() + b"\n")
        out += _expect(fd, rb"submission \S+")
        out += _read_rest(fd)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert lab.password.encode() not in out  # not echoed
    assert f"[127.0.0.1]:{lab.sshd.port}" in (lab.state / "known_hosts").read_text()


def _expect(fd: int, pattern: bytes, timeout: float = 30) -> bytes:
    buf = b""
    end = time.monotonic() + timeout
    while not re.search(pattern, buf):
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no {pattern!r} in {buf!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            chunk = b""
        if not chunk:
            raise AssertionError(f"the terminal closed before {pattern!r}: {buf!r}")
        buf += chunk
    return buf


def _read_rest(fd: int) -> bytes:
    out = b""
    while select.select([fd], [], [], 10)[0]:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out


def test_a_wrong_password_is_one_line_and_never_shown(lab: Lab) -> None:
    lab.trust()
    secret = "Wr0ng-" + lab.password[::-1]
    cp = lab.accounts.run_as(lab.up, "-vv", "sync", lab.src, "--study", STUDY, "--to", lab.url(),
                             "--password-stdin", input=secret + "\n", env=lab.env())
    assert cp.returncode == 1
    assert secret not in cp.stdout + cp.stderr
    last = cp.stderr.strip().splitlines()[-1]
    assert "cannot sign in" in last and "a password" in last
    assert lab.inbox() == []
    # The right one, with debug logging on: not in any output either.
    cp = lab.accounts.run_as(lab.up, "-vv", "sync", lab.src, "--study", STUDY, "--to", lab.url(),
                             "--password-stdin", input=lab.password + "\n", env=lab.env())
    assert cp.returncode == 0, cp.stderr
    assert lab.password not in cp.stdout + cp.stderr


def test_no_terminal_and_no_way_to_sign_in_fails_at_once(lab: Lab) -> None:
    lab.trust()
    start = time.monotonic()
    cp = lab.sync()
    assert cp.returncode == 1 and time.monotonic() - start < 20
    assert "no terminal to ask for a password" in cp.stderr and "--password-stdin" in cp.stderr


def test_key_from_the_command_line_and_from_ssh_config(lab: Lab) -> None:
    lab.trust()
    key = make_client_key(lab.up)
    lab.sshd.authorize(lab.up, key)
    cp = lab.sync("--identity", key.private)
    assert cp.returncode == 0, cp.stderr
    lab.write("c.txt", b"more\n")
    ssh_dir = _ssh_dir(lab)
    config = ssh_dir / "config"
    config.write_text(f"Host 127.0.0.1\n  IdentityFile {key.private}\n")
    os.chown(config, lab.up.uid, lab.up.gid)
    try:
        cp = lab.sync()
        assert cp.returncode == 0, cp.stderr
        assert "1 new" in cp.stdout
    finally:
        config.unlink()


def test_encrypted_key_without_a_terminal_says_use_the_agent(lab: Lab) -> None:
    lab.trust()
    key = make_client_key(lab.up, passphrase="correct horse")
    lab.sshd.authorize(lab.up, key)
    cp = lab.sync("--identity", key.private)
    assert cp.returncode == 2 and "ssh-agent" in cp.stderr and "correct horse" not in cp.stderr


# -- the link


def test_through_a_gateway(ssh_accounts: Accounts, jump, acct_dir: Path) -> None:  # noqa: F811
    a = ssh_accounts
    root = make_dir(acct_dir / "root", a.daemon, 0o755)
    for args in (("init", "--store", root), ("study", "add", STUDY, "--store", root)):
        assert a.run_as(a.daemon, *args).returncode == 0
    src = make_dir(acct_dir / "src", a.up_a, 0o700)
    (src / "f.txt").write_bytes(b"through the gateway\n")
    os.chown(src / "f.txt", a.up_a.uid, a.up_a.gid)
    state = make_dir(acct_dir / "state", a.up_a, 0o700)
    jump.gateway.write_known_hosts(state / "known_hosts", owner=a.up_a)
    with open(state / "known_hosts", "a") as f:
        f.write(jump.target.known_hosts_line() + "\n")
    since = jump.gateway.log_size()
    cp = a.run_as(a.up_a, "sync", src, "--study", STUDY, "--to", jump.target.url(a.up_a, str(root)),
                  "--jump", f"{a.up_a.name}@127.0.0.1:{jump.gateway.port}", "--password-stdin",
                  input=a.passwords[a.up_a.name] + "\n", env={"DITTOHEAD_STATE_DIR": str(state)})
    assert cp.returncode == 0, cp.stderr
    assert any(port == jump.target.port for _, _, port in jump.forwards(since))
    # The gateway's password is asked once and used for both: here the same account's.
    cp = a.run_as(a.daemon, "watch", "--store", root, "--once")
    assert cp.returncode == 0, cp.stderr
    cp = a.run_as(a.daemon, "cat", "--store", root, "--study", STUDY, "f.txt", raw_stdout=True)
    assert cp.stdout == b"through the gateway\n"


def test_a_server_that_stops_answering_ends_the_run_in_bounded_time(lab: Lab) -> None:
    lab.trust()
    key = make_client_key(lab.up)
    lab.sshd.authorize(lab.up, key)
    lab.write("big.bin", os.urandom(60 << 20))
    p = lab.accounts.spawn_as(lab.up, "sync", lab.src, "--study", STUDY, "--to", lab.url(),
                              "--identity", key.private, "--timeout", "3", env=lab.env(),
                              stderr=subprocess.PIPE)
    _wait_for(lambda: _staged_packs(lab), what="a pack in the staging folder")
    pids = [pid for c in lab.sshd.connections(lab.up) for pid in c.pids]
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # the server is there, and says nothing
    start = time.monotonic()
    try:
        _, err = p.communicate(timeout=30)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert p.returncode == 1, err
    assert time.monotonic() - start < 3 + 10
    assert "no answer in time" in err.decode() and len(err.decode().strip().splitlines()) == 1, err


def _staging(lab: Lab) -> Path | None:
    inbox = lab.root / "dropbox" / STUDY / "inbox"
    names = [n for n in os.listdir(inbox) if n.startswith(fmt.STAGING_PREFIX)]
    return inbox / names[0] if names else None


def _staged_packs(lab: Lab) -> dict[str, int]:
    staging = _staging(lab)
    if staging is None:
        return {}
    try:
        return {n: os.stat(staging / n).st_ino for n in os.listdir(staging) if n.endswith(fmt.PACK_SUFFIX)}
    except FileNotFoundError:
        return {}


def _wait_for(cond, what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_a_cut_connection_is_resumed_without_resending_complete_packs(lab: Lab) -> None:
    lab.trust()
    key = make_client_key(lab.up)
    lab.sshd.authorize(lab.up, key)
    data = os.urandom(80 << 20)  # five packs or so
    lab.write("big.bin", data)
    p = lab.accounts.spawn_as(lab.up, "sync", lab.src, "--study", STUDY, "--to", lab.url(),
                              "--identity", key.private, env=lab.env(), stderr=subprocess.PIPE)
    _wait_for(lambda: len(_staged_packs(lab)) >= 2, what="two packs in the staging folder")
    assert lab.sshd.kill_connection(lab.up)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1, err
    assert len(err.decode().strip().splitlines()) == 1, err
    before = _staged_packs(lab)
    assert len(before) >= 2
    staging = _staging(lab)
    assert staging is not None
    cp = lab.sync("--identity", key.private)
    assert cp.returncode == 0, cp.stderr
    m = SUBMISSION_RE.search(cp.stdout)
    assert m
    done = lab.root / "dropbox" / STUDY / "inbox" / m.group(1)
    assert done.name == staging.name[len(fmt.STAGING_PREFIX):]  # the same staging folder, committed
    after = {n: os.stat(done / n).st_ino for n in os.listdir(done) if n.endswith(fmt.PACK_SUFFIX)}
    for name, ino in before.items():
        assert after.get(name) == ino, f"{name} was sent again"
    lab.as_daemon("watch", "--store", lab.root, "--once")
    got = lab.as_daemon("cat", "--store", lab.root, "--study", STUDY, "big.bin").stdout
    assert got == data


def test_have_segments_are_fetched_once_and_no_change_is_quick(lab: Lab) -> None:
    """A segment fetched once is never read again: each sync after the first finds the segments
    it already read made unreadable (as root), and still works."""
    lab.trust()
    key = make_client_key(lab.up)
    lab.sshd.authorize(lab.up, key)
    have = lab.root / "dropbox" / STUDY / "have"
    for i in range(3):
        lab.write(f"f{i}.bin", os.urandom(1 << 20))
        cp = lab.sync("--identity", key.private)
        assert cp.returncode == 0, cp.stderr
        for seg in have.iterdir():  # read by this sync: never again
            seg.chmod(0)
        lab.as_daemon("watch", "--store", lab.root, "--once")
    assert len(list(have.iterdir())) >= 3
    start = time.monotonic()
    cp = lab.sync("--identity", key.private)
    assert cp.returncode == 0 and "nothing to send" in cp.stdout
    assert time.monotonic() - start < 10
    # A new sync with something to send reads the one new segment, and no other.
    lab.write("g.bin", os.urandom(1 << 20))
    cp = lab.sync("--identity", key.private)
    assert cp.returncode == 0, cp.stderr


def test_a_gateway_that_does_not_forward(lab: Lab) -> None:
    lab.trust()
    cp = lab.sync("--jump", f"{lab.up.name}@127.0.0.1:{lab.sshd.port}", "--password-stdin",
                  input=lab.password + "\n")
    assert cp.returncode == 1
    line = cp.stderr.strip()
    assert "\n" not in line and "would not connect" in line and "AllowTcpForwarding" in line, line


def test_a_chroot_sshd_refuses_is_named(ssh_accounts: Accounts, make_sshd, acct_dir: Path) -> None:  # noqa: F811
    """A ChrootDirectory under /tmp (1777): sshd ends the session after the sign-in."""
    a = ssh_accounts
    bad = make_dir(acct_dir / "chroot", a.daemon, 0o755)
    sshd = make_sshd(matches=[f"Match User {a.up_a.name}\n    ChrootDirectory {bad}\n    ForceCommand internal-sftp"])
    state = make_dir(acct_dir / "state", a.up_a, 0o700)
    sshd.write_known_hosts(state / "known_hosts", owner=a.up_a)
    src = make_dir(acct_dir / "src", a.up_a, 0o700)
    cp = a.run_as(a.up_a, "sync", src, "--study", STUDY, "--to", sshd.url(a.up_a, "/"), "--password-stdin",
                  input=a.passwords[a.up_a.name] + "\n", env={"DITTOHEAD_STATE_DIR": str(state)})
    assert cp.returncode == 1
    assert "ended the SFTP session" in cp.stderr and "sshd's log" in cp.stderr, cp.stderr
