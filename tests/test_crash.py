"""Crash safety with real processes killed by SIGKILL at random instants.

(a) The client: ``sync`` killed mid-run, then run again to completion, then ingested: every
    file reads back byte-identical, each file's content is a new version exactly once, fsck is
    clean, and nothing is left in the inbox. A killed client must not leave a lock or cache
    behind that breaks the next run; the next run resumes its staging folder (also checked on
    its own, deterministically: test_killed_sync_is_resumed_by_the_next).
(b) The daemon: ``watch --once`` killed mid-run, then run again: every submission is ingested
    exactly once (invariant 2), every byte reads back, ``fsck --read-data`` is clean.

Runs are seeded (DITTOHEAD_CRASH_SEED, default 20261121; DITTOHEAD_CRASH_RUNS, default 20) so
that a failure reproduces as far as timing allows: the failing run's seed and kill delays are in
the assertion message. Kill delays are drawn from the measured run times (median of three
calibration runs), half of them over the window in which the client writes to the inbox.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import Server, describe, write_file

from dittohead import format as fmt

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)"),
]

BASE_SEED = int(os.environ.get("DITTOHEAD_CRASH_SEED", "20261121"))
RUNS = int(os.environ.get("DITTOHEAD_CRASH_RUNS", "20"))
MiB = 1024 * 1024


def make_tree(
    top: Path, rng: random.Random, small: int, big: list[int], prefix: str = ""
) -> dict[str, bytes]:
    """A source of `small` small files in nested folders plus files of the `big` sizes."""
    files: dict[str, bytes] = {}
    for i in range(small):
        folder = f"{prefix}session {i % 7:02d}/block {i % 3}"
        files[f"{folder}/trial_{i:04d}.csv"] = rng.randbytes(
            rng.choice([0, 17, 900, 4096, rng.randint(1, 40_000)])
        )
    for n, size in enumerate(big):
        files[f"{prefix}raw/recording_{n}.bdf"] = rng.randbytes(size)
    for rel, data in files.items():
        write_file(top / rel, data)
    return files


def kill_after(proc: subprocess.Popen, delay: float) -> int | None:
    """SIGKILL proc after delay seconds; returns its exit code if it finished first, else None."""
    try:
        return proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None


def calibrate(server: Server, *args: object) -> tuple[float, float, float]:
    """Run ``python -m dittohead ARGS`` (a sync) once to completion, watching the inbox.

    Returns (seconds the run took, seconds until its staging folder appeared, seconds until
    the submission was committed); the two instants fall back to the bounds if missed."""
    inbox = server.dropbox("inbox")
    start = time.monotonic()
    proc = server.popen(*args, stderr=subprocess.PIPE)
    t_stage = t_commit = None
    while proc.poll() is None:
        names = os.listdir(inbox)
        now = time.monotonic() - start
        if t_stage is None and any(n.startswith(".") for n in names):
            t_stage = now
        if t_commit is None and any(not n.startswith(".") for n in names):
            t_commit = now
        time.sleep(0.001)
    took = time.monotonic() - start
    _out, err = proc.communicate()
    assert proc.returncode == 0, err
    return took, t_stage if t_stage is not None else 0.0, t_commit if t_commit is not None else took


def timed(server: Server, *args: object) -> float:
    start = time.monotonic()
    cp = server.proc(*args)
    assert cp.returncode == 0, describe(cp)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def startup(tmp_path_factory: pytest.TempPathFactory) -> float:
    """Seconds a bare ``python -m dittohead --help`` takes (imports, before any work)."""
    server = Server(tmp_path_factory.mktemp("startup"))
    return min(timed(server, "--help") for _ in range(2))


# -- (a) the client killed ------------------------------------------------------------------


@pytest.fixture(scope="module")
def client_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    top = tmp_path_factory.mktemp("crash-src") / "src"
    # Big enough for two upload packs (16 MiB each), so that there is a staging folder to crash
    # in for a good part of the run.
    files = make_tree(top, random.Random(BASE_SEED), small=300, big=[14 * MiB + 3, 9 * MiB])
    return top, files


def test_sync_killed_at_random_instants(
    client_source: tuple[Path, dict[str, bytes]], startup: float, tmp_path: Path
) -> None:
    src, files = client_source
    # A typical complete run, on a root of its own: how long it takes, and when it writes.
    runs = []
    for n in range(3):
        calib = Server(tmp_path / f"calibration{n}").init()
        runs.append(calibrate(calib, *calib.sync_args(src)))
    typical, t_stage, t_commit = (sorted(column)[1] for column in zip(*runs))  # medians

    # At least RUNS runs in which a process was really killed (a kill that comes after the
    # process finished does not count), at most 2 * RUNS runs in all.
    outcomes = {"killed": 0, "finished first": 0}
    killed_runs = 0
    for i in range(2 * RUNS):
        if killed_runs >= RUNS:
            break
        seed = BASE_SEED + i
        rng = random.Random(seed)
        with tempfile.TemporaryDirectory(prefix="dittohead-crash-a-") as tmp:
            server = Server(Path(tmp)).init()
            delays, killed_here = [], False
            for _ in range(rng.choice([1, 1, 2])):
                # Half the kills anywhere in a run, half while it writes to the inbox.
                if rng.random() < 0.5:
                    delay = rng.uniform(startup / 2, typical)
                else:
                    delay = rng.uniform(t_stage, min(t_commit + 0.05, typical))
                delays.append(round(delay, 3))
                code = kill_after(server.popen(*server.sync_args(src, site="lab")), delay)
                assert code in (None, 0), f"seed {seed}: killed sync exited {code} on its own"
                outcomes["killed" if code is None else "finished first"] += 1
                killed_here = killed_here or code is None
            killed_runs += killed_here
            where = (
                f"seed {seed}, kill delays {delays}s (typical run {typical:.2f}s, "
                f"staging at {t_stage:.2f}s, commit at {t_commit:.2f}s)"
            )

            finish = server.run(*server.sync_args(src, site="lab"))
            assert finish.exit_code == 0, (
                f"{where}: sync after the crash failed\n{describe(finish)}"
            )
            ingest = server.run("watch", "--store", server.root, "--once")
            assert ingest.exit_code == 0, f"{where}: ingest failed\n{describe(ingest)}"
            assert os.listdir(server.dropbox("failed")) == [], where
            # The finishing sync resumed (or removed) what the killed one left: nothing remains.
            assert server.inbox_entries() == [], where

            # Each file's content is a new version once, however many submissions carried it.
            log = server.log()
            assert sum(s["new_versions"] for s in log) == len(files), f"{where}: {log}"
            check_files(server, files, where)
            fsck = server.fsck()
            assert fsck.exit_code == 0, f"{where}: fsck after a killed client\n{describe(fsck)}"
    assert killed_runs >= RUNS // 2, f"too few runs were really killed: {outcomes}"


def check_files(server: Server, files: dict[str, bytes], where: str) -> None:
    """Every file has exactly one version, and it reads back byte-identical."""
    for rel in sorted(files):
        listed = server.versions(rel)
        assert len(listed) == 1, f"{where}: {rel!r} has versions {listed}"
        got = server.cat(rel)
        assert got == files[rel], (
            f"{where}: {rel!r} read back {len(got)} bytes, sent {len(files[rel])}"
        )


# -- (b) the daemon killed ------------------------------------------------------------------


@pytest.fixture(scope="module")
def inbox_template(tmp_path_factory: pytest.TempPathFactory):
    """A server root whose inbox holds four committed submissions, none ingested: three from
    one client (a first sync, then edits, then additions) and one from a second client at
    another site whose files share content (and so chunks) with the first's."""
    base = tmp_path_factory.mktemp("crash-b")
    rng = random.Random(BASE_SEED + 1000)
    server_a = Server(base, state=base / "state-a").init()
    src_a = base / "src-a"
    history: dict[str, list[bytes]] = {}

    def record(files: dict[str, bytes]) -> None:
        for rel, data in files.items():
            versions = history.setdefault(rel, [])
            if not versions or versions[-1] != data:
                versions.append(data)

    names = []
    files = make_tree(src_a, rng, small=150, big=[4 * MiB + 1, 2 * MiB])
    record(files)
    names.append(server_a.sync(src_a, site="lab A").submission)

    changed = {}
    for rel in rng.sample(sorted(files), 25):
        changed[rel] = files[rel] + rng.randbytes(rng.randint(1, 3000))
    big = "raw/recording_0.bdf"
    changed[big] = files[big][: 2 * MiB] + b"EDIT" + files[big][2 * MiB + 4 :]
    for rel, data in changed.items():
        write_file(src_a / rel, data)
    files.update(changed)
    record(changed)
    names.append(server_a.sync(src_a, site="lab A").submission)

    added = {f"later/extra {i:03d}.txt": rng.randbytes(rng.randint(0, 20_000)) for i in range(20)}
    for rel, data in added.items():
        write_file(src_a / rel, data)
    record(added)
    names.append(server_a.sync(src_a, site="lab A").submission)

    server_b = Server(base, state=base / "state-b")  # the same root, another client
    src_b = base / "src-b"
    shared = {f"from b/{Path(rel).name}": data for rel, data in list(files.items())[:40]}
    shared["from b/copy.bdf"] = files["raw/recording_1.bdf"]
    for rel, data in shared.items():
        write_file(src_b / rel, data)
    record(shared)
    names.append(server_b.sync(src_b, site="lab B").submission)

    committed = [n for n in names if n is not None]
    assert len(set(committed)) == 4, names
    assert sorted(server_a.inbox_entries()) == sorted(committed)
    return base, committed, history


def copy_root(template: Path, dest: Path) -> Server:
    shutil.copytree(template / "root", dest / "root", symlinks=True)
    return Server(dest)


def test_watch_killed_at_random_instants(inbox_template, startup: float, tmp_path: Path) -> None:
    template, names, history = inbox_template

    # Complete, uninterrupted ingests: the reference, and the typical (median) run time.
    took = []
    for n in range(3):
        reference = copy_root(template, tmp_path / f"reference{n}")
        start = time.monotonic()
        cp = reference.proc("watch", "--store", reference.root, "--once")
        took.append(time.monotonic() - start)
        assert cp.returncode == 0, describe(cp)
        assert sorted(s["name"] for s in reference.log()) == sorted(names)
    typical = sorted(took)[1]

    # At least RUNS runs in which a process was really killed (a kill that comes after the
    # process finished does not count), at most 2 * RUNS runs in all.
    outcomes = {"killed": 0, "finished first": 0}
    killed_runs = 0
    for i in range(2 * RUNS):
        if killed_runs >= RUNS:
            break
        seed = BASE_SEED + 500 + i
        rng = random.Random(seed)
        with tempfile.TemporaryDirectory(prefix="dittohead-crash-b-") as tmp:
            server = copy_root(template, Path(tmp))
            delays, killed_here = [], False
            for _ in range(rng.choice([1, 1, 2])):
                delay = rng.uniform(startup / 2, typical)
                delays.append(round(delay, 3))
                code = kill_after(server.popen("watch", "--store", server.root, "--once"), delay)
                assert code in (None, 0), f"seed {seed}: killed watch exited {code} on its own"
                outcomes["killed" if code is None else "finished first"] += 1
                killed_here = killed_here or code is None
            killed_runs += killed_here
            where = f"seed {seed}, kill delays {delays}s (typical run {typical:.2f}s)"

            again = server.run("watch", "--store", server.root, "--once")
            assert again.exit_code == 0, (
                f"{where}: ingest after the crash failed\n{describe(again)}"
            )
            for part in ("inbox", "processing", "failed"):
                left = os.listdir(server.dropbox(part))
                assert left == [], f"{where}: {part}/ still holds {left}"

            log = server.log()
            ingested = [s["name"] for s in log]
            assert sorted(ingested) == sorted(names), f"{where}: log names {ingested}, sent {names}"
            assert [s["seq"] for s in log] == list(range(1, len(names) + 1)), f"{where}: {log}"
            check_history(server, history, where)
            fsck = server.fsck("--read-data")
            assert fsck.exit_code == 0, (
                f"{where}: fsck --read-data after a killed ingest\n{describe(fsck)}"
            )
    assert killed_runs >= RUNS // 2, f"too few runs were really killed: {outcomes}"


def check_history(server: Server, history: dict[str, list[bytes]], where: str) -> None:
    """Every path holds exactly its distinct contents as versions, each readable byte-identical.

    The server may order submissions that were waiting together in any way, so versions are
    compared as a multiset of contents (no path in the template reverts to an older content)."""
    for rel in sorted(history):
        expected = history[rel]
        listed = server.versions(rel)
        assert len(listed) == len(expected), (
            f"{where}: {rel!r} has {len(listed)} versions, expected {len(expected)}"
        )
        got = [server.cat(rel, version=v["version"]) for v in listed]
        assert sorted(got) == sorted(expected), (
            f"{where}: {rel!r} read back other bytes than were sent"
        )


# -- resuming an interrupted upload ---------------------------------------------------------------


def kill_sync_with_a_pack_staged(server: Server, src: Path) -> str:
    """Writes 48 MiB into ``src``, starts a sync of it, and kills it (SIGKILL) as soon as a
    complete pack is in its staging folder; returns that folder's name (".NAME")."""
    rng = random.Random(BASE_SEED + 7)
    for i in range(3):
        write_file(src / f"raw/part{i}.bin", rng.randbytes(16 * MiB))
    proc = server.popen(*server.sync_args(src))
    inbox = server.dropbox("inbox")
    caught = None
    deadline = time.monotonic() + 60
    while caught is None and proc.poll() is None and time.monotonic() < deadline:
        for name in os.listdir(inbox):
            if name.startswith(".") and any(
                fmt.PACK_FILE_RE.match(f) for f in os.listdir(inbox / name)
            ):
                caught = name
        if caught is None:
            time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if caught is None:
        pytest.skip(
            "the sync finished before a complete pack could be caught in its staging folder"
        )
    return caught


def test_killed_sync_is_resumed_by_the_next(tmp_path: Path) -> None:
    """A sync killed after a complete pack reached its staging folder: the next sync carries
    on in that folder (the help: "An interrupted run is resumed by the next one"), so nothing
    is left behind in the inbox and the complete pack is not sent again."""
    src = tmp_path / "src"
    server = Server(tmp_path).init()
    caught = kill_sync_with_a_pack_staged(server, src)
    inbox = server.dropbox("inbox")
    staged = {
        f: (inbox / caught / f).stat().st_size
        for f in os.listdir(inbox / caught)
        if fmt.PACK_FILE_RE.match(f)
    }

    again = server.sync(src)
    assert again.submission is not None, again.output
    assert server.inbox_entries() == [again.submission], "a staging folder was left behind"
    assert again.submission == caught.lstrip("."), "the interrupted submission was not resumed"
    for f, size in staged.items():
        assert (inbox / again.submission / f).stat().st_size == size
    server.ingest()
    for i in range(3):
        assert server.cat(f"raw/part{i}.bin") == (src / f"raw/part{i}.bin").read_bytes()


def test_a_killed_sync_whose_files_are_gone_leaves_no_staging_folder(tmp_path: Path) -> None:
    """The collector deletes what a killed sync was sending: the next sync has nothing to send,
    says so, and removes the unfinished staging folder instead of committing it."""
    src = tmp_path / "src"
    server = Server(tmp_path).init()
    kill_sync_with_a_pack_staged(server, src)
    for f in (src / "raw").iterdir():
        f.unlink()
    again = server.sync(src)
    assert again.submission is None, again.output
    assert "nothing to send" in again.output
    assert server.inbox_entries() == [], "the unfinished staging folder was left behind"
    assert server.ingest().exit_code == 0
    assert server.log() == []
