"""The study runner's commands: log, ls, versions, cat, export."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import click

from dittohead import paths
from dittohead.cli.base import (
    echo_export_problems,
    json_option,
    open_store,
    print_json,
    progress_enabled,
    store_option,
    study_option,
)
from dittohead.display import escape, json_path, unescape
from dittohead.errors import EXIT_FAILURE, IntegrityError, NotFound
from dittohead.store.repo import Store
from dittohead.units import human_bytes, utc_iso
from dittohead.view import Dir, File, FileReader, Node, StudyView, submission_record

T = TypeVar("T")


def _open(store: str, study: str) -> Store:
    st = open_store(store)
    st.root.require_study(study)
    return st


def _taken_as(typed: str, find: Callable[[str], T | None], noun: str = "file") -> tuple[str, T | None]:
    """The study path a command-line PATH names, and what ``find`` finds there: the path as typed
    (its bytes, exactly), or else the escaped form that dittohead prints (``display.escape``),
    undone. Where both name something, the one typed wins (a script passing names as they are
    always gets its file), and stderr says which other ``noun`` the argument would name as
    printed."""
    sp = paths.as_typed(paths.from_os_name(typed))
    found = find(sp)
    if "\\" in typed:
        try:
            printed = paths.as_typed(paths.from_bytes(unescape(typed)))
        except ValueError:
            printed = ""
        other = find(printed) if printed and printed != sp else None
        if found is not None and other is not None:
            click.echo(f"note: '{escape(sp)}' is also how dittohead prints the {noun} '{escape(printed)}', "
                       f"which was not taken (give that one by its own bytes)", err=True)
        elif other is not None:
            sp, found = printed, other
    return sp, found


def _versions_of(st: Store, study: str, typed: str) -> tuple[str, list]:
    """The study path a command-line PATH names (``_taken_as``), and its versions."""
    sp, vs = _taken_as(typed, lambda p: st.index.versions(study, p) or None)
    if not vs:
        raise NotFound(f"{study}: no file '{escape(typed)}'")
    return sp, vs


@click.command("log")
@store_option
@study_option
@json_option
def log_cmd(store: str, study: str, as_json: bool) -> None:
    """List a study's submissions: when (server time), site, user, files, bytes, new versions."""
    st = _open(store, study)
    subs = st.index.submissions(study)
    if as_json:
        # one record per submission, as each line of the view's log.jsonl (dittohead.view)
        print_json({"study": study, "submissions": [submission_record(s) for s in subs]})
        return
    if not subs:
        click.echo(f"{study}: no submissions yet")
        return
    click.echo(f"{'#':>4}  {'ingested':<23}  {'site':<16}  {'user@host':<24}  {'files':>6}  {'bytes':>10}  {'new':>5}  submission")
    for s in subs:  # site, user and host are the client's words: escaped (dittohead.display)
        who = escape(f"{s.user}@{s.host}")
        click.echo(f"{s.seq:>4}  {utc_iso(s.ingested_ns):<23}  {escape(s.site)[:16]:<16}  {who[:24]:<24}  "
                   f"{s.files:>6}  {human_bytes(s.size):>10}  {s.new_versions:>5}  {s.name}")


@click.command("ls")
@store_option
@study_option
@click.argument("path", required=False, default="")
@json_option
def ls(store: str, study: str, path: str, as_json: bool) -> None:
    """List a folder of the study as current/ shows it: its folders (NAME/), and for each file
    its number of versions, the size of its latest version and when that was ingested (UTC).

    PATH is a study path, as stored or as dittohead prints it (escaped: \\u202e, \\x85); by
    default the study's top. A file's PATH lists that one file. A name that was a file in one
    submission and a folder in another is listed twice: the folder, and the file as NAME~file
    (docs/view.md). Put -- before a PATH that starts with -.

    \b
    Examples:
      dittohead ls --study stroop                  the study's top folder
      dittohead ls --study stroop eprime/subj01    one folder
      dittohead ls --study stroop eprime --json    the same, as one JSON document
    """
    st = _open(store, study)
    view = StudyView(st, study)

    def find(sp: str) -> Node | None:
        try:
            return view.lookup(f"current/{sp}")
        except NotFound:
            return None

    taken: tuple[str, Node | None] = _taken_as(path, find, "path")
    sp, node = taken
    if node is None:
        raise NotFound(f"{study}: no file or folder '{escape(path)}'")
    if isinstance(node, Dir):
        listed = view.children(node)
    else:
        listed = [(sp, node)]
    if as_json:
        rows = []
        for name, n in listed:
            if isinstance(n, File):
                v = n.version
                rows.append({**json_path(name, "name"), **json_path(v.path), "kind": "file", "versions": v.n,
                             "size": v.size, "ingested_ns": v.ingested_ns, "ingested": utc_iso(v.ingested_ns)})
            else:
                rows.append({**json_path(name, "name"), **json_path(f"{sp}/{name}" if sp else name),
                             "kind": "folder", "versions": None, "size": None, "ingested_ns": None, "ingested": None})
        print_json({"study": study, **json_path(sp), "kind": "folder" if isinstance(node, Dir) else "file",
                    "entries": rows})
        return
    if not listed:
        click.echo(f"{study}: no submissions yet" if not sp and not view.last_seq else f"{study}: '{escape(sp)}' is empty")
        return
    lines = [f"{'versions':>8}  {'size':>10}  {'ingested':<23}  name"]
    for name, n in listed:  # names are a client's: escaped (dittohead.display)
        if isinstance(n, File):
            v = n.version
            lines.append(f"{v.n:>8}  {human_bytes(v.size):>10}  {utc_iso(v.ingested_ns):<23}  {escape(name)}")
        else:
            lines.append(f"{'':>8}  {'':>10}  {'':<23}  {escape(name)}/")
    click.echo("\n".join(lines))  # one write: 10,000 echo calls cost a third of a large listing


@click.command()
@store_option
@study_option
@click.argument("path")
@json_option
def versions(store: str, study: str, path: str, as_json: bool) -> None:
    """List every version of PATH (numbered from 1, oldest first).

    PATH as stored, or as dittohead prints it (escaped: \\u202e, \\x85); put -- before a
    PATH that starts with -.
    """
    st = _open(store, study)
    sp, vs = _versions_of(st, study, path)
    if as_json:
        print_json({"study": study, **json_path(sp), "versions": [
            {"version": v.n, "seq": v.seq, "ingested_ns": v.ingested_ns, "ingested": utc_iso(v.ingested_ns),
             "site": v.site, "size": v.size, "hash": v.hash.hex(), "mtime_ns": v.mtime_ns, "mode": v.mode}
            for v in vs]})
        return
    click.echo(f"{'version':>7}  {'ingested':<23}  {'site':<16}  {'size':>10}  {'blake3':<16}  submission")
    for v in vs:
        click.echo(f"{v.n:>7}  {utc_iso(v.ingested_ns):<23}  {escape(v.site)[:16]:<16}  {human_bytes(v.size):>10}  "
                   f"{v.hash.hex()[:16]}  #{v.seq}")


@click.command()
@store_option
@study_option
@click.argument("path")
@click.option("--version", "version", type=click.IntRange(min=1), metavar="N", help="Version N (from 1); default the latest.")
def cat(store: str, study: str, path: str, version: int | None) -> None:
    """Write a version of PATH to stdout; every chunk is verified (a mismatch exits 1).

    PATH as stored, or as dittohead prints it (escaped: \\u202e, \\x85); put -- before a
    PATH that starts with -.
    """
    st = _open(store, study)
    sp, vs = _versions_of(st, study, path)
    if version is not None and version > len(vs):
        raise NotFound(f"{study}: '{escape(sp)}' has {len(vs)} version(s), not {version}")
    v = vs[-1] if version is None else vs[version - 1]
    out = sys.stdout.buffer
    try:
        for data in FileReader(st, v).iter_all():
            out.write(data)
    except IntegrityError as e:  # what was written is verified; the rest is never served
        out.flush()
        raise IntegrityError(f"{study}:{escape(v.path)} v{v.n}: {e} (run 'dittohead fsck --read-data')") from None
    out.flush()


@click.command()
@store_option
@study_option
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--verify", is_flag=True,
              help="Look at everything in DEST, and put back what is missing, not only what is new.")
def export(store: str, study: str, dest: str, verify: bool) -> None:
    """Write the study's read-only view into DEST, adding only.

    \b
    DEST/current/PATH                        the latest version of every path
    DEST/versions/PATH/NNNN_STAMP_SITE.EXT   every version
    DEST/submissions/STAMP_SITE_SEQ/PATH     each submission as received
    DEST/log.jsonl                           who sent what, when, from where (lines only added)
    A second export after new versions adds them and updates current/ (where the filesystem
    has hard links); nothing is deleted. A file or folder in the way is left and reported.
    With 'study set --readers GROUP', folders are setgid GROUP 2750 and files 0440.
    After an export that ended clean, the next one writes and looks at only what is new since
    (while DEST's own folders are as it left them); --verify looks at everything.
    """
    if not dest.strip():
        raise click.BadParameter("an empty path (give the folder to export into)", param_hint="'DEST'")
    st = _open(store, study)
    bar = None
    progress = None
    if progress_enabled():
        from tqdm import tqdm

        bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="export", leave=False)
        progress = bar.update
    try:
        from dittohead.export import export_study  # here: the other commands need none of it

        summary = export_study(st, study, dest, progress, verify=verify)
    finally:
        if bar:
            bar.close()
    damaged = echo_export_problems(study, summary)
    click.echo(summary.line(dest))
    if damaged:
        raise click.exceptions.Exit(EXIT_FAILURE)
