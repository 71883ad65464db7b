#!/usr/bin/env python3
"""Benchmark dittohead at scale: a study of 1M versions and a study of 10,000 submissions.

    python benchmarks/scale.py [--workdir DIR] [--scale 1.0] [--only a|b] [--keep] [--json FILE]
                               [--no-drop-caches] [--no-export]

Two studies are built through the real ingest (``dittohead watch --store ROOT --once``, as a
child process), each in a server root of its own made by ``dittohead init`` and ``study add``:

    a   100,000 paths with 10 versions each (1M versions): 10 submissions of 100,000 files, one
        folder (wide/) holding 10,000 of them
    b   10,000 small submissions of one to three files each: each adds a file to wide/ (10,000
        files in the end), most add a version of one of 100 status files, every 50th one of
        shared/common.txt

The submissions are not made by ``sync``: the script writes them as a client would, with the
project's own format code (``dittohead.pack.PackWriter``, ``dittohead.manifest.encode``), into
ROOT/dropbox/STUDY/inbox/.NAME, then renames that to NAME (the commit). Every file is a few dozen
bytes derived from its path and version, so each is one chunk of its own.

For each study it prints, with the targets from the issue beside the figures: a one-file
submission's ingest time at the start (empty study) and at the end (each a ``watch --once`` of
just that submission; the median of three); ``versions PATH``, ``ls`` of the 10,000-entry folder
and ``cat`` of a small file with a cold cache; opening the view and looking up one path in-process
(where dittohead.view's StudyView is lazy); a full ``export`` beside ``cp -a`` of its result
followed by ``sync``; ``export`` of one new file into that export; the peak RSS of each (by GNU
time: see run_measured). It asserts nothing: the exit status is 1 only when dittohead fails a
step. --no-export skips the exports (at scale 1.0, study a's full export takes longer than the
rest together). benchmarks/README.md, "At scale", has more, and figures.

Dependencies: the standard library, blake3, and the dittohead package itself (for the format
code): run it with the project's virtualenv.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # beside this file
    CacheDropper,
    ChildRun,
    Interrupted,
    _on_signal,
    default_dittohead,
    fmt_bytes,
    prepare_workdir,
    table,
    tree_size,
)

try:
    from dittohead import format as fmt
    from dittohead import manifest as mf
    from dittohead.hashing import digest
    from dittohead.pack import PackWriter
except ImportError as _e:  # pragma: no cover - the script's own precondition
    sys.exit(f"scale: cannot import dittohead ({_e}); run it with the project's virtualenv"
             " (.venv/bin/python benchmarks/scale.py)")

SITE = "scale"
USER = "bench"
HOST = "generator"
MTIME_NS = 1_700_000_000 * 10**9  # every generated file's mtime (2023-11-14)

# Study a: PATHS_A paths, VERSIONS_A versions each, WIDE of them in one folder (wide/).
PATHS_A = 100_000
VERSIONS_A = 10
WIDE = 10_000
FOLDER_A = 100  # files in each of the other folders (subjNNN/sesN/)
# Study b: SUBMISSIONS_B submissions; each adds wide/rNNNNN.txt; 3 in 4 add a version of one of
# STATUS_B status files; every SHARED_EVERY-th one a version of shared/common.txt.
SUBMISSIONS_B = 10_000
STATUS_B = 100
SHARED_EVERY = 50
BATCHES_B = 10  # the bulk of b is committed and ingested in this many batches (one watch each)
PROBES = 3  # one-file submissions timed at the start and at the end (the median is shown)

# Targets from the issue.
TARGET_INGEST_RATIO = 1.5  # the one-file ingest at the end within 1.5x of the start
TARGET_READ_S = 0.2  # versions, ls, a view lookup, cold cache
TARGET_INCREMENTAL_S = 1.0  # export of one new file into an existing export
TARGET_EXPORT_RATIO = 2.0  # full export within 2x of cp -a + sync
TARGET_RSS = 100e6  # bytes, every figure

VIEW_PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
from dittohead import view
from dittohead.store.repo import Store
t1 = time.perf_counter()
out = {"import_s": t1 - t0, "lazy": hasattr(view.StudyView, "listdir")}
if out["lazy"]:
    store = Store.open(sys.argv[1])
    v = view.StudyView(store, sys.argv[2])
    t2 = time.perf_counter()
    node = v.lookup("current/" + sys.argv[3])
    t3 = time.perf_counter()
    v.lookup("current/" + sys.argv[3])
    t4 = time.perf_counter()
    out.update(open_s=t2 - t1, lookup_s=t3 - t2, open_lookup_s=t3 - t1, again_s=t4 - t3,
               node=type(node).__name__)
print(json.dumps(out))
"""


# --------------------------------------------------------------------------------------------
# Generating submissions with the project's format code


def content(path: str, version: int) -> bytes:
    """A version's bytes: a few dozen, unique to the path and the version."""
    return f"{path}\tversion {version}\tdittohead scale benchmark\n".encode()


def commit_submission(inbox: Path, name: str, study: str, files: Sequence[tuple[str, bytes]]) -> int:
    """Write a submission as a client would (packs of at most PACK_TARGET_CHUNKS chunks, then the
    manifest) into inbox/.NAME and commit it (rename to NAME). Every file is one chunk (shorter
    than CHUNK_MIN). Returns the bytes written."""
    staging = inbox / ("." + name)
    staging.mkdir()
    entries: list[mf.Entry] = []
    written = 0
    out = None
    writer: PackWriter | None = None
    tmp = staging / "pack.tmp"

    def close_pack() -> None:
        nonlocal written, out, writer
        assert writer is not None and out is not None
        pid, size = writer.finish()
        out.close()
        os.rename(tmp, staging / (pid.hex() + fmt.PACK_SUFFIX))
        written += size
        out = writer = None

    for path, data in files:
        assert 0 < len(data) < fmt.CHUNK_MIN
        if writer is not None and writer.full():
            close_pack()
        if writer is None:
            out = open(tmp, "wb", buffering=1 << 20)  # noqa: SIM115  (closed by close_pack)
            writer = PackWriter(out)
        cid = digest(data)
        writer.add(cid, data)
        entries.append(mf.Entry(path, len(data), MTIME_NS, 0o644, cid, ((cid, len(data)),)))
    if writer is not None:
        close_pack()
    if len(entries) > fmt.MANIFEST_MAX_ENTRIES:
        raise ValueError(f"{name}: {len(entries)} entries, over the manifest limit")
    manifest = mf.encode(mf.Manifest(study, SITE, USER, HOST, time.time_ns(), tuple(entries)))
    if len(manifest) > fmt.MANIFEST_MAX_SIZE:
        raise ValueError(f"{name}: manifest of {len(manifest)} bytes, over the limit")
    (staging / fmt.MANIFEST_NAME).write_bytes(manifest)
    os.rename(staging, inbox / name)
    return written + len(manifest)


def paths_a(n: int, wide: int) -> list[str]:
    """Study a's paths: wide/ with `wide` files, the rest in subjNNN/sesN/ folders of FOLDER_A."""
    out = [f"wide/w{i:05d}.csv" for i in range(wide)]
    for i in range(n - wide):
        folder = i // FOLDER_A
        out.append(f"subj{folder // 10:03d}/ses{folder % 10}/trial{i % FOLDER_A:03d}.csv")
    return out


def files_b(i: int) -> list[tuple[str, bytes]]:
    """Submission i of study b (0-based): one to three small files."""
    paths = [f"wide/r{i:05d}.txt"]
    if i % 4:
        paths.append(f"status/s{i % STATUS_B:02d}.txt")
    if i % SHARED_EVERY == 0:
        paths.append("shared/common.txt")
    return [(p, content(p, i)) for p in paths]


# --------------------------------------------------------------------------------------------
# Figures


@dataclass
class Figure:
    study: str
    what: str  # the row's label
    seconds: float | None = None
    peak_rss: int | None = None  # bytes
    target: str = ""  # e.g. "< 0.2 s"
    status: str = ""  # met | missed | n/a | "" (no target)
    rss_status: str = ""  # met | missed | "" (no RSS target on this row)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class DittoheadFailed(Exception):
    def __init__(self, what: str, run: ChildRun | None = None) -> None:
        super().__init__(what)
        self.run = run


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def rss_verdict(rss: int | None) -> str:
    return "" if rss is None else verdict(rss < TARGET_RSS)


class Study:
    """One server root with one study in it, and the figures measured on it."""

    def __init__(self, key: str, args: argparse.Namespace, workdir: Path, dropper: CacheDropper,
                 env: dict[str, str]) -> None:
        self.key = key
        self.name = f"scale-{key}"
        self.args = args
        self.exe: str = args.dittohead
        self.base = workdir / key
        self.root = self.base / "root"
        self.logs = workdir / "logs"
        self.dropper = dropper
        self.env = env
        self.figures: list[Figure] = []
        self.info: dict[str, Any] = {}
        self._seq = 0

    # -- running dittohead and other commands
    @property
    def inbox(self) -> Path:
        return self.root / "dropbox" / self.name / "inbox"

    def run(self, argv: Sequence[str], what: str, *, cold: bool = False) -> ChildRun:
        """Run a command (after dropping the caches if ``cold``); DittoheadFailed if it fails."""
        self._seq += 1
        stem = self.logs / f"{self.key}-{self._seq:04d}-{what}"
        if cold:
            self.dropper.drop()
        r = run_measured(list(argv), self.env, stem, self.args.timeout)
        if not self.args.keep:
            for suffix in (".out", ".err"):
                stem.with_suffix(suffix).unlink(missing_ok=True)
        if r.returncode != 0:
            raise DittoheadFailed(f"{' '.join(argv[:3])}... exited with {r.returncode}", r)
        return r

    def dh(self, *args: str, what: str, cold: bool = False) -> ChildRun:
        return self.run([self.exe, *args], what, cold=cold)

    def ingest(self, what: str) -> ChildRun:
        """watch --once; every committed submission must be ingested (none failed)."""
        r = self.dh("watch", "--store", str(self.root), "--once", what=what)
        failed = self.root / "dropbox" / self.name / "failed"
        if failed.is_dir() and any(failed.iterdir()):
            raise DittoheadFailed(f"{what}: a submission was rejected (see {failed})", r)
        if any(not n.startswith(".") for n in os.listdir(self.inbox)):
            raise DittoheadFailed(f"{what}: submissions left in the inbox", r)
        return r

    def commit(self, name: str, files: Sequence[tuple[str, bytes]]) -> int:
        return commit_submission(self.inbox, name, self.name, files)

    def add(self, fig: Figure) -> Figure:
        fig.study = self.name
        self.figures.append(fig)
        return fig

    # -- the steps
    def set_up(self) -> None:
        self.base.mkdir()
        self.dh("init", "--store", str(self.root), what="init")
        self.dh("study", "add", self.name, "--store", str(self.root), what="study-add")

    def startup(self) -> None:
        r = self.dh("--version", what="version", cold=True)
        warm = self.dh("--version", what="version-warm")
        self.add(Figure("", "start-up: dittohead --version (cold)", r.seconds, r.peak_rss,
                        note=f"for reference, part of every command's figure; warm {warm.seconds:.3f} s",
                        extra={"warm_s": warm.seconds}))

    def probes(self, when: str) -> list[ChildRun]:
        runs = []
        for k in range(1, PROBES + 1):
            path = f"probe/{when}-{k}.txt"
            self.commit(f"probe-{when}-{k}", [(path, content(path, k))])
            runs.append(self.ingest(f"probe-{when}-{k}"))
        return runs

    def probe_figures(self, start: list[ChildRun], end: list[ChildRun]) -> None:
        s = statistics.median(r.seconds for r in start)
        e = statistics.median(r.seconds for r in end)
        srss = max(r.peak_rss for r in start)
        erss = max(r.peak_rss for r in end)
        self.add(Figure("", "one-file ingest, start (empty study)", s, srss, rss_status=rss_verdict(srss),
                        note="median of " + ", ".join(f"{r.seconds:.2f}" for r in start),
                        extra={"runs": [r.seconds for r in start]}))
        self.add(Figure("", "one-file ingest, end", e, erss, target=f"<= {TARGET_INGEST_RATIO}x start",
                        status=verdict(e <= TARGET_INGEST_RATIO * s), rss_status=rss_verdict(erss),
                        note=f"{e / s:.2f}x start; median of " + ", ".join(f"{r.seconds:.2f}" for r in end),
                        extra={"runs": [r.seconds for r in end], "ratio": e / s}))

    def reads(self, path: str, folder: str, has_ls: bool) -> None:
        store = ["--store", str(self.root), "--study", self.name]
        self.read_figure(f"versions {path}", ["versions", *store, "--", path], "versions",
                         lambda out: f"{count_lines(out)} lines")
        if has_ls:
            self.read_figure(f"ls {folder}", ["ls", *store, "--", folder], "ls",
                             lambda out: f"{count_lines(out)} lines")
        else:
            self.add(Figure("", f"ls {folder} (cold)", target=f"< {TARGET_READ_S} s", status="n/a",
                            note="n/a (no ls command)"))
        self.read_figure(f"cat {path}", ["cat", *store, "--", path], "cat",
                         lambda out: f"{len(out.encode())} bytes")
        self.view_probe(path)

    def read_figure(self, label: str, args: list[str], what: str, describe: Callable[[str], str]) -> None:
        """A read command with a cold cache (the figure judged), then once more, warm."""
        cold = self.dh(*args, what=what, cold=True)
        warm = self.dh(*args, what=what + "-warm")
        self.add(Figure("", f"{label} (cold)", cold.seconds, cold.peak_rss, f"< {TARGET_READ_S} s",
                        verdict(cold.seconds < TARGET_READ_S), rss_verdict(cold.peak_rss),
                        note=f"{describe(cold.stdout)}; warm {warm.seconds:.3f} s",
                        extra={"warm_s": warm.seconds, "warm_rss": warm.peak_rss}))

    def view_probe(self, path: str) -> None:
        label = "view: open + lookup, in-process (cold)"
        r = self.run([self.args.python, "-c", VIEW_PROBE, str(self.root), self.name, path],
                     "view", cold=True)
        try:
            out = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise DittoheadFailed("the view probe printed no figures", r) from None
        if not out.get("lazy"):
            self.add(Figure("", label, target=f"< {TARGET_READ_S} s", status="n/a",
                            note="n/a (dittohead.view.StudyView has no lazy view: it builds the study)",
                            extra=out))
            return
        s = out["open_lookup_s"]
        self.add(Figure("", label, s, r.peak_rss, f"< {TARGET_READ_S} s", verdict(s < TARGET_READ_S),
                        rss_verdict(r.peak_rss),
                        note=(f"open {out['open_s'] * 1e3:.1f} ms + lookup {out['lookup_s'] * 1e3:.1f} ms"
                              f" (again, warm: {out['again_s'] * 1e3:.2f} ms); imports"
                              f" {out['import_s']:.2f} s and process {r.seconds:.2f} s not counted"),
                        extra=out))

    def exports(self) -> None:
        dest = self.base / "export"
        copy = self.base / "export-cp"
        store = ["--store", str(self.root), "--study", self.name]
        full = self.dh("export", *store, str(dest), what="export-full", cold=True)
        files = sum(len(f) for _, _, f in os.walk(dest))
        cp = self.run(["cp", "-a", str(dest), str(copy)], "cp-a", cold=True)
        sync = self.run(["sync"], "sync")
        cp_s = cp.seconds + sync.seconds
        ratio = full.seconds / cp_s
        self.add(Figure("", "export, full (cold)", full.seconds, full.peak_rss,
                        f"<= {TARGET_EXPORT_RATIO}x cp -a", verdict(ratio <= TARGET_EXPORT_RATIO),
                        rss_verdict(full.peak_rss),
                        note=f"{ratio:.2f}x cp -a; {files:,} names, {fmt_bytes(tree_size(dest))}",
                        extra={"ratio": ratio, "names": files, "summary": last_line(full.stdout)}))
        self.add(Figure("", "cp -a of that export + sync (cold)", cp_s, max(cp.peak_rss, sync.peak_rss),
                        note=f"cp -a {cp.seconds:.2f} s + sync {sync.seconds:.2f} s",
                        extra={"cp_s": cp.seconds, "sync_s": sync.seconds}))
        shutil.rmtree(copy)
        path = "new/after-export.txt"
        self.commit("export-new", [(path, content(path, 1))])
        self.ingest("export-new")
        inc = self.dh("export", *store, str(dest), what="export-incremental", cold=True)
        self.add(Figure("", "export of one new file into it (cold)", inc.seconds, inc.peak_rss,
                        f"< {TARGET_INCREMENTAL_S} s", verdict(inc.seconds < TARGET_INCREMENTAL_S),
                        rss_verdict(inc.peak_rss), note=export_summary(inc.stdout),
                        extra={"summary": last_line(inc.stdout)}))

    def sizes(self) -> None:
        self.info["store_bytes"] = tree_size(self.root / "store")
        idx = [p for p in (self.root / "store").rglob("index.sqlite*")]
        self.info["index_bytes"] = sum(p.stat().st_size for p in idx)


TIME = "/usr/bin/time"


def run_measured(argv: list[str], env: dict[str, str], stem: Path, timeout: float) -> ChildRun:
    """Run one command as a fresh child (output to stem.out / .err): its wall time, CPU time and
    peak RSS, as bench.run_child gives them, but with the peak RSS taken by GNU time (``-f %M``)
    where it is installed, and the whole process group killed after ``timeout`` s.

    The ru_maxrss that os.wait4 gives for a child starts at what its parent's RSS was when it
    forked (Linux counts the copy of the parent's memory that exec then drops), and this script
    grows to hundreds of MB while it generates a study: a small command would be reported that
    large. /usr/bin/time forks it from a process of a few MB. Without GNU time the figure is the
    os.wait4 one, at least this script's own RSS; the output says which."""
    rss_file = stem.with_suffix(".rss")
    full = [TIME, "-f", "%M", "-o", str(rss_file), *argv] if MEASURE_BY_TIME else list(argv)
    out_path, err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                start_new_session=True)
        timer = threading.Timer(timeout, lambda: _kill_group(proc.pid))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C, SIGTERM: the child is in a session of its own
            _kill_group(proc.pid)
            proc.wait()
            raise
        finally:
            timer.cancel()
        seconds = time.perf_counter() - start
    peak = usage.ru_maxrss * 1024
    if MEASURE_BY_TIME:
        try:
            peak = int(rss_file.read_text().split()[-1]) * 1024  # KiB
        except (OSError, ValueError, IndexError):
            pass  # killed before it wrote: the os.wait4 figure stays
        rss_file.unlink(missing_ok=True)
    return ChildRun(argv=list(argv), returncode=os.waitstatus_to_exitcode(status), seconds=seconds,
                    cpu_seconds=usage.ru_utime + usage.ru_stime, peak_rss=peak,
                    stdout=out_path.read_text(errors="replace"),
                    stderr=err_path.read_text(errors="replace"))


def _kill_group(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)


def _gnu_time() -> bool:
    try:
        cp = subprocess.run([TIME, "-f", "%M", "true"], capture_output=True, text=True,
                            timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return cp.returncode == 0 and cp.stderr.strip().isdigit()


MEASURE_BY_TIME = _gnu_time()


def count_lines(text: str) -> int:
    return len([ln for ln in text.splitlines() if ln.strip()])


def export_summary(stdout: str) -> str:
    """export's summary line without its "export: " and its destination."""
    line = last_line(stdout).removeprefix("export: ")
    return line.split("; /")[0]


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def say(msg: str) -> None:
    print(f"scale: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The two studies


def build_a(st: Study, scale: float) -> None:
    n, wide = scaled(PATHS_A, scale), scaled(WIDE, scale)
    wide = min(wide, n)
    paths = paths_a(n, wide)
    gen_s = ingest_s = 0.0
    runs = []
    for v in range(1, VERSIONS_A + 1):
        t0 = time.perf_counter()
        size = st.commit(f"a-v{v:02d}", [(p, content(p, v)) for p in paths])
        gen_s += time.perf_counter() - t0
        r = st.ingest(f"bulk-a-v{v:02d}")
        ingest_s += r.seconds
        runs.append(r)
        say(f"{st.name}: version {v}/{VERSIONS_A}: {n:,} files, {fmt_bytes(size)} generated;"
            f" ingested in {r.seconds:.2f} s (peak RSS {fmt_bytes(r.peak_rss)})")
    st.info.update(paths=n, versions=n * VERSIONS_A, wide=wide, submissions=VERSIONS_A,
                   generate_s=gen_s, ingest_s=ingest_s)
    rss = max(r.peak_rss for r in runs)
    st.add(Figure("", f"build: {VERSIONS_A} submissions of {n:,} files, ingest",
                  ingest_s, rss,
                  note=(f"each {runs[0].seconds:.1f} s first, {runs[-1].seconds:.1f} s last;"
                        f" generated in {gen_s:.1f} s; no target"),
                  extra={"runs": [r.seconds for r in runs], "generate_s": gen_s}))


def build_b(st: Study, scale: float) -> None:
    n = scaled(SUBMISSIONS_B, scale)
    batches = min(BATCHES_B, n)
    gen_s = ingest_s = 0.0
    runs = []
    done = 0
    for b in range(batches):
        upto = n * (b + 1) // batches
        t0 = time.perf_counter()
        for i in range(done, upto):
            st.commit(f"b-{i:05d}", files_b(i))
        gen_s += time.perf_counter() - t0
        r = st.ingest(f"bulk-b-{b:02d}")
        ingest_s += r.seconds
        runs.append((upto - done, r))
        say(f"{st.name}: batch {b + 1}/{batches}: {upto - done:,} submissions ingested in"
            f" {r.seconds:.2f} s ({r.seconds / (upto - done) * 1e3:.1f} ms each; peak RSS"
            f" {fmt_bytes(r.peak_rss)})")
        done = upto
    versions = sum(len(files_b(i)) for i in range(n))
    st.info.update(submissions=n, versions=versions, wide=n, generate_s=gen_s, ingest_s=ingest_s)
    rss = max(r.peak_rss for _, r in runs)
    first, last = runs[0][1].seconds / runs[0][0], runs[-1][1].seconds / runs[-1][0]
    st.add(Figure("", f"build: {n:,} submissions ({versions:,} versions) in {batches} watch runs",
                  ingest_s, rss,
                  note=(f"{first * 1e3:.1f} ms a submission in the first batch, {last * 1e3:.1f} ms"
                        f" in the last; generated in {gen_s:.1f} s; no target"),
                  extra={"batches": [(k, r.seconds) for k, r in runs], "generate_s": gen_s}))


def run_study(key: str, args: argparse.Namespace, workdir: Path, dropper: CacheDropper,
              env: dict[str, str], has_ls: bool) -> Study:
    st = Study(key, args, workdir, dropper, env)
    t0 = time.perf_counter()
    try:
        st.set_up()
        st.startup()
        say(f"{st.name}: one-file ingests at the start")
        start = st.probes("start")
        if key == "a":
            build_a(st, args.scale)
            wide = st.info["wide"]
            path = f"wide/w{wide // 2:05d}.csv"
        else:
            build_b(st, args.scale)
            path = "shared/common.txt"
        say(f"{st.name}: one-file ingests at the end")
        end = st.probes("end")
        st.probe_figures(start, end)
        say(f"{st.name}: reads (cold)")
        st.reads(path, "wide", has_ls)
        if args.export:
            say(f"{st.name}: exports")
            st.exports()
        else:
            st.add(Figure("", "export, full; cp -a; export of one new file", status="n/a",
                          note="skipped (--no-export)"))
        st.sizes()
    except DittoheadFailed as e:
        st.info["failed"] = str(e)
        say(f"{st.name}: dittohead failed: {e}")
        if e.run is not None:
            print(e.run.stderr[-3000:], file=sys.stderr)
    st.info["total_s"] = time.perf_counter() - t0
    if not args.keep:
        shutil.rmtree(st.base, ignore_errors=True)
    return st


# --------------------------------------------------------------------------------------------
# Report


def fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.3f}" if s < 10 else f"{s:.1f}"


def describe_study(st: Study) -> str:
    i = st.info
    if st.key == "a":
        shape = (f"{i.get('paths', 0):,} paths x {VERSIONS_A} versions = {i.get('versions', 0):,}"
                 f" versions; wide/ holds {i.get('wide', 0):,} files")
    else:
        shape = (f"{i.get('submissions', 0):,} submissions, {i.get('versions', 0):,} versions;"
                 f" wide/ holds {i.get('wide', 0):,} files")
    sizes = ""
    if "store_bytes" in i:
        sizes = f"; store {fmt_bytes(i['store_bytes'])} (index {fmt_bytes(i['index_bytes'])})"
    return f"study {st.name}: {shape}{sizes}; {i['total_s']:.0f} s in all"


def print_report(header: list[str], studies: list[Study]) -> None:
    print()
    print("\n".join(header))
    for st in studies:
        print()
        print(describe_study(st))
        rows = [[f.what, fmt_s(f.seconds), fmt_bytes(f.peak_rss), f.target, f.status,
                 f.rss_status, f.note] for f in st.figures]
        print(table(["figure", "seconds", "peak RSS", "target", "status", "RSS < 100 MB", "note"],
                    rows, right=(1, 2)))
        if "failed" in st.info:
            print(f"dittohead failed: {st.info['failed']} (figures after it are missing)")


def git_state() -> str:
    here = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "dittohead"],
                               capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    n = len([ln for ln in dirty.splitlines() if ln.strip()])
    return f"{head}" + (f" with {n} uncommitted changes under dittohead/" if n else "")


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="working folder (default: a new one under the temp dir);"
                   " an existing one must be empty or a previous benchmark's, and is cleared")
    p.add_argument("--scale", type=float, default=1.0,
                   help="fraction of the sizes: 1.0 is 1M versions (a) and 10,000 submissions (b);"
                   " 0.01 a quick check")
    p.add_argument("--only", choices=("a", "b"), help="run only study a or study b")
    p.add_argument("--keep", action="store_true",
                   help="keep the workdir (server roots, exports, command output) afterwards")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    p.add_argument("--no-drop-caches", action="store_true",
                   help="do not drop the page cache before the cold-cache figures")
    p.add_argument("--no-export", dest="export", action="store_false",
                   help="skip the exports (at scale 1.0 study a's full export, 1M version files,"
                   " takes longer than everything else together)")
    p.add_argument("--dittohead", metavar="PATH", default=default_dittohead(),
                   help="the dittohead executable (default: beside this Python, else on PATH)")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds after which any one command is killed (default 3600)")
    args = p.parse_args(argv)
    if args.scale <= 0 or args.scale > 1:
        p.error("--scale must be in (0, 1]")
    if args.dittohead is None:
        p.error("no dittohead executable found (see --dittohead)")
    args.python = sys.executable
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = prepare_workdir(args.workdir)
    (workdir / "logs").mkdir()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        return benchmark(args, workdir)
    except Interrupted as e:
        print(f"\nscale: stopped by signal {e.args[0]}", file=sys.stderr)
        return 128 + int(e.args[0])
    finally:
        if args.keep:
            print(f"\nworkdir kept: {workdir} (command output in {workdir / 'logs'})", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def benchmark(args: argparse.Namespace, workdir: Path) -> int:
    env = {k: v for k, v in os.environ.items() if k != "DITTOHEAD_STORE"}
    env["DITTOHEAD_STATE_DIR"] = str(workdir / "client-state")
    env.setdefault("LANG", "C.UTF-8")
    version = subprocess.run([args.dittohead, "--version"], capture_output=True, text=True,
                             check=False, env=env, timeout=120).stdout.strip() or "unknown"
    has_ls = subprocess.run([args.dittohead, "ls", "--help"], capture_output=True, text=True,
                            check=False, env=env, timeout=120).returncode == 0
    dropper = CacheDropper(enabled=not args.no_drop_caches)
    dropper.drop()  # says now, once, if it cannot
    studies = []
    for key in ("a", "b"):
        if args.only in (None, key):
            say(f"study {key} at scale {args.scale}")
            studies.append(run_study(key, args, workdir, dropper, env, has_ls))
    header = [
        f"dittohead scale benchmark: scale {args.scale}; {version} ({args.dittohead}); code {git_state()}",
        (f"machine: {os.cpu_count()} CPUs, {platform.system()} {platform.release()},"
         f" Python {platform.python_version()}; {dropper.describe()}"
         " (the figures marked cold; the ingests run with the cache as the steps before left it)"),
        ("seconds are wall-clock of the whole command (process start-up included) unless the note"
         " says otherwise; peak RSS is the command's own, "
         + ("by GNU time (/usr/bin/time -f %M)" if MEASURE_BY_TIME else
            "by os.wait4 (no GNU time: at least this script's own RSS, see run_measured)")
         + "; sizes in decimal units"),
        ("one-file ingest: a watch --once of a submission of one new file, three in a row, the"
         " median shown; start = in the empty study, end = after the whole build"),
    ]
    if not has_ls:
        header.append("dittohead has no ls command: that figure is n/a")
    print_report(header, studies)
    failed = any("failed" in st.info for st in studies)
    if args.json:
        doc = {
            "scale": args.scale,
            "dittohead": {"version": version, "executable": args.dittohead, "code": git_state(),
                          "has_ls": has_ls},
            "machine": {"cpus": os.cpu_count(), "system": platform.platform(),
                        "python": platform.python_version()},
            "caches_dropped": bool(dropper.works),
            "studies": [{"name": st.name, "info": st.info, "figures": [asdict(f) for f in st.figures]}
                        for st in studies],
            "dittohead_failed": failed,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
