"""The watch daemon (``dittohead watch`` without --once), run as it runs on a server: as the daemon's
own non-root account (tests/accounts.py), fed by uploader accounts that sync into the drop box.

- a commit is ingested within 2 seconds when the daemon is idle (timed from the moment the
  committed name appears in the inbox, by a 2 ms poll as root, to the receipt's appearance); a
  study added while it runs is watched without a restart; a second daemon names the pid that runs;
  SIGHUP with a bad watch.json keeps it running on its old configuration;
- SIGKILL at seeded random instants while it ingests (the whole process group, or the main
  process alone, whose workers then finish on their own), restarted each time: every submission
  ingested exactly once, ``fsck --read-data`` clean, after each run;
- one study fed a huge submission whose worker is stopped (SIGSTOP) in the middle of its
  verification: another study's submission is ingested within seconds all the same;
- SIGTERM while a submission is verified: exit 0 within the bound, the submission ingested or
  waiting, never half, its attempt not counted;
- a worker killed alone (SIGKILL): that submission loses one attempt, the daemon goes on (and with
  --max-attempts 2, two such kills set the submission aside);
- ``watch --once`` run beside the daemon: each submission ingested once;
- the worker's stop, in-process: SIGTERM while a submission is verified stops it at once (its
  attempt not counted, its copies gone); SIGTERM within a commit waits for the commit.

Seeded: DITTOHEAD_WATCH_SEED (default 20261121), DITTOHEAD_WATCH_KILLS (default 20, at least 20).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import signal
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from accounts import Account, Accounts, make_dir
from conftest import SUBMISSION_RE

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

SEED = int(os.environ.get("DITTOHEAD_WATCH_SEED", "20261121"))
KILLS = max(20, int(os.environ.get("DITTOHEAD_WATCH_KILLS", "20")))
MiB = 1024 * 1024
STOP_BOUND = 30.0  # the daemon's own: from SIGTERM to its exit (watch --help)
TMP_LEFT = re.compile(r"^(have|receipts)/\.tmp-[0-9a-f]+$")


def describe(cp: subprocess.CompletedProcess) -> str:
    return f"args={cp.args!r}\nexit={cp.returncode}\nstdout={cp.stdout!r}\nstderr={cp.stderr!r}"


def wait_for(pred: Callable[[], Any], timeout: float, what: str, poll: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:g} s for {what}")
        time.sleep(poll)


def listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


@dataclass
class Daemon:
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self) -> list[dict]:
        out = []
        for line in self.log.read_text("utf-8", "replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"kind": "text", "message": line})
        return out

    def said(self, what: str) -> list[dict]:
        return [e for e in self.events() if e.get("what") == what or e.get("kind") == what]

    def text(self) -> str:
        return self.log.read_text("utf-8", "replace")


@dataclass
class Site:
    accounts: Accounts
    base: Path
    root: Path
    sources: dict[tuple[str, str], Path] = field(default_factory=dict)
    lives: int = 0

    @property
    def daemon(self) -> Account:
        return self.accounts.daemon

    def box(self, study: str, part: str = "") -> Path:
        return self.root / "dropbox" / study / part if part else self.root / "dropbox" / study

    def as_daemon(self, *args: object, expect: int | None = 0, timeout: float = 300) -> subprocess.CompletedProcess:
        cp = self.accounts.run_as(self.daemon, *args, timeout=timeout)
        if expect is not None:
            assert cp.returncode == expect, describe(cp)
        return cp

    def add_study(self, name: str, *extra: object) -> None:
        self.as_daemon("study", "add", name, "--store", self.root, *extra)

    def source(self, who: Account, study: str) -> Path:
        key = (who.role, study)
        if key not in self.sources:
            self.sources[key] = make_dir(self.base / f"src-{who.role}-{study}", who, 0o700)
        return self.sources[key]

    def write(self, who: Account, study: str, rel: str, data: bytes) -> None:
        path = self.source(who, study) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for d in [path.parent, *path.parent.parents]:
            if d == self.source(who, study):
                break
            os.chown(d, who.uid, who.gid)
        path.write_bytes(data)
        os.chown(path, who.uid, who.gid)

    def sync(self, who: Account, study: str) -> str:
        cp = self.accounts.run_as(who, "sync", self.source(who, study), "--study", study, "--to", self.root,
                                  "--site", f"lab-{who.role}", timeout=300)
        assert cp.returncode == 0 and "Traceback" not in cp.stderr, describe(cp)
        m = SUBMISSION_RE.search(cp.stdout)
        assert m, f"sync made no submission:\n{describe(cp)}"
        return m.group(1)

    def submit(self, who: Account, study: str, size: int = 2000, rng: random.Random | None = None) -> str:
        rng = rng or random.Random()
        self.write(who, study, f"trial_{time.time_ns()}.csv", rng.randbytes(size))
        return self.sync(who, study)

    def start(self, *extra: object) -> Daemon:
        self.lives += 1
        log = self.base / f"daemon-{self.lives:02d}.log"
        with open(log, "wb") as out:
            p = self.accounts.spawn_as(self.daemon, "watch", "--store", self.root, "--log-json", *extra,
                                       stdout=out, stderr=out)
        d = Daemon(p, log)
        wait_for(lambda: d.said("started") or p.poll() is not None, 60, "the daemon's start")
        assert p.poll() is None, d.text()
        return d

    def stop(self, d: Daemon, sig: int = signal.SIGTERM) -> float:
        t0 = time.monotonic()
        os.kill(d.pid, sig)
        code = d.proc.wait(timeout=STOP_BOUND + 30)
        took = time.monotonic() - t0
        assert code == 0, f"exit {code} after SIGTERM:\n{d.text()}"
        assert took < STOP_BOUND, f"took {took:.1f} s to stop"
        return took

    def receipt(self, study: str, name: str) -> bool:
        return (self.box(study, "receipts") / name).exists()

    def logged(self, study: str) -> list[str]:
        cp = self.as_daemon("log", "--store", self.root, "--study", study, "--json")
        return [s["name"] for s in json.loads(cp.stdout)["submissions"]]

    def assert_sound(self, where: str = "") -> None:
        """fsck --read-data finds nothing; but a warning about a temporary file that a kill left
        in a drop box's have/ (fsck reads it as a have-segment), which is noted."""
        cp = self.as_daemon("fsck", "--store", self.root, "--read-data", "--json", expect=None)
        doc = json.loads(cp.stdout)
        left = [f for f in doc["findings"] if f["severity"] == "warning" and TMP_LEFT.match(f["object"])]
        if left:
            print(f"\n{where}: fsck: a kill's temporary file: {[f['object'] for f in left]}")
        rest = [f for f in doc["findings"] if f not in left]
        assert cp.returncode == 0 and rest == [], f"{where}\n{describe(cp)}"

    def assert_exactly_once(self, sent: dict[str, list[str]], where: str = "") -> None:
        for study, names in sent.items():
            got = self.logged(study)
            twice = sorted(n for n, k in Counter(got).items() if k > 1)
            assert not twice, f"{where}: study {study}: ingested more than once: {twice}"
            assert sorted(got) == sorted(names), f"{where}: study {study}: log {got}, sent {names}"
            for part in ("inbox", "processing", "failed"):
                left = [n for n in listdir(self.box(study, part)) if not n.startswith(".")]
                assert left == [], f"{where}: {study}/{part}/ holds {left}"

    def worker_pids(self, study: str) -> list[int]:
        """The pids of the workers at ``study`` now (from /proc, as root)."""
        out = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"dittohead.daemon.worker" in argv and os.fsencode(str(self.root)) in argv and study.encode() in argv:
                out.append(int(pid))
        return out

    def store_lock_free(self) -> bool:
        fd = os.open(self.root / "store" / "lock", os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)


@pytest.fixture
def site(accounts: Accounts, acct_dir: Path) -> Site:
    srv = make_dir(acct_dir / "srv", accounts.daemon, 0o755)
    s = Site(accounts, make_dir(acct_dir / "work", accounts.daemon, 0o755), srv / "root")
    s.as_daemon("init", "--store", s.root)
    s.add_study("s")
    return s


class InboxClock:
    """When each committed name first shows in the studies' inboxes, and when its receipt does:
    a 2 ms poll, as root."""

    def __init__(self, site: Site, studies: list[str]) -> None:
        self.site, self.studies = site, studies
        self.committed: dict[str, float] = {}
        self.received: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for study in self.studies:
                for n in listdir(self.site.box(study, "inbox")):
                    if not n.startswith("."):
                        self.committed.setdefault(n, now)
                for n in listdir(self.site.box(study, "receipts")):
                    self.received.setdefault(n, now)
            time.sleep(0.002)

    def latency(self, name: str, timeout: float = 30) -> float:
        wait_for(lambda: name in self.received, timeout, f"the receipt of {name}")
        assert name in self.committed, f"{name}: its commit was never seen in the inbox"
        return self.received[name] - self.committed[name]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# -- idle latency, a study added, one daemon per root, SIGHUP ---------------------------------------


def test_commit_to_receipt_new_study_sighup_and_one_daemon(site: Site) -> None:
    a, b = site.accounts.up_a, site.accounts.up_b
    d = site.start()
    clock = InboxClock(site, ["s", "t"])
    try:
        second = site.as_daemon("watch", "--store", site.root, expect=4)
        assert f"pid {d.pid}" in second.stderr and len(second.stderr.strip().splitlines()) == 1, describe(second)

        latencies = []
        for i in range(5):
            time.sleep(0.3)  # idle
            name = site.submit(a if i % 2 else b, "s")
            latencies.append(clock.latency(name))
        print(f"\ncommit to receipt, idle daemon: {[round(x, 3) for x in latencies]} s")
        assert statistics.median(latencies) < 2.0, latencies
        assert max(latencies) < 5.0, latencies

        # A study added while the daemon runs: watched at once (the rescan is a minute away).
        site.add_study("t", "--uploaders", site.accounts.ga.name)
        time.sleep(0.3)
        name_t = site.submit(a, "t")
        took = clock.latency(name_t)
        assert took < 5.0, f"the new study's first submission took {took:.2f} s:\n{d.text()}"

        # SIGHUP with a watch.json the daemon cannot use: one line, and it goes on as it was.
        conf = site.root / "daemon" / "watch.json"
        conf.write_text('{"workers": 0}')
        os.chown(conf, site.daemon.uid, site.daemon.gid)
        os.chmod(conf, 0o600)
        os.kill(d.pid, signal.SIGHUP)
        wait_for(lambda: d.said("reload_failed"), 10, "the reload's failure")
        (failed,) = d.said("reload_failed")
        assert "'workers' must be" in failed["message"], failed
        name = site.submit(b, "s")
        assert clock.latency(name) < 5.0
        conf.write_text('{"workers": 3, "rescan_seconds": 30}')
        os.kill(d.pid, signal.SIGHUP)
        wait_for(lambda: d.said("reloaded"), 10, "the reload")
        assert "up to 3 workers" in d.said("reloaded")[0]["message"]
        assert d.proc.poll() is None, d.text()

        def state() -> dict:
            return json.loads((site.root / "daemon" / "state.json").read_text())

        wait_for(lambda: state()["workers_max"] == 3, 5, "state.json to show the new configuration")
        assert state()["pid"] == d.pid and state()["stopped_ns"] is None
        assert state()["studies"]["t"]["last_seq"] == 1, state()
    finally:
        clock.close()
    took = site.stop(d)
    state = json.loads((site.root / "daemon" / "state.json").read_text())
    assert state["stopped_ns"] and state["studies"]["s"]["last_seq"] == 6, state
    ingested = [e for e in d.events() if e.get("kind") == "ingested"]
    assert len(ingested) == 7 and all(e["site"].startswith("lab-") and e["files"] == 1 for e in ingested)
    assert not [e for e in d.events() if e.get("kind") in ("rejected", "held", "text")], d.text()
    assert os.stat(site.root / "daemon").st_mode & 0o777 == 0o700
    print(f"stopped in {took:.2f} s")
    site.assert_sound()


# -- SIGKILL at random instants -------------------------------------------------------------------


@pytest.mark.slow
def test_killed_at_random_instants_and_restarted(site: Site) -> None:
    """KILLS runs: submissions synced while the daemon runs; SIGKILL at a seeded random instant,
    either 0-20 ms after an ingest is first seen to begin (a folder in processing/) or 0-250 ms
    after the first commit is seen in an inbox, to the whole process group or to the main process
    alone (its workers then finish what they hold); now and then the restarted daemon is killed
    again during its start-up; then it is started again and, once it has ingested everything,
    each submission is in its study's log exactly once and fsck --read-data is clean."""
    a, b = site.accounts.up_a, site.accounts.up_b
    site.add_study("t", "--uploaders", site.accounts.ga.name)
    rng = random.Random(SEED)
    jobs = [(a, "s"), (b, "s"), (a, "t")]
    sent: dict[str, list[str]] = {"s": [], "t": []}
    landed: Counter[str] = Counter()
    start = time.monotonic()
    d = site.start("--max-attempts", "1000")

    def processing() -> dict[str, list[str]]:
        return {f"{st}/{n}": listdir(site.box(st, "processing") / n)
                for st in sent for n in listdir(site.box(st, "processing"))}

    def committed() -> bool:
        return any(not n.startswith(".") for st in sent for n in listdir(site.box(st, "inbox"))) or any(
            n not in sent[st] for st in sent for n in listdir(site.box(st, "receipts")))

    for run in range(KILLS):
        where = f"seed {SEED}, run {run}"
        batch = [rng.choice(jobs) for _ in range(rng.randint(1, 3))]
        sizes = [rng.choice([100, 5000, 300_000, 3 * MiB, 12 * MiB]) for _ in batch]
        seeds = [rng.random() for _ in batch]
        on_work = rng.random() < 0.7
        delay = rng.uniform(0.0, 0.02) if on_work else rng.uniform(0.0, 0.25)
        group = rng.random() < 0.75
        again = rng.random() < 0.25
        names: list[tuple[str, str]] = []

        def feed(batch: list = batch, sizes: list = sizes, seeds: list = seeds,
                 names: list = names) -> None:
            for (who, study), size, seed in zip(batch, sizes, seeds):
                names.append((study, site.submit(who, study, size, random.Random(seed))))

        feeder = threading.Thread(target=feed)
        feeder.start()
        look = processing if on_work else committed
        wait_for(lambda look=look, feeder=feeder: look() or not feeder.is_alive(), 120,
                 f"{where}: {'an ingest' if on_work else 'a commit'}", poll=0.001)
        time.sleep(delay)
        assert d.proc.poll() is None, f"{where}: the daemon exited on its own:\n{d.text()}"
        if group:
            os.killpg(d.pid, signal.SIGKILL)
        else:
            os.kill(d.pid, signal.SIGKILL)
        d.proc.wait()
        held = processing()
        if not held:
            landed["between ingests"] += 1
        elif any(files == ["manifest"] for files in held.values()):
            landed["after a commit point"] += 1
        else:
            landed["in an ingest"] += 1
        feeder.join(timeout=300)
        assert not feeder.is_alive(), f"{where}: the syncs did not finish"
        for study, name in names:
            sent[study].append(name)
        if again:  # killed again, during its start-up and resume
            d = site.start("--max-attempts", "1000")
            time.sleep(rng.uniform(0.0, 0.3))
            os.killpg(d.pid, signal.SIGKILL)
            d.proc.wait()
            landed["at start-up"] += 1
        d = site.start("--max-attempts", "1000")
        wait_for(lambda: all(site.receipt(st, n) for st in sent for n in sent[st])
                 and not processing(), 120, f"{where}: every receipt after the restart")
        text = d.text()
        assert "Traceback" not in text and '"rejected"' not in text, f"{where}:\n{text}"
        site.assert_exactly_once(sent, where)
        site.assert_sound(where)
    site.stop(d)
    print(f"\n{KILLS} kills in {time.monotonic() - start:.1f} s: {dict(landed)}; "
          f"{sum(len(v) for v in sent.values())} submissions")
    assert landed["in an ingest"] + landed["after a commit point"] >= KILLS // 5, (
        f"too few kills landed in an ingest: {dict(landed)}")


# -- studies are independent ----------------------------------------------------------------------


def _big(site: Site, who: Account, study: str, size: int, seed: int) -> str:
    """A submission of one file of ``size`` random bytes (written 16 MiB at a time)."""
    rng = random.Random(seed)
    site.write(who, study, f"raw/recording_{seed}.bin", b"")
    with open(site.source(who, study) / "raw" / f"recording_{seed}.bin", "wb") as f:
        f.writelines(rng.randbytes(min(16 * MiB, size - at)) for at in range(0, size, 16 * MiB))
    return site.sync(who, study)


def _catch_worker(site: Site, study: str, name: str, attempt: int = 1, timeout: float = 60) -> int:
    """The pid of the worker at ``study``/``name``, caught while it takes and verifies it in its
    ``attempt``-th attempt (its STATE says so, and it has copied a pack since)."""
    processing = site.box(study, "processing") / name

    def taking() -> bool:
        try:
            state = processing / "STATE"
            if json.loads(state.read_text())["attempts"] != attempt:
                return False
            since = state.stat().st_mtime_ns
            return any(f.endswith(".pack") and (processing / f).stat().st_mtime_ns >= since
                       for f in listdir(processing))
        except (OSError, ValueError, KeyError):
            return False

    wait_for(taking, timeout, f"the worker to take {name} (attempt {attempt})", poll=0.002)
    (pid,) = wait_for(lambda: site.worker_pids(study), 5, f"the worker of {study}", poll=0.002)
    return pid


@pytest.mark.slow
def test_a_huge_submission_does_not_hold_up_another_study(site: Site) -> None:
    a, b = site.accounts.up_a, site.accounts.up_b
    site.add_study("big", "--uploaders", site.accounts.ga.name)
    d = site.start()
    big = _big(site, a, "big", 300 * MiB, 1)
    pid = _catch_worker(site, "big", big)
    os.kill(pid, signal.SIGSTOP)  # stopped in the middle of its verification
    try:
        assert site.store_lock_free(), "the big submission's worker was caught in its commit"
        t0 = time.monotonic()
        small = site.submit(b, "s", 4000)
        wait_for(lambda: site.receipt("s", small), 30, "the small submission's receipt")
        took = time.monotonic() - t0
        assert not site.receipt("big", big)
        assert took < 10, f"the small submission took {took:.1f} s beside the big one"
        print(f"\nsmall submission synced and ingested in {took:.2f} s while the 300 MiB one was being verified")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: site.receipt("big", big), 300, "the big submission's receipt", poll=0.05)
    site.stop(d)
    site.assert_exactly_once({"s": [small], "big": [big]})
    site.assert_sound()


# -- SIGTERM, and a worker killed alone ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("whom", ["main", "group"])
def test_sigterm_in_the_middle_of_an_ingest(site: Site, whom: str) -> None:
    """SIGTERM to the main process (systemd's KillMode=mixed) or to every process of the daemon
    (KillMode=control-group) while a submission is being verified: exit 0 within the bound; the
    submission is waiting (its attempt not counted) or ingested, never half; the next start
    ingests it once."""
    a = site.accounts.up_a
    d = site.start()
    name = _big(site, a, "s", 120 * MiB, 2)
    _catch_worker(site, "s", name)
    t0 = time.monotonic()
    if whom == "main":
        os.kill(d.pid, signal.SIGTERM)
    else:
        os.killpg(d.pid, signal.SIGTERM)
    code = d.proc.wait(timeout=STOP_BOUND + 30)
    took = time.monotonic() - t0
    assert code == 0 and took < STOP_BOUND, f"exit {code} after {took:.1f} s:\n{d.text()}"
    assert site.worker_pids("s") == [], "a worker outlived the daemon"
    if site.receipt("s", name):
        assert site.logged("s") == [name]
    else:
        assert site.logged("s") == []
        assert name in listdir(site.box("s", "inbox"))
        state = site.box("s", "processing") / name / "STATE"
        if state.exists():
            assert json.loads(state.read_text())["attempts"] == 0, "a stopped attempt was counted"
            assert listdir(site.box("s", "processing") / name) == ["STATE"]
    print(f"\nSIGTERM ({whom}) to exit 0 in {took:.2f} s; ingested: {site.receipt('s', name)}")
    site.assert_sound()
    d = site.start()
    wait_for(lambda: site.receipt("s", name), 120, "the ingest after the restart", poll=0.05)
    site.stop(d)
    site.assert_exactly_once({"s": [name]})
    site.assert_sound()


@pytest.mark.slow
def test_a_killed_worker_costs_its_submission_one_attempt(site: Site) -> None:
    a = site.accounts.up_a
    d = site.start()
    name = _big(site, a, "s", 100 * MiB, 3)
    pid = _catch_worker(site, "s", name)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: d.said("worker_died"), 10, "the daemon to tell of its worker's death")
    (died,) = d.said("worker_died")
    assert f"pid {pid}" in died["message"] and "killed by SIGKILL" in died["message"], died
    assert "that attempt counts (1 of 3)" in died["message"], died
    wait_for(lambda: site.receipt("s", name), 120, "the ingest by the next worker", poll=0.05)
    assert d.proc.poll() is None
    site.stop(d)
    assert site.logged("s") == [name]

    # Twice with --max-attempts 2: set aside, rejected with that reason; the daemon goes on.
    d = site.start("--max-attempts", "2")
    name = _big(site, a, "s", 100 * MiB, 4)
    for n in (1, 2):
        pid = _catch_worker(site, "s", name, attempt=n)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda n=n: len(d.said("worker_died")) == n, 10, f"death {n} told")
        assert f"that attempt counts ({n} of 2)" in d.said("worker_died")[-1]["message"]
    rejected = wait_for(lambda: [e for e in d.events() if e.get("kind") == "rejected"], 30, "the rejection")
    assert rejected[0]["submission"] == name and "during each of 2 attempts" in rejected[0]["reason"], rejected
    assert listdir(site.box("s", "failed")) == [name]
    other = site.submit(a, "s")
    wait_for(lambda: site.receipt("s", other), 30, "the next submission's ingest")
    site.stop(d)
    site.assert_sound()


# -- watch --once beside the daemon ------------------------------------------------------------------


def test_watch_once_beside_the_daemon(site: Site) -> None:
    a, b = site.accounts.up_a, site.accounts.up_b
    site.add_study("t")
    d = site.start()
    sent: dict[str, list[str]] = {"s": [], "t": []}
    rng = random.Random(SEED + 7)
    onces: list[subprocess.CompletedProcess] = []
    stop = threading.Event()

    def once_loop() -> None:
        while not stop.is_set():
            onces.append(site.as_daemon("watch", "--store", site.root, "--once", expect=None))

    t = threading.Thread(target=once_loop)
    t.start()
    try:
        for i in range(8):
            study = "s" if i % 3 else "t"
            sent[study].append(site.submit(a if i % 2 else b, study, rng.choice([10, 300_000, 2 * MiB]), rng))
    finally:
        stop.set()
        t.join()
    wait_for(lambda: all(site.receipt(st, n) for st in sent for n in sent[st]), 60, "every receipt")
    for cp in onces:
        assert cp.returncode == 0 and "Traceback" not in cp.stderr, describe(cp)
    by_once = sum(cp.stdout.count("ingested ") for cp in onces)
    site.stop(d)
    by_daemon = len([e for e in d.events() if e.get("kind") == "ingested"])
    assert by_once + by_daemon == 8, (by_once, by_daemon)
    print(f"\n{len(onces)} runs of watch --once beside the daemon: {by_once} ingested by them, {by_daemon} by it")
    site.assert_exactly_once(sent)
    site.assert_sound()


def test_log_file_and_text_lines(site: Site) -> None:
    """--log-file: one line per event, each with its time, the submission's name as sent."""
    a = site.accounts.up_a
    log = site.base / "watch.log"
    with open(log, "wb"):
        pass
    os.chown(log, site.daemon.uid, site.daemon.gid)
    p = site.accounts.spawn_as(site.daemon, "watch", "--store", site.root, "--log-file", log)
    try:
        wait_for(lambda: "watching " in log.read_text(), 60, "the daemon's start")
        name = site.submit(a, "s")
        wait_for(lambda: site.receipt("s", name), 30, "the receipt")
        wait_for(lambda: f"s/{name} ingested as #1 (site lab-upa" in log.read_text(), 5, "the log line")
    finally:
        os.kill(p.pid, signal.SIGTERM)
        assert p.wait(timeout=STOP_BOUND + 30) == 0
    lines = log.read_text().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} ", ln) for ln in lines), lines
    assert "stopped (after" in lines[-1], lines


# -- the worker's stop: at once outside a commit, after it within one (in-process) ---------------------


@pytest.fixture
def one_waiting(server: Any, tmp_path: Path) -> tuple[Any, str]:
    from conftest import write_file

    write_file(tmp_path / "src" / "a.bin", random.Random(5).randbytes(3 * MiB))
    return server, server.sync(tmp_path / "src").submission


def _run_worker_ingest(server: Any, monkeypatch: pytest.MonkeyPatch, where: str) -> tuple[Any, Any, BaseException | None]:
    """One study run as the worker makes it, with SIGTERM sent to this process at ``where``
    ("verify": while the submission is verified; "commit": inside its commit)."""
    from dittohead.daemon.worker import _StopGuard
    from dittohead.store import ingest
    from dittohead.store.repo import Store

    guard = _StopGuard()
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    guard.install()
    target = {"verify": "_verify", "commit": "_commit"}[where]
    real = getattr(ingest.Ingestor, target)

    def with_sigterm(self: Any, *args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs here, or is deferred
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ingest.Ingestor, target, with_sigterm)
    store = Store.open(str(server.root))
    ing = ingest.Ingestor(store, critical=guard.critical)
    run, raised = None, None
    try:
        run = ing.run_study("s", limit=1)
    except BaseException as e:  # noqa: BLE001 - what is raised is the test's subject
        raised = e
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        ing.close()
        store.close()
    monkeypatch.undo()
    return guard, run, raised


def test_sigterm_while_verifying_stops_at_once_and_the_attempt_does_not_count(
        one_waiting: tuple[Any, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from dittohead.store.ingest import Stopped

    server, name = one_waiting
    guard, _, raised = _run_worker_ingest(server, monkeypatch, "verify")
    assert isinstance(raised, Stopped) and guard.requested
    folder = server.dropbox("processing") / name
    assert listdir(folder) == ["STATE"] and json.loads((folder / "STATE").read_text())["attempts"] == 0
    assert name in listdir(server.dropbox("inbox"))
    assert not (server.dropbox("receipts") / name).exists()
    assert [n for n in listdir(server.root / "store" / "tmp") if not n.startswith(".")] == []
    server.ingest()
    assert [s["name"] for s in server.log()] == [name]


def test_sigterm_during_the_commit_waits_for_it(one_waiting: tuple[Any, str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    server, name = one_waiting
    guard, run, raised = _run_worker_ingest(server, monkeypatch, "commit")
    assert raised is None and guard.requested, raised
    assert [r.ok for r in run.results] == [True]
    assert (server.dropbox("receipts") / name).exists() and listdir(server.dropbox("processing")) == []
    assert [s["name"] for s in server.log()] == [name]
    assert server.fsck("--read-data").exit_code == 0
