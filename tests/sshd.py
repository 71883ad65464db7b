"""A real OpenSSH sshd on loopback, for the tests of the SFTP transport (root only).

Each :class:`Sshd` is Debian's ``/usr/sbin/sshd -D -e -E LOG -f CONFIG``, run as root on a free
port of 127.0.0.1, with host keys of its own and all its files in a folder of its own
(``Sshd.dir``, under /srv: see "Where the files live"). Sign-in is as the session's real accounts
(tests/accounts.py): by password (``Accounts.set_password``), by key (``Sshd.authorize``) or
through an ssh-agent (:class:`SshAgent`); root cannot sign in. The config
(:meth:`Sshd.config_text`)::

    ListenAddress 127.0.0.1:PORT        HostKey DIR/hostkeys/ssh_host_ed25519_key (+ _rsa_key)
    PidFile DIR/sshd.pid                UsePAM no, PermitRootLogin no, StrictModes yes
    PasswordAuthentication yes          KbdInteractiveAuthentication no, PubkeyAuthentication yes
    AuthorizedKeysFile DIR/authorized_keys/%u   (root's files: see ``authorize``)
    AllowUsers NAME...                  only the accounts given
    AllowTcpForwarding no|yes           yes for a jump gateway; agent and X11 forwarding no
    LogLevel VERBOSE (or DEBUG1 ...)    into DIR/sshd.log (``log()``, ``wait_for_log()``)
    Subsystem sftp internal-sftp
    PerSourcePenalties no               only from OpenSSH 9.8 on, which has it
    Match ...                           blocks of the test's own (``matches=``), last

``sshd -t`` checks the config first (a rejected config raises RuntimeError with sshd's words and
the config); the start then waits until sshd listens on the port (seen in /proc/net/tcp and its
descriptors: no probe connection lands in the log), at most ``START_TIMEOUT`` s, else
RuntimeError with the log's tail; a port taken meanwhile by another process is retried.
/run/sshd (privilege separation) is made if missing. ``stop()`` SIGKILLs every process of every
connection and the listener, waits for them and removes the folder; whatever is still running
at exit is stopped (atexit), a listener whose starting thread dies gets SIGTERM
(PR_SET_PDEATHSIG: start an Sshd from a thread that outlives it), and the folders and listeners
of a crashed earlier run are swept by the next (their ``.lock`` is free).

The listener is its connections' subreaper (PR_SET_CHILD_SUBREAPER, kept across exec): sshd
reaps any child, so the processes of a killed connection are reaped at once, not left as zombies
of init for as long as it takes to reap them (this machine's PID 1 takes its time).

API (``Account`` = tests/accounts.Account; a ``user`` argument takes an Account or a name):

    unavailable() -> str | None       why no sshd can run here (not root, no sshd, ...), or None
    fingerprint(public_line) -> str   ``SHA256:`` + unpadded base64, as ssh-keygen -l prints it
    make_client_key(account, passphrase=None, name=None) -> ClientKey
                                      a new ed25519 pair (ssh-keygen) in the account's own
                                      ``~/ssh-keys/`` (0700): private 0600, public 0644, its own;
                                      .private, .public, .public_line, .passphrase, .fingerprint
    Sshd(users, *, allow_tcp_forwarding=False, log_level="VERBOSE", matches=(), rsa=False,
         password_authentication=True, extra_config=(), name="sshd")
      .start() -> self, .stop() (twice is fine), ``with Sshd(...) as s:``, .running
      .host ("127.0.0.1"), .port, .dir, .config_path, .log_path, .proc (the listener)
      .host_keys["ed25519" | "rsa"] -> HostKey(kind, private, public_line, fingerprint)
      .fingerprint(kind="ed25519") -> str
      .known_hosts_line(kind="ed25519") -> str   "[127.0.0.1]:PORT ssh-ed25519 AAAA..."
      .write_known_hosts(path, owner=None) -> Path   a line per host key; chowned to owner
      .authorize(user, key)            key: a ClientKey or a public-key line (options allowed)
      .url(user, path="/") -> str      "sftp://NAME@127.0.0.1:PORT/path" (for sync --to)
      .log() -> str, .log_size() -> int, .log_tail(lines=40) -> str
      .wait_for_log(regex, since=0, timeout=5) -> re.Match   since: an earlier log_size();
                                       AssertionError with the log's tail if it never comes
      .connections(user=None) -> list[Connection]   .pid (the monitor), .pids, .uids, .titles
      .kill_connection(user, timeout=5) -> bool
                                       SIGKILL every process of each of the user's connections
                                       (SIGSTOPped first, then killed together, like a dead
                                       network: the root monitor "sshd: NAME [priv]", the child
                                       that runs as the account "sshd: NAME@notty", and its
                                       "sshd: NAME@internal-sftp"), and wait until they are
                                       reaped. The client's next read or write fails (paramiko:
                                       OSError "Socket is closed", EOFError or SSHException).
                                       False if the user had no connection.
    SshAgent(account): .start() -> self, .stop(), ``with``: ``ssh-agent -D -a SOCK`` run AS the
      account (ssh-agent answers only a peer of its own uid, or root), its socket in a folder of
      its own under /tmp (0700, the account's); .socket, .env ({"SSH_AUTH_SOCK": ...}, for
      Accounts.python_as(env=...)), .add(ClientKey) (ssh-add as the account; a passphrase
      through SSH_ASKPASS), .list() -> ["256 SHA256:... comment (ED25519)", ...]
    Jump(gateway, target), Jump.start(users) -> Jump, .stop()
                                      the gateway with AllowTcpForwarding yes and LogLevel DEBUG1
      .forwards(since=0) -> [(originator_port, host, port)]   from the gateway's log
      .wait_for_forward(since=0, timeout=5) -> re.Match       a forward to the target's port
    root_owned_tempdir(prefix) -> Path    a fresh root:root 0755 folder under /srv (locked);
    remove_root_owned(path)               rm -rf it and drop its lock
    chroot_problems(path) -> list[str]    what sshd refuses in a ChrootDirectory (empty: none)
    prepare_chroot_root(root, daemon) -> Path
                                      ROOT as an admin makes it for chrooted uploaders (below)
    chroot_match(criteria, root, start_dir="/dropbox") -> str
                                      "Match CRITERIA" + ChrootDirectory root + ForceCommand
                                      internal-sftp -d START_DIR, no forwarding of any kind
    uploaders_match(accounts, root) -> str   that block for groups ga and gb, less the daemon

Fixtures: import them into the test module (``from sshd import ssh_accounts, sshd_server, ...``;
ruff then wants ``# ruff: noqa: F811`` atop the file, as in test_sshd_infra.py), or once for all
modules in tests/conftest.py: ``pytest_plugins = ["sshd"]``. Each skips with the reason of
``unavailable()`` (e.g. "/usr/sbin/sshd not found: install Debian's openssh-server: make test
does as root") before any account is made:

    ssh_accounts   session: conftest's ``accounts``, each account given a random password
                   (``accounts.passwords[acct.name]``), so that all four can sign in by password
                   and by key. ``accounts.unlock(acct)`` instead: by key only.
    sshd_server    module: an Sshd admitting the four accounts
    make_sshd      function: make_sshd(users=None, **Sshd keywords) -> a started Sshd, stopped
                   after the test; users: the four accounts unless given
    ssh_agent      function: ssh_agent(account) -> a started SshAgent, stopped after the test
    jump           module: a Jump, both sshd admitting the four accounts
    dropbox_sshd   function: DropboxSshd(root, sshd, base): ``root`` made by prepare_chroot_root
                   (the daemon's store/ and dropbox/, nothing inside: run ``init`` and ``study
                   add`` as the daemon), ``sshd`` chrooting up_a and up_b into it
                   (uploaders_match); the daemon and reader sign in unchrooted

Where the files live. sshd opens ``AuthorizedKeysFile`` with the signing-in user's effective uid,
so every account must reach it; and with StrictModes every folder from / down to it must be
root's (or the user's) and not writable by group or others. /tmp (1777) fails that, so
``Sshd.dir`` is a root:root 0755 folder under /srv: ``hostkeys/`` (0700), ``authorized_keys/``
(0755, root's 0644 files), ``sshd_config`` (0644), the pid file and ``sshd.log`` (0600).

What ChrootDirectory requires (OpenSSH 9.2, tried here). Every component of the path, from / to
the chroot itself, owned by root and not writable by group or others. Otherwise, once the
password or key is accepted, sshd logs ``bad ownership or modes for chroot directory "ROOT"``
(``... chroot directory component "/tmp/"`` for a parent), a fatal error, and drops the
connection (the client: "Connection reset by peer", an SSHException or EOFError when it opens
its SFTP channel). 0755 works, and so does 0711 (the uploader then cannot list /). Nothing is
needed inside the chroot for internal-sftp (no /dev, no shell, no libraries). What lies inside
may be anyone's: ``store/`` 0700 and ``dropbox/`` 0755, the daemon's. So prepare_chroot_root
makes ROOT root:root 0755, under /srv (not /tmp or /var/tmp, both 1777), with those two inside.
The daemon then runs ``dittohead init`` and ``study add`` on it (fsck finds no damage). It
takes over a ROOT the daemon has already initialised just as well (chown root:root, chmod 0755;
store/ and dropbox/ keep the owner and modes init gave them). The sshd_config that works::

    Match Group GA,GB User *,!DAEMON
        ChrootDirectory /srv/dittohead-chroot-XXXX/root
        ForceCommand internal-sftp -d /dropbox
        AllowTcpForwarding no
        X11Forwarding no
        PermitTunnel no

(``Match Group`` matches supplementary groups too, and the daemon is in GA and GB, hence
``User *,!DAEMON``.) An uploader then sees / = ROOT holding ``dropbox`` and ``store``, starts in
/dropbox (``sftp.normalize(".")``), gets Permission denied for /store, for writing in / or in
/dropbox, and for listing a study's 3733 inbox, and can mkdir, write and rename its submission
in the inbox, where its files get the daemon's group (setgid). Without ``-d`` it starts in /
(its home does not exist inside the chroot). sshd logs ``Changed root directory to "ROOT"`` and
``Starting session: forced-command (config) 'internal-sftp -d /dropbox' for NAME ...``.
internal-sftp's own log (``-l LEVEL``) goes to syslog, never to ``-E``'s file (sshd turns that
off before the session starts), and there is no /dev/log here: don't rely on it.

The jump gateway logs a forward only at LogLevel DEBUG1 (VERBOSE says nothing of it)::

    debug1: server_request_direct_tcpip: originator 127.0.0.1 port 0, target 127.0.0.1 port 41234

The originator is what the client sent: paramiko's ``open_channel("direct-tcpip", dest, src)``
sends src, OpenSSH's ``ssh -J`` sends 127.0.0.1 port 65535. ``Jump.forwards`` parses it.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import fcntl
import functools
import hashlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import pytest
from accounts import Account, Accounts, lock_held

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "/usr/bin/ssh-keygen"
SSH_AGENT = "/usr/bin/ssh-agent"
SSH_ADD = "/usr/bin/ssh-add"
HOST = "127.0.0.1"
PRIVSEP_DIR = Path("/run/sshd")  # sshd's privilege-separation chroot; Debian makes it at boot
ROOT_PARENT = Path("/srv")  # root:root 0755 up to /: fit for StrictModes and ChrootDirectory
SSHD_PREFIX = "dittohead-sshd-"
CHROOT_PREFIX = "dittohead-chroot-"
START_TIMEOUT = 10.0
INSTALL_HINT = "install Debian's openssh-server: make test does as root"

DIRECT_TCPIP_RE = re.compile(
    r"server_request_direct_tcpip: originator (?P<orig>\S+) port (?P<orig_port>\d+), "
    r"target (?P<host>\S+) port (?P<port>\d+)"
)


def unavailable() -> str | None:
    """Why a real sshd cannot be run here, or None if it can."""
    if os.geteuid() != 0:
        return "a real sshd and real accounts need root"
    for exe in (SSHD, SSH_KEYGEN):
        if not os.access(exe, os.X_OK):
            return f"{exe} not found: {INSTALL_HINT}"
    try:
        pwd.getpwnam("sshd")
    except KeyError:
        return f"no 'sshd' account (privilege separation): {INSTALL_HINT}"
    problems = chroot_problems(ROOT_PARENT)
    if problems:
        return f"{ROOT_PARENT} cannot hold the sshd's files: " + "; ".join(problems)
    return None


@functools.cache
def sshd_version() -> tuple[int, int]:
    """OpenSSH's version, e.g. (9, 2), from ``sshd -V``."""
    cp = subprocess.run([SSHD, "-V"], capture_output=True, text=True, check=False)
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", cp.stderr + cp.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def fingerprint(public_line: str) -> str:
    """The key's SHA256 fingerprint as OpenSSH prints it: ``SHA256:`` + unpadded base64."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _name_uid(user: Account | str) -> tuple[str, int]:
    if isinstance(user, Account):
        return user.name, user.uid
    return user, pwd.getpwnam(user).pw_uid


def _keygen(path: Path, kind: str, passphrase: str, comment: str) -> str:
    """Make a key pair at ``path`` (and path.pub); return the public line."""
    argv = [SSH_KEYGEN, "-q", "-t", kind, "-N", passphrase, "-C", comment, "-f", str(path)]
    if kind == "rsa":
        argv[4:4] = ["-b", "2048"]  # 3072 (the default) takes a second or so
    cp = subprocess.run(argv, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    if cp.returncode != 0:
        raise RuntimeError(f"ssh-keygen -t {kind}: exit {cp.returncode}: {cp.stderr.strip()}")
    return path.with_name(path.name + ".pub").read_text().strip()


# -- folders root owns ---------------------------------------------------------------------


def chroot_problems(path: os.PathLike | str) -> list[str]:
    """What sshd refuses in a ChrootDirectory (or, with StrictModes, above an authorized_keys
    file): every component from / down must be owned by root and not writable by group or
    others. Empty if ``path`` qualifies."""
    problems = []
    p = Path(os.path.abspath(path))
    for part in [*reversed(p.parents), p]:
        try:
            st = os.stat(part)
        except OSError as e:
            problems.append(f"{part}: {e.strerror}")
            continue
        if not stat.S_ISDIR(st.st_mode):
            problems.append(f"{part}: not a folder")
        if st.st_uid != 0:
            problems.append(f"{part}: owned by uid {st.st_uid}, not root")
        if st.st_mode & 0o022:
            problems.append(f"{part}: mode {stat.S_IMODE(st.st_mode):04o} is group/other-writable")
    return problems


_LOCKS: dict[str, int] = {}  # folder -> descriptor of its lock file, held while it is in use


def root_owned_tempdir(prefix: str) -> Path:
    """A fresh folder ``/srv/PREFIX...``, root:root 0755, locked (flock on its ``.lock``) until
    :func:`remove_root_owned` so that :func:`sweep_stale` leaves it alone."""
    sweep_stale()
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=ROOT_PARENT))
    os.chmod(path, 0o755)
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _LOCKS[str(path)] = fd
    return path


def remove_root_owned(path: Path) -> None:
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=False)
    fd = _LOCKS.pop(str(path), -1)
    if fd >= 0:
        os.close(fd)


_swept = False


def sweep_stale() -> None:
    """Once per process: remove the folders of crashed earlier runs under /srv (those whose lock
    nobody holds), SIGKILLing the sshd listeners whose config is in them."""
    global _swept
    if _swept:
        return
    _swept = True
    for prefix in (SSHD_PREFIX, CHROOT_PREFIX):
        for path in ROOT_PARENT.glob(prefix + "*"):
            if not path.is_dir() or lock_held(path / ".lock"):
                continue
            config = f"-f {path / 'sshd_config'}"
            for pid in _pids():  # a listener's title: "sshd: /usr/sbin/sshd -D ... [listener]"
                title = _title(pid)
                if title.startswith(("sshd: ", SSHD)) and config in title:
                    _kill([pid, *_descendants(pid)])
            remove_root_owned(path)


# -- processes -------------------------------------------------------------------------------


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def _uid(pid: int) -> int | None:
    """The real uid of a process (/proc/PID/status), or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for pid in _pids():
        st = _stat(pid)
        if st is not None:
            out.setdefault(st[1], []).append(pid)
    return out


def _descendants(pid: int, children: dict[int, list[int]] | None = None) -> list[int]:
    children = _children() if children is None else children
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _kill(pids: Sequence[int], timeout: float = 5.0) -> None:
    """SIGKILL ``pids`` and wait (at most ``timeout`` s) until each is gone: reaped by the
    listener, their subreaper (see ``_preexec``). After that, a zombie counts as gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_stat(p) is None for p in pids):
            return
        time.sleep(0.005)


PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _preexec(subreaper: bool = False) -> Callable[[], None]:
    """For the child before exec: SIGTERM when the thread that started it ends (PR_SET_PDEATHSIG;
    a killed test run leaves no listener behind; so start an Sshd from a thread that outlives it,
    e.g. the main thread); with ``subreaper``, become the reaper of its orphaned descendants
    (kept across exec): sshd's listener reaps any child (``waitpid(-1)``), so a connection's
    processes, killed all at once, do not wait as zombies for init to reap them."""

    def run() -> None:
        with contextlib.suppress(Exception):
            prctl = ctypes.CDLL(None, use_errno=True).prctl
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if subreaper:
                prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    return run


# -- client keys -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientKey:
    owner: Account
    private: Path
    public: Path
    public_line: str
    passphrase: str | None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_line)


def make_client_key(account: Account, passphrase: str | None = None,
                    name: str | None = None) -> ClientKey:
    """A new ed25519 key pair in ``account``'s ``~/ssh-keys/`` (0700), owned by the account:
    private 0600 (encrypted with ``passphrase`` if given), public 0644."""
    folder = account.home / "ssh-keys"
    if not folder.exists():
        folder.mkdir()
        os.chown(folder, account.uid, account.gid)
        os.chmod(folder, 0o700)
    name = name or "id_ed25519_" + secrets.token_hex(3)
    private = folder / name
    line = _keygen(private, "ed25519", passphrase or "", f"{account.name}@dittohead-tests")
    public = private.with_name(name + ".pub")
    for path, mode in ((private, 0o600), (public, 0o644)):
        os.chown(path, account.uid, account.gid)
        os.chmod(path, mode)
    return ClientKey(account, private, public, line, passphrase)


# -- sshd ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostKey:
    kind: str  # "ed25519" or "rsa"
    private: Path
    public_line: str  # "ssh-ed25519 AAAA... comment"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_line)


@dataclass(frozen=True)
class Connection:
    """One signed-in (or signing-in) connection: the per-connection sshd and its descendants."""

    pid: int  # the root monitor, "sshd: NAME [priv]", a child of the listener
    pids: list[int]  # it and all its descendants
    uids: set[int]  # their real uids (0, the user's; "sshd" before authentication)
    titles: list[str]

    def describe(self) -> str:
        return "; ".join(f"{p} {t}" for p, t in zip(self.pids, self.titles, strict=True))


_LIVE: set[Sshd] = set()  # started and not stopped: stopped at exit


class Sshd:
    """One sshd on 127.0.0.1 (see the module docstring)."""

    host = HOST

    def __init__(
        self,
        users: Iterable[Account | str],
        *,
        allow_tcp_forwarding: bool = False,
        log_level: str = "VERBOSE",
        matches: Sequence[str] = (),
        rsa: bool = False,
        password_authentication: bool = True,
        extra_config: Sequence[str] = (),
        name: str = "sshd",
    ) -> None:
        self.users = [_name_uid(u)[0] for u in users]
        if not self.users:
            raise ValueError("Sshd needs at least one account for AllowUsers")
        self.allow_tcp_forwarding = allow_tcp_forwarding
        self.log_level = log_level
        self.matches = list(matches)
        self.rsa = rsa
        self.password_authentication = password_authentication
        self.extra_config = list(extra_config)
        self.name = name
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.dir = Path()
        self.host_keys: dict[str, HostKey] = {}

    # -- paths

    @property
    def config_path(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def log_path(self) -> Path:
        return self.dir / "sshd.log"

    @property
    def pid_file(self) -> Path:
        return self.dir / "sshd.pid"

    @property
    def keys_dir(self) -> Path:
        return self.dir / "authorized_keys"

    # -- start and stop

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Self:
        why = unavailable()
        if why:
            raise RuntimeError(why)
        if self.proc is not None:
            raise RuntimeError(f"{self.name} is started already")
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)  # sshd refuses to start without it
        self.dir = root_owned_tempdir(SSHD_PREFIX)
        try:
            self._make_files()
            self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    def _make_files(self) -> None:
        keys = self.dir / "hostkeys"
        keys.mkdir(mode=0o700)
        for kind in ("ed25519", "rsa") if self.rsa else ("ed25519",):
            private = keys / f"ssh_host_{kind}_key"
            line = _keygen(private, kind, "", f"{self.name}@dittohead-tests")
            self.host_keys[kind] = HostKey(kind, private, line)
        self.keys_dir.mkdir(mode=0o755)
        os.chmod(self.keys_dir, 0o755)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)

    def _launch(self) -> None:
        failures = []
        for _ in range(5):  # another process may take the free port between the probe and sshd
            self.port = _free_port()
            self.config_path.write_text(self.config_text())
            os.chmod(self.config_path, 0o644)
            cp = subprocess.run([SSHD, "-t", "-f", str(self.config_path)], capture_output=True,
                                text=True, check=False, stdin=subprocess.DEVNULL)
            if cp.returncode != 0:
                raise RuntimeError(f"{self.name}: sshd -t rejects {self.config_path}:\n"
                                   f"{cp.stderr.strip()}\n--- config ---\n{self.config_text()}")
            mark = self.log_size()
            with open(self.log_path, "ab") as err:
                self.proc = subprocess.Popen(
                    [SSHD, "-D", "-e", "-E", str(self.log_path), "-f", str(self.config_path)],
                    stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True,
                    preexec_fn=_preexec(subreaper=True),  # noqa: PLW1509 (prctl only)
                )
            _LIVE.add(self)
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                if _listening(self.port, self.proc.pid):
                    return
                time.sleep(0.01)
            exited = self.proc.poll() is not None
            self._stop_listener()
            started = self.log()[mark:]
            if "Address already in use" in started:
                failures.append(f"port {self.port} taken")
                continue
            why = "exited" if exited else f"not listening after {START_TIMEOUT} s"
            raise RuntimeError(f"{self.name} {why}; its log ({self.log_path}) ends:\n"
                               + _tail(started, 40))
        raise RuntimeError(f"{self.name}: no free port: " + ", ".join(failures))

    def config_text(self) -> str:
        lines = [
            f"# dittohead tests: {self.name}",
            f"ListenAddress {HOST}:{self.port}",
            *(f"HostKey {k.private}" for k in self.host_keys.values()),
            f"PidFile {self.pid_file}",
            "UsePAM no",
            "PermitRootLogin no",
            "StrictModes yes",
            f"PasswordAuthentication {'yes' if self.password_authentication else 'no'}",
            "PermitEmptyPasswords no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "HostbasedAuthentication no",
            "GSSAPIAuthentication no",
            f"AuthorizedKeysFile {self.keys_dir}/%u",
            "AuthorizedPrincipalsFile none",
            f"AllowUsers {' '.join(self.users)}",
            f"AllowTcpForwarding {'yes' if self.allow_tcp_forwarding else 'no'}",
            "AllowAgentForwarding no",
            "X11Forwarding no",
            "PermitTunnel no",
            "GatewayPorts no",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "MaxStartups 100:30:200",
            "MaxSessions 20",
            "LoginGraceTime 30",
            f"LogLevel {self.log_level}",
            "Subsystem sftp internal-sftp",
        ]
        if sshd_version() >= (9, 8):  # no penalty box for the tests' own failed sign-ins and kills
            lines.append("PerSourcePenalties no")
        lines += self.extra_config
        for block in self.matches:  # last: a Match block runs to the end of the file or the next
            lines += ["", block.strip("\n")]
        return "\n".join(lines) + "\n"

    def _stop_listener(self) -> None:
        """Stop the listener (SIGSTOP: it forks nothing new), SIGKILL every process of every
        connection, let the listener reap them (SIGCONT), then SIGKILL it and reap it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGSTOP)
            seen: list[int] = []
            for _ in range(10):
                new = [p for p in _descendants(proc.pid) if p not in seen]
                if not new:
                    break
                for p in new:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGSTOP)
                seen += new
            for p in seen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            _kill(seen, timeout=2.0)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        """Kill the listener and every connection; remove the folder. Safe to call twice."""
        self._stop_listener()
        _LIVE.discard(self)
        if self.dir != Path() and self.dir.exists():
            remove_root_owned(self.dir)

    # -- host keys, known_hosts, authorized keys

    def fingerprint(self, kind: str = "ed25519") -> str:
        return self.host_keys[kind].fingerprint

    def known_hosts_line(self, kind: str = "ed25519") -> str:
        key_type, blob = self.host_keys[kind].public_line.split()[:2]
        return f"[{HOST}]:{self.port} {key_type} {blob}"

    def write_known_hosts(self, path: os.PathLike | str, owner: Account | None = None) -> Path:
        """A known_hosts file with a line for each host key; given to ``owner`` (0644)."""
        path = Path(path)
        path.write_text("".join(self.known_hosts_line(k) + "\n" for k in self.host_keys))
        if owner is not None:
            os.chown(path, owner.uid, owner.gid)
        os.chmod(path, 0o644)
        return path

    def authorize(self, user: Account | str, key: ClientKey | str) -> None:
        """Let ``user`` sign in with ``key`` (a ClientKey or a public-key line; options such as
        ``restrict,`` may lead the line): appended to root's ``authorized_keys/NAME`` (0644)."""
        name, _ = _name_uid(user)
        line = key.public_line if isinstance(key, ClientKey) else key.strip()
        path = self.keys_dir / name
        with open(path, "a") as f:
            f.write(line + "\n")
        os.chmod(path, 0o644)

    def url(self, user: Account | str, path: str = "/") -> str:
        name, _ = _name_uid(user)
        return f"sftp://{name}@{HOST}:{self.port}/{path.lstrip('/')}"

    # -- the log

    def log(self) -> str:
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        """The log's length in characters now: pass it as ``since`` to read only what follows."""
        return len(self.log())

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log(), lines)

    def wait_for_log(self, pattern: str | re.Pattern[str], since: int = 0,
                     timeout: float = 5.0) -> re.Match[str]:
        """The first match of ``pattern`` in the log after ``since`` (a log_size()), waiting
        for it at most ``timeout`` s; AssertionError with the log's tail if it does not come."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log(), since)
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {rx.pattern!r} in its log after "
                                     f"{timeout} s; it ends:\n{self.log_tail()}")
            time.sleep(0.02)

    # -- connections

    def connections(self, user: Account | str | None = None) -> list[Connection]:
        """The connections the listener serves now (each a child of it, with its descendants);
        with ``user``, only those with a process running as that account."""
        if not self.running:
            return []
        assert self.proc is not None
        uid = None if user is None else _name_uid(user)[1]
        children = _children()
        out = []
        for pid in children.get(self.proc.pid, []):
            pids = [pid, *_descendants(pid, children)]
            uids = {u for u in map(_uid, pids) if u is not None}
            if uid is None or uid in uids:
                out.append(Connection(pid, pids, uids, [_title(p) for p in pids]))
        return out

    def kill_connection(self, user: Account | str, timeout: float = 5.0) -> bool:
        """SIGKILL every process of each connection signed in as ``user`` (its root monitor and
        the child that runs as the account, internal-sftp included) and wait until they are
        gone; the client's next read or write fails. False if the user had no connection."""
        conns = self.connections(user)
        for conn in conns:
            for pid in conn.pids:  # stop first: a monitor killed alone would outlive its child
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
        _kill([p for c in conns for p in c.pids], timeout)  # the listener reaps them all
        return bool(conns)

    def __repr__(self) -> str:
        return f"<Sshd {self.name} {HOST}:{self.port} {'running' if self.running else 'stopped'}>"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _listening(port: int, pid: int) -> bool:
    """Whether process ``pid`` listens on 127.0.0.1:port: a LISTEN socket of /proc/net/tcp
    that is one of its descriptors (no connection made, so nothing lands in sshd's log; and a
    listener of another process on that port does not count)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        inodes = {fields[9] for fields in map(str.split, f)
                  if fields[1] == want and fields[3] == "0A"}
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


@atexit.register
def _stop_all() -> None:
    for s in list(_LIVE):
        with contextlib.suppress(Exception):
            s.stop()


# -- ssh-agent -------------------------------------------------------------------------------


class SshAgent:
    """``ssh-agent -D -a SOCK`` running as ``account`` (ssh-agent serves only a peer of its own
    uid, or root), its socket in a folder of its own (0700, the account's) under /tmp."""

    def __init__(self, account: Account) -> None:
        self.account = account
        self.dir = Path()
        self.proc: subprocess.Popen | None = None

    @property
    def socket(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def env(self) -> dict[str, str]:
        """The environment variable a client needs (for Accounts.python_as(env=...))."""
        return {"SSH_AUTH_SOCK": str(self.socket)}

    def _identity(self) -> dict:
        a = self.account
        return {"user": a.uid, "group": a.gid, "extra_groups": a.groups, "umask": 0o077}

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "HOME": str(self.account.home), "LANG": "C.UTF-8",
                **self.env, **(extra or {})}

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Self:
        if not os.access(SSH_AGENT, os.X_OK):
            raise RuntimeError(f"{SSH_AGENT} not found: install Debian's openssh-client")
        self.dir = Path(tempfile.mkdtemp(prefix="dittohead-agent-", dir="/tmp"))
        os.chown(self.dir, self.account.uid, self.account.gid)
        os.chmod(self.dir, 0o700)
        self.proc = subprocess.Popen(
            [SSH_AGENT, "-D", "-a", str(self.socket)], env=self._env(), cwd="/",
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=_preexec(),  # noqa: PLW1509 (prctl only)
            **self._identity(),
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                done = self.proc.poll() is not None and self.proc.stderr is not None
                err = self.proc.stderr.read().decode() if done and self.proc.stderr else ""
                self.stop()
                raise RuntimeError(f"ssh-agent did not start: {err.strip()}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if proc.stderr:
                proc.stderr.close()
        if self.dir != Path():
            shutil.rmtree(self.dir, ignore_errors=True)

    def _ssh_add(self, *args: str, extra_env: dict[str, str] | None = None) -> str:
        cp = subprocess.run([SSH_ADD, *args], env=self._env(extra_env), capture_output=True,
                            text=True, check=False, stdin=subprocess.DEVNULL,
                            cwd=self.account.home, **self._identity())
        if cp.returncode != 0 and not (args == ("-l",) and cp.returncode == 1):  # 1: no keys
            raise RuntimeError(f"ssh-add {' '.join(args)}: exit {cp.returncode}: "
                               f"{cp.stderr.strip()}")
        return cp.stdout

    def add(self, key: ClientKey) -> None:
        """``ssh-add`` the key, as the account (a passphrase is given through SSH_ASKPASS)."""
        extra = None
        if key.passphrase:
            askpass = self.dir / "askpass"
            askpass.write_text('#!/bin/sh\nprintf "%s\\n" "$DITTOHEAD_TEST_PASSPHRASE"\n')
            os.chown(askpass, self.account.uid, self.account.gid)
            os.chmod(askpass, 0o700)
            extra = {"SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force",
                     "DITTOHEAD_TEST_PASSPHRASE": key.passphrase}
        self._ssh_add(str(key.private), extra_env=extra)

    def list(self) -> list[str]:
        """``ssh-add -l``: one line per key the agent holds, "256 SHA256:... comment (ED25519)"."""
        return [ln for ln in self._ssh_add("-l").splitlines() if "SHA256:" in ln]


# -- a jump gateway --------------------------------------------------------------------------


@dataclass
class Jump:
    """A gateway sshd (TCP forwarding allowed, LogLevel DEBUG1) and a target sshd behind it."""

    gateway: Sshd
    target: Sshd

    @classmethod
    def start(cls, users: Sequence[Account | str]) -> Jump:
        gateway = Sshd(users, allow_tcp_forwarding=True, log_level="DEBUG1", name="gateway")
        target = Sshd(users, name="target")
        gateway.start()
        try:
            target.start()
        except BaseException:
            gateway.stop()
            raise
        return cls(gateway, target)

    def stop(self) -> None:
        self.target.stop()
        self.gateway.stop()

    def forwards(self, since: int = 0) -> list[tuple[int, str, int]]:
        """(originator port, target host, target port) of each direct-tcpip the gateway granted
        after ``since`` (a gateway.log_size())."""
        return [(int(m["orig_port"]), m["host"], int(m["port"]))
                for m in DIRECT_TCPIP_RE.finditer(self.gateway.log(), since)]

    def wait_for_forward(self, since: int = 0, timeout: float = 5.0) -> re.Match[str]:
        """The gateway's log line of a forward to the target (after ``since``)."""
        rx = re.compile(DIRECT_TCPIP_RE.pattern.replace(r"(?P<port>\d+)",
                                                        rf"(?P<port>{self.target.port})\b"))
        return self.gateway.wait_for_log(rx, since, timeout)


# -- a chroot for the drop box ---------------------------------------------------------------


def prepare_chroot_root(root: os.PathLike | str, daemon: Account) -> Path:
    """Make ``root`` a server ROOT as an admin would for uploaders chrooted into it: ROOT itself
    root:root 0755 (every folder above it must be root's and not group/other-writable too:
    checked, ValueError if not), ``store/`` 0700 and ``dropbox/`` 0711 inside, owned by the
    daemon (its primary group). An existing ROOT is taken over (chown, chmod)."""
    root = Path(root)
    root.mkdir(exist_ok=True)
    os.chown(root, 0, 0)
    os.chmod(root, 0o755)
    problems = chroot_problems(root)
    if problems:
        raise ValueError(f"{root} cannot be a ChrootDirectory: " + "; ".join(problems))
    for name, mode in (("store", 0o700), ("dropbox", 0o711)):
        path = root / name
        path.mkdir(exist_ok=True)
        os.chown(path, daemon.uid, daemon.gid)
        os.chmod(path, mode)
    return root


def chroot_match(criteria: str, root: os.PathLike | str, start_dir: str | None = "/dropbox") -> str:
    """A Match block (``criteria``: e.g. ``"Group ga,gb"`` or ``"User NAME"``) that locks its
    accounts into ``root`` with SFTP only, starting in ``start_dir``."""
    force = "internal-sftp"
    if start_dir:
        force += f" -d {start_dir}"
    return "\n".join([
        f"Match {criteria}",
        f"    ChrootDirectory {root}",
        f"    ForceCommand {force}",
        "    AllowTcpForwarding no",
        "    X11Forwarding no",
        "    PermitTunnel no",
    ])


def uploaders_match(accounts: Accounts, root: os.PathLike | str) -> str:
    """The Match block that chroots the uploaders (groups ga and gb) into ``root``, starting in
    /dropbox, but not the daemon: it is a member of ga and gb too (to chgrp a study's folder),
    and ``Match Group`` matches supplementary groups, so the block excludes it by name."""
    a = accounts
    return chroot_match(f"Group {a.ga.name},{a.gb.name} User *,!{a.daemon.name}", root)


@dataclass
class DropboxSshd:
    root: Path  # the server ROOT (root:root 0755; store/ and dropbox/ the daemon's)
    sshd: Sshd  # uploaders (groups ga, gb) chrooted into root, starting in /dropbox
    base: Path = field(default_factory=Path)  # the root-owned folder that holds root


# -- fixtures --------------------------------------------------------------------------------


def _skip_unless_available() -> None:
    why = unavailable()
    if why:
        pytest.skip(why)


@pytest.fixture(scope="session")
def ssh_accounts(request: pytest.FixtureRequest) -> Accounts:
    """The session's accounts (conftest's ``accounts``), each with a random password
    (``accounts.passwords[name]``). Skips first if no sshd can run here."""
    _skip_unless_available()
    accounts: Accounts = request.getfixturevalue("accounts")
    for acct in accounts.all:
        if acct.name not in accounts.passwords:
            accounts.set_password(acct, "pw-" + secrets.token_urlsafe(12))
    return accounts


@pytest.fixture(scope="module")
def sshd_server(ssh_accounts: Accounts) -> Iterator[Sshd]:
    """An sshd admitting the four accounts (password and key)."""
    with Sshd(ssh_accounts.all, name="sshd_server") as s:
        yield s


@pytest.fixture
def make_sshd(ssh_accounts: Accounts) -> Iterator[Callable[..., Sshd]]:
    """make_sshd(users=None, **kwargs) -> a started Sshd(users or the four accounts, **kwargs),
    stopped after the test."""
    started: list[Sshd] = []

    def make(users: Iterable[Account | str] | None = None, **kwargs: Any) -> Sshd:
        s = Sshd(ssh_accounts.all if users is None else users, **kwargs)
        started.append(s)
        return s.start()

    try:
        yield make
    finally:
        for s in started:
            s.stop()


@pytest.fixture
def ssh_agent(ssh_accounts: Accounts) -> Iterator[Callable[[Account], SshAgent]]:
    """ssh_agent(account) -> a started SshAgent running as ``account``, stopped after the test."""
    started: list[SshAgent] = []

    def make(account: Account) -> SshAgent:
        agent = SshAgent(account)
        started.append(agent)
        return agent.start()

    try:
        yield make
    finally:
        for a in started:
            a.stop()


@pytest.fixture(scope="module")
def jump(ssh_accounts: Accounts) -> Iterator[Jump]:
    """A gateway (TCP forwarding, DEBUG1 log) and a target sshd, both admitting the accounts."""
    j = Jump.start(ssh_accounts.all)
    try:
        yield j
    finally:
        j.stop()


@pytest.fixture
def dropbox_sshd(ssh_accounts: Accounts) -> Iterator[DropboxSshd]:
    """A fresh ROOT made by prepare_chroot_root (store/ and dropbox/, empty) and an sshd that
    chroots the uploaders into it (uploaders_match: ``ForceCommand internal-sftp -d /dropbox``);
    the daemon and reader sign in unchrooted."""
    a = ssh_accounts
    base = root_owned_tempdir(CHROOT_PREFIX)
    try:
        root = prepare_chroot_root(base / "root", a.daemon)
        with Sshd(a.all, matches=[uploaders_match(a, root)], name="dropbox_sshd") as s:
            yield DropboxSshd(root, s, base)
    finally:
        remove_root_owned(base)

