"""``watch --check-config``: the daemon's configuration, checked as the daemon reads it, without
a daemon.

It reads what the daemon reads and nothing else:

- ROOT/daemon/watch.json through ``config.read``, as the daemon reads it at start and on SIGHUP:
  its mode (the daemon's alone), its keys (none it does not know) and its values;
- each study's settings (store/studies/NAME.json) as the daemon reads them after an ingest, and
  in them every notification address, the study's and the admin's, as ``notify.Notifier``
  sends to it: an e-mail address through watch.json's ``smtp``, an URL as it is, each parsed by
  Apprise (nothing is sent; Apprise's storage is kept in memory);
- each study's hook as ``hooks.run_hook`` runs it: its command line split, its program found
  as the hook's process finds it (a name on the hook's PATH; a path from ROOT/daemon/).

It starts no daemon, takes no lock, writes nothing and sends nothing. Each problem is one line;
an address is shown as ``study set`` shows it (``notify.printed``: no password, no token).
"""

from __future__ import annotations

import os
import shlex
import shutil
from dataclasses import dataclass, field
from typing import Any

from dittohead.daemon import config as config_mod
from dittohead.daemon.hooks import PATH as HOOK_PATH
from dittohead.daemon.notify import delivery_url, is_email, printed, quiet_third_party
from dittohead.display import escape
from dittohead.errors import DittoheadError, StoreError
from dittohead.store.layout import ServerRoot

PROBE_ADDRESS = "postmaster@example.org"  # the recipient the smtp URL is tried with (never sent to)


@dataclass
class Checked:
    """What ``check`` found: one line per problem, and what it looked at (for the OK line)."""

    problems: list[str] = field(default_factory=list)
    config_file: bool = False  # watch.json is there (else the defaults)
    smtp: str | None = None
    studies: int = 0
    addresses: int = 0  # notification addresses looked at, the admin's and the studies'
    hooks: int = 0

    def summary(self, root_path: str) -> str:
        conf = config_mod.config_path(root_path)
        mail = f"e-mail through {printed(self.smtp)}" if self.smtp else "no smtp"
        return (f"watch configuration OK: {conf if self.config_file else f'no {conf}, the defaults'}; "
                f"{mail}; {_count(self.studies, 'study', 'studies')}, "
                f"{_count(self.addresses, 'notification address', 'notification addresses')}, "
                f"{_count(self.hooks, 'hook', 'hooks')}")


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def check(root_path: str) -> Checked:
    """The daemon's configuration of the server root ``root_path``, checked (see the module)."""
    root = ServerRoot(root_path)
    out = Checked()
    try:
        root.config()
    except DittoheadError as e:  # not a server root the daemon could start on
        out.problems.append(str(e))
        return out
    conf_path = config_mod.config_path(root.path)
    out.config_file = os.path.lexists(conf_path)
    config, out.problems = config_mod.read(root.path)
    out.smtp = config.smtp
    apprise = _apprise()
    if apprise is None:
        out.problems.append("Apprise is not installed: the daemon can send no notice (pip install apprise)")
    smtp_ok = True
    if config.smtp and apprise is not None and not _takes(apprise, delivery_url(PROBE_ADDRESS, config.smtp) or ""):
        smtp_ok = False
        out.problems.append(f"{conf_path}: 'smtp' ({printed(config.smtp)}): Apprise does not take it as a mail "
                            "server's URL (mailtos://USER:PASSWORD@HOST:PORT?from=SENDER)")
    for i, address in enumerate(config.admin, 1):
        why = _address_problem(address, config.smtp, smtp_ok, apprise)
        out.addresses += 1
        if why:
            out.problems.append(f"{conf_path}: 'admin' address {i} ({printed(address)}): {why}")
    try:
        studies = root.studies()
    except OSError as e:
        out.problems.append(f"{root.dropbox_root}: cannot list the studies: {e.strerror or e}")
        studies = []
    for name in studies:
        out.studies += 1
        try:
            settings = root.study_settings(name)
        except StoreError as e:
            out.problems.append(f"study {name}: {e}")
            continue
        for i, address in enumerate(a.strip() for a in settings.notify):
            if not address:
                continue
            out.addresses += 1
            why = _address_problem(address, config.smtp, smtp_ok, apprise)
            if why:
                out.problems.append(f"study {name}: notify address {i + 1} ({printed(address)}): {why} "
                                    f"(dittohead study set {name} --notify ...)")
        if settings.hook and settings.hook.strip():
            out.hooks += 1
            why = _hook_problem(settings.hook.strip(), root.path)
            if why:
                out.problems.append(f"study {name}: hook: {why} (dittohead study set {name} --hook ...)")
    return out


def _apprise() -> Any:
    try:
        quiet_third_party()  # Apprise's log lines may show an URL's token: never passed on
        import apprise
    except ImportError:
        return None
    return apprise


def _takes(apprise: Any, url: str) -> bool:
    """Whether Apprise makes a notifier of ``url`` (parsed only: nothing is sent or stored)."""
    try:
        asset = apprise.AppriseAsset(storage_mode="memory")
        return apprise.Apprise.instantiate(url, asset=asset, suppress_exceptions=True) is not None
    except Exception:  # noqa: BLE001 - a plugin's bug in parsing is a URL it does not take
        return False


def _address_problem(address: str, smtp: str | None, smtp_ok: bool, apprise: Any) -> str | None:
    """Why a notice to ``address`` could not be sent, as ``Notifier`` sends it; None if it could."""
    if "://" not in address and not is_email(address):
        return "neither an e-mail address nor an Apprise URL: the daemon skips it"
    url = delivery_url(address, smtp)
    if url is None:
        return "an e-mail address, and watch.json has no 'smtp' to send it through: its notices would wait"
    if apprise is None or ("://" not in address and not smtp_ok):
        return None  # said once already
    if not _takes(apprise, url):
        return "Apprise does not take this URL (an unknown service, or a part it needs is missing or wrong)"
    return None


def _hook_problem(command: str, root_path: str) -> str | None:
    """Why the hook ``command`` could not be started, as ``hooks.run_hook`` starts it (split
    as a shell splits words, run without a shell in ROOT/daemon/ with the PATH HOOK_PATH);
    None if its program is there to run."""
    try:
        argv = shlex.split(command)
    except ValueError as e:
        return f"not a command line ({e})"
    if not argv:
        return "an empty command line"
    program = argv[0]
    if "/" in program:
        path = os.path.join(config_mod.daemon_dir(root_path), program)
        if not os.path.isfile(path):
            return f"{escape(program)}: no such file"
        if not os.access(path, os.X_OK):
            return f"{escape(program)}: not executable by this account (chmod +x it)"
        return None
    if shutil.which(program, path=HOOK_PATH) is None:
        return f"{escape(program)}: not found in the hook's PATH ({HOOK_PATH}): give its full path"
    return None
