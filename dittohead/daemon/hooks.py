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
event with its status and the last lines of its output, escaped. Nothing here writes anything
but the hook's standard input: a hook's failure never touches the store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import shlex
import signal
import sqlite3
import subprocess
import time

from dittohead.daemon.config import daemon_dir
from dittohead.daemon.events import Event
from dittohead.display import escape, json_path
from dittohead.store.layout import ServerRoot, StudySettings

log = logging.getLogger(__name__)

PATH = "/usr/local/bin:/usr/bin:/bin"
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL at the time-out
EXIT_GRACE = 1.0  # seconds the output is still read after the hook exited (a child may hold it)
OUTPUT_KEPT = 64 * 1024  # bytes of output kept, the last ones
OUTPUT_LINES = 20  # lines of output in the event
OUTPUT_CHARS = 4000


def run_hook(settings: StudySettings, event: Event, timeout: float, *, root: str | None = None) -> Event | None:
    """Run the hook of ``settings`` for the ``ingested`` ``event``; None if it succeeded (or the
    study has none), else a ``hook_failed`` event. ``root`` is the server root (else the event's
    field ``store``)."""
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
        tail, timed_out = _communicate(proc, lines, deadline)
        if not timed_out:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
        if timed_out:
            _kill_group(proc)
    finally:
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        if proc.returncode is None:
            _kill_group(proc)
    output = _last_lines(tail)
    if timed_out:
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


def _communicate(proc: subprocess.Popen, data: bytes, deadline: float) -> tuple[bytes, bool]:
    """Write ``data`` to the hook's standard input and read its output (the last OUTPUT_KEPT
    bytes kept) until it closes, or until EXIT_GRACE after the hook exited (a child it left
    behind may hold the pipe), or the deadline. Returns (output, timed out)."""
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
                return bytes(tail), True
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > EXIT_GRACE:
                break
            for key, _ in sel.select(min(deadline - now, 0.2)):
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
    return bytes(tail), False


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
