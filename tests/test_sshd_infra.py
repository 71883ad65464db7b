"""The real-sshd infrastructure (tests/sshd.py) does what the SFTP transport's tests rely on,
shown with paramiko alone (no dittohead): real accounts sign in by password, by key and through
an ssh-agent; the host key is the one a client sees; a chrooted uploader sees only the server
root and writes only where its modes allow; kill_connection cuts a live SFTP session; a
connection through a jump gateway reaches the target and shows in the gateway's log.

The client runs as the account itself (Accounts.python_as) where that matters: its key file
and its agent are its own, unreadable by anyone else."""

# ruff: noqa: F811 (pytest fixtures imported from tests/sshd.py, named again by arguments)

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import paramiko
import pytest
import sshd as sshd_module
from accounts import Account, Accounts, make_dir
from sshd import (  # noqa: F401 (the fixtures, which the tests' arguments name)
    ClientKey,
    DropboxSshd,
    Jump,
    Sshd,
    chroot_match,
    chroot_problems,
    dropbox_sshd,
    jump,
    make_client_key,
    make_sshd,
    prepare_chroot_root,
    remove_root_owned,
    root_owned_tempdir,
    ssh_accounts,
    ssh_agent,
    sshd_server,
)

# A client run as an account: argv = port, user, then a JSON object of options (key_filename,
# passphrase, password, allow_agent, known_hosts). Prints where SFTP starts and the host key.
CLIENT = """
import json, sys, paramiko
port, user, opts = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
c = paramiko.SSHClient()
c.load_host_keys(opts.pop("known_hosts"))
c.set_missing_host_key_policy(paramiko.RejectPolicy())
try:
    c.connect("127.0.0.1", port, username=user, look_for_keys=False, timeout=10, **opts)
except Exception as e:
    print(json.dumps({"error": type(e).__name__ + ": " + str(e)}))
    raise SystemExit(0)
print(json.dumps({"cwd": c.open_sftp().normalize("."),
                  "user": c.get_transport().get_username()}))
c.close()
"""


def paramiko_fingerprint(key: paramiko.PKey) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def connect(server: Sshd, user: Account, password: str | None = None,
            **kw: Any) -> paramiko.SSHClient:
    """An in-process client (as root, which the server side cannot tell), trusting only
    ``server``'s host key."""
    c = paramiko.SSHClient()
    c.get_host_keys().add(f"[{server.host}]:{server.port}", "ssh-ed25519",
                          paramiko.Ed25519Key(data=base64.b64decode(
                              server.host_keys["ed25519"].public_line.split()[1])))
    c.set_missing_host_key_policy(paramiko.RejectPolicy())
    c.connect(server.host, server.port, username=user.name, password=password,
              look_for_keys=False, allow_agent=False, timeout=10, **kw)
    return c


def accepted(user: Account, key: ClientKey) -> str:
    """sshd's log line (VERBOSE) for a sign-in with ``key``."""
    return rf"Accepted publickey for {user.name} from .* ED25519 {re.escape(key.fingerprint)}"


def known_hosts_for(server: Sshd, account: Account) -> Path:
    return server.write_known_hosts(account.home / f"known_hosts-{server.port}", owner=account)


def client_as(accounts: Accounts, account: Account, server: Sshd, env: dict | None = None,
              **opts: Any) -> dict:
    """Run CLIENT as ``account`` against ``server``; its JSON answer."""
    opts["known_hosts"] = str(known_hosts_for(server, account))
    cp = accounts.python_as(account, CLIENT, server.port, account.name, json.dumps(opts),
                            env=env, timeout=30)
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


# -- signing in ------------------------------------------------------------------------------


def test_password_sign_in(sshd_server: Sshd, ssh_accounts: Accounts) -> None:
    a = ssh_accounts
    since = sshd_server.log_size()
    got = client_as(a, a.up_a, sshd_server, password=a.passwords[a.up_a.name], allow_agent=False)
    assert got == {"cwd": str(a.up_a.home), "user": a.up_a.name}
    sshd_server.wait_for_log(rf"Accepted password for {a.up_a.name} from 127\.0\.0\.1", since)

    with pytest.raises(paramiko.AuthenticationException):
        connect(sshd_server, a.up_a, password="not the password")
    with pytest.raises(paramiko.AuthenticationException):  # root is not among AllowUsers
        c = paramiko.SSHClient()
        c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        c.connect(sshd_server.host, sshd_server.port, username="root", password="x",
                  look_for_keys=False, allow_agent=False, timeout=10)
    sshd_server.wait_for_log(r"User root from 127\.0\.0\.1 not allowed", since)


def test_host_key_fingerprint_and_known_hosts(make_sshd: Any, ssh_accounts: Accounts) -> None:
    a = ssh_accounts
    server: Sshd = make_sshd(rsa=True)
    for kind, algorithm in (("ed25519", "ssh-ed25519"), ("rsa", "rsa-sha2-512")):
        out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f",
                              f"{server.host_keys[kind].private}.pub"],
                             capture_output=True, text=True, check=True).stdout
        assert out.split()[1] == server.fingerprint(kind)
        # What a client sees, offering only this host key algorithm.
        t = paramiko.Transport((server.host, server.port))
        t.get_security_options().key_types = [algorithm]
        t.start_client(timeout=10)
        try:
            assert paramiko_fingerprint(t.get_remote_server_key()) == server.fingerprint(kind)
        finally:
            t.close()
    key_type, blob = server.host_keys["ed25519"].public_line.split()[:2]
    assert server.known_hosts_line() == f"[127.0.0.1]:{server.port} {key_type} {blob}"

    # The known_hosts file is what a strict client needs; another server's is refused.
    pw = a.passwords[a.up_a.name]
    assert "cwd" in client_as(a, a.up_a, server, password=pw, allow_agent=False)
    other: Sshd = make_sshd()
    opts = {"password": pw, "allow_agent": False,
            "known_hosts": str(known_hosts_for(other, a.up_a))}
    cp = a.python_as(a.up_a, CLIENT, server.port, a.up_a.name, json.dumps(opts))
    assert "not found in known_hosts" in json.loads(cp.stdout)["error"]


def test_key_sign_in_as_the_account(sshd_server: Sshd, ssh_accounts: Accounts) -> None:
    a = ssh_accounts
    plain = make_client_key(a.up_b)
    locked = make_client_key(a.up_b, passphrase="correct horse")
    stranger = make_client_key(a.up_b)
    for key in (plain, locked):
        sshd_server.authorize(a.up_b, key)
    assert stat.S_IMODE(os.stat(plain.private).st_mode) == 0o600
    assert os.stat(plain.private).st_uid == a.up_b.uid

    since = sshd_server.log_size()
    got = client_as(a, a.up_b, sshd_server, key_filename=str(plain.private), allow_agent=False)
    assert got["user"] == a.up_b.name
    sshd_server.wait_for_log(accepted(a.up_b, plain), since)
    got = client_as(a, a.up_b, sshd_server, key_filename=str(locked.private),
                    passphrase="correct horse", allow_agent=False)
    assert got["user"] == a.up_b.name
    sshd_server.wait_for_log(accepted(a.up_b, locked), since)

    got = client_as(a, a.up_b, sshd_server, key_filename=str(stranger.private), allow_agent=False)
    assert "Authentication failed" in got["error"]
    # Another account cannot read up_b's key file at all.
    got = client_as(a, a.reader, sshd_server, key_filename=str(plain.private), allow_agent=False)
    assert "Permission denied" in got["error"]


def test_unlock_lets_a_key_in_but_no_password(make_sshd: Any, ssh_accounts: Accounts) -> None:
    a = ssh_accounts
    server: Sshd = make_sshd()
    key = make_client_key(a.reader)
    server.authorize(a.reader, key)
    password = a.passwords[a.reader.name]
    a.unlock(a.reader)
    try:
        got = client_as(a, a.reader, server, key_filename=str(key.private), allow_agent=False)
        assert got["user"] == a.reader.name
        with pytest.raises(paramiko.AuthenticationException):
            connect(server, a.reader, password=password)
    finally:
        a.set_password(a.reader, password)


def test_agent(sshd_server: Sshd, ssh_accounts: Accounts, ssh_agent: Any) -> None:
    a = ssh_accounts
    key = make_client_key(a.up_a, passphrase="agent pass")
    sshd_server.authorize(a.up_a, key)
    agent = ssh_agent(a.up_a)
    assert agent.list() == []
    agent.add(key)
    assert [line.split()[1] for line in agent.list()] == [key.fingerprint]
    assert os.stat(agent.socket).st_uid == a.up_a.uid
    assert stat.S_IMODE(os.stat(agent.socket.parent).st_mode) == 0o700

    since = sshd_server.log_size()
    got = client_as(a, a.up_a, sshd_server, env=agent.env, allow_agent=True)
    assert got["user"] == a.up_a.name
    sshd_server.wait_for_log(accepted(a.up_a, key), since)
    # The agent is the account's alone: another account cannot reach its socket.
    got = client_as(a, a.up_b, sshd_server, env=agent.env, allow_agent=True)
    assert "error" in got


# -- a chroot for the drop box -----------------------------------------------------------------

CHROOTED = """
import json, sys, paramiko
port, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
c = paramiko.SSHClient()
c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
c.connect("127.0.0.1", port, username=user, password=password, look_for_keys=False,
          allow_agent=False, timeout=10)
s = c.open_sftp()
out = {"cwd": s.normalize("."), "root": sorted(s.listdir("/"))}
def attempt(name, f, *args):
    try:
        f(*args)
        out[name] = "ok"
    except OSError as e:
        out[name] = type(e).__name__
def put(path):
    with s.open(path, "w") as f:
        f.write(b"data")
attempt("ls /store", s.listdir, "/store")
attempt("put /x", put, "/x")
attempt("put /dropbox/x", put, "/dropbox/x")
attempt("ls inbox", s.listdir, "/dropbox/s/inbox")
attempt("mkdir", s.mkdir, "/dropbox/s/inbox/.sub1", 0o750)
attempt("put sub", put, "/dropbox/s/inbox/.sub1/manifest")
attempt("rename", s.rename, "/dropbox/s/inbox/.sub1", "/dropbox/s/inbox/sub1")
attempt("ls /etc", s.listdir, "/etc")
print(json.dumps(out))
"""


def test_chroot_for_the_dropbox(dropbox_sshd: DropboxSshd, ssh_accounts: Accounts) -> None:
    a, root, server = ssh_accounts, dropbox_sshd.root, dropbox_sshd.sshd
    assert chroot_problems(root) == []
    assert (os.stat(root).st_uid, stat.S_IMODE(os.stat(root).st_mode)) == (0, 0o755)
    # A study's folders as `study add` makes them (docs/server-root.md).
    box = make_dir(root / "dropbox" / "s", a.daemon, 0o711)
    inbox = make_dir(box / "inbox", a.daemon, 0o3733)

    since = server.log_size()
    cp = a.python_as(a.up_a, CHROOTED, server.port, a.up_a.name, a.passwords[a.up_a.name])
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout) == {
        "cwd": "/dropbox", "root": ["dropbox", "store"],
        "ls /store": "PermissionError", "put /x": "PermissionError",
        "put /dropbox/x": "PermissionError", "ls inbox": "PermissionError",
        "mkdir": "ok", "put sub": "ok", "rename": "ok", "ls /etc": "FileNotFoundError",
    }
    sub = inbox / "sub1"
    st = os.stat(sub / "manifest")
    assert (st.st_uid, st.st_gid) == (a.up_a.uid, a.gd.gid)  # the inbox's setgid bit
    assert (sub / "manifest").read_bytes() == b"data"
    server.wait_for_log(rf'Changed root directory to "{root}"', since)
    server.wait_for_log(r"forced-command \(config\) 'internal-sftp -d /dropbox", since)

    # The daemon is not in the uploaders' groups: it signs in unchrooted.
    c = connect(server, a.daemon, password=a.passwords[a.daemon.name])
    try:
        assert c.open_sftp().normalize(".") == str(a.daemon.home)
    finally:
        c.close()


def test_chroot_refused_unless_root_owns_every_component(make_sshd: Any,
                                                         ssh_accounts: Accounts) -> None:
    a = ssh_accounts
    base = root_owned_tempdir("dittohead-chroot-")
    try:
        root = prepare_chroot_root(base / "root", a.daemon)
        os.chown(root, a.daemon.uid, a.daemon.gid)  # the daemon's own ROOT, as `init` makes it
        assert chroot_problems(root) == [f"{root}: owned by uid {a.daemon.uid}, not root"]
        server: Sshd = make_sshd(matches=[chroot_match(f"User {a.up_b.name}", root)])
        since = server.log_size()
        with pytest.raises((paramiko.SSHException, OSError, EOFError)):
            c = connect(server, a.up_b, password=a.passwords[a.up_b.name])
            try:
                c.open_sftp()
            finally:
                c.close()
        server.wait_for_log(rf'bad ownership or modes for chroot directory "{root}"', since)
    finally:
        remove_root_owned(base)
    assert chroot_problems("/tmp") == ["/tmp: mode 1777 is group/other-writable"]


# -- cutting a connection ----------------------------------------------------------------------


def test_kill_connection_cuts_a_live_upload(sshd_server: Sshd, ssh_accounts: Accounts) -> None:
    a = ssh_accounts
    bystander = connect(sshd_server, a.up_b, password=a.passwords[a.up_b.name])
    victim = connect(sshd_server, a.up_a, password=a.passwords[a.up_a.name])
    try:
        sftp = victim.open_sftp()
        f = sftp.open("upload.part", "w")
        f.write(b"x" * (1 << 20))
        f.flush()
        [conn] = sshd_server.connections(a.up_a)
        assert a.up_a.uid in conn.uids
        assert any(t.startswith(f"sshd: {a.up_a.name}@") for t in conn.titles), conn.describe()

        assert sshd_server.kill_connection(a.up_a)
        with pytest.raises((OSError, EOFError, paramiko.SSHException)):
            for _ in range(10):
                f.write(b"y" * (1 << 16))
                f.flush()
        assert sshd_server.connections(a.up_a) == []
        assert not any(os.path.exists(f"/proc/{p}") for p in conn.pids)  # reaped, not zombies
        assert not sshd_server.kill_connection(a.up_a)
        assert (a.up_a.home / "upload.part").stat().st_size >= 1 << 20

        assert bystander.open_sftp().normalize(".") == str(a.up_b.home)  # untouched
    finally:
        victim.close()
        bystander.close()


def test_stop_leaves_nothing(make_sshd: Any, ssh_accounts: Accounts) -> None:
    a = ssh_accounts
    server: Sshd = make_sshd()
    c = connect(server, a.up_a, password=a.passwords[a.up_a.name])
    c.open_sftp()
    assert server.proc is not None
    pids = [server.proc.pid, *(p for conn in server.connections() for p in conn.pids)]
    assert len(pids) >= 3
    folder = server.dir
    server.stop()
    server.stop()
    c.close()
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)
    assert not folder.exists()
    with pytest.raises(OSError):
        socket.create_connection((server.host, server.port), timeout=2).close()


def test_a_taken_port_is_retried(ssh_accounts: Accounts, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1]]
        real = sshd_module._free_port
        monkeypatch.setattr(sshd_module, "_free_port", lambda: ports.pop() if ports else real())
        with Sshd(ssh_accounts.all) as server:
            assert server.port != taken.getsockname()[1]
            assert "Address already in use" in server.log()
            assert server.running


def test_a_rejected_config_says_why(ssh_accounts: Accounts) -> None:
    server = Sshd(ssh_accounts.all, matches=["Match Nonsense x"])
    with pytest.raises(RuntimeError, match=r"(?s)sshd -t rejects .*Match attribute Nonsense"):
        server.start()
    assert not server.running and not server.dir.exists()


# -- a jump gateway ----------------------------------------------------------------------------


def test_jump_through_the_gateway(jump: Jump, sshd_server: Sshd, ssh_accounts: Accounts) -> None:
    a = ssh_accounts
    since = jump.gateway.log_size()
    gw = connect(jump.gateway, a.up_a, password=a.passwords[a.up_a.name])
    try:
        transport = gw.get_transport()
        assert transport is not None
        channel = transport.open_channel("direct-tcpip", (jump.target.host, jump.target.port),
                                         ("127.0.0.1", 0))
        target = connect(jump.target, a.up_b, password=a.passwords[a.up_b.name], sock=channel)
        try:
            assert target.open_sftp().normalize(".") == str(a.up_b.home)
            target_key = target.get_transport().get_remote_server_key()  # type: ignore[union-attr]
            assert paramiko_fingerprint(target_key) == jump.target.fingerprint()
        finally:
            target.close()
        m = jump.wait_for_forward(since)
        assert m.group(0) == ("server_request_direct_tcpip: originator 127.0.0.1 port 0, "
                              f"target 127.0.0.1 port {jump.target.port}")
        assert jump.forwards(since) == [(0, "127.0.0.1", jump.target.port)]
    finally:
        gw.close()

    # An sshd without AllowTcpForwarding refuses the same channel.
    c = connect(sshd_server, a.up_a, password=a.passwords[a.up_a.name])
    try:
        with pytest.raises(paramiko.ChannelException):
            c.get_transport().open_channel(  # type: ignore[union-attr]
                "direct-tcpip", (jump.target.host, jump.target.port), ("127.0.0.1", 0))
    finally:
        c.close()

