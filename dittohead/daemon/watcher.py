"""The watcher daemon (``dittohead watch --store ROOT``): ingest as uploads land, and run for months.

What it does, in one process (the main loop) and one worker process per submission:

- **Watching.** watchdog's inotify observer watches ``ROOT/dropbox/`` (a study added is
  watched at once, without a restart) and every study's ``inbox/``: a submission committed
  there (``.NAME`` renamed to ``NAME``) wakes the loop at once. A full rescan every
  ``rescan_seconds`` (watch.json; ``--interval``) looks at every inbox and ``processing/``
  anyway, so a missed event, an NFS share, or anything committed while the daemon was down
  loses nothing; the rescan also runs the housekeeping, the disk and quota checks, and sweeps
  what ended ingests left in ``store/tmp/``.
- **Workers.** A study with work gets a worker, ``python -m dittohead.daemon.worker ROOT
  STUDY`` (``worker``): a process of its own for each submission, so that a crash, a SIGKILL or
  the kernel's out-of-memory killer costs that submission an attempt (its ``STATE``; set aside
  after ``--max-attempts``) and never the daemon. A fresh interpreter, not a fork: the daemon
  has threads (the observer's, the hooks'), and a forked child of a threaded process may
  inherit a lock held by a thread that is not there; a new process starts clean, its memory is
  given back whole when it ends, and its pid and exit status say what became of it (about
  0.1-0.2 s to start, against the 2 s allowed from commit to ingest). Up to ``workers``
  (watch.json) run at once, one per study at most: a study's submissions go one at a time, in
  their order of arrival (the study's lock, ``store.ingest.StudyLock``, which ``watch --once``
  takes too), and studies go on beside one another: a worker verifies with the store only read,
  and holds the store's lock only for its commit (``store.ingest``). A study that waits longest
  gets the next free worker; at start, studies with something left in ``processing/`` (a crash)
  come first.
- **Exports behind the store.** At start, each study with an export destination whose export is
  behind the store (``worker.export_behind``: a stop or a crash between an ingest's commit and
  its export, or an export that failed) is marked; its next worker exports it (``--export``)
  whether or not it ingests anything. A study with nothing to ingest gets such a worker too: one
  at a time, besides the ``workers`` that ingest, so that no ingest waits for a catch-up.
- **After an ingest**, in the loop: the event is logged (``Event.line()``, or ``Event.json()``
  with ``--log-json``), notified (``notify.Notifier``), the disks and quotas are looked at
  (``disks.Monitor``), and the study's hook, if it has one, runs on a thread of the study's
  own (``hooks.Hooks``, ``hooks.run_hook``), so that a slow hook never holds up the loop or
  another study. The worker itself exports the study if it has an export destination (as
  ``watch --once`` does), and records the hook due in ROOT/daemon/hooks/ before it reports the
  ingest: a hook runs at least once, and again at the next start if a stop or a crash cut it
  short or came before it (those records are taken up at start and at each rescan).
- **Held back** (damage in the store): ``housekeeping.Housekeeper`` says when the submission
  may be tried again (a growing delay); until then its workers leave it, and the submissions
  that list its paths, where they are.

Signals: SIGTERM (and SIGINT) stop it: each worker is told to stop (one in a commit finishes it,
one verifying stops at once and its attempt does not count), workers still running after
``STOP_GRACE`` seconds are killed (their attempt then counts, as after any crash), a running
hook's process group is killed at once (SIGTERM, SIGKILL ``hooks.KILL_GRACE`` later; its record
stays, so it runs again at the next start), and the daemon exits 0 (130 for SIGINT) within
``STOP_BOUND`` seconds. SIGHUP reads ROOT/daemon/watch.json again (a file that cannot be used is
one log line, and the configuration in use stays) and reopens the ``--log-file``. Under systemd
(``Type=notify``) it sends READY=1 when it watches, RELOADING=1 and READY=1 around a SIGHUP,
STOPPING=1 when it stops, and WATCHDOG=1 from its loop when the unit sets ``WatchdogSec``:
datagrams to ``$NOTIFY_SOCKET``, no library needed.

One daemon per server root: it holds ``ROOT/daemon/lock`` (flock; the pid written in it), and a
second ``watch`` says which pid runs and exits 4.

``ROOT/daemon/state.json``: the daemon's account of itself, for ``dittohead status``; replaced
whole (written beside, then renamed) at start, on each change that matters (a worker starts or
ends, a result), at most once a second, and at the end:

    {
      "pid": 1234, "started_ns": ..., "updated_ns": ..., "stopped_ns": null (set at a clean exit),
      "last_rescan_ns": ..., "rescan_seconds": 60.0, "workers_max": 2,
      "notifications_pending": 0,
      "workers": [{"pid", "study", "submission" (null until it has begun one), "step"
                   ("starting", "taking", "committing", "finishing"), "started_ns"}],
      "studies": {
        "NAME": {
          "last_ingest_ns": ... (0: none yet), "last_seq": 7,
          "processing": ["SUBMISSION"],        what its worker is at now ([] when none)
          "held": [{"name", "reason", "retry_at" (time.time() seconds, or null: when the one
                    it waits behind is)}],
          "failed_recent": [{"name", "reason", "time_ns"}]   the last 10 rejections, newest last
        }
      }
    }

Times are nanoseconds since the epoch (``retry_at``: seconds, as the Housekeeper keeps it).
A state.json whose ``stopped_ns`` is null and whose ``pid`` is not running is a daemon that died.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from dittohead import fsutil
from dittohead.daemon import config as config_mod
from dittohead.daemon.config import WatchConfig
from dittohead.daemon.disks import Monitor
from dittohead.daemon.events import Event
from dittohead.daemon.hooks import KILL_GRACE, Hooks
from dittohead.daemon.housekeeping import Housekeeper
from dittohead.daemon.notify import Notifier
from dittohead.display import escape
from dittohead.errors import LockedError, StoreError, UsageError
from dittohead.lock import FileLock, Held
from dittohead.store.layout import MAX_ATTEMPTS, ServerRoot, StudySettings

log = logging.getLogger(__name__)

LOCK_NAME = "lock"  # ROOT/daemon/lock: one daemon per server root
STOP_GRACE = 20.0  # seconds the workers have, after SIGTERM, to finish the commit in hand
STOP_BOUND = 30.0  # seconds from SIGTERM to the daemon's exit, at most
STATE_EVERY = 1.0  # seconds between two writes of state.json, at least
FLUSH_EVERY = 1.0  # seconds between two calls of the notifier's flush, at least
BUSY_RETRY = 1.0  # seconds before a study another ingest holds is tried again
CRASH_RETRY = 1.0  # seconds before the next worker of a study whose worker died; doubles, to a minute
STOPPED_RETRY = 30.0  # seconds before a study whose worker met the server's own trouble is tried again
FAILED_KEPT = 10


# -- the log -------------------------------------------------------------------------------


class LogSink:
    """The daemon's log: one line per event, to stderr or a file (``--log-file``, appended to,
    reopened on SIGHUP for logrotate; its lines start with the local time), as ``Event.line()``
    or, with ``--log-json``, ``Event.json()``. Lines that are not events (the daemon's own
    words, what a worker wrote on its stderr) are ``daemon`` events in JSON."""

    def __init__(self, path: str | None, as_json: bool) -> None:
        self.path = path
        self.as_json = as_json
        self._lock = threading.Lock()
        self._f: Any = None
        self.reopen()

    def reopen(self) -> None:
        if self.path is None:
            return
        f = open(self.path, "a", encoding="utf-8", errors="backslashreplace", buffering=1)  # noqa: SIM115
        with self._lock:
            old, self._f = self._f, f
        if old is not None:
            old.close()

    def close(self) -> None:
        with self._lock:
            f, self._f = self._f, None
        if f is not None:
            f.close()

    def _write(self, line: str) -> None:
        if self.path is not None and not self.as_json:
            line = time.strftime("%Y-%m-%dT%H:%M:%S%z ") + line
        with self._lock:
            stream = self._f if self._f is not None else sys.stderr
            try:
                stream.write(line + "\n")
                stream.flush()
            except (OSError, ValueError):
                pass

    def event(self, ev: Event) -> None:
        self._write(ev.json() if self.as_json else ev.line())

    def text(self, message: str, *, what: str = "log", study: str | None = None, **fields: Any) -> None:
        if self.as_json:
            self._write(Event("daemon", study, fields={"what": what, "message": message, **fields}).json())
        else:
            self._write(message)


class _SinkHandler(logging.Handler):
    """The daemon's own log records (and those of the modules it runs) into its LogSink."""

    def __init__(self, sink: LogSink) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.text(self.format(record), what="log", level=record.levelname.lower())
        except Exception:  # noqa: BLE001 - logging must never stop the daemon
            self.handleError(record)


def sd_notify(message: str) -> bool:
    """One datagram to systemd's ``$NOTIFY_SOCKET`` (``Type=notify``); False where there is
    none, or it cannot be sent (never raises)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.settimeout(1.0)
            s.connect(address)
            s.sendall(message.encode())
        return True
    except OSError:
        return False


# -- workers -------------------------------------------------------------------------------


class Worker:
    """One worker process (``dittohead.daemon.worker``) and the two threads that read what it
    says into the daemon's queue: ("msg", worker, doc), ("text", worker, line), and last
    ("exit", worker, returncode)."""

    def __init__(self, study: str, argv: list[str], env: dict[str, str], events: queue.SimpleQueue) -> None:
        self.study = study
        self.submission: str | None = None
        self.step = "starting"
        self.started_ns = time.time_ns()
        self.said_stopped = False
        self.export = "--export" in argv  # told to export the study whatever it ingests
        self.exported = False  # it said how its export went
        self.catch_up = False  # started for that export alone, besides the ``workers``
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, close_fds=True)
        self.pid = self.proc.pid
        self._events = events
        self._err = threading.Thread(target=self._read_err, name=f"dittohead-worker-{self.pid}-err", daemon=True)
        self._out = threading.Thread(target=self._read_out, name=f"dittohead-worker-{self.pid}", daemon=True)
        self._err.start()
        self._out.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = None
            if not isinstance(doc, dict):
                self._events.put(("text", self, raw.decode("utf-8", "backslashreplace").rstrip("\n")))
                continue
            self._events.put(("msg", self, doc))
        self._err.join()
        self._events.put(("exit", self, self.proc.wait()))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "backslashreplace").rstrip("\n")
            if line:
                self._events.put(("text", self, line))

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    def alive(self) -> bool:
        return self.proc.poll() is None


# -- the daemon ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonOptions:
    root: str
    max_attempts: int = MAX_ATTEMPTS
    rescan_seconds: float | None = None  # --interval: overrides watch.json's rescan_seconds
    log_file: str | None = None
    log_json: bool = False
    log_level: int = logging.WARNING


@dataclass
class _Study:
    name: str
    worker: Worker | None = None
    ready_since: float | None = None  # monotonic: since when it has work for a worker
    not_before: float = 0.0  # monotonic: no worker before this (after a crash, a busy lock)
    left: frozenset[str] = frozenset()  # what its last worker left untouched
    failures: int = 0  # workers in a row that died or ended in trouble
    last_seq: int = 0
    last_ingest_ns: int = 0
    held: dict[str, tuple[str, float | None]] = field(default_factory=dict)  # name -> (reason, retry_at)
    next_retry: float | None = None  # time.time(): when a held-back submission it left is due
    failed_recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=FAILED_KEPT))
    export_due: bool = False  # its export is behind the store: its next worker exports it
    watch: Any = None  # watchdog's ObservedWatch of its inbox


class _InboxEvents:
    """watchdog's events, turned into the daemon's: ("look", STUDY) for a new entry in a study's
    inbox, ("studies", None) for a change in ROOT/dropbox/ (a study added). Dot names (a client's
    staging folder) and removals (the daemon's own releases) wake nobody."""

    def __init__(self, dropbox: str, events: queue.SimpleQueue) -> None:
        self.dropbox = os.path.abspath(dropbox)
        self._events = events

    def dispatch(self, event: Any) -> None:
        kind = event.event_type
        if kind not in ("created", "moved", "modified"):
            return
        path = os.fsdecode(event.dest_path if kind == "moved" else event.src_path)
        parent, name = os.path.split(path)
        if not name or name.startswith("."):
            return
        if parent == self.dropbox:
            self._events.put(("studies", None, None))
            return
        study_dir, inbox = os.path.split(parent)
        if inbox == "inbox" and os.path.dirname(study_dir) == self.dropbox and kind != "modified":
            self._events.put(("look", None, os.path.basename(study_dir)))


class Daemon:
    """``dittohead watch`` without ``--once`` (see the module's docstring). ``run`` returns the
    exit code: 0 after SIGTERM, 130 after SIGINT."""

    def __init__(self, options: DaemonOptions) -> None:
        self.options = options
        self.root = ServerRoot(options.root)
        self.dir = config_mod.daemon_dir(self.root.path)
        self.sink = LogSink(options.log_file, options.log_json)
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.studies: dict[str, _Study] = {}
        self.config = WatchConfig()
        self.started_ns = time.time_ns()
        self.last_rescan_ns = 0
        self._stop_signal: int | None = None
        self._reload = False
        self._lock: FileLock | None = None
        self._state_dirty = True
        self._state_written = 0.0
        self._next_rescan = 0.0
        self._next_flush = 0.0
        self._refresh_at: float | None = None
        self._watchdog_every = _watchdog_interval()
        self._next_watchdog = 0.0
        self._observer: Any = None
        self._handler: _InboxEvents | None = None
        self.store: Any = None
        self.notifier: Notifier
        self.monitor: Monitor
        self.housekeeper: Housekeeper
        self.hooks = Hooks(self.root.path, self.events, self._settings, self.config.hook_timeout_seconds)

    # -- start and stop
    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        self.root.config()  # a usable server root, or a clear error
        self.config = config_mod.load(self.root.path)  # at start, a bad file is an error (exit 2)
        self._take_lock()
        handler = _SinkHandler(self.sink)
        handler.setFormatter(logging.Formatter("%(message)s"))
        top = logging.getLogger()
        saved = top.handlers[:]
        top.handlers[:] = [handler]
        try:
            return self._run()
        finally:
            top.handlers[:] = saved
            self.sink.close()
            if self._lock is not None:
                self._lock.release()

    def _take_lock(self) -> None:
        """ROOT/daemon/ (0700; made here for a server root made by an earlier dittohead), and its
        lock, with this daemon's pid written in it; LockedError naming the pid that runs."""
        if not os.path.isdir(self.dir):
            try:
                self.root.make_daemon_dir()
            except PermissionError:
                raise StoreError(f"{self.dir}: cannot make it ({self.root.path} is not this account's): make it as "
                                 f"root, owned by this account, mode 0700 (docs/server-root.md)") from None
        path = os.path.join(self.dir, LOCK_NAME)
        lock = FileLock(path)
        try:
            lock.acquire()
        except Held:
            pid = ""
            with contextlib.suppress(OSError, ValueError):
                pid = fsutil.read_limited(path, 64).decode().strip()
            raise LockedError(f"{self.root.path}: a watch daemon runs already{f' (pid {pid})' if pid else ''}; "
                              "one per server root") from None
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)  # another descriptor: the flock stays with the lock's own
        self._lock = lock

    def _run(self) -> int:
        from dittohead.store.repo import Store

        self.store = Store.open(self.root.path)
        self._make_parts()
        self.hooks.timeout = self.config.hook_timeout_seconds
        self._start_observer()
        self._refresh_studies(start=True)
        self._take_up_hooks()
        self.sink.text(f"watching {self.root.path} (pid {os.getpid()}; inotify, and a rescan every "
                       f"{self._rescan_seconds():g} s; up to {self.config.workers} workers at once)",
                       what="started", pid=os.getpid())
        self._write_state(force=True)
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=watching {self.root.path}")
        self._next_rescan = time.monotonic()
        faults = 0
        try:
            while self._stop_signal is None:
                try:
                    self._turn()
                    faults = 0
                except Exception as e:  # the daemon outlives a fault of its own: one line, then on
                    faults += 1
                    log.debug("internal error in the daemon's loop", exc_info=True)
                    self.sink.text(f"internal error in the daemon's loop: {type(e).__name__}: {e} (run with -v "
                                   "for details)", what="error")
                    pause = time.monotonic() + min(60.0, 2.0 ** faults)
                    while self._stop_signal is None and time.monotonic() < pause:
                        time.sleep(0.1)
        except BaseException as e:
            self.sink.text(f"the daemon stops on an error of its own: {type(e).__name__}: {e}", what="error")
            self._shutdown()
            raise
        return self._shutdown()

    def _on_stop(self, signum: int, frame: object) -> None:
        if self._stop_signal is None:
            self._stop_signal = signum
        self.hooks.stopping = True  # no hook starts from now on; a running one is killed
        self.events.put(("wake", None, None))

    def _on_hup(self, signum: int, frame: object) -> None:
        self._reload = True
        self.events.put(("wake", None, None))

    def _make_parts(self) -> None:
        self.notifier = Notifier(self.root.path, self.config)
        self.monitor = Monitor(self.root.path, self.config)
        self.housekeeper = Housekeeper(self.root.path, self.config)

    def _start_observer(self) -> None:
        try:
            from watchdog.observers import Observer
        except ImportError as e:
            log.warning("watchdog cannot be used (%s): only the rescan every %g s finds new submissions",
                        e, self._rescan_seconds())
            return
        self._handler = _InboxEvents(self.root.dropbox_root, self.events)
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.start()
        self._schedule(self.root.dropbox_root)

    def _schedule(self, path: str) -> Any:
        if self._observer is None:
            return None
        try:
            return self._observer.schedule(self._handler, path, recursive=False)
        except (OSError, KeyError) as e:
            if os.path.isdir(path):
                log.warning("cannot watch %s (%s): it is looked at by the rescans only", path, e)
            return None

    def _shutdown(self) -> int:
        code = 130 if self._stop_signal == signal.SIGINT else 0
        sd_notify("STOPPING=1")
        t0 = time.monotonic()
        running = [st.worker for st in self.studies.values() if st.worker is not None]
        self.sink.text(f"stopping: {len(running)} worker{'s' if len(running) != 1 else ''} told to stop "
                       f"(a commit in hand is finished)", what="stopping")
        self.hooks.stopping = True
        if self._observer is not None:
            with contextlib.suppress(Exception):
                self._observer.stop()
        for w in running:
            w.signal(signal.SIGTERM)
        while any(st.worker is not None for st in self.studies.values()):
            left = STOP_GRACE - (time.monotonic() - t0)
            if left <= 0:
                for st in self.studies.values():
                    if st.worker is not None:
                        self.sink.text(f"worker {st.worker.pid} of study {st.name} still running after "
                                       f"{STOP_GRACE:g} s: killed", what="error", study=st.name)
                        st.worker.signal(signal.SIGKILL)
                        st.worker.proc.wait()
                        st.worker = None
                break
            try:
                item = self.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            self._handle(item)
        # Running hooks were told to stop with the workers: their process groups are killed
        # (KILL_GRACE at most), their records kept for the next start.
        if not self.hooks.join(max(0.5, min(KILL_GRACE + 2.0, STOP_BOUND - 8.0 - (time.monotonic() - t0)))):
            self.sink.text("a hook still running after its kill: left to itself (its record is kept: it runs "
                           "again at the next start)", what="error")
        self._drain_events()
        with contextlib.suppress(Exception):
            self.notifier.close(max(0.5, min(5.0, STOP_BOUND - 2 - (time.monotonic() - t0))))
        if self._observer is not None:
            with contextlib.suppress(Exception):
                self._observer.join(timeout=1.0)
        self._write_state(force=True, stopped=True)
        with contextlib.suppress(Exception):
            self.store.close()
        self.sink.text(f"stopped (after {time.monotonic() - t0:.1f} s)", what="stopped")
        return code

    def _drain_events(self) -> None:
        while True:
            try:
                item = self.events.get_nowait()
            except queue.Empty:
                return
            self._handle(item)

    # -- the loop
    def _rescan_seconds(self) -> float:
        return self.options.rescan_seconds or self.config.rescan_seconds

    def _turn(self) -> None:
        now = time.monotonic()
        if self._reload:
            self._do_reload()
        if self._refresh_at is not None and now >= self._refresh_at:
            self._refresh_studies()
        wall = time.time()
        for st in self.studies.values():
            if st.next_retry is not None and wall >= st.next_retry:
                self._look(st)
        self._start_workers(now)
        if now >= self._next_rescan:
            self._rescan()
            self._start_workers(time.monotonic())
        now = time.monotonic()
        if now >= self._next_flush:
            self._safely("notify", self.notifier.flush)
            self._next_flush = now + FLUSH_EVERY
        self._write_state()
        if self._watchdog_every and now >= self._next_watchdog:
            sd_notify("WATCHDOG=1")
            self._next_watchdog = now + self._watchdog_every
        try:
            item = self.events.get(timeout=self._timeout(time.monotonic()))
        except queue.Empty:
            return
        self._handle(item)
        self._drain_events()

    def _timeout(self, now: float) -> float:
        deadlines = [self._next_rescan, self._next_flush]
        if self._refresh_at is not None:
            deadlines.append(self._refresh_at)
        if self._state_dirty:
            deadlines.append(self._state_written + STATE_EVERY)
        if self._watchdog_every:
            deadlines.append(self._next_watchdog)
        wall = time.time()
        for st in self.studies.values():
            if st.worker is None and (st.ready_since is not None or st.export_due) and st.not_before > now:
                deadlines.append(st.not_before)
            if st.next_retry is not None:
                deadlines.append(now + st.next_retry - wall + 0.05)
        return min(max(min(deadlines) - now, 0.01), 5.0)

    def _handle(self, item: tuple[str, Any, Any]) -> None:
        kind, worker, payload = item
        try:
            if kind == "look":
                st = self.studies.get(payload)
                if st is None:
                    self._refresh_at = time.monotonic()  # a study not seen yet
                else:
                    self._look(st)
            elif kind == "studies":
                if self._refresh_at is None:
                    self._refresh_at = time.monotonic() + 0.2  # study add makes its folders one by one
            elif kind == "msg":
                self._on_message(worker, payload)
            elif kind == "text":
                self.sink.text(payload, what="worker", study=worker.study, pid=worker.pid)
            elif kind == "exit":
                self._on_exit(worker, payload)
            elif kind == "hook" and payload is not None:
                self._tell(payload)
            elif kind == "hook_note":
                study, text = payload
                self.sink.text(text, what="hook", study=study)
        except Exception as e:  # the daemon outlives a fault of its own
            log.exception("internal error in the daemon's loop")
            self.sink.text(f"internal error in the daemon's loop: {type(e).__name__}: {e}", what="error")

    # -- studies and what waits in them
    def _refresh_studies(self, start: bool = False) -> None:
        """Take in studies added (watched, looked at) and drop those removed."""
        self._refresh_at = None
        try:
            names = set(self.root.studies())
        except OSError as e:
            log.error("cannot list %s: %s", self.root.dropbox_root, e)
            return
        latest = self._latest_ingests(names - set(self.studies))
        for name in sorted(names - set(self.studies)):
            st = self.studies[name] = _Study(name)
            st.last_seq, st.last_ingest_ns = latest.get(name, (0, 0))
            for h in self._held_back(name):
                st.held[h.submission] = (h.reason, h.retry_at)
            if not start:
                self.sink.text(f"study {name}: watched from now on", what="study_added", study=name)
        for name in sorted(set(self.studies) - names):
            st = self.studies[name]
            if st.worker is None:
                self._unschedule(st)
                del self.studies[name]
        young = False
        for st in self.studies.values():
            if st.watch is None:
                st.watch = self._schedule(self.root.dropbox(st.name).inbox)
                if st.watch is None and self._observer is not None:
                    with contextlib.suppress(OSError):
                        young |= time.time() - os.stat(self.root.dropbox(st.name).path).st_ctime < 10
            self._look(st, first=start)
        if young:
            self._refresh_at = time.monotonic() + 0.5
        if start:
            self._exports_behind()

    def _exports_behind(self) -> None:
        """At start: mark each study whose export is behind the store (``export_behind``), for
        its next worker to export it (``_start_workers``)."""
        from dittohead.daemon.worker import export_behind

        for st in self.studies.values():
            dest = self._settings(st.name).export
            if not dest:
                continue
            why = self._safely("export", export_behind, self.store, st.name, dest, st.last_seq)
            if why:
                st.export_due = True
                self.sink.text(f"study {st.name}: its export to {dest} is behind the store ({why}): exported "
                               "again now", what="export_behind", study=st.name, dest=dest)

    def _unschedule(self, st: _Study) -> None:
        if st.watch is not None and self._observer is not None:
            with contextlib.suppress(Exception):
                self._observer.unschedule(st.watch)
        st.watch = None

    def _held_back(self, study: str) -> list[Any]:
        try:
            return [h for h in self.housekeeper.held_back() if h.study == study]
        except Exception:  # noqa: BLE001 - only for the state's words
            return []

    def _latest_ingests(self, names: set[str]) -> dict[str, tuple[int, int]]:
        """(last seq, its ingest time) of each study, from the index as it is (none made here)."""
        if not names:
            return {}
        from dittohead.store.index import Index

        try:
            return Index.latest_ingests(self.root.index_path, names)
        except Exception as e:  # noqa: BLE001 - only for the state's words
            log.debug("the last ingests from the index: %s", e)
            return {}

    def _waiting(self, study: str) -> tuple[set[str], set[str]]:
        """The study's committed arrivals in its inbox, and its folders in processing/."""
        box = self.root.dropbox(study)
        inbox, processing = set(), set()
        with contextlib.suppress(OSError), os.scandir(box.inbox) as it:
            inbox = {e.name for e in it if not e.name.startswith(".")}
        with contextlib.suppress(OSError), os.scandir(box.processing) as it:
            processing = {e.name for e in it}
        return inbox, processing

    def _look(self, st: _Study, first: bool = False) -> None:
        """Whether the study has work for a worker: something its last worker did not leave
        where it is, or a held-back submission whose delay is over (and when the next is)."""
        st.next_retry = None
        if st.worker is not None:
            return
        inbox, processing = self._waiting(st.name)
        names = inbox | processing
        for gone in set(st.held) - names:
            del st.held[gone]
            self._state_dirty = True
        wall, due = time.time(), False
        for n in processing & st.left:
            at = self._retry_at(st.name, n)
            if at is not None and at <= wall:
                due = True
            elif at is not None:
                st.next_retry = at if st.next_retry is None else min(st.next_retry, at)
        if st.ready_since is None and (names - st.left or due):
            # At start, a study that a crash left something of in processing/ comes first.
            st.ready_since = 0.0 if first and processing else time.monotonic()

    def _retry_at(self, study: str, name: str) -> float | None:
        try:
            at = self.housekeeper.retry_at(study, name)
            return None if at is None else float(at)
        except Exception:  # noqa: BLE001
            return None

    def _start_workers(self, now: float) -> None:
        running = sum(st.worker is not None and not st.worker.catch_up for st in self.studies.values())
        ready = sorted((st.ready_since, st.name) for st in self.studies.values()
                       if st.ready_since is not None and st.worker is None and now >= st.not_before)
        for _, name in ready[: max(0, self.config.workers - running)]:
            self._spawn(self.studies[name])
        # An export behind the store, of a study with nothing to ingest: one such worker at a time,
        # besides the others (an export may take a while; no ingest waits for it).
        if any(st.worker is not None and st.worker.catch_up for st in self.studies.values()):
            return
        due = sorted(st.name for st in self.studies.values()
                     if st.export_due and st.worker is None and st.ready_since is None and now >= st.not_before)
        if due:
            self._spawn(self.studies[due[0]], catch_up=True)

    def _spawn(self, st: _Study, catch_up: bool = False) -> None:
        st.ready_since = None
        _, processing = self._waiting(st.name)
        wall = time.time()
        skip = sorted(n for n in processing if (at := self._retry_at(st.name, n)) is not None and at > wall)
        argv = [sys.executable, "-m", "dittohead.daemon.worker", self.root.path, st.name,
                "--max-attempts", str(self.options.max_attempts), "--log-level", str(self.options.log_level)]
        for name in skip:
            argv += ["--skip", name]
        if st.export_due:
            argv.append("--export")
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        try:
            st.worker = Worker(st.name, argv, env, self.events)
        except OSError as e:
            st.failures += 1
            st.not_before = time.monotonic() + self._backoff(st)
            st.ready_since = time.monotonic()
            self.sink.text(f"study {st.name}: cannot start a worker ({e.strerror or e}); tried again in "
                           f"{self._backoff(st):g} s", what="error", study=st.name)
            return
        st.worker.catch_up = catch_up
        st.export_due = False
        self._state_dirty = True

    @staticmethod
    def _backoff(st: _Study) -> float:
        return min(CRASH_RETRY * 2 ** max(st.failures - 1, 0), 60.0)

    # -- what workers say
    def _on_message(self, w: Worker, doc: dict[str, Any]) -> None:
        st = self.studies.get(w.study)
        if st is None:
            return
        kind = doc.get("type")
        if kind == "step":
            w.submission, w.step = str(doc.get("submission")), str(doc.get("step"))
            self._state_dirty = True
        elif kind == "result":
            self._on_result(st, doc)
        elif kind == "left":
            st.left = frozenset(str(n) for n in doc.get("names", ()))
            if doc.get("more"):
                st.ready_since = st.ready_since or time.monotonic()
        elif kind == "busy":
            st.not_before = time.monotonic() + BUSY_RETRY
            st.ready_since = st.ready_since or time.monotonic()
        elif kind == "stopped":
            w.said_stopped = True
            st.not_before = time.monotonic() + STOPPED_RETRY
            self.sink.text(f"study {st.name}: this pass stopped: {doc.get('reason')} (tried again in "
                           f"{STOPPED_RETRY:g} s)", what="error", study=st.name)
        elif kind == "export":
            w.exported = True
            if not doc.get("ok"):
                self._state_dirty = True
                self._tell(Event("export_failed", st.name, fields={
                    "dest": str(doc.get("dest") or "?"), "reason": str(doc.get("reason") or "?")}))

    def _on_result(self, st: _Study, doc: dict[str, Any]) -> None:
        name = str(doc.get("submission"))
        reason = str(doc.get("reason") or "")
        settings = self._settings(st.name)
        if doc.get("ok"):
            st.last_seq = int(doc.get("seq") or 0)
            st.last_ingest_ns = time.time_ns()
            st.held.pop(name, None)
            self._safely("housekeeping", self.housekeeper.cleared, st.name, name)
            ev = Event.ingested({**doc, "study": st.name, "submission": name, "seq": st.last_seq})
            self._tell(ev, settings)
            for more in self._safely("disks", self.monitor.check, self.store, self._all_settings()) or ():
                self._tell(more)
            self._safely("hooks", self.hooks.ingested, ev, bool((settings.hook or "").strip()))
        elif doc.get("held"):
            if not doc.get("tried"):  # left where it is: held back and not due, or behind one
                if name not in st.held:
                    st.held[name] = (reason, self._retry_at(st.name, name))
                    self.sink.text(f"waiting: {st.name}/{escape(name)}: {reason}", what="waiting", study=st.name,
                                   submission=name)
                self._state_dirty = True
                return
            retry_at = self._safely("housekeeping", self.housekeeper.held, st.name, name, reason)
            st.held[name] = (reason, retry_at)
            ev = Event("held", st.name, name, fields={"reason": reason})
            self._tell(ev, settings)
        else:
            st.held.pop(name, None)
            self._safely("housekeeping", self.housekeeper.cleared, st.name, name)
            st.failed_recent.append({"name": name, "reason": reason, "time_ns": time.time_ns()})
            self._tell(Event("rejected", st.name, name, fields={
                "reason": reason, "site": doc.get("site", ""), "user": doc.get("user", "")}), settings)
        self._state_dirty = True

    def _on_exit(self, w: Worker, code: int) -> None:
        st = self.studies.get(w.study)
        if st is None or st.worker is not w:
            return
        st.worker = None
        self._state_dirty = True
        if self._stop_signal is not None:
            return
        if w.export and not w.exported and (code == 0 or w.said_stopped):
            st.export_due = True  # it ended before the export (another ingest held the study): again
        what = f"{st.name}/{escape(w.submission)}" if w.submission else f"study {st.name}"
        if code == 0:
            st.failures = 0
        elif code < 0 or (code != 1 and not w.said_stopped):
            st.failures += 1
            st.not_before = time.monotonic() + self._backoff(st)
            if code < 0:
                try:
                    how = f"killed by {signal.Signals(-code).name}"
                except ValueError:
                    how = f"killed by signal {-code}"
            else:
                how = f"ended with exit code {code}"
            counts = ""
            if w.submission and w.step in ("taking", "committing"):
                attempts = _attempts(self.root.dropbox(st.name).processing, w.submission)
                counts = (f"; that attempt counts ({attempts} of {self.options.max_attempts})" if attempts
                          else "; past its commit point: it is finished by the next worker")
            self.sink.text(f"the worker (pid {w.pid}) at {what} died: {how}{counts}; the next one in "
                           f"{self._backoff(st):g} s", what="worker_died", study=st.name, pid=w.pid)
        if self._refresh_at is None and not os.path.isdir(self.root.dropbox(st.name).path):
            self._refresh_at = time.monotonic()
            return
        self._look(st)

    # -- telling
    def _tell(self, ev: Event, settings: StudySettings | None = None) -> None:
        self.sink.event(ev)
        if settings is None and ev.study:
            settings = self._settings(ev.study)
        self._safely("notify", self.notifier.send, ev, settings)

    def _settings(self, study: str) -> StudySettings:
        try:
            return self.root.study_settings(study)
        except (StoreError, OSError) as e:
            log.error("study %s: %s", study, e)
            return StudySettings(study)

    def _all_settings(self) -> dict[str, StudySettings]:
        return {name: self._settings(name) for name in self.studies}

    def _safely(self, what: str, fn: Any, *args: Any) -> Any:
        """A part's call; whatever it raises is one log line, never the daemon's end."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001
            log.error("%s: internal error: %s: %s", what, type(e).__name__, e)
            return None

    # -- the rescan, and SIGHUP
    def _rescan(self) -> None:
        self.last_rescan_ns = time.time_ns()
        self._next_rescan = time.monotonic() + self._rescan_seconds()
        with contextlib.suppress(Exception):
            self.store.close()  # its readers see an index rebuilt meanwhile
        self._sweep()
        self._refresh_studies()
        for ev in self._safely("housekeeping", self.housekeeper.run, self.store) or ():
            self._tell(ev)
        for ev in self._safely("disks", self.monitor.check, self.store, self._all_settings()) or ():
            self._tell(ev)
        self._take_up_hooks()
        self._state_dirty = True

    def _take_up_hooks(self) -> None:
        """The hooks recorded as due that this daemon does not run yet: at start, those a stop or
        a crash left; at a rescan, one a worker of a daemon killed before recorded since."""
        busy = {st.name for st in self.studies.values() if st.worker is not None}
        for due in self._safely("hooks", self.hooks.take_up, busy) or ():
            how = ("began before the daemon stopped or was killed, and did not finish" if due.pid is not None
                   else "had not begun when the daemon stopped or was killed")
            self.sink.text(f"study {due.study}: the hook due after #{due.seq} {how}: run now", what="hook_due",
                           study=due.study, seq=due.seq)

    def _sweep(self) -> None:
        """What ended workers left in store/tmp/, under the store's lock if it is free now."""
        from dittohead.store.ingest import sweep_tmp

        lock = FileLock(self.root.lock_path)
        try:
            lock.acquire()
        except (Held, OSError):
            return
        try:
            removed = sweep_tmp(self.root.store)
            if removed:
                log.info("store/tmp: removed what ended ingests left: %s", ", ".join(removed))
        except OSError as e:
            log.warning("store/tmp: %s", e)
        finally:
            lock.release()

    def _do_reload(self) -> None:
        self._reload = False
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            self.sink.reopen()
        except OSError as e:
            log.error("%s: cannot reopen the log file: %s", self.options.log_file, e.strerror or e)
        try:
            new = config_mod.load(self.root.path)
        except UsageError as e:
            self.sink.text(f"SIGHUP: {e}; the configuration in use stays", what="reload_failed")
        else:
            self.config = new
            self._safely("reload", self.notifier.reconfigure, new)
            self._safely("reload", self.monitor.reconfigure, new)
            self.housekeeper.config = new
            self.hooks.timeout = new.hook_timeout_seconds
            self._next_rescan = min(self._next_rescan, time.monotonic() + self._rescan_seconds())
            self._state_dirty = True
            self.sink.text(f"SIGHUP: {config_mod.config_path(self.root.path)} read again (a rescan every "
                           f"{self._rescan_seconds():g} s; up to {new.workers} workers)", what="reloaded")
        sd_notify("READY=1")

    # -- state.json
    def _write_state(self, force: bool = False, stopped: bool = False) -> None:
        now = time.monotonic()
        if not force and (not self._state_dirty or now - self._state_written < STATE_EVERY):
            return
        self._state_dirty = False
        self._state_written = now
        try:
            pending = self.notifier.pending()
        except Exception:  # noqa: BLE001
            pending = 0
        doc = {
            "pid": os.getpid(), "started_ns": self.started_ns, "updated_ns": time.time_ns(),
            "stopped_ns": time.time_ns() if stopped else None, "last_rescan_ns": self.last_rescan_ns,
            "rescan_seconds": self._rescan_seconds(), "workers_max": self.config.workers,
            "notifications_pending": pending,
            "workers": [{"pid": st.worker.pid, "study": st.name, "submission": st.worker.submission,
                         "step": st.worker.step, "started_ns": st.worker.started_ns}
                        for st in self.studies.values() if st.worker is not None],
            "studies": {st.name: {
                "last_ingest_ns": st.last_ingest_ns, "last_seq": st.last_seq,
                "processing": [st.worker.submission] if st.worker is not None and st.worker.submission else [],
                "held": [{"name": n, "reason": r, "retry_at": at} for n, (r, at) in sorted(st.held.items())],
                "failed_recent": list(st.failed_recent)} for st in self.studies.values()},
        }
        data = json.dumps(doc, ensure_ascii=True, indent=1).encode() + b"\n"
        try:  # what status shows: a crash may leave an older one, never a torn one
            fsutil.replace_file(config_mod.state_path(self.root.path), data, durable=False)
        except OSError as e:
            log.warning("%s: cannot write it: %s", config_mod.state_path(self.root.path), e.strerror or e)


def _attempts(processing: str, name: str) -> int:
    """The attempts counted in processing/NAME/STATE (0 if it cannot be read)."""
    try:
        doc = json.loads(fsutil.read_limited(os.path.join(processing, name, "STATE"), 4096))
        return int(doc["attempts"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _watchdog_interval() -> float:
    """Half of systemd's ``WatchdogSec`` for this process (``$WATCHDOG_USEC``), or 0."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
        pid = int(os.environ.get("WATCHDOG_PID", str(os.getpid())))
    except ValueError:
        return 0.0
    return usec / 2e6 if usec > 0 and pid == os.getpid() else 0.0


def run(options: DaemonOptions) -> int:
    return Daemon(options).run()


__all__ = ["Daemon", "DaemonOptions", "LogSink", "run", "sd_notify"]
