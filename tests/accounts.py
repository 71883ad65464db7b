"""Real, unprivileged Linux accounts for the tests that cross accounts.

DESIGN.md: "the daemon is an ordinary unprivileged account that owns ROOT; each collector signs
in as its own account", and tests that run both sides as root hide exactly the bugs that matter.
So one pytest session (run as root) creates these accounts with useradd/groupadd and removes them
at its end:

    daemon   owns the server root; primary group ``gd`` (its own), supplementary member of
             ``ga`` and ``gb`` (so that it can chgrp a study's folder to an uploaders' group)
    up_a     an uploader, primary group ``ga``
    up_b     an uploader of another group, primary group ``gb``
    reader   a plain account, primary group ``gr`` of its own, in no shared group

Neither uploader is in ``gd``. Each account has a private home (0700) and a client state dir
under the session dir, and runs as its own process: ``run_as`` (``python -m dittohead ARGS``),
``python_as`` (any snippet, e.g. an attack script) and ``spawn_as`` (a long-running daemon in its
own process group, for a test to SIGKILL) start a child with the account's uid, primary gid and
supplementary groups, umask 022 and a clean environment.

Names are the session's tag (``dht`` + 4 hex digits) + ``-`` + role, e.g. ``dht3f9a-upa``. The
session dir ``/tmp/dittohead-accounts-<tag>/`` holds a lock file that the session keeps locked
(flock) from before its first account until after its last is gone; a new session sweeps the
accounts, groups and session dirs of every tag whose lock nobody holds (a crashed earlier run),
and nothing that does not match that exact name pattern.

The interpreter: the venv's python may sit where other accounts cannot reach it (under /root,
0700). The session probes, as ``reader``, that ``sys.executable`` can import dittohead (this
checkout's) and its dependencies; failing that, the system's python3 of the same major.minor with
PYTHONPATH = this checkout + the venv's site-packages; failing that too (the checkout itself out
of reach), the same python3 with a copy of those packages in the session dir. If none works, the
fixture skips.
"""

from __future__ import annotations

import fcntl
import grp
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

CHECKOUT = Path(__file__).resolve().parents[1]
SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
SYSTEM_PYTHON = "/usr/bin/python3"
NOLOGIN = "/usr/sbin/nologin"
SESSION_DIR_PREFIX = "/tmp/dittohead-accounts-"
NAME_RE = re.compile(r"^(dht[0-9a-f]{4})-(daemon|upa|upb|reader|gd|ga|gb|gr)$")
PROBE_MODULES = "dittohead, blake3, pyfastcdc, msgpack, click, platformdirs, tqdm, paramiko"
PROBE_CODE = (
    f"import json, sys, {PROBE_MODULES}\n"
    "print(json.dumps({'version': list(sys.version_info[:2]), 'dittohead': dittohead.__file__}))"
)


class Unavailable(Exception):
    """The accounts cannot be had here; the message is the fixture's skip reason."""


@dataclass(frozen=True)
class Group:
    name: str
    gid: int


@dataclass(frozen=True)
class Account:
    role: str
    name: str
    uid: int
    gid: int  # primary group
    groups: list[int]  # every group a login would get (os.getgrouplist), the primary first
    home: Path  # private: 0700, owned by the account
    state: Path  # its client state dir (DITTOHEAD_STATE_DIR), inside home


def tool(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def _cmd(*argv: str) -> None:
    """Run an account-admin command; raise with its message if it fails."""
    cp = subprocess.run(argv, capture_output=True, text=True, check=False)
    if cp.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {cp.returncode}: {cp.stderr.strip()}")


def make_dir(path: Path, owner: Account, mode: int, group: int | None = None) -> Path:
    """Create the folder ``path`` (its parent must exist) owned by ``owner`` (group: its primary
    group unless ``group`` gives a gid) with exactly ``mode``, umask and setgid parents aside."""
    path = Path(path)
    path.mkdir()
    os.chown(path, owner.uid, owner.gid if group is None else group)
    os.chmod(path, mode)  # after chown, which clears set-id bits
    return path


def lock_held(path: str | os.PathLike[str]) -> bool:
    """Whether a live process holds the flock of the file ``path`` (False also when there is
    none): how a test session's leftovers are told from those of a session still running."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock if we took it
    return False


def _session_lock_held(tag: str) -> bool:
    """Whether a live session holds the lock of ``tag``."""
    return lock_held(f"{SESSION_DIR_PREFIX}{tag}/lock")


def sweep_stale() -> list[str]:
    """Remove the accounts, groups and session dirs of crashed earlier sessions; return the names
    removed. Only names matching NAME_RE, only tags whose session lock nobody holds; a removal
    that fails is left for the next sweep (it must not stop this session)."""
    users = {p.pw_name: NAME_RE.match(p.pw_name) for p in pwd.getpwall()}
    groups = {g.gr_name: NAME_RE.match(g.gr_name) for g in grp.getgrall()}
    found = [
        (name, m.group(1), cmd)
        for names, cmd in ((users, "userdel"), (groups, "groupdel"))
        for name, m in names.items()
        if m
    ]
    stale = {tag for _, tag, _ in found if not _session_lock_held(tag)}
    removed: list[str] = []
    for name, tag, cmd in found:  # users first: a group cannot go while it is a user's primary
        if tag in stale:
            try:
                _cmd(tool(cmd) or cmd, *(["-f"] if cmd == "userdel" else []), name)
                removed.append(name)
            except RuntimeError as e:
                warnings.warn(f"sweeping stale test accounts: {e}")
    for tag in stale:
        shutil.rmtree(SESSION_DIR_PREFIX + tag, ignore_errors=True)
    return removed


class Accounts:
    """The session's accounts (see the module docstring); ``close()`` removes them."""

    daemon: Account
    up_a: Account
    up_b: Account
    reader: Account
    gd: Group  # the daemon's group
    ga: Group  # up_a's uploaders
    gb: Group  # up_b's uploaders

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise Unavailable("real accounts need root (useradd, setuid children)")
        missing = [t for t in ("useradd", "groupadd", "userdel", "groupdel") if not tool(t)]
        if missing:
            raise Unavailable(f"real accounts need {', '.join(missing)} (not found in {SBIN_PATH})")
        sweep_stale()
        self._users: list[str] = []
        self._groups: list[str] = []
        self._spawned: list[subprocess.Popen] = []
        self._lock_fd = -1
        self.passwords: dict[str, str] = {}  # account name -> the password set_password gave it
        self.python: str = ""
        self.python_env: dict[str, str] = {}
        self.base = self._claim_session_dir()
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    # -- creation and removal ------------------------------------------------------------------

    def _claim_session_dir(self) -> Path:
        """A fresh session dir with its lock taken, under a tag no account uses yet."""
        for _ in range(100):
            self.tag = "dht" + secrets.token_hex(2)
            taken = any(n.startswith(self.tag + "-") for n in _all_names())
            base = Path(SESSION_DIR_PREFIX + self.tag)
            if taken:
                continue
            try:
                base.mkdir(mode=0o755)
            except FileExistsError:
                continue
            os.chmod(base, 0o755)
            self._lock_fd = os.open(base / "lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            return base
        raise RuntimeError("no free session tag after 100 tries")

    def _group(self, role: str) -> Group:
        name = f"{self.tag}-{role}"
        _cmd(tool("groupadd") or "groupadd", name)
        self._groups.append(name)
        return Group(name, grp.getgrnam(name).gr_gid)

    def _user(self, role: str, primary: Group, extra: tuple[Group, ...] = ()) -> Account:
        name = f"{self.tag}-{role}"
        home = self.base / role
        argv = [
            tool("useradd") or "useradd",
            "-M",
            "-d",
            str(home),
            "-s",
            NOLOGIN,
            "-c",
            "dittohead tests",
            "-g",
            primary.name,
        ]
        if extra:
            argv += ["-G", ",".join(g.name for g in extra)]
        _cmd(*argv, name)
        self._users.append(name)
        pw = pwd.getpwnam(name)
        gids = os.getgrouplist(name, pw.pw_gid)
        groups = [pw.pw_gid] + sorted(set(gids) - {pw.pw_gid})
        acct = Account(role, name, pw.pw_uid, pw.pw_gid, groups, home, home / "state")
        for d in (acct.home, acct.state):
            d.mkdir(mode=0o700)
            os.chown(d, acct.uid, acct.gid)
            os.chmod(d, 0o700)
        return acct

    def _create(self) -> None:
        self.gd, self.ga, self.gb = self._group("gd"), self._group("ga"), self._group("gb")
        gr = self._group("gr")
        self.daemon = self._user("daemon", self.gd, (self.ga, self.gb))
        self.up_a = self._user("upa", self.ga)
        self.up_b = self._user("upb", self.gb)
        self.reader = self._user("reader", gr)

    def close(self) -> None:
        """Kill what spawn_as left running, remove the accounts, groups and session dir."""
        self.reap()
        errors: list[str] = []
        for name in reversed(self._users):
            try:
                _cmd(tool("userdel") or "userdel", "-f", name)
            except RuntimeError as e:
                errors.append(str(e))
        for name in reversed(self._groups):
            try:
                _cmd(tool("groupdel") or "groupdel", name)
            except RuntimeError as e:
                errors.append(str(e))
        self._users, self._groups = [], []
        shutil.rmtree(self.base, ignore_errors=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        if errors:
            raise RuntimeError("removing the test accounts: " + "; ".join(errors))

    def reap(self) -> None:
        """SIGKILL the process group of every spawn_as child still running, and wait for it."""
        for p in self._spawned:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        self._spawned = []

    # -- signing in (tests/sshd.py) ------------------------------------------------------------

    def set_password(self, account: Account, password: str) -> None:
        """Give ``account`` a password (chpasswd, hashed as the system hashes them), recorded in
        ``passwords``. This also unlocks the account: useradd leaves its password ``!`` (locked),
        and an sshd without PAM refuses a locked account every way in, a key included."""
        if not password or any(c in password for c in "\n\r"):
            raise ValueError("a password for chpasswd: not empty, no line break")
        cp = subprocess.run([tool("chpasswd") or "chpasswd"], input=f"{account.name}:{password}\n",
                            capture_output=True, text=True, check=False)
        if cp.returncode != 0:
            raise RuntimeError(f"chpasswd {account.name}: exit {cp.returncode}: "
                               f"{cp.stderr.strip()}")
        self.passwords[account.name] = password

    def unlock(self, account: Account) -> None:
        """Let ``account`` sign in by key but by no password: its password hash becomes ``*``,
        which no password matches and which, unlike ``!``, sshd does not take for locked."""
        _cmd(tool("usermod") or "usermod", "-p", "*", account.name)
        self.passwords.pop(account.name, None)

    @property
    def all(self) -> list[Account]:
        return [self.daemon, self.up_a, self.up_b, self.reader]

    # -- the interpreter ----------------------------------------------------------------------

    def resolve_python(self) -> None:
        """Pick an interpreter the accounts can run (see the module docstring), or raise
        Unavailable saying what is missing."""
        venv_paths = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
        candidates: list[tuple[str, dict[str, str]]] = [(sys.executable, {})]
        if os.path.exists(SYSTEM_PYTHON):
            path = os.pathsep.join([str(CHECKOUT), *venv_paths])
            candidates.append((SYSTEM_PYTHON, {"PYTHONPATH": path}))
        failures = []
        for exe, env in candidates:
            self.python, self.python_env = exe, env
            why = self._probe()
            if why is None:
                return
            failures.append(f"{exe}: {why}")
        if os.path.exists(SYSTEM_PYTHON):  # the checkout itself is out of the accounts' reach
            self.python, self.python_env = SYSTEM_PYTHON, {"PYTHONPATH": str(self._copy_packages())}
            why = self._probe()
            if why is None:
                return
            failures.append(f"{SYSTEM_PYTHON} with a copy of the packages: {why}")
        if not os.path.exists(SYSTEM_PYTHON):
            failures.append(f"{SYSTEM_PYTHON}: not installed")
        self.python, self.python_env = "", {}
        raise Unavailable("no Python the test accounts can run: " + "; ".join(failures))

    def _copy_packages(self) -> Path:
        """This checkout's dittohead and the venv's packages, copied into the session dir (0755),
        for a checkout and a venv that lie where other accounts cannot reach them (a CI clone
        under a private folder)."""
        lib = self.base / "lib"
        skip = shutil.ignore_patterns("__pycache__", "*.pth", "pip", "pip-*", "setuptools", "setuptools-*",
                                      "pkg_resources", "_distutils_hack", "mypy*", "ruff*")
        for site in dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")):
            shutil.copytree(site, lib, ignore=skip, dirs_exist_ok=True)
        shutil.copytree(CHECKOUT / "dittohead", lib / "dittohead", ignore=skip, dirs_exist_ok=True)
        for dirpath, dirnames, filenames in os.walk(lib):
            os.chmod(dirpath, 0o755)
            for f in filenames:
                os.chmod(os.path.join(dirpath, f), 0o644)
        return lib

    def _probe(self) -> str | None:
        """None if the current interpreter works as ``reader``, else why not (one line)."""
        try:
            cp = self.python_as(self.reader, PROBE_CODE, timeout=60)
        except OSError as e:  # the exec itself failed (e.g. a path it cannot traverse)
            return f"cannot run it ({e.strerror})"
        if cp.returncode != 0:
            lines = cp.stderr.strip().splitlines()
            return lines[-1] if lines else f"exit {cp.returncode}"
        found = json.loads(cp.stdout)
        if tuple(found["version"]) != sys.version_info[:2]:
            return "is Python {}.{}, not {}.{}".format(*found["version"], *sys.version_info[:2])
        where = Path(found["dittohead"]).resolve()
        if not (where.is_relative_to(CHECKOUT) or where.is_relative_to(self.base)):
            return f"imports dittohead from {found['dittohead']}, not from {CHECKOUT}"
        return None

    # -- running as an account ----------------------------------------------------------------

    def env_for(
        self, account: Account, env: Mapping[str, str | None] | None = None
    ) -> dict[str, str]:
        """The clean environment of a child running as ``account``; ``env`` overrides (None
        removes a variable)."""
        out = {
            "HOME": str(account.home),
            "USER": account.name,
            "LOGNAME": account.name,
            "DITTOHEAD_STATE_DIR": str(account.state),
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            **self.python_env,
        }
        for key, value in (env or {}).items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = value
        return out

    def _identity(self, account: Account) -> dict[str, Any]:
        return {
            "user": account.uid,
            "group": account.gid,
            "extra_groups": account.groups,
            "umask": 0o022,
        }

    def _run(
        self,
        account: Account,
        argv: list[str],
        input: str | bytes | None,
        env: Mapping[str, str | None] | None,
        timeout: float,
        cwd: os.PathLike | str | None,
        raw_stdout: bool = False,
    ) -> subprocess.CompletedProcess:
        if isinstance(input, str):
            input = input.encode("utf-8")
        cp = subprocess.run(
            argv,
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            env=self.env_for(account, env),
            cwd=account.home if cwd is None else cwd,
            timeout=timeout,
            check=False,
            **self._identity(account),
        )
        return subprocess.CompletedProcess(
            cp.args,
            cp.returncode,
            cp.stdout if raw_stdout else cp.stdout.decode("utf-8", "replace"),
            cp.stderr.decode("utf-8", "replace"),
        )

    def run_as(
        self,
        account: Account,
        *args: Any,
        input: str | bytes | None = None,
        env: Mapping[str, str | None] | None = None,
        timeout: float = 120,
        cwd: os.PathLike | str | None = None,
        raw_stdout: bool = False,
    ) -> subprocess.CompletedProcess:
        """Run ``python -m dittohead ARGS`` as ``account``; text stdout/stderr (stdout as bytes
        with ``raw_stdout``, for ``cat``), never raises for a failing command (check returncode).
        stdin is /dev/null unless ``input`` is given."""
        return self._run(account, self._argv("-m", "dittohead", *args), input, env, timeout, cwd,
                         raw_stdout)

    def python_as(
        self,
        account: Account,
        code: str,
        *args: Any,
        input: str | bytes | None = None,
        env: Mapping[str, str | None] | None = None,
        timeout: float = 120,
        cwd: os.PathLike | str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``python -c CODE ARGS`` as ``account`` (sys.argv[1:] == ARGS), like run_as."""
        return self._run(account, self._argv("-c", code, *args), input, env, timeout, cwd)

    def spawn_as(
        self,
        account: Account,
        *args: Any,
        env: Mapping[str, str | None] | None = None,
        cwd: os.PathLike | str | None = None,
        stdout: int | IO | None = subprocess.DEVNULL,
        stderr: int | IO | None = subprocess.DEVNULL,
    ) -> subprocess.Popen:
        """Start ``python -m dittohead ARGS`` as ``account`` in its own session and process group
        (``os.killpg(p.pid, SIGKILL)`` kills it and its children); stdin is /dev/null. What is
        still running at the end of the test (acct_dir) or session is killed the same way."""
        return self._spawn(account, self._argv("-m", "dittohead", *args), env=env, cwd=cwd,
                           stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)

    def spawn_python_as(self, account: Account, code: str, *args: Any) -> subprocess.Popen:
        """Start ``python -c CODE ARGS`` as ``account`` with pipes for stdin and stdout (text,
        line-buffered), for a script that acts in steps (an attacker that holds descriptors
        while the daemon works); killed at the end like ``spawn_as``."""
        return self._spawn(account, self._argv("-c", code, *args), stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)

    def _spawn(self, account: Account, argv: list[str], *, env: Mapping[str, str | None] | None = None,
               cwd: os.PathLike | str | None = None, **popen: Any) -> subprocess.Popen:
        p = subprocess.Popen(argv, env=self.env_for(account, env), cwd=account.home if cwd is None else cwd,
                             start_new_session=True, **popen, **self._identity(account))
        self._spawned.append(p)
        return p

    def _argv(self, *args: Any) -> list[str]:
        assert self.python, "resolve_python() first"
        return [
            self.python,
            *(os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args),
        ]


def _all_names() -> set[str]:
    return {p.pw_name for p in pwd.getpwall()} | {g.gr_name for g in grp.getgrall()}
