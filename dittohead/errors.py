"""The exception tree, and the one table of exit codes.

Library code raises; only the CLI's top level turns an exception into a message and an exit code
(see ``docs/exit-codes.md``). Every subclass carries its exit code, so that table lives here.
"""

from __future__ import annotations

# The exit-code table (documented in docs/exit-codes.md; an unknown code means failure).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_DAMAGE = 3
EXIT_LOCKED = 4
EXIT_UNSUPPORTED = 5
EXIT_NO_STUDY = 6  # the study named is not in the server root (every command that takes one)
EXIT_EXISTS = 7  # what the command would create is there already (init, study add)
EXIT_INTERRUPTED = 130


class DittoheadError(Exception):
    """Root of every error dittohead reports to a user: one line, no traceback."""

    exit_code = EXIT_FAILURE


class UsageError(DittoheadError):
    """Bad input on the command line or in a config file."""

    exit_code = EXIT_USAGE


class FormatError(DittoheadError):
    """Bytes that do not decode as the format they claim to be (untrusted input, or damage)."""


class UnsupportedFormat(FormatError):
    """A format version, or chunking parameters, this build does not speak."""

    exit_code = EXIT_UNSUPPORTED


class IntegrityError(DittoheadError):
    """Bytes that decode but do not match their hash or length: never served, never stored."""


class StoreError(DittoheadError):
    """The server root or the store is missing, misconfigured or inconsistent."""


class LockedError(DittoheadError):
    """Another run holds the lock this run needs."""

    exit_code = EXIT_LOCKED


class RejectedSubmission(DittoheadError):
    """A submission failed a check during ingest; the reason goes to failed/NAME/REASON."""


class TransportError(DittoheadError):
    """The destination could not be reached, read or written."""


class NotFound(DittoheadError):
    """A path or version that does not exist (exit 1); a study that does not exist is
    ``NoSuchStudy``."""


class NoSuchStudy(NotFound):
    """The study named is not in the server root: the same code whichever command was asked."""

    exit_code = EXIT_NO_STUDY


class AlreadyExists(DittoheadError):
    """What the command would create is there already (a server root, a study): nothing changed."""

    exit_code = EXIT_EXISTS
