#!/usr/bin/env python3
"""Benchmark dittohead against rsync, restic and borg on one synthetic study.

    python benchmarks/bench.py [--workdir DIR] [--scale 1.0] [--keep] [--json FILE]

The script builds a deterministic synthetic study (about 1 GiB at scale 1.0), then times, on the
same data and with the page cache dropped before every timed step where the machine allows it:

    initial      the first upload (dittohead: sync + watch --once, each timed, and their sum)
    no change    the same again with nothing changed
    day 2        after rewriting 1% of the small files and 64 KiB in the middle of one big file
    fsck         dittohead fsck --read-data, restic check --read-data, borg check --verify-data

Every tool runs its initial and no-change steps on the pristine source; the day-2 mutation is then
applied once, and every tool runs its day-2 step on the same mutated source.

dittohead runs as the real deployment does where it can (as root, with useradd): two throwaway
accounts are made for the run, a daemon with a group of its own that runs init, study add, watch
and fsck, and an uploader outside that group that owns the source and runs sync ("uploader≠daemon");
they are removed at the end, whatever happens. The same steps also run with everything as the
bench's own account, as before ("same account"), so that both figures come from the same run.
Elsewhere only the second runs, and the output says so.

It prints a table of the figures and the targets from the issue beside them. It asserts nothing:
the exit status is 0 even when a target is missed, and non-zero only when dittohead itself fails a
step (its stderr is shown). A peer that is not installed is reported as such and skipped.

Dependencies: the standard library and blake3 (a dependency of dittohead itself).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import grp
import importlib.util
import json
import os
import platform
import pwd
import random
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import blake3

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

STUDY = "bench"
SITE = "bench"
STEPS = ("initial", "no change", "day 2")
FSCK = "fsck"
ALL_TOOLS = ("dittohead", "rsync", "restic", "borg")

# Every source file gets this mtime, so that runs are reproducible; the files the day-2 mutation
# touches get DAY2_MTIME. Both are well in the past, so no "file is still being written" heuristic
# (a --min-age, a racy-mtime check) can hold a file back.
BASE_MTIME = 1_700_000_000  # 2023-11-14
DAY2_MTIME = BASE_MTIME + 86_400

WRITE_BLOCK = 8 * MiB
# Seconds between the last change to the source (its generation, the chown to the uploader) and
# the first timed step. dittohead's client does not trust its cache for a file changed within 2 s
# of a sync's start (its mtime or ctime may tick again unseen), and would read it once more at
# the next sync; a collector's files are older than that.
SOURCE_SETTLE = 3.0
MUTATION_FRACTION = 0.01
MUTATION_PATCH = 64 * KiB

# The two ways dittohead is run (Measure.setting).
SPLIT = "uploader≠daemon"  # sync as an uploader account; init, study add, watch, fsck as the daemon
SAME = "same account"  # everything as the bench's own account (root under make bench)

# Targets from the issue.
TARGET_FSCK_RATE = 1e9  # bytes per second (1 GB/s)
TARGET_CLIENT_RSS = 100e6  # bytes (100 MB)
TARGET_NO_CHANGE_SPEEDUP = 2.0


# --------------------------------------------------------------------------------------------
# Formatting


def fmt_bytes(n: float | None) -> str:
    """Decimal units (kB, MB, GB), as the targets are stated in them."""
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_seconds(s: float | None) -> str:
    return "-" if s is None else f"{s:.2f}"


def fmt_rate(bytes_per_second: float | None) -> str:
    return "-" if bytes_per_second is None else f"{bytes_per_second / 1e9:.2f} GB/s"


def table(header: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[int] = ()) -> str:
    """A plain text table; the columns whose index is in `right` are right-aligned."""
    rows = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

    def line(r: list[str]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), rule] + [line(r) for r in rows[1:]])


# --------------------------------------------------------------------------------------------
# Running children: wall time, CPU time and peak RSS of each, through os.wait4


@dataclass
class ChildRun:
    argv: list[str]
    returncode: int
    seconds: float
    cpu_seconds: float
    peak_rss: int  # bytes
    stdout: str
    stderr: str


def run_child(argv: Sequence[str], env: dict[str, str], log_stem: Path, timeout: float,
              cwd: Path | None = None, account: Account | None = None) -> ChildRun:
    """Run one command as a fresh child, its output going to log_stem.out / .err.

    The peak RSS comes from the rusage that os.wait4 returns for this one child (on Linux it also
    covers the descendants that the child waited for). The child is killed after `timeout` s.
    With `account`, the child runs as that account (uid, primary and supplementary groups, umask
    022); the bench opens the log files, so the account need not be able to write there.
    """
    out_path, err_path = log_stem.with_suffix(".out"), log_stem.with_suffix(".err")
    identity = account.identity() if account is not None else {}
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=env, cwd=cwd, **identity)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ChildRun(
        argv=list(argv),
        returncode=proc.returncode,
        seconds=seconds,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        peak_rss=usage.ru_maxrss * 1024,  # KiB on Linux
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
    )


def tree_size(path: Path) -> int:
    """Sum of the apparent sizes (st_size) of the regular files under path; 0 if it is missing."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            total += st.st_size
    return total


class CacheDropper:
    """sync, then write 3 to /proc/sys/vm/drop_caches; says once if that is not allowed."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.works: bool | None = None if enabled else False
        self.reason = "" if enabled else "disabled with --no-drop-caches"

    def drop(self) -> None:
        os.sync()
        if not self.enabled or self.works is False:
            return
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            self.works = True
        except OSError as e:
            self.works = False
            self.reason = f"{type(e).__name__}: {e.strerror or e}"
            print(f"caches not dropped ({self.reason}); timings are warm-cache", file=sys.stderr)

    def describe(self) -> str:
        if self.works:
            return "page cache dropped before each timed step"
        return f"caches not dropped ({self.reason or 'not tried'})"


# --------------------------------------------------------------------------------------------
# Accounts: the real deployment runs the daemon and each uploader as accounts of their own
#
# As root, with useradd, the bench makes two throwaway accounts for the run (the same model as
# docs/server-root.md, "The accounts", and as tests/accounts.py, which this file does not import):
#
#     daemon    primary group of its own (gd); runs init, study add, watch --once and fsck
#     uploader  primary group of its own (gu), not a member of gd; owns the source, runs sync
#
# Names are "dhb" + 6 hex digits (the run's tag) + "-" + role. A lock file in /tmp, held (flock)
# from before the first account is made until after the last is gone, marks a live run; a new run
# removes the accounts and groups of every tag whose lock nobody holds (a run that was killed),
# and nothing that does not match that exact pattern.

SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
SYSTEM_PYTHON = "/usr/bin/python3"
NOLOGIN = "/usr/sbin/nologin"
ACCOUNT_RE = re.compile(r"^(dhb[0-9a-f]{6})-(daemon|uploader|gd|gu)$")
ACCOUNT_LOCK = "/tmp/dittohead-bench-{tag}.lock"
PROBE_CODE = ("import json, sys, dittohead, blake3, pyfastcdc, msgpack, click\n"
              "print(json.dumps({'version': list(sys.version_info[:2]),"
              " 'dittohead': dittohead.__file__}))")


class Unavailable(Exception):
    """Separate accounts cannot be had here; the message says why, in a few words."""


@dataclass
class Account:
    role: str
    name: str
    uid: int
    gid: int  # primary group
    groups: list[int]  # every group a login would get, the primary first
    home: Path  # 0700, the account's own

    def identity(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid, "extra_groups": self.groups, "umask": 0o022}


def _admin(*argv: str) -> None:
    """Run useradd, groupadd, userdel or groupdel; retry while another process holds the account
    files' lock (a test session may be making its accounts at the same moment)."""
    exe = shutil.which(argv[0], path=SBIN_PATH) or argv[0]
    for attempt in range(40):
        cp = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, check=False,
                            stdin=subprocess.DEVNULL, timeout=60)
        if cp.returncode == 0:
            return
        if "lock" not in cp.stderr.lower() or attempt == 39:
            raise RuntimeError(f"{' '.join(argv)}: exit {cp.returncode}: {cp.stderr.strip()}")
        time.sleep(0.25)


def _lock_held(tag: str) -> bool:
    try:
        fd = os.open(ACCOUNT_LOCK.format(tag=tag), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def sweep_stale_accounts() -> list[str]:
    """Remove the accounts and groups of earlier runs that were killed; return their names."""
    users = [(p.pw_name, m) for p in pwd.getpwall() if (m := ACCOUNT_RE.match(p.pw_name))]
    groups = [(g.gr_name, m) for g in grp.getgrall() if (m := ACCOUNT_RE.match(g.gr_name))]
    stale = {m.group(1) for _, m in users + groups if not _lock_held(m.group(1))}
    removed = []
    for kind, found in (("userdel", users), ("groupdel", groups)):  # users first
        for name, m in found:
            if m.group(1) in stale:
                try:
                    _admin(kind, *(["-f"] if kind == "userdel" else []), name)
                    removed.append(name)
                except RuntimeError as e:
                    print(f"bench: could not remove a stale account: {e}", file=sys.stderr)
    for tag in stale:
        with contextlib.suppress(OSError):
            os.unlink(ACCOUNT_LOCK.format(tag=tag))
    return removed


class Accounts:
    """The run's daemon and uploader accounts, with their homes under `base`; close() removes
    them. Raises Unavailable where they cannot be had."""

    daemon: Account
    uploader: Account

    def __init__(self, base: Path) -> None:
        if os.geteuid() != 0:
            raise Unavailable("not root")
        missing = [t for t in ("useradd", "groupadd", "userdel", "groupdel")
                   if not shutil.which(t, path=SBIN_PATH)]
        if missing:
            raise Unavailable(f"no {', '.join(missing)}")
        self.base = base
        self._users: list[str] = []
        self._groups: list[str] = []
        self._lock_fd = -1
        removed = sweep_stale_accounts()
        if removed:
            print(f"bench: removed stale accounts of a killed run: {', '.join(removed)}",
                  file=sys.stderr)
        try:
            self._claim_tag()
            self._create()
        except BaseException:
            self.close()
            raise

    def _claim_tag(self) -> None:
        taken = {p.pw_name for p in pwd.getpwall()} | {g.gr_name for g in grp.getgrall()}
        for _ in range(100):
            tag = "dhb" + secrets.token_hex(3)
            if any(n.startswith(tag + "-") for n in taken):
                continue
            try:
                fd = os.open(ACCOUNT_LOCK.format(tag=tag), os.O_RDWR | os.O_CREAT | os.O_EXCL,
                             0o600)
            except FileExistsError:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.tag, self._lock_fd = tag, fd
            return
        raise RuntimeError("no free account tag after 100 tries")

    def _create(self) -> None:
        self.base.mkdir(mode=0o755)
        os.chmod(self.base, 0o755)
        gd, gu = self._group("gd"), self._group("gu")
        self.daemon = self._user("daemon", gd)
        self.uploader = self._user("uploader", gu)
        if gd in self.uploader.groups:  # cannot happen with fresh names; the model forbids it
            raise RuntimeError(f"{self.uploader.name} is in the daemon's group")

    def _group(self, role: str) -> int:
        name = f"{self.tag}-{role}"
        _admin("groupadd", name)
        self._groups.append(name)
        return grp.getgrnam(name).gr_gid

    def _user(self, role: str, gid: int) -> Account:
        name = f"{self.tag}-{role}"
        home = self.base / role
        _admin("useradd", "-M", "-d", str(home), "-s", NOLOGIN, "-c", "dittohead bench",
               "-g", str(gid), name)
        self._users.append(name)
        pw = pwd.getpwnam(name)
        groups = [pw.pw_gid] + sorted(set(os.getgrouplist(name, pw.pw_gid)) - {pw.pw_gid})
        home.mkdir(mode=0o700)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        return Account(role, name, pw.pw_uid, pw.pw_gid, groups, home)

    def close(self) -> None:
        errors = []
        for kind, names in (("userdel", self._users), ("groupdel", self._groups)):
            for name in reversed(names):
                try:
                    _admin(kind, *(["-f"] if kind == "userdel" else []), name)
                except RuntimeError as e:
                    errors.append(str(e))
        self._users, self._groups = [], []
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(ACCOUNT_LOCK.format(tag=self.tag))
            os.close(self._lock_fd)
            self._lock_fd = -1
        if errors:
            print("bench: removing the run's accounts: " + "; ".join(errors), file=sys.stderr)

    def describe(self) -> str:
        d, u = self.daemon, self.uploader
        return (f"{d.name} (uid {d.uid}, group {grp.getgrgid(d.gid).gr_name}) runs init, study"
                f" add, watch, fsck; {u.name} (uid {u.uid}, group {grp.getgrgid(u.gid).gr_name},"
                " not in the daemon's) owns the source and runs sync")


def account_env(account: Account, extra: dict[str, str]) -> dict[str, str]:
    """The clean environment of a child running as `account` (no variable of the bench's own)."""
    return {
        "HOME": str(account.home),
        "USER": account.name,
        "LOGNAME": account.name,
        "PATH": SBIN_PATH,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",  # an account could not write the checkout's anyway
        **extra,
    }


def traversable_by_others(path: Path) -> Path | None:
    """The first folder from / down to path that other accounts cannot search, or None."""
    for folder in [*reversed(path.parents), path]:
        if not os.stat(folder).st_mode & stat.S_IXOTH:
            return folder
    return None


def account_command(dittohead_exe: str, probe_as: Account, cwd: Path) -> tuple[list[str], dict[str, str], str]:
    """How an account runs dittohead: (command, extra environment, how it is said in the output).

    First the executable the bench was given, if the account can run it and it imports the same
    dittohead; else the system's python3 of the same major.minor, with PYTHONPATH = the folder
    this dittohead is imported from + this venv's site-packages (the venv's python is often a
    symlink into /root, which other accounts cannot reach). Raises Unavailable if neither works.
    """
    spec = importlib.util.find_spec("dittohead")
    ours = Path(spec.origin).resolve() if spec and spec.origin else None
    failures = []

    def probe(argv: list[str], extra: dict[str, str]) -> str | None:
        try:
            cp = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60,
                                stdin=subprocess.DEVNULL, cwd=cwd,
                                env=account_env(probe_as, extra), **probe_as.identity())
        except (OSError, subprocess.SubprocessError) as e:
            return f"cannot run it ({getattr(e, 'strerror', None) or e})"
        if cp.returncode != 0:
            lines = cp.stderr.strip().splitlines()
            return lines[-1] if lines else f"exit {cp.returncode}"
        return None

    # The executable itself (a console script): does its interpreter run for the account?
    why = probe([dittohead_exe, "--version"], {})
    if why is None:
        return [dittohead_exe], {}, f"{dittohead_exe}, as for the same-account run"
    failures.append(f"{dittohead_exe}: {why}")
    if ours is None:
        raise Unavailable("this Python cannot import dittohead, so PYTHONPATH is unknown")
    if not os.path.exists(SYSTEM_PYTHON):
        raise Unavailable(f"{failures[0]}; no {SYSTEM_PYTHON}")
    paths = [str(ours.parent.parent)]
    for key in ("purelib", "platlib"):
        if (p := sysconfig.get_paths()[key]) not in paths:
            paths.append(p)
    extra = {"PYTHONPATH": os.pathsep.join(paths)}
    try:
        cp = subprocess.run([SYSTEM_PYTHON, "-c", PROBE_CODE], capture_output=True, text=True,
                            check=False, timeout=60, stdin=subprocess.DEVNULL, cwd=cwd,
                            env=account_env(probe_as, extra), **probe_as.identity())
    except (OSError, subprocess.SubprocessError) as e:
        raise Unavailable(f"{failures[0]}; {SYSTEM_PYTHON}: {e}") from None
    if cp.returncode != 0:
        lines = cp.stderr.strip().splitlines()
        raise Unavailable(f"{failures[0]}; {SYSTEM_PYTHON}: "
                          f"{lines[-1] if lines else f'exit {cp.returncode}'}")
    found = json.loads(cp.stdout)
    if tuple(found["version"]) != sys.version_info[:2]:
        raise Unavailable(f"{failures[0]}; {SYSTEM_PYTHON} is Python"
                          f" {'.'.join(map(str, found['version']))}, not"
                          f" {sys.version_info[0]}.{sys.version_info[1]}")
    if Path(found["dittohead"]).resolve() != ours:
        raise Unavailable(f"{failures[0]}; {SYSTEM_PYTHON} imports dittohead from"
                          f" {found['dittohead']}, not {ours}")
    how = (f"{SYSTEM_PYTHON} -m dittohead with PYTHONPATH={extra['PYTHONPATH']} (not"
           f" {dittohead_exe}: {why}; its python is {os.path.realpath(sys.executable)})")
    return [SYSTEM_PYTHON, "-m", "dittohead"], extra, how


# --------------------------------------------------------------------------------------------
# The synthetic study


@dataclass
class SourceFile:
    path: str  # relative, POSIX
    size: int
    kind: str  # small | medium | large


def plan_source(scale: float, seed: int) -> list[SourceFile]:
    """The list of files and sizes: deterministic from (scale, seed).

    At scale 1.0: 20,000 small files of 1-64 KiB (log-uniform), 200 files of 1-8 MiB (skewed
    towards 1 MiB), 3 files of 150 MiB; about 1.1 GiB in all. The scale multiplies the number of
    small and medium files and the size of the large ones.
    """
    rng = random.Random(seed)
    n_small = max(1, round(20_000 * scale))
    n_medium = max(1, round(200 * scale))
    large_size = max(1 * MiB, round(150 * MiB * scale))
    kinds = (("beh", "txt"), ("eye", "edf"), ("physio", "acq"))
    files: list[SourceFile] = []
    for i in range(n_small):
        kind, ext = kinds[i % 3]
        folder = f"subj{i // 200:03d}/session{(i // 50) % 4 + 1}/{kind}"
        size = round(KiB * 2 ** (6 * rng.random()))
        files.append(SourceFile(f"{folder}/{kind}_{i:06d}.{ext}", size, "small"))
    for i in range(n_medium):
        folder = f"subj{i * 100 // max(n_medium, 1):03d}/session{i % 4 + 1}/eeg"
        size = round(MiB * 2 ** (3 * rng.random() ** 3))
        files.append(SourceFile(f"{folder}/rec_{i:04d}.bdf", size, "medium"))
    for i in range(3):
        files.append(SourceFile(f"derivatives/mri/sub-{i:02d}_bold.nii", large_size, "large"))
    return files


def content_key(seed: int, path: str, generation: str) -> blake3.blake3:
    return blake3.blake3(f"dittohead-bench:{seed}:{generation}:{path}".encode())


def write_content(path: Path, size: int, key: blake3.blake3) -> None:
    """Write `size` bytes of BLAKE3 XOF output: incompressible, deterministic, about 1 GB/s."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.writelines(key.digest(length=min(WRITE_BLOCK, size - offset), seek=offset)
                     for offset in range(0, size, WRITE_BLOCK))
    os.utime(path, (BASE_MTIME, BASE_MTIME))


def generate_source(src: Path, files: list[SourceFile], seed: int) -> None:
    for sf in files:
        write_content(src / sf.path, sf.size, content_key(seed, sf.path, "day1"))


@dataclass
class Mutation:
    rewritten_files: int
    rewritten_bytes: int
    patched_file: str
    patch_offset: int
    patch_bytes: int

    def describe(self) -> str:
        return (f"{self.rewritten_files} small files rewritten ({fmt_bytes(self.rewritten_bytes)}),"
                f" {fmt_bytes(self.patch_bytes)} overwritten in place at offset"
                f" {self.patch_offset} of {self.patched_file}")


def mutate_source(src: Path, files: list[SourceFile], seed: int) -> Mutation:
    """Day 2: rewrite 1% of the small files with new content of the same size, and overwrite
    64 KiB in the middle of the first large file in place."""
    rng = random.Random(f"{seed}:day2")
    small = [sf for sf in files if sf.kind == "small"]
    chosen = rng.sample(small, max(1, round(MUTATION_FRACTION * len(small))))
    for sf in chosen:
        path = src / sf.path
        with open(path, "r+b") as f:
            f.write(content_key(seed, sf.path, "day2").digest(length=sf.size))
        os.utime(path, (DAY2_MTIME, DAY2_MTIME))
    large = next(sf for sf in files if sf.kind == "large")
    patch = min(MUTATION_PATCH, large.size)
    offset = (large.size - patch) // 2
    path = src / large.path
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(content_key(seed, large.path, "day2").digest(length=patch))
    os.utime(path, (DAY2_MTIME, DAY2_MTIME))
    return Mutation(len(chosen), sum(sf.size for sf in chosen), large.path, offset, patch)


# --------------------------------------------------------------------------------------------
# Tools


@dataclass
class Measure:
    """One row of the result table."""

    step: str  # initial | no change | day 2 | fsck
    tool: str  # dittohead | rsync | restic | borg
    phase: str = ""  # dittohead: sync | watch | total
    setting: str = ""  # dittohead: SPLIT (uploader≠daemon) | SAME (same account)
    status: str = "ok"  # ok | failed | not installed | skipped
    seconds: float | None = None
    cpu_seconds: float | None = None
    sent: int | None = None  # bytes
    stored: int | None = None  # growth of the store / repository / destination, bytes
    peak_rss: int | None = None  # bytes
    rate: float | None = None  # fsck: bytes checked per second
    note: str = ""

    @property
    def label(self) -> str:
        label = f"{self.tool} {self.phase}".strip()
        return f"{label} [{self.setting}]" if self.setting else label


class ToolFailed(Exception):
    def __init__(self, tool: str, what: str, run: ChildRun | None = None) -> None:
        super().__init__(f"{tool}: {what}")
        self.tool = tool
        self.what = what
        self.run = run


@dataclass
class Context:
    workdir: Path
    src: Path
    logs: Path
    timeout: float
    base_env: dict[str, str] = field(default_factory=lambda: dict(os.environ))


class Tool:
    """A tool under test: setup once, then one call per step, then the integrity check."""

    name = ""
    binary = ""
    setting = ""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.home = ctx.workdir / self.name
        self.exe: str | None = shutil.which(self.binary) if self.binary else None
        self._seq = 0

    @property
    def key(self) -> str:
        """Names this instance among the tools of the run (dittohead runs in two settings)."""
        return self.name

    def log_stem(self, what: str) -> Path:
        self._seq += 1
        return self.ctx.logs / re.sub(r"[^a-z0-9.]+", "-", f"{self.key}-{self._seq:02d}-{what}")

    # -- to be provided by each tool

    def version(self) -> str:
        raise NotImplementedError

    def setup(self) -> None:
        raise NotImplementedError

    def backup(self, step: str) -> list[Measure]:
        raise NotImplementedError

    def check(self) -> list[Measure]:
        return [Measure(FSCK, self.name, status="skipped", note="no integrity check")]

    # -- helpers

    def env(self) -> dict[str, str]:
        return dict(self.ctx.base_env)

    def run(self, args: Sequence[str], what: str, ok_codes: tuple[int, ...] = (0,)) -> ChildRun:
        assert self.exe is not None
        result = run_child([self.exe, *args], self.env(), self.log_stem(what), self.ctx.timeout)
        if result.returncode not in ok_codes:
            raise ToolFailed(self.key, f"{what} exited with {result.returncode}", result)
        return result

    def first_line(self, args: Sequence[str]) -> str:
        assert self.exe is not None
        out = subprocess.run([self.exe, *args], capture_output=True, text=True, timeout=60,
                             check=False, stdin=subprocess.DEVNULL, env=self.env())
        lines = (out.stdout or out.stderr).strip().splitlines()
        return lines[0].strip() if lines else "unknown"


@dataclass
class Side:
    """How one side of dittohead is run: its command, and as which account (None: the bench's
    own, with the bench's environment; an account gets a clean one, plus extra_env)."""

    command: list[str]
    account: Account | None = None
    extra_env: dict[str, str] = field(default_factory=dict)


class Dittohead(Tool):
    """dittohead in one setting: SAME (everything as the bench's own account, in
    WORKDIR/dittohead/) or SPLIT (sync as the uploader, the rest as the daemon, in
    WORKDIR/dittohead-accounts/)."""

    name = "dittohead"
    binary = "dittohead"

    def __init__(self, ctx: Context, exe: str | None, setting: str = SAME,
                 accounts: Accounts | None = None, command: list[str] | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        super().__init__(ctx)
        self.setting = setting
        self.exe = exe
        if accounts is None:
            self.client = self.server = Side([exe] if exe else [])
            self.state = self.home / "client-state"
        else:
            self.home = ctx.workdir / "dittohead-accounts"
            self.accounts = accounts
            self.client = Side(command or [], accounts.uploader, extra_env or {})
            self.server = Side(command or [], accounts.daemon, extra_env or {})
            self.state = accounts.uploader.home / "client-state"
        self.root = self.home / "root"
        self.inbox = self.root / "dropbox" / STUDY / "inbox"
        self.failed = self.root / "dropbox" / STUDY / "failed"

    @property
    def key(self) -> str:
        return f"{self.name} ({self.setting})"

    def side_env(self, side: Side) -> dict[str, str]:
        if side.account is None:
            env = dict(self.ctx.base_env)
            env.pop("DITTOHEAD_STORE", None)
            env["DITTOHEAD_STATE_DIR"] = str(self.state)
            return env
        extra = dict(side.extra_env)
        if side is self.client:
            extra["DITTOHEAD_STATE_DIR"] = str(self.state)
        return account_env(side.account, extra)

    def run_side(self, side: Side, args: Sequence[str], what: str) -> ChildRun:
        cwd = side.account.home if side.account is not None else None
        result = run_child([*side.command, *args], self.side_env(side), self.log_stem(what),
                           self.ctx.timeout, cwd=cwd, account=side.account)
        if result.returncode != 0:
            raise ToolFailed(self.key, f"{what} exited with {result.returncode}", result)
        return result

    def version(self) -> str:
        try:
            out = subprocess.run([*self.server.command, "--version"], capture_output=True,
                                 text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
                                 env=self.side_env(self.server),
                                 cwd=self.server.account.home if self.server.account else None,
                                 **(self.server.account.identity() if self.server.account
                                    else {}))
            lines = (out.stdout or out.stderr).strip().splitlines()
            line = lines[0].strip().replace(", version", "") if lines else ""
            if re.search(r"\d+\.\d+", line):
                return line
        except (OSError, subprocess.SubprocessError):
            pass
        try:
            from importlib.metadata import version

            return f"dittohead {version('dittohead')} (package metadata)"
        except Exception:  # noqa: BLE001 - any failure here just means "unknown"
            return "unknown"

    def setup(self) -> None:
        self.home.mkdir(parents=True)
        if self.server.account is None:
            self.state.mkdir()
        else:
            # As docs/server-root.md sets it up: ROOT made for the daemon, 0755, then init.
            daemon, uploader = self.server.account, self.client.account
            assert uploader is not None
            self.root.mkdir()
            os.chown(self.root, daemon.uid, daemon.gid)
            os.chmod(self.root, 0o755)
            self.state.mkdir(mode=0o700)
            os.chown(self.state, uploader.uid, uploader.gid)
        self.run_side(self.server, ["init", "--store", str(self.root)], "init")
        self.run_side(self.server, ["study", "add", STUDY, "--store", str(self.root)], "study add")

    def store_size(self) -> int:
        return tree_size(self.root / "store")

    def backup(self, step: str) -> list[Measure]:
        before = self.store_size()
        failed_before = set(os.listdir(self.failed)) if self.failed.is_dir() else set()
        sync = self.run_side(self.client, ["sync", str(self.ctx.src), "--study", STUDY,
                                           "--to", str(self.root), "--site", SITE],
                             f"sync {step}")
        sent = tree_size(self.inbox)
        # No cache drop between sync and watch: on a server the upload has just been written
        # through the page cache, as it is here.
        watch = self.run_side(self.server, ["watch", "--store", str(self.root), "--once"],
                              f"watch {step}")
        stored = self.store_size() - before
        failed_now = set(os.listdir(self.failed)) if self.failed.is_dir() else set()
        if failed_now - failed_before:
            raise ToolFailed(self.key, f"{step}: submission(s) went to failed/: "
                             f"{', '.join(sorted(failed_now - failed_before))}", watch)
        note = ""
        leftover = tree_size(self.inbox)
        if leftover:
            note = f"inbox still holds {fmt_bytes(leftover)} after watch --once"
        summary = summary_line(sync.stdout + "\n" + sync.stderr)
        return [
            Measure(step, self.name, "sync", self.setting, seconds=sync.seconds,
                    cpu_seconds=sync.cpu_seconds, sent=sent, peak_rss=sync.peak_rss,
                    note=summary),
            Measure(step, self.name, "watch", self.setting, seconds=watch.seconds,
                    cpu_seconds=watch.cpu_seconds, stored=stored, peak_rss=watch.peak_rss,
                    note=note),
            Measure(step, self.name, "total", self.setting, seconds=sync.seconds + watch.seconds,
                    cpu_seconds=sync.cpu_seconds + watch.cpu_seconds, sent=sent, stored=stored,
                    peak_rss=max(sync.peak_rss, watch.peak_rss)),
        ]

    def check(self) -> list[Measure]:
        size = self.store_size()
        fsck = self.run_side(self.server, ["fsck", "--store", str(self.root), "--read-data"],
                             "fsck read-data")
        rate = size / fsck.seconds if fsck.seconds > 0 else None
        return [Measure(FSCK, self.name, setting=self.setting, seconds=fsck.seconds,
                        cpu_seconds=fsck.cpu_seconds,
                        stored=size, peak_rss=fsck.peak_rss, rate=rate,
                        note=f"{fmt_bytes(size)} in ROOT/store checked")]


def summary_line(output: str) -> str:
    """dittohead sync's end line ("sync: ..."), if it printed one; parsed loosely."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip().startswith("sync:")]
    return lines[-1] if lines else ""


class Rsync(Tool):
    """rsync -a SRC DEST/: a mirror, no history; local copies use --whole-file by default."""

    name = "rsync"
    binary = "rsync"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.dest = self.home / "dest"

    def version(self) -> str:
        m = re.search(r"version\s+(\S+)", self.first_line(["--version"]))
        return f"rsync {m.group(1)}" if m else "unknown"

    def setup(self) -> None:
        self.dest.mkdir(parents=True)

    def backup(self, step: str) -> list[Measure]:
        before = tree_size(self.dest)
        run = self.run(["-a", "--stats", str(self.ctx.src), f"{self.dest}/"], f"rsync {step}")
        m = re.search(r"Total bytes sent:\s*([\d,.]+)", run.stdout)
        sent = int(m.group(1).replace(",", "").replace(".", "")) if m else None
        return [Measure(step, self.name, seconds=run.seconds, cpu_seconds=run.cpu_seconds,
                        sent=sent, stored=tree_size(self.dest) - before, peak_rss=run.peak_rss,
                        note="a mirror: changed files are replaced, no history" if step == "day 2"
                        else "")]

    def check(self) -> list[Measure]:
        return [Measure(FSCK, self.name, status="skipped", note="rsync has no integrity check")]


class Restic(Tool):
    """restic backup to a local repository; the password comes from a file, never argv."""

    name = "restic"
    binary = "restic"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.repo = self.home / "repo"
        self.password_file = self.home / "password"
        self.cache = self.home / "cache"

    def common(self) -> list[str]:
        return ["--repo", str(self.repo), "--password-file", str(self.password_file),
                "--cache-dir", str(self.cache)]

    def env(self) -> dict[str, str]:
        env = super().env()
        for key in [k for k in env if k.startswith("RESTIC_")]:
            del env[key]
        return env

    def version(self) -> str:
        return " ".join(self.first_line(["version"]).split()[:2])

    def setup(self) -> None:
        self.home.mkdir(parents=True)
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16) + "\n")
        self.run([*self.common(), "init"], "init")

    def backup(self, step: str) -> list[Measure]:
        before = tree_size(self.repo)
        run = self.run([*self.common(), "backup", "--host", SITE, str(self.ctx.src)],
                       f"backup {step}")
        grown = tree_size(self.repo) - before
        return [Measure(step, self.name, seconds=run.seconds, cpu_seconds=run.cpu_seconds,
                        sent=grown, stored=grown, peak_rss=run.peak_rss)]

    def check(self) -> list[Measure]:
        size = tree_size(self.repo)
        run = self.run([*self.common(), "check", "--read-data"], "check read-data")
        return [Measure(FSCK, self.name, seconds=run.seconds, cpu_seconds=run.cpu_seconds,
                        stored=size, peak_rss=run.peak_rss,
                        rate=size / run.seconds if run.seconds > 0 else None,
                        note="check --read-data")]


class Borg(Tool):
    """borg create to a local repository made with --encryption=none (lz4, the default)."""

    name = "borg"
    binary = "borg"
    ARCHIVES: ClassVar[dict[str, str]] = {
        "initial": "initial", "no change": "no-change", "day 2": "day-2"}

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.repo = self.home / "repo"

    def env(self) -> dict[str, str]:
        env = super().env()
        for key in [k for k in env if k.startswith("BORG_")]:
            del env[key]
        env["BORG_BASE_DIR"] = str(self.home / "base")  # cache, config, security: isolated
        env["BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK"] = "yes"
        env["BORG_RELOCATED_REPO_ACCESS_IS_OK"] = "yes"
        return env

    def version(self) -> str:
        return self.first_line(["--version"])

    def setup(self) -> None:
        (self.home / "base").mkdir(parents=True)
        self.run(["init", "--encryption=none", str(self.repo)], "init")

    def backup(self, step: str) -> list[Measure]:
        before = tree_size(self.repo)
        # Exit code 1 is borg's "warning" (e.g. a file changed while read); the archive is made.
        run = self.run(["create", f"{self.repo}::{self.ARCHIVES[step]}", str(self.ctx.src)],
                       f"create {step}", ok_codes=(0, 1))
        grown = tree_size(self.repo) - before
        return [Measure(step, self.name, seconds=run.seconds, cpu_seconds=run.cpu_seconds,
                        sent=grown, stored=grown, peak_rss=run.peak_rss,
                        note="borg warning (exit 1)" if run.returncode == 1 else "")]

    def check(self) -> list[Measure]:
        size = tree_size(self.repo)
        run = self.run(["check", "--verify-data", str(self.repo)], "check verify-data")
        return [Measure(FSCK, self.name, seconds=run.seconds, cpu_seconds=run.cpu_seconds,
                        stored=size, peak_rss=run.peak_rss,
                        rate=size / run.seconds if run.seconds > 0 else None,
                        note="check --verify-data")]


# --------------------------------------------------------------------------------------------
# The run


class Bench:
    def __init__(self, ctx: Context, tools: list[Tool], dropper: CacheDropper) -> None:
        self.ctx = ctx
        self.tools = tools
        self.dropper = dropper
        self.measures: list[Measure] = []
        self.out_of_play: dict[str, str] = {}  # tool -> why it is skipped from now on
        self.failures: list[ToolFailed] = []

    def attempt(self, tool: Tool, step: str, action: Callable[[], list[Measure]]) -> None:
        if tool.key in self.out_of_play:
            self.measures.append(Measure(step, tool.name, setting=tool.setting,
                                         status=self.out_of_play[tool.key]))
            return
        self.dropper.drop()
        print(f"  {step:10} {tool.key} ...", end="", flush=True, file=sys.stderr)
        try:
            measures = action()
        except ToolFailed as failure:
            print(" FAILED", file=sys.stderr)
            self.report_failure(failure)
            self.failures.append(failure)
            self.out_of_play[tool.key] = "skipped (failed earlier)"
            self.measures.append(Measure(step, tool.name, setting=tool.setting, status="failed",
                                         note=failure.what))
            return
        if all(m.status != "ok" for m in measures):
            print(" skipped", file=sys.stderr)
        else:
            total = sum(m.seconds or 0 for m in measures if m.phase in ("", "total"))
            print(f" {total:.2f} s", file=sys.stderr)
        self.measures.extend(measures)

    def set_up(self, tool: Tool) -> None:
        """Untimed; a failure is recorded as a "setup" row and takes the tool out of play."""
        if tool.key in self.out_of_play:
            return
        try:
            tool.setup()
        except ToolFailed as failure:
            self.report_failure(failure)
            self.failures.append(failure)
            self.out_of_play[tool.key] = "skipped (failed earlier)"
            self.measures.append(Measure("setup", tool.name, setting=tool.setting, status="failed",
                                         note=failure.what))

    @staticmethod
    def report_failure(failure: ToolFailed) -> None:
        print(f"\n{failure.tool} failed: {failure.what}", file=sys.stderr)
        if failure.run is not None:
            print(f"  command: {' '.join(failure.run.argv)}", file=sys.stderr)
            text = (failure.run.stderr.strip() or failure.run.stdout.strip() or "(no output)")
            tail = text.splitlines()[-40:]
            print("  " + "\n  ".join(tail), file=sys.stderr)

    def run(self, files: list[SourceFile], seed: int, source_ready: float) -> Mutation:
        """source_ready: the time.monotonic() of the source's last change."""
        for tool in self.tools:
            if tool.exe is None:
                self.out_of_play[tool.key] = "not installed"
        for tool in self.tools:
            self.set_up(tool)
        time.sleep(max(0.0, source_ready + SOURCE_SETTLE - time.monotonic()))
        for step in STEPS[:2]:
            for tool in self.tools:
                self.attempt(tool, step, functools.partial(tool.backup, step))
        mutation = mutate_source(self.ctx.src, files, seed)
        print(f"  day-2 mutation: {mutation.describe()}", file=sys.stderr)
        for tool in self.tools:
            self.attempt(tool, STEPS[2], functools.partial(tool.backup, STEPS[2]))
        for tool in self.tools:
            self.attempt(tool, FSCK, tool.check)
        return mutation


# --------------------------------------------------------------------------------------------
# Report


def find(measures: list[Measure], step: str, tool: str, phase: str = "",
         setting: str | None = None) -> Measure | None:
    """The measure of (step, tool, phase) that succeeded; for dittohead, of `setting` if given."""
    for m in measures:
        if (m.step == step and m.tool == tool and m.phase == phase and m.status == "ok"
                and (setting is None or m.setting == setting)):
            return m
    return None


def dittohead_settings(measures: list[Measure]) -> list[str]:
    """The settings dittohead ran in, in the order of the run (the real deployment's first)."""
    return list(dict.fromkeys(m.setting for m in measures if m.tool == "dittohead"))


def ratio_header(settings: list[str]) -> list[str]:
    if len(settings) <= 1:
        return ["dh/tool time"]
    return [f"dh/tool ({s})" for s in settings]


def result_rows(measures: list[Measure], settings: list[str]) -> list[list[str]]:
    rows = []
    for step in ("setup", *STEPS, FSCK):
        dhs = [find(measures, step, "dittohead", "total" if step != FSCK else "", s)
               for s in settings or [""]]
        for m in (m for m in measures if m.step == step):
            ratios = []
            for dh in dhs:
                ratio = "-"
                if m.tool != "dittohead" and dh and dh.seconds and m.seconds:
                    ratio = f"{dh.seconds / m.seconds:.2f}"
                ratios.append(ratio)
            note = m.note if m.status == "ok" else f"{m.status}{': ' + m.note if m.note else ''}"
            if m.rate is not None:
                note = f"{fmt_rate(m.rate)}; {note}" if note else fmt_rate(m.rate)
            rows.append([step, m.label, fmt_seconds(m.seconds), fmt_bytes(m.sent),
                         fmt_bytes(m.stored), fmt_bytes(m.peak_rss), *ratios, note])
    return rows


def settings_rows(measures: list[Measure]) -> list[list[str]]:
    """dittohead's two settings side by side: uploader≠daemon, same account, the difference."""
    rows = []
    for step, phases in [(s, ("sync", "watch", "total")) for s in STEPS] + [(FSCK, ("",))]:
        for phase in phases:
            split = find(measures, step, "dittohead", phase, SPLIT)
            same = find(measures, step, "dittohead", phase, SAME)
            if not (split and same and split.seconds is not None and same.seconds is not None):
                continue
            ratio = f"{split.seconds / same.seconds:.2f}" if same.seconds else "-"
            rows.append([step, phase or "fsck --read-data", fmt_seconds(split.seconds),
                         fmt_seconds(same.seconds), f"{split.seconds - same.seconds:+.2f}", ratio])
    return rows


@dataclass
class Target:
    target: str
    figure: str
    status: str  # met | missed | n/a


def evaluate_targets(measures: list[Measure], setting: str) -> list[Target]:
    """The issue's targets, on dittohead's figures in `setting` (the real deployment's where
    the run had it)."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "missed"

    def dh_find(step: str, phase: str = "") -> Measure | None:
        return find(measures, step, "dittohead", phase, setting)

    targets: list[Target] = []
    dh, rs = dh_find("initial", "total"), find(measures, "initial", "restic")
    t = "initial sync+ingest no slower than restic"
    if dh and rs and dh.seconds and rs.seconds:
        targets.append(Target(t, f"dittohead {dh.seconds:.2f} s vs restic {rs.seconds:.2f} s",
                              verdict(dh.seconds <= rs.seconds)))
    else:
        targets.append(Target(t, "no figure", "n/a"))

    rsync = find(measures, "initial", "rsync")
    t = "initial sync+ingest: aim for rsync -a's time"
    if dh and rsync and dh.seconds and rsync.seconds:
        targets.append(Target(t, f"dittohead {dh.seconds:.2f} s vs rsync {rsync.seconds:.2f} s"
                              f" ({dh.seconds / rsync.seconds:.2f}x)",
                              verdict(dh.seconds <= rsync.seconds)))
    else:
        targets.append(Target(t, "no figure", "n/a"))

    dh = dh_find("no change", "total")
    rs = find(measures, "no change", "restic")
    t = "no-change resync at least 2x faster than restic"
    if dh and rs and dh.seconds and rs.seconds:
        speedup = rs.seconds / dh.seconds
        targets.append(Target(t, f"dittohead {dh.seconds:.2f} s vs restic {rs.seconds:.2f} s"
                              f" ({speedup:.2f}x)", verdict(speedup >= TARGET_NO_CHANGE_SPEEDUP)))
    else:
        targets.append(Target(t, "no figure", "n/a"))

    dh, rs = dh_find("day 2", "total"), find(measures, "day 2", "restic")
    t = "day-2 bytes stored no more than restic's"
    if dh and rs and dh.stored is not None and rs.stored is not None:
        targets.append(Target(t, f"dittohead {fmt_bytes(dh.stored)} vs restic"
                              f" {fmt_bytes(rs.stored)}", verdict(dh.stored <= rs.stored)))
    else:
        targets.append(Target(t, "no figure", "n/a"))

    dh = dh_find(FSCK)
    t = "fsck --read-data at 1 GB/s or better"
    if dh and dh.rate is not None:
        targets.append(Target(t, fmt_rate(dh.rate), verdict(dh.rate >= TARGET_FSCK_RATE)))
    else:
        targets.append(Target(t, "no figure", "n/a"))

    syncs = [m for m in measures if m.tool == "dittohead" and m.phase == "sync"
             and m.setting == setting and m.peak_rss is not None]
    t = "client (sync) peak RSS under 100 MB"
    if syncs:
        peak = max(m.peak_rss or 0 for m in syncs)
        targets.append(Target(t, f"{fmt_bytes(peak)} (max over {len(syncs)} syncs)",
                              verdict(peak < TARGET_CLIENT_RSS)))
    else:
        targets.append(Target(t, "no figure", "n/a"))
    return targets


def print_report(header: list[str], measures: list[Measure], targets: list[Target],
                 footer: list[str]) -> None:
    settings = dittohead_settings(measures)
    ratios = ratio_header(settings)
    print()
    print("\n".join(header))
    print()
    print(table(["step", "tool", "seconds", "sent", "stored", "peak RSS", *ratios, "note"],
                result_rows(measures, settings),
                right=(2, 3, 4, 5, *range(6, 6 + len(ratios)))))
    rows = settings_rows(measures)
    if rows:
        print()
        print(table(["dittohead", "phase", f"{SPLIT} s", f"{SAME} s", "difference", "ratio"],
                    rows, right=(2, 3, 4, 5)))
    if targets:
        print()
        title = "target (from the issue)" + (f"; dittohead {settings[0]}" if settings else "")
        print(table([title, "figure", "status"],
                    [[t.target, t.figure, t.status] for t in targets]))
    if footer:
        print()
        print("\n".join(footer))


# --------------------------------------------------------------------------------------------
# Main


def default_dittohead() -> str | None:
    beside = Path(sys.executable).parent / "dittohead"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("dittohead")


def prepare_workdir(path: str | None) -> Path:
    """A fresh, empty working folder. An existing one must be empty or a previous bench's."""
    if path is None:
        return Path(tempfile.mkdtemp(prefix="dittohead-bench-"))
    workdir = Path(path).resolve()
    marker = workdir / ".dittohead-bench"
    if workdir.exists():
        if any(workdir.iterdir()) and not marker.exists():
            sys.exit(f"bench: {workdir} is not empty and not a previous benchmark's workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    marker.write_text("a dittohead benchmark workdir; deleted by the next run\n")
    return workdir


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="working folder (default: a new one under the temp dir);"
                   " an existing one must be empty or a previous benchmark's, and is cleared")
    p.add_argument("--scale", type=float, default=1.0,
                   help="size of the synthetic study: 1.0 is about 1.1 GiB, 0.05 a quick check")
    p.add_argument("--seed", type=int, default=1, help="seed of the synthetic study (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the workdir afterwards")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    p.add_argument("--tools", default=",".join(ALL_TOOLS),
                   help=f"comma-separated tools to run (default: {','.join(ALL_TOOLS)})")
    p.add_argument("--dittohead", metavar="PATH", default=default_dittohead(),
                   help="the dittohead executable (default: beside this Python, else on PATH)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds after which any one command is killed (default 1800)")
    p.add_argument("--no-drop-caches", action="store_true",
                   help="do not drop the page cache before the timed steps")
    p.add_argument("--accounts", choices=("auto", "only", "no"), default="auto",
                   help="auto (default): as root with useradd, run dittohead both as the real"
                   " deployment does (sync as an uploader account, the rest as a daemon account)"
                   " and as one account; only: just the former; no: just the latter")
    args = p.parse_args(argv)
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(args.tools) - set(ALL_TOOLS)
    if unknown or not args.tools:
        p.error(f"--tools: unknown {', '.join(sorted(unknown)) or '(none given)'}")
    if args.scale <= 0:
        p.error("--scale must be positive")
    return args


@dataclass
class AccountSetup:
    """The separate accounts of the run, if it has them, or why it runs as one account."""

    accounts: Accounts | None = None
    command: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    how: str = ""  # how the accounts run dittohead, for the output
    why_not: str = ""  # why there are no separate accounts

    def close(self) -> None:
        if self.accounts is not None:
            self.accounts.close()
            self.accounts = None


def set_up_accounts(args: argparse.Namespace, ctx: Context) -> AccountSetup:
    """Make the run's daemon and uploader accounts and find how they run dittohead; on anything
    that stands in the way, nothing is left behind and why_not says what it was."""
    if "dittohead" not in args.tools or args.dittohead is None:
        return AccountSetup(why_not="dittohead not run")
    if args.accounts == "no":
        return AccountSetup(why_not="--accounts no")
    setup = AccountSetup()
    try:
        setup.accounts = Accounts(ctx.workdir / "accounts")
        os.chmod(ctx.workdir, 0o755)  # mkdtemp makes it 0700
        blocked = traversable_by_others(ctx.workdir)
        if blocked is not None:
            raise Unavailable(f"{blocked} is not searchable by other accounts (see --workdir)")
        setup.command, setup.extra_env, setup.how = account_command(
            args.dittohead, setup.accounts.daemon, setup.accounts.daemon.home)
    except (Unavailable, RuntimeError, OSError) as e:
        setup.close()
        setup.why_not = str(e)
        return setup
    # The collector's data is the uploader's own (the peers read it as root, as before).
    uploader = setup.accounts.uploader
    for dirpath, dirs, files in os.walk(ctx.src):
        for name in (*dirs, *files):
            os.chown(os.path.join(dirpath, name), uploader.uid, uploader.gid,
                     follow_symlinks=False)
    os.chown(ctx.src, uploader.uid, uploader.gid)
    return setup


def make_tools(ctx: Context, names: list[str], dittohead_exe: str | None,
               setup: AccountSetup, same_account: bool) -> list[Tool]:
    tools: list[Tool] = []
    for name in ALL_TOOLS:
        if name not in names:
            continue
        if name == "dittohead":
            if setup.accounts is not None:
                tools.append(Dittohead(ctx, dittohead_exe, SPLIT, setup.accounts, setup.command,
                                       setup.extra_env))
            if setup.accounts is None or same_account:
                tools.append(Dittohead(ctx, dittohead_exe, SAME))
        else:
            tools.append({"rsync": Rsync, "restic": Restic, "borg": Borg}[name](ctx))
    return tools


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so that the accounts and workdir are removed."""


def _on_signal(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = prepare_workdir(args.workdir)
    ctx = Context(workdir=workdir, src=workdir / "study", logs=workdir / "logs",
                  timeout=args.timeout)
    ctx.logs.mkdir()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        return benchmark(args, ctx)
    except Interrupted as e:
        print(f"\nbench: stopped by signal {e.args[0]}", file=sys.stderr)
        return 128 + int(e.args[0])
    finally:
        if args.keep:
            print(f"\nworkdir kept: {workdir} (command output in {ctx.logs})", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def benchmark(args: argparse.Namespace, ctx: Context) -> int:
    files = plan_source(args.scale, args.seed)
    total = sum(sf.size for sf in files)
    print(f"bench: generating {len(files):,} files, {fmt_bytes(total)} ({total / GiB:.2f} GiB)"
          f" in {ctx.src}", file=sys.stderr)
    start = time.perf_counter()
    generate_source(ctx.src, files, args.seed)
    gen_seconds = time.perf_counter() - start
    print(f"bench: generated in {gen_seconds:.1f} s", file=sys.stderr)

    setup = set_up_accounts(args, ctx)
    source_ready = time.monotonic()
    try:
        return run_and_report(args, ctx, files, total, gen_seconds, setup, source_ready)
    finally:
        setup.close()


def run_and_report(args: argparse.Namespace, ctx: Context, files: list[SourceFile], total: int,
                   gen_seconds: float, setup: AccountSetup, source_ready: float) -> int:
    me = pwd.getpwuid(os.geteuid()).pw_name
    settings_lines = []
    if setup.accounts is not None:
        settings_lines.append(f"dittohead {SPLIT} (the real deployment): "
                              f"{setup.accounts.describe()}; run by {setup.how}")
        print(f"bench: {SPLIT}: {setup.accounts.describe()}", file=sys.stderr)
        print(f"bench: the accounts run {setup.how}", file=sys.stderr)
    elif "dittohead" in args.tools:
        line = (f"dittohead runs sync and watch as this one account, {me} ({setup.why_not}):"
                " no separate uploader and daemon accounts")
        settings_lines.append(line)
        print(f"bench: {line}", file=sys.stderr)
    same = setup.accounts is None or args.accounts != "only"
    if "dittohead" in args.tools and same:
        settings_lines.append(f"dittohead {SAME}: sync, watch and the rest as {me}"
                              f" (uid {os.geteuid()}), run by {args.dittohead}")

    tools = make_tools(ctx, args.tools, args.dittohead, setup, same)
    versions: dict[str, str] = {}
    for t in tools:
        if t.name not in versions:
            versions[t.name] = t.version() if t.exe else "not installed"
    dropper = CacheDropper(enabled=not args.no_drop_caches)
    bench = Bench(ctx, tools, dropper)
    mutation = bench.run(files, args.seed, source_ready)
    primary = SPLIT if setup.accounts is not None else SAME
    targets = evaluate_targets(bench.measures, primary) if "dittohead" in args.tools else []

    header = [
        (f"dittohead benchmark: scale {args.scale}, seed {args.seed}; source {len(files):,} files,"
         f" {fmt_bytes(total)} ({total / GiB:.2f} GiB), generated in {gen_seconds:.1f} s"),
        (f"machine: {os.cpu_count()} CPUs, {platform.system()} {platform.release()},"
         f" Python {platform.python_version()}; {dropper.describe()}"),
        "versions: " + "; ".join(f"{k}: {v}" for k, v in versions.items()),
        *settings_lines,
        (f"day 2: {mutation.describe()}; applied once to the source, after every tool's"
         " initial and no-change steps"),
        ("sizes in decimal units; seconds are wall-clock; 'sent': dittohead = the upload in the"
         " inbox, rsync = 'Total bytes sent', restic/borg = repository growth; 'stored' = growth"
         " of ROOT/store, rsync's copy, the repository; 'dh/tool' = dittohead total / tool"
         " (below 1: dittohead faster)"),
    ]
    footer = []
    for dh in (t for t in tools if isinstance(t, Dittohead)):
        if dh.root.is_dir():
            footer.append(f"dittohead [{dh.setting}] ROOT/dropbox holds"
                          f" {fmt_bytes(tree_size(dh.root / 'dropbox'))} at the end (not counted"
                          " as stored)")
    failed_dittohead = any(f.tool.startswith("dittohead") for f in bench.failures)
    if "dittohead" in args.tools and args.dittohead is None:
        footer.append("dittohead: executable not found (see --dittohead)")
        failed_dittohead = True
    if failed_dittohead:
        footer.append("dittohead failed a step: see its stderr above")
    print_report(header, bench.measures, targets, footer)

    if args.json:
        doc = {
            "scale": args.scale,
            "seed": args.seed,
            "source": {"files": len(files), "bytes": total, "generate_seconds": gen_seconds},
            "machine": {"cpus": os.cpu_count(), "system": platform.platform(),
                        "python": platform.python_version()},
            "caches_dropped": bool(dropper.works),
            "versions": versions,
            "dittohead_settings": {
                "targets_on": primary,
                SPLIT: ({"daemon": setup.accounts.daemon.name,
                         "uploader": setup.accounts.uploader.name,
                         "command": setup.command, "pythonpath": setup.extra_env.get("PYTHONPATH")}
                        if setup.accounts is not None else {"not run": setup.why_not}),
                SAME: {"account": me, "command": [args.dittohead]} if same else None,
            },
            "mutation": asdict(mutation),
            "measures": [asdict(m) for m in bench.measures],
            "targets": [asdict(t) for t in targets],
            "dittohead_failed": failed_dittohead,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return 1 if failed_dittohead else 0


if __name__ == "__main__":
    sys.exit(main())
