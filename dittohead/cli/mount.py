"""The mount commands: mount and umount (dittohead/fuse/)."""

from __future__ import annotations

import click

from dittohead.cli.base import store_option


@click.command()
@store_option
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--study", metavar="NAME", help="Mount this study alone: its folders at the top.")
@click.option("--foreground", is_flag=True, help="Stay in the foreground (for systemd); Ctrl-C unmounts.")
def mount(store: str, mountpoint: str, study: str | None, foreground: bool) -> None:
    """Show every version of every file, read-only, at MOUNTPOINT.

    Each study is a folder (with --study, that study's folders are at the top):

    \b
      NAME/current/PATH                         the latest version of every path
      NAME/versions/PATH/NNNN_STAMP_SITE.EXT    every version of PATH
      NAME/submissions/STAMP_SITE_SEQ/PATH      each submission's files, as received
      NAME/log.jsonl                            who sent what, when, from where

    A study's files show the owner, group and modes set for it ('study add --readers GROUP'),
    and the kernel lets only those accounts in. New submissions appear within 2 seconds. Every
    byte read is checked against its hash: damage is an I/O error, never wrong bytes. Run it as
    the daemon's account (a systemd unit: docs/mount.md); 'dittohead umount' ends it.

    \b
    Examples:
      dittohead mount --store /srv/dittohead /mnt/dittohead
      dittohead mount --store /srv/dittohead --study stroop /mnt/stroop --foreground
    """
    from dittohead.fuse.mount import mount as run

    run(store, mountpoint, study, foreground=foreground)


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
def umount(mountpoint: str) -> None:
    """Unmount a dittohead mount at MOUNTPOINT."""
    from dittohead.fuse.mount import umount as run

    run(mountpoint)
