"""The real-accounts infrastructure (tests/accounts.py) does what the cross-account tests rely on:
each child runs with exactly its account's uid, gid and groups, in a clean environment, and the
kernel's permission checks apply to it (root's would not)."""

from __future__ import annotations

import grp
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from accounts import Account, Accounts, make_dir

IDENTITY = """
import json, os, pwd
print(json.dumps({
    "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "egid": os.getegid(),
    "groups": sorted(os.getgroups()), "name": pwd.getpwuid(os.getuid()).pw_name,
    "umask": os.umask(0), "cwd": os.getcwd(), "env": dict(os.environ),
}))
"""


def roles(accounts: Accounts) -> list[Account]:
    return [accounts.daemon, accounts.up_a, accounts.up_b, accounts.reader]


def test_each_account_runs_as_itself(accounts: Accounts, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DITTOHEAD_STORE", "/nonexistent/store")  # must not leak into children
    seen_uids = set()
    for acct in roles(accounts):
        cp = accounts.python_as(acct, IDENTITY)
        assert cp.returncode == 0, (acct.role, cp.stderr)
        got = json.loads(cp.stdout)
        assert (got["uid"], got["euid"], got["name"]) == (acct.uid, acct.uid, acct.name)
        assert (got["gid"], got["egid"]) == (acct.gid, acct.gid)
        assert got["groups"] == sorted(acct.groups)
        assert got["umask"] == 0o022
        assert got["cwd"] == str(acct.home)
        env = got["env"]
        assert env["HOME"] == str(acct.home) and env["DITTOHEAD_STATE_DIR"] == str(acct.state)
        assert env["PATH"] == "/usr/sbin:/usr/bin:/sbin:/bin" and env["LANG"] == "C.UTF-8"
        assert "DITTOHEAD_STORE" not in env
        st = os.stat(acct.home)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (acct.uid, 0o700)
        seen_uids.add(acct.uid)
    assert 0 not in seen_uids and len(seen_uids) == 4


def test_group_membership(accounts: Accounts) -> None:
    daemon, up_a, up_b = accounts.daemon, accounts.up_a, accounts.up_b
    assert daemon.gid == accounts.gd.gid
    assert accounts.ga.gid in daemon.groups and accounts.gb.gid in daemon.groups
    assert (up_a.gid, up_b.gid) == (accounts.ga.gid, accounts.gb.gid)
    for uploader in (up_a, up_b):
        assert accounts.gd.gid not in uploader.groups
    assert accounts.gb.gid not in up_a.groups and accounts.ga.gid not in up_b.groups
    assert set(accounts.reader.groups) == {accounts.reader.gid}
    # as the system sees it, not only as the Account objects say
    assert daemon.name in grp.getgrgid(accounts.ga.gid).gr_mem
    assert daemon.name in grp.getgrgid(accounts.gb.gid).gr_mem
    assert grp.getgrgid(accounts.gd.gid).gr_mem == []


def test_kernel_checks_apply(accounts: Accounts, acct_dir: Path) -> None:
    private = acct_dir / "private"
    private.mkdir(mode=0o700)
    (private / "secret").write_text("x")
    os.chmod(private, 0o700)
    listdir = "import os, sys; print(sorted(os.listdir(sys.argv[1])))"
    # the base dir itself is open to the accounts (so a failure below is the folder's mode)
    cp = accounts.python_as(accounts.up_a, listdir, acct_dir)
    assert cp.returncode == 0 and "private" in cp.stdout, cp.stderr
    cp = accounts.python_as(accounts.up_a, listdir, private)
    assert cp.returncode != 0 and "PermissionError" in cp.stderr, (cp.stdout, cp.stderr)
    # a folder of the daemon's group, 0770: the daemon gets in, an uploader does not
    shared = make_dir(acct_dir / "shared", accounts.daemon, 0o770)
    assert accounts.python_as(accounts.daemon, listdir, shared).returncode == 0
    assert accounts.python_as(accounts.up_b, listdir, shared).returncode != 0


def test_files_an_account_creates_are_its_own(accounts: Accounts, acct_dir: Path) -> None:
    make = "import os, sys; os.mkdir(sys.argv[1] + '/d'); open(sys.argv[1] + '/f', 'w').close()"
    for acct in (accounts.daemon, accounts.up_a):
        where = make_dir(acct_dir / acct.role, acct, 0o755)
        assert stat.S_IMODE(os.stat(where).st_mode) == 0o755
        cp = accounts.python_as(acct, make, where)
        assert cp.returncode == 0, cp.stderr
        for name, mode in (("d", 0o755), ("f", 0o644)):
            st = os.stat(where / name)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (acct.uid, acct.gid, mode)
    # the daemon may hand a folder to an uploaders' group (it is a member), an uploader may not
    chgrp = "import os, sys; os.chown(sys.argv[1], -1, int(sys.argv[2]))"
    study = acct_dir / "daemon" / "d"
    assert accounts.python_as(accounts.daemon, chgrp, study, accounts.ga.gid).returncode == 0
    assert os.stat(study).st_gid == accounts.ga.gid
    theirs = acct_dir / "upa" / "d"
    assert accounts.python_as(accounts.up_a, chgrp, theirs, accounts.gd.gid).returncode != 0


def test_the_cli_runs_as_each_account(accounts: Accounts) -> None:
    for acct in roles(accounts):
        cp = accounts.run_as(acct, "--help")
        assert cp.returncode == 0 and "sync" in cp.stdout, (acct.role, cp.stdout, cp.stderr)


def test_stdin_and_spawn(accounts: Accounts, acct_dir: Path) -> None:
    echo = "import sys; sys.stdout.write(sys.stdin.read())"
    assert accounts.python_as(accounts.reader, echo).stdout == ""  # /dev/null
    assert (
        accounts.python_as(accounts.reader, echo, input="h\u00e9 \u2713").stdout == "h\u00e9 \u2713"
    )
    p = accounts.spawn_as(accounts.daemon, "--help", stdout=subprocess.PIPE)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and b"sync" in out
