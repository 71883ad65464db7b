"""The command line (click). Commands live by role (admin, collect, read), loaded lazily."""

from __future__ import annotations

from dittohead.cli.base import cli


def main() -> None:
    try:
        cli(prog_name="dittohead")
    except KeyboardInterrupt:
        # Ctrl-C outside a command's own handling (while click starts, or after the command
        # has finished and printed its last line): the same one line and code as within one.
        import sys

        from dittohead.errors import EXIT_INTERRUPTED

        print("dittohead: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None


__all__ = ["cli", "main"]
