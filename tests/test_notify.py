"""Notifications (dittohead/daemon/notify.py) against real servers on 127.0.0.1: an SMTP server
(aiosmtpd) whose mails the tests read, and a small HTTP server for Apprise's json:// and form://
URLs. No network beyond loopback is needed."""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import logging
import os
import socket
import stat
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dittohead.daemon import notify
from dittohead.daemon.config import WatchConfig
from dittohead.daemon.events import Event
from dittohead.daemon.notify import Notifier, email_url, masked
from dittohead.store.layout import StudySettings

aiosmtpd_controller = pytest.importorskip("aiosmtpd.controller")
from aiosmtpd.smtp import AuthResult, LoginPassword

SENDER = "dittohead@server.example.org"
PASSWORD = "Sup3r-S3cret_pw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mailbox:
    """An SMTP server on 127.0.0.1:port that keeps what it receives; started and stopped at
    will (the same port each time). With ``password``, it asks for a login (AUTH over plain
    SMTP, as a loopback test server may) and refuses any other password."""

    def __init__(self, port: int | None = None, password: str | None = None) -> None:
        self.port = port or free_port()
        self.password = password
        self.mails: list[dict[str, Any]] = []
        self.logins: list[tuple[str, str]] = []
        self._ctl: Any = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.original_content or envelope.content, policy=email.policy.default)
        part = msg.get_body(preferencelist=("plain",)) if msg.is_multipart() else msg
        assert part is not None
        self.mails.append({"from": envelope.mail_from, "to": list(envelope.rcpt_tos), "subject": str(msg["subject"]),
                           "header_to": str(msg["to"]), "body": part.get_content(), "raw": envelope.content})
        return "250 OK"

    def _auth(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        if isinstance(data, LoginPassword):
            user, pw = data.login.decode(), data.password.decode()
            self.logins.append((user, pw))
            return AuthResult(success=pw == self.password)
        return AuthResult(success=False)

    def start(self) -> Mailbox:
        kw: dict[str, Any] = {}
        if self.password is not None:
            kw = {"auth_require_tls": False, "auth_required": True, "authenticator": self._auth}
        self._ctl = aiosmtpd_controller.Controller(self, hostname="127.0.0.1", port=self.port, **kw)
        self._ctl.start()
        return self

    def stop(self) -> None:
        if self._ctl is not None:
            self._ctl.stop()
            self._ctl = None

    def url(self, user: str | None = None, password: str | None = None) -> str:
        login = f"{user}:{password}@" if user else ""
        return f"mailto://{login}127.0.0.1:{self.port}?from={SENDER}"


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox().start()
    yield box
    box.stop()


class Hooks:
    """A tiny HTTP server on 127.0.0.1 that keeps every POST (for json:// and form:// URLs)."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                posts.append({"path": self.path, "headers": dict(self.headers), "data": self.rfile.read(n)})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    h = Hooks()
    yield h
    h.close()


@pytest.fixture
def notifiers() -> Iterator[list[Notifier]]:
    made: list[Notifier] = []
    yield made
    for n in made:
        n.close(timeout=5)


def make(root: Path, made: list[Notifier], **config: Any) -> Notifier:
    n = Notifier(str(root), WatchConfig(**config))
    made.append(n)
    return n


def rejected(study: str = "s") -> Event:
    return Event("rejected", study=study, submission="20261129T101500Z_lab\u202eB_7f3a",
                 fields={"reason": "file 'data/run1.edat': its hash does not match its chunks",
                         "site": "lab\nB", "user": "ra\x1b[31m"})


def outbox_docs(root: Path) -> list[dict[str, Any]]:
    box = root / "daemon" / "outbox"
    return [json.loads(p.read_text()) for p in sorted(box.glob("*.json"))]


def test_rejected_submission_is_mailed_to_the_study_and_the_admin(tmp_path: Path, mailbox: Mailbox,
                                                                  notifiers: list[Notifier]) -> None:
    n = make(tmp_path, notifiers, admin=("ops@example.org",), smtp=mailbox.url())
    settings = StudySettings("s", notify=("ra@lab.example.org", "ops@example.org"))
    t = time.monotonic()
    n.send(rejected(), settings)
    assert time.monotonic() - t < 0.5
    assert n.pending() == 2  # the admin, listed twice, gets one
    n.flush(wait=True)
    assert n.pending() == 0
    mails = sorted(mailbox.mails, key=lambda m: m["to"])
    assert [m["to"] for m in mails] == [["ops@example.org"], ["ra@lab.example.org"]]
    for m in mails:
        assert m["from"] == SENDER and m["header_to"] == m["to"][0]
        assert m["subject"] == "dittohead: s/20261129T101500Z_lab\\u202eB_7f3a REJECTED"
        text = " ".join(m["body"].split())  # as read: the lines are wrapped
        assert "A submission to study s was rejected" in text
        assert "its hash does not match its chunks" in text
        # The client's names are escaped: no control character, no bidi override reaches the mail.
        assert "lab\\u000aB" in text and "ra\\u001b[31m" in text and "\u202e" not in text and "\x1b" not in text
        assert "next 'dittohead sync' sends its files again" in text
        assert " UTC" in text and "dropbox/s/failed/" in text
    # The raw mail: one Subject header, no header injected by a name.
    raw = mails[0]["raw"].decode("ascii", "replace")
    assert raw.count("\nSubject:") + raw.startswith("Subject:") == 1


def test_success_notices_only_where_the_study_asks(tmp_path: Path, mailbox: Mailbox,
                                                   notifiers: list[Notifier]) -> None:
    n = make(tmp_path, notifiers, smtp=mailbox.url())
    ev = Event("ingested", study="s", submission="sub1", fields={
        "seq": 7, "site": "lab-a", "user": "ra", "host": "pc1", "files": 3, "new_versions": 2, "bytes": 5 << 20})
    n.send(ev, StudySettings("s", notify=("ra@lab.example.org",)))
    assert n.pending() == 0
    n.send(ev, None)  # no settings, no admin: nobody
    assert n.pending() == 0
    n.send(ev, StudySettings("s", notify=("ra@lab.example.org",), notify_success=True))
    n.flush(wait=True)
    [m] = mailbox.mails
    assert m["subject"] == "dittohead: s/sub1 ingested as #7"
    for part in ("lab-a", "pc1", "5.0 MiB", "new versions:", "ra"):
        assert part in m["body"], m["body"]


def test_disk_and_quota_notices_say_what_is_full(tmp_path: Path, mailbox: Mailbox, notifiers: list[Notifier]) -> None:
    n = make(tmp_path, notifiers, admin=("ops@example.org",), smtp=mailbox.url())
    n.send(Event("disk", fields={"path": "/srv/dittohead/store", "percent": 91.3, "level": 90,
                                 "used": 913 << 20, "size": 1000 << 20, "holds": "the store"}), None)
    n.send(Event("quota", study="s", fields={"study": "s", "used": 9 << 30, "quota": 10 << 30,
                                             "percent": 90.0, "level": 90}), StudySettings("s"))
    n.flush(wait=True)
    disk, quota = sorted(mailbox.mails, key=lambda m: m["subject"])
    assert disk["subject"] == "dittohead: /srv/dittohead/store is 91.3% full"
    assert "/srv/dittohead/store" in disk["body"] and "threshold:" in disk["body"] and "90%" in disk["body"]
    assert "the store" in disk["body"] and "913.0 MiB" in disk["body"]
    assert quota["subject"] == "dittohead: study s is 90.0% of its quota"
    assert "--quota" in quota["body"] and "10.0 GiB" in quota["body"]


def test_an_export_failure_is_mailed_to_the_study_and_the_admin(tmp_path: Path, mailbox: Mailbox,
                                                                 notifiers: list[Notifier]) -> None:
    n = make(tmp_path, notifiers, admin=("ops@example.org",), smtp=mailbox.url())
    n.send(Event("export_failed", study="s", fields={"dest": "/srv/exports/s", "reason": "/srv/exports: Permission denied"}),
           StudySettings("s", notify=("pi@example.org",)))
    n.flush(wait=True)
    mails = sorted(mailbox.mails, key=lambda m: m["to"])
    assert [m["to"] for m in mails] == [["ops@example.org"], ["pi@example.org"]]
    for m in mails:
        assert m["subject"] == "dittohead: the export of s to /srv/exports/s failed"
        text = " ".join(m["body"].split())  # as read: the lines are wrapped
        for part in ("/srv/exports/s", "Permission denied", "only that copy is behind", "dittohead export"):
            assert part in text, text


def test_unreachable_server_is_retried_and_never_blocks(tmp_path: Path, notifiers: list[Notifier],
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(notify, "CONNECT_TIMEOUT", 1.0)
    monkeypatch.setattr(notify, "READ_TIMEOUT", 1.0)
    # A server that takes connections and never answers: the worst a notice can meet.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    box = Mailbox(port)
    n = make(tmp_path, notifiers, admin=("ops@example.org",), smtp=box.url(), notify_retry_seconds=2.0)
    t = time.monotonic()
    n.send(rejected(), None)
    n.flush()
    assert time.monotonic() - t < 0.5, "send and flush wait for nothing"
    n.flush(wait=True)  # the pass ends within its time-outs
    assert time.monotonic() - t < 10
    assert n.pending() == 1
    [doc] = outbox_docs(tmp_path)
    assert doc["attempts"] == 1 and doc["next_try"] > time.time() and doc["last_error"]
    failures = [r.getMessage() for r in caplog.records if "could not send" in r.getMessage()]
    assert len(failures) == 1 and "attempt 1" in failures[0], failures
    thread = n._thread
    for _ in range(100):  # the daemon's loop calls it every second: nothing is due, nothing runs
        n.flush()
    assert n._thread is thread
    silent.close()
    box.start()
    try:
        n.flush(wait=True)  # not due yet: nothing is tried
        assert n.pending() == 1 and box.mails == []
        time.sleep(max(0.0, doc["next_try"] - time.time()) + 0.05)
        n.flush(wait=True)
        assert n.pending() == 0
        [m] = box.mails
        assert m["to"] == ["ops@example.org"] and "REJECTED" in m["subject"]
    finally:
        box.stop()


def test_apprise_url_recipients(tmp_path: Path, hooks: Hooks, notifiers: list[Notifier]) -> None:
    n = make(tmp_path, notifiers)
    base = f"127.0.0.1:{hooks.port}"
    settings = StudySettings("s", notify=(f"json://bot:{PASSWORD}@{base}/hooks/dittohead", f"form://{base}/form"))
    n.send(rejected(), settings)
    n.flush(wait=True)
    assert n.pending() == 0
    by_path = {p["path"]: p for p in hooks.posts}
    doc = json.loads(by_path["/hooks/dittohead"]["data"])
    assert doc["title"] == rejected().subject() and "its hash does not match" in doc["message"]
    assert by_path["/hooks/dittohead"]["headers"]["Authorization"].startswith("Basic ")
    form = urllib.parse.parse_qs(by_path["/form"]["data"].decode())
    assert form["title"] == [rejected().subject()] and "lab\\u000aB" in form["message"][0]


def test_the_outbox_survives_a_restart(tmp_path: Path, notifiers: list[Notifier]) -> None:
    box = Mailbox()
    config = {"admin": ("ops@example.org",), "smtp": box.url(), "notify_retry_seconds": 0.3}
    first = Notifier(str(tmp_path), WatchConfig(**config))  # type: ignore[arg-type]
    first.send(rejected(), StudySettings("s", notify=("ra@lab.example.org",)))
    first.flush(wait=True)  # the server is down: both wait
    # ...and the daemon is killed: nothing more of ``first`` runs.
    outbox = tmp_path / "daemon" / "outbox"
    assert stat.S_IMODE(outbox.stat().st_mode) == 0o700
    files = sorted(outbox.glob("*.json"))
    assert len(files) == 2 and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert {d["recipient"] for d in outbox_docs(tmp_path)} == {"ops@example.org", "ra@lab.example.org"}
    assert all(d["attempts"] == 1 and d["subject"] and d["body"] for d in outbox_docs(tmp_path))
    box.start()
    try:
        second = make(tmp_path, notifiers, **config)
        assert second.pending() == 2
        time.sleep(0.35)
        second.flush(wait=True)
        assert second.pending() == 0
        assert sorted(m["to"][0] for m in box.mails) == ["ops@example.org", "ra@lab.example.org"]
    finally:
        box.stop()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_a_password_is_in_no_log_line(tmp_path: Path, notifiers: list[Notifier], caplog: pytest.LogCaptureFixture,
                                      capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(notify, "CONNECT_TIMEOUT", 2.0)  # aiosmtpd answers a wrong password slowly
    monkeypatch.setattr(notify, "READ_TIMEOUT", 2.0)
    box = Mailbox(password=PASSWORD)
    hook_port = free_port()  # nobody listens: that recipient fails at every try
    n = make(tmp_path, notifiers, admin=("ops@example.org", f"json://bot:{PASSWORD}@127.0.0.1:{hook_port}/x"),
             smtp=box.url("dittohead", PASSWORD), notify_retry_seconds=0.2)
    n.send(rejected(), None)
    n.flush(wait=True)  # the SMTP server is down too
    box.start()
    try:
        time.sleep(0.25)
        n.flush(wait=True)
        assert [m["to"] for m in box.mails] == [["ops@example.org"]]
        assert box.logins == [("dittohead", PASSWORD)]  # the password did go where it belongs
    finally:
        box.stop()
    # A wrong password: the server's refusal is logged, the password is not.
    wrong = make(tmp_path / "other", notifiers, admin=("ops@example.org",),
                 smtp=Mailbox(box.port).url("dittohead", PASSWORD + "x"))
    box.start()
    try:
        wrong.send(rejected(), None)
        wrong.flush(wait=True)
        assert wrong.pending() == 1 and len(box.mails) == 1
    finally:
        box.stop()
    text = caplog.text + "".join(capfd.readouterr())
    assert "could not send" in text and "127.0.0.1" in text
    assert PASSWORD not in text and urllib.parse.quote(PASSWORD) not in text
    assert "dittohead:***@" in text or "bot:***@" in text
    assert masked(box.url("dittohead", PASSWORD)) == f"mailto://dittohead:***@127.0.0.1:{box.port}"
    # A service URL Apprise does not know (mistyped) keeps its token in the path: the scheme alone.
    assert masked("slak://T0123/B0456/XoxSecretToken42") == "slak://***"


def test_gives_up_after_its_attempts(tmp_path: Path, notifiers: list[Notifier], monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(notify, "GIVE_UP_ATTEMPTS", 3)
    n = make(tmp_path, notifiers, admin=("ops@example.org",), smtp=Mailbox().url(), notify_retry_seconds=0.05)
    n.send(rejected(), None)
    for _ in range(3):
        n.flush(wait=True)
        time.sleep(0.25)
    assert n.pending() == 0
    gave_up = [r.getMessage() for r in caplog.records if "gave up" in r.getMessage()]
    assert len(gave_up) == 1 and "after 3 attempts" in gave_up[0] and "ops@example.org" in gave_up[0]


def test_plain_address_without_smtp_waits(tmp_path: Path, notifiers: list[Notifier],
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    n = make(tmp_path, notifiers, admin=("ops@example.org", "not an address"))
    n.send(rejected(), None)
    assert n.pending() == 1
    assert any("neither an e-mail address nor an Apprise URL" in r.getMessage() for r in caplog.records)
    n.flush(wait=True)
    assert n.pending() == 1 and "no 'smtp' in watch.json" in outbox_docs(tmp_path)[0]["last_error"]


def test_a_full_disk_keeps_notices_in_memory(tmp_path: Path, mailbox: Mailbox, notifiers: list[Notifier],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    n = make(tmp_path, notifiers, admin=("ops@example.org",), smtp=mailbox.url())

    def full(*args: Any, **kw: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(n, "_write", full)
    n.send(rejected(), None)
    assert n.pending() == 1 and outbox_docs(tmp_path) == []
    n.flush(wait=True)
    assert n.pending() == 0 and len(mailbox.mails) == 1


def test_email_url_replaces_recipients() -> None:
    url = email_url("mailtos://bot:p%40ss@smtp.example.org:587/x@y.org?from=a@b.org&to=old@x.org&mode=starttls",
                    "pi@lab.org")
    parts = urllib.parse.urlsplit(url)
    assert parts.netloc == "bot:p%40ss@smtp.example.org:587" and parts.path == ""
    assert urllib.parse.parse_qs(parts.query) == {"from": ["a@b.org"], "mode": ["starttls"], "to": ["pi@lab.org"],
                                                  "format": ["text"]}


def test_never_raises(tmp_path: Path, notifiers: list[Notifier]) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")  # ROOT/daemon cannot be made
    n = make(blocked, notifiers, admin=("ops@example.org",))
    n.send(rejected(), None)
    n.send(Event("daemon", fields={"what": "started"}), None)  # not a notified kind
    assert n.pending() == 1
    n.flush(wait=True)
    n.close(timeout=1)
    n.close(timeout=1)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(blocked)
