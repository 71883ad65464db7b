"""Admin commands: init, study add, study set, watch, fsck."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import click

from dittohead.cli.base import (
    echo_export_problems,
    json_option,
    open_store,
    print_json,
    progress_enabled,
    store_option,
)
from dittohead.errors import EXIT_DAMAGE, EXIT_FAILURE, DittoheadError, UsageError
from dittohead.store.layout import (
    MAX_ATTEMPTS,
    ServerRoot,
    StudySettings,
    check_study_name,
    group_id,
    is_member,
)
from dittohead.units import human_bytes, plural

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from dittohead.store.ingest import Ingestor, IngestResult
    from dittohead.store.repo import Store


@click.command()
@store_option
def init(store: str) -> None:
    """Create a server root: the store (0700) and the drop-box tree, with the permission model."""
    cfg = ServerRoot(store).init()
    click.echo(f"initialised server root {store} (store {cfg.store_id}, format {cfg.version})")


@click.group()
def study() -> None:
    """Manage studies (each has its own drop box and history)."""


_READERS_HELP = ("Members of GROUP read the study's view: its folder in the mount (everyone else gets "
                 "'permission denied') and what export writes (folders setgid GROUP 2750, files 0440). "
                 "Export gives its files GROUP, so the account that exports (the daemon's) must be a "
                 "member of it. Default: everyone who can reach the mount or the export reads it.")


def _check_export_dest(export_to: str) -> str:
    export_to = os.path.abspath(export_to)
    if not os.path.isdir(os.path.dirname(export_to)):
        raise click.BadParameter(f"{os.path.dirname(export_to)}: no such folder (the export's "
                                 "parent must exist; the export makes DEST itself)", param_hint="'--export'")
    return export_to


def _note_membership(readers: str | None) -> None:
    """A note on stderr where this account could not give an export's files to ``readers``."""
    if readers and not is_member(group_id(readers)):
        click.echo(f"note: this account is not a member of group {readers}: export needs it to give the "
                   f"study's files that group (usermod -aG {readers} ACCOUNT, then sign in again)", err=True)


@study.command("add")
@click.argument("name")
@store_option
@click.option("--export", "export_to", metavar="DEST", type=click.Path(file_okay=False),
              help="After each ingest, watch exports the study's view into DEST (adding only).")
@click.option("--notify", multiple=True, metavar="ADDR",
              help="Where watch sends this study's notices: an e-mail address or an Apprise URL (repeatable).")
@click.option("--notify-success", is_flag=True,
              help="Also send a notice for each ingest (who, from which site, files, bytes).")
@click.option("--quota", metavar="SIZE", help="Notify when the study holds more than SIZE in the store (e.g. 500G).")
@click.option("--hook", metavar="COMMAND",
              help="A command watch runs after each ingest of the study (docs/watch-housekeeping.md).")
@click.option("--uploaders", metavar="GROUP",
              help="Only members of GROUP may submit to this study (its drop box is closed to everyone "
                   "else). The daemon's account must be a member of GROUP. Default: any account that "
                   "can reach the server root.")
@click.option("--readers", metavar="GROUP", help=_READERS_HELP)
def study_add(name: str, store: str, export_to: str | None, notify: tuple[str, ...], notify_success: bool,
              quota: str | None, hook: str | None, uploaders: str | None, readers: str | None) -> None:
    """Add study NAME: creates dropbox/NAME/ with inbox, have, receipts, processing, done, failed.

    Run it as the daemon's account, like init. See docs/server-root.md for the permission model;
    'study set' changes --uploaders, --readers, --export and the rest later.
    """
    check_study_name(name)
    if export_to:
        export_to = _check_export_dest(export_to)
    box = ServerRoot(store).add_study(StudySettings(
        name, export_to, notify, uploaders, readers, notify_success,
        _size(quota, "--quota") if quota else None, _check_hook(hook) if hook else None))
    who = f"members of group {uploaders}" if uploaders else "collectors"
    click.echo(f"added study {name}: {who} sync into {box.inbox}"
               + (f"; members of group {readers} read it" if readers else ""))
    _note_membership(readers)


@study.command("set")
@click.argument("name")
@store_option
@click.option("--readers", metavar="GROUP", help=_READERS_HELP)
@click.option("--no-readers", is_flag=True, help="Let everyone who can reach the mount or the export read the study.")
@click.option("--export", "export_to", metavar="DEST", type=click.Path(file_okay=False),
              help="After each ingest, watch exports the study's view into DEST (adding only).")
@click.option("--no-export", is_flag=True, help="watch no longer exports the study (what is in DEST stays).")
@click.option("--notify", multiple=True, metavar="ADDR",
              help="Where watch sends this study's notices: an e-mail address or an Apprise URL "
                   "(repeatable; replaces the list). --notify '' empties it.")
@click.option("--notify-success/--no-notify-success", default=None,
              help="Also send a notice for each ingest (who, from which site, files, bytes).")
@click.option("--quota", metavar="SIZE",
              help="Notify when the study holds more than SIZE in the store (e.g. 500G); 'none' removes it.")
@click.option("--hook", metavar="COMMAND",
              help="A command watch runs after each ingest of the study (docs/watch-housekeeping.md); "
                   "'' removes it.")
@click.option("--uploaders", metavar="GROUP",
              help="From now on only members of GROUP may submit to the study: its drop box folder gets "
                   "group GROUP and mode 0710, as 'study add --uploaders' gives it. The daemon's account must "
                   "be a member of GROUP. '' lets any account that can reach the server root submit (0711).")
def study_set(name: str, store: str, readers: str | None, no_readers: bool, export_to: str | None,
              no_export: bool, notify: tuple[str, ...], notify_success: bool | None, quota: str | None,
              hook: str | None, uploaders: str | None) -> None:
    """Change the settings of study NAME: who uploads to it, who reads it, where watch exports
    it, whom it notifies, its quota and its hook.

    The mount shows a change within seconds, without a remount. An export already written
    takes the new group and modes at the next 'dittohead export --verify' (the next export
    gives them to what it adds). After a change of uploaders, no member of the old group can
    begin an upload (a sync already running may finish; what was committed is ingested).
    Without options, prints the study's settings.
    """
    if readers is not None and no_readers:
        raise UsageError("--readers and --no-readers: give one of them")
    if export_to is not None and no_export:
        raise UsageError("--export and --no-export: give one of them")
    changes: dict[str, str | None] = {}
    if readers is not None or no_readers:
        changes["readers"] = readers or None
    if export_to is not None or no_export:
        changes["export"] = _check_export_dest(export_to) if export_to else None
    if uploaders is not None:
        changes["uploaders"] = uploaders or None
    more: dict[str, object] = {}
    if notify:
        more["notify"] = tuple(a for a in notify if a)
    if notify_success is not None:
        more["notify_success"] = notify_success
    if quota is not None:
        more["quota"] = None if quota.lower() == "none" else _size(quota, "--quota")
    if hook is not None:
        more["hook"] = _check_hook(hook) if hook else None
    changes.update(more)  # type: ignore[arg-type]
    from dittohead.daemon.notify import printed

    root = ServerRoot(store)
    if changes:
        s = root.change_study(name, **changes)
    else:
        root.config()
        root.require_study(name)
        s = root.study_settings(name)
    click.echo(f"study {name}: readers {s.readers or '(everyone)'}; uploaders {s.uploaders or '(everyone)'}; "
               f"export {s.export or '(none)'}; notify {', '.join(map(printed, s.notify)) or '(nobody)'}"
               f"{' (also of each ingest)' if s.notify_success else ''}; "
               f"quota {human_bytes(s.quota) if s.quota is not None else '(none)'}; hook {s.hook or '(none)'}")
    if "readers" in changes:
        _note_membership(s.readers)


def _check_hook(hook: str) -> str:
    import shlex

    try:
        if not shlex.split(hook):
            raise ValueError("empty")
    except ValueError as e:
        raise UsageError(f"--hook: not a command line ({e})") from None
    return hook


def _size(text: str, option: str) -> int:
    """A size in bytes: 123, 500M, 2G, 1.5T (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = float(num)
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not a size (e.g. 500G)") from None
    if value < 0:
        raise UsageError(f"{option}: {text!r} is not a size (e.g. 500G)")
    return int(value * units[unit])


def _report(r: IngestResult) -> None:
    if r.ok:
        click.echo(f"ingested {r.study}/{r.submission} as #{r.seq}: {plural(r.files, 'file')}, "
                   f"{plural(r.new_versions, 'new version')}, {human_bytes(r.new_chunk_bytes)} new")
    else:
        click.echo(f"rejected {r.study}/{r.submission}: {r.reason}", err=True)


@click.command()
@store_option
@click.option("--once", is_flag=True, help="Ingest what is committed now, then exit.")
@click.option("--interval", default=None, metavar="SECONDS", type=click.FloatRange(min=0.1),
              help="Without --once: seconds between two full rescans of every inbox (default: "
                   "rescan_seconds in ROOT/daemon/watch.json, 60); new submissions are seen at once "
                   "through inotify.")
@click.option("--max-attempts", default=MAX_ATTEMPTS, show_default=True, type=click.IntRange(min=1),
              help="Set a submission aside (rejected, with that reason) once the daemon or its worker has "
                   "died (killed, out of memory) during this many attempts at it.")
@click.option("--log-file", metavar="FILE", type=click.Path(dir_okay=False),
              help="Without --once: append the daemon's log to FILE (reopened on SIGHUP) instead of stderr.")
@click.option("--log-json", is_flag=True, help="Without --once: log one JSON object a line (for log shippers).")
@click.option("--check-config", is_flag=True,
              help="Check ROOT/daemon/watch.json (mode 0600, known keys, good values) and every study's "
                   "notification addresses and hook, as the daemon reads them; print one line per problem "
                   "(passwords masked), or one OK line. Exit 0 if all is good, 1 if not. Starts no daemon, "
                   "takes no lock, writes and sends nothing.")
def watch(store: str, once: bool, interval: float | None, max_attempts: int, log_file: str | None,
          log_json: bool, check_config: bool) -> None:
    """Ingest committed submissions into the store (the server's daemon).

    Each submission is verified whole, then added in one commit; a bad one goes to
    dropbox/NAME/failed/ with a REASON file and changes nothing. One that cannot be verified
    because of damage in the store is held back for a later try, not rejected (run fsck
    --read-data). With --once, exits 1 if any submission was rejected or held back, or an
    export failed, and 4 if another ingest kept a study's lock for 30 s (that study is left to it).

    Without --once it runs until stopped (docs/watch.md): it sees a commit at once (inotify on
    every inbox, new studies included) and rescans every inbox every --interval seconds; each
    submission is ingested by a worker process of its own, studies side by side; it logs one
    line per event, notifies (ROOT/daemon/watch.json, study set --notify) and runs hooks;
    ROOT/daemon/state.json says what it does (dittohead status). One daemon per server root
    (a second exits 4, naming the pid that runs).

    SIGTERM or SIGINT: a commit in hand is finished, a submission being verified is left for
    the next start (its attempt does not count); exits 0 (130 for SIGINT) within 30 seconds.
    SIGHUP: reads ROOT/daemon/watch.json again (a bad file: one log line, the old settings
    stay) and reopens --log-file. Under systemd, Type=notify works (READY=1, WATCHDOG=1).

    With --check-config it only checks what the daemon would read (watch.json, the studies'
    notification addresses and hooks) and exits: run it after editing watch.json, before
    'systemctl reload dittohead-watch'.
    """
    if check_config:
        if once or interval is not None or log_file or log_json:
            raise UsageError("--check-config runs alone: without --once, --interval, --log-file or --log-json")
        _check_config(store)
        return
    if not once:
        from dittohead.daemon.watcher import Daemon, DaemonOptions

        level = logging.getLogger().getEffectiveLevel()
        options = DaemonOptions(ServerRoot(store).path, max_attempts, interval, log_file, log_json, level)
        raise click.exceptions.Exit(Daemon(options).run())
    if log_file or log_json:
        raise UsageError("--log-file and --log-json are for the daemon (watch without --once)")
    root = ServerRoot(store)
    root.config()  # a usable server root, or a clear error
    if not root.has_work():  # the common case for a timer-driven --once: answer fast
        click.echo("watch: nothing to ingest")
        return
    from dittohead.store.ingest import Ingestor

    st = open_store(store)
    ingestor = Ingestor(st, max_attempts=max_attempts)
    results, failed_exports = _ingest_and_export(st, ingestor)
    if not results:
        click.echo("watch: nothing to ingest")
    if any(not r.ok for r in results) or failed_exports:
        raise click.exceptions.Exit(EXIT_FAILURE)


def _check_config(store: str) -> None:
    """``watch --check-config``: each problem on stderr, one line each; or the OK line."""
    from dittohead.daemon.check import check

    root = ServerRoot(store)
    found = check(root.path)
    for line in found.problems:
        click.echo(line, err=True)
    if found.problems:
        raise click.exceptions.Exit(EXIT_FAILURE)
    click.echo(found.summary(root.path))


def _ingest_and_export(st: Store, ingestor: Ingestor) -> tuple[list[IngestResult], set[str]]:
    """One pass: ingest, then export each study that gained a submission and has a destination,
    also when the pass stops part-way (a full disk): what was ingested before is exported.
    An export that fails is reported in one line and leaves the ingest as it is (the next one
    tries again: an export adds what is missing); returns the studies whose export failed."""
    ingested: set[str] = set()

    def seen(r: IngestResult) -> None:
        _report(r)
        if r.ok:
            ingested.add(r.study)

    try:
        results = ingestor.run_once(seen)
    finally:
        failed = set(_export_studies(st, ingested))
    return results, failed


def _export_studies(st: Store, studies: set[str]) -> dict[str, str]:
    """Export each of ``studies`` that has a destination, saying so on stdout and stderr; the
    studies whose export failed, each with its reason in a line."""
    from dittohead.export import export_study

    failed = {}
    for name in sorted(studies):
        dest = st.root.study_settings(name).export
        if not dest:
            continue
        try:
            summary = export_study(st, name, dest)
        except (OSError, DittoheadError) as e:
            why = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
            click.echo(f"watch: study {name} is ingested, but its export to {dest} failed: {why} (the "
                       "daemon tries again when it starts and after the study's next ingest; or run "
                       "'dittohead export')", err=True)
            failed[name] = why
            continue
        click.echo(summary.line(dest))
        if echo_export_problems(name, summary):
            failed[name] = (f"{len(summary.damaged)} version(s) damaged in the store left out "
                            "(run 'dittohead fsck --read-data')")
    return failed


@click.command()
@store_option
@click.option("--read-data", is_flag=True, help="Also read every chunk and check it against its id.")
@json_option
def fsck(store: str, read_data: bool, as_json: bool) -> None:
    """Check the store's integrity; exit 3 if anything is damaged.

    Always: pack trailers, study logs, manifests (every chunk present, right length), the index
    (rebuilt if it disagrees), and the permission model: every folder's mode, owner and group as
    init and study add set them (a difference counts as damage: exit 3). With --read-data: every stored byte, as the disk
    holds it (the system's cached copy of each pack is dropped first, where it allows).
    """
    from dittohead.store import fsck as fsck_mod

    st = open_store(store)
    bar = None
    checker = fsck_mod.Checker(st, read_data=read_data)
    if read_data and progress_enabled() and not as_json:
        from tqdm import tqdm

        bar = tqdm(total=checker.data_size(), unit="B", unit_scale=True, unit_divisor=1024, desc="fsck", leave=False)
        checker.progress = bar.update
    t0 = time.monotonic()
    try:
        findings = list(checker.run())
    finally:
        if bar:
            bar.close()
    elapsed = time.monotonic() - t0
    damage = [f for f in findings if f.severity == fsck_mod.DAMAGE]
    s = checker.stats
    if as_json:
        print_json({"ok": not damage, "read_data": read_data, "seconds": round(elapsed, 3),
                    "stats": s.__dict__, "findings": [f.to_json() for f in findings]})
    else:
        for f in findings:
            click.echo(f.line(), err=f.severity != fsck_mod.DAMAGE)
        rate = f", {human_bytes(s.bytes_read / elapsed if elapsed else 0)}/s" if read_data else ""
        verdict = f"{plural(len(damage), 'damage finding')}" if damage else "no damage"
        click.echo(f"fsck: {plural(s.packs, 'pack')}, {plural(s.chunks, 'chunk')}, {plural(s.studies, 'study', 'studies')}, "
                   f"{plural(s.submissions, 'submission')}, {plural(s.versions, 'version')}; "
                   f"{human_bytes(s.bytes_read)} read{rate}; {verdict}")
    if damage:
        raise click.exceptions.Exit(EXIT_DAMAGE)
