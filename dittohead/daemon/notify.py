"""Notifications: every notice goes through an outbox, and from there through Apprise.

``Notifier.send(event, settings)`` decides whether an event is notified (``Event.notified``),
to whom (the study's ``notify`` addresses, then the admin's from watch.json), and queues one
notice per recipient in ROOT/daemon/outbox/ (0700): one JSON file per notice (0600, written to a
temporary name, fsynced, renamed into place), holding its recipient, subject, body, attempts and
the time of its next try. Queuing costs a small file write and nothing else: no network, no
waiting, and never an exception (a failure to write is one log line, and the notice is kept in
memory instead: a full disk is exactly when a notice matters).

``Notifier.flush()`` starts a pass over the outbox in a thread of its own and returns at once
(``flush(wait=True)`` waits for it): what is due is sent; what cannot be sent is tried again
after ``notify_retry_seconds`` times 1, 2, 4, ... (at most ``RETRY_FACTOR_MAX``), and given up
after ``GIVE_UP_ATTEMPTS`` attempts or ``GIVE_UP_SECONDS`` since it was queued, each with one log
line. A server that fails once in a pass is not asked again in that pass: every notice waiting
for it counts that failure, in one log line. Nothing in a pass can stop an ingest: it runs
beside the daemon's loop, and every network call has a time-out (``CONNECT_TIMEOUT``,
``READ_TIMEOUT``). A notice is sent at least once: one whose pass was cut short by a kill is
sent again after the restart.

Sending: a recipient with ``://`` is an Apprise URL and is used as it is (Teams, Slack, ntfy,
json://, mailto:// with its own server...). A plain e-mail address is sent through the admin's
``smtp`` URL from watch.json (an Apprise mailto:// or mailtos:// URL naming the server, the
account, the password and the sender) with ``to=`` that address; recipients named in that URL
are dropped. Apprise sends plain SMTP (mailto://, no TLS, no login) to a server on loopback as
well as STARTTLS or TLS with a login to a real one, so e-mail needs no other client here
(docs/notifications.md).

Secrets: an URL's password (or token) appears in no log line and no exception message: every
URL is shown through ``masked`` (``user:***@``, Apprise's own privacy form for the rest), and
every line this module logs is scrubbed of the passwords it knows. Apprise's own log lines are
not passed on: their gist becomes the reason in the one line logged per failure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import textwrap
import threading
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from dittohead import fsutil
from dittohead.daemon.config import WatchConfig, daemon_dir
from dittohead.daemon.events import Event
from dittohead.display import escape
from dittohead.store.layout import StudySettings
from dittohead.units import human_bytes, utc_iso

log = logging.getLogger(__name__)

OUTBOX = "outbox"  # ROOT/daemon/outbox/
OUTBOX_MODE = 0o700
NOTICE_MODE = 0o600
NOTICE_VERSION = 1
NOTICE_MAX_SIZE = 256 * 1024  # a notice file larger than this is not ours
BODY_MAX = 64 * 1024  # a hook's output or a reason is cut to keep a notice readable

RETRY_FACTOR_MAX = 16  # the delay grows 1, 2, 4, 8, 16 times notify_retry_seconds, then stays
GIVE_UP_ATTEMPTS = 20
GIVE_UP_SECONDS = 24 * 3600.0
CONNECT_TIMEOUT = 10.0  # seconds: Apprise's cto= (the SMTP or HTTP connection)
READ_TIMEOUT = 20.0  # seconds: Apprise's rto= (an answer)
PASS_BUDGET = 120.0  # a pass starts no new attempt after this many seconds (the rest wait)
CLOSE_WAIT = 30.0  # close() waits this long for a last pass
STALE_TMP_SECONDS = 3600.0  # a temporary file this old in the outbox was left by a crash

_EMAIL_RE = re.compile(r"^[^@\s<>,;:\"'()\[\]\\/]+@[^@\s<>,;:\"'()\[\]\\/]+\.[^@\s<>,;:\"'()\[\]\\/]+$")
_SECRET_KEYS = frozenset({"pass", "password", "pw", "secret", "token", "key", "apikey", "api_key",
                          "access_token", "webhook", "auth"})


# -- what may be shown of an URL -------------------------------------------------------------


def masked(address: str | None) -> str:
    """``address`` as it may be logged: an e-mail address as it is; an URL in Apprise's privacy
    form where Apprise knows it (passwords and tokens shortened or starred), without its query,
    and with any password left as ``***``; an URL Apprise does not know (a mistyped service, whose
    path may hold its token) as its scheme alone."""
    if not address:
        return "(none)"
    if "://" not in address:
        return escape(address)
    shown = _apprise_private_url(address)
    if shown is None:
        return escape(address.split("://", 1)[0] + "://***")
    shown = shown.split("?", 1)[0].rstrip("/")
    shown = re.sub(r"(://[^/@]*?:)[^/@]*@", r"\1***@", shown)
    return escape(shown)


def printed(address: str) -> str:
    """A notification address as a command prints it (``study set``, ``watch --check-config``):
    an e-mail address as it is; an e-mail URL with its password, and any secret in its query,
    as ``***``; any other URL as its scheme alone, since services keep their tokens in the path
    (slack://T/B/C). Escaped for a terminal."""
    scheme, sep, _ = address.partition("://")
    if sep and scheme.lower() not in ("mailto", "mailtos"):
        return escape(f"{scheme}://***")
    out = re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", address)
    out = re.sub(r"([?&](?:" + "|".join(sorted(_SECRET_KEYS)) + r")=)[^&#]*", r"\1***", out, flags=re.IGNORECASE)
    return escape(out)


def _apprise_private_url(url: str) -> str | None:
    try:
        quiet_third_party()
        import apprise

        plugin = apprise.Apprise.instantiate(url, suppress_exceptions=True)
        if not plugin:
            return None
        return re.sub(r":\*{4}@", ":***@", str(plugin.url(privacy=True)))
    except Exception:  # noqa: BLE001 - only a way of showing an URL
        return None


_PLAIN_SCHEMES = frozenset({"mailto", "mailtos", "json", "jsons", "xml", "xmls", "form", "forms"})


def _secrets(url: str | None) -> set[str]:
    """The strings of ``url`` that must not be logged: its password and secret-looking query
    values, raw and unquoted; for a service's URL (slack://, tgram://...), also its host and the
    long parts of its path, where such services keep their tokens."""
    out: set[str] = set()
    if not url or "://" not in url:
        return out
    with contextlib.suppress(ValueError):
        parts = urllib.parse.urlsplit(url)
        m = re.match(r"^[^@]*?:([^@]*)@", parts.netloc)
        if m and m.group(1):
            out.update({m.group(1), urllib.parse.unquote(m.group(1))})
        for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            if k.lower() in _SECRET_KEYS and v:
                out.update({v, urllib.parse.quote(v, safe="")})
        if parts.scheme.lower() not in _PLAIN_SCHEMES:
            host = parts.netloc.rsplit("@", 1)[-1]
            out.update(p for p in (host, *parts.path.split("/")) if len(p) >= 8)
    return {s for s in out if len(s) >= 3}


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for s in sorted(secrets, key=len, reverse=True):
        text = text.replace(s, "***")
    # urllib3's "Max retries exceeded with url: /bot<token>/sendMessage": a service's API path.
    return re.sub(r"(with url: )\S+", r"\1***", text)


def email_url(smtp: str, address: str) -> str:
    """The Apprise URL that sends to ``address`` through the server ``smtp`` names: its
    recipients (``to=``, ``cc=``, ``bcc=``, a path) replaced by ``address``; text, not HTML."""
    parts = urllib.parse.urlsplit(smtp)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
             if k.lower() not in ("to", "cc", "bcc")]
    query.append(("to", address))
    if not any(k.lower() == "format" for k, _ in query):
        query.append(("format", "text"))
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, "", urllib.parse.urlencode(query), ""))


def _with_timeouts(url: str) -> str:
    """``url`` with Apprise's connection and read time-outs, unless it names its own."""
    try:
        query = urllib.parse.urlsplit(url).query
    except ValueError:
        return url
    keys = {k.lower() for k, _ in urllib.parse.parse_qsl(query, keep_blank_values=True)}
    more = [f"{k}={v:g}" for k, v in (("cto", CONNECT_TIMEOUT), ("rto", READ_TIMEOUT)) if k not in keys]
    if not more:
        return url
    return url + ("&" if "?" in url else "?") + "&".join(more)


def delivery_url(recipient: str, smtp: str | None) -> str | None:
    """The Apprise URL a notice to ``recipient`` goes through: an URL as it is, an e-mail
    address through the mail server ``smtp`` (None without one); with the time-outs."""
    if "://" in recipient:
        return _with_timeouts(recipient)
    if not smtp:
        return None
    return _with_timeouts(email_url(smtp, recipient))


def is_email(address: str) -> bool:
    return "://" not in address and bool(_EMAIL_RE.match(address))


# -- what a notice says ----------------------------------------------------------------------


def _name(value: Any) -> str:
    """A client's name (submission, site, user, path) as the log shows it: escaped."""
    return escape(str(value)) if value not in (None, "") else "(none)"


def _text(value: Any) -> str:
    """The server's own text (a reason, which names client names escaped already): shown as it
    is where every character is printable, escaped where one is not."""
    s = str(value)
    if s.isprintable():
        return s
    return "\n".join(escape(line) for line in s.split("\n"))


def _bytes(value: Any) -> str:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return _text(value)
    return f"{human_bytes(n)} ({n:,} bytes)"


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"  {(k + ':').ljust(width)}{v}" for k, v in rows)


def body(event: Event, root_path: str | None = None) -> str:
    """The text of a notice: what happened, in which study, when (UTC), and what to do."""
    f = event.fields
    study = _name(event.study) if event.study else None
    sub = _name(event.submission) if event.submission else None
    when = utc_iso(event.time_ns)
    k = event.kind
    rows: list[tuple[str, str]] = []
    if study:
        rows.append(("study", study))
    if sub:
        rows.append(("submission", sub))
    if k == "rejected":
        head = f"A submission to study {study} was rejected. The store did not change."
        rows += [("site", _name(f.get("site"))), ("user", _name(f.get("user"))),
                 ("reason", _text(f.get("reason", "")))]
        todo = ("Nothing of this submission was stored. Its reason and manifest are kept on the "
                f"server in dropbox/{study}/failed/. Fix what the reason names on the collector's PC "
                f"(site {_name(f.get('site'))}, user {_name(f.get('user'))}); the collector's next "
                "'dittohead sync' sends its files again, as a new submission.")
    elif k == "held":
        head = f"A submission to study {study} is held back: the store has damage that stops its ingest."
        rows += [("reason", _text(f.get("reason", "")))]
        todo = ("The submission is kept and tried again later, with a growing delay. Run "
                "'dittohead fsck --store ROOT' as the daemon's account and repair what it reports; "
                "the submission is ingested once the store is sound. The collector need do nothing.")
    elif k == "hook_failed":
        head = f"The hook of study {study} failed after an ingest. The submission is in the store."
        rows += [("command", _text(f.get("command", ""))), ("status", _text(f.get("status", "")))]
        output = _text(f.get("output", ""))[-BODY_MAX:]
        todo = ("The ingest is complete: only the hook's work is missing. Check the command "
                f"('dittohead study set {study} --hook ...') and run it again by hand for this "
                "submission if its work is needed." + (f"\n\nThe last lines of its output:\n{output}" if output else ""))
    elif k == "export_failed":
        head = (f"The export of study {study} into {_name(f.get('dest'))} failed. The store has every "
                "submission; only that copy is behind.")
        rows += [("destination", _name(f.get("dest"))), ("reason", _text(f.get("reason", "")))]
        todo = ("Fix what the reason names (the daemon's account must be able to write there; a full "
                "disk stops it too). The daemon exports again when it starts and after the study's "
                f"next ingest; or run 'dittohead export --store ROOT --study {study} DEST' as the "
                "daemon's account now. An export only adds what is missing.")
    elif k == "disk":
        level = f.get("level") or 0
        rows = [("filesystem", _name(f.get("path"))), ("holds", _text(f.get("holds") or "?")),
                ("used", f"{f.get('percent')}%: {_bytes(f.get('used'))} of {_bytes(f.get('size'))}")]
        if level:
            rows.append(("threshold", f"{level}%"))
            head = f"The filesystem holding {_name(f.get('path'))} is {f.get('percent')}% full, past {level}%."
            todo = ("Make room there or grow the filesystem. The store never deletes anything, so it "
                    "only grows; when the filesystem is full, ingests stop (submissions are held back) "
                    "and exports fail until there is room again. You are told again at the next "
                    "threshold, and once when it is back under all of them.")
        else:
            head = f"The filesystem holding {_name(f.get('path'))} is back under its thresholds ({f.get('percent')}% full)."
            todo = "Nothing: this closes the earlier warnings about it."
    elif k == "quota":
        level = f.get("level") or 0
        rows += [("stored", _bytes(f.get("used"))), ("quota", _bytes(f.get("quota"))),
                 ("used", f"{f.get('percent')}% of the quota")]
        if level:
            rows.append(("threshold", f"{level}%"))
            head = f"Study {study} holds {f.get('percent')}% of its quota in the store."
            todo = ("The quota only warns: ingests go on. Raise it with 'dittohead study set "
                    f"{study} --quota SIZE' if the study needs more, or plan for the space. You are "
                    "told again at the next threshold.")
        else:
            head = f"Study {study} is back under its quota's thresholds ({f.get('percent')}%)."
            todo = "Nothing: this closes the earlier warnings about it."
    elif k == "abandoned":
        head = f"An upload to study {study} was started and never finished; it was moved out of the inbox."
        rows += [("untouched for", f"{_text(f.get('age_hours'))} hours"), ("moved to", _name(f.get("moved_to")))]
        todo = ("Usually nothing: the collector's next 'dittohead sync' sends the files again. The "
                "partial upload can be deleted once it is not needed.")
    elif k == "ingested":
        head = f"A submission to study {study} was ingested as #{_text(f.get('seq'))}."
        rows += [("site", _name(f.get("site"))), ("user", _name(f.get("user"))), ("host", _name(f.get("host"))),
                 ("files", _text(f.get("files"))), ("new versions", _text(f.get("new_versions"))),
                 ("new bytes", _bytes(f.get("bytes", 0)))]
        todo = (f"Nothing. Its files are in the study's view: 'dittohead log --store ROOT --study {study}' "
                "lists the submissions.")
    else:
        head = f"The daemon: {_text(f.get('what', ''))}."
        rows += [(_text(key), _text(v)) for key, v in f.items() if key != "what"]
        todo = ""
    if root_path:
        rows.append(("server", f"{socket.gethostname()}:{root_path}"))
    rows.append(("when", when))
    text = f"{head}\n\n{_table(rows)}\n"
    if todo:
        prose, _, rest = todo.partition("\n\n")  # the prose wrapped; a hook's output kept as it is
        text += "\n" + textwrap.fill(f"What to do: {prose}", width=76, break_long_words=False) + "\n"
        if rest:
            text += f"\n{rest}\n"
    return text + "\n-- dittohead watch\n"


# -- the outbox ------------------------------------------------------------------------------


@dataclass
class Notice:
    recipient: str
    subject: str
    body: str
    created: float = field(default_factory=time.time)
    attempts: int = 0
    next_try: float = 0.0
    last_error: str = ""
    kind: str = ""
    study: str | None = None
    name: str | None = None  # its file in the outbox; None if it could not be written (kept in memory)

    def doc(self) -> dict[str, Any]:
        return {"version": NOTICE_VERSION, "recipient": self.recipient, "subject": self.subject,
                "body": self.body, "created": self.created, "attempts": self.attempts,
                "next_try": self.next_try, "last_error": self.last_error, "kind": self.kind,
                "study": self.study}

    @classmethod
    def from_doc(cls, doc: Any, name: str) -> Notice:
        if not isinstance(doc, dict) or doc.get("version") != NOTICE_VERSION:
            raise ValueError("not a notice of this dittohead")
        for key, kinds in (("recipient", str), ("subject", str), ("body", str), ("attempts", int),
                           ("created", (int, float)), ("next_try", (int, float))):
            if not isinstance(doc.get(key), kinds) or isinstance(doc.get(key), bool):
                raise ValueError(f"bad {key!r}")  # noqa: TRY004 - a bad file, as bad JSON is
        return cls(doc["recipient"], doc["subject"], doc["body"], float(doc["created"]), doc["attempts"],
                   float(doc["next_try"]), str(doc.get("last_error") or ""), str(doc.get("kind") or ""),
                   doc.get("study") if isinstance(doc.get("study"), str) else None, name)


class _Capture(logging.Handler):
    """Apprise's log lines during a pass: the gist of a failure, never passed on as they are."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.on = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.on:
            return
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001
            return
        if record.levelno >= logging.WARNING or "Exception" in msg or "Response Details" in msg:
            self.lines.append(" ".join(msg.split())[:300])


_capture = _Capture()
_deliver_lock = threading.Lock()  # one delivery at a time in a process: _capture is shared
_quieted = False


def quiet_third_party() -> None:
    """Keep Apprise's and urllib3's log lines (which may show an URL's path, tokens and all)
    out of the daemon's log; ours says what failed, once."""
    global _quieted
    if _quieted:
        return
    _quieted = True
    ap = logging.getLogger("apprise")
    ap.addHandler(_capture)
    ap.setLevel(logging.DEBUG)
    ap.propagate = False
    ul = logging.getLogger("urllib3")
    ul.setLevel(logging.WARNING)
    ul.propagate = False


class Notifier:
    """Queues notices in ROOT/daemon/outbox/ and sends them through Apprise (see the module's
    docstring). Safe to use from several threads; ``send`` never raises and never waits on the
    network."""

    def __init__(self, root_path: str, config: WatchConfig) -> None:
        self.root_path = os.path.abspath(root_path)
        self.config = config
        self.outbox = os.path.join(daemon_dir(self.root_path), OUTBOX)
        self._lock = threading.Lock()  # the outbox's files and the memory queue
        self._memory: list[Notice] = []  # notices that could not be written
        self._thread: threading.Thread | None = None
        self._again = False  # a flush asked for while a pass was running
        self._closed = False
        self._next_due = 0.0  # no notice is due before this (time.time()); 0: look
        self._secrets = _secrets(config.smtp)
        self._outbox_ok = self._prepare()

    def reconfigure(self, config: WatchConfig) -> None:
        """watch.json read again (SIGHUP): the admin's addresses, the mail server and the delays
        of what is queued from now on; what waits is sent through the new server."""
        self.config = config
        self._secrets |= _secrets(config.smtp)
        self._next_due = 0.0

    # -- queuing
    def _prepare(self) -> bool:
        try:
            os.makedirs(daemon_dir(self.root_path), mode=0o700, exist_ok=True)
            os.makedirs(self.outbox, mode=OUTBOX_MODE, exist_ok=True)
            st = os.lstat(self.outbox)
            if not os.path.isdir(self.outbox) or os.path.islink(self.outbox):
                raise OSError(f"{self.outbox} is not a folder")
            if st.st_mode & 0o077:
                os.chmod(self.outbox, OUTBOX_MODE)
            now = time.time()
            for entry in os.scandir(self.outbox):
                if entry.name.startswith(".tmp-"):
                    with contextlib.suppress(OSError):
                        if now - entry.stat(follow_symlinks=False).st_mtime > STALE_TMP_SECONDS:
                            os.unlink(entry.path)
            return True
        except OSError as e:
            log.error("notify: cannot use the outbox %s (%s): notices are kept in memory only", self.outbox,
                      e.strerror or e)
            return False

    def recipients(self, settings: StudySettings | None) -> list[str]:
        """The study's addresses, then the admin's, each once."""
        out: list[str] = []
        for r in (*(settings.notify if settings else ()), *self.config.admin):
            r = r.strip()
            if r and r not in out:
                out.append(r)
        return out

    def send(self, event: Event, settings: StudySettings | None) -> None:
        """Queue the notices of ``event`` if it is notified; never raises, never waits on the
        network."""
        try:
            self._send(event, settings)
        except Exception as e:  # noqa: BLE001 - a notice must never stop the daemon
            log.error("notify: could not queue the notice of a %s event: %s", event.kind,
                      self._clean(f"{type(e).__name__}: {e}"))

    def _send(self, event: Event, settings: StudySettings | None) -> None:
        if not event.notified(bool(settings and settings.notify_success)):
            return
        recipients = self.recipients(settings)
        if not recipients:
            log.debug("notify: nobody to tell of %s", event.line())
            return
        subject = event.subject()
        text = body(event, self.root_path)
        for r in recipients:
            if "://" not in r and not is_email(r):
                log.warning("notify: %s is neither an e-mail address nor an Apprise URL: not notified of %s",
                            masked(r), subject)
                continue
            self._secrets |= _secrets(r)
            self._queue(Notice(r, subject, text, kind=event.kind, study=event.study))
        self._queued()

    def _queue(self, notice: Notice) -> None:
        if self._outbox_ok:
            name = f"{time.time_ns():020d}-{os.urandom(6).hex()}.json"
            try:
                self._write(notice, name)
                notice.name = name
                return
            except OSError as e:
                log.error("notify: cannot write a notice to %s (%s): it is kept in memory until sent",
                          self.outbox, e.strerror or e)
        with self._lock:
            self._memory.append(notice)

    def _queued(self) -> None:
        self._next_due = 0.0

    def _write(self, notice: Notice, name: str) -> None:
        data = json.dumps(notice.doc(), ensure_ascii=True, sort_keys=True).encode()
        fsutil.replace_file(os.path.join(self.outbox, name), data, mode=NOTICE_MODE)

    def _names(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.outbox) if n.endswith(".json") and not n.startswith("."))
        except OSError:
            return []

    def pending(self) -> int:
        """Notices waiting to be sent: in the outbox, and any kept in memory."""
        with self._lock:
            return len(self._names()) + len(self._memory)

    def _load(self, name: str) -> Notice | None:
        path = os.path.join(self.outbox, name)
        try:
            doc = json.loads(fsutil.read_limited(path, NOTICE_MAX_SIZE))
            notice = Notice.from_doc(doc, name)
            self._secrets |= _secrets(notice.recipient)  # one an earlier run queued
            return notice
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            bad = os.path.join(self.outbox, f".bad-{name}")
            with contextlib.suppress(OSError):
                os.replace(path, bad)
            log.error("notify: %s is not a notice (%s): set aside as %s", path, e, bad)
            return None

    # -- sending
    def flush(self, wait: bool = False) -> None:
        """Send what is due, in a thread of its own; with ``wait``, return when that pass is
        over (its time-outs bound it). Costs nothing while no notice is due: the daemon may
        call it every second. Never raises."""
        try:
            with self._lock:
                if self._closed or (not wait and time.time() < self._next_due):
                    return
                if self._thread is not None and self._thread.is_alive():
                    self._again = True  # the running thread makes one more pass, for what it missed
                else:
                    self._again = False
                    self._thread = threading.Thread(target=self._run, name="dittohead-notify", daemon=True)
                    self._thread.start()
                thread = self._thread
            if wait:
                thread.join()
        except Exception as e:  # noqa: BLE001
            log.error("notify: could not start sending: %s", self._clean(str(e)))

    def _run(self) -> None:
        while True:
            try:
                self._pass()
            except Exception as e:  # noqa: BLE001 - the thread must end cleanly, the notices stay
                log.error("notify: a pass over the outbox failed: %s", self._clean(f"{type(e).__name__}: {e}"))
            with self._lock:
                if not self._again or self._closed:
                    return
                self._again = False

    def _pass(self) -> None:
        now = time.time()
        started = time.monotonic()
        with self._lock:
            self._next_due = float("inf")  # a notice queued from here on sets it to 0 again
            names = self._names() if self._outbox_ok else []
            memory = list(self._memory)
        due: list[Notice] = []
        later = float("inf")  # the next try of what this pass leaves
        for n in [*filter(None, map(self._load, names)), *memory]:
            if n.next_try <= now:
                due.append(n)
            else:
                later = min(later, n.next_try)
        down: dict[str, str] = {}  # channel -> why it failed in this pass
        failed: dict[str, list[Notice]] = {}
        for i, n in enumerate(due):
            channel = self._channel(n.recipient)
            if channel in down:
                failed[channel].append(n)
                continue
            if time.monotonic() - started > PASS_BUDGET:
                later = now  # the rest are tried at the next pass
                log.info("notify: %d notices left for the next pass", len(due) - i)
                break
            ok, why = self._deliver(n)
            if ok:
                self._done(n)
                log.info("notify: sent %r to %s", n.subject, masked(n.recipient))
            else:
                down[channel] = why
                failed[channel] = [n]
        for channel, notices in failed.items():
            later = min(later, self._failed(channel, down[channel], notices, now))
        with self._lock:
            self._next_due = min(self._next_due, later)

    def _channel(self, recipient: str) -> str:
        """What a failure is shared by: the SMTP server for e-mail, the URL's scheme and host."""
        if "://" not in recipient:
            return "smtp"
        with contextlib.suppress(ValueError):
            p = urllib.parse.urlsplit(recipient)
            return f"{p.scheme}://{p.netloc}"
        return recipient

    def _deliver(self, n: Notice) -> tuple[bool, str]:
        url = delivery_url(n.recipient, self.config.smtp)
        if url is None:
            return False, "no 'smtp' in watch.json to send e-mail through"
        quiet_third_party()
        try:
            import apprise
        except ImportError:
            return False, "Apprise is not installed (pip install apprise)"
        with _deliver_lock:
            return self._deliver_locked(apprise, url, n)

    def _deliver_locked(self, apprise: Any, url: str, n: Notice) -> tuple[bool, str]:
        _capture.lines.clear()
        _capture.on = True
        try:
            ap = apprise.Apprise(asset=apprise.AppriseAsset(app_id="dittohead", app_desc="dittohead watch"))
            if not ap.add(url):
                return False, "Apprise does not take this URL" + (f" ({_capture.lines[-1]})" if _capture.lines else "")
            ok = bool(ap.notify(body=n.body, title=n.subject, body_format=apprise.NotifyFormat.TEXT))
            if ok:
                return True, ""
            lines = list(dict.fromkeys(_capture.lines))
            return False, "; ".join(lines[-3:]) or "Apprise could not send it"
        except Exception as e:  # noqa: BLE001 - a plugin's bug is one failed attempt
            return False, f"{type(e).__name__}: {e}"
        finally:
            _capture.on = False

    def _done(self, n: Notice) -> None:
        with self._lock:
            if n.name is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.outbox, n.name))
            elif n in self._memory:
                self._memory.remove(n)

    def _failed(self, channel: str, why: str, notices: list[Notice], now: float) -> float:
        """Count a failed attempt of ``notices`` (one log line); the earliest next try of those
        that wait."""
        why = self._clean(why)
        now = max(now, time.time())  # the delay counts from the failure, not from the pass's start
        waiting: list[Notice] = []
        for n in notices:
            n.attempts += 1
            n.last_error = why
            if n.attempts >= GIVE_UP_ATTEMPTS or now - n.created >= GIVE_UP_SECONDS:
                log.error("notify: gave up on %r to %s after %d attempts in %.1f hours: %s", n.subject,
                          masked(n.recipient), n.attempts, (now - n.created) / 3600, why)
                self._done(n)
                continue
            factor = min(2 ** (n.attempts - 1), RETRY_FACTOR_MAX)
            n.next_try = now + self.config.notify_retry_seconds * factor
            waiting.append(n)
            if n.name is not None:
                try:
                    with self._lock:
                        if os.path.exists(os.path.join(self.outbox, n.name)):
                            self._write(n, n.name)
                except OSError as e:
                    log.error("notify: cannot update %s (%s)", n.name, e.strerror or e)
        if waiting:
            first = waiting[0]
            where = ("e-mail through " + masked(self.config.smtp)) if channel == "smtp" and self.config.smtp \
                else masked(first.recipient)
            log.warning("notify: could not send to %s: %s; %d notice%s wait%s, next try in %.0f s (attempt %d)",
                        where, why, len(waiting), "" if len(waiting) == 1 else "s",
                        "s" if len(waiting) == 1 else "", first.next_try - now, first.attempts)
        return min((n.next_try for n in waiting), default=float("inf"))

    def _clean(self, text: str) -> str:
        return _scrub(text, self._secrets | _secrets(self.config.smtp))

    def close(self, timeout: float = CLOSE_WAIT) -> None:
        """A last pass for what is due (waited for up to ``timeout`` seconds); what is left stays
        in the outbox for the next start. Never raises."""
        try:
            if self._closed:
                return
            self.flush()
            with self._lock:
                thread = self._thread
            if thread is not None:
                thread.join(timeout)
                if thread.is_alive():
                    log.warning("notify: still sending after %.0f s at close; what is not sent stays in %s",
                                timeout, self.outbox)
            with self._lock:
                self._closed = True
                if self._memory:
                    log.warning("notify: %d notice%s kept in memory (the outbox could not be written) "
                                "not sent", len(self._memory), "" if len(self._memory) == 1 else "s")
        except Exception as e:  # noqa: BLE001
            log.error("notify: close: %s", self._clean(str(e)))
