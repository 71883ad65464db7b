"""The drop box over SFTP with real accounts: uploaders sync through a real OpenSSH sshd
(tests/sshd.py) as their own accounts, the daemon ingests as its own, and an uploader signed in
over SFTP reaches nothing the permission model keeps from it (docs/server-root.md, "The
accounts" and "Uploaders chrooted by sshd"; docs/client.md, "Over SSH").

Each side runs as its own account (tests/accounts.py): the daemon owns the server root and runs
init, study add, watch --once, cat and fsck; up_a (group ga) and up_b (group gb) run ``sync --to
sftp://...`` (``Accounts.run_as``), and attack scripts that use paramiko directly, signed in over
SFTP to the same sshd (``Accounts.python_as``). Root only prepares folders and looks.

Studies: ``s`` open to every account, ``g`` added with ``--uploaders GA`` (up_a's group), ``h``
with ``--uploaders GB`` (up_b's). Each uploader has a client state folder of its own for each
server (``DITTOHEAD_STATE_DIR``), where its known_hosts lives: written for up_a, recorded by
``dittohead trust-host`` for up_b.

The unchrooted tests share one module-scoped server root (``world``): its fixture sends round 1
(ingested) and round 2 (committed, left in the inbox for the attack); the sign-in tests add
submissions; ``test_the_daemon_ingests_everything_sent_over_sftp`` ingests them all and reads
every version back. The versions expected are recorded as syncs succeed, so each test also runs
alone (``-k``). The chrooted test has a root and an sshd of its own (``dropbox_sshd``).
"""

# ruff: noqa: F811 (pytest fixtures imported from tests/sshd.py, named again by arguments)

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from accounts import Account, Accounts, make_dir
from conftest import SUBMISSION_RE, store_snapshot
from sshd import (  # noqa: F401 (the fixtures, which the tests' arguments name)
    ClientKey,
    DropboxSshd,
    Sshd,
    dropbox_sshd,
    make_client_key,
    ssh_accounts,
    ssh_agent,
    sshd_server,
)

from dittohead import format as fmt

SITE = "lab-ssh"
MiB = 1 << 20


def describe(cp: subprocess.CompletedProcess) -> str:
    out = cp.stdout if isinstance(cp.stdout, str) else cp.stdout.decode("utf-8", "replace")
    return f"args={cp.args!r}\nexit={cp.returncode}\nstdout={out[-3000:]!r}\nstderr={cp.stderr[-3000:]!r}"


def tree(top: Path) -> dict[str, tuple]:
    """Every entry under ``top`` (itself included) as root sees it: kind, mode, owner, group, and
    for a file its size and a digest of its bytes (folders' times left out)."""
    snap: dict[str, tuple] = {}

    def one(path: str) -> None:
        st = os.lstat(path)
        rel = os.path.relpath(path, top)
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                digest = hashlib.blake2b(f.read()).hexdigest()
            snap[rel] = ("file", st.st_mode, st.st_uid, st.st_gid, st.st_size, digest)
        else:
            snap[rel] = (stat.S_IFMT(st.st_mode), st.st_mode, st.st_uid, st.st_gid)

    one(str(top))
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            one(os.path.join(dirpath, name))
    return snap


@dataclass
class Site:
    """One server root, reached over one sshd; the uploaders' sources and state folders."""

    accounts: Accounts
    sshd: Sshd
    root: Path  # the server root, as root sees it
    base: Path  # a folder the accounts can traverse: sources, state folders
    remote: str  # the path in sftp:// addresses that names the root ("/" when chrooted)
    keys: dict[str, ClientKey] = field(default_factory=dict)  # role -> its authorized key
    expected: dict[str, dict[str, list[bytes]]] = field(default_factory=dict)  # study -> path -> versions
    pending: dict[tuple[str, str], dict[str, bytes]] = field(default_factory=dict)  # (role, study) -> unsent
    committed: list[tuple[str, str]] = field(default_factory=list)  # (study, name), not ingested yet
    made: list[tuple[str, str, str]] = field(default_factory=list)  # (role, study, name) of every submission
    _states: dict[str, Path] = field(default_factory=dict)

    @property
    def daemon(self) -> Account:
        return self.accounts.daemon

    def box(self, study: str, *parts: str) -> Path:
        return self.root.joinpath("dropbox", study, *parts)

    # -- the daemon

    def as_daemon(self, *args: object, expect: int | None = 0, raw_stdout: bool = False
                  ) -> subprocess.CompletedProcess:
        cp = self.accounts.run_as(self.daemon, *args, raw_stdout=raw_stdout)
        assert "Traceback" not in cp.stderr and "internal error" not in cp.stderr, describe(cp)
        if expect is not None:
            assert cp.returncode == expect, describe(cp)
        return cp

    def watch(self) -> subprocess.CompletedProcess:
        """``watch --once``: exit 0, and every submission committed so far ingested."""
        cp = self.as_daemon("watch", "--store", self.root, "--once")
        for study, name in self.committed:
            assert f"ingested {study}/{name} as #" in cp.stdout, describe(cp)
        self.committed = []
        return cp

    def cat(self, study: str, path: str, version: int) -> bytes:
        cp = self.as_daemon("cat", "--store", self.root, "--study", study, path, "--version", version,
                            raw_stdout=True)
        return cp.stdout

    def versions(self, study: str, path: str) -> list[dict]:
        cp = self.as_daemon("versions", "--store", self.root, "--study", study, path, "--json")
        return json.loads(cp.stdout)["versions"]

    def check_every_version(self) -> int:
        """``cat`` as the daemon gives the exact bytes of every version sent, and ``versions``
        lists exactly that many; returns how many versions were read."""
        n = 0
        for study, paths in self.expected.items():
            for path, datas in paths.items():
                assert len(self.versions(study, path)) == len(datas), (study, path)
                for i, data in enumerate(datas, 1):
                    got = self.cat(study, path, i)
                    assert got == data, f"{study}/{path} version {i}: {len(got)} bytes, want {len(data)}"
                    n += 1
        return n

    def fsck(self) -> None:
        cp = self.as_daemon("fsck", "--store", self.root, "--read-data", "--json", expect=None)
        assert cp.returncode == 0 and json.loads(cp.stdout)["findings"] == [], describe(cp)
        for dirpath, dirnames, filenames in os.walk(self.root / "store"):
            for name in dirnames + filenames:
                st = os.lstat(os.path.join(dirpath, name))
                assert st.st_uid == self.daemon.uid, f"{dirpath}/{name}: owned by uid {st.st_uid}"

    # -- the uploaders

    def state(self, who: Account) -> Path:
        """``who``'s client state folder for this server (its known_hosts, cache and locks)."""
        if who.role not in self._states:
            self._states[who.role] = make_dir(self.base / f"state-{who.role}", who, 0o700)
        return self._states[who.role]

    def env(self, who: Account, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"DITTOHEAD_STATE_DIR": str(self.state(who)), **(extra or {})}

    def run(self, who: Account, *args: object, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return self.accounts.run_as(who, *args, input=input, env=self.env(who, env), timeout=120)

    def authorize(self, who: Account, passphrase: str | None = None) -> ClientKey:
        key = make_client_key(who, passphrase=passphrase)
        self.sshd.authorize(who, key)
        if passphrase is None:
            self.keys[who.role] = key
        return key

    def trust_by_file(self, who: Account) -> None:
        self.sshd.write_known_hosts(self.state(who) / "known_hosts", owner=who)

    def trust_host(self, who: Account, *options: str) -> None:
        cp = self.run(who, "trust-host", f"{self.sshd.host}:{self.sshd.port}", *options)
        assert cp.returncode == 0, describe(cp)
        assert f"ssh-ed25519 {self.sshd.fingerprint()} (trusted; recorded in " in cp.stdout, describe(cp)
        assert (self.state(who) / "known_hosts").read_text().split() == \
            self.sshd.known_hosts_line().split()

    def source(self, who: Account, study: str) -> Path:
        path = self.base / f"src-{who.role}-{study}"
        if not path.exists():
            make_dir(path, who, 0o700)
        return path

    def write(self, who: Account, study: str, rel: str, data: bytes) -> None:
        """A file in ``who``'s source for ``study``, written as root and given to ``who``; it is
        expected as a new version once a sync of it succeeds."""
        top = self.source(who, study)
        path = top / rel
        for parent in reversed(path.relative_to(top).parents[:-1]):
            if not (top / parent).exists():
                make_dir(top / parent, who, 0o700)
        path.write_bytes(data)
        os.chown(path, who.uid, who.gid)
        self.pending.setdefault((who.role, study), {})[rel] = data

    def url(self, who: Account, path: str | None = None) -> str:
        return self.sshd.url(who, self.remote if path is None else path)

    def sync(self, who: Account, study: str, *, how: str = "key", path: str | None = None,
             password: str | None = None, env: dict[str, str] | None = None, expect: int = 0,
             options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        """``[OPTIONS] sync SOURCE --study STUDY --to sftp://WHO@HOST:PORT/PATH`` as ``who``,
        signing in ``how``: "key" (--identity, its plain key), "password" (--password-stdin,
        ``password`` or its own), or "none" (nothing on the command line: an agent in ``env``)."""
        args: list[object] = [*options, "sync", self.source(who, study), "--study", study,
                              "--to", self.url(who, path), "--site", SITE, "--timeout", "20"]
        stdin = None
        if how == "key":
            args += ["--identity", self.keys[who.role].private]
        elif how == "password":
            args.append("--password-stdin")
            stdin = (password if password is not None else self.accounts.passwords[who.name]) + "\n"
        else:
            assert how == "none", how
        cp = self.run(who, *args, input=stdin, env=env)
        assert cp.returncode == expect and "Traceback" not in cp.stderr, describe(cp)
        if expect == 0:
            m = SUBMISSION_RE.search(cp.stdout)
            assert m, describe(cp)
            self.committed.append((study, m.group(1)))
            self.made.append((who.role, study, m.group(1)))
            for rel, data in self.pending.pop((who.role, study), {}).items():
                versions = self.expected.setdefault(study, {}).setdefault(rel, [])
                if not versions or versions[-1] != data:
                    versions.append(data)
        return cp


def submission(cp: subprocess.CompletedProcess) -> str:
    m = SUBMISSION_RE.search(cp.stdout)
    assert m, describe(cp)
    return m.group(1)


def one_line(cp: subprocess.CompletedProcess) -> str:
    """The single line a failing command prints (stderr), nothing on stdout."""
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and cp.stdout.strip() == "", describe(cp)
    return lines[0]


def init_root(site: Site) -> None:
    a = site.accounts
    site.as_daemon("init", "--store", site.root)
    site.as_daemon("study", "add", "s", "--store", site.root)
    site.as_daemon("study", "add", "g", "--store", site.root, "--uploaders", a.ga.name)
    site.as_daemon("study", "add", "h", "--store", site.root, "--uploaders", a.gb.name)


# -- raw SFTP as an account: paramiko alone ---------------------------------------------------

# argv[1]: JSON {port, user, key, known_hosts, ops: [[label, op, path, *args], ...]}. Signs in
# with the key, trusting only the known_hosts file; runs each op in order; prints, for each label,
# ["ok", value] or [the exception's class, its message].
RAW_SFTP = r"""
import json, sys, paramiko
cfg = json.loads(sys.argv[1])
c = paramiko.SSHClient()
c.load_host_keys(cfg["known_hosts"])
c.set_missing_host_key_policy(paramiko.RejectPolicy())
c.connect("127.0.0.1", cfg["port"], username=cfg["user"], key_filename=cfg["key"],
          look_for_keys=False, allow_agent=False, timeout=10)
s = c.open_sftp()

def read(p):
    with s.open(p, "rb") as f:
        return len(f.read())

def write(p, data="forged by the attacker"):
    with s.open(p, "wb") as f:
        f.write(data.encode())
    return None

def overwrite(p):
    with s.open(p, "r+b") as f:
        f.write(b"forged")
        f.flush()

OPS = {
    "normalize": s.normalize,
    "listdir": lambda p: sorted(s.listdir(p)),
    "stat": lambda p: oct(s.stat(p).st_mode),
    "lstat": lambda p: oct(s.lstat(p).st_mode),
    "read": read,
    "write": write,
    "overwrite": overwrite,
    "truncate": lambda p: s.truncate(p, 0),
    "mkdir": lambda p, mode=0o750: s.mkdir(p, mode),
    "rmdir": s.rmdir,
    "remove": s.remove,
    "rename": s.rename,
    "posix_rename": s.posix_rename,
    "chmod": s.chmod,
    "symlink": lambda p, target: s.symlink(target, p),
}
out = {}
for label, op, *args in cfg["ops"]:
    try:
        out[label] = ["ok", OPS[op](*args)]
    except OSError as e:
        out[label] = [type(e).__name__, str(e)]
c.close()
print(json.dumps(out))
"""

DENIED = "PermissionError"
NOT_FOUND = "FileNotFoundError"
OK = "ok"


def raw_sftp(site: Site, who: Account, ops: list[tuple]) -> dict[str, list]:
    """Run ``ops`` (label, expected, op, path, *args) as ``who`` over raw SFTP; assert each
    label's outcome is the expected one (an exception class's name, or "ok"); the results."""
    labels = [op[0] for op in ops]
    assert len(set(labels)) == len(labels), "labels must be unique"
    cfg = {"port": site.sshd.port, "user": who.name, "key": str(site.keys[who.role].private),
           "known_hosts": str(site.state(who) / "known_hosts"),
           "ops": [[label, op, *(str(x) if isinstance(x, Path) else x for x in args)]
                   for label, _, op, *args in ops]}
    cp = site.accounts.python_as(who, RAW_SFTP, json.dumps(cfg), timeout=60)
    assert cp.returncode == 0, describe(cp)
    got = json.loads(cp.stdout)
    want = {label: expected for label, expected, *_ in ops}
    seen = {label: got[label][0] for label in labels}
    wrong = {label: got[label] for label in labels if seen[label] != want[label]}
    assert seen == want, f"unexpected outcomes (label: [outcome, detail]): {json.dumps(wrong, indent=1)}"
    return got


# -- the shared, unchrooted server root --------------------------------------------------------


STAGE_A = ".20261129T000000Z-aaaaaaaaaaaa"  # up_a's staging folder in s's inbox (world)


def _big_v1() -> bytes:
    return os.urandom(21 * MiB + 12345)


@pytest.fixture(scope="module")
def world(ssh_accounts: Accounts, sshd_server: Sshd) -> Iterator[Site]:
    """A server root the daemon made (studies s, g for GA, h for GB), reached over
    ``sshd_server`` at its real path. Round 1 is sent (up_a to s and g, up_b to s and h) and
    ingested; round 2 of up_a to s is committed and left in the inbox; up_a also has a staging
    folder there (as an interrupted sync leaves it)."""
    a = ssh_accounts
    base = Path(tempfile.mkdtemp(prefix="dittohead-acct-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        srv = make_dir(base / "srv", a.daemon, 0o755)
        site = Site(a, sshd_server, srv / "root", base, str(srv / "root"))
        init_root(site)
        for who in (a.up_a, a.up_b):
            site.authorize(who)
        site.trust_by_file(a.up_a)
        site.trust_host(a.up_b)

        big = _big_v1()
        site.write(a.up_a, "s", "eye/rec01.edf", big)
        site.write(a.up_a, "s", "empty.txt", b"")
        site.write(a.up_a, "s", "notes/subj01.txt", b"subject 1, block A\n")
        site.write(a.up_a, "s", "becomes-empty.csv", b"t,x\n0,1\n")
        name = submission(site.sync(a.up_a, "s"))
        packs = [n for n in os.listdir(site.box("s", "inbox", name)) if n.endswith(".pack")]
        assert len(packs) >= 2, packs  # the big file spans packs
        site.write(a.up_a, "g", "plan.txt", b"group study, up_a only\n")
        site.sync(a.up_a, "g")
        site.write(a.up_b, "s", "biopac/s02.acq", b"\x00\x01" * 4000)
        site.sync(a.up_b, "s")
        site.write(a.up_b, "h", "h.txt", b"group study, up_b only\n")
        site.sync(a.up_b, "h")
        site.watch()

        # Round 2: new versions, committed, not ingested yet.
        big2 = bytearray(big)
        big2[10 * MiB : 10 * MiB + 4096] = os.urandom(4096)
        site.write(a.up_a, "s", "eye/rec01.edf", bytes(big2) + os.urandom(100_000))
        site.write(a.up_a, "s", "empty.txt", b"no longer empty\n")
        site.write(a.up_a, "s", "notes/subj01.txt", b"subject 1, block A, redone\n")
        site.write(a.up_a, "s", "becomes-empty.csv", b"")
        site.sync(a.up_a, "s")

        # up_a's staging folder, made over SFTP as a sync makes it.
        raw_sftp(site, a.up_a, [
            ("mkdir", OK, "mkdir", site.box("s", "inbox", STAGE_A), 0o750),
            ("put", OK, "write", site.box("s", "inbox", STAGE_A, "upload-1")),
        ])
        yield site
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(base)], check=True)


# -- an uploader over SFTP ---------------------------------------------------------------------


def test_sync_over_sftp_and_who_a_study_admits(world: Site) -> None:
    """Both uploaders' syncs (round 1) were ingested; a study added for a group admits only its
    members: another uploader's sync ends with exit 1 and one line, and leaves nothing there."""
    site, a = world, world.accounts
    for study, who in (("g", a.up_a), ("h", a.up_b)):
        log = json.loads(site.as_daemon("log", "--store", site.root, "--study", study, "--json").stdout)
        assert [(s["name"], s["user"]) for s in log["submissions"]] == \
            [(n, who.name) for role, st, n in site.made if st == study and role == who.role]
    for who, study in ((a.up_b, "g"), (a.up_a, "h")):
        site.write(who, study, "refused.txt", b"not admitted\n")
        before = tree(site.box(study))
        cp = site.sync(who, study, expect=1)
        line = one_line(cp)
        assert f"study {study!r} does not admit this account" in line, describe(cp)
        assert tree(site.box(study)) == before
        assert not [n for n in os.listdir(site.box(study, "inbox"))
                    if os.lstat(site.box(study, "inbox", n)).st_uid == who.uid]
    assert {role for role, st, _ in site.made if st == "s"} == {a.up_a.role, a.up_b.role}


def test_an_uploader_over_sftp_reaches_nothing_it_must_not(world: Site) -> None:
    """up_b, signed in over SFTP with paramiko, tries to read and change what is not its own:
    each attempt fails, and the store and the drop box are unchanged afterwards but for its own
    staging folder. A few things it may do work (so the failures are the server's answers, not
    a dead session)."""
    site, a = world, world.accounts
    b = a.up_b
    inbox = site.box("s", "inbox")
    a2 = next(n for role, st, n in site.made if (role, st) == (a.up_a.role, "s") and (inbox / n).exists())
    stage_a = inbox / STAGE_A
    assert (stage_a / "upload-1").exists()
    store = site.root / "store"
    pack = next((store / "packs").rglob("*.pack"))
    [seg_s, *_] = sorted(os.listdir(site.box("s", "have")))
    [seg_g, *_] = sorted(os.listdir(site.box("g", "have")))
    [receipt_g] = os.listdir(site.box("g", "receipts"))
    [receipt_h] = os.listdir(site.box("h", "receipts"))
    [b_sub] = [n for role, st, n in site.made if role == b.role and st == "s"]
    assert (site.box("s", "receipts") / b_sub).is_file()
    mine = inbox / ".20261129T000001Z-bbbbbbbbbbbb"

    before_root = tree(site.root)
    before_store = store_snapshot(site.root)
    ops: list[tuple] = [
        # What it may do (docs/server-root.md): its own staging folder, the have-segments and
        # its own receipt in a study that admits it, a submission's entry by name.
        ("own staging: mkdir", OK, "mkdir", mine, 0o750),
        ("own staging: write", OK, "write", mine / "upload-1"),
        ("s/have: read a segment", OK, "read", site.box("s", "have", seg_s)),
        ("s/receipts: read its own", OK, "read", site.box("s", "receipts", b_sub)),
        ("s/inbox: lstat up_a's submission by name", OK, "lstat", inbox / a2),
        # Listing the inbox, reading another's submission or staging folder.
        ("s/inbox: listdir", DENIED, "listdir", inbox),
        ("up_a's submission: listdir", DENIED, "listdir", inbox / a2),
        ("up_a's submission: stat manifest", DENIED, "stat", inbox / a2 / fmt.MANIFEST_NAME),
        ("up_a's submission: read manifest", DENIED, "read", inbox / a2 / fmt.MANIFEST_NAME),
        ("up_a's staging: listdir", DENIED, "listdir", stage_a),
        ("up_a's staging: read", DENIED, "read", stage_a / "upload-1"),
        # The store.
        ("store: listdir", DENIED, "listdir", store),
        ("store: stat config", DENIED, "stat", store / "config"),
        ("store: read config", DENIED, "read", store / "config"),
        ("store: read a pack", DENIED, "read", pack),
        ("store: listdir packs", DENIED, "listdir", store / "packs"),
        # The daemon's own folders, and another study's have-segments and receipts.
        ("s: listdir", DENIED, "listdir", site.box("s")),
        ("s/receipts: listdir", DENIED, "listdir", site.box("s", "receipts")),
        *[(f"s/{part}: listdir", DENIED, "listdir", site.box("s", part))
          for part in ("processing", "done", "failed")],
        ("g: listdir", DENIED, "listdir", site.box("g")),
        ("g/have: listdir", DENIED, "listdir", site.box("g", "have")),
        ("g/have: stat a segment", DENIED, "stat", site.box("g", "have", seg_g)),
        ("g/have: read a segment", DENIED, "read", site.box("g", "have", seg_g)),
        ("g/receipts: read up_a's receipt", DENIED, "read", site.box("g", "receipts", receipt_g)),
        ("g/inbox: listdir", DENIED, "listdir", site.box("g", "inbox")),
        # Writing into another's staging or committed folder.
        ("up_a's staging: create a file", DENIED, "write", stage_a / ("0" * 64 + ".pack")),
        ("up_a's staging: overwrite a file", DENIED, "overwrite", stage_a / "upload-1"),
        ("up_a's staging: truncate a file", DENIED, "truncate", stage_a / "upload-1"),
        ("up_a's staging: remove a file", DENIED, "remove", stage_a / "upload-1"),
        ("up_a's staging: commit it", DENIED, "posix_rename", stage_a, inbox / STAGE_A[1:]),
        ("up_a's staging: rmdir", DENIED, "rmdir", stage_a),
        ("up_a's submission: create a file", DENIED, "write", inbox / a2 / ("f" * 64 + ".pack")),
        ("up_a's submission: overwrite manifest", DENIED, "overwrite", inbox / a2 / fmt.MANIFEST_NAME),
        ("up_a's submission: truncate manifest", DENIED, "truncate", inbox / a2 / fmt.MANIFEST_NAME),
        ("up_a's submission: remove manifest", DENIED, "remove", inbox / a2 / fmt.MANIFEST_NAME),
        # Renaming or removing another's submission: the inbox is sticky.
        ("up_a's submission: rename", DENIED, "posix_rename", inbox / a2, inbox / (a2 + "-x")),
        ("up_a's submission: rename (SSH_FXP_RENAME)", DENIED, "rename", inbox / a2, inbox / (a2 + "-y")),
        ("up_a's submission: hide", DENIED, "posix_rename", inbox / a2, inbox / ("." + a2)),
        ("up_a's submission: replace with its own", DENIED, "posix_rename", mine, inbox / a2),
        ("up_a's submission: rmdir", DENIED, "rmdir", inbox / a2),
        ("up_a's submission: chmod", DENIED, "chmod", inbox / a2, 0o777),
        ("s/inbox: chmod", DENIED, "chmod", inbox, 0o777),
        # Writing anywhere the daemon keeps.
        ("s/have: create", DENIED, "write", site.box("s", "have", "9" * 16 + fmt.HAVE_SUFFIX)),
        ("s/have: overwrite a segment", DENIED, "overwrite", site.box("s", "have", seg_s)),
        ("s/have: remove a segment", DENIED, "remove", site.box("s", "have", seg_s)),
        ("s/have: chmod", DENIED, "chmod", site.box("s", "have"), 0o777),
        ("s/receipts: create", DENIED, "write", site.box("s", "receipts", a2)),
        ("s/receipts: overwrite its own", DENIED, "overwrite", site.box("s", "receipts", b_sub)),
        *[(f"s/{part}: create", DENIED, "write", site.box("s", part, "evil"))
          for part in ("processing", "done", "failed")],
        ("s/processing: mkdir", DENIED, "mkdir", site.box("s", "processing", a2)),
        ("s: create", DENIED, "write", site.box("s", "evil")),
        ("g/inbox: mkdir", DENIED, "mkdir", site.box("g", "inbox", ".20261129T000002Z-bbbbbbbbbbbb")),
        ("g/receipts: create", DENIED, "write", site.box("g", "receipts", "evil")),
        ("h/receipts: overwrite its own", DENIED, "overwrite", site.box("h", "receipts", receipt_h)),
        ("store: create", DENIED, "write", store / "evil"),
        ("store: mkdir", DENIED, "mkdir", store / "packs" / "zz"),
        ("store: overwrite config", DENIED, "overwrite", store / "config"),
        ("dropbox: listdir (the studies' names)", DENIED, "listdir", site.root / "dropbox"),
        ("dropbox: create", DENIED, "write", site.root / "dropbox" / "evil"),
        ("dropbox: mkdir a study", DENIED, "mkdir", site.root / "dropbox" / "evil"),
        ("ROOT: create", DENIED, "write", site.root / "evil"),
        ("ROOT: mkdir", DENIED, "mkdir", site.root / "evil"),
        ("ROOT: rename store", DENIED, "posix_rename", store, site.root / "store2"),
    ]
    raw_sftp(site, b, ops)

    assert store_snapshot(site.root) == before_store
    after = tree(site.root)
    new = {k: v for k, v in after.items() if before_root.get(k) != v}
    gone = set(before_root) - set(after)
    mine_rel = str(mine.relative_to(site.root))
    assert not gone, gone
    assert set(new) == {mine_rel, f"{mine_rel}/upload-1"}, sorted(new)  # (folders' times left out)
    assert all(after[k][2] == b.uid for k in (mine_rel, f"{mine_rel}/upload-1"))


# -- signing in ------------------------------------------------------------------------------


def _accepted(site: Site, who: Account, since: int) -> list[str]:
    """sshd's "Accepted ..." lines for ``who`` after ``since``."""
    return re.findall(rf"Accepted (\S+) for {re.escape(who.name)} from 127\.0\.0\.1 port \d+ ssh2(?:: (\S+) (\S+))?",
                      site.sshd.log()[since:])


def test_sign_in_with_a_password(world: Site) -> None:
    site, up = world, world.accounts.up_a
    site.write(up, "s", "signin.txt", b"signed in with a password\n")
    since = site.sshd.log_size()
    cp = site.sync(up, "s", how="password", options=("-vv",))
    assert len(cp.stderr.splitlines()) > 1, describe(cp)  # -vv logs the sign-in
    assert site.accounts.passwords[up.name] not in cp.stdout + cp.stderr
    assert _accepted(site, up, since) == [("password", "", "")]


def test_sign_in_with_a_key_when_the_account_also_has_a_password(world: Site) -> None:
    site, up = world, world.accounts.up_a
    assert up.name in site.accounts.passwords
    site.write(up, "s", "signin.txt", b"signed in with a key\n")
    since = site.sshd.log_size()
    site.sync(up, "s", how="key")
    assert _accepted(site, up, since) == [("publickey", "ED25519", site.keys[up.role].fingerprint)]
    assert "password" not in site.sshd.log()[since:]


def test_sign_in_with_an_encrypted_key_through_an_agent(world: Site, ssh_agent: Any) -> None:
    site, up = world, world.accounts.up_a
    key = site.authorize(up, passphrase="agent phrase " + secrets.token_hex(4))
    # Without the agent and without a terminal, the encrypted key cannot be used: one line.
    site.write(up, "s", "signin.txt", b"signed in through an agent\n")
    cp = site.run(up, "sync", site.source(up, "s"), "--study", "s", "--to", site.url(up),
                  "--identity", key.private)
    assert cp.returncode == 2 and "ssh-agent" in one_line(cp), describe(cp)

    agent = ssh_agent(up)
    agent.add(key)
    since = site.sshd.log_size()
    site.sync(up, "s", how="none", env=agent.env)
    assert _accepted(site, up, since) == [("publickey", "ED25519", key.fingerprint)]


def test_a_wrong_password_fails_in_one_line_and_is_never_shown(world: Site) -> None:
    site, up = world, world.accounts.up_a
    wrong = "wrong-" + secrets.token_urlsafe(12)
    site.write(up, "s", "signin.txt", b"never sent: the password is wrong\n")
    inbox = sorted(os.listdir(site.box("s", "inbox")))
    since = site.sshd.log_size()
    cp = site.sync(up, "s", how="password", password=wrong, expect=1)
    line = one_line(cp)
    assert f"cannot sign in as {up.name}" in line and "a password" in line, describe(cp)
    verbose = site.sync(up, "s", how="password", password=wrong, expect=1, options=("-vv",))
    assert len(verbose.stderr.splitlines()) > 1, describe(verbose)  # -vv did log more
    for run in (cp, verbose):
        assert wrong not in run.stdout + run.stderr, describe(run)
    assert wrong not in site.sshd.log()
    assert len(re.findall(rf"Failed password for {re.escape(up.name)} ", site.sshd.log()[since:])) == 2
    assert _accepted(site, up, since) == []
    assert sorted(os.listdir(site.box("s", "inbox"))) == inbox


# -- the daemon ------------------------------------------------------------------------------


def test_the_daemon_ingests_everything_sent_over_sftp(world: Site) -> None:
    """``watch --once`` as the daemon ingests every submission the uploaders committed over
    SFTP; ``cat`` gives the exact bytes of every version (two or more of several files, a file
    over 20 MiB spanning packs, an empty file); fsck finds nothing."""
    site = world
    assert site.committed, "round 2 is committed and waiting"
    site.watch()
    for study in ("s", "g", "h"):
        left = [n for n in os.listdir(site.box(study, "inbox")) if not n.startswith(".")]
        assert left == [] and os.listdir(site.box(study, "processing")) == [], (study, left)
        assert os.listdir(site.box(study, "failed")) == [], study
    s = site.expected["s"]
    assert len(s["eye/rec01.edf"]) == 2 and all(len(d) > 20 * MiB for d in s["eye/rec01.edf"])
    assert s["empty.txt"][0] == b"" and s["becomes-empty.csv"][-1] == b""
    assert site.check_every_version() >= 11  # rounds 1 and 2; the sign-in tests add more
    site.fsck()


# -- uploaders chrooted by sshd ----------------------------------------------------------------


def test_chrooted_uploaders(dropbox_sshd: DropboxSshd, ssh_accounts: Accounts, acct_dir: Path) -> None:
    """ROOT is root's (for ChrootDirectory), the daemon makes the store and studies inside it;
    up_a and up_b sign in chrooted (``internal-sftp -d /dropbox``) and sync with
    ``sftp://USER@HOST:PORT/`` and ``.../dropbox``; a chrooted uploader sees nothing outside
    ROOT and cannot enter /store; the daemon ingests it all, and fsck accepts the root-owned
    ROOT."""
    a = ssh_accounts
    site = Site(a, dropbox_sshd.sshd, dropbox_sshd.root, acct_dir, "/")
    init_root(site)
    assert (os.stat(site.root).st_uid, stat.S_IMODE(os.stat(site.root).st_mode)) == (0, 0o755)
    for who in (a.up_a, a.up_b):
        site.authorize(who)

    # A server not seen before: refused without a terminal, with the command that trusts it.
    site.write(a.up_a, "s", "eprime/subj01.txt", b"subject 1\n")
    site.write(a.up_a, "s", "empty.dat", b"")
    site.write(a.up_a, "s", "eye/rec.edf", os.urandom(3 * MiB + 7))
    cp = site.sync(a.up_a, "s", expect=1)
    line = one_line(cp)
    assert "unknown host key" in line and site.sshd.fingerprint() in line, describe(cp)
    assert f"dittohead trust-host {site.sshd.host}:{site.sshd.port}" in line, describe(cp)
    site.trust_host(a.up_a, "--fingerprint", site.sshd.fingerprint())  # as the admin gave it
    site.trust_by_file(a.up_b)

    since = site.sshd.log_size()
    first = site.sync(a.up_a, "s")  # sftp://up_a@127.0.0.1:PORT/
    site.sshd.wait_for_log(rf'Changed root directory to "{re.escape(str(site.root))}"', since)
    site.write(a.up_a, "g", "plan.txt", b"group study, up_a only\n")
    site.sync(a.up_a, "g", path="/dropbox")
    site.write(a.up_b, "s", "biopac/s02.acq", b"\x02\x03" * 5000)
    site.sync(a.up_b, "s", how="password", path="/dropbox")
    site.write(a.up_b, "g", "refused.txt", b"not admitted\n")
    g_before = tree(site.box("g"))
    cp = site.sync(a.up_b, "g", expect=1)
    assert "study 'g' does not admit this account" in one_line(cp), describe(cp)
    assert tree(site.box("g")) == g_before

    a1 = submission(first)
    before = tree(site.root)
    got = raw_sftp(site, a.up_b, [
        ("start", OK, "normalize", "."),
        ("ls /", OK, "listdir", "/"),
        ("ls /..", OK, "listdir", "/.."),
        ("stat /etc/passwd", NOT_FOUND, "stat", "/etc/passwd"),
        ("read /etc/passwd", NOT_FOUND, "read", "/etc/passwd"),
        ("stat ROOT's real path", NOT_FOUND, "stat", site.root / "store"),
        ("ls /store", DENIED, "listdir", "/store"),
        ("stat /store/config", DENIED, "stat", "/store/config"),
        ("read /store/config", DENIED, "read", "/store/config"),
        ("mkdir /store/x", DENIED, "mkdir", "/store/x"),
        ("ls /dropbox (the studies' names)", DENIED, "listdir", "/dropbox"),
        ("ls . (the start: /dropbox)", DENIED, "listdir", "."),
        ("ls /dropbox/s/inbox", DENIED, "listdir", "/dropbox/s/inbox"),
        ("ls s/inbox (relative)", DENIED, "listdir", "s/inbox"),
        ("read up_a's manifest", DENIED, "read", f"/dropbox/s/inbox/{a1}/{fmt.MANIFEST_NAME}"),
        ("rename up_a's submission", DENIED, "posix_rename", f"/dropbox/s/inbox/{a1}", f"/dropbox/s/inbox/.{a1}"),
        ("ls /dropbox/g", DENIED, "listdir", "/dropbox/g"),
        ("write /", DENIED, "write", "/evil"),
        ("mkdir /", DENIED, "mkdir", "/evil"),
        ("write /dropbox", DENIED, "write", "/dropbox/evil"),
        ("write s/have", DENIED, "write", "/dropbox/s/have/evil"),
        ("symlink in /dropbox", DENIED, "symlink", "/dropbox/evil", "/etc/passwd"),
    ])
    assert got["start"] == ["ok", "/dropbox"]
    assert got["ls /"] == ["ok", ["dropbox", "store"]] and got["ls /.."] == got["ls /"]
    assert tree(site.root) == before

    site.watch()
    # Again through /dropbox: another destination to the client (a cache of its own), so it
    # lists every file again; only the changed one becomes a new version.
    site.write(a.up_a, "s", "eprime/subj01.txt", b"subject 1, redone\n")
    site.write(a.up_a, "s", "empty.dat", b"filled in\n")
    site.sync(a.up_a, "s", path="/dropbox")
    site.watch()
    assert site.check_every_version() == 7
    site.fsck()
