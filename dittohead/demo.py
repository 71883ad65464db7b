"""The end-to-end demo: ``python -m dittohead.demo [--dir DIR]`` (``make demo``).

It writes a small sample study (an E-Prime folder, eye-tracker CSVs, one of them several chunks
long, and a file whose name has a space and a non-ASCII letter), then runs the main job through
the real command line, one subprocess per command, each echoed before it runs: the admin creates
a server root and a study, a collector syncs, the daemon ingests, the study runner reads the log,
a file is edited and synced again, its versions are listed and read back, every version of every
file is compared byte for byte with what was written, the study is exported, and fsck reads
every byte. Any failing step is named and the demo exits 1.

Everything lives under DIR (default ./demo-run, wiped and recreated), including the client's
state cache (DITTOHEAD_STATE_DIR), so the demo never touches a real store or a real client.
Only the standard library is used here: the demo exercises the command line, not the internals.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shlex
import shutil
import stat
import subprocess
import sys
import time
import unicodedata
from pathlib import Path
from typing import NoReturn

STUDY = "demo"
SITE = "Brogden A"
STEP_TIMEOUT = 300  # seconds; nothing waits forever
MARKER = ".dittohead-demo"  # marks a folder the demo made, and so may wipe
EDITED = "eprime/subj01.txt"
NOTES = unicodedata.normalize("NFC", "notes/Überblick session 1.txt")


class DemoFailed(Exception):
    """A step of the demo did not do what it should."""


# --- the sample study ------------------------------------------------------------------------


def eprime_text(subject: int, trials: int) -> bytes:
    """An E-Prime-like text export: a header, then one tab-separated line per trial."""
    rng = random.Random(100 + subject)
    lines = [
        "*** Header Start ***",
        "Experiment: StroopDemo",
        f"Subject: {subject}",
        "Session: 1",
        "*** Header End ***",
        "Trial\tCondition\tStimulus.RT\tStimulus.ACC",
    ]
    for trial in range(1, trials + 1):
        condition = rng.choice(["congruent", "incongruent"])
        lines.append(f"{trial}\t{condition}\t{rng.randint(350, 1200)}\t{int(rng.random() > 0.08)}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def gaze_csv(seed: int, target_size: int) -> bytes:
    """Eye-tracker samples as CSV: deterministic, about ``target_size`` bytes."""
    rng = random.Random(seed)
    rows = ["timestamp_ms,gaze_x,gaze_y,pupil_mm,validity"]
    size = len(rows[0]) + 1
    t = 0
    while size < target_size:
        t += 2
        row = (
            f"{t},{rng.uniform(0, 1920):.2f},{rng.uniform(0, 1080):.2f},"
            f"{rng.uniform(2.5, 6.0):.3f},{rng.choice('0000004')}"
        )
        rows.append(row)
        size += len(row) + 1
    return ("\n".join(rows) + "\n").encode("ascii")


def sample_study() -> dict[str, bytes]:
    """Relative POSIX path -> content, the first version of every file."""
    edat = b"EDAT\x02\x00" + random.Random(1).randbytes(48 * 1024)
    return {
        "eprime/subj01.txt": eprime_text(1, 8),
        "eprime/subj02.txt": eprime_text(2, 8),
        "eprime/subj01.edat": edat,
        # About 3 MiB: several chunks at the format's 1 MiB average.
        "eyetracker/subj01_samples.csv": gaze_csv(1, 3 * 1024 * 1024),
        "eyetracker/subj01_events.csv": b"timestamp_ms,event\n0,fixation_cross\n500,stimulus\n",
        "eyetracker/subj02_events.csv": b"timestamp_ms,event\n0,fixation_cross\n520,stimulus\n",
        NOTES: "Sitzung 1: Proband 01 und 02, keine Auffälligkeiten.\n".encode(),
    }


def write_files(source: Path, files: dict[str, bytes], age: float = 0.0) -> None:
    """Write ``files`` under ``source``; ``age`` > 0 back-dates them, as a finished session's are."""
    for rel, data in files.items():
        path = source.joinpath(*rel.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if age:
            then = time.time() - age
            os.utime(path, (then, then))


# --- running the command line ----------------------------------------------------------------


class Runner:
    """Runs ``python -m dittohead ...`` as a child, echoing the command the way a user types it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.steps = 0

    def show(self, arg: str) -> str:
        """An argument as echoed: paths under the current folder are shown relative to it."""
        try:
            p = Path(arg)
            if p.is_absolute():
                rel = p.relative_to(Path.cwd())
                return str(rel) if str(rel) != "." else "."
        except ValueError:
            pass
        return arg

    def run(
        self,
        *args: str,
        capture: bool = False,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run one command, failing the demo unless it exits 0; ``capture`` keeps its stdout."""
        self.steps += 1
        shown = shlex.join(["dittohead", *(self.show(a) for a in args)])
        print(f"$ {shown}", flush=True)
        cmd = [sys.executable, "-m", "dittohead", *args]
        try:
            proc = subprocess.run(
                cmd,
                check=False,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture else None,
                timeout=STEP_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            raise DemoFailed(f"step '{shown}' did not finish within {STEP_TIMEOUT} s") from None
        if proc.returncode != 0:
            raise DemoFailed(f"step '{shown}' failed with exit code {proc.returncode}")
        return proc


# --- the demo --------------------------------------------------------------------------------


def prepare_dir(base: Path) -> None:
    """Wipe and recreate ``base``, but only if it is empty or a folder the demo made."""
    if base.exists() or base.is_symlink():
        if not base.is_dir() or base.is_symlink():
            raise DemoFailed(f"{base} exists and is not a folder; choose another --dir")
        if any(base.iterdir()) and not (base / MARKER).exists():
            raise DemoFailed(
                f"{base} is not empty and was not made by the demo; "
                "choose another --dir or remove it yourself"
            )
        _open_up(base)
        shutil.rmtree(base)
    base.mkdir(parents=True)
    (base / MARKER).write_text("made by python -m dittohead.demo; wiped on its next run\n")


def _open_up(base: Path) -> None:
    """Give the owner rwx on every folder under ``base``, so that rmtree can empty it."""
    for top, dirs, _ in os.walk(base):
        for d in dirs:
            path = os.path.join(top, d)
            if not os.path.islink(path):
                with contextlib.suppress(OSError):
                    os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | stat.S_IRWXU)


def walk(root: Path) -> tuple[list[Path], list[Path]]:
    """(files and symlinks, folders) under ``root``, sorted; symlinks are not followed."""
    leaves: list[Path] = []
    folders: list[Path] = []
    for top, dirs, files in os.walk(root):
        for d in dirs:
            (leaves if os.path.islink(os.path.join(top, d)) else folders).append(Path(top, d))
        leaves.extend(Path(top, f) for f in files)
    return sorted(leaves), sorted(folders)


def list_tree(root: Path, limit: int = 24) -> None:
    """A brief listing of a folder: its files with sizes, the first ``limit`` of them."""
    leaves, _ = walk(root)
    for p in leaves[:limit]:
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            print(f"  {rel} -> {os.readlink(p)}")
        else:
            print(f"  {rel}  ({p.stat().st_size:,} bytes)")
    if len(leaves) > limit:
        print(f"  ... and {len(leaves) - limit} more")
    print(f"  ({len(leaves)} files in all)")


def check_export(export: Path, latest: dict[str, bytes]) -> None:
    """If the export has a current/ folder, its files must be the latest versions, exactly."""
    leaves, folders = walk(export)
    currents = [p for p in leaves + folders if p.name == "current" and p.is_dir()]
    if not currents:
        print("  (no current/ folder found in the export; its bytes were not compared)")
        return
    current = min(currents, key=lambda p: len(p.parts))
    for rel, data in latest.items():
        path = current.joinpath(*rel.split("/"))
        if not path.is_file():
            raise DemoFailed(f"export: {path} is missing")
        if path.read_bytes() != data:
            raise DemoFailed(f"export: {path} differs from what was written")
    print(
        f"  export {current.relative_to(export).as_posix()}/: {len(latest)} files, "
        "byte-identical to the latest versions"
    )


def run_demo(base: Path) -> None:
    started = time.monotonic()
    prepare_dir(base)
    source, root, export = base / "source", base / "root", base / "export"
    env = dict(os.environ)
    env.pop("DITTOHEAD_STORE", None)
    env["DITTOHEAD_STATE_DIR"] = str(base / "client-state")
    runner = Runner(env)
    run = runner.run

    # versions[path] = every version written, oldest first.
    first = sample_study()
    versions: dict[str, list[bytes]] = {rel: [data] for rel, data in first.items()}
    write_files(source, first, age=3600)  # recorded an hour ago
    total = sum(len(d) for d in first.values())
    print(
        f"sample study written to {runner.show(str(source))}/: {len(first)} files, {total:,} bytes"
    )

    store = ("--store", str(root))
    study = (*store, "--study", STUDY)
    sync = ("sync", str(source), "--study", STUDY, "--to", str(root), "--site", SITE)

    print("\n# admin: create a server root and a study")
    run("init", *store)
    run("study", "add", STUDY, *store)

    print("\n# collector: send the study folder; admin's daemon: ingest it")
    run(*sync)
    run("watch", *store, "--once")

    print("\n# study runner: who sent what, when")
    run("log", *study)

    print(f"\n# a collector edits {EDITED} and syncs again: only that file travels")
    edited = versions[EDITED][0] + b"9\tcongruent\t612\t1\r\n"
    write_files(source, {EDITED: edited})
    versions[EDITED].append(edited)
    run(*sync)
    run("watch", *store, "--once")
    run("log", *study)

    print("\n# study runner: every version, read-only")
    run("versions", *study, EDITED)
    run("cat", *study, EDITED, "--version", "1")
    run("cat", *study, EDITED)

    print("\n# read back every version of every file and compare with what was written")
    nversions = 0
    for rel, datas in versions.items():
        for n, data in enumerate(datas, start=1):
            got = run("cat", *study, rel, "--version", str(n), capture=True).stdout
            if got != data:
                raise DemoFailed(
                    f"{rel} version {n}: read back {len(got):,} bytes that differ "
                    f"from the {len(data):,} bytes written"
                )
            nversions += 1
        if run("cat", *study, rel, capture=True).stdout != datas[-1]:
            raise DemoFailed(f"{rel}: the latest version read back differs from what was written")
    print(f"\nread back: {len(versions)} files, {nversions} versions, byte-identical")

    print("\n# study runner: export the study as plain files")
    run("export", *study, str(export))
    list_tree(export)
    check_export(export, {rel: datas[-1] for rel, datas in versions.items()})

    print("\n# admin: prove the store's integrity, reading every byte")
    run("fsck", *store, "--read-data")

    elapsed = time.monotonic() - started
    print(
        f"\ndemo passed: {runner.steps} commands in {elapsed:.1f} s; "
        f"everything is in {runner.show(str(base))}/"
    )
    print(f"try: dittohead log --store {shlex.quote(runner.show(str(root)))} --study {STUDY}")


def fail(message: str) -> NoReturn:
    print(f"\ndemo FAILED: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dittohead.demo",
        description="Run dittohead end to end on a generated sample study.",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("demo-run"),
        help="working folder, wiped and recreated (default: ./demo-run)",
    )
    args = parser.parse_args(argv)
    try:
        run_demo(args.dir.absolute())
    except DemoFailed as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("\ndemo interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        fail(f"{e.strerror or e} ({e.filename})" if e.filename else str(e))


if __name__ == "__main__":
    main()
