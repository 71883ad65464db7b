"""The command line (click). Commands live by role: admin, collect, read."""

from __future__ import annotations

from dittohead.cli import admin, collect, read  # noqa: F401  (they register their commands)
from dittohead.cli.base import cli


def main() -> None:
    cli(prog_name="dittohead")


__all__ = ["cli", "main"]
