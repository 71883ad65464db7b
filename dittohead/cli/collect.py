"""The collector's command: sync."""

from __future__ import annotations

import os

import click

from dittohead import paths
from dittohead.cli.base import progress_enabled
from dittohead.client.cache import StateCache, state_dir
from dittohead.client.scan import ScanOptions
from dittohead.client.sync import NoProgress, Progress, SyncOptions
from dittohead.client.sync import sync as run_sync
from dittohead.client.transport import open_transport
from dittohead.display import escape
from dittohead.errors import LockedError, UsageError
from dittohead.hashing import blake3
from dittohead.lock import FileLock, Held
from dittohead.store.layout import check_study_name


class BarProgress:
    def __init__(self) -> None:
        self.bar = None

    def start(self, total_bytes: int, files: int) -> None:
        from tqdm import tqdm

        if total_bytes:
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=f"reading {files} files", leave=False)

    def advance(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@click.command()
@click.argument("source", type=click.Path(file_okay=False, exists=True))
@click.option("--study", required=True, metavar="NAME", help="The study to send to.")
@click.option("--to", "dest", required=True, metavar="DEST",
              help="The server root: a local path (a mounted share counts); sftp:// comes in a later version.")
@click.option("--site", metavar="SITE", help="Where the data comes from, e.g. 'Brogden A' (default: this computer's name).")
@click.option("--include", multiple=True, metavar="GLOB", help="Send only files matching GLOB (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Never send files matching GLOB (repeatable).")
@click.option("--dry-run", is_flag=True, help="Say what would be sent; send nothing.")
@click.option("--min-age", default=0.0, type=click.FloatRange(min=0), metavar="SECONDS",
              help="Skip files modified in the last SECONDS (they may still be being written).")
@click.option("--identity", metavar="KEYFILE", type=click.Path(dir_okay=False),
              help="SSH private key for sftp:// destinations.")
def sync(source: str, study: str, dest: str, site: str | None, include: tuple[str, ...],
         exclude: tuple[str, ...], dry_run: bool, min_age: float, identity: str | None) -> None:
    """Send the new and changed files of SOURCE to a study's drop box.

    Only chunks the server lacks are sent; unchanged files are not even re-read. Globs match
    the path relative to SOURCE ('eprime/*.edat'); a glob without '/' also matches the name at
    any depth ('*.tmp'). Symlinks and special files are skipped, never followed. An interrupted
    run is resumed by the next one. Files deleted here stay on the server.

    \b
    Example:
      dittohead sync ~/studies/foo --study foo --to /mnt/lab-server --site "Brogden A"
    """
    check_study_name(study)
    if identity and not dest.startswith("sftp://"):
        raise UsageError("--identity is only for sftp:// destinations")
    transport = open_transport(dest)
    key = transport.key()
    opts = SyncOptions(
        source=os.path.abspath(source), study=study,
        site=(site if site is not None else _hostname()).strip() or "unknown",
        scan=ScanOptions(tuple(map(paths.from_os_name, include)), tuple(map(paths.from_os_name, exclude)), min_age), dry_run=dry_run,
    )
    if any(ord(c) < 32 for c in opts.site) or len(opts.site) > 256:
        raise UsageError("--site: at most 256 printable characters")
    sdir = state_dir()
    digest = blake3(f"{key}\0{study}".encode()).hexdigest()[:24]
    os.makedirs(os.path.join(sdir, "locks"), exist_ok=True)
    lock = FileLock(os.path.join(sdir, "locks", f"{digest}.lock"))
    try:
        lock.acquire()
    except Held:
        raise LockedError(f"another sync to {dest} for study {study} is running") from None
    try:
        cache = StateCache(os.path.join(sdir, "cache.sqlite"), key, study)
        progress: Progress = BarProgress() if progress_enabled() else NoProgress()
        try:
            summary = run_sync(opts, transport, cache, progress)
        finally:
            cache.close()
            transport.close()
    finally:
        lock.release()
    for note in summary.notes:
        click.echo(f"note: {note}", err=True)
    for problem in summary.counts.problems[:20]:
        click.echo(f"warning: {problem}", err=True)
    if len(summary.counts.problems) > 20:
        click.echo(f"warning: ... and {len(summary.counts.problems) - 20} more", err=True)
    if dry_run:
        for path in summary.would_send[:50]:
            click.echo(f"would send: {escape(path)}")
        if len(summary.would_send) > 50:
            click.echo(f"would send: ... and {len(summary.would_send) - 50} more")
    click.echo(summary.line())


def _hostname() -> str:
    import socket  # only when --site is not given: importing it costs a no-change sync 5 ms

    return socket.gethostname()
