"""``dittohead status``: what waits, what is held back or failed, and whether the daemon runs.

Everything comes from a few small reads, never a scan of the store: per study, a listing of
its inbox (committed entries, by ``lstat``), of ``processing/`` and of ``failed/`` (the last
five, with their REASON), the held-back delays in ``ROOT/daemon/held.json`` and the last ingest
from the index; for the daemon, ``ROOT/daemon/state.json`` (written by the daemon), whether its
process is alive, and the notices in ``ROOT/daemon/outbox/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from typing import Any

import click

from dittohead import format as fmt
from dittohead import fsutil
from dittohead.cli.base import json_option, print_json, store_option
from dittohead.daemon.config import STATE_NAME, daemon_dir, state_path
from dittohead.daemon.housekeeping import ABANDONED_PREFIX, HeldBack, load_held
from dittohead.daemon.notify import OUTBOX
from dittohead.display import escape
from dittohead.store.intake import arrivals
from dittohead.store.layout import ServerRoot, StudyDropbox
from dittohead.units import plural, utc_iso

FAILED_SHOWN = 5
START_SLACK = 5.0  # seconds: a process started this much later than the daemon is another one


def _ago(ns: int | None, now_ns: int) -> str:
    from dittohead.client.sync import ago

    return ago((now_ns - ns) / 1e9) if ns else "never"


def _read_json(path: str) -> Any:
    try:
        return json.loads(fsutil.read_limited(path, 1 << 20))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return {"error": f"cannot read it ({e})"}


def _started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _alive(pid: int, started_ns: int | None) -> bool:
    """Whether the daemon's process ``pid`` still runs (not another that took its number)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another account's process: there
    began = _started(pid)
    return began is None or not started_ns or began <= started_ns / 1e9 + START_SLACK


def daemon_status(root: ServerRoot) -> dict:
    doc = _read_json(state_path(root.path))
    outbox = 0
    with contextlib.suppress(OSError), os.scandir(os.path.join(daemon_dir(root.path), OUTBOX)) as it:
        outbox = sum(1 for e in it if not e.name.startswith("."))
    out: dict[str, Any] = {"state_file": doc is not None, "running": False, "pid": None, "started_ns": None,
                           "stopped_ns": None, "last_rescan_ns": None, "notifications_pending": None,
                           "outbox": outbox}
    if isinstance(doc, dict) and "error" in doc and "pid" not in doc:
        out["error"] = doc["error"]
    elif isinstance(doc, dict):
        pid, started = doc.get("pid"), doc.get("started_ns")
        out.update(pid=pid if isinstance(pid, int) else None, started_ns=started if isinstance(started, int) else None,
                   stopped_ns=doc.get("stopped_ns"), last_rescan_ns=doc.get("last_rescan_ns"),
                   notifications_pending=doc.get("notifications_pending"))
        out["running"] = (not out["stopped_ns"] and out["pid"] is not None and out["pid"] > 0
                          and _alive(out["pid"], out["started_ns"]))
        out["studies"] = doc.get("studies") if isinstance(doc.get("studies"), dict) else {}
    return out


def study_status(root: ServerRoot, study: str, held: list[HeldBack], last: tuple[int, int] | None) -> dict:
    """One study: its inbox's committed entries (oldest first, by arrival: the ingest's order),
    processing/, the held-back ones, failed/, the submissions set aside, the last ingest."""
    box = root.dropbox(study)
    waiting = arrivals(box.inbox)
    held_names = {h.submission for h in held}
    processing = sorted(n for n in _listdir(box.processing) if n not in held_names)
    return {
        "name": study,
        "waiting": {"count": len(waiting), "oldest_ns": waiting[0][0] if waiting else None,
                    "names": [escape(n) for _, n in waiting[:20]]},
        "processing": [escape(n) for n in processing],
        "held": [{"submission": h.submission, "reason": h.reason, "attempts": h.attempts,
                  "since_ns": int(h.since * 1e9), "retry_at_ns": int(h.retry_at * 1e9)} for h in held],
        **_failed(box),
        "abandoned": sum(1 for n in _listdir(box.inbox) if n.startswith(ABANDONED_PREFIX)),
        "last_ingest": {"seq": last[0], "time_ns": last[1]} if last and last[0] else None,
    }


def _shown(text: str) -> str:
    """A reason the daemon wrote (names in it escaped already) as it is, unless it holds
    something a terminal should not be given."""
    return text if text.isprintable() else escape(text)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _failed(box: StudyDropbox) -> dict:
    """How many submissions were rejected (``failed_total``), and the last FAILED_SHOWN of them
    (``failed``), newest last, by the time they moved to failed/."""
    found = []
    for name in _listdir(box.failed):
        with contextlib.suppress(OSError):
            found.append((os.lstat(os.path.join(box.failed, name)).st_ctime_ns, name))
    out = []
    for ns, name in sorted(found)[-FAILED_SHOWN:]:
        try:
            text = fsutil.read_limited(os.path.join(box.failed, name, fmt.REASON_NAME), 4096)
            reason = text.decode("utf-8", "replace").strip().removeprefix("rejected: ").splitlines()[0]
        except (OSError, ValueError, IndexError):
            reason = "(no REASON)"
        out.append({"name": _shown(name), "reason": _shown(reason), "time_ns": ns})
    return {"failed": out, "failed_total": len(found)}


def _last_ingests(root: ServerRoot, studies: list[str]) -> tuple[dict[str, tuple[int, int]], str | None]:
    """Each study's last ingest, and why the index could not tell (None: it could). No index
    is a fresh server's, where nothing was ingested yet: no reason to warn, unless a study has
    a log (then the index was lost, and "nothing ingested yet" would be wrong)."""
    from dittohead.store.index import Index

    if not os.path.lexists(root.index_path) and _has_logs(root):
        return {}, "the index is missing, though the store holds ingests (the next ingest, or 'dittohead fsck', rebuilds it)"
    try:
        return Index.latest_ingests(root.index_path, studies), None
    except (OSError, sqlite3.Error) as e:
        return {}, f"the index cannot be read ({e})"


def _has_logs(root: ServerRoot) -> bool:
    """Whether any study has a log in the store: a record in store/studies/NAME/, or a log of
    dittohead 0.2 (NAME.log). A fresh server has only the studies' settings (NAME.json) there."""
    studies = os.path.join(root.store, "studies")
    try:
        with os.scandir(studies) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    except OSError:
        return False
    for name, is_dir in entries:
        if name.endswith(".log"):
            return True
        if is_dir:
            with contextlib.suppress(OSError), os.scandir(os.path.join(studies, name)) as records:
                if any(e.name.endswith(fmt.LOG_RECORD_SUFFIX) for e in records):
                    return True
    return False


def status_doc(root_path: str, now_ns: int | None = None) -> dict:
    root = ServerRoot(root_path)
    root.config()  # a server root this account can read, or one clear line
    now_ns = now_ns or time.time_ns()
    studies = root.studies()
    held = load_held(root.path)
    last, index_error = _last_ingests(root, studies)
    doc: dict[str, Any] = {"root": root.path, "time_ns": now_ns, "daemon": daemon_status(root),
                           "studies": [study_status(root, s, [h for k, h in sorted(held.items()) if k[0] == s],
                                                    last.get(s)) for s in studies]}
    if index_error:
        doc["index_error"] = index_error
    return doc


def _daemon_line(d: dict, now_ns: int) -> str:
    pending = d["notifications_pending"]
    notices = (f"{plural(pending, 'notification')} pending" if isinstance(pending, int)
               else "notifications pending unknown")
    outbox = f", {plural(d['outbox'], 'notice')} in the outbox" if d["outbox"] else ""
    if not d["state_file"]:
        return f"daemon: not running (it has never run here: no daemon/{STATE_NAME}){outbox}"
    if "error" in d:
        return f"daemon: daemon/{STATE_NAME}: {d['error']}{outbox}"
    since = utc_iso(d["started_ns"]) if d["started_ns"] else "an unknown time"
    rescan = f"last rescan {_ago(d['last_rescan_ns'], now_ns)}" if d["last_rescan_ns"] else "no rescan yet"
    if d["running"]:
        return f"daemon: running since {since} (pid {d['pid']}); {rescan}; {notices}{outbox}"
    if isinstance(d["stopped_ns"], int) and d["stopped_ns"]:
        return (f"daemon: not running (stopped at {utc_iso(d['stopped_ns'])}, after running since {since}); "
                f"{notices}{outbox}")
    return f"daemon: NOT RUNNING (last seen as pid {d['pid']}, started {since}; {rescan}); {notices}{outbox}"


def _study_lines(s: dict, now_ns: int) -> list[str]:
    w = s["waiting"]
    parts = [f"{w['count']} waiting" + (f" (oldest arrived {_ago(w['oldest_ns'], now_ns)})" if w["count"] else ""),
             f"{len(s['processing'])} in processing", f"{len(s['held'])} held back",
             f"{s['failed_total']} failed"]
    li = s["last_ingest"]
    last = f"last ingest #{li['seq']} at {utc_iso(li['time_ns'])} ({_ago(li['time_ns'], now_ns)})" if li \
        else "nothing ingested yet"
    if s["abandoned"]:
        parts.append(f"{plural(s['abandoned'], 'abandoned upload')} set aside in the inbox")
    lines = [f"study {s['name']}: {', '.join(parts)}; {last}"]
    lines += [f"  in processing: {n}" for n in s["processing"]]
    for h in s["held"]:
        left = (h["retry_at_ns"] - now_ns) / 1e9
        when = "at the next pass" if left <= 0 else f"in {int(left)} s" if left < 120 else f"in {int(left // 60)} min"
        lines.append(f"  held back: {h['submission']} (attempt {h['attempts']}; next retry {when}): "
                     f"{_shown(h['reason'])}")
    lines += [f"  failed: {f['name']} ({utc_iso(f['time_ns'])}): {f['reason']}" for f in s["failed"]]
    return lines


@click.command()
@store_option
@json_option
def status(store: str, as_json: bool) -> None:
    """What waits in each study's inbox, what is in processing, held back or failed lately, the
    last ingest; and the daemon's state (running since, last rescan, notifications pending).

    Run it as the daemon's account (it reads the store's index and the daemon's state).
    """
    doc = status_doc(store)
    if as_json:
        print_json(doc)
        return
    now_ns = doc["time_ns"]
    click.echo(_daemon_line(doc["daemon"], now_ns))
    if doc.get("index_error"):
        click.echo(f"warning: {doc['index_error']}: last ingests not shown", err=True)
    if not doc["studies"]:
        click.echo("no studies (add one with 'dittohead study add')")
    for s in doc["studies"]:
        for line in _study_lines(s, now_ns):
            click.echo(line)
