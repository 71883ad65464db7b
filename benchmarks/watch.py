#!/usr/bin/env python3
"""Benchmark the watch daemon: commit to receipt, and ingest throughput.

    python benchmarks/watch.py [--workdir DIR] [--scale 1.0] [--samples 30] [--seed 1]
                               [--keep] [--json FILE] [--dittohead PATH] [--no-drop-caches]

The daemon (``dittohead watch --store ROOT``, no --once) runs as its own account, and an uploader
account syncs into its drop box, as docs/server-root.md deploys them (bench.py's throwaway
accounts, imported; as root with useradd; elsewhere everything runs as the bench's own account,
and the output says so). A thread of the bench polls the inbox and the receipts every 2 ms, as
root, and times each submission from the moment its committed name appears in the inbox (the
client's rename of .NAME to NAME) to the moment its receipt appears (the daemon's step 9):

    commit to receipt   a small submission (one 2 KiB file changed), --samples times, the daemon
                        idle in between (0.3 s): median, 90th percentile, min and max
    throughput          bench.py's synthetic study (about 1.1 GiB at scale 1.0: 20,000 small files,
                        200 medium ones, 3 large; its generator, imported), synced whole by the
                        uploader with the page cache dropped first: its bytes over the time from
                        commit to receipt (the sync's own time is shown beside)

It prints the figures and the target (commit to receipt under 1 s), met or missed; it asserts
nothing: the exit status is 1 only when a dittohead step fails. `make bench-watch` runs it.

Dependencies: the standard library and the dittohead package (run it with the project's
virtualenv); bench.py beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # beside this file
    SITE,
    SOURCE_SETTLE,
    STUDY,
    Account,
    Accounts,
    CacheDropper,
    Unavailable,
    account_command,
    account_env,
    default_dittohead,
    fmt_bytes,
    generate_source,
    plan_source,
    prepare_workdir,
    traversable_by_others,
)

TARGET_LATENCY = 1.0  # seconds, commit to receipt of a small submission, idle daemon
IDLE_GAP = 0.3  # seconds the daemon is left idle before each small submission
POLL = 0.002


class Side:
    """How one role runs dittohead: as an account of its own, or as the bench's."""

    def __init__(self, command: list[str], extra_env: dict[str, str], account: Account | None,
                 state: Path) -> None:
        self.command, self.extra_env, self.account, self.state = command, extra_env, account, state

    def env(self) -> dict[str, str]:
        extra = {**self.extra_env, "DITTOHEAD_STATE_DIR": str(self.state)}
        if self.account is None:
            return {**os.environ, **extra, "DITTOHEAD_STORE": ""}
        return account_env(self.account, extra)

    def identity(self) -> dict[str, Any]:
        return self.account.identity() if self.account is not None else {}

    def run(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        cp = subprocess.run([*self.command, *args], capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, env=self.env(), check=False, **self.identity())
        if cp.returncode != 0:
            sys.exit(f"bench: dittohead {' '.join(args[:1])} failed (exit {cp.returncode}):\n{cp.stderr}")
        return cp

    def spawn(self, *args: str, log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            return subprocess.Popen([*self.command, *args], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=self.env(), start_new_session=True,
                                    **self.identity())

    def own(self, path: Path) -> None:
        """Give ``path`` and everything under it to this side's account."""
        if self.account is None:
            return
        for dirpath, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                os.chown(os.path.join(dirpath, name), self.account.uid, self.account.gid, follow_symlinks=False)
        os.chown(path, self.account.uid, self.account.gid)


class Clock:
    """When each committed name first shows in the inbox, and when its receipt does."""

    def __init__(self, box: Path) -> None:
        self.inbox, self.receipts = box / "inbox", box / "receipts"
        self.committed: dict[str, float] = {}
        self.received: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.perf_counter()
            for folder, seen in ((self.inbox, self.committed), (self.receipts, self.received)):
                try:
                    names = os.listdir(folder)
                except OSError:
                    continue
                for n in names:
                    if not n.startswith("."):
                        seen.setdefault(n, now)
            time.sleep(POLL)

    def wait(self, name: str, timeout: float) -> float:
        """Seconds from ``name``'s commit to its receipt."""
        deadline = time.monotonic() + timeout
        while name not in self.received:
            if time.monotonic() > deadline:
                sys.exit(f"bench: no receipt for {name} after {timeout:g} s")
            time.sleep(POLL)
        if name not in self.committed:
            sys.exit(f"bench: the commit of {name} was not seen in the inbox")
        return self.received[name] - self.committed[name]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def submission_of(cp: subprocess.CompletedProcess) -> str:
    for word in reversed(cp.stdout.replace(";", " ").split()):
        if word[:1].isdigit() and "Z-" in word:
            return word
    sys.exit(f"bench: sync named no submission:\n{cp.stdout}{cp.stderr}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="working folder (default: a new one under the temp dir); emptied first")
    p.add_argument("--scale", type=float, default=1.0, help="size of the study (1.0: about 1.1 GiB)")
    p.add_argument("--samples", type=int, default=30, help="small submissions timed (default 30)")
    p.add_argument("--seed", type=int, default=1, help="seed of the synthetic study (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the workdir afterwards")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    p.add_argument("--dittohead", metavar="PATH", default=default_dittohead(),
                   help="the dittohead executable (default: the one beside this Python)")
    p.add_argument("--no-drop-caches", action="store_true", help="do not drop the page cache before the big sync")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dittohead:
        sys.exit("bench: no dittohead executable (give --dittohead PATH)")
    workdir = prepare_workdir(args.workdir)
    os.chmod(workdir, 0o755)
    accounts: Accounts | None = None
    how = "the bench's own account for both sides"
    daemon_side = Side([args.dittohead], {}, None, workdir / "state-daemon")
    uploader_side = Side([args.dittohead], {}, None, workdir / "state-uploader")
    try:
        try:
            blocked = traversable_by_others(workdir)
            if blocked is not None:
                raise Unavailable(f"{blocked} is not searchable by other accounts")
            accounts = Accounts(workdir / "accounts")
            command, extra, _ = account_command(args.dittohead, accounts.daemon, accounts.daemon.home)
            daemon_side = Side(command, extra, accounts.daemon, workdir / "state-daemon")
            uploader_side = Side(command, extra, accounts.uploader, workdir / "state-uploader")
            how = accounts.describe()
        except (Unavailable, RuntimeError, OSError) as e:
            print(f"bench: one account for both sides ({e})", file=sys.stderr)
        return run(args, workdir, daemon_side, uploader_side, how)
    finally:
        if accounts is not None:
            accounts.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")


def run(args: argparse.Namespace, workdir: Path, daemon: Side, uploader: Side, how: str) -> int:
    for side in (daemon, uploader):
        side.state.mkdir(mode=0o700)
        side.own(side.state)
    srv = workdir / "srv"
    srv.mkdir(mode=0o755)
    daemon.own(srv)
    root = srv / "root"
    daemon.run("init", "--store", str(root))
    daemon.run("study", "add", STUDY, "--store", str(root))
    box = root / "dropbox" / STUDY
    log = workdir / "daemon.log"
    proc = daemon.spawn("watch", "--store", str(root), "--log-json", log=log)
    deadline = time.monotonic() + 60
    while '"started"' not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"bench: the daemon did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.01)
    clock = Clock(box)
    figures: dict[str, Any] = {"how": how, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    try:
        # -- commit to receipt, small submissions, idle daemon
        small = workdir / "small"
        small.mkdir(mode=0o700)
        latencies, syncs = [], []
        for i in range(args.samples):
            (small / "trial.csv").write_bytes(os.urandom(2048) + f"{i}\n".encode())
            uploader.own(small)
            time.sleep(IDLE_GAP)
            t0 = time.perf_counter()
            cp = uploader.run("sync", str(small), "--study", STUDY, "--to", str(root), "--site", SITE)
            syncs.append(time.perf_counter() - t0)
            latencies.append(clock.wait(submission_of(cp), 60))
        latencies.sort()
        figures["latency"] = {
            "samples": len(latencies), "median": statistics.median(latencies),
            "p90": latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))],
            "min": latencies[0], "max": latencies[-1], "sync_median": statistics.median(syncs)}

        # -- throughput: the bench's study, synced whole
        src = workdir / "study"
        files = plan_source(args.scale, args.seed)
        generate_source(src, files, args.seed)
        uploader.own(src)
        size = sum(f.size for f in files)
        time.sleep(SOURCE_SETTLE)
        dropper = CacheDropper(not args.no_drop_caches)
        dropper.drop()
        t0 = time.perf_counter()
        cp = uploader.run("sync", str(src), "--study", STUDY, "--to", str(root), "--site", SITE)
        sync_seconds = time.perf_counter() - t0
        ingest = clock.wait(submission_of(cp), 1800)
        figures["throughput"] = {"files": len(files), "bytes": size, "ingest_seconds": ingest,
                                 "bytes_per_second": size / ingest, "sync_seconds": sync_seconds,
                                 "caches": dropper.describe()}
    finally:
        clock.close()
        os.kill(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        figures["stop"] = {"exit": code}
    text = log.read_text(errors="replace")
    if '"rejected"' in text or "Traceback" in text:
        print(text, file=sys.stderr)
        sys.exit("bench: the daemon rejected a submission or failed")
    report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def report(f: dict[str, Any]) -> None:
    lat, thr = f["latency"], f["throughput"]
    met = "met" if lat["median"] < TARGET_LATENCY else "MISSED"
    print(f"dittohead watch: {f['machine']}; {f['how']}")
    print(f"  commit to receipt, small submission, idle daemon ({lat['samples']} samples): median "
          f"{lat['median']:.3f} s, p90 {lat['p90']:.3f} s, min {lat['min']:.3f} s, max {lat['max']:.3f} s "
          f"(target under {TARGET_LATENCY:g} s: {met}); each sync took {lat['sync_median']:.2f} s (median)")
    print(f"  ingest of the synthetic study ({thr['files']:,} files, {fmt_bytes(thr['bytes'])}) from a second "
          f"account: {thr['ingest_seconds']:.2f} s from commit to receipt, {thr['bytes_per_second'] / 1e6:.0f} MB/s; "
          f"its sync took {thr['sync_seconds']:.2f} s ({thr['caches']})")
    print(f"  SIGTERM: exit {f['stop']['exit']}")


if __name__ == "__main__":
    sys.exit(main())
