"""ROOT/daemon/watch.json: what the admin sets for the daemon, read at start and on SIGHUP.

    {
      "admin": ["ops@lab.example.org", "ntfy://dittohead-alerts"],
      "smtp": "mailtos://dittohead:PASSWORD@smtp.example.org:587?from=dittohead@example.org",
      "thresholds": [80, 90, 95],
      "rescan_seconds": 60,
      "abandoned_after_hours": 168,
      "hook_timeout_seconds": 600,
      "workers": 2,
      "notify_retry_seconds": 300
    }

Every key may be left out (the defaults are ``WatchConfig``'s). ``admin``: where every notice
goes besides a study's own addresses (``study set --notify``): e-mail addresses or Apprise
URLs. ``smtp``: the Apprise mailto:// or mailtos:// URL (server, account, password, sender) that
plain e-mail addresses are sent through. The file holds that password, so it must be readable by
the daemon's account alone: a file that group or others may read is refused, as is one that is
not valid JSON or holds a key or a value the daemon does not know. (A study's own settings file,
store/studies/NAME.json, is the daemon's alone already: 0600 under store/, 0700.)
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass, fields

from dittohead.errors import UsageError

DAEMON_DIR = "daemon"  # ROOT/daemon/
CONFIG_NAME = "watch.json"
STATE_NAME = "state.json"  # ROOT/daemon/state.json: the daemon's account of itself, for ``status``
CONFIG_MAX_SIZE = 64 * 1024


@dataclass(frozen=True)
class WatchConfig:
    admin: tuple[str, ...] = ()
    smtp: str | None = None
    thresholds: tuple[int, ...] = (80, 90, 95)  # percent full of a filesystem, and of a study's quota
    rescan_seconds: float = 60.0  # a full look at every inbox, besides inotify's events
    abandoned_after_hours: float = 168.0  # a staging folder untouched this long is moved aside
    hook_timeout_seconds: float = 600.0
    workers: int = 2  # submissions verified at once (of different studies); commits are one at a time
    notify_retry_seconds: float = 300.0  # a notice that could not be sent is tried again after this


def daemon_dir(root_path: str) -> str:
    return os.path.join(root_path, DAEMON_DIR)


def config_path(root_path: str) -> str:
    return os.path.join(daemon_dir(root_path), CONFIG_NAME)


def state_path(root_path: str) -> str:
    return os.path.join(daemon_dir(root_path), STATE_NAME)


def load(root_path: str) -> WatchConfig:
    """The daemon's configuration: the defaults where there is no file; UsageError (one line,
    naming the file: its first problem) for a file that cannot be used."""
    config, problems = read(root_path)
    if problems:
        raise UsageError(problems[0])
    return config


def read(root_path: str) -> tuple[WatchConfig, list[str]]:
    """watch.json checked whole, as ``load`` (the daemon, at start and on SIGHUP) and ``watch
    --check-config`` read it: the configuration (the defaults where there is no file, and for
    what cannot be used) and one line per problem, each naming the file ([]: it can be used).
    A file that cannot be read as a JSON object is one problem; a mode that lets group or
    others read it is one, and its keys are checked all the same. Nothing is written; no value
    that may hold a password (``smtp``, ``admin``) is shown but masked."""
    path = config_path(root_path)
    try:
        # O_NONBLOCK: a FIFO put there does not hang the daemon (nothing to a regular file).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return WatchConfig(), []
    except OSError as e:
        return WatchConfig(), [f"{path}: cannot read it: {e.strerror}"]
    problems: list[str] = []
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return WatchConfig(), [f"{path}: not a regular file"]
        if os.name == "posix" and st.st_mode & 0o077:
            problems.append(f"{path}: readable by others (mode {stat.S_IMODE(st.st_mode):04o}); it may hold "
                            f"a password: chmod 600 it")
        data = f.read(CONFIG_MAX_SIZE + 1)
    if len(data) > CONFIG_MAX_SIZE:
        return WatchConfig(), [*problems, f"{path}: larger than {CONFIG_MAX_SIZE} bytes"]
    try:
        doc = json.loads(data)
    except ValueError as e:
        return WatchConfig(), [*problems, f"{path}: not valid JSON ({e})"]
    if not isinstance(doc, dict):
        return WatchConfig(), [*problems, f"{path}: not a JSON object"]
    config, more = _parse(path, doc)
    return config, problems + more


def _shown(key: str, value: object) -> str:
    """A value of watch.json as a problem's line shows it: an address masked as ``study set``
    shows it (no password, no token), anything else as its JSON-ish repr."""
    if key in ("smtp", "admin") and isinstance(value, str):
        from dittohead.daemon.notify import printed

        return printed(value)
    if key == "admin" and isinstance(value, list):
        return "[" + ", ".join(_shown(key, v) for v in value) + "]"
    return repr(value)


def _parse(path: str, doc: dict) -> tuple[WatchConfig, list[str]]:
    known = {f.name for f in fields(WatchConfig)}
    problems = [f"{path}: unknown key {key!r} (known: {', '.join(sorted(known))})"
                for key in sorted(set(doc) - known)]
    out: dict = {}

    def bad(key: str, want: str) -> None:
        problems.append(f"{path}: {key!r} must be {want}, not {_shown(key, doc[key])}")

    if "admin" in doc:
        if not isinstance(doc["admin"], list) or not all(isinstance(a, str) and a for a in doc["admin"]):
            bad("admin", "a list of addresses or URLs")
        else:
            out["admin"] = tuple(doc["admin"])
    if "smtp" in doc:
        if doc["smtp"] is not None and not (isinstance(doc["smtp"], str) and doc["smtp"].startswith(("mailto://", "mailtos://"))):
            bad("smtp", "a mailto:// or mailtos:// URL")
        else:
            out["smtp"] = doc["smtp"]
    if "thresholds" in doc:
        t = doc["thresholds"]
        if not isinstance(t, list) or not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= 100 for x in t):
            bad("thresholds", "a list of percentages from 1 to 100")
        else:
            out["thresholds"] = tuple(sorted(set(t)))
    for key in ("rescan_seconds", "abandoned_after_hours", "hook_timeout_seconds", "notify_retry_seconds"):
        if key in doc:
            v = doc[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                bad(key, "a positive number")
            else:
                out[key] = float(v)
    if "workers" in doc:
        v = doc["workers"]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 64:
            bad("workers", "a whole number from 1 to 64")
        else:
            out["workers"] = v
    return WatchConfig(**out), problems
