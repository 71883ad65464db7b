"""The command line (click). Commands live by role (admin, collect, read), loaded lazily."""

from __future__ import annotations

from dittohead.cli.base import cli


def main() -> None:
    cli(prog_name="dittohead")


__all__ = ["cli", "main"]
