"""The drop box with real accounts: a non-root daemon takes what other accounts send, and nothing
an uploader does can stop it or reach past it.

Every test here runs each side as its own account (tests/accounts.py): the daemon (no root, no
capabilities) makes and owns the server root and runs init, study add, watch, fsck and the read
commands; two uploaders in two groups run sync, and attack scripts of their own. Root only sets
up folders and looks at the result.
"""

from __future__ import annotations

import grp
import json
import os
import re
import signal
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from accounts import Account, Accounts, make_dir
from conftest import SUBMISSION_RE, store_snapshot

from dittohead import format as fmt
from dittohead.store.layout import ServerRoot

SITE = "lab-1"


@dataclass
class Deployment:
    accounts: Accounts
    base: Path
    root: Path
    sources: dict[str, Path] = field(default_factory=dict)  # role -> source folder

    @property
    def daemon(self) -> Account:
        return self.accounts.daemon

    def box(self, study: str, part: str = "") -> Path:
        return self.root / "dropbox" / study / part if part else self.root / "dropbox" / study

    def as_daemon(self, *args: object, expect: int | None = 0) -> subprocess.CompletedProcess:
        cp = self.accounts.run_as(self.daemon, *args)
        assert "Traceback" not in cp.stderr and "internal error" not in cp.stderr, describe(cp)
        if expect is not None:
            assert cp.returncode == expect, describe(cp)
        return cp

    def watch(self, expect: int | None = 0) -> subprocess.CompletedProcess:
        return self.as_daemon("watch", "--store", self.root, "--once", expect=expect)

    def source(self, who: Account) -> Path:
        if who.role not in self.sources:
            self.sources[who.role] = make_dir(self.base / f"src-{who.role}", who, 0o700)
        return self.sources[who.role]

    def write(self, who: Account, rel: str, data: bytes) -> None:
        """A file in ``who``'s source folder, written as root, then given to ``who``."""
        path = self.source(who) / rel
        for parent in reversed(path.relative_to(self.source(who)).parents[:-1]):
            d = self.source(who) / parent
            if not d.exists():
                make_dir(d, who, 0o700)
        path.write_bytes(data)
        os.chown(path, who.uid, who.gid)

    def sync(self, who: Account, study: str = "s", expect: int = 0) -> subprocess.CompletedProcess:
        cp = self.accounts.run_as(who, "sync", self.source(who), "--study", study, "--to", self.root,
                                  "--site", SITE)
        assert cp.returncode == expect and "Traceback" not in cp.stderr, describe(cp)
        return cp

    def submit(self, who: Account, study: str = "s") -> str:
        m = SUBMISSION_RE.search(self.sync(who, study).stdout)
        assert m, "sync made no submission"
        return m.group(1)

    def cat(self, study: str, path: str, version: int | None = None) -> bytes:
        args = ["cat", "--store", self.root, "--study", study, path]
        if version is not None:
            args += ["--version", str(version)]
        cp = self.accounts.run_as(self.daemon, *args, raw_stdout=True)
        assert cp.returncode == 0, cp.stderr
        return cp.stdout

    def log(self, study: str = "s") -> list[dict]:
        return json.loads(self.as_daemon("log", "--store", self.root, "--study", study, "--json").stdout)["submissions"]

    def committed(self, study: str = "s") -> list[bytes]:
        """Committed entries of the inbox (no leading dot), as root sees them."""
        return sorted(n for n in os.listdir(os.fsencode(self.box(study, "inbox"))) if not n.startswith(b"."))

    def assert_sound(self) -> None:
        """fsck --read-data as the daemon finds nothing (the permission model included), and
        nothing under store/ belongs to anyone but the daemon."""
        cp = self.as_daemon("fsck", "--store", self.root, "--read-data", "--json", expect=None)
        doc = json.loads(cp.stdout)
        assert cp.returncode == 0 and doc["findings"] == [], describe(cp)
        for dirpath, dirnames, filenames in os.walk(self.root / "store"):
            for name in dirnames + filenames:
                st = os.lstat(os.path.join(dirpath, name))
                assert st.st_uid == self.daemon.uid, f"{dirpath}/{name}: owned by uid {st.st_uid}"


def describe(cp: subprocess.CompletedProcess) -> str:
    return f"args={cp.args!r}\nexit={cp.returncode}\nstdout={cp.stdout!r}\nstderr={cp.stderr!r}"


@pytest.fixture
def dep(accounts: Accounts, acct_dir: Path) -> Deployment:
    """A server root made by the daemon: study s open to every account, study g to group ga
    (up_a) only."""
    srv = make_dir(acct_dir / "srv", accounts.daemon, 0o755)
    d = Deployment(accounts, acct_dir, srv / "root")
    d.as_daemon("init", "--store", d.root)
    d.as_daemon("study", "add", "s", "--store", d.root)
    d.as_daemon("study", "add", "g", "--store", d.root, "--uploaders", accounts.ga.name)
    return d


def _attacker(dep: Deployment, who: Account, code: str, *args: object) -> subprocess.Popen:
    p = dep.accounts.spawn_python_as(who, code, *args)
    line = p.stdout.readline()
    assert line.strip() == "ready", (line, p.stderr.read() if p.poll() is not None else "")
    return p


def _finish(p: subprocess.Popen) -> dict:
    out, err = p.communicate("go\n", timeout=60)
    assert p.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


# -- the deployment works as documented ----------------------------------------------------------


def test_the_deployment_works_with_real_accounts(dep: Deployment) -> None:
    a, b = dep.accounts.up_a, dep.accounts.up_b
    big = os.urandom(3 * 1024 * 1024 + 12345)
    dep.write(a, "eprime/subj01.txt", b"subject 1, block A\n")
    dep.write(a, "eye/rec01.edf", big)
    dep.write(b, "biopac/s02.acq", b"\x00\x01" * 4000)
    name_a = dep.submit(a)
    name_b = dep.submit(b)
    name_g = dep.submit(a, "g")
    # Only group ga submits to g: up_b is told so, in one line, and leaves nothing there.
    cp = dep.sync(b, "g", expect=1)
    assert "does not admit this account" in cp.stderr and len(cp.stderr.strip().splitlines()) == 1, describe(cp)

    out = dep.watch().stdout
    for study, name in (("s", name_a), ("s", name_b), ("g", name_g)):
        assert f"ingested {study}/{name} as #" in out, out
    assert dep.cat("s", "eye/rec01.edf") == big
    assert dep.cat("s", "biopac/s02.acq") == b"\x00\x01" * 4000
    assert dep.cat("g", "eprime/subj01.txt") == b"subject 1, block A\n"
    for study in ("s", "g"):
        assert dep.committed(study) == [] and os.listdir(dep.box(study, "processing")) == []
        assert os.listdir(dep.box(study, "failed")) == []
        for name in os.listdir(dep.box(study, "done")):
            assert os.listdir(dep.box(study, "done") / name) == [fmt.MANIFEST_NAME]
    dep.assert_sound()

    # Each uploader sees its receipt and nothing else: the next sync knows it was ingested.
    again = dep.sync(a)
    assert "nothing to send" in again.stdout, describe(again)
    assert f"earlier submission {name_a} was ingested as #" in again.stderr, describe(again)
    dep.write(a, "eprime/subj01.txt", b"subject 1, block A, redone\n")
    dep.submit(a)
    dep.watch()
    assert dep.cat("s", "eprime/subj01.txt", 1) == b"subject 1, block A\n"
    assert dep.cat("s", "eprime/subj01.txt") == b"subject 1, block A, redone\n"
    peek = """
import json, os, sys
root = sys.argv[1]
out = {}
for what in ("store", "dropbox", "dropbox/s/inbox", "dropbox/s/processing", "dropbox/s/done", "dropbox/g/inbox"):
    try:
        os.listdir(os.path.join(root, what)); out[what] = "listed"
    except OSError as e:
        out[what] = e.strerror
print(json.dumps(out))
"""
    for who in (a, b):
        seen = json.loads(dep.accounts.python_as(who, peek, dep.root).stdout)
        assert set(seen.values()) == {"Permission denied"}, (who.role, seen)
    dep.assert_sound()


def test_fsck_reports_the_permission_model_broken(dep: Deployment) -> None:
    up = dep.accounts.up_a
    os.chmod(dep.box("s", "inbox"), 0o777)
    os.chown(dep.box("s", "have"), up.uid, -1)
    os.chown(dep.box("g"), -1, dep.accounts.gb.gid)
    cp = dep.as_daemon("fsck", "--store", dep.root, expect=3)
    lines = cp.stdout + cp.stderr
    assert re.search(r"inbox.*mode 0777, want 3733", lines), lines
    assert re.search(rf"have.*owner {up.name}, want {dep.daemon.name}", lines), lines
    assert re.search(rf"dropbox/g.*group {dep.accounts.gb.name}, want {dep.accounts.ga.name}", lines), lines


def test_the_studies_names_cannot_be_listed_and_an_old_0755_is_a_warning(dep: Deployment) -> None:
    """ROOT/dropbox/ is 0711: an uploader syncs through it by the study's name and cannot list
    the studies. A root an earlier dittohead made (0755) is no damage to fsck: a warning with the
    chmod that sets it right."""
    a = dep.accounts.up_a
    dropbox = dep.root / "dropbox"
    assert stat.S_IMODE(os.stat(dropbox).st_mode) == 0o711
    listing = "import os, sys\ntry:\n    print(os.listdir(sys.argv[1]))\nexcept OSError as e:\n    print(e.strerror)\n"
    assert dep.accounts.python_as(a, listing, dropbox).stdout.strip() == "Permission denied"
    dep.write(a, "a.txt", b"sent through a folder it cannot list\n")
    name = dep.submit(a, "g")
    assert f"ingested g/{name} as #1" in dep.watch().stdout
    assert dep.cat("g", "a.txt") == b"sent through a folder it cannot list\n"
    dep.assert_sound()

    os.chmod(dropbox, 0o755)  # as dittohead 0.3 made it
    assert dep.accounts.python_as(a, listing, dropbox).stdout.strip() == "['g', 's']"
    cp = dep.as_daemon("fsck", "--store", dep.root, "--json")
    [finding] = json.loads(cp.stdout)["findings"]
    assert (finding["severity"], finding["kind"], finding["object"]) == ("warning", "permissions", str(dropbox))
    assert f"chmod 711 {dropbox}" in finding["message"] and "list the studies' names" in finding["message"]
    os.chmod(dropbox, 0o775)  # any other mode is what it was: damage
    cp = dep.as_daemon("fsck", "--store", dep.root, expect=3)
    assert f"damage: permissions {dropbox}: mode 0775, want 0711" in cp.stdout, describe(cp)
    os.chmod(dropbox, 0o711)
    dep.assert_sound()


def test_study_add_for_a_group_the_daemon_is_not_in_says_how(dep: Deployment) -> None:
    cp = dep.as_daemon("study", "add", "x", "--store", dep.root, "--uploaders",
                       grp.getgrgid(dep.accounts.reader.gid).gr_name, expect=2)
    assert "must be a member" in cp.stderr and not dep.box("x").exists(), describe(cp)


# Run as an uploader: make a staging folder in the inbox (as sync's first step does) and take it
# away again; prints "made" or why it could not.
STAGE = r"""
import json, os, sys
path = os.path.join(sys.argv[1], ".20260101T000000Z-" + os.urandom(6).hex())
try:
    os.mkdir(path, 0o750)
except OSError as e:
    print(json.dumps(e.strerror))
else:
    os.rmdir(path)
    print(json.dumps("made"))
"""


def _stage(dep: Deployment, who: Account, study: str) -> str:
    cp = dep.accounts.python_as(who, STAGE, dep.box(study, "inbox"))
    assert cp.returncode == 0, describe(cp)
    return json.loads(cp.stdout)


def _study_folder(dep: Deployment, study: str) -> tuple[int, int]:
    st = os.stat(dep.box(study))
    return stat.S_IMODE(st.st_mode), st.st_gid


def test_study_set_uploaders_gives_the_drop_box_to_another_group(dep: Deployment) -> None:
    """study set --uploaders: the study's folder gets the group and mode study add gives; a
    member of the old group can no longer begin an upload, one of the new group can, and fsck
    stays clean. '' admits any account."""
    a, b, reader = dep.accounts.up_a, dep.accounts.up_b, dep.accounts.reader
    ga, gb = dep.accounts.ga, dep.accounts.gb
    assert (_stage(dep, a, "g"), _stage(dep, b, "g")) == ("made", "Permission denied")

    cp = dep.as_daemon("study", "set", "g", "--store", dep.root, "--uploaders", gb.name)
    assert f"; uploaders {gb.name};" in cp.stdout, describe(cp)
    assert _study_folder(dep, "g") == (0o710, gb.gid)
    assert (_stage(dep, a, "g"), _stage(dep, b, "g"), _stage(dep, reader, "g")) == \
        ("Permission denied", "made", "Permission denied")
    dep.write(b, "b.txt", b"from group b\n")
    name = dep.submit(b, "g")
    cp = dep.sync(a, "g", expect=1)
    assert "does not admit this account" in cp.stderr, describe(cp)
    assert f"ingested g/{name} as #1" in dep.watch().stdout
    dep.assert_sound()

    # '' (as study add takes it): any account; the folder back in the daemon's group, 0711.
    dep.as_daemon("study", "set", "g", "--store", dep.root, "--uploaders", "")
    assert _study_folder(dep, "g") == (0o711, dep.daemon.gid)
    assert {_stage(dep, who, "g") for who in (a, b, reader)} == {"made"}
    assert ServerRoot(str(dep.root)).study_settings("g").uploaders is None
    dep.assert_sound()

    # And from any account to one group again.
    dep.as_daemon("study", "set", "g", "--store", dep.root, "--uploaders", ga.name)
    assert _study_folder(dep, "g") == (0o710, ga.gid)
    assert (_stage(dep, a, "g"), _stage(dep, b, "g"), _stage(dep, reader, "g")) == \
        ("made", "Permission denied", "Permission denied")
    dep.assert_sound()


def test_study_set_uploaders_refuses_a_group_it_cannot_give_and_changes_nothing(dep: Deployment) -> None:
    settings = dep.root / "store" / "studies" / "g.json"
    before = (_study_folder(dep, "g"), settings.read_bytes())
    not_in = grp.getgrgid(dep.accounts.reader.gid).gr_name  # the daemon is not a member of it
    for group, says in (("no-such-group-dht", "no group named 'no-such-group-dht' on this system"),
                        (not_in, "the daemon's account must be a member of it")):
        cp = dep.as_daemon("study", "set", "g", "--store", dep.root, "--uploaders", group,
                           "--notify", "pi@lab.example.org", expect=2)
        assert says in cp.stderr and len(cp.stderr.strip().splitlines()) == 1 and cp.stdout == "", describe(cp)
        assert (_study_folder(dep, "g"), settings.read_bytes()) == before
    assert (_stage(dep, dep.accounts.up_a, "g"), _stage(dep, dep.accounts.up_b, "g")) == \
        ("made", "Permission denied")
    dep.assert_sound()


# -- nothing the uploader can still touch is trusted or kept --------------------------------------

HOLD = r"""
import json, os, sys
sub = sys.argv[1]
dfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
fds = {n: os.open(n, os.O_RDWR, dir_fd=dfd) for n in os.listdir(dfd)}
print("ready", flush=True)
sys.stdin.readline()
out = {}
for n, fd in fds.items():
    try:
        os.pwrite(fd, b"forged" * 20, 0)
        out[n] = "written"
    except OSError as e:
        out[n] = e.strerror
for n in ("REASON", "manifest", "x.pack"):
    try:
        fd = os.open(n, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dfd)
        os.write(fd, b"rejected: all is well\n")
        os.close(fd)
        out[n + " (new)"] = "written"
    except OSError as e:
        out[n + " (new)"] = e.strerror
print(json.dumps(out))
"""


@pytest.mark.parametrize("outcome", ["ingested", "rejected"])
def test_descriptors_held_across_the_ingest_reach_nothing_the_daemon_keeps(dep: Deployment, outcome: str) -> None:
    """An uploader keeps descriptors of its submission (the folder and every file, open for
    writing) from before the ingest until after it, then writes through them: the store, the
    manifest kept in done/ and the REASON in failed/ stay as the daemon wrote them."""
    up = dep.accounts.up_a
    data = os.urandom(2 * 1024 * 1024)
    dep.write(up, "data.bin", data)
    name = dep.submit(up)
    sub = dep.box("s", "inbox") / name
    manifest = (sub / fmt.MANIFEST_NAME).read_bytes()
    if outcome == "rejected":
        manifest = manifest[:-1]  # no longer decodes
        (sub / fmt.MANIFEST_NAME).write_bytes(manifest)
    p = _attacker(dep, up, HOLD, sub)
    dep.watch(expect=0 if outcome == "ingested" else 1)
    store_before = store_snapshot(dep.root)
    kept = dep.box("s", "done" if outcome == "ingested" else "failed") / name
    kept_before = {f: (kept / f).read_bytes() for f in os.listdir(kept)}

    result = _finish(p)

    assert result.get("REASON (new)") != "written" and result.get("manifest (new)") != "written", result
    assert store_snapshot(dep.root) == store_before
    assert {f: (kept / f).read_bytes() for f in os.listdir(kept)} == kept_before
    assert kept_before[fmt.MANIFEST_NAME] == manifest
    assert stat.S_IMODE(kept.stat().st_mode) == 0o700 and kept.stat().st_uid == dep.daemon.uid
    if outcome == "ingested":
        assert dep.cat("s", "data.bin") == data
    else:
        assert kept_before[fmt.REASON_NAME].startswith(b"rejected: manifest")
    assert dep.committed() == []
    dep.assert_sound()


SWAP = r"""
import os, sys, time
sub, seconds = sys.argv[1], float(sys.argv[2])
print("ready", flush=True)
end = time.monotonic() + seconds
packs = sorted(n for n in os.listdir(sub) if n.endswith(".pack"))
i = 0
while time.monotonic() < end:
    i += 1
    try:
        p = os.path.join(sub, packs[i % len(packs)])
        if i % 3 == 0:
            os.rename(p, p + ".x"); os.rename(p + ".x", p)          # swapped out and back in
        elif i % 3 == 1:
            with open(p, "r+b") as f:                                # changed in place, then back
                f.seek(100); old = f.read(16); f.seek(100); f.write(b"Z" * 16); f.flush()
                f.seek(100); f.write(old)
        else:
            os.mkdir(os.path.join(sub, "f" * 64 + ".pack"))           # a folder named like a pack
            os.rmdir(os.path.join(sub, "f" * 64 + ".pack"))
    except OSError:
        pass                                                         # taken meanwhile
sys.stdin.readline()
print("{}")
"""


def test_files_swapped_and_changed_during_the_ingest(dep: Deployment) -> None:
    """While the daemon takes and verifies a submission, its uploader swaps packs out and in,
    changes bytes and makes folders named like packs, in a loop: each submission ends
    rejected with a reason, or ingested with exactly the bytes sent; never a crash."""
    up = dep.accounts.up_a
    sent: dict[str, list[bytes]] = {}
    for round_ in range(4):
        files = {f"r{round_}/f{i}.bin": os.urandom(5 * 1024 * 1024 + i) for i in range(4)}
        for rel, data in files.items():
            dep.write(up, rel, data)
            sent.setdefault(rel, []).append(data)
        name = dep.submit(up)
        p = _attacker(dep, up, SWAP, dep.box("s", "inbox") / name, 2.0)
        cp = dep.watch(expect=None)
        _finish(p)
        assert cp.returncode in (0, 1), describe(cp)
        if cp.returncode == 1:
            reason = (dep.box("s", "failed") / name / fmt.REASON_NAME).read_text()
            assert reason.startswith("rejected: "), reason
        else:
            for rel, data in files.items():
                assert dep.cat("s", rel) == data
        assert dep.committed() == [] and os.listdir(dep.box("s", "processing")) == []
    dep.assert_sound()


# -- one submission costs only itself ------------------------------------------------------------

MAKE = r"""
import os, sys
inbox = os.fsencode(sys.argv[1])
for name in sys.argv[2:]:
    raw = bytes.fromhex(name)
    os.mkdir(os.path.join(inbox, raw))
    with open(os.path.join(inbox, raw, b"manifest"), "wb") as f:
        f.write(b"\x80")
"""


def test_names_that_are_not_submission_names(dep: Deployment) -> None:
    """Not UTF-8, a terminal escape, a trailing newline, 255 bytes (twice): each rejected for its name, shown
    escaped, kept under a name of the daemon's; a good submission beside them is ingested."""
    a, b = dep.accounts.up_a, dep.accounts.up_b
    long_name = b"a" * 255
    bad = [b"\xff\xfe-latin1-\xe9", b"\x1b[31mred\x1b[0m", long_name, b"evil\n"]
    dep.accounts.python_as(a, MAKE, dep.box("s", "inbox"), *(n.hex() for n in bad))
    dep.write(b, "ok.txt", b"fine\n")
    good = dep.submit(b)

    cp = dep.watch(expect=1)

    assert f"ingested s/{good} as #1" in cp.stdout, describe(cp)
    text = cp.stdout + cp.stderr
    assert "\x1b" not in text and "\ufffd" not in text, describe(cp)
    assert r"\xff\xfe-latin1-\xe9" in text and r"\u001b[31mred" in text, describe(cp)
    failed = sorted(os.listdir(dep.box("s", "failed")))
    assert len(failed) == 4 and all(n.isprintable() and len(n.encode()) <= 200 for n in failed), failed
    assert r"evil\u000a" in failed, failed  # "$" in a pattern would have let this one through
    assert dep.committed() == [] and os.listdir(dep.box("s", "processing")) == []
    # The long name again: rejected again, kept apart from the first.
    dep.accounts.python_as(a, MAKE, dep.box("s", "inbox"), long_name.hex())
    dep.watch(expect=1)
    again = sorted(set(os.listdir(dep.box("s", "failed"))) - set(failed))
    assert len(again) == 1 and again[0].startswith("badname-"), again
    assert dep.committed() == [] and os.listdir(dep.box("s", "processing")) == []
    dep.assert_sound()


HOSTILE = r"""
import os, sys
case, sub, target = sys.argv[1], sys.argv[2], sys.argv[3]
packs = sorted(n for n in os.listdir(sub) if n.endswith(".pack"))
if case == "symlink-to-store-file":
    os.unlink(os.path.join(sub, packs[0]))
    os.symlink(target, os.path.join(sub, packs[0]))
elif case == "fifo-manifest":
    os.unlink(os.path.join(sub, "manifest"))
    os.mkfifo(os.path.join(sub, "manifest"))
elif case == "pack-unreadable":
    os.chmod(os.path.join(sub, packs[0]), 0o600)
elif case == "folder-locked":
    os.mkdir(os.path.join(sub, "mine"))
    open(os.path.join(sub, "mine", "keep"), "wb").close()
    os.chmod(sub, 0o700)
elif case == "deep-folder":  # deeper than Python's recursion limit
    fd = os.open(sub, os.O_RDONLY)
    for i in range(1200):
        os.mkdir("deep", dir_fd=fd)
        nfd = os.open("deep", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)
"""


@pytest.mark.parametrize(("case", "reason"), [
    ("symlink-to-store-file", r"\.pack: a symlink"),
    ("fifo-manifest", r"manifest: not a regular file"),
    ("pack-unreadable", r"\.pack: permission denied"),
    ("folder-locked", r"the submission: permission denied"),
    ("deep-folder", r"deep: not a regular file"),
])
def test_hostile_submission_from_another_account(dep: Deployment, case: str, reason: str) -> None:
    """Each costs only itself: rejected with its reason (which holds none of the store's bytes),
    the store unchanged, the other uploader's submission ingested in the same run."""
    a, b = dep.accounts.up_a, dep.accounts.up_b
    dep.write(a, "x.bin", os.urandom(700_000))
    name = dep.submit(a)
    dep.write(b, "y.txt", b"from b\n")
    good = dep.submit(b)
    cp = dep.accounts.python_as(a, HOSTILE, case, dep.box("s", "inbox") / name, dep.root / "store" / "config")
    assert cp.returncode == 0, describe(cp)
    before = store_snapshot(dep.root)

    cp = dep.watch(expect=1)

    text = (dep.box("s", "failed") / name / fmt.REASON_NAME).read_text()
    assert re.search(reason, text) and f"rejected s/{name}:" in cp.stderr, (text, describe(cp))
    assert "dittohead-store" not in text  # nothing of the daemon's file went into the reason
    assert f"ingested s/{good} as #1" in cp.stdout
    after = store_snapshot(dep.root)
    assert {k: v for k, v in after.items() if k in before} == before
    assert dep.committed() == [] and os.listdir(dep.box("s", "processing")) == []
    if case in ("folder-locked", "deep-folder"):  # could not be emptied: set aside, under a dot name
        left = [n for n in os.listdir(dep.box("s", "inbox")) if n.startswith(".~left-")]
        assert len(left) == 1, os.listdir(dep.box("s", "inbox"))
    else:
        assert os.listdir(dep.box("s", "inbox")) == []
    dep.assert_sound()


def test_a_submission_the_daemon_keeps_dying_in_is_set_aside(dep: Deployment) -> None:
    """What an attempt the daemon died in leaves (STATE counts it); at the limit the submission
    is rejected with that reason instead of being tried first at every start."""
    up = dep.accounts.up_a
    dep.write(up, "x.txt", b"x\n")
    name = dep.submit(up)
    folder = dep.box("s", "processing") / name
    folder.mkdir(mode=0o700)
    (folder / "STATE").write_text(json.dumps({"arrived_ns": 1, "attempts": 3}))
    for p in (folder, folder / "STATE"):
        os.chown(p, dep.daemon.uid, dep.daemon.gid)
    dep.write(up, "later.txt", b"later\n")
    later = dep.submit(up)

    cp = dep.watch(expect=1)

    assert re.search(rf"rejected s/{name}: the daemon stopped .* during each of 3 attempts", cp.stderr), describe(cp)
    assert f"ingested s/{later} as #1" in cp.stdout
    assert dep.committed() == [] and os.listdir(dep.box("s", "processing")) == []


def test_watch_outlives_every_hostile_submission_and_serves_the_other_studies(dep: Deployment) -> None:
    """The daemon (watch without --once) meets a bad name, a FIFO manifest, a locked folder and
    a manifest that does not decode in study s, and keeps ingesting study g meanwhile."""
    a = dep.accounts.up_a
    dep.write(a, "x.bin", os.urandom(300_000))
    fifo = dep.submit(a)
    dep.accounts.python_as(a, HOSTILE, "fifo-manifest", dep.box("s", "inbox") / fifo, "-")
    dep.write(a, "y.bin", os.urandom(300_000))
    locked = dep.submit(a)
    dep.accounts.python_as(a, HOSTILE, "folder-locked", dep.box("s", "inbox") / locked, "-")
    dep.accounts.python_as(a, MAKE, dep.box("s", "inbox"), b"\xff\x1b".hex())
    log = dep.base / "watch.log"
    with open(log, "wb") as out:
        os.chown(log, dep.daemon.uid, dep.daemon.gid)
        p = dep.accounts.spawn_as(dep.daemon, "watch", "--store", dep.root, "--interval", "0.2",
                                  stdout=out, stderr=out)
        try:
            for i in range(3):
                dep.write(a, f"g{i}.txt", f"for g, {i}\n".encode())
                name = dep.submit(a, "g")
                receipt = dep.box("g", "receipts") / name
                deadline = time.monotonic() + 30
                while not receipt.exists() and time.monotonic() < deadline:
                    assert p.poll() is None, log.read_text(errors="replace")
                    time.sleep(0.05)
                assert receipt.exists(), log.read_text(errors="replace")
            assert p.poll() is None, log.read_text(errors="replace")
        finally:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=30)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "internal error" not in text and "\x1b" not in text, text
    assert sorted(os.listdir(dep.box("s", "failed"))) == sorted([fifo, locked, r"\xff\u001b"]), text
    assert len(dep.log("g")) == 3
    assert dep.committed() == [] and dep.committed("g") == []
    dep.assert_sound()


def test_export_into_a_folder_an_uploader_can_write_stays_inside_it(dep: Deployment) -> None:
    """A shared destination: an uploader replaces a folder of the export with a symlink to the
    daemon's home; the daemon's export writes nothing there, and reports it."""
    a = dep.accounts.up_a
    dep.write(a, "x/.ssh/authorized_keys", b"ssh-ed25519 AAAA... attacker\n")
    dep.write(a, "y.txt", b"y\n")
    dep.submit(a)
    dep.watch()
    dest = make_dir(dep.base / "shared", dep.daemon, 0o777)
    for part in ("current",):
        make_dir(dest / part, a, 0o777)
    os.symlink(dep.daemon.home, dest / "current" / "x")
    os.lchown(dest / "current" / "x", a.uid, a.gid)
    home_before = sorted(p.name for p in dep.daemon.home.rglob("*"))

    cp = dep.as_daemon("export", "--store", dep.root, "--study", "s", dest, expect=None)

    assert sorted(p.name for p in dep.daemon.home.rglob("*")) == home_before, describe(cp)
    assert not (dep.daemon.home / ".ssh").exists()
    assert (dest / "current" / "y.txt").read_bytes() == b"y\n"
    assert os.path.islink(dest / "current" / "x")
    assert "current/x" in cp.stdout + cp.stderr, describe(cp)


def test_a_version_file_planted_by_another_account_is_not_the_exports(dep: Deployment) -> None:
    """Before the first export, an uploader plants a file of the right name and size (read-only,
    as the export's are) where a version's file goes: it is left, reported, and never linked into
    current/ or submissions/ as that version."""
    a = dep.accounts.up_a
    dep.write(a, "data.txt", b"the real bytes\n")
    dep.submit(a)
    dep.watch()
    scratch = make_dir(dep.base / "scratch", dep.daemon, 0o755)
    dep.as_daemon("export", "--store", dep.root, "--study", "s", scratch / "out")
    (version,) = (scratch / "out" / "versions" / "data.txt").iterdir()
    dest = make_dir(dep.base / "shared", dep.daemon, 0o777)
    planted = dep.accounts.python_as(a, PLANT, dest, version.name, len(b"the real bytes\n"))
    assert planted.returncode == 0, describe(planted)

    cp = dep.as_daemon("export", "--store", dep.root, "--study", "s", dest, expect=None)

    assert "versions/data.txt/" + version.name in cp.stderr, describe(cp)
    assert not (dest / "current" / "data.txt").exists(), "the planted bytes were exported as the version"
    for f in (dest / "submissions").rglob("data.txt"):
        assert f.read_bytes() != b"forged bytes!!\n"


PLANT = r"""
import os, sys
dest, name, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
folder = os.path.join(dest, "versions", "data.txt")
os.makedirs(folder, mode=0o777)
path = os.path.join(folder, name)
with open(path, "wb") as f:
    f.write(b"forged bytes!!\n".ljust(size, b"!")[:size])
os.chmod(path, 0o444)
"""


# -- the ingest's memory is bounded by the format's limits ---------------------------------------

MEASURE = r"""
import json, resource, subprocess, sys, time
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
t0 = time.monotonic()
cp = subprocess.run([sys.executable, "-m", "dittohead", *sys.argv[2:]], capture_output=True, text=True)
print(json.dumps({"rc": cp.returncode, "out": cp.stdout, "err": cp.stderr, "seconds": time.monotonic() - t0,
                  "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def _largest_submission(folder: Path, study: str) -> None:
    """A submission at both of a manifest's limits (entries and bytes): each entry a file of
    its own small content, in packs of the largest chunk count, paths filling the bytes."""
    from dittohead import codec
    from dittohead import pack as pk
    from dittohead.hashing import digest

    n = fmt.MANIFEST_MAX_ENTRIES
    stem = "sub-0001/ses-01/eyetracking/" + "x" * 40
    entries, chunk_list = [], []
    for i in range(n):
        data = b"%08d" % i
        cid = digest(data)
        chunk_list.append((cid, data))
        entries.append({"path": f"{stem}/f{i:07d}.edf".encode(), "size": len(data), "mtime_ns": i, "mode": 0o644,
                        "hash": cid, "chunks": [[cid, len(data)]]})
    doc = {"format": fmt.FORMAT_VERSION, "kind": fmt.MANIFEST_KIND, "study": study, "site": "lab",
           "user": "ra", "host": "pc", "created_ns": 0, "entries": entries}
    data = codec.pack(doc)
    pad = (fmt.MANIFEST_MAX_SIZE - len(data)) // n  # lengthen every path to fill the byte limit
    if pad > 0:
        stem += "y" * pad
        for i, e in enumerate(entries):
            e["path"] = f"{stem}/f{i:07d}.edf".encode()
        data = codec.pack(doc)
    assert len(data) <= fmt.MANIFEST_MAX_SIZE and len(data) > fmt.MANIFEST_MAX_SIZE * 0.99
    folder.mkdir()
    for start in range(0, n, fmt.PACK_TARGET_CHUNKS):
        w_buf = folder / "tmp"
        with open(w_buf, "wb") as f:
            w = pk.PackWriter(f)
            for cid, chunk in chunk_list[start:start + fmt.PACK_TARGET_CHUNKS]:
                w.add(cid, chunk)
            pid, _ = w.finish()
        os.rename(w_buf, folder / (pid.hex() + fmt.PACK_SUFFIX))
    (folder / fmt.MANIFEST_NAME).write_bytes(data)


@pytest.mark.slow
def test_the_largest_legal_manifest_is_ingested_within_500_mb(dep: Deployment) -> None:
    """The daemon, under a 2 GiB address-space limit (the issue's machine killed the ingest of a
    4,000,000-entry manifest under 2 GiB on every run), ingests a submission at both of the
    manifest's limits with a peak RSS under 500 MB, and every file reads back."""
    up = dep.accounts.up_a
    staging = dep.box("s", "inbox") / ".big"
    _largest_submission(staging, "s")
    for p in [staging, *staging.iterdir()]:
        os.chown(p, up.uid, dep.daemon.gid)
        os.chmod(p, 0o770 if p.is_dir() else 0o640)
    os.rename(staging, dep.box("s", "inbox") / "big")

    cp = dep.accounts.python_as(dep.daemon, MEASURE, 2 << 30, "watch", "--store", dep.root, "--once",
                                timeout=600)
    assert cp.returncode == 0, cp.stderr
    got = json.loads(cp.stdout)
    assert got["rc"] == 0 and "ingested s/big as #1" in got["out"], got
    peak_mb = got["maxrss_kib"] * 1024 / 1e6
    print(f"largest legal manifest: ingested in {got['seconds']:.1f} s, peak RSS {peak_mb:.0f} MB")
    assert peak_mb < 500, f"peak RSS {peak_mb:.0f} MB"
    first = _first_path(dep)
    vs = json.loads(dep.as_daemon("versions", "--store", dep.root, "--study", "s", first, "--json").stdout)
    assert [v["size"] for v in vs["versions"]] == [8]
    assert dep.cat("s", first) == b"%08d" % 0
    assert dep.committed() == [] and os.listdir(dep.box("s", "processing")) == []


def _first_path(dep: Deployment) -> str:
    (manifest,) = (p for p in (dep.box("s", "done") / "big").iterdir())
    from dittohead import manifest as mf

    return mf.decode(manifest.read_bytes()).entries[0].path


def test_a_folder_of_another_account_in_a_shared_export_costs_only_what_goes_in_it(dep: Deployment) -> None:
    """Folders an uploader made in a shared destination, one the daemon may not open (mode 000)
    and one it may not write in (0555): what would go in them is reported as in the way; the
    rest is exported, and the export ends as usual."""
    a = dep.accounts.up_a
    for rel in ("a/f.txt", "b/g.txt", "z/h.txt"):
        dep.write(a, rel, rel.encode())
    dep.submit(a)
    dep.watch()
    dest = make_dir(dep.base / "shared", dep.daemon, 0o777)
    make_dir(dest / "current", dep.daemon, 0o777)
    make_dir(dest / "current" / "a", a, 0o000)
    make_dir(dest / "current" / "b", a, 0o555)

    cp = dep.as_daemon("export", "--store", dep.root, "--study", "s", dest)

    assert (dest / "current" / "z" / "h.txt").read_bytes() == b"z/h.txt"
    assert (dest / "versions" / "a" / "f.txt").is_dir() and (dest / "versions" / "b" / "g.txt").is_dir()
    text = cp.stdout + cp.stderr
    assert str(dest / "current" / "a") in text and str(dest / "current" / "b" / "g.txt") in text, describe(cp)


def test_a_pass_stopped_part_way_still_exports_what_it_ingested(dep: Deployment) -> None:
    """Study e (with an export) is ingested; then study t stops the pass (its processing/
    is not the daemon's to write in): e's export is still written, and the pass ends with one
    line and exit 1."""
    a = dep.accounts.up_a
    dest = make_dir(dep.base / "exports", dep.daemon, 0o755) / "e"
    dep.as_daemon("study", "add", "e", "--store", dep.root, "--export", dest)
    dep.as_daemon("study", "add", "t", "--store", dep.root)
    dep.write(a, "e.txt", b"for e\n")
    dep.submit(a, "e")
    dep.write(a, "t.txt", b"for t\n")
    dep.submit(a, "t")
    os.chown(dep.box("t", "processing"), 0, 0)

    cp = dep.watch(expect=1)

    assert "ingested e/" in cp.stdout and (dest / "current" / "e.txt").read_bytes() == b"for e\n", describe(cp)
    assert "Permission denied" in cp.stderr, describe(cp)
    os.chown(dep.box("t", "processing"), dep.daemon.uid, dep.daemon.gid)
    assert "ingested t/" in dep.watch().stdout


def test_an_account_that_may_only_read_the_store_reads_it_and_writes_nothing(dep: Deployment) -> None:
    """Read commands as an account that can read store/ but not write it (an auditor's): log,
    versions, cat and export answer, with no ingest running and with the index missing (read
    around, from an index of its own outside the store); nothing under store/ changes, and no
    file of that account's appears there (a -shm of its own would lock the daemon out)."""
    up = dep.accounts.up_a
    dep.write(up, "a.txt", b"one\n")
    dep.submit(up)
    dep.watch()
    dep.write(up, "a.txt", b"two\n")
    dep.submit(up)
    dep.watch()
    reader = dep.accounts.reader
    store = dep.root / "store"
    for dirpath, dirnames, filenames in os.walk(store):  # readable, never writable, by others
        for name in [*dirnames, *filenames, "."]:
            p = os.path.join(dirpath, name)
            os.chmod(p, os.lstat(p).st_mode | (0o005 if os.path.isdir(p) else 0o004))

    def snapshot() -> dict:
        out = {}
        for dirpath, _, filenames in os.walk(store):
            for name in filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                out[p] = (st.st_uid, st.st_size, st.st_mtime_ns, open(p, "rb").read())  # noqa: SIM115
        return out

    out = make_dir(dep.base / "reader-out", reader, 0o755)
    for case in ("as it is", "index missing"):
        if case == "index missing":
            (store / "index.sqlite").unlink()
        before = snapshot()
        cp = dep.accounts.run_as(reader, "log", "--store", dep.root, "--study", "s", "--json")
        assert cp.returncode == 0 and len(json.loads(cp.stdout)["submissions"]) == 2, describe(cp)
        cp = dep.accounts.run_as(reader, "versions", "--store", dep.root, "--study", "s", "a.txt", "--json")
        assert cp.returncode == 0 and len(json.loads(cp.stdout)["versions"]) == 2, describe(cp)
        cp = dep.accounts.run_as(reader, "cat", "--store", dep.root, "--study", "s", "a.txt", "--version", "1",
                                 raw_stdout=True)
        assert cp.returncode == 0 and cp.stdout == b"one\n", cp.stderr
        cp = dep.accounts.run_as(reader, "export", "--store", dep.root, "--study", "s", out / case.replace(" ", "-"))
        assert cp.returncode == 0, describe(cp)
        assert (out / case.replace(" ", "-") / "current" / "a.txt").read_bytes() == b"two\n"
        assert snapshot() == before, case
    # the daemon's fsck, the one writer while it holds the lock, rebuilds the index (and reports
    # the modes this test loosened)
    cp = dep.as_daemon("fsck", "--store", dep.root, "--json", expect=None)
    assert all(f["kind"] in ("index", "permissions") for f in json.loads(cp.stdout)["findings"]), describe(cp)
