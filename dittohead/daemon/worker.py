"""The watcher's worker: one study's next submission, ingested in a process of its own.

``dittohead watch`` (the daemon, ``watcher``) starts ``python -m dittohead.daemon.worker ROOT
STUDY`` for each submission, so that whatever an ingest meets, a crash of the interpreter, the
kernel's out-of-memory killer or a SIGKILL, ends this process and never the daemon: the
attempt the worker died in is counted in the submission's ``processing/NAME/STATE`` (after
``--max-attempts`` of them it is set aside), and the daemon starts the next worker.

A worker takes the study's lock (``store.ingest.StudyLock``; without waiting: if another ingest
holds it, a ``watch --once``, it says "busy" and ends), finishes what a crash left of the study
in ``processing/`` first, then takes the study's next submission in the order of arrival and
ingests it (``Ingestor.run_study`` with ``limit`` 1): verified with the store only read, then
committed under the store's lock, for a moment. If the study has a hook, the worker records it
as due (``hooks.record_due``, in ROOT/daemon/hooks/) before it reports the ingest, so that the
hook is not lost to a daemon killed meanwhile. It then exports the study if it has an export
destination and gained the submission, or if the daemon asked for the export (``--export``: at
its start the daemon found the study's export behind the store, ``export_behind``), and ends.

It tells the daemon what happens in JSON lines on its standard output (the file descriptor it
had as stdout; anything else printed goes to its standard error, which the daemon logs):

    {"type": "step", "submission": NAME, "step": "taking" | "committing" | "finishing"}
    {"type": "result", "study", "submission", "ok", "held", "tried", "seq", "files",
     "new_versions", "new_chunk_bytes", "reason", "site", "user", "host"}
    {"type": "left", "names": [...], "more": bool}   at its end: left untouched; more waiting
    {"type": "busy"}                                  another ingest holds the study's lock
    {"type": "stopped", "reason": ...}                the server's own trouble ended it (a full
                                                      disk, the store's lock not had in time)
    {"type": "export", "ok": bool, "dest", "reason"}  after the study's export (reason: why not ok)

Signals: SIGTERM (or SIGINT) stops it. Outside a commit it stops at once: the attempt at the
submission in hand ends, its copies go, and it does not count (exit 75). During a commit (from
the store's lock taken to the receipt written) the stop waits for the commit to end; the worker
then ends without exporting (exit 0); so does a worker stopped or killed during its export. The
daemon's next start finds that export behind the store and has it done (``export_behind``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Iterator
from typing import Any

from dittohead.errors import DittoheadError

log = logging.getLogger(__name__)

EXIT_STOPPED = 75  # stopped by a signal outside a commit: the attempt did not count
COMMIT_WAIT = 600.0  # seconds a verified submission waits for the store's lock before giving up


class _Channel:
    """JSON lines to the daemon; a daemon that is gone (killed alone) makes them go nowhere,
    and the worker finishes its submission all the same."""

    def __init__(self, fd: int) -> None:
        self._f = os.fdopen(fd, "w", buffering=1, encoding="utf-8")
        self._ok = True

    def send(self, **doc: Any) -> None:
        if not self._ok:
            return
        try:
            self._f.write(json.dumps(doc, ensure_ascii=True) + "\n")
            self._f.flush()
        except (OSError, ValueError):
            self._ok = False


class _StopGuard:
    """SIGTERM and SIGINT: ``Stopped`` at once outside a commit; during one, a note that the
    worker ends once it is done (``critical``)."""

    def __init__(self) -> None:
        self.depth = 0
        self.requested = False
        self._raised = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: object) -> None:
        from dittohead.store.ingest import Stopped

        self.requested = True
        if self.depth == 0 and not self._raised:
            self._raised = True
            raise Stopped(signum)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dittohead.daemon.worker",
                                     description="One submission's ingest, for dittohead watch (internal).")
    parser.add_argument("root")
    parser.add_argument("study")
    parser.add_argument("--max-attempts", type=int, required=True)
    parser.add_argument("--skip", action="append", default=[], metavar="NAME",
                        help="a held-back submission not to try again yet")
    parser.add_argument("--log-level", type=int, default=logging.WARNING)
    parser.add_argument("--export", action="store_true",
                        help="export the study even if this run ingests nothing (its export is behind)")
    args = parser.parse_args(argv)

    guard = _StopGuard()
    guard.install()
    # The messages keep the descriptor stdout was; print and click.echo write to stderr instead.
    channel = _Channel(os.dup(1))
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=args.log_level, format="dittohead: %(message)s", stream=sys.stderr)

    from dittohead.store.ingest import Ingestor, IngestResult, Stopped
    from dittohead.store.repo import Store

    def step(name: str, what: str) -> None:
        channel.send(type="step", submission=name, step=what)

    def report(r: IngestResult) -> None:
        doc = dataclasses.asdict(r)
        if r.ok:
            _record_hook(store, doc)
        channel.send(type="result", **doc)

    try:
        store = Store.open(args.root)
    except (DittoheadError, OSError) as e:
        channel.send(type="stopped", reason=_why(e))
        return 1
    ingestor = Ingestor(store, max_attempts=args.max_attempts, commit_wait=COMMIT_WAIT, critical=guard.critical)
    try:
        run = ingestor.run_study(args.study, skip=args.skip, limit=1, progress=step, on_result=report)
        if run is None:
            channel.send(type="busy")
            return 0
        for r in run.results:
            if r.held:
                report(r)
        channel.send(type="left", names=run.left, more=run.more)
        if guard.requested:
            return 0
        if args.export or any(r.ok for r in run.results):
            failed = _export(store, args.study)
            channel.send(type="export", ok=failed is None, dest=store.root.study_settings(args.study).export,
                         reason=failed)
        return 0
    except Stopped:
        return EXIT_STOPPED
    except (DittoheadError, OSError, sqlite3.Error) as e:
        channel.send(type="stopped", reason=_why(e))
        return 1
    finally:
        ingestor.close()
        store.close()


def _record_hook(store: Any, doc: dict[str, Any]) -> None:
    """The study's hook, recorded as due after the ingest ``doc`` if the study has one; a record
    that cannot be written is one line (the daemon then records it itself)."""
    from dittohead.daemon.events import Event
    from dittohead.daemon.hooks import record_due

    try:
        hook = store.root.study_settings(doc["study"]).hook
        if hook and hook.strip():
            record_due(store.root.path, Event.ingested(doc))
    except (DittoheadError, OSError) as e:
        log.error("study %s: cannot record the hook due after #%s: %s", doc["study"], doc["seq"], _why(e))


def _export(store: Any, study: str) -> str | None:
    """The study's export, as ``watch --once`` does it (its lines on stderr); why it failed, or
    None."""
    from dittohead.cli.admin import _export_studies

    return _export_studies(store, {study}).get(study)


def export_behind(store: Any, study: str, dest: str, last_seq: int) -> str | None:
    """Why the export of ``study`` into ``dest`` is behind a store that holds its submissions
    through ``last_seq``, or None if it is not (or there is nothing to export yet).

    The export remembers its last clean run in this account's state folder (``export``'s
    ``_LastExport``: the last submission written, and DEST's folders as it left them); a run
    that was stopped, killed or failed leaves no such record. So this costs one small file read
    and four stats of DEST, whatever the study's size."""
    from dittohead.export import last_clean_export

    if last_seq <= 0:
        return None
    try:
        done = last_clean_export(store, study, dest)
    except FileNotFoundError:
        return "not exported yet"
    except OSError as e:
        return f"cannot open it: {e.strerror or e}"
    if done is None:
        return "its last export did not end clean, or DEST changed since"
    if done < last_seq:
        return f"exported through #{done}, ingested through #{last_seq}"
    return None


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror}"
    return str(e) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
