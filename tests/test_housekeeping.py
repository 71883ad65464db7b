"""The daemon's housekeeping (dittohead/daemon/housekeeping.py, docs/watch-housekeeping.md).

- Abandoned staging folders: set aside (renamed within the inbox to ``.~abandoned-...``) once
  nothing in them changed for longer than the configured age, never before, never through a
  symlink, never a name the ingest's rules are for; with real accounts, while the uploader keeps
  descriptors into its folder and writes through them after the move.
- Have-segment compaction: every chunk id stays published, within the size limit; the newest
  submission's segment keeps its name; a client that lists the old segments and finds them gone
  while it reads lists again and misses nothing; a fresh client after compaction sends no chunk
  the study holds.
- Held-back submissions: the delay doubles from a minute to an hour, and survives a restart.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
from accounts import Accounts, make_dir
from conftest import Server, write_file

from dittohead import format as fmt
from dittohead import records
from dittohead.client import cache as cc
from dittohead.client.sync import _refresh_have
from dittohead.client.transport import LocalTransport
from dittohead.daemon.config import WatchConfig
from dittohead.daemon.housekeeping import ABANDONED_PREFIX, Housekeeper, retry_delay
from dittohead.hashing import digest
from dittohead.store.repo import Store

HOUR = 3600.0
CONFIG = WatchConfig(abandoned_after_hours=1)


def _later(seconds: float):
    return lambda: time.time() + seconds


# -- abandoned staging folders -----------------------------------------------------------------


def test_only_abandoned_staging_folders_are_set_aside(server: Server, tmp_path: Path) -> None:
    inbox = server.dropbox("inbox")
    old = inbox / ".20260101T000000Z-0ld"
    write_file(old / "part.pack", b"x" * 100)
    busy = inbox / ".20260101T000000Z-b5y"  # a pack still being written: its mtime is "now"
    write_file(busy / ".tmp-pack", b"y")
    outside = tmp_path / "outside"
    write_file(outside / "keep", b"z")
    (inbox / ".20260101T000000Z-1ink").symlink_to(outside)  # never followed, never moved
    write_file(inbox / ".20260101T000000Z-f11e", b"a file, not a folder")
    (inbox / ".~left-0123").mkdir()  # set aside by the ingest already
    (inbox / ".not a name").mkdir()
    (inbox / "20260101T000000Z-c0mm1773d").mkdir()  # committed: the ingest's
    later = time.time() + 2 * HOUR
    os.utime(busy / ".tmp-pack", (later, later))

    assert Housekeeper(str(server.root), CONFIG).run() == []  # nothing is an hour old yet
    events = Housekeeper(str(server.root), CONFIG, clock=_later(2 * HOUR)).run()

    assert [(e.kind, e.study, e.submission) for e in events] == [("abandoned", "s", "20260101T000000Z-0ld")]
    moved_to = events[0].fields["moved_to"]
    assert moved_to.startswith(f"inbox/{ABANDONED_PREFIX}20260101T000000Z-0ld-"), moved_to
    assert events[0].fields["age_hours"] >= 2 and events[0].fields["staging"] == old.name
    assert (server.root / "dropbox" / "s" / moved_to / "part.pack").read_bytes() == b"x" * 100
    left = set(os.listdir(inbox))
    assert old.name not in left
    assert {busy.name, ".20260101T000000Z-1ink", ".20260101T000000Z-f11e", ".~left-0123", ".not a name",
            "20260101T000000Z-c0mm1773d"} <= left
    assert (outside / "keep").read_bytes() == b"z" and os.path.islink(inbox / ".20260101T000000Z-1ink")
    # Once its last write is old too, the busy one goes; what was set aside stays where it is.
    events = Housekeeper(str(server.root), CONFIG, clock=_later(9 * HOUR)).run()
    assert [e.submission for e in events] == [busy.name[1:]]
    assert sum(n.startswith(ABANDONED_PREFIX) for n in os.listdir(inbox)) == 2


UPLOADER = r"""
import json, os, sys
staging = os.path.join(sys.argv[1], ".20260101T000000Z-ab4nd0ned")
os.mkdir(staging, 0o750)  # as the client makes it: the daemon's group may read, not write
d = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
f = os.open("0" * 64 + ".pack", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=d)
os.write(f, b"x" * 1000)
print("ready", flush=True)
sys.stdin.readline()
os.write(f, b"written after the move")  # through descriptors held all along
g = os.open("late", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=d)
os.write(g, b"late")
print(json.dumps({"now_at": os.readlink(f"/proc/self/fd/{d}")}), flush=True)
"""

SWEEP = r"""
import json, sys, time
from dittohead.daemon.config import WatchConfig
from dittohead.daemon.housekeeping import Housekeeper
hk = Housekeeper(sys.argv[1], WatchConfig(abandoned_after_hours=1), clock=lambda: time.time() + float(sys.argv[2]))
print(json.dumps([json.loads(e.json()) for e in hk.run()]))
"""


def test_abandoned_upload_set_aside_by_the_daemon_while_its_uploader_holds_it(
        accounts: Accounts, acct_dir: Path) -> None:
    daemon, up = accounts.daemon, accounts.up_a
    root = make_dir(acct_dir / "srv", daemon, 0o755) / "root"
    for args in (("init", "--store", root), ("study", "add", "s", "--store", root)):
        cp = accounts.run_as(daemon, *args)
        assert cp.returncode == 0, cp.stderr
    inbox = root / "dropbox" / "s" / "inbox"
    p = accounts.spawn_python_as(up, UPLOADER, inbox)
    assert p.stdout.readline().strip() == "ready", p.stderr.read() if p.poll() is not None else ""

    def sweep(after: float) -> list[dict]:
        cp = accounts.python_as(daemon, SWEEP, root, after)
        assert cp.returncode == 0, cp.stderr
        return json.loads(cp.stdout)

    assert sweep(0.5 * HOUR) == []
    assert os.path.isdir(inbox / ".20260101T000000Z-ab4nd0ned")
    events = sweep(2 * HOUR)
    assert [(e["kind"], e["submission"]) for e in events] == [("abandoned", "20260101T000000Z-ab4nd0ned")], events
    moved = root / "dropbox" / "s" / events[0]["moved_to"]
    assert not os.path.lexists(inbox / ".20260101T000000Z-ab4nd0ned")
    st = os.lstat(moved)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == up.uid  # still the uploader's, only renamed

    out, err = p.communicate("go\n", timeout=30)
    assert p.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["now_at"] == str(moved)
    assert sorted(os.listdir(moved)) == ["0" * 64 + ".pack", "late"]
    assert os.path.getsize(moved / ("0" * 64 + ".pack")) == 1000 + len(b"written after the move")
    # Nothing of it reaches the ingest, and the server root is as the permission model says.
    for args in (("watch", "--store", root, "--once"), ("fsck", "--store", root, "--json")):
        cp = accounts.run_as(daemon, *args)
        assert cp.returncode == 0 and "Traceback" not in cp.stderr, (args, cp.stdout, cp.stderr)
    assert json.loads(cp.stdout)["findings"] == []


# -- have-segment compaction -------------------------------------------------------------------


def _ids(seq: int, n: int) -> list[bytes]:
    return [digest(f"{seq}/{i}".encode()) for i in range(n)]


def _publish(have: Path, seq: int, ids: list[bytes]) -> None:
    for name, data in records.have_segments(seq, ids):
        (have / name).write_bytes(data)


def _published(have: Path) -> list[bytes]:
    return [i for p in sorted(have.iterdir()) for i in records.decode_have(p.read_bytes())]


@pytest.fixture
def small_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    """Segments of five ids at most, so that merging needs several."""
    limit = fmt.HAVE_HEADER.size + 6 * fmt.HASH_SIZE
    monkeypatch.setattr(fmt, "HAVE_MAX_SIZE", limit)
    return limit


def test_compaction_keeps_every_id_within_the_limit(server: Server, small_limit: int) -> None:
    have = server.dropbox("have")
    every: set[bytes] = set()
    for seq in range(1, 13):
        _publish(have, seq, _ids(seq, 2))
        every |= set(_ids(seq, 2))
    _publish(have, 13, _ids(13, 7))  # the newest: two parts, kept as they are
    every |= set(_ids(13, 7))
    before = Store.open(str(server.root))
    try:
        committed = before.committed_seq("s")
    finally:
        before.close()

    events = Housekeeper(str(server.root), CONFIG, compact_at=4).run()

    assert [(e.kind, e.fields.get("what"), e.fields.get("segments")) for e in events] == [("daemon", "compacted", 12)]
    names = sorted(os.listdir(have))
    assert "0000000013.have" in names and "0000000013.2.have" in names
    merged = [n for n in names if n.startswith("0000000001-0000000012-")]
    assert len(merged) == 5 and len(names) == 7, names  # 24 ids, five a segment
    assert all(os.path.getsize(have / n) <= small_limit for n in names)
    assert all(stat.S_IMODE(os.stat(have / n).st_mode) == 0o644 for n in merged)
    ids = _published(have)
    assert set(ids) == every and len(ids) == len(every)
    again = Store.open(str(server.root))
    try:
        assert again.committed_seq("s") == committed
    finally:
        again.close()
    # Merged segments that are full are not merged again; one that is not stays alone.
    assert Housekeeper(str(server.root), CONFIG, compact_at=4).run() == []
    assert sorted(os.listdir(have)) == names


class _CompactingWhileRead(LocalTransport):
    """A transport whose first have-segment read comes after the daemon compacted the folder
    that the client listed just before."""

    def __init__(self, root: str, housekeeper: Housekeeper) -> None:
        super().__init__(root)
        self.housekeeper = housekeeper
        self.compacted: list = []

    def read_have(self, study: str, segment: str) -> bytes:
        if not self.compacted:
            self.compacted = self.housekeeper.compact_have(study)
        return super().read_have(study, segment)


def test_a_client_reading_during_compaction_misses_nothing(server: Server, tmp_path: Path) -> None:
    have = server.dropbox("have")
    every: set[bytes] = set()
    for seq in range(1, 10):
        _publish(have, seq, _ids(seq, 3))
        every |= set(_ids(seq, 3))
    t = _CompactingWhileRead(str(server.root), Housekeeper(str(server.root), CONFIG, compact_at=4))
    cache = cc.StateCache(str(tmp_path / "client" / "cache.sqlite"), t.key(), "s")
    try:
        _refresh_have(t, cache, "s")  # once a FileNotFoundError from a segment merged away
        assert t.compacted, "the test did not race"
        assert cache.have() == every
    finally:
        cache.close()


def test_after_compaction_a_new_client_sends_no_chunk_the_study_holds(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(5):
        write_file(src / f"f{i}.txt", f"file {i}\n".encode() * (i + 1))
        server.sync(src)
        server.ingest()
    have = server.dropbox("have")
    assert len(os.listdir(have)) == 5
    events = Housekeeper(str(server.root), CONFIG, compact_at=3).run()
    assert [e.fields["what"] for e in events] == ["compacted"]
    assert len(os.listdir(have)) == 2  # one merged, and the newest
    assert server.fsck().exit_code == 0 and "published" not in server.fsck().output
    other = Server(tmp_path / "other")
    other.root = server.root
    name = other.sync(src).submission
    assert name is not None
    assert sorted(os.listdir(server.dropbox("inbox") / name)) == [fmt.MANIFEST_NAME]


# -- held-back submissions ---------------------------------------------------------------------


def test_held_back_retries_back_off_and_survive_a_restart(server: Server) -> None:
    now = [1_000_000.0]
    root = str(server.root)
    hk = Housekeeper(root, CONFIG, clock=lambda: now[0])
    assert hk.retry_at("s", "A") is None
    delays = []
    for _ in range(9):
        delays.append(hk.held("s", "A", "damage in the store") - now[0])
        assert hk.retry_at("s", "A") == now[0] + delays[-1]
        now[0] += 10
    assert delays == [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]
    assert [retry_delay(n) for n in (1, 2, 7, 100)] == [60, 120, 3600, 3600]
    held = server.root / "daemon" / "held.json"
    assert stat.S_IMODE(held.stat().st_mode) == 0o600
    assert [h["attempts"] for h in json.loads(held.read_text())["held"]] == [9]

    restarted = Housekeeper(root, CONFIG, clock=lambda: now[0])
    assert restarted.retry_at("s", "A") == hk.retry_at("s", "A")
    assert restarted.held("s", "A", "again") - now[0] == 3600  # the count went on, not from 1
    restarted.held("s", "B", "damage")
    (server.dropbox("processing") / "A").mkdir()  # A is still there; B has left processing/
    restarted.run()
    assert restarted.retry_at("s", "B") is None and restarted.retry_at("s", "A") is not None
    restarted.cleared("s", "A")
    assert Housekeeper(root, CONFIG).retry_at("s", "A") is None


def test_a_damaged_held_file_means_retry_now(server: Server) -> None:
    (server.root / "daemon").mkdir(mode=0o700, exist_ok=True)
    (server.root / "daemon" / "held.json").write_text("{not json")
    hk = Housekeeper(str(server.root), CONFIG)
    assert hk.retry_at("s", "A") is None
    hk.held("s", "A", "damage")
    assert Housekeeper(str(server.root), CONFIG).retry_at("s", "A") is not None
