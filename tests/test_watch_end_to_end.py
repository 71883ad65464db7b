"""The daemon's parts together: `watch` under its own account, a real SMTP server on loopback
(aiosmtpd), a study's notices of failure and of success, a hook, and `status`.

The parts are tested one by one elsewhere (test_notify.py, test_hooks.py, test_status.py,
test_watch_daemon.py); this is what an admin sees when they are put together.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from test_notify import Mailbox
from test_watch_daemon import Site, site, wait_for  # noqa: F401  (the fixture)

from dittohead.daemon.config import config_path


def test_notices_hook_and_status(site: Site) -> None:  # noqa: F811
    box = Mailbox().start()
    try:
        conf = Path(config_path(str(site.root)))
        if not conf.parent.exists():
            site.as_daemon("status", "--store", site.root, expect=None)  # older roots: watch makes it
        conf.write_text(json.dumps({"admin": ["ops@lab.example.org"], "smtp": box.url(), "rescan_seconds": 2}))
        os.chown(conf, site.daemon.uid, site.daemon.gid)
        conf.chmod(0o600)
        hook_out = site.base / "hook.out"
        hook = site.base / "hook.sh"
        hook.write_text(f'#!/bin/sh\necho "$DITTOHEAD_STUDY #$DITTOHEAD_SEQ from $DITTOHEAD_SITE: $DITTOHEAD_SUBMISSION" >> {hook_out}\n'
                        f'cat >> {hook_out}\n')
        hook.chmod(0o755)
        site.as_daemon("study", "set", "s", "--store", site.root, "--notify", "pi@lab.example.org",
                       "--notify-success", "--hook", str(hook))
        d = site.start()
        try:
            up = site.accounts.up_a
            name = site.submit(up, "s")
            wait_for(lambda: site.receipt("s", name), 30, "the receipt")
            wait_for(lambda: len({r for m in box.mails if name in m["subject"] for r in m["to"]}) >= 2, 30,
                     "the notices of the ingest")
            ok = [m for m in box.mails if name in m["subject"] and "ingested" in m["subject"]]
            assert {r for m in ok for r in m["to"]} == {"pi@lab.example.org", "ops@lab.example.org"}, box.mails
            wait_for(lambda: hook_out.exists() and name in hook_out.read_text(), 30, "the hook's run")
            assert f"s #1 from lab-upa: {name}" in hook_out.read_text()
            assert '"path"' in hook_out.read_text()  # the new versions, on its standard input
            # A bad submission: a folder the client never writes (no manifest).
            bad = site.box("s", "inbox") / "20261129T000000Z-badbadbadbad"
            bad.mkdir()
            (bad / "junk").write_bytes(b"not a pack")
            os.chown(bad, up.uid, up.gid)
            os.chown(bad / "junk", up.uid, up.gid)
            start = len(box.mails)
            both = {"pi@lab.example.org", "ops@lab.example.org"}

            def rejections() -> list[dict]:
                return [m for m in box.mails[start:] if "REJECTED" in m["subject"]]

            wait_for(lambda: {r for m in rejections() for r in m["to"]} == both, 30, "the rejection's notices")
            rej = rejections()
            assert "badbadbadbad" in rej[0]["body"]
            cp = site.as_daemon("status", "--store", site.root, "--json")
            doc = json.loads(cp.stdout)
            assert doc["daemon"]["running"] is True, doc
            s = next(x for x in doc["studies"] if x["name"] == "s") if isinstance(doc["studies"], list) \
                else doc["studies"]["s"]
            assert s["last_ingest"]["seq"] == 1, s
            assert [f["name"] for f in s["failed"]] == ["20261129T000000Z-badbadbadbad"], s
        finally:
            site.stop(d)
    finally:
        box.stop()
