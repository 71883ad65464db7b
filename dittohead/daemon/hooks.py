"""A study's hook: the admin's command, run by the daemon after each ingest of the study
(``study set NAME --hook COMMAND``; docs/watch-housekeeping.md).

The command line is split as a shell would split words (``shlex``) and run without a shell, in
a process group of its own, with a clean environment (``PATH``, ``LANG``, ``HOME``, ``USER``
and the ``DITTOHEAD_*`` variables below), in the daemon's state folder (``ROOT/daemon``), its
standard output and error read together:

    DITTOHEAD_STUDY, DITTOHEAD_SEQ, DITTOHEAD_SUBMISSION      which ingest
    DITTOHEAD_SITE, DITTOHEAD_USER, DITTOHEAD_HOST           what the client said (escaped)
    DITTOHEAD_FILES, DITTOHEAD_NEW_VERSIONS, DITTOHEAD_BYTES  how much
    DITTOHEAD_STORE                                          the server root

Standard input holds one JSON object per line for each new version the submission made, from
the index: ``{"path": ..., "version": N, "size": BYTES, "hash": HEX}`` (and ``path_b64`` for a
path that is not UTF-8, as ``--json`` output writes it). A hook that does not read it is fine.

A hook that exits non-zero, is still running at the time-out (its whole process group is then
killed: SIGTERM, and SIGKILL 2 seconds later), or cannot be started gives a ``hook_failed``
event with its status and the last lines of its output, escaped. A hook's failure never touches
the store.

**Hooks due survive the daemon** (``Due``): each hook due after an ingest is recorded in
ROOT/daemon/hooks/ (0700; one file ``STUDY.SEQ.json`` a hook, 0600, written whole and fsynced:
``fsutil.replace_file``) before it is started, by the worker that ingested (``record_due``,
before it reports the result: a daemon killed alone meanwhile loses nothing) or else by the
daemon, and removed once the hook has finished, whether it succeeded or failed (a failure is
notified, never retried). ``Hooks`` runs them, each study's in order of seq on a thread of the
study's own; at start and at each rescan it takes up every record it is not running
(``load_due``): those a stop or a crash left. A stop kills a running hook's process group
(``run_hook``'s ``stop``) and leaves its record; a run that outlived a killed daemon (its pid and
start time are in the record) is killed before the hook runs again. So a hook runs at least once
for each ingest, and again after a stop or a crash that cut it short: hooks must be idempotent
(``DITTOHEAD_STUDY`` and ``DITTOHEAD_SEQ`` name the ingest).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import selectors
import shlex
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from dittohead import fsutil
from dittohead.daemon.config import daemon_dir
from dittohead.daemon.events import Event
from dittohead.display import escape, json_path
from dittohead.format import STUDY_NAME_RE
from dittohead.store.layout import ServerRoot, StudySettings

log = logging.getLogger(__name__)

PATH = "/usr/local/bin:/usr/bin:/bin"
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL at the time-out
EXIT_GRACE = 1.0  # seconds the output is still read after the hook exited (a child may hold it)
OUTPUT_KEPT = 64 * 1024  # bytes of output kept, the last ones
OUTPUT_LINES = 20  # lines of output in the event
OUTPUT_CHARS = 4000
POLL = 0.2  # seconds between two looks at ``stop`` while a hook runs
DUE_DIR = "hooks"  # ROOT/daemon/hooks/: the hooks due, one file each
DUE_MODE = 0o600
DUE_VERSION = 1
DUE_MAX_SIZE = 256 * 1024  # a record larger than this is not ours
STOP_WAIT = 1.0  # seconds a hook killed by a stop signal waits to learn the daemon stops too


class HookStopped(Exception):
    """The daemon stops: the hook was not started, or its process group was killed."""


def run_hook(settings: StudySettings, event: Event, timeout: float, *, root: str | None = None,
             stop: Callable[[], bool] | None = None, on_start: Callable[[int], None] | None = None) -> Event | None:
    """Run the hook of ``settings`` for the ``ingested`` ``event``; None if it succeeded (or the
    study has none), else a ``hook_failed`` event. ``root`` is the server root (else the event's
    field ``store``). ``stop``, looked at every POLL seconds: once true, the hook's process
    group is killed (as at the time-out) and HookStopped raised. ``on_start(pid)``: the hook's
    process has started (its pid is its process group's)."""
    if event.kind != "ingested":
        raise ValueError(f"a hook runs after an ingest, not for a {event.kind!r} event")
    command = (settings.hook or "").strip()
    if not command:
        return None
    root = root or event.fields.get("store")

    def failed(status: str, output: str = "") -> Event:
        log.warning("the hook of study %s failed after %s: %s", settings.name, escape(event.submission or ""), status)
        return Event("hook_failed", settings.name, event.submission, fields={
            "command": command, "seq": event.fields.get("seq"), "status": status, "output": output})

    if not root:
        return failed("not run: the daemon gave no server root (a bug: report it)")
    try:
        argv = shlex.split(command)
    except ValueError as e:
        return failed(f"could not start: bad command line ({e})")
    if not argv:
        return failed("could not start: empty command line")
    try:
        lines = new_versions(root, settings.name, int(event.fields["seq"]))
    except (OSError, sqlite3.Error, KeyError, TypeError, ValueError) as e:
        return failed(f"not run: cannot read the new versions from the index ({e})")
    state = daemon_dir(root)
    os.makedirs(state, mode=0o700, exist_ok=True)
    stopped = stop or (lambda: False)
    if stopped():
        raise HookStopped
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=state, env=hook_env(root, event), start_new_session=True, bufsize=0,
                                close_fds=True)
    except OSError as e:
        return failed(f"could not start: {e.strerror or e}")
    except ValueError as e:  # a NUL in an argument
        return failed(f"could not start: {e}")
    deadline = time.monotonic() + timeout
    try:
        if on_start is not None:
            on_start(proc.pid)
        tail, ended = _communicate(proc, lines, deadline, stopped)
        while ended is None and proc.poll() is None:
            try:
                proc.wait(max(0.0, min(POLL, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                if stopped():
                    ended = "stopped"
                elif time.monotonic() >= deadline:
                    ended = "timed out"
        if ended is not None:
            _kill_group(proc)
    finally:
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        if proc.returncode is None:
            _kill_group(proc)
    output = _last_lines(tail)
    if ended == "stopped":
        raise HookStopped
    if ended is not None:
        return failed(f"timed out after {timeout:g} s (killed)", output)
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = str(-proc.returncode)
        return failed(f"killed by signal {name}", output)
    if proc.returncode != 0:
        return failed(f"exit {proc.returncode}", output)
    log.debug("the hook of study %s ran after %s", settings.name, escape(event.submission or ""))
    return None


def new_versions(root: str, study: str, seq: int) -> bytes:
    """The JSON lines of the versions submission ``seq`` of ``study`` made (from the index)."""
    from dittohead.store.index import Index

    idx = Index(ServerRoot(root).index_path, readonly=True)
    try:
        out = []
        for v in idx.versions_brought(study, seq - 1, seq):
            doc = {**json_path(v.path), "version": v.n, "size": v.size, "hash": v.hash.hex()}
            out.append(json.dumps(doc, ensure_ascii=True).encode() + b"\n")
        return b"".join(out)
    finally:
        idx.close()


def hook_env(root: str, event: Event) -> dict[str, str]:
    """The hook's whole environment. What a client chose (site, user, host) is escaped: no
    control character reaches a script through it."""
    f = event.fields
    env = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/", "USER": "", "LOGNAME": ""}
    try:
        import pwd

        pw = pwd.getpwuid(os.geteuid())
        env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
    except (ImportError, KeyError):
        pass
    env.update({
        "DITTOHEAD_STORE": os.path.abspath(root),
        "DITTOHEAD_STUDY": event.study or "",
        "DITTOHEAD_SUBMISSION": escape(event.submission or ""),
        "DITTOHEAD_SEQ": str(f.get("seq", "")),
        "DITTOHEAD_SITE": escape(str(f.get("site", ""))),
        "DITTOHEAD_USER": escape(str(f.get("user", ""))),
        "DITTOHEAD_HOST": escape(str(f.get("host", ""))),
        "DITTOHEAD_FILES": str(f.get("files", "")),
        "DITTOHEAD_NEW_VERSIONS": str(f.get("new_versions", "")),
        "DITTOHEAD_BYTES": str(f.get("bytes", "")),
    })
    return env


def _communicate(proc: subprocess.Popen, data: bytes, deadline: float,
                 stopped: Callable[[], bool]) -> tuple[bytes, str | None]:
    """Write ``data`` to the hook's standard input and read its output (the last OUTPUT_KEPT
    bytes kept) until it closes, or until EXIT_GRACE after the hook exited (a child it left
    behind may hold the pipe), or the deadline, or ``stopped()``. Returns (output, None or why
    it was cut short: "timed out", "stopped")."""
    assert proc.stdin is not None and proc.stdout is not None
    out_fd, in_fd = proc.stdout.fileno(), proc.stdin.fileno()
    tail = bytearray()
    with selectors.DefaultSelector() as sel:
        os.set_blocking(out_fd, False)
        sel.register(out_fd, selectors.EVENT_READ)
        if data:
            os.set_blocking(in_fd, False)
            sel.register(in_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        view, pos = memoryview(data), 0
        exited_at: float | None = None
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                return bytes(tail), "timed out"
            if stopped():
                return bytes(tail), "stopped"
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > EXIT_GRACE:
                break
            for key, _ in sel.select(min(deadline - now, POLL)):
                if key.fd == in_fd:
                    try:
                        pos += os.write(in_fd, view[pos : pos + 65536])
                    except BlockingIOError:
                        continue
                    except OSError:  # BrokenPipeError: the hook does not read it all
                        pos = len(view)
                    if pos >= len(view):
                        sel.unregister(in_fd)
                        with contextlib.suppress(OSError):
                            proc.stdin.close()
                else:
                    try:
                        chunk = os.read(out_fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(out_fd)
                    else:
                        tail += chunk
                        del tail[:-OUTPUT_KEPT]
    return bytes(tail), None


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the hook's process group, SIGKILL after KILL_GRACE if the hook is still there."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(KILL_GRACE)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the rest of the group too, even when the hook went
    proc.wait()


def _last_lines(tail: bytes) -> str:
    lines = [escape(line) for line in tail.rstrip(b"\n").split(b"\n")[-OUTPUT_LINES:]] if tail.strip() else []
    text = "\n".join(lines)
    return text[-OUTPUT_CHARS:]


# -- hooks due: ROOT/daemon/hooks/ ----------------------------------------------------------


@dataclass
class Due:
    """A hook due after an ingest: the ingest's event, and its record's file name in
    ROOT/daemon/hooks/ (None: it could not be written, and lives in memory only)."""

    event: Event
    name: str | None
    pid: int | None = None  # a run that began (the pid of its process group), as recorded
    pid_start: int | None = None  # that process's start time (/proc/PID/stat), against a pid reused

    @property
    def study(self) -> str:
        return self.event.study or ""

    @property
    def seq(self) -> int:
        return int(self.event.fields.get("seq") or 0)


def due_dir(root: str) -> str:
    return os.path.join(daemon_dir(root), DUE_DIR)


def due_name(study: str, seq: int) -> str:
    return f"{study}.{seq:012d}.json"


def _due_bytes(due: Due) -> bytes:
    e = due.event
    doc: dict[str, object] = {"version": DUE_VERSION, "study": e.study, "seq": due.seq, "submission": e.submission,
                              "fields": e.fields, "time_ns": e.time_ns}
    if due.pid is not None:
        doc.update(pid=due.pid, pid_start=due.pid_start)
    return json.dumps(doc, ensure_ascii=True, sort_keys=True).encode() + b"\n"


def record_due(root: str, event: Event) -> Due:
    """Record durably that the hook is due after the ``ingested`` ``event`` (before it is
    started); the same ingest's record is written over. Raises OSError."""
    folder = due_dir(root)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    due = Due(event, due_name(event.study or "", int(event.fields["seq"])))
    assert due.name is not None
    fsutil.replace_file(os.path.join(folder, due.name), _due_bytes(due), mode=DUE_MODE)
    return due


def is_recorded(root: str, name: str) -> bool:
    return os.path.lexists(os.path.join(due_dir(root), name))


def _started(root: str, due: Due, pid: int) -> None:
    """Note the pid of the hook's run in its record, so that a daemon started after a kill can
    end that run first (durable all the same: a record torn by a power cut would lose the hook)."""
    due.pid, due.pid_start = pid, process_start(pid)
    if due.name is None:
        return
    try:
        fsutil.replace_file(os.path.join(due_dir(root), due.name), _due_bytes(due), mode=DUE_MODE)
    except OSError as e:
        log.warning("%s: cannot note the hook's pid in it: %s", due.name, e.strerror or e)


def _finished(root: str, due: Due) -> None:
    if due.name is None:
        return
    try:
        os.unlink(os.path.join(due_dir(root), due.name))
    except FileNotFoundError:
        pass
    except OSError as e:
        log.error("%s: cannot remove it (the hook runs again at the next start): %s",
                  os.path.join(due_dir(root), due.name), e.strerror or e)


def _parse_due(data: bytes, name: str) -> Due:
    doc = json.loads(data)
    if not isinstance(doc, dict) or doc.get("version") != DUE_VERSION:
        raise ValueError("not a record of a hook due, of this dittohead")
    study, seq, fields = doc.get("study"), doc.get("seq"), doc.get("fields")
    if not isinstance(study, str) or not STUDY_NAME_RE.match(study):
        raise ValueError("bad 'study'")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq <= 0 or name != due_name(study, seq):
        raise ValueError("bad 'seq', or not its file's")
    if not isinstance(fields, dict) or fields.get("seq") != seq:
        raise ValueError("bad 'fields'")
    submission, time_ns = doc.get("submission"), doc.get("time_ns")
    event = Event("ingested", study, submission if isinstance(submission, str) else None, fields=fields,
                  time_ns=time_ns if isinstance(time_ns, int) else time.time_ns())
    pid, pid_start = doc.get("pid"), doc.get("pid_start")
    return Due(event, name, pid if isinstance(pid, int) and pid > 1 else None,
               pid_start if isinstance(pid_start, int) else None)


def load_due(root: str) -> list[Due]:
    """Every hook recorded as due, each study's in order of seq. A record that cannot be read
    is set aside as ``.bad-NAME`` with one log line."""
    folder = due_dir(root)
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".json") and not n.startswith("."))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            out.append(_parse_due(fsutil.read_limited(path, DUE_MAX_SIZE), name))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            bad = os.path.join(folder, f".bad-{name}")
            with contextlib.suppress(OSError):
                os.replace(path, bad)
            log.error("%s: not a hook due (%s): set aside as %s; that hook is not run", path, e, bad)
    return sorted(out, key=lambda d: (d.study, d.seq))


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot: /proc/PID/stat), or None
    where there is no such process (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return None if fields[0] == b"Z" else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _end_leftover(due: Due) -> bool:
    """End the run of ``due`` that a killed daemon left (its process group), if it still runs:
    True if there was one."""
    if due.pid is None or due.pid_start is None or process_start(due.pid) != due.pid_start:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(due.pid, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE
    while time.monotonic() < deadline and process_start(due.pid) == due.pid_start:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(due.pid, signal.SIGKILL)
    return True


class Hooks:
    """The daemon's hooks due (see the module's docstring): each study's run in order of seq on
    a thread of the study's own. Each run that ends, whatever way, puts ("hook", None, a
    ``hook_failed`` event or None) in ``events``; ("hook_note", None, (study, text)) says what the
    daemon's log should say besides. ``settings_of(study)`` gives a study's settings as they are
    when its hook starts; ``timeout`` is watch.json's ``hook_timeout_seconds``."""

    def __init__(self, root: str, events: queue.SimpleQueue, settings_of: Callable[[str], StudySettings],
                 timeout: float) -> None:
        self.root = root
        self.timeout = timeout
        self.stopping = False  # set from the daemon's signal handler: nothing starts, what runs is killed
        self._events = events
        self._settings_of = settings_of
        self._lock = threading.Lock()
        self._waiting: dict[str, list[Due]] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._known: set[str] = set()  # the records waiting or running here
        self._upto: dict[str, int] = {}  # per study, the highest seq taken up here

    def _note(self, study: str, text: str) -> None:
        self._events.put(("hook_note", None, (study, text)))

    def ingested(self, event: Event, has_hook: bool) -> None:
        """After an ingest: its hook, as the worker recorded it (or, if it could not and the
        study has a hook, as recorded here now)."""
        study, seq = event.study or "", int(event.fields["seq"])
        name = due_name(study, seq)
        with self._lock:
            if name in self._known or (seq <= self._upto.get(study, 0) and not is_recorded(self.root, name)):
                return  # taken up from its record already (a rescan came first), maybe run since
        due: Due | None = Due(event, name) if is_recorded(self.root, name) else None
        if due is None:
            if not has_hook:
                return
            try:
                due = record_due(self.root, event)
            except OSError as e:
                log.error("%s: cannot record the hook due after #%d of study %s (%s): it runs, but a stop "
                          "before its end loses it", due_dir(self.root), seq, study, e.strerror or e)
                due = Due(event, None)
        self._take([due])

    def take_up(self, busy: Collection[str] = ()) -> list[Due]:
        """Every recorded hook not waiting or running here (those a stop or a crash left, at
        start; at a rescan, one a worker of an earlier daemon recorded since): queued in order,
        and returned. Not those of the studies in ``busy``, whose workers run: a record of theirs
        comes with its worker's result."""
        with self._lock:
            new = [d for d in load_due(self.root) if d.name not in self._known and d.study not in busy]
        self._take(new)
        return new

    def _take(self, dues: list[Due]) -> None:
        with self._lock:
            for due in dues:
                if due.name is not None:
                    if due.name in self._known:
                        continue
                    self._known.add(due.name)
                self._upto[due.study] = max(self._upto.get(due.study, 0), due.seq)
                self._waiting.setdefault(due.study, []).append(due)
                if due.study not in self._threads and not self.stopping:
                    t = threading.Thread(target=self._drain, args=(due.study,), name=f"dittohead-hook-{due.study}",
                                         daemon=True)
                    self._threads[due.study] = t
                    t.start()

    def _drain(self, study: str) -> None:
        while True:
            with self._lock:
                waiting = self._waiting.get(study)
                if not waiting or self.stopping:
                    self._threads.pop(study, None)
                    return
                due = min(waiting, key=lambda d: d.seq)
                waiting.remove(due)
            try:
                done, failed = self._run(due)
            except Exception as e:  # a hook's trouble is reported, never the daemon's end
                log.exception("internal error running the hook of study %s", study)
                done, failed = True, Event("hook_failed", study, due.event.submission, fields={
                    "command": "", "seq": due.seq, "status": f"internal error: {type(e).__name__}: {e}",
                    "output": ""})
            if done:
                _finished(self.root, due)
            with self._lock:
                if due.name is not None:
                    self._known.discard(due.name)
            self._events.put(("hook", None, failed))

    def _run(self, due: Due) -> tuple[bool, Event | None]:
        """Run one hook due: (whether it is done with, the hook_failed event or None)."""
        settings = self._settings_of(due.study)
        if not (settings.hook or "").strip():
            self._note(due.study, f"study {due.study}: it has no hook any more; the one due after #{due.seq} "
                                  "is not run")
            return True, None
        if _end_leftover(due):
            self._note(due.study, f"study {due.study}: the hook's run after #{due.seq} that began before the "
                                  f"daemon was killed still ran (pid {due.pid}): ended, to run it again")
        try:
            failed = run_hook(settings, due.event, self.timeout, root=self.root, stop=lambda: self.stopping,
                              on_start=lambda pid: _started(self.root, due, pid))
        except HookStopped:
            return False, None
        if failed is not None and self._stop_signal(failed):
            return False, None  # killed by the stop that reached its process group too (systemd)
        return True, failed

    def _stop_signal(self, failed: Event) -> bool:
        """Whether a hook killed by a stop signal was killed by the daemon's stop: the signal
        sent to every process of the service may reach the hook before the daemon heeds it."""
        if failed.fields.get("status") not in ("killed by signal SIGTERM", "killed by signal SIGINT",
                                                "killed by signal SIGKILL"):
            return False
        deadline = time.monotonic() + STOP_WAIT
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.stopping

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the threads of a stop (``stopping`` set): False if
        one still runs."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads.values())
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)
