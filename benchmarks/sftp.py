#!/usr/bin/env python3
"""Benchmark dittohead over SSH: sync to sftp://, and its SFTP transport against OpenSSH's sftp.

    python benchmarks/sftp.py [--workdir DIR] [--scale 1.0] [--keep] [--json FILE]
                              [--seed 1] [--no-drop-caches] [--timeout 1800] [--dittohead PATH]

Run as root. The script starts a private OpenSSH sshd on a free port of 127.0.0.1, with a host
key, a client key (ed25519) and everything else of its own in the workdir; root signs in with
that key only. It builds the same synthetic study as bench.py (its generator, imported), then
times, with the page cache dropped before each timed step:

    initial    dittohead init + study add of ROOT1 and sync to it as a local path; sync to
               sftp://root@127.0.0.1:PORT/ROOT2; rsync -a over ssh into an empty folder
    no change  the same sync over SFTP again (after the daemon's watch --once has ingested ROOT2,
               as a server would have); rsync again; a local no-change sync into ROOT1
    raw upload the packs the local sync left in ROOT1's inbox (not ingested), uploaded with
               dittohead's SFTPTransport (in this process: open_upload, 1 MiB writes, finish),
               with its default ciphers and with aes128-ctr forced, against OpenSSH's
               sftp -b put of the same files (plain, with -f: fsync, and with AES-GCM)

It prints a table (seconds, MB/s, the speed against a peer) and the targets from the issue, met or
missed. It asserts nothing: the exit status is 1 only when a dittohead step fails (or the sshd
cannot be started), 0 even when a target is missed. benchmarks/README.md, "Over SSH (sftp.py)",
has more, and figures.

Dependencies: the standard library, the dittohead package (run it with the project's virtualenv)
and Debian's openssh-server, openssh-client and rsync (make bench-sftp installs them).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import functools
import hashlib
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # beside this file
    SITE,
    SOURCE_SETTLE,
    STUDY,
    CacheDropper,
    ChildRun,
    GiB,
    Interrupted,
    MiB,
    _on_signal,
    default_dittohead,
    fmt_bytes,
    generate_source,
    plan_source,
    prepare_workdir,
    run_child,
    table,
)

try:
    import paramiko

    from dittohead import format as fmt
    from dittohead.client import ssh as dssh
    from dittohead.client.sftp import SFTPTransport, open_sftp
except ImportError as _e:  # pragma: no cover - the script's own precondition
    sys.exit(f"sftp bench: cannot import dittohead ({_e}); run it with the project's virtualenv"
             " (.venv/bin/python benchmarks/sftp.py)")

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
PRIVSEP_DIR = Path("/run/sshd")  # sshd's privilege-separation folder; Debian makes it at boot
HOST = "127.0.0.1"
USER = "root"
START_TIMEOUT = 10.0  # seconds for the sshd to listen
PIECE = 1 * MiB  # the raw upload's write size

# Targets from the issue.
TARGET_RAW_RATIO = 0.6  # dittohead's raw pack upload / OpenSSH sftp's, throughput
TARGET_NO_CHANGE = 1.0  # seconds: a no-change sync over SFTP

# The raw uploads: (key, what is said, dittohead's CIPHERS for it or None for its default,
# fsync). The first is the one the target is judged on.
DH_VARIANTS = (
    ("dh-default", "dittohead SFTPTransport (its default ciphers)", None, True),
    ("dh-ctr", "dittohead SFTPTransport, aes128-ctr forced", ("aes128-ctr",), True),
)
# OpenSSH sftp: (key, what is said, extra options, put's flags). The first is the target's peer.
SFTP_VARIANTS = (
    ("sftp-put", "OpenSSH sftp put (its default cipher)", [], ""),
    ("sftp-put-f", "OpenSSH sftp put -f (fsync each file)", [], "-f"),
    ("sftp-gcm", "OpenSSH sftp put -f, -c aes128-gcm@openssh.com", ["-c", "aes128-gcm@openssh.com"],
     "-f"),
)


# --------------------------------------------------------------------------------------------
# The private sshd


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the sshd's child before exec: SIGTERM when the bench dies (PR_SET_PDEATHSIG), so a
    bench killed outright leaves no listener behind."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _children(pid: int) -> list[int]:
    """Every live descendant of pid (from /proc), deepest last."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        parents[int(entry)] = int(stat_line.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


def _keygen(path: Path, comment: str) -> str:
    """An ed25519 pair without a passphrase; returns the public line."""
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    return path.with_name(path.name + ".pub").read_text().strip()


class Sshd:
    """Debian's sshd -D on a free port of 127.0.0.1, its files in `folder` (0700): host key, a
    client key for root, authorized_keys, the config, the pid file, the log, a known_hosts."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        self.dir.mkdir(mode=0o700)
        self.host_key = self.dir / "ssh_host_ed25519_key"
        self.client_key = self.dir / "client" / "id_ed25519"
        self.client_key.parent.mkdir(mode=0o700)
        self.authorized_keys = self.dir / "authorized_keys"
        self.config = self.dir / "sshd_config"
        self.pid_file = self.dir / "sshd.pid"
        self.log = self.dir / "sshd.log"
        self.known_hosts = self.dir / "known_hosts"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.host_public = _keygen(self.host_key, "dittohead-bench-sftp host")
        self.client_public = _keygen(self.client_key, "dittohead-bench-sftp client")
        self.authorized_keys.write_text(self.client_public + "\n")
        os.chmod(self.authorized_keys, 0o600)

    def config_text(self) -> str:
        return "\n".join([
            f"ListenAddress {HOST}:{self.port}",
            f"HostKey {self.host_key}",
            f"PidFile {self.pid_file}",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            f"AllowUsers {USER}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            # The keys file is under the temp dir, and /tmp (1777) fails StrictModes' check of
            # every folder above it; the file and its folder are root's, 0600 and 0700.
            "StrictModes no",
            "AllowAgentForwarding no",
            "AllowTcpForwarding no",
            "X11Forwarding no",
            "PermitTTY no",
            "PrintMotd no",
            "LogLevel INFO",
            "Subsystem sftp internal-sftp",
            "",
        ])

    def start(self) -> None:
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)  # mkdir -p /run/sshd
        for attempt in range(5):
            self.port = _free_port()
            self.config.write_text(self.config_text())
            check = subprocess.run([SSHD, "-t", "-f", str(self.config)], capture_output=True,
                                   text=True, stdin=subprocess.DEVNULL, timeout=60, check=False)
            if check.returncode != 0:
                raise RuntimeError(f"sshd -t rejects the config: {check.stderr.strip()}")
            self.log.write_bytes(b"")
            self.proc = subprocess.Popen([SSHD, "-D", "-E", str(self.log), "-f", str(self.config)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)  # noqa: PLW1509 (prctl only)
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(OSError), \
                        socket.create_connection((HOST, self.port), timeout=1):
                    self.write_known_hosts()
                    return
                time.sleep(0.05)
            log = self.log.read_text(errors="replace").strip()
            self.stop()
            if "Address already in use" in log and attempt < 4:
                continue  # another process took the port between the probe and the bind
            raise RuntimeError(f"sshd did not start listening on {HOST}:{self.port}:"
                               f" {log[-2000:] or 'no log'}")

    def write_known_hosts(self) -> None:
        kind, blob = self.host_public.split()[:2]
        self.known_hosts.write_text(f"[{HOST}]:{self.port} {kind} {blob}\n")

    def stop(self) -> None:
        """SIGTERM the listener and every process of its connections, then wait for it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            for pid in [*_children(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                for pid in [*_children(proc.pid), proc.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def ssh_options(self) -> list[str]:
        """For ssh, rsync -e and sftp: this sshd's key only, no user config, no agent, no
        prompt; the port is given by each (-p, -P)."""
        return ["-F", "/dev/null", "-i", str(self.client_key),
                "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none"]

    def children_cpu(self) -> float:
        """CPU seconds of the sshd's children that have ended (its connections' processes, and
        what they ran: internal-sftp, rsync), once the last connection is gone (at most 5 s)."""
        if self.proc is None:
            return 0.0
        deadline = time.monotonic() + 5
        while _children(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime, cstime

    def url(self, path: Path) -> str:
        return f"sftp://{USER}@{HOST}:{self.port}{path}"


def fingerprint(public_line: str) -> str:
    """``SHA256:`` + unpadded base64, as ssh-keygen -l and dittohead trust-host print it."""
    digest = hashlib.sha256(base64.b64decode(public_line.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


# --------------------------------------------------------------------------------------------
# Figures


@dataclass
class Row:
    key: str  # names the row among the run's (a peer is named by its key)
    step: str  # setup | initial | no change | raw upload
    tool: str
    status: str = "ok"  # ok | failed | skipped
    seconds: float | None = None
    cpu_seconds: float | None = None  # the client's (the child's, or this process's)
    server_cpu_seconds: float | None = None  # the sshd's connection(s) and what they ran
    payload: int | None = None  # bytes moved, for MB/s
    peer: str | None = None  # the key of the row this one is compared with
    also: str | None = None  # a second row to compare with, in the note
    note: str = ""

    @property
    def rate(self) -> float | None:
        if self.status != "ok" or not self.payload or not self.seconds:
            return None
        return self.payload / self.seconds


@dataclass
class Target:
    target: str
    figure: str
    status: str  # met | missed | n/a


def speed_ratio(row: Row, peer: Row | None) -> float | None:
    """How fast the row went against its peer: peer seconds / row seconds (the same payload),
    so above 1 the row is faster, and for uploads it is the ratio of the throughputs."""
    if peer is None or row.status != "ok" or peer.status != "ok":
        return None
    if not row.seconds or not peer.seconds:
        return None
    if row.payload and peer.payload:
        return (row.payload / row.seconds) / (peer.payload / peer.seconds)
    return peer.seconds / row.seconds


def fmt_cpu(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def fmt_mbs(rate: float | None) -> str:
    return "-" if rate is None else f"{rate / 1e6:.1f}"


def report(header: list[str], rows: list[Row], targets: list[Target], footer: list[str]) -> None:
    by_key = {r.key: r for r in rows}
    lines = []
    for r in rows:
        peer = by_key.get(r.peer) if r.peer else None
        ratio = speed_ratio(r, peer)
        secs = f"{r.seconds:.2f}" if r.status == "ok" and r.seconds is not None else r.status
        note = r.note
        also = by_key.get(r.also) if r.also else None
        also_ratio = speed_ratio(r, also)
        if also is not None and also_ratio is not None:
            note = f"{also_ratio:.2f}x the speed of {also.tool}; {note}"
        lines.append([r.step, r.tool, secs, fmt_mbs(r.rate),
                      "-" if ratio is None else f"{ratio:.2f}x",
                      peer.tool if peer is not None else "", fmt_cpu(r.cpu_seconds),
                      fmt_cpu(r.server_cpu_seconds), note])
    print()
    print("\n".join(header))
    print()
    print(table(["step", "tool", "seconds", "MB/s", "vs peer", "peer", "client CPU", "sshd CPU",
                 "note"], lines, right=(2, 3, 4, 6, 7)))
    print()
    print(table(["target (from the issue)", "figure", "status"],
                [[t.target, t.figure, t.status] for t in targets]))
    if footer:
        print()
        print("\n".join(footer))


def evaluate_targets(rows: list[Row]) -> list[Target]:
    by_key = {r.key: r for r in rows}
    targets = []
    t = f"raw pack upload at least {TARGET_RAW_RATIO}x OpenSSH sftp's throughput"
    dh, peer = by_key.get(DH_VARIANTS[0][0]), by_key.get(SFTP_VARIANTS[0][0])
    ratio = speed_ratio(dh, peer) if dh else None
    if dh is not None and peer is not None and ratio is not None:
        fsync_peer = by_key.get("sftp-put-f")
        also = speed_ratio(dh, fsync_peer) if fsync_peer else None
        targets.append(Target(t, f"{fmt_mbs(dh.rate)} vs {fmt_mbs(peer.rate)} MB/s"
                              f" ({ratio:.2f}x; against put -f"
                              f" {'-' if also is None else f'{also:.2f}x'})",
                              "met" if ratio >= TARGET_RAW_RATIO else "missed"))
    else:
        targets.append(Target(t, "no figure", "n/a"))
    t = f"no-change sync over SFTP under {TARGET_NO_CHANGE:g} s"
    nc = by_key.get("nc-sftp")
    if nc is not None and nc.status == "ok" and nc.seconds is not None:
        targets.append(Target(t, f"{nc.seconds:.2f} s",
                              "met" if nc.seconds < TARGET_NO_CHANGE else "missed"))
    else:
        targets.append(Target(t, "no figure", "n/a"))
    return targets


# --------------------------------------------------------------------------------------------
# The run


class StepFailed(Exception):
    def __init__(self, what: str, run: ChildRun | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.run = run


class Run:
    def __init__(self, args: argparse.Namespace, workdir: Path, sshd: Sshd) -> None:
        self.args = args
        self.workdir = workdir
        self.sshd = sshd
        self.src = workdir / "study"
        self.logs = workdir / "logs"
        self.root1 = workdir / "root1"  # sync to a local path; its inbox feeds the raw uploads
        self.root2 = workdir / "root2"  # sync over SFTP; the raw uploads' staging folders
        self.rsync_dest = workdir / "rsync-dest"
        self.raw_dest = workdir / "raw"  # OpenSSH sftp's puts
        self.state_local = workdir / "state-local"
        self.state_sftp = workdir / "state-sftp"  # also holds dittohead's known_hosts
        self.home = workdir / "home"  # HOME of every child: no ~/.ssh of the machine's
        self.dropper = CacheDropper(enabled=not args.no_drop_caches)
        self.rows: list[Row] = []
        self.failed_dittohead = False
        self.ciphers: dict[str, str] = {}  # row key -> the cipher negotiated
        self._seq = 0

    # -- plumbing

    def env(self, state: Path | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("SSH_AUTH_SOCK", "DITTOHEAD_STORE", "DITTOHEAD_STATE_DIR")}
        env["HOME"] = str(self.home)
        if state is not None:
            env["DITTOHEAD_STATE_DIR"] = str(state)
        return env

    def run(self, argv: Sequence[str], what: str, env: dict[str, str]) -> ChildRun:
        self._seq += 1
        stem = self.logs / re.sub(r"[^a-z0-9.]+", "-", f"{self._seq:02d}-{what}".lower())
        result = run_child(argv, env, stem, self.args.timeout)
        if result.returncode != 0:
            raise StepFailed(f"{what} exited with {result.returncode}", result)
        return result

    def dittohead(self, args: Sequence[str], what: str, state: Path) -> ChildRun:
        return self.run([self.args.dittohead, *args], what, self.env(state))

    def step(self, key: str, step: str, tool: str, action: Callable[[], dict], *,
             drop: bool = True, peer: str | None = None, also: str | None = None,
             dittohead: bool = True, ssh: bool = True) -> Row:
        """Time one step (action() returns a Row's figures as a dict); a failure is a row too.
        With `ssh`, the sshd's CPU time for the step is recorded too."""
        if drop:
            self.dropper.drop()
        print(f"  {step:10} {tool} ...", end="", flush=True, file=sys.stderr)
        server_cpu = self.sshd.children_cpu() if ssh else 0.0
        try:
            row = Row(key, step, tool, peer=peer, also=also, **action())
            if ssh:
                row.server_cpu_seconds = self.sshd.children_cpu() - server_cpu
        except StepFailed as e:
            print(" FAILED", file=sys.stderr)
            if e.run is not None:
                print(f"    $ {shlex.join(e.run.argv)}\n" + "\n".join(
                    "    " + ln for ln in e.run.stderr.strip().splitlines()[-20:]),
                    file=sys.stderr)
            row = Row(key, step, tool, status="failed", peer=peer, also=also, note=e.what)
            self.failed_dittohead |= dittohead
        except (OSError, paramiko.SSHException, EOFError) as e:
            if not dittohead:
                raise
            print(f" FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            row = Row(key, step, tool, status="failed", peer=peer, also=also,
                      note=f"{type(e).__name__}: {e}")
            self.failed_dittohead = True
        else:
            print(f" {row.seconds:.2f} s", file=sys.stderr)
        self.rows.append(row)
        return row

    # -- the steps

    def go(self, source_bytes: int, source_ready: float) -> None:
        for d in (self.logs, self.home, self.state_local, self.state_sftp, self.root1, self.root2,
                  self.rsync_dest, self.raw_dest):
            d.mkdir(mode=0o700)
        self.trust_host()
        src = str(self.src)
        sync = ["sync", src, "--study", STUDY, "--site", SITE]
        sftp_sync = [*sync, "--to", self.sshd.url(self.root2), "--identity",
                     str(self.sshd.client_key)]

        def setup_root(root: Path, state: Path) -> dict:
            a = self.dittohead(["init", "--store", str(root)], "init", state)
            b = self.dittohead(["study", "add", STUDY, "--store", str(root)], "study add", state)
            return {"seconds": a.seconds + b.seconds, "cpu_seconds": a.cpu_seconds + b.cpu_seconds,
                    "note": f"init {a.seconds:.2f} s + study add {b.seconds:.2f} s"}

        def child(r: ChildRun, payload: int | None = None, note: str = "") -> dict:
            return {"seconds": r.seconds, "cpu_seconds": r.cpu_seconds, "payload": payload,
                    "note": note or summary(r)}

        ok = self.step("setup-local", "setup", "dittohead init + study add (ROOT1)",
                       lambda: setup_root(self.root1, self.state_local), drop=False, ssh=False)
        wait = SOURCE_SETTLE - (time.monotonic() - source_ready)
        if wait > 0:
            time.sleep(wait)  # bench.py's reason: files changed within 2 s are re-read later
        if ok.status == "ok":
            self.step("init-local", "initial", "dittohead sync -> local path", lambda: child(
                self.dittohead([*sync, "--to", str(self.root1)], "sync local", self.state_local),
                source_bytes), ssh=False)
        ok = self.step("setup-sftp", "setup", "dittohead init + study add (ROOT2)",
                       lambda: setup_root(self.root2, self.state_sftp), drop=False, ssh=False)
        if ok.status == "ok":
            ok = self.step("init-sftp", "initial", "dittohead sync -> sftp://", lambda: child(
                self.dittohead(sftp_sync, "sync sftp", self.state_sftp), source_bytes),
                peer="init-rsync", also="init-local")
        ingested = False
        if ok.status == "ok":
            ingested = self.ingest(self.root2, self.state_sftp, "ROOT2")
        if ingested:
            self.step("nc-sftp", "no change", "dittohead sync -> sftp://", lambda: child(
                self.dittohead(sftp_sync, "sync sftp no change", self.state_sftp)),
                peer="nc-rsync", also="nc-local")
        rsh = shlex.join(["ssh", "-p", str(self.sshd.port), *self.sshd.ssh_options()])
        rsync = ["rsync", "-a", "--stats", "-e", rsh, f"{src}/",
                 f"{USER}@{HOST}:{self.rsync_dest}/"]
        self.step("init-rsync", "initial", "rsync -a over ssh", lambda: child(
            self.run(rsync, "rsync", self.env()), source_bytes),
            dittohead=False)
        self.step("nc-rsync", "no change", "rsync -a over ssh", lambda: child(
            self.run(rsync, "rsync no change", self.env())), dittohead=False)
        self.raw_uploads()
        # Last, as the raw uploads need ROOT1's inbox as the local sync left it.
        if self.ingest(self.root1, self.state_local, "ROOT1"):
            self.step("nc-local", "no change", "dittohead sync -> local path", lambda: child(
                self.dittohead([*sync, "--to", str(self.root1)], "sync local no change",
                               self.state_local)), ssh=False)

    def trust_host(self) -> None:
        """dittohead trust-host 127.0.0.1:PORT --fingerprint (the host key's) into the SFTP state
        dir, as a collector does with the fingerprint the admin gave; checks what it printed."""
        want = fingerprint(self.sshd.host_public)
        r = self.dittohead(["trust-host", f"{HOST}:{self.sshd.port}", "--fingerprint", want],
                           "trust-host", self.state_sftp)
        if want not in r.stdout:
            raise StepFailed(f"trust-host printed {r.stdout.strip()!r}, not the host key's"
                             f" fingerprint {want}", r)
        print(f"sftp bench: {r.stdout.strip()}", file=sys.stderr)

    def ingest(self, root: Path, state: Path, name: str) -> bool:
        """watch --once (untimed), as the server's daemon would; False if it fails."""
        try:
            self.dittohead(["watch", "--store", str(root), "--once"], f"watch {name}", state)
        except StepFailed as e:
            print(f"sftp bench: watch --once of {name} failed: {e.what}", file=sys.stderr)
            self.failed_dittohead = True
            return False
        failed = root / "dropbox" / STUDY / "failed"
        if failed.is_dir() and any(failed.iterdir()):
            print(f"sftp bench: {name}: the daemon rejected the upload:"
                  f" {', '.join(os.listdir(failed))} in failed/", file=sys.stderr)
            self.failed_dittohead = True
            return False
        return True

    def packs(self) -> list[Path]:
        inbox = self.root1 / "dropbox" / STUDY / "inbox"
        subs = [p for p in inbox.iterdir() if p.is_dir() and not p.name.startswith(".")] \
            if inbox.is_dir() else []
        if len(subs) != 1:
            return []
        return sorted(subs[0].glob("*" + fmt.PACK_SUFFIX))

    def raw_uploads(self) -> None:
        packs = self.packs()
        if not packs:
            print("sftp bench: no packs in ROOT1's inbox: raw uploads skipped", file=sys.stderr)
            for key, tool, *_ in (*DH_VARIANTS, *SFTP_VARIANTS):
                self.rows.append(Row(key, "raw upload", tool, status="skipped",
                                     note="no packs (the local sync failed)"))
            return
        total = sum(p.stat().st_size for p in packs)
        print(f"sftp bench: raw uploads of {len(packs)} packs, {fmt_bytes(total)}",
              file=sys.stderr)
        # Alternated: dittohead, OpenSSH, dittohead, OpenSSH..., so that a slow spell of the
        # shared machine does not fall on one tool only.
        order = [x for pair in zip(DH_VARIANTS, SFTP_VARIANTS[:2]) for x in pair]
        order += [*DH_VARIANTS[2:], *SFTP_VARIANTS[2:]]
        for variant in order:
            if variant in DH_VARIANTS:
                key, tool, ciphers, fsync = variant
                self.step(key, "raw upload", tool, functools.partial(
                    self.dittohead_upload, key, packs, ciphers, fsync), peer="sftp-put",
                    also=None if key == DH_VARIANTS[0][0] else DH_VARIANTS[0][0])
            else:
                key, tool, options, flags = variant
                self.step(key, "raw upload", tool, functools.partial(
                    self.openssh_upload, key, packs, options, flags), dittohead=False)

    def dittohead_upload(self, key: str, packs: list[Path], ciphers: tuple[str, ...] | None,
                         fsync: bool) -> dict:
        """The packs into a staging folder of ROOT2 through SFTPTransport, in this process:
        sign in, make_staging, then per pack open_upload, 1 MiB writes, digest, finish."""
        name = f"raw-{key}"
        old = dssh.CIPHERS
        if ciphers is not None:
            dssh.CIPHERS = ciphers
        os.environ["DITTOHEAD_STATE_DIR"] = str(self.state_sftp)  # its known_hosts
        t: SFTPTransport | None = None
        buf = bytearray(PIECE)
        view = memoryview(buf)
        try:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            t = open_sftp(self.sshd.url(self.root2), dssh.NoPrompts(),
                          identity=str(self.sshd.client_key))
            signed_in = time.perf_counter() - start
            if not fsync:
                t.has_fsync, t._warned_fsync = False, True
            t.make_staging(STUDY, name)
            for path in packs:
                up = t.open_upload(STUDY, name)
                with open(path, "rb", buffering=0) as f:
                    while n := f.readinto(buf):
                        up.write(view[:n])
                filename = up.digest().hex() + fmt.PACK_SUFFIX
                if filename != path.name:
                    up.abort()
                    raise StepFailed(f"{path.name}: the upload's digest names it {filename}")
                up.finish(filename)
            seconds = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            tr = t.session.transport
            cipher = f"{tr.local_cipher}, {tr.local_mac if 'gcm' not in tr.local_cipher else 'no MAC'}"
            self.ciphers[key] = cipher
            write_size = t.write_size
        finally:
            dssh.CIPHERS = old
            if t is not None:
                t.close()
        staged = self.root2 / "dropbox" / STUDY / "inbox" / (fmt.STAGING_PREFIX + name)
        got = sorted(p.name for p in staged.iterdir())
        if got != [p.name for p in packs]:
            raise StepFailed(f"{name}: the staging folder holds {len(got)} files, not the"
                             f" {len(packs)} packs")
        shutil.rmtree(staged)
        cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
        return {"seconds": seconds, "cpu_seconds": cpu, "payload": sum(p.stat().st_size
                                                                      for p in packs),
                "note": f"{cipher}; writes of {write_size // 1024} KiB; sign-in"
                        f" {signed_in:.2f} s"}

    def openssh_upload(self, key: str, packs: list[Path], options: list[str], flags: str) -> dict:
        """OpenSSH's sftp -b: put every pack into a folder of its own."""
        dest = self.raw_dest / key
        batch = self.workdir / f"{key}.batch"
        put = f"put {flags} " if flags else "put "
        batch.write_text(f"mkdir {dest}\n" + "".join(
            f"{put}{p} {dest}/{p.name}\n" for p in packs))
        argv = ["sftp", "-v", "-b", str(batch), "-P", str(self.sshd.port),
                *self.sshd.ssh_options(), *options, f"{USER}@{HOST}"]
        r = self.run(argv, f"sftp {key}", self.env())
        got = sorted(p.name for p in dest.iterdir())
        if got != [p.name for p in packs]:
            raise StepFailed(f"sftp {key}: {dest} holds {len(got)} files, not the"
                             f" {len(packs)} packs", r)
        shutil.rmtree(dest)
        m = re.search(r"kex: client->server cipher: (\S+) MAC: (\S+)", r.stderr)
        cipher = f"{m.group(1)}, {m.group(2)}" if m else "cipher unknown"
        self.ciphers[key] = cipher
        return {"seconds": r.seconds, "cpu_seconds": r.cpu_seconds,
                "payload": sum(p.stat().st_size for p in packs),
                "note": cipher}


def summary(r: ChildRun) -> str:
    """dittohead sync's end line, less the submission's name."""
    lines = [ln.strip() for ln in (r.stdout + "\n" + r.stderr).splitlines()
             if ln.strip().startswith("sync:")]
    if not lines:
        return ""
    return "; ".join(p for p in lines[-1].split("; ") if not p.startswith("submission "))


# --------------------------------------------------------------------------------------------
# Main


def versions(dittohead_exe: str) -> dict[str, str]:
    def first(argv: list[str]) -> str:
        try:
            cp = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                                stdin=subprocess.DEVNULL)
        except OSError:
            return "not found"
        lines = (cp.stdout + cp.stderr).strip().splitlines()
        return lines[0].strip() if lines else "unknown"

    import cryptography
    from cryptography.hazmat.backends.openssl import backend

    return {
        "dittohead": first([dittohead_exe, "--version"]).replace(", version", ""),
        "paramiko": paramiko.__version__,
        "cryptography": f"{cryptography.__version__} ({backend.openssl_version_text()})",
        "OpenSSH": first(["ssh", "-V"]),
        "rsync": " ".join(first(["rsync", "--version"]).split()[:3]),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="working folder (default: a new one under the temp dir);"
                   " an existing one must be empty or a previous benchmark's, and is cleared")
    p.add_argument("--scale", type=float, default=1.0,
                   help="size of the synthetic study (bench.py's): 1.0 is 1.22 GB")
    p.add_argument("--seed", type=int, default=1, help="seed of the synthetic study (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the workdir afterwards")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    p.add_argument("--dittohead", metavar="PATH", default=default_dittohead(),
                   help="the dittohead executable (default: beside this Python, else on PATH)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds after which any one command is killed (default 1800)")
    p.add_argument("--no-drop-caches", action="store_true",
                   help="do not drop the page cache before the timed steps")
    args = p.parse_args(argv)
    if args.scale <= 0:
        p.error("--scale must be positive")
    return args


def unavailable(args: argparse.Namespace) -> str | None:
    if os.geteuid() != 0:
        return "run it as root: the private sshd signs in root, and needs root to start"
    for exe in (SSHD, SSH_KEYGEN, "ssh", "sftp", "rsync"):
        if not shutil.which(exe):
            return f"{exe} not found (apt-get install openssh-server openssh-client rsync)"
    if args.dittohead is None:
        return "no dittohead executable (see --dittohead)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    why = unavailable(args)
    if why:
        print(f"sftp bench: {why}", file=sys.stderr)
        return 1
    workdir = prepare_workdir(args.workdir)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        return benchmark(args, workdir)
    except Interrupted as e:
        print(f"\nsftp bench: stopped by signal {e.args[0]}", file=sys.stderr)
        return 128 + int(e.args[0])
    except KeyboardInterrupt:
        print("\nsftp bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"\nworkdir kept: {workdir} (command output in {workdir / 'logs'})",
                  file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def benchmark(args: argparse.Namespace, workdir: Path) -> int:
    vers = versions(args.dittohead)
    files = plan_source(args.scale, args.seed)
    total = sum(sf.size for sf in files)
    src = workdir / "study"
    print(f"sftp bench: generating {len(files):,} files, {fmt_bytes(total)}"
          f" ({total / GiB:.2f} GiB) in {src}", file=sys.stderr)
    start = time.perf_counter()
    generate_source(src, files, args.seed)
    gen_seconds = time.perf_counter() - start
    source_ready = time.monotonic()
    print(f"sftp bench: generated in {gen_seconds:.1f} s", file=sys.stderr)

    sshd = Sshd(workdir / "sshd")
    try:
        try:
            sshd.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            print(f"sftp bench: cannot start the sshd: {e}", file=sys.stderr)
            return 1
        print(f"sftp bench: sshd on {HOST}:{sshd.port} (pid {sshd.proc.pid if sshd.proc else '?'},"
              f" host key {fingerprint(sshd.host_public)})", file=sys.stderr)
        run = Run(args, workdir, sshd)
        try:
            run.go(total, source_ready)
        except StepFailed as e:  # trust-host
            print(f"sftp bench: {e.what}", file=sys.stderr)
            if e.run is not None:
                print(e.run.stderr.strip(), file=sys.stderr)
            return 1
    finally:
        sshd.stop()  # also on Ctrl-C and SIGTERM (Interrupted)

    targets = evaluate_targets(run.rows)
    header = [
        (f"dittohead over SSH: scale {args.scale}, seed {args.seed}; source {len(files):,} files,"
         f" {fmt_bytes(total)} ({total / GiB:.2f} GiB), generated in {gen_seconds:.1f} s"),
        (f"machine: {os.cpu_count()} CPUs, {platform.system()} {platform.release()},"
         f" Python {platform.python_version()}; {run.dropper.describe()}"),
        "versions: " + "; ".join(f"{k}: {v}" for k, v in vers.items()),
        (f"sshd: private, {HOST}:{sshd.port}, internal-sftp, root by key; everything on one"
         " machine, so the client and the server share its CPUs"),
        ("MB/s = the source's size (sync, rsync) or the packs' (raw upload) / seconds;"
         " 'vs peer' = the peer's time / this one's (above 1: faster than the peer);"
         " client CPU = the command's (the raw dittohead upload: this process's), sshd CPU ="
         " the connections' processes, internal-sftp or rsync --server included"),
    ]
    footer = []
    if run.failed_dittohead:
        footer.append("dittohead failed a step: see its stderr above")
    report(header, run.rows, targets, footer)
    if args.json:
        doc = {
            "scale": args.scale,
            "seed": args.seed,
            "source": {"files": len(files), "bytes": total, "generate_seconds": gen_seconds},
            "machine": {"cpus": os.cpu_count(), "system": platform.platform(),
                        "python": platform.python_version()},
            "caches_dropped": bool(run.dropper.works),
            "versions": vers,
            "ciphers": run.ciphers,
            "rows": [{**asdict(r), "rate": r.rate} for r in run.rows],
            "targets": [asdict(t) for t in targets],
            "dittohead_failed": run.failed_dittohead,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return 1 if run.failed_dittohead else 0


if __name__ == "__main__":
    sys.exit(main())
