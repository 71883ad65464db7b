"""What happened, once: the daemon's log line, its notifications and its hooks all start from an
``Event``.

Kinds (``Event.kind``) and the fields each carries (``Event.fields``; every value JSON-able):

    ingested      study, submission, seq, site, user, host, files, new_versions, bytes (new chunk bytes)
    rejected      study, submission, reason, site, user (site/user "" when the manifest was unreadable)
    held          study, submission, reason (damage in the store; retried later)
    hook_failed   study, submission, command, status, output (the last lines of its output)
    export_failed study, dest, reason (the store has the submissions; DEST is behind)
    disk          path (a filesystem: the store's or an export destination), percent, level (the
                  threshold crossed, or 0 when back under every one), used, size
    quota         study, used, quota, percent, level
    abandoned     study, submission (a staging folder), age_hours, moved_to
    daemon        what ("started", "stopped", "reloaded", "rescan", "error"), and what it says

``Event.line()`` is the one log line (names escaped: a submission's name is a client's); with
``--log-json`` the daemon writes ``Event.json()`` instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dittohead.display import escape

KINDS = ("ingested", "rejected", "held", "hook_failed", "export_failed", "disk", "quota", "abandoned", "daemon")
# Notified always (to the study's addresses and the admin's); "ingested" only where the study
# asks for notices of success (StudySettings.notify_success).
ALWAYS_NOTIFIED = frozenset({"rejected", "held", "hook_failed", "export_failed", "disk", "quota", "abandoned"})


@dataclass(frozen=True)
class Event:
    kind: str
    study: str | None = None
    submission: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    time_ns: int = field(default_factory=time.time_ns)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown event kind {self.kind!r}")

    def subject(self) -> str:
        """A short title (an e-mail's subject)."""
        f = self.fields
        where = f"{self.study}/{escape(self.submission)}" if self.study and self.submission else (self.study or "")
        if self.kind == "ingested":
            return f"dittohead: {where} ingested as #{f.get('seq')}"
        if self.kind == "rejected":
            return f"dittohead: {where} REJECTED"
        if self.kind == "held":
            return f"dittohead: {where} held back (damage in the store)"
        if self.kind == "hook_failed":
            return f"dittohead: the hook of {self.study} failed after {escape(self.submission or '')}"
        if self.kind == "export_failed":
            return f"dittohead: the export of {self.study} to {f.get('dest')} failed"
        if self.kind == "disk":
            return (f"dittohead: {f.get('path')} is {f.get('percent')}% full" if f.get("level")
                    else f"dittohead: {f.get('path')} is back under its thresholds")
        if self.kind == "quota":
            return f"dittohead: study {self.study} is {f.get('percent')}% of its quota"
        if self.kind == "abandoned":
            return f"dittohead: an abandoned upload of {where} was moved aside"
        return f"dittohead: the daemon {f.get('what', '')}"

    def line(self) -> str:
        """The one log line: the subject, then the fields (its kind is in the subject's words)."""
        f = self.fields
        details = "; ".join(f"{k} {escape(str(v))}" for k, v in f.items() if k not in ("output", "seq"))
        return self.subject().removeprefix("dittohead: ") + (f" ({details})" if details else "")

    def json(self) -> str:
        doc = {"time_ns": self.time_ns, "kind": self.kind, "study": self.study, "submission": self.submission,
               **self.fields}
        return json.dumps(doc, ensure_ascii=True, sort_keys=True)

    @classmethod
    def ingested(cls, doc: Mapping[str, Any]) -> Event:
        """The ``ingested`` event of a worker's result (``store.ingest.IngestResult`` as a dict)."""
        return cls("ingested", str(doc.get("study")), str(doc.get("submission")), fields={
            "seq": int(doc.get("seq") or 0), "site": doc.get("site", ""), "user": doc.get("user", ""),
            "host": doc.get("host", ""), "files": doc.get("files", 0), "new_versions": doc.get("new_versions", 0),
            "bytes": doc.get("new_chunk_bytes", 0)})

    def notified(self, notify_success: bool) -> bool:
        """Whether this event is sent as a notification (see ALWAYS_NOTIFIED)."""
        return self.kind in ALWAYS_NOTIFIED or (self.kind == "ingested" and notify_success)
