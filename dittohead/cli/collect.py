"""The collector's command: sync."""

from __future__ import annotations

import os

import click

from dittohead import paths
from dittohead.cli.base import progress_enabled, sftp_options, ssh_options
from dittohead.client.cache import StateCache, state_dir
from dittohead.client.scan import ScanOptions
from dittohead.client.sync import NoProgress, Progress, SyncOptions
from dittohead.client.sync import sync as run_sync
from dittohead.client.transport import open_transport
from dittohead.display import escape
from dittohead.errors import LockedError, TransportError, UsageError
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
              help="The server root: a local path (a mounted share counts), or "
                   "sftp://[user@]host[:port]/path/to/root over SSH.")
@click.option("--site", metavar="SITE", help="Where the data comes from, e.g. 'Brogden A' (default: this computer's name).")
@click.option("--include", multiple=True, metavar="GLOB", help="Send only files matching GLOB (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Never send files matching GLOB (repeatable).")
@click.option("--dry-run", is_flag=True, help="Say what would be sent; send nothing.")
@click.option("--min-age", default=0.0, type=click.FloatRange(min=0), metavar="SECONDS",
              help="Skip files modified in the last SECONDS (they may still be being written).")
@ssh_options
def sync(source: str, study: str, dest: str, site: str | None, include: tuple[str, ...],
         exclude: tuple[str, ...], dry_run: bool, min_age: float, identity: str | None,
         password_stdin: bool, jump: str | None, timeout: float) -> None:
    """Send the new and changed files of SOURCE to a study's drop box.

    Only chunks the server lacks are sent; unchanged files are not even re-read. Globs match
    the path relative to SOURCE ('eprime/*.edat'); a glob without '/' also matches the name at
    any depth ('*.tmp'). Symlinks and special files are skipped, never followed. An interrupted
    run is resumed by the next one. Files deleted here stay on the server.

    Over SSH (sftp://), signing in tries an ssh-agent's keys (Pageant on Windows), then
    --identity (or ~/.ssh/config's IdentityFile, or ~/.ssh/id_*), then a password: asked on a
    terminal, or read from standard input with --password-stdin. A server not seen before shows
    its key's fingerprint and asks (without a terminal: refused; see 'dittohead trust-host').
    A dead link ends the run with exit 1 within --timeout seconds; run sync again to resume.

    \b
    Examples:
      dittohead sync ~/studies/foo --study foo --to /mnt/lab-server --site "Brogden A"
      dittohead sync D:\\stroop --study stroop --to sftp://ra1@lab.example.org/srv/dittohead
    """
    check_study_name(study)
    sftp = sftp_options(dest, identity, password_stdin, jump, timeout)
    transport = open_transport(dest, sftp=sftp)
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


@click.command("trust-host")
@click.argument("host", metavar="HOST[:PORT]")
@click.option("--fingerprint", "expected", metavar="SHA256:...",
              help="Record the key only if its fingerprint is this one (as the admin gave it).")
@click.option("--replace", is_flag=True,
              help="Replace the key dittohead recorded for HOST (after its admin confirmed a new one).")
@click.option("--jump", metavar="[USER@]HOST[:PORT]", help="Reach HOST through this SSH gateway.")
@click.option("--timeout", type=click.FloatRange(min=1), default=30.0, show_default=True, metavar="SECONDS",
              help="Give up on a server that does not answer for this long.")
def trust_host(host: str, expected: str | None, replace: bool, jump: str | None, timeout: float) -> None:
    """Record the SSH key of the server HOST as trusted, and print its fingerprint.

    The admin gives you the fingerprint (they read it with 'ssh-keygen -lf
    /etc/ssh/ssh_host_ed25519_key.pub'). With --fingerprint, the key is recorded only if it has
    that one; on a terminal without it, you are shown the fingerprint and asked; otherwise it is
    recorded and printed, for you to compare. Keys are kept in dittohead's known_hosts file
    (printed), beside the ones in ~/.ssh/known_hosts, which are trusted too.

    \b
    Examples:
      dittohead trust-host lab.example.org --fingerprint SHA256:Um4tro9mAo7d5wTsgEs43kq25VkmdKHGHblYQjzLW5s
      dittohead trust-host lab.example.org:2222 --jump ra1@gateway.example.org
    """
    from dittohead.cli.base import TerminalPrompts
    from dittohead.client import ssh

    hops = ssh.parse_jump(host)
    if len(hops) != 1 or hops[0].user:
        raise UsageError(f"{host!r}: give HOST or HOST:PORT")
    if expected is not None and not expected.startswith("SHA256:"):
        raise UsageError("--fingerprint: give it as ssh-keygen -l prints it, SHA256:...")
    target = ssh.resolve(hops[0], jump=ssh.parse_jump(jump) if jump else None)
    name = ssh.host_key_name(target.host, target.port)
    prompts = TerminalPrompts()
    key, transports = ssh.host_key(target, prompts, timeout=timeout)
    for t in transports:
        t.close()
    fp = ssh.fingerprint(key)
    known = ssh.HostKeyPolicy(list(target.known_hosts), ssh.NoPrompts()).keys.lookup(name) or {}
    old = known.get(key.get_name())
    if old is not None and old.asbytes() == key.asbytes():
        click.echo(f"{target.shown}: {key.get_name()} {fp} (already trusted)")
        return
    if expected is not None and expected.rstrip("=") != fp:
        raise TransportError(f"{target.shown} shows {key.get_name()} {fp}, not {expected}: nothing was "
                             "recorded. Do not sync to it; ask the server's admin")
    if old is not None and not replace:
        raise TransportError(
            f"the host key of {target.shown} has CHANGED (it now shows {key.get_name()} {fp}); "
            "nothing was recorded. Ask the server's admin; if they confirm the new key, run "
            f"'dittohead trust-host --replace {host}'")
    if expected is None and prompts.confirm(f"{target.shown} shows a {key.get_name()} key with the fingerprint\n"
                                            f"  {fp}\nIs that the one your server's admin gave you?") is False:
        raise TransportError(f"{target.shown}: not trusted; nothing was recorded")
    if old is not None:
        ssh.forget_host_key(name)
        if name in ssh.HostKeyPolicy(list(target.known_hosts), ssh.NoPrompts()).keys:
            raise TransportError(f"{target.shown}: the old key is also in ~/.ssh/known_hosts or "
                                 f"{ssh.SYSTEM_KNOWN_HOSTS}: remove it there (ssh-keygen -R '{name}')")
    path = ssh.record_host_key(name, key)
    click.echo(f"{target.shown}: {key.get_name()} {fp} (trusted; recorded in {path})")


def _hostname() -> str:
    import socket  # only when --site is not given: importing it costs a no-change sync 5 ms

    return socket.gethostname()
