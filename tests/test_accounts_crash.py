"""The non-root daemon killed (SIGKILL) again and again while other accounts upload.

Invariant 2 with the real accounts of tests/accounts.py: the daemon account owns the server root
and runs ``watch``; two uploader accounts sync from folders of their own (up_a into the studies
``s`` and ``t``, ``t`` admitting only up_a's group; up_b into ``s``), before the loop, while the
daemon is dead and while it runs. The daemon's process group is killed at least KILLS times at
seeded random instants. Then ``watch --once`` finishes what is left, and:

- every submission a sync reported is in its study's log exactly once, and no other is; nothing
  was rejected (``failed/`` is empty), the inbox and ``processing/`` are empty;
- every version of every file sent reads back, as the daemon (``versions --json``, ``cat
  --version N``), byte for byte and in the order it was sent;
- ``fsck --read-data`` (as the daemon) is clean, modes, owners and groups included; nothing under
  ``ROOT/store`` belongs to anyone but the daemon (an uploader least of all);
- no sync ever said that a submission "left the inbox without a receipt", each reported every
  earlier submission of its own ingested, and each uploader's next sync has nothing to send.

A high ``--max-attempts`` keeps a submission killed in again and again from being set aside
(that rule has its own tests). Runs are seeded: DITTOHEAD_CRASH_SEED (default 20261121),
DITTOHEAD_CRASH_KILLS (default 24, at least 20), DITTOHEAD_CRASH_PROFILE: ``mixed`` (the
default: a third of the kills at delays growing from within the daemon's start-up through its
first pass, a third "on work", a third at delays spread over start-up, first pass and idle
passes) or ``early`` (every kill "on work"). An "on work" kill comes 0-30 ms after the daemon is
first seen to begin a step in ``processing/`` (a folder made, its STATE rewritten): mostly in the
first submission of its first pass, the resume of one an earlier kill interrupted. The failing
run's seed is in every assertion message; where each kill landed is printed (``-s``): at
start-up, in an ingest (before its commit point, or after it: releasing), or between ingests.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from accounts import Account, Accounts, make_dir
from conftest import NOTHING_RE, SUBMISSION_RE

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")

SEED = int(os.environ.get("DITTOHEAD_CRASH_SEED", "20261121"))
KILLS = max(20, int(os.environ.get("DITTOHEAD_CRASH_KILLS", "24")))
PROFILE = os.environ.get("DITTOHEAD_CRASH_PROFILE", "mixed")
KiB, MiB = 1024, 1024 * 1024
MAX_ATTEMPTS = "1000"
LOST_NOTE = "left the inbox without a receipt"
INGESTED_NOTE = re.compile(r"earlier submission (\S+) was ingested")

# Read every version back as the daemon, in one process: the real commands (versions --json,
# cat --version N) through click's runner, the bytes written into a folder of the daemon's own.
READ_BACK = r"""
import json, os, sys
from click.testing import CliRunner
from dittohead.cli import cli
root, out = sys.argv[1], sys.argv[2]
runner, report, n = CliRunner(), [], 0
for study, path in json.loads(sys.stdin.read()):
    r = runner.invoke(cli, ["versions", "--store", root, "--study", study, path, "--json"])
    item = {"study": study, "path": path, "exit": r.exit_code, "stderr": r.stderr[-2000:],
            "versions": []}
    report.append(item)
    if r.exit_code != 0:
        continue
    for v in json.loads(r.stdout)["versions"]:
        c = runner.invoke(cli, ["cat", "--store", root, "--study", study, path,
                                "--version", str(v["version"])])
        n += 1
        with open(os.path.join(out, str(n)), "wb") as f:
            f.write(c.stdout_bytes)
        item["versions"].append({"version": v["version"], "exit": c.exit_code, "file": str(n),
                                 "stderr": c.stderr[-2000:]})
print(json.dumps(report))
"""


@dataclass
class Job:
    """One uploader's source folder for one study (the client's cache is per destination and
    study, so each study gets a folder of its own)."""

    uploader: Account
    study: str
    src: Path
    prefix: str  # every path of this job starts with it: no two jobs share a path
    site: str
    files: dict[str, bytes] = field(default_factory=dict)  # the source as it is now
    history: dict[str, list[bytes]] = field(default_factory=dict)  # per path, contents sent
    submissions: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)  # every sync's stdout + stderr

    @property
    def label(self) -> str:
        return f"{self.uploader.role}->{self.study}"


@dataclass
class Life:
    """One run of the daemon, from spawn to SIGKILL."""

    mode: str  # "timed": killed a while after its spawn; "on work": a while after it began a step
    delay: float = 0.0  # seconds from spawn to kill
    up: bool = False  # it printed its "watching" line before it was killed
    processing: list[str] = field(default_factory=list)  # folders in processing/ right after the kill
    after_commit: bool = False  # one of them held only its manifest (no STATE): step 10
    attempts: int = 0  # the highest attempt count in those folders' STATE
    ingested: int = 0  # "ingested ..." lines it printed
    committed: int = 0  # committed submissions in the inboxes right after the kill

    @property
    def where(self) -> str:
        if not self.up:
            return "start-up"
        if not self.processing:
            return "between ingests"
        return "after commit" if self.after_commit else "ingest"


def put(job: Job, rel: str, data: bytes) -> None:
    """Write a file of the job's source as its uploader would own it (folders 0700, files 0600)."""
    d = job.src
    for part in Path(rel).parent.parts:
        d = d / part
        if not d.exists():
            make_dir(d, job.uploader, 0o700)
    path = job.src / rel
    path.write_bytes(data)
    os.chown(path, job.uploader.uid, job.uploader.gid)
    os.chmod(path, 0o600)
    job.files[rel] = data


def seed_files(job: Job, rng: random.Random, common: bytes) -> None:
    """Small files in nested folders, two of several chunks, and one shared with other jobs."""
    p = job.prefix
    for i, size in enumerate([0, 17, 900, 4096, 40_000, rng.randint(1, 200_000)]):
        put(job, f"{p}/session {i % 3}/block {i % 2}/trial_{i:03d}.csv", rng.randbytes(size))
    put(job, f"{p}/raw/recording_0.bdf", rng.randbytes(rng.randint(2 * MiB, 3 * MiB)))
    put(job, f"{p}/raw/recording_1.bdf", rng.randbytes(rng.randint(4 * MiB, 5 * MiB)))
    put(job, f"{p}/common.bin", common)  # the same bytes in every job: chunks the store holds


def mutate(job: Job, rng: random.Random) -> None:
    """Change one to three files into contents never sent before: a small file rewritten or
    added, a large one patched in place (most of its chunks stay those of its last version) or
    appended to, now and then a new large one."""
    p = job.prefix
    for _ in range(rng.randint(1, 3)):
        small = [r for r in job.files if r.endswith(".csv")]
        large = [r for r in job.files if r.endswith(".bdf")]
        action = rng.choice(
            ["rewrite", "rewrite", "new small", "patch", "patch", "append", "new large"])
        if action == "rewrite":
            rel = rng.choice(small)
            put(job, rel, rng.randbytes(rng.randint(1, 60_000)))
        elif action == "new small":
            put(job, f"{p}/session {rng.randint(0, 5)}/extra_{len(job.files):03d}.csv",
                rng.randbytes(rng.randint(1, 20_000)))
        elif action == "patch":
            rel = rng.choice(large)
            data = bytearray(job.files[rel])
            at = rng.randrange(0, len(data) - 64 * KiB)
            data[at : at + 64 * KiB] = rng.randbytes(64 * KiB)
            put(job, rel, bytes(data))
        elif action == "append":
            rel = rng.choice(large)
            put(job, rel, job.files[rel] + rng.randbytes(rng.randint(1, 400 * KiB)))
        elif sum(len(v) for v in job.files.values()) < 12 * MiB:
            put(job, f"{p}/raw/recording_{len(large)}.bdf",
                rng.randbytes(rng.randint(1 * MiB, 3 * MiB)))


def sync(accounts: Accounts, job: Job, root: Path) -> subprocess.CompletedProcess:
    return accounts.run_as(job.uploader, "sync", job.src, "--study", job.study, "--to", root,
                           "--site", job.site, timeout=120)


def record(job: Job, sent: dict[str, bytes], cp: subprocess.CompletedProcess, where: str) -> None:
    """Book what a sync of the source as ``sent`` reported: its submission, and the versions it
    must have made (every file whose content differs from the last one sent)."""
    out = cp.stdout + cp.stderr
    job.outputs.append(out)
    assert cp.returncode == 0, f"{where}: sync as {job.label} exited {cp.returncode}:\n{out}"
    names = SUBMISSION_RE.findall(out)
    changed = {rel for rel, data in sent.items() if job.history.get(rel, [None])[-1] != data}
    if not names:
        assert NOTHING_RE.search(out) and not changed, (
            f"{where}: sync as {job.label} named no submission, with {sorted(changed)} changed:\n{out}")
        return
    job.submissions.append(names[-1])
    for rel in changed:
        job.history.setdefault(rel, []).append(sent[rel])


def listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def test_non_root_daemon_killed_while_others_upload(accounts: Accounts, acct_dir: Path) -> None:
    daemon, up_a, up_b = accounts.daemon, accounts.up_a, accounts.up_b
    rng = random.Random(SEED)
    start = time.monotonic()
    srv = make_dir(acct_dir / "srv", daemon, 0o755)
    root = srv / "root"
    for args in (["init", "--store", root], ["study", "add", "s", "--store", root],
                 ["study", "add", "t", "--store", root, "--uploaders", accounts.ga.name]):
        cp = accounts.run_as(daemon, *args)
        assert cp.returncode == 0, f"{args}: {cp.stdout}{cp.stderr}"
    studies = ("s", "t")
    logs = acct_dir / "daemon-output"
    logs.mkdir()

    common = random.Random(SEED + 1).randbytes(3 * MiB // 2)
    jobs = [
        Job(up_a, "s", make_dir(acct_dir / "src-a-s", up_a, 0o700), "a", "Lab A"),
        Job(up_a, "t", make_dir(acct_dir / "src-a-t", up_a, 0o700), "a", "Lab A"),
        Job(up_b, "s", make_dir(acct_dir / "src-b-s", up_b, 0o700), "b", "Lab B"),
    ]
    for job in jobs:
        seed_files(job, rng, common)

    def spawn(n: int) -> tuple[subprocess.Popen, Path]:
        out = logs / f"life{n:02d}.txt"
        with open(out, "wb") as f:
            p = accounts.spawn_as(daemon, "watch", "--store", root, "--interval", "0.2",
                                  "--max-attempts", MAX_ATTEMPTS, stdout=f, stderr=subprocess.STDOUT)
        return p, out

    def kill(p: subprocess.Popen, out: Path, where: str) -> str:
        code = p.poll()
        assert code is None, f"{where}: the daemon exited {code} on its own:\n{out.read_text()}"
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return out.read_text("utf-8", "replace")

    # The daemon's start-up (interpreter, imports, the store opened): until its "watching" line.
    startups = []
    for n in range(3):
        p, out = spawn(90 + n)
        t0 = time.monotonic()
        while "watching " not in out.read_text() and time.monotonic() - t0 < 30 and p.poll() is None:
            time.sleep(0.005)
        startups.append(time.monotonic() - t0)
        kill(p, out, f"seed {SEED}: start-up {n}")
    startup = sorted(startups)[1]

    third = KILLS // 3

    def plan(i: int) -> tuple[str, float]:
        """How kill ``i`` comes: "timed", that many seconds after the spawn, or "on work", that
        many seconds after the daemon was first seen to begin a step of an ingest (a folder in
        processing/ made, or its STATE rewritten: the resume of an interrupted one included)."""
        if PROFILE == "early" or third <= i < 2 * third:
            return "on work", rng.uniform(0, 0.03)
        if i < third:  # growing: from within the start-up through the first pass
            return "timed", startup * 0.6 + 0.7 * i / max(1, third - 1)
        return "timed", rng.uniform(startup * 0.5, startup + 0.6)

    def processing_now() -> dict[str, tuple]:
        seen = {}
        for study in studies:
            top = root / "dropbox" / study / "processing"
            for name in listdir(top):
                try:
                    state = os.lstat(top / name / "STATE").st_mtime_ns
                except OSError:
                    state = None
                seen[f"{study}/{name}"] = (state, tuple(listdir(top / name)))
        return seen

    def wait_for_work(p: subprocess.Popen, before: dict[str, tuple], deadline: float) -> None:
        while time.monotonic() < deadline and p.poll() is None:
            if processing_now() != before:
                return
            time.sleep(0.002)

    def where(i: int | str) -> str:
        return f"seed {SEED}, profile {PROFILE}, kill {i}"

    # Several submissions per job before the daemon first runs.
    for n in range(2):
        for job in jobs:
            if n:
                mutate(job, rng)
            sent = dict(job.files)
            record(job, sent, sync(accounts, job, root), where(f"initial sync {n}"))

    lives: list[Life] = []
    for i in range(KILLS):
        mode, delay = plan(i)
        life = Life(mode)
        if rng.random() < (1.0 if mode == "on work" else 0.6):  # lands while the daemon is dead
            job = rng.choice(jobs)
            mutate(job, rng)
            sent = dict(job.files)
            record(job, sent, sync(accounts, job, root), where(i))
        live: tuple[Job, dict[str, bytes]] | None = None
        if rng.random() < (0.3 if mode == "on work" else 0.5):  # lands while the daemon runs
            job = rng.choice(jobs)
            mutate(job, rng)
            live = (job, dict(job.files))
        before = processing_now()
        t0 = time.monotonic()
        p, out = spawn(i)
        result: list[subprocess.CompletedProcess] = []
        thread = None
        if live is not None:
            job = live[0]
            thread = threading.Thread(
                target=lambda j=job, r=result: r.append(sync(accounts, j, root)))
            thread.start()
        if mode == "on work":
            wait_for_work(p, before, t0 + startup + 1.0)
        time.sleep(delay)
        text = kill(p, out, where(i))
        life.delay = round(time.monotonic() - t0, 3)
        for study in studies:
            box = root / "dropbox" / study
            for name in listdir(box / "processing"):
                held = listdir(box / "processing" / name)
                life.processing.append(f"{study}/{name}{held}")
                life.after_commit |= held == ["manifest"]
                try:
                    state = json.loads((box / "processing" / name / "STATE").read_bytes())
                    life.attempts = max(life.attempts, int(state["attempts"]))
                except (OSError, ValueError, KeyError):
                    pass
            life.committed += sum(not n.startswith(".") for n in listdir(box / "inbox"))
        life.up = "watching " in text
        life.ingested = text.count("\ningested ") + text.startswith("ingested ")
        for bad in ("rejected", "Traceback", "internal error", "this pass stopped"):
            assert bad not in text, f"{where(i)}: the daemon said {bad!r}:\n{text}"
        lives.append(life)
        if thread is not None:
            thread.join(timeout=150)
            assert not thread.is_alive() and result, f"{where(i)}: the live sync did not finish"
            record(live[0], live[1], result[0], where(i))

    # What is left: resumed and ingested by --once, until it has nothing to do.
    for n in range(5):
        cp = accounts.run_as(daemon, "watch", "--store", root, "--once",
                             "--max-attempts", MAX_ATTEMPTS)
        assert cp.returncode == 0, (
            f"{where('final')}: watch --once exited {cp.returncode}:\n{cp.stdout}{cp.stderr}")
        if "nothing to ingest" in cp.stdout:
            break
    else:
        pytest.fail(f"{where('final')}: watch --once still found work after 5 runs")

    # Every submission reported, exactly once, in order within each job; nothing rejected.
    for study in studies:
        cp = accounts.run_as(daemon, "log", "--store", root, "--study", study, "--json")
        assert cp.returncode == 0, cp.stderr
        log = json.loads(cp.stdout)["submissions"]
        names = [s["name"] for s in log]
        sent = [n for job in jobs if job.study == study for n in job.submissions]
        twice = sorted(n for n, k in Counter(names).items() if k > 1)
        assert not twice, f"{where('final')}: study {study}: ingested more than once: {twice}"
        assert sorted(names) == sorted(sent), (
            f"{where('final')}: study {study}: the log names {sorted(set(names) - set(sent))} "
            f"that no sync reported, misses {sorted(set(sent) - set(names))}")
        assert [s["seq"] for s in log] == list(range(1, len(log) + 1)), f"{where('final')}: {log}"
        users = {s["name"]: s["user"] for s in log}
        for job in (j for j in jobs if j.study == study):
            assert [n for n in names if n in job.submissions] == job.submissions, (
                f"{where('final')}: {job.label}: ingested out of the order sent")
            assert {users[n] for n in job.submissions} == {job.uploader.name}
        box = root / "dropbox" / study
        for part in ("failed", "processing", "inbox"):
            left = listdir(box / part)
            assert left == [], f"{where('final')}: {study}/{part}/ holds {left}"

    # Every version of every file, as sent, version by version, read back as the daemon.
    out_dir = make_dir(acct_dir / "read-back", daemon, 0o700)
    wanted = [(job.study, rel) for job in jobs for rel in sorted(job.history)]
    cp = accounts.python_as(daemon, READ_BACK, root, out_dir, input=json.dumps(wanted), timeout=300)
    assert cp.returncode == 0, f"reading back as the daemon failed:\n{cp.stderr}"
    report = json.loads(cp.stdout)
    history = {(job.study, rel): h for job in jobs for rel, h in job.history.items()}
    versions_checked = 0
    for item in report:
        key = (item["study"], item["path"])
        at = f"{where('final')}: {key[0]}/{key[1]}"
        assert item["exit"] == 0, f"{at}: versions --json exited {item['exit']}: {item['stderr']}"
        expected = history[key]
        assert [v["version"] for v in item["versions"]] == list(range(1, len(expected) + 1)), (
            f"{at}: versions {[v['version'] for v in item['versions']]}, {len(expected)} sent")
        for v, data in zip(item["versions"], expected):
            n = v["version"]
            assert v["exit"] == 0, f"{at} version {n}: cat exited {v['exit']}: {v['stderr']}"
            got = (out_dir / v["file"]).read_bytes()
            assert got == data, (
                f"{at} version {n}: {len(got)} bytes read back, {len(data)} sent, not equal")
            versions_checked += 1

    cp = accounts.run_as(daemon, "fsck", "--store", root, "--read-data", timeout=300)
    assert cp.returncode == 0, (
        f"{where('final')}: fsck --read-data exited {cp.returncode}:\n{cp.stdout}{cp.stderr}")

    for dirpath, dirnames, filenames in os.walk(root / "store"):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            assert st.st_uid == daemon.uid, (
                f"{where('final')}: {os.path.join(dirpath, name)} is owned by uid {st.st_uid}, "
                f"not the daemon ({daemon.uid}; uploaders {up_a.uid}, {up_b.uid})")

    # The clients: never a submission lost, each reported ingested, and nothing left to send.
    for job in jobs:
        cp = sync(accounts, job, root)
        record(job, dict(job.files), cp, where(f"final sync {job.label}"))
        assert "nothing to send" in cp.stdout + cp.stderr, f"{job.label}: {cp.stdout}{cp.stderr}"
        text = "\n".join(job.outputs)
        assert LOST_NOTE not in text, (
            f"{where('final')}: {job.label}: a sync said {LOST_NOTE!r}:\n{text}")
        reported = INGESTED_NOTE.findall(text)
        assert sorted(reported) == sorted(job.submissions), (
            f"{where('final')}: {job.label}: reported ingested {sorted(reported)}, "
            f"sent {sorted(job.submissions)}")

    took = time.monotonic() - start
    landed = Counter(life.where for life in lives)
    print(f"\n{where('summary')}: {len(lives)} kills in {took:.1f} s (start-up {startup:.2f} s): "
          f"{dict(landed)}; at most {max(life.attempts for life in lives)} attempts at one "
          f"submission; {sum(len(j.submissions) for j in jobs)} submissions, "
          f"{versions_checked} versions read back")
    for n, life in enumerate(lives):
        print(f"  kill {n:2d} ({life.mode}) after {life.delay:.3f} s: {life.where}; "
              f"{life.ingested} ingested; processing/ {life.processing}; "
              f"{life.committed} committed waiting; attempts {life.attempts}")
    in_ingest = landed["ingest"] + landed["after commit"]
    assert in_ingest >= max(2, KILLS // 8), (
        f"{where('summary')}: only {in_ingest} kills came during an ingest: {dict(landed)}")


# The daemon ingests between the two looks of the client's reconciliation: with the receipt not
# there yet at the first, and the uploader's folder gone at the second.
RECONCILE_RACE = r"""
import os, sys, time
from dittohead.client import transport
flag, go = sys.argv[1], sys.argv[2]
read_receipt = transport.LocalTransport.read_receipt

def paused(self, study, name):
    got = read_receipt(self, study, name)
    if got is None and not os.path.exists(flag):
        open(flag, "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.01)
    return got

transport.LocalTransport.read_receipt = paused
from dittohead.cli import main
sys.argv = ["dittohead", *sys.argv[3:]]
main()
"""


def test_sync_reconciling_while_the_daemon_ingests(accounts: Accounts, acct_dir: Path) -> None:
    """A sync that looks for the receipt of its earlier submission just before the daemon ingests
    it (the receipt written in step 9, the uploader's folder removed in step 10), then looks at
    the inbox: the submission was ingested, and the sync must say so, not that it "left the inbox
    without a receipt", nor send its files again. The kill loop above runs into this only by
    chance; here the client is held between its two looks."""
    daemon, up = accounts.daemon, accounts.up_a
    srv = make_dir(acct_dir / "srv", daemon, 0o755)
    root = srv / "root"
    for args in (["init", "--store", root], ["study", "add", "s", "--store", root]):
        cp = accounts.run_as(daemon, *args)
        assert cp.returncode == 0, cp.stderr
    job = Job(up, "s", make_dir(acct_dir / "src", up, 0o700), "a", "Lab A")
    put(job, "a/trial.csv", b"first")
    put(job, "a/other.csv", b"unchanged")
    record(job, dict(job.files), sync(accounts, job, root), "first sync")
    assert len(job.submissions) == 1
    put(job, "a/trial.csv", b"second")

    flag, go = up.home / "reconciling", up.home / "go-on"
    result: list[subprocess.CompletedProcess] = []
    thread = threading.Thread(target=lambda: result.append(accounts.python_as(
        up, RECONCILE_RACE, flag, go, "sync", job.src, "--study", "s", "--to", root,
        "--site", "Lab A")))
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not flag.exists() and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert flag.exists(), f"the sync never looked for a receipt: {result}"
        cp = accounts.run_as(daemon, "watch", "--store", root, "--once")
        assert cp.returncode == 0 and "ingested s/" in cp.stdout, cp.stdout + cp.stderr
    finally:
        go.touch()
        thread.join(timeout=120)
    out = result[0].stdout + result[0].stderr
    assert result[0].returncode == 0, out
    assert LOST_NOTE not in out, out
    assert f"earlier submission {job.submissions[0]} was ingested" in out, out
    assert "0 new, 1 changed" in out, f"files were sent again:\n{out}"
