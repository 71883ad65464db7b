"""A study's hook (dittohead/daemon/hooks.py): run after an ingest with the study, seq, site,
user and submission in a clean environment and the new versions on standard input; a failure,
a time-out (the whole process group killed) or a command that cannot start gives a
``hook_failed`` event with the last lines of its output, escaped; the store never changes.

Hooks due (ROOT/daemon/hooks/): recorded 0600 in a 0700 folder, read back in order of seq, a
record that is not one set aside; a stop kills the hook's process group and raises HookStopped;
``Hooks`` runs a record once, also when the ingest's result comes after a rescan took the
record up and ran it. (The daemon across stops and kills: test_watch_restart.py.)"""

from __future__ import annotations

import json
import os
import queue
import stat
import threading
import time
from pathlib import Path

import pytest
from conftest import Server, store_snapshot, write_file

from dittohead.daemon.events import Event
from dittohead.daemon.hooks import (
    OUTPUT_CHARS,
    Hooks,
    HookStopped,
    due_dir,
    load_due,
    process_start,
    record_due,
    run_hook,
)
from dittohead.store.index import Index
from dittohead.store.layout import StudySettings

WEIRD = os.fsdecode(b"caf\xe9.txt")  # a name that is not UTF-8


@pytest.fixture
def ingested(server: Server, tmp_path: Path) -> Event:
    """Two ingests of study s; the event of the second, as the daemon makes it."""
    src = tmp_path / "src"
    write_file(src / "a.txt", b"alpha\n")
    server.sync(src, site="lab 1")
    server.ingest()
    write_file(src / "a.txt", b"alpha, again\n")
    write_file(src / "dir" / os.fsencode(WEIRD).decode("utf-8", "surrogateescape"), b"\xe9\n")
    write_file(src / "same.txt", b"alpha\n")  # new path, old content: a new version all the same
    server.sync(src, site="lab 1")
    server.ingest()
    idx = Index(str(server.root / "store" / "index.sqlite"), readonly=True)
    try:
        sub = idx.submission("s", 2)
    finally:
        idx.close()
    assert sub is not None
    return Event("ingested", "s", sub.name, fields={
        "seq": 2, "site": sub.site, "user": sub.user, "host": sub.host, "files": sub.files,
        "new_versions": sub.new_versions, "bytes": sub.new_chunk_bytes})


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_a_hook_gets_the_ingest_in_its_environment_and_the_new_versions_on_stdin(
        server: Server, ingested: Event, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_OF_THE_DAEMON", "not for hooks")
    out = tmp_path / "out"
    out.mkdir()
    hook = _script(tmp_path / "hook.sh", f'cd "{out}" || exit 9\n'
                   'env > env\nprintf "%s\\n" "$@" > args\ncat > stdin\n(cd "$OLDPWD" && pwd) > cwd\n')
    settings = StudySettings("s", hook=f"{hook} one 'two words'")
    before = store_snapshot(server.root)

    assert run_hook(settings, ingested, 10, root=str(server.root)) is None

    env = dict(line.split("=", 1) for line in (out / "env").read_text().splitlines() if "=" in line)
    assert env["DITTOHEAD_STUDY"] == "s" and env["DITTOHEAD_SEQ"] == "2"
    assert env["DITTOHEAD_SUBMISSION"] == ingested.submission
    assert env["DITTOHEAD_SITE"] == "lab 1" and env["DITTOHEAD_USER"] == ingested.fields["user"]
    assert env["DITTOHEAD_STORE"] == str(server.root) and env["DITTOHEAD_NEW_VERSIONS"] == "3"
    assert "SECRET_OF_THE_DAEMON" not in env and "DITTOHEAD_STATE_DIR" not in env
    assert (out / "args").read_text().splitlines() == ["one", "two words"]
    assert (out / "cwd").read_text().strip() == str(server.root / "daemon")
    lines = [json.loads(line) for line in (out / "stdin").read_text().splitlines()]
    assert [(v["path"], v["version"], v["size"]) for v in lines] == [
        ("a.txt", 2, 13), ("dir/" + WEIRD, 1, 2), ("same.txt", 1, 6)]
    assert all(len(v["hash"]) == 64 for v in lines)
    assert os.fsencode(lines[1]["path"]) == b"dir/caf\xe9.txt" and "path_b64" in lines[1]
    assert store_snapshot(server.root) == before


def test_a_failing_hook_gives_its_status_and_last_lines_escaped(server: Server, ingested: Event,
                                                               tmp_path: Path) -> None:
    hook = _script(tmp_path / "fails.sh", 'seq 1 5000\necho "to stderr" >&2\nprintf "\\033[31mred\\n"\nexit 3\n')
    before = store_snapshot(server.root)
    event = run_hook(StudySettings("s", hook=str(hook)), ingested, 10, root=str(server.root))
    assert event is not None and event.kind == "hook_failed"
    assert (event.study, event.submission) == ("s", ingested.submission)
    assert event.fields["status"] == "exit 3" and event.fields["command"] == str(hook)
    output = event.fields["output"]
    assert output.splitlines()[-2:] == ["to stderr", "\\u001b[31mred"], output
    assert "5000" in output and "\n1\n" not in output and len(output) <= OUTPUT_CHARS
    assert "\x1b" not in event.line() and "output" not in event.line()
    assert store_snapshot(server.root) == before


@pytest.mark.parametrize("command, status", [
    ("/no/such/hook", "could not start: No such file or directory"),
    ("echo 'unclosed", "could not start: bad command line"),
])
def test_a_hook_that_cannot_start(server: Server, ingested: Event, command: str, status: str) -> None:
    event = run_hook(StudySettings("s", hook=command), ingested, 10, root=str(server.root))
    assert event is not None and event.kind == "hook_failed" and event.fields["status"].startswith(status)


def test_no_hook_nothing_run(server: Server, ingested: Event) -> None:
    assert run_hook(StudySettings("s"), ingested, 10, root=str(server.root)) is None
    with pytest.raises(ValueError):
        run_hook(StudySettings("s", hook="true"), Event("held", "s", "x"), 10, root=str(server.root))


def test_a_hanging_hook_is_killed_at_the_timeout_with_its_children(server: Server, ingested: Event,
                                                                   tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    # It ignores SIGTERM, and leaves a child behind: SIGKILL to the group takes both.
    hook = _script(tmp_path / "hangs.sh", f'trap "" TERM\necho started\nsleep 60 &\necho $! > "{pidfile}"\n'
                   'sleep 60\n')
    t0 = time.monotonic()
    event = run_hook(StudySettings("s", hook=str(hook)), ingested, 0.5, root=str(server.root))
    elapsed = time.monotonic() - t0
    assert event is not None and event.kind == "hook_failed"
    assert event.fields["status"] == "timed out after 0.5 s (killed)" and event.fields["output"] == "started"
    assert elapsed < 6, elapsed
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child)


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for a parent that is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


def test_the_state_folder_stays_the_daemons(server: Server, ingested: Event) -> None:
    assert run_hook(StudySettings("s", hook="true"), ingested, 10, root=str(server.root)) is None
    assert stat.S_IMODE(os.stat(server.root / "daemon").st_mode) == 0o700


def test_a_stop_kills_the_hooks_process_group(server: Server, ingested: Event, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    hook = _script(tmp_path / "slow.sh", f'sleep 60 &\necho $! > "{pidfile}"\nsleep 60\n')
    stop = threading.Event()
    started: list[int] = []
    threading.Timer(0.5, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(HookStopped):
        run_hook(StudySettings("s", hook=str(hook)), ingested, 30, root=str(server.root), stop=stop.is_set,
                 on_start=started.append)
    assert time.monotonic() - t0 < 4
    (pid,) = started
    assert process_start(pid) is None and process_start(int(pidfile.read_text())) is None
    with pytest.raises(HookStopped):  # stopped before it starts: not started
        run_hook(StudySettings("s", hook=str(hook)), ingested, 30, root=str(server.root), stop=lambda: True,
                 on_start=started.append)
    assert len(started) == 1


def test_hooks_due_are_recorded_and_read_back_in_order(server: Server, ingested: Event) -> None:
    root = str(server.root)
    first = Event("ingested", "s", "x", fields={**ingested.fields, "seq": 1})
    for ev in (ingested, first, Event("ingested", "a.b", "y", fields={"seq": 10})):
        record_due(root, ev)
    folder = Path(due_dir(root))
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert sorted(os.listdir(folder)) == ["a.b.000000000010.json", "s.000000000001.json", "s.000000000002.json"]
    assert all(stat.S_IMODE((folder / n).stat().st_mode) == 0o600 for n in os.listdir(folder))
    (folder / "s.000000000003.json").write_text('{"version": 1, "study": "s", "seq": 4}')
    got = load_due(root)
    assert [(d.study, d.seq) for d in got] == [("a.b", 10), ("s", 1), ("s", 2)]
    assert got[2].event.fields == ingested.fields and got[2].event.submission == ingested.submission
    assert ".bad-s.000000000003.json" in os.listdir(folder) and "s.000000000003.json" not in os.listdir(folder)


def test_a_hook_taken_up_from_its_record_is_not_run_again_by_its_result(
        server: Server, ingested: Event, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    hook = _script(tmp_path / "hook.sh", f'echo "$DITTOHEAD_SEQ" >> "{out}"\n')
    events: queue.SimpleQueue = queue.SimpleQueue()
    hooks = Hooks(str(server.root), events, lambda study: StudySettings(study, hook=str(hook)), 10)
    record_due(str(server.root), ingested)  # as the worker records it
    assert [d.seq for d in hooks.take_up()] == [2]  # a rescan comes first...
    assert events.get(timeout=10) == ("hook", None, None)
    hooks.ingested(ingested, True)  # ...then the worker's result
    assert hooks.take_up() == [] and hooks.join(5)
    assert out.read_text() == "2\n" and load_due(str(server.root)) == []
    hooks.ingested(Event("ingested", "s", "z", fields={**ingested.fields, "seq": 3}), False)  # no hook: nothing
    assert hooks.join(5) and load_due(str(server.root)) == [] and out.read_text() == "2\n"
