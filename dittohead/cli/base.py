"""The click group, shared options, and the one place where errors become exit codes."""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from dittohead import __version__
from dittohead.display import escape
from dittohead.errors import EXIT_FAILURE, EXIT_INTERRUPTED, DittoheadError, UsageError

if TYPE_CHECKING:
    from dittohead.export import ExportSummary
    from dittohead.store.repo import Store


# Each command lives in the module of its role and is imported only when it runs (or for
# --help), so that `sync` on a lab PC never loads the server's code.
COMMANDS = {
    "init": "dittohead.cli.admin:init",
    "study": "dittohead.cli.admin:study",
    "watch": "dittohead.cli.admin:watch",
    "fsck": "dittohead.cli.admin:fsck",
    "status": "dittohead.cli.status:status",
    "sync": "dittohead.cli.collect:sync",
    "trust-host": "dittohead.cli.collect:trust_host",
    "log": "dittohead.cli.read:log_cmd",
    "ls": "dittohead.cli.read:ls",
    "versions": "dittohead.cli.read:versions",
    "cat": "dittohead.cli.read:cat",
    "export": "dittohead.cli.read:export",
    "mount": "dittohead.cli.mount:mount",
    "umount": "dittohead.cli.mount:umount",
}


class DittoheadGroup(click.Group):
    """Loads commands lazily, and maps every handled failure to a one-line message and its exit
    code (docs/exit-codes.md)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DittoheadError as e:
            click.echo(f"dittohead: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("dittohead: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            ctx.exit(EXIT_FAILURE)
        except OSError as e:
            where = f"{escape(os.fspath(e.filename))}: " if e.filename else ""  # may be a client's name
            click.echo(f"dittohead: {where}{e.strerror or e}", err=True)
            ctx.exit(EXIT_FAILURE)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as e:  # a bug: still one line, the traceback only when asked for
            sqlite3 = sys.modules.get("sqlite3")
            if sqlite3 is not None and isinstance(e, sqlite3.OperationalError):  # a full disk, a lock
                click.echo(f"dittohead: {e}", err=True)
                ctx.exit(EXIT_FAILURE)
            if logging.getLogger().isEnabledFor(logging.INFO):
                logging.getLogger("dittohead").exception("internal error")
            click.echo(f"dittohead: internal error: {type(e).__name__}: {e} (run with -v for details)", err=True)
            ctx.exit(EXIT_FAILURE)


@click.group(cls=DittoheadGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dittohead")
@click.option("-v", "--verbose", count=True, help="Log more (repeat for debug output).")
def cli(verbose: int) -> None:
    """dittohead: get research data off lab PCs into a locked-down store, once, safely, for ever.

    \b
    Admin:         init, study, watch, status, fsck, mount, umount
    Collector:     sync, trust-host
    Reading:       log, ls, versions, cat, export (an account that can read the store)

    Study runners read the mount or the export (docs/study-runners.md).

    Options that take the server root accept it from DITTOHEAD_STORE too.
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="dittohead: %(message)s", stream=sys.stderr)
    # paramiko reports a dropped link as an error of its own, before dittohead's one line says
    # it: its log is for -vv.
    logging.getLogger("paramiko").setLevel(logging.DEBUG if verbose >= 2 else logging.CRITICAL)


store_option = click.option(
    "--store", "store", envvar="DITTOHEAD_STORE", required=True, metavar="ROOT",
    type=click.Path(file_okay=False), help="The server root (or set DITTOHEAD_STORE).",
)
study_option = click.option("--study", required=True, metavar="NAME", help="The study's name.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout, nothing else.")


def open_store(path: str) -> Store:
    """Open a server root's store for this command; closed when the command ends."""
    from dittohead.store.repo import Store

    st = Store.open(path)
    click.get_current_context().call_on_close(st.close)
    return st


def echo_export_problems(study: str, summary: ExportSummary) -> bool:
    """The lines an export's summary owes on stderr (files in its way, versions damaged in the
    store: the first 20 of each), for `export` and for watch's export alike; True if any version
    was left out as damaged (the command then exits 1)."""
    for c in summary.conflicts[:20]:  # paths hold names a client chose: escaped
        click.echo(f"warning: left untouched, not what the export would write: {escape(c)}", err=True)
    for d in summary.damaged[:20]:
        click.echo(f"error: {study}:{escape(d)}", err=True)
    return bool(summary.damaged)


def print_json(doc: Any) -> None:
    """One JSON document, in ASCII: whatever a name holds reaches a terminal escaped."""
    click.echo(json.dumps(doc, indent=2))


class TerminalPrompts:
    """Asks on the terminal, and only where standard input is one (never in a script)."""

    def secret(self, prompt: str) -> str | None:
        if not sys.stdin.isatty():
            return None
        import getpass

        return getpass.getpass(prompt, stream=sys.stderr)

    def confirm(self, text: str) -> bool | None:
        """``text``'s last line is the question, answered y or n (no: the default)."""
        if not sys.stdin.isatty():
            return None
        *before, question = text.splitlines()
        if before:
            click.echo("\n".join(before), err=True)
        return click.confirm(question.rstrip("?") + "?", default=False, err=True)


def ssh_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options of commands that may sign in to an SSH server."""
    for option in reversed([
        click.option("--identity", metavar="KEYFILE", type=click.Path(dir_okay=False),
                     help="SSH private key to sign in with (sftp:// only); its passphrase is asked for."),
        click.option("--password-stdin", is_flag=True,
                     help="Read the SSH password from the first line of standard input (for scripts)."),
        click.option("--jump", metavar="[USER@]HOST[:PORT]",
                     help="Reach the server through this SSH gateway (as ssh -J; ~/.ssh/config's ProxyJump "
                          "is used otherwise)."),
        click.option("--timeout", type=click.FloatRange(min=1), default=30.0, show_default=True,
                     metavar="SECONDS", help="Give up on an SSH server that does not answer for this long."),
    ]):
        f = option(f)
    return f


def sftp_options(dest: str, identity: str | None, password_stdin: bool, jump: str | None,
                 timeout: float) -> dict[str, Any] | None:
    """How to sign in for an sftp:// ``dest``, as ``open_transport`` takes it; None for a local
    one (where the SSH options are a usage error)."""
    if not dest.startswith("sftp://"):
        given = [o for o, v in (("--identity", identity), ("--password-stdin", password_stdin),
                                ("--jump", jump)) if v]
        if given:
            raise UsageError(f"{given[0]} is only for sftp:// destinations")
        return None
    return {"prompts": TerminalPrompts(), "identity": identity, "jump": jump, "timeout": timeout,
            "password": _password_from_stdin() if password_stdin else None}


def _password_from_stdin() -> Callable[[str], str | None]:
    """The first line of standard input, given once to each server that asks (a gateway and the
    server behind it may both take it; a wrong password is not tried again)."""
    if sys.stdin.isatty():
        raise UsageError("--password-stdin: standard input is a terminal; leave the option out to be asked")
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        raise UsageError("--password-stdin: standard input gave no password")
    asked: set[str] = set()

    def give(prompt: str) -> str | None:
        if prompt in asked:
            return None
        asked.add(prompt)
        return line

    return give


def progress_enabled() -> bool:
    return sys.stderr.isatty()
