#!/usr/bin/env python3
"""Benchmark dittohead's read-only FUSE mount against restic mount and borg mount.

    python benchmarks/mount.py [--workdir DIR] [--scale 1.0] [--scale-1m 1.0] [--rounds 3]
                               [--keep] [--json FILE] [--tools dittohead,restic,borg]
                               [--limit 600] [--seed 1] [--no-drop-caches]

It builds bench.py's synthetic study (its generator, imported; 1.22 GB at scale 1.0), puts it
into a dittohead server root (sync + watch --once), a restic repository (backup) and a borg
repository (create), then times, with the page cache dropped before every figure:

    ready      from starting the mount command to the first successful stat of a known file
               inside (dittohead mount, restic mount, borg mount, borg mount -o versions)
    read       a sequential read of a 150 MiB file, in 1 MiB blocks: through each mount, by
               dittohead cat > /dev/null, and from the plain source file
    find, du   find DIR | wc -l and du -s DIR over dittohead's current/ and versions/, restic's
               snapshots/latest, borg's archive and borg's versions view (-o versions)

Each tool's mount lives for one round (mounted, measured, unmounted); --rounds rounds run, the
tools in a rotated order each round, and the median is shown. Then the study of 1M versions of
scale.py (its builder, imported) is mounted by dittohead alone: ready, a read of one file,
find and du over current/ and versions/ (each walk killed after --limit s: what it listed by
then is reported), and the mount process's peak RSS.

It prints one table with dittohead's figures against each peer, one for the 1M study, and the
targets from the issue, met or missed. It asserts nothing: the exit status is 1 only when a
dittohead step fails. Every mount is unmounted in a finally, also on Ctrl-C, SIGTERM or SIGHUP.
benchmarks/README.md, "The mount (mount.py)", has more, and figures.

Dependencies: the standard library, blake3, the dittohead package (run it with the project's
virtualenv), and Debian's fuse3, restic, borgbackup and python3-llfuse (borg mount needs it;
make bench-mount installs them).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import blake3

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # beside this file
    SAME,
    SOURCE_SETTLE,
    STUDY,
    Borg,
    CacheDropper,
    Context,
    Dittohead,
    GiB,
    Interrupted,
    MiB,
    Restic,
    SourceFile,
    Tool,
    ToolFailed,
    _on_signal,
    content_key,
    default_dittohead,
    fmt_bytes,
    generate_source,
    plan_source,
    prepare_workdir,
    table,
    write_content,
)

try:
    import scale  # beside this file; imports dittohead's format code
except SystemExit as _e:  # scale.py exits when dittohead cannot be imported
    sys.exit(f"mount bench: {_e}")

PEERS = ("restic", "borg")
ALL_TOOLS = ("dittohead", *PEERS)
READ_SIZE = 150 * MiB  # the file read sequentially
READ_BLOCK = 1 * MiB
EXTRA_READ_FILE = "derivatives/mri/mount-read.nii"  # added where no file is about 150 MiB
POLL = 0.002  # seconds between two stats while waiting for a mount
MOUNT_TIMEOUT = 120.0  # seconds a mount may take to show the known file
ARCHIVE = "initial"  # borg's archive (bench.Borg names it after the step)

# Targets from the issue.
TARGET_READY_S = 0.3
TARGET_READ_RATE = 1e9  # bytes per second
TARGET_FIND_S = 0.25

# The figures of the 1.2 GB study, in the table's order: (key, label, unit).
FIGURES = (
    ("ready", "ready: mount to first stat", "s"),
    ("ready-versions", "ready, versions view", "s"),
    ("read", "sequential read, 150 MiB", "MiB/s"),
    ("find-current", "find | wc -l, current", "s"),
    ("du-current", "du -s, current", "s"),
    ("find-versions", "find | wc -l, versions", "s"),
    ("du-versions", "du -s, versions", "s"),
    ("rss", "mount process peak RSS", "MB"),
    ("rss-versions", "peak RSS, versions view", "MB"),
)
# The figures dittohead should win against both peers ("faster than both peers on every figure").
SPEED_FIGURES = ("ready", "ready-versions", "read", "find-current", "du-current",
                 "find-versions", "du-versions")


def say(msg: str) -> None:
    print(f"mount bench: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Samples: one measured figure of one tool in one round


@dataclass
class Sample:
    figure: str  # a key of FIGURES, or a 1M study's figure
    tool: str  # dittohead | dittohead cat | local file | restic | borg
    status: str = "ok"  # ok | failed | limit (killed after --limit s)
    seconds: float | None = None
    size: int | None = None  # bytes read (read figures); peak RSS (rss)
    entries: int | None = None  # lines from find
    du_kib: int | None = None  # du -s's figure
    round: int = 0
    note: str = ""

    @property
    def rate(self) -> float | None:
        if self.status != "ok" or not self.size or not self.seconds:
            return None
        return self.size / self.seconds


@dataclass
class Walked:
    seconds: float
    finished: bool
    returncode: int
    lines: int
    tail: str  # the last bytes of stdout
    stderr: str


def run_limited(argv: Sequence[str], env: dict[str, str], limit: float, err_path: Path) -> Walked:
    """Run argv with stdout into a pipe that this process reads and counts lines of (as `| wc
    -l` would); killed after `limit` s, and then what it printed so far is what counts."""
    with open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err, env=env)
        fired = threading.Event()

        def kill() -> None:
            fired.set()
            with contextlib.suppress(OSError):
                proc.kill()

        timer = threading.Timer(limit, kill)
        timer.start()
        lines, tail = 0, b""
        assert proc.stdout is not None
        try:
            while chunk := proc.stdout.read1(1 << 20):
                lines += chunk.count(b"\n")
                tail = (tail + chunk)[-4096:]
            _, status, _ = os.wait4(proc.pid, 0)
        except BaseException:
            kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
            proc.stdout.close()
        seconds = time.perf_counter() - start
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    return Walked(seconds, not fired.is_set(), code, lines, tail.decode(errors="replace"),
                  err_path.read_text(errors="replace"))


def walk_sample(figure: str, tool: str, argv: list[str], env: dict[str, str], limit: float,
                err_path: Path) -> Sample:
    """find DIR | wc -l, or du -s DIR: seconds, entries or du's figure; 'limit' if killed."""
    w = run_limited(argv, env, limit, err_path)
    s = Sample(figure, tool, seconds=w.seconds)
    if not w.finished:
        s.status = "limit"
        s.entries = w.lines if argv[0] == "find" else None
        s.note = f"killed after {limit:g} s"
        return s
    if w.returncode != 0:
        s.status = "failed"
        s.note = f"exit {w.returncode}: {last_line(w.stderr)}"
    if argv[0] == "find":
        s.entries = w.lines
    else:
        with contextlib.suppress(ValueError, IndexError):
            s.du_kib = int(w.tail.strip().splitlines()[-1].split()[0])
    return s


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def read_file(path: Path, buf: bytearray) -> tuple[float, int]:
    """Open and read `path` in READ_BLOCK reads into buf: (seconds, bytes)."""
    view = memoryview(buf)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        n = 0
        while n < len(buf) and (got := f.readinto(view[n:n + READ_BLOCK])):
            n += got
    return time.perf_counter() - start, n


# --------------------------------------------------------------------------------------------
# Mounts: started, waited for, measured, and always unmounted


def _die_with_parent() -> None:
    """In restic's child before exec: SIGTERM when the bench dies (PR_SET_PDEATHSIG), so that a
    bench killed outright leaves no restic serving (its mount goes with it)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _fusermount() -> str:
    return shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def serving_pid(mountpoint: Path) -> int | None:
    """The process serving a mount that its command put in the background: the live process
    whose command line holds 'mount' and the mountpoint (libfuse and borg fork, and the child
    keeps the command line)."""
    want = os.fsencode(str(mountpoint))
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if want in argv and b"mount" in argv:
            found.append(int(entry))
    return found[0] if len(found) == 1 else None


def memory(pid: int | None) -> tuple[int | None, int | None]:
    """(VmHWM, VmRSS) of pid in bytes, from /proc/PID/status."""
    if pid is None:
        return None, None
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out.get("VmHWM"), out.get("VmRSS")


@dataclass
class Mount:
    tool: str  # dittohead | restic | borg
    mountpoint: Path
    env: dict[str, str]
    umount_argv: list[str] | None = None  # the tool's own unmount command, tried first
    background: bool = True  # the command puts the server in the background (not restic)
    proc: subprocess.Popen | None = None  # the command (restic's is the server itself)
    pid: int | None = None  # the process serving the mount
    ready_s: float | None = None
    returned_s: float | None = None  # when a backgrounding command returned


class Mounts:
    """Every mount the run has up; close() unmounts them all, whatever happened."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.active: list[Mount] = []
        self.stuck: list[str] = []  # mountpoints that could not be unmounted
        self._seq = 0

    def mount(self, m: Mount, argv: list[str], probe: Path, *, background: bool,
              dropper: CacheDropper) -> Mount:
        """Start argv, which mounts at m.mountpoint, and time it until a stat of `probe`
        succeeds. A backgrounding command (dittohead, borg) must exit 0; a foreground one
        (restic) keeps running. Raises ToolFailed if the mount does not come up."""
        if os.path.ismount(m.mountpoint):
            raise ToolFailed(m.tool, f"{m.mountpoint} is mounted already")
        self._seq += 1
        stem = self.logs / f"mount-{self._seq:02d}-{m.tool}"
        m.background = background
        dropper.drop()
        with open(stem.with_suffix(".out"), "wb") as out, \
                open(stem.with_suffix(".err"), "wb") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    env=m.env,
                                    preexec_fn=None if background else _die_with_parent)  # noqa: PLW1509 (prctl only)
        m.proc = proc
        self.active.append(m)  # from here on, close() takes it down
        why = ""
        while True:
            with contextlib.suppress(OSError):
                os.stat(probe)
                m.ready_s = time.perf_counter() - start
                break
            code = proc.poll()
            if code is not None and m.returned_s is None:
                m.returned_s = time.perf_counter() - start
                if code != 0 or not background:
                    why = f"{Path(argv[0]).name} exited {code}"
                    break
            if time.perf_counter() - start > MOUNT_TIMEOUT:
                why = f"{probe} not there after {MOUNT_TIMEOUT:g} s"
                break
            time.sleep(POLL)
        if background and not why:
            proc.wait()
            if m.returned_s is None:  # the stat won the race with the command's exit
                m.returned_s = time.perf_counter() - start
        if why:
            text = last_line(stem.with_suffix(".err").read_text(errors="replace"))
            raise ToolFailed(m.tool, f"mount: {why}{': ' + text if text else ''}")
        m.pid = proc.pid if not background else serving_pid(m.mountpoint)
        return m

    def unmount(self, m: Mount) -> None:
        """The tool's own unmount, else fusermount -u, else a lazy one (-uz); then wait for the
        serving process to end, so that it does not run into the next figure."""
        if m.background and m.proc is not None and m.proc.poll() is None:
            # Stopped while the command was mounting: let it finish first, or its mount would
            # come up after the unmount.
            try:
                m.proc.wait(timeout=MOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait()
        if m.background and m.pid is None and os.path.ismount(m.mountpoint):
            m.pid = serving_pid(m.mountpoint)
        tries = [m.umount_argv] if m.umount_argv else []
        tries += [[_fusermount(), "-u", str(m.mountpoint)], [_fusermount(), "-uz", str(m.mountpoint)]]
        for argv in tries:
            if not os.path.ismount(m.mountpoint):
                break
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=m.env,
                               timeout=60, check=False)
        if not m.background and m.proc is not None and m.proc.poll() is None:  # restic
            # It ends once unmounted; on SIGINT it unmounts and ends (also while starting).
            for sig, wait in ((None, 2), (signal.SIGINT, 10), (signal.SIGKILL, None)):
                if sig is not None:
                    m.proc.send_signal(sig)
                try:
                    m.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if os.path.ismount(m.mountpoint):  # e.g. restic killed: its mount is left, dead
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run([_fusermount(), "-uz", str(m.mountpoint)], capture_output=True,
                               stdin=subprocess.DEVNULL, timeout=60, check=False)
        deadline = time.monotonic() + 30
        while m.pid is not None and _alive(m.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if os.path.ismount(m.mountpoint):
            self.stuck.append(str(m.mountpoint))
            say(f"could not unmount {m.mountpoint}")
        if m in self.active:
            self.active.remove(m)

    def close(self) -> None:
        for m in reversed(list(self.active)):
            self.unmount(m)


# --------------------------------------------------------------------------------------------
# The 1.2 GB study


@dataclass
class Setup:
    ctx: Context
    read_rel: str  # the file read sequentially, relative to the study
    read_size: int
    read_digest: bytes
    files: int
    total: int
    gen_seconds: float
    tools: dict[str, Tool] = field(default_factory=dict)  # the tools that are set up
    skipped: dict[str, str] = field(default_factory=dict)  # tool -> why not


def choose_read_file(files: list[SourceFile]) -> SourceFile | None:
    """The study's file of about 150 MiB, if it has one."""
    near = [sf for sf in files if 0.9 * READ_SIZE <= sf.size <= 1.1 * READ_SIZE]
    return near[0] if near else None


def build_study(args: argparse.Namespace, workdir: Path) -> Setup:
    files = plan_source(args.scale, args.seed)
    ctx = Context(workdir=workdir, src=workdir / "study", logs=workdir / "logs",
                  timeout=args.timeout)
    ctx.logs.mkdir(exist_ok=True)
    read = choose_read_file(files)
    extra = read is None
    if extra:  # at other scales bench.py's large files are not 150 MiB: add one, here only
        read = SourceFile(EXTRA_READ_FILE, READ_SIZE, "large")
        files.append(read)
    total = sum(sf.size for sf in files)
    say(f"generating {len(files):,} files, {fmt_bytes(total)} ({total / GiB:.2f} GiB) in"
        f" {ctx.src}" + (f" (with {EXTRA_READ_FILE}, 150 MiB, to read)" if extra else ""))
    start = time.perf_counter()
    generate_source(ctx.src, files[:-1] if extra else files, args.seed)
    if extra:
        write_content(ctx.src / read.path, read.size, content_key(args.seed, read.path, "day1"))
    gen_seconds = time.perf_counter() - start
    source_ready = time.monotonic()
    with open(ctx.src / read.path, "rb") as f:
        digest = blake3.blake3(f.read()).digest()
    setup = Setup(ctx, read.path, read.size, digest, len(files), total, gen_seconds)

    makers = {"dittohead": lambda: Dittohead(ctx, args.dittohead, SAME),
              "restic": lambda: Restic(ctx), "borg": lambda: Borg(ctx)}
    for name in ALL_TOOLS:
        if name not in args.tools:
            continue
        tool = makers[name]()
        if tool.exe is None:
            setup.skipped[name] = "not installed"
            continue
        setup.tools[name] = tool
    time.sleep(max(0.0, source_ready + SOURCE_SETTLE - time.monotonic()))
    for name, tool in list(setup.tools.items()):
        say(f"putting the study into {name} (untimed)")
        try:
            tool.setup()
            measures = tool.backup("initial")
        except ToolFailed as e:
            if name == "dittohead":
                raise
            say(f"{name} failed: {e.what}")
            setup.skipped[name] = f"failed: {e.what}"
            del setup.tools[name]
            continue
        took = sum(m.seconds or 0 for m in measures if m.phase in ("", "total"))
        say(f"  {name}: {took:.1f} s")
    return setup


class StudyRun:
    """The figures of the 1.2 GB study, round after round."""

    def __init__(self, args: argparse.Namespace, setup: Setup, mounts: Mounts,
                 dropper: CacheDropper) -> None:
        self.args = args
        self.setup = setup
        self.ctx = setup.ctx
        self.mounts = mounts
        self.dropper = dropper
        self.samples: list[Sample] = []
        self.buf = bytearray(setup.read_size + READ_BLOCK)
        self.mnt = self.ctx.workdir / "mnt"
        self.src_rel = str(self.ctx.src).lstrip("/")  # where restic and borg keep the study
        self.failed_dittohead = False
        self._seq = 0

    def err_path(self, what: str) -> Path:
        self._seq += 1
        return self.ctx.logs / f"walk-{self._seq:03d}-{what}.err"

    def add(self, s: Sample, r: int) -> Sample:
        s.round = r
        self.samples.append(s)
        shown = (f"{s.rate / MiB:,.0f} MiB/s" if s.figure == "read" and s.rate else
                 fmt_bytes(s.size) if s.figure.startswith("rss") else
                 f"{s.seconds:.3f} s" if s.seconds is not None else "-")
        extra = f", {s.entries:,} entries" if s.entries is not None else ""
        say(f"  round {r + 1}: {s.figure:14} {s.tool:14} {shown}{extra}"
            f"{' (' + s.status + ')' if s.status != 'ok' else ''}")
        return s

    def go(self) -> None:
        order = [t for t in ALL_TOOLS if t in self.setup.tools]
        for d in ("dittohead", "restic", "borg", "borg-versions"):
            (self.mnt / d).mkdir(parents=True, exist_ok=True)
        for r in range(self.args.rounds):
            say(f"round {r + 1} of {self.args.rounds}")
            reads = ["local", "cat"] if r % 2 == 0 else ["cat", "local"]
            for which in reads:
                if which == "local":
                    self.read("local file", self.ctx.src / self.setup.read_rel, r)
                elif "dittohead" in self.setup.tools:
                    self.cat(r)
            k = r % len(order) if order else 0
            for name in order[k:] + order[:k]:
                try:
                    getattr(self, f"round_{name}")(r)
                except ToolFailed as e:
                    say(f"{name} failed: {e.what}")
                    self.add(Sample("ready", name, status="failed", note=e.what), r)
                    if name == "dittohead":
                        self.failed_dittohead = True
                finally:
                    self.mounts.close()

    # -- one figure

    def read(self, tool: str, path: Path, r: int) -> Sample:
        self.dropper.drop()
        try:
            seconds, n = read_file(path, self.buf)
        except OSError as e:
            return self.add(Sample("read", tool, status="failed", note=str(e)), r)
        s = Sample("read", tool, seconds=seconds, size=n)
        if n != self.setup.read_size:
            s.status, s.note = "failed", f"read {n:,} bytes, not {self.setup.read_size:,}"
        elif blake3.blake3(memoryview(self.buf)[:n]).digest() != self.setup.read_digest:
            s.status, s.note = "failed", "the bytes read differ from the source's"
        return self.add(s, r)

    def cat(self, r: int) -> Sample:
        dh = self.setup.tools["dittohead"]
        assert isinstance(dh, Dittohead)
        argv = [str(dh.exe), "cat", "--store", str(dh.root), "--study", STUDY, "--",
                self.setup.read_rel]
        self.dropper.drop()
        with open(self.err_path("cat"), "wb") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, env=dh.side_env(dh.server))
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - start
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        s = Sample("read", "dittohead cat", seconds=seconds, size=self.setup.read_size,
                   note=f"a process, start-up included; CPU {usage.ru_utime + usage.ru_stime:.2f} s")
        if code != 0:
            s.status, s.note = "failed", f"exit {code}"
            self.failed_dittohead = True
        return self.add(s, r)

    def walks(self, tool: str, suffix: str, folder: Path, env: dict[str, str], r: int) -> None:
        for cmd in ("find", "du"):
            self.dropper.drop()
            argv = ["find", str(folder)] if cmd == "find" else ["du", "-s", str(folder)]
            s = walk_sample(f"{cmd}-{suffix}", tool, argv, env, self.args.limit,
                            self.err_path(f"{cmd}-{tool}"))
            self.add(s, r)
            if tool == "dittohead" and s.status == "failed":
                self.failed_dittohead = True

    def rss(self, tool: str, m: Mount, r: int, figure: str = "rss") -> None:
        hwm, now = memory(m.pid)
        if hwm is None:
            self.add(Sample(figure, tool, status="failed", note="no serving process found"), r)
        else:
            self.add(Sample(figure, tool, size=hwm, note=f"VmHWM; VmRSS at the end {fmt_bytes(now)}"),
                     r)

    def ready(self, m: Mount, r: int, figure: str = "ready") -> None:
        note = ""
        if m.returned_s is not None and m.proc is not None and m.proc.pid != m.pid:
            note = f"the command returned after {m.returned_s:.3f} s"
        self.add(Sample(figure, m.tool, seconds=m.ready_s, note=note), r)

    # -- one tool's mount, for one round

    def round_dittohead(self, r: int) -> None:
        dh = self.setup.tools["dittohead"]
        assert isinstance(dh, Dittohead)
        mp = self.mnt / "dittohead"
        env = dh.side_env(dh.server)
        m = Mount("dittohead", mp, env, [str(dh.exe), "umount", str(mp)])
        self.mounts.mount(m, [str(dh.exe), "mount", "--store", str(dh.root), str(mp), "--study",
                              STUDY], mp / "current" / self.setup.read_rel, background=True,
                          dropper=self.dropper)
        self.ready(m, r)
        self.read("dittohead", mp / "current" / self.setup.read_rel, r)
        self.walks("dittohead", "current", mp / "current", env, r)
        self.walks("dittohead", "versions", mp / "versions", env, r)
        self.rss("dittohead", m, r)

    def round_restic(self, r: int) -> None:
        rs = self.setup.tools["restic"]
        assert isinstance(rs, Restic)
        mp = self.mnt / "restic"
        env = rs.env()
        m = Mount("restic", mp, env)
        study = mp / "snapshots" / "latest" / self.src_rel
        self.mounts.mount(m, [str(rs.exe), *rs.common(), "mount", str(mp)],
                          study / self.setup.read_rel, background=False, dropper=self.dropper)
        self.ready(m, r)
        self.read("restic", study / self.setup.read_rel, r)
        self.walks("restic", "current", study, env, r)
        self.rss("restic", m, r)

    def round_borg(self, r: int) -> None:
        bg = self.setup.tools["borg"]
        assert isinstance(bg, Borg)
        env = bg.env()
        mp = self.mnt / "borg"
        m = Mount("borg", mp, env, [str(bg.exe), "umount", str(mp)])
        study = mp / ARCHIVE / self.src_rel
        self.mounts.mount(m, [str(bg.exe), "mount", str(bg.repo), str(mp)],
                          study / self.setup.read_rel, background=True, dropper=self.dropper)
        self.ready(m, r)
        self.read("borg", study / self.setup.read_rel, r)
        self.walks("borg", "current", study, env, r)
        self.rss("borg", m, r)
        self.mounts.unmount(m)
        # The versions view: each file a folder of its versions, NAME.00001.EXT (borg's naming).
        mp = self.mnt / "borg-versions"
        m = Mount("borg", mp, env, [str(bg.exe), "umount", str(mp)])
        study = mp / self.src_rel
        stem, ext = os.path.splitext(Path(self.setup.read_rel).name)
        probe = study / self.setup.read_rel / f"{stem}.00001{ext}"
        self.mounts.mount(m, [str(bg.exe), "mount", "-o", "versions", str(bg.repo), str(mp)],
                          probe, background=True, dropper=self.dropper)
        self.ready(m, r, "ready-versions")
        self.walks("borg", "versions", study, env, r)
        self.rss("borg", m, r, "rss-versions")


# --------------------------------------------------------------------------------------------
# The 1M-version study (scale.py's study a)


class MillionRun:
    def __init__(self, args: argparse.Namespace, workdir: Path, mounts: Mounts,
                 dropper: CacheDropper, env: dict[str, str]) -> None:
        self.args = args
        self.workdir = workdir
        self.mounts = mounts
        self.dropper = dropper
        self.env = env
        self.samples: list[Sample] = []
        self.info: dict[str, Any] = {}
        self.failed = ""

    def add(self, s: Sample) -> Sample:
        self.samples.append(s)
        extra = f", {s.entries:,} entries" if s.entries is not None else ""
        shown = fmt_bytes(s.size) if s.figure == "rss" else (
            f"{s.seconds:.3f} s" if s.seconds is not None else "-")
        say(f"  1M: {s.figure:16} {shown}{extra}"
            f"{' (' + s.status + ': ' + s.note + ')' if s.status != 'ok' else ''}")
        return s

    def go(self) -> None:
        sargs = argparse.Namespace(dittohead=self.args.dittohead, timeout=self.args.timeout,
                                   keep=self.args.keep, python=sys.executable)
        st = scale.Study("a", sargs, self.workdir, self.dropper, self.env)
        t0 = time.perf_counter()
        try:
            st.set_up()
            scale.build_a(st, self.args.scale_1m)
        except scale.DittoheadFailed as e:
            self.failed = f"building the study: {e}"
            if e.run is not None:
                print(e.run.stderr[-3000:], file=sys.stderr)
            return
        self.info.update(st.info, build_s=time.perf_counter() - t0, study=st.name,
                         store_bytes=scale.tree_size(st.root / "store"))
        path = f"wide/w{st.info['wide'] // 2:05d}.csv"
        self.info["read_path"] = path
        mp = self.workdir / "mnt" / "1m"
        mp.mkdir(parents=True, exist_ok=True)
        exe = self.args.dittohead
        m = Mount("dittohead", mp, self.env, [exe, "umount", str(mp)])
        try:
            self.mounts.mount(m, [exe, "mount", "--store", str(st.root), str(mp), "--study",
                                  st.name], mp / "current" / path, background=True,
                              dropper=self.dropper)
        except ToolFailed as e:
            self.failed = e.what
            return
        self.add(Sample("ready", "dittohead", seconds=m.ready_s,
                        note=f"the command returned after {m.returned_s or 0:.3f} s"))
        self.dropper.drop()
        start = time.perf_counter()
        data = (mp / "current" / path).read_bytes()
        seconds = time.perf_counter() - start
        ok = data == scale.content(path, scale.VERSIONS_A)
        self.add(Sample("read one file", "dittohead", "ok" if ok else "failed", seconds,
                        len(data), note=f"current/{path}, {len(data)} bytes, open + read"
                        + ("" if ok else "; not the bytes written")))
        self.dropper.drop()
        start = time.perf_counter()
        cp = subprocess.run([exe, "cat", "--store", str(st.root), "--study", st.name, "--", path],
                            capture_output=True, env=self.env, check=False,
                            stdin=subprocess.DEVNULL, timeout=self.args.timeout)
        seconds = time.perf_counter() - start
        self.add(Sample("dittohead cat", "dittohead cat", "ok" if cp.returncode == 0 else "failed",
                        seconds, len(cp.stdout), note="the same file; a process, start-up included"))
        for area in ("current", "versions"):
            for cmd in ("find", "du"):
                self.dropper.drop()
                argv = ["find", str(mp / area)] if cmd == "find" else ["du", "-s", str(mp / area)]
                err = self.workdir / "logs" / f"1m-{cmd}-{area}.err"
                self.add(walk_sample(f"{cmd} {area}", "dittohead", argv, self.env,
                                     self.args.limit, err))
        hwm, now = memory(m.pid)
        self.add(Sample("rss", "dittohead", "ok" if hwm else "failed", size=hwm,
                        note=f"VmHWM of the mount process; VmRSS at the end {fmt_bytes(now)}"))
        self.mounts.unmount(m)
        if not self.args.keep:
            shutil.rmtree(st.base, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Report


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class Cell:
    """One tool's figure over the rounds: the median, and every round's value."""

    value: float | None  # seconds, bytes/s (read) or bytes (rss)
    values: list[float]
    entries: int | None = None
    du_kib: int | None = None
    status: str = "ok"
    note: str = ""


def value_of(s: Sample) -> float | None:
    """What a sample's figure is judged on: MiB/s for reads, bytes for RSS, else seconds."""
    if s.figure == "read":
        return s.rate
    if s.figure.startswith("rss"):
        return float(s.size) if s.size else None
    return s.seconds


def cell(samples: list[Sample], figure: str, tool: str) -> Cell | None:
    got = [s for s in samples if s.figure == figure and s.tool == tool]
    if not got:
        return None
    ok = [s for s in got if s.status == "ok" and value_of(s) is not None]
    values = [v for s in ok if (v := value_of(s)) is not None]
    bad = [s for s in got if s.status != "ok"]
    mid = median(values)
    # The note (and entries, du) of the round whose value is nearest the median.
    nearest = min(ok, key=lambda s: abs(value_of(s) - mid)) if ok and mid is not None else None
    c = Cell(mid, values, entries=nearest.entries if nearest else None,
             du_kib=nearest.du_kib if nearest else None, note=nearest.note if nearest else "")
    limited = [s for s in bad if s.status == "limit"]
    if limited:  # not finished in some round: no figure, rather than the median of the others
        c.value, c.status = None, "limit"
        c.entries = limited[0].entries
        c.note = (f"{limited[0].note} in {len(limited)} of {len(got)} round(s)"
                  + (f", {c.entries:,} entries listed by then" if c.entries is not None else ""))
    elif not ok:
        c.status = bad[0].status
        c.entries = bad[0].entries
        c.note = bad[0].note
    elif bad:
        c.note = f"{len(bad)} round(s) {bad[0].status}: {bad[0].note}"
    return c


def better(dh: Cell | None, peer: Cell | None, figure: str) -> float | None:
    """How many times better dittohead is than the peer (above 1: better): peer seconds / ours,
    our throughput / the peer's, the peer's RSS / ours."""
    if dh is None or peer is None or not dh.value or not peer.value:
        return None
    return dh.value / peer.value if figure == "read" else peer.value / dh.value


def show(c: Cell | None, figure: str) -> str:
    if c is None:
        return "-"
    if c.value is None:
        return "not finished" if c.status == "limit" else c.status
    if figure == "read":
        return f"{c.value / MiB:,.0f} MiB/s"
    if figure.startswith("rss"):
        return fmt_bytes(c.value)
    return f"{c.value:.3f} s"


def spread(c: Cell, figure: str) -> str:
    if len(c.values) < 2:
        return ""
    if figure == "read":
        vals = [f"{v / MiB:,.0f}" for v in c.values]
    elif figure.startswith("rss"):
        vals = [f"{v / 1e6:.0f}" for v in c.values]
    else:
        vals = [f"{v:.3f}" for v in c.values]
    return "rounds " + ", ".join(vals)


def study_rows(samples: list[Sample], run: StudyRun) -> tuple[list[list[str]], dict[str, Any]]:
    """The table's rows (dittohead's with its ratios to each peer, then each peer's), and the
    ratios by "FIGURE vs PEER"."""
    rows: list[list[str]] = []
    ratios: dict[str, Any] = {}
    peer_figure = {"ready-versions": {"restic": None, "borg": "ready-versions"},
                   "find-versions": {"restic": None, "borg": "find-versions"},
                   "du-versions": {"restic": None, "borg": "du-versions"},
                   "rss-versions": {"restic": None, "borg": "rss-versions"}}
    src = run.src_rel
    where = {
        "dittohead": {"current": "current/", "versions": "versions/"},
        "restic": {"current": f"snapshots/latest/{src}/"},
        "borg": {"current": f"{ARCHIVE}/{src}/", "versions": f"-o versions: {src}/"},
    }
    for figure, label, _unit in FIGURES:
        area = figure.split("-", 1)[1] if figure.startswith(("find-", "du-")) else ""
        dh_figure = {"ready-versions": "ready", "rss-versions": "rss"}.get(figure, figure)
        dh_tools = ["dittohead", "dittohead cat", "local file"] if figure == "read" else ["dittohead"]
        peer_cells = {}
        for peer in PEERS:
            pf = peer_figure.get(figure, {}).get(peer, figure)
            peer_cells[peer] = cell(samples, pf, peer) if pf else None
        for tool in dh_tools:
            c = cell(samples, dh_figure, tool)
            if c is None:
                continue
            name = {"dittohead": "dittohead mount", "dittohead cat": "dittohead cat > /dev/null",
                    "local file": "plain local file (reference)"}[tool]
            if figure in ("ready-versions", "rss-versions"):
                name = "dittohead mount (the same mount)"
            if area:
                name += f" {where['dittohead'][area]}"
            vs = []
            for peer in PEERS:
                x = better(c, peer_cells[peer], figure) if tool != "local file" else None
                vs.append("-" if x is None else f"{x:.2f}x")
                if tool == "dittohead" and x is not None:
                    ratios[f"{figure} vs {peer}"] = x
            rows.append([label, name, show(c, figure), *vs, describe(c, figure)])
        for peer in PEERS:
            pf = peer_figure.get(figure, {}).get(peer, figure)
            c = peer_cells[peer]
            if pf is None:
                if peer in run.setup.tools:
                    rows.append([label, f"{peer} mount", "n/a", "", "",
                                 "no view of each file's versions"])
                continue
            if c is None:
                if peer in run.setup.skipped:
                    rows.append([label, f"{peer} mount", "-", "", "", run.setup.skipped[peer]])
                continue
            name = f"{peer} mount" + (" -o versions" if figure.endswith("-versions")
                                      and not area else "")
            if area:
                name += f" {where[peer][area]}"
            rows.append([label, name, show(c, figure), "", "", describe(c, figure)])
    return rows, ratios


def describe(c: Cell, figure: str) -> str:
    parts = []
    if c.entries is not None and c.status != "limit":
        parts.append(f"{c.entries:,} entries")
    if c.du_kib is not None:
        parts.append(f"du {c.du_kib * 1024 / 1e6:,.1f} MB")
    if s := spread(c, figure):
        parts.append(s)
    if c.note:
        parts.append(c.note)
    return "; ".join(parts)


@dataclass
class Target:
    target: str
    figure: str
    status: str  # met | missed | n/a


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def evaluate_targets(samples: list[Sample], ratios: dict[str, Any], study: str,
                     million: MillionRun | None) -> list[Target]:
    targets = []
    t = f"ready in under {TARGET_READY_S:g} s at any size"
    figs = []
    c = cell(samples, "ready", "dittohead")
    if c and c.value is not None:
        figs.append((study, c.value))
    if million is not None:
        m = next((s for s in million.samples if s.figure == "ready" and s.status == "ok"), None)
        if m and m.seconds is not None:
            figs.append((f"{million.info.get('versions', 0):,} versions", m.seconds))
    if figs:
        targets.append(Target(t, "; ".join(f"{k} {v:.3f} s" for k, v in figs),
                              verdict(all(v < TARGET_READY_S for _, v in figs))))
    else:
        targets.append(Target(t, "no figure", "n/a"))
    t = f"sequential reads of at least {TARGET_READ_RATE / 1e9:g} GB/s"
    c = cell(samples, "read", "dittohead")
    if c and c.value:
        cat = cell(samples, "read", "dittohead cat")
        also = f" (dittohead cat {cat.value / 1e9:.2f} GB/s)" if cat and cat.value else ""
        targets.append(Target(t, f"through the mount {c.value / 1e9:.2f} GB/s"
                              f" ({c.value / MiB:,.0f} MiB/s){also}",
                              verdict(c.value >= TARGET_READ_RATE)))
    else:
        targets.append(Target(t, "no figure", "n/a"))
    t = f"a find under {TARGET_FIND_S:g} s"
    c = cell(samples, "find-current", "dittohead")
    if c and c.value is not None:
        v = cell(samples, "find-versions", "dittohead")
        also = f"; versions/ {v.value:.3f} s" if v and v.value is not None else ""
        targets.append(Target(t, f"current/ {c.value:.3f} s ({c.entries or 0:,} entries){also}",
                              verdict(c.value < TARGET_FIND_S)))
    else:
        targets.append(Target(t, "no figure", "n/a"))
    t = "faster than both peers on every figure"
    judged = {k: v for k, v in ratios.items() if k.split(" vs ")[0] in SPEED_FIGURES}
    unfinished = [f for f in SPEED_FIGURES
                  if (c := cell(samples, f, "dittohead")) is not None and c.status == "limit"]
    if judged:
        lost = [f"{k} ({v:.2f}x)" for k, v in judged.items() if v <= 1]
        lost += [f"{f} (not finished)" for f in unfinished]
        n = len(judged) + len(unfinished)
        figure = (f"{n - len(lost)} of {n} won"
                  + (f"; lost: {', '.join(lost)}" if lost else ""))
        targets.append(Target(t, figure, verdict(not lost)))
    else:
        targets.append(Target(t, "no peer figures", "n/a"))
    return targets


def million_rows(million: MillionRun) -> list[list[str]]:
    rows = []
    for s in million.samples:
        value = (fmt_bytes(s.size) if s.figure == "rss" else
                 f"{s.seconds:.3f} s" if s.seconds is not None else "-")
        parts = []
        if s.entries is not None:
            parts.append(f"{s.entries:,} entries" + (" listed by then" if s.status == "limit"
                                                      else ""))
        if s.du_kib is not None:
            parts.append(f"du {s.du_kib * 1024 / 1e6:,.1f} MB")
        if s.note:
            parts.append(s.note)
        rows.append([s.figure, value, "" if s.status == "ok" else s.status, "; ".join(parts)])
    return rows


# --------------------------------------------------------------------------------------------
# Main


def versions(args: argparse.Namespace) -> dict[str, str]:
    def first(argv: list[str]) -> str:
        try:
            cp = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                                stdin=subprocess.DEVNULL)
        except OSError:
            return "not found"
        lines = (cp.stdout + cp.stderr).strip().splitlines()
        return lines[0].strip() if lines else "unknown"

    out = {"dittohead": first([args.dittohead, "--version"]).replace(", version", "")}
    try:
        from importlib.metadata import version

        out["mfusepy"] = version("mfusepy")
    except Exception:  # noqa: BLE001 - only for the header
        out["mfusepy"] = "unknown"
    out["fuse3"] = first([_fusermount(), "-V"])
    if "restic" in args.tools:
        out["restic"] = " ".join(first(["restic", "version"]).split()[:2])
    if "borg" in args.tools:
        llfuse = first(["/usr/bin/python3", "-c", "import llfuse; print(llfuse.__version__)"])
        out["borg"] = f"{first(['borg', '--version'])} (llfuse {llfuse.split()[-1]})"
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="working folder (default: a new one under the temp dir);"
                   " an existing one must be empty or a previous benchmark's, and is cleared")
    p.add_argument("--scale", type=float, default=1.0,
                   help="size of bench.py's study: 1.0 is 1.22 GB, 0.05 a quick check (0 skips it)")
    p.add_argument("--scale-1m", type=float, default=1.0,
                   help="size of scale.py's study a: 1.0 is 1M versions, 0.1 is 100,000"
                   " (0 skips it)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of the 1.2 GB study's figures, tools in a rotated order;"
                   " the median is shown (default 3)")
    p.add_argument("--limit", type=float, default=600.0,
                   help="seconds after which a find or du is killed (default 600)")
    p.add_argument("--seed", type=int, default=1, help="seed of the synthetic study (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the workdir afterwards")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    p.add_argument("--tools", default=",".join(ALL_TOOLS),
                   help=f"comma-separated tools (default: {','.join(ALL_TOOLS)})")
    p.add_argument("--dittohead", metavar="PATH", default=default_dittohead(),
                   help="the dittohead executable (default: beside this Python, else on PATH)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds after which a setup command is killed (default 1800)")
    p.add_argument("--no-drop-caches", action="store_true",
                   help="do not drop the page cache before each figure")
    args = p.parse_args(argv)
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(args.tools) - set(ALL_TOOLS)
    if unknown or "dittohead" not in args.tools:
        p.error(f"--tools: unknown {', '.join(sorted(unknown))}" if unknown
                else "--tools must include dittohead")
    if args.scale < 0 or args.scale_1m < 0 or args.scale_1m > 1:
        p.error("--scale must be >= 0, --scale-1m in [0, 1]")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.dittohead is None:
        p.error("no dittohead executable found (see --dittohead)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.path.exists("/dev/fuse"):
        say("no /dev/fuse: nothing to measure (modprobe fuse; in a container, give it /dev/fuse)")
        return 1
    workdir = prepare_workdir(args.workdir)
    os.chmod(workdir, 0o755)
    (workdir / "logs").mkdir()
    mounts = Mounts(workdir / "logs")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        return benchmark(args, workdir, mounts)
    except Interrupted as e:
        say(f"stopped by signal {e.args[0]}")
        return 128 + int(e.args[0])
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        mounts.close()
        if mounts.stuck:
            say(f"still mounted: {', '.join(mounts.stuck)}; the workdir {workdir} is left")
        elif args.keep:
            say(f"workdir kept: {workdir} (command output in {workdir / 'logs'})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def benchmark(args: argparse.Namespace, workdir: Path, mounts: Mounts) -> int:
    vers = versions(args)
    dropper = CacheDropper(enabled=not args.no_drop_caches)
    dropper.drop()  # says now, once, if it cannot
    run: StudyRun | None = None
    failed = False
    if args.scale > 0:
        try:
            setup = build_study(args, workdir)
        except ToolFailed as e:
            say(f"dittohead failed: {e.what}")
            if e.run is not None:
                print(e.run.stderr.strip()[-3000:], file=sys.stderr)
            return 1
        run = StudyRun(args, setup, mounts, dropper)
        run.go()
        failed |= run.failed_dittohead
        if not args.keep:  # the 1M study needs the room
            shutil.rmtree(setup.ctx.src, ignore_errors=True)
    million: MillionRun | None = None
    if args.scale_1m > 0:
        say(f"the 1M-version study (scale.py's a) at scale {args.scale_1m}")
        env = {k: v for k, v in os.environ.items() if k != "DITTOHEAD_STORE"}
        env["DITTOHEAD_STATE_DIR"] = str(workdir / "client-state")
        million = MillionRun(args, workdir, mounts, dropper, env)
        million.go()
        if million.failed:
            say(f"1M study: dittohead failed: {million.failed}")
            failed = True

    samples = run.samples if run else []
    header = [
        f"dittohead mount benchmark: {vers['dittohead']}; code {scale.git_state()}",
        (f"machine: {os.cpu_count()} CPUs, {platform.system()} {platform.release()},"
         f" Python {platform.python_version()}; {dropper.describe()}"),
        "versions: " + "; ".join(f"{k}: {v}" for k, v in vers.items() if k != "dittohead"),
    ]
    rows: list[list[str]] = []
    ratios: dict[str, Any] = {}
    if run is not None:
        s = run.setup
        rows, ratios = study_rows(samples, run)
        header += [
            (f"study: bench.py's at scale {args.scale}, seed {args.seed}: {s.files:,} files,"
             f" {fmt_bytes(s.total)} ({s.total / GiB:.2f} GiB); the file read:"
             f" {s.read_rel}, {s.read_size / MiB:.0f} MiB; {args.rounds} round(s), the median"
             " shown, the tools' order rotated each round"),
            ("restic: encrypted (it cannot be turned off), password from a 0600 file;"
             " borg: --encryption=none, lz4 (its default); dittohead: sync + watch --once as"
             " this account"),
            ("vs restic, vs borg: how many times better dittohead's figure is (the peer's"
             " seconds / ours; our MiB/s / the peer's; the peer's RSS / ours): above 1 is better"),
        ]
        for name, why in s.skipped.items():
            header.append(f"{name}: {why}")
    study = f"{fmt_bytes(run.setup.total)} study" if run is not None else ""
    targets = evaluate_targets(samples, ratios, study, million)
    print()
    print("\n".join(header))
    if rows:
        print()
        print(table(["figure", "tool", "value", "vs restic", "vs borg", "note"], rows,
                    right=(2, 3, 4)))
    if million is not None:
        i = million.info
        print()
        print(f"1M-version study (scale.py's a, --scale-1m {args.scale_1m}): "
              f"{i.get('paths', 0):,} paths x {scale.VERSIONS_A} = {i.get('versions', 0):,}"
              f" versions, store {fmt_bytes(i.get('store_bytes'))}, built in"
              f" {i.get('build_s', 0):.0f} s; dittohead mount alone, one round; walks killed"
              f" after {args.limit:g} s")
        if million.samples:
            print(table(["figure", "value", "status", "note"], million_rows(million),
                        right=(1,)))
        if million.failed:
            print(f"dittohead failed: {million.failed}")
    print()
    print(table(["target (from the issue)", "figure", "status"],
                [[t.target, t.figure, t.status] for t in targets]))
    if failed:
        print("\ndittohead failed a step: see its output above")
    if args.json:
        doc = {
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "code": scale.git_state(),
            "versions": vers,
            "machine": {"cpus": os.cpu_count(), "system": platform.platform(),
                        "python": platform.python_version()},
            "caches_dropped": bool(dropper.works),
            "study": None if run is None else {
                "files": run.setup.files, "bytes": run.setup.total,
                "generate_seconds": run.setup.gen_seconds, "read_file": run.setup.read_rel,
                "read_size": run.setup.read_size, "skipped": run.setup.skipped},
            "samples": [{**asdict(x), "rate": x.rate} for x in samples],
            "ratios": ratios,
            "million": None if million is None else {
                "info": million.info, "failed": million.failed,
                "samples": [asdict(x) for x in million.samples]},
            "targets": [asdict(t) for t in targets],
            "dittohead_failed": failed,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
