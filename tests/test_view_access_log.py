"""Who reads a study's view, and the study's log in it (issue 12; docs/view.md, "log.jsonl" and
"Who reads it"; docs/server-root.md, "Who reads a study").

The view's top folder holds ``log.jsonl``: one line per ingested submission, what ``log --json``
lists, appended to as submissions are ingested; an old node of it reads its old bytes; only the
new submissions are rendered; many threads read it while an ingest runs. ``StudyView.access``
follows the study's readers setting (``study add/set --readers``) without reopening the view.
The export writes log.jsonl too, appending only, and gives what it writes the view's group and
modes: with real accounts (tests/accounts.py), a member of the readers group reads the export
and another account is refused by the kernel; ``study set`` then ``export --verify`` repairs.
"""

from __future__ import annotations

import grp
import json
import os
import stat
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from accounts import Account, Accounts, make_dir
from conftest import SUBMISSION_RE, Server, describe, write_file

import dittohead.view as view_mod
from dittohead.manifest import Entry, Manifest
from dittohead.store.index import Index
from dittohead.store.repo import Store
from dittohead.studylog import LogRecord
from dittohead.view import LOG_NAME, Access, LogFile, StudyView

T0 = 1_700_000_000_000_000_000
TOP = ["current", "log.jsonl", "submissions", "versions"]


def _log_bytes(view: StudyView, node: LogFile) -> bytes:
    return view.read_log(node, 0, node.size + 1000)


def _lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines()]


def _round(server: Server, src: Path, files: dict[str, bytes], site: str = "lab A") -> None:
    for rel, data in files.items():
        write_file(src / rel, data)
    server.sync(src, site=site)
    server.ingest()


# -- log.jsonl in the view --------------------------------------------------------------------


def test_log_jsonl_is_what_log_json_lists_and_only_grows(server: Server, tmp_path: Path) -> None:
    """An empty study has an empty log.jsonl; each ingest appends its line, which is what
    ``log --json`` gives for that submission, in ASCII; a node made earlier reads its own bytes,
    at any offset, however many submissions came since (in another view of the study too)."""
    src = tmp_path / "src"
    server.ok("study", "add", "e", "--store", server.root)
    sites = ["lab A", "Br\u00f6gden \u202e/2", "lab\x85C"]  # names the log must escape
    _round(server, src, {"a.txt": b"round 1\n"}, sites[0])  # a store with an index, to keep open
    with Store.open(str(server.root)) as store:
        empty_view = StudyView(store, "e")
        assert [name for name, _ in empty_view.listdir("")] == TOP
        assert [name for name, _ in empty_view.children(empty_view.root)] == TOP
        empty = empty_view.lookup(LOG_NAME)
        assert empty == LogFile(0, 0, 0) and empty_view.read_log(empty, 0, 100) == b""
        view = StudyView(store, server.study)
        nodes: list[tuple[LogFile, bytes]] = []
        for i, site in enumerate(sites, 1):
            if i > 1:
                _round(server, src, {"a.txt": f"round {i}\n".encode(), f"r{i}.bin": os.urandom(1000)}, site)
            node = view.lookup(LOG_NAME)
            assert isinstance(node, LogFile) and node.seq == i
            data = _log_bytes(view, node)
            assert len(data) == node.size and data.endswith(b"\n") and data.count(b"\n") == i
            assert data.isascii()
            logged = server.log()
            assert _lines(data) == logged
            assert node.mtime_ns == logged[-1]["ingested_ns"]
            assert dict(view.listdir(""))[LOG_NAME] == node
            assert data.startswith(nodes[-1][1] if nodes else b"")  # appended to, never changed
            nodes.append((node, data))
        assert "\\u202e" in nodes[1][1].decode("ascii") and _lines(nodes[1][1])[1]["site"] == sites[1]
        # every old node reads what it was, whole and in pieces, here and in a fresh view
        other = StudyView(store, server.study)
        for node, data in nodes:
            for v in (view, other):
                assert _log_bytes(v, node) == data
                for off, size in ((0, 1), (3, 50), (node.size - 5, 100), (node.size, 10), (node.size + 7, 3)):
                    assert v.read_log(node, off, size) == data[max(0, off): off + size]
        with pytest.raises(Exception, match="no such path"):
            view.lookup(f"{LOG_NAME}/x")
        # log --json and the view share one function: the same keys, in the same order
        assert list(_lines(nodes[-1][1])[0]) == list(server.log()[0])


def _apply(idx: Index, seq: int, study: str = "s") -> None:
    entries = (Entry(f"f{seq}.txt", 1, 0, 0o644, bytes([seq % 256]) * 32, ()),)
    idx.apply(study, LogRecord(seq, f"sub{seq}", bytes([seq % 256]) * 32, T0 + seq * 10**9, ()),
              Manifest(study, "lab", "ra", "pc", 0, entries))


def test_the_log_renders_only_what_is_new(monkeypatch: pytest.MonkeyPatch) -> None:
    """A study of N submissions is rendered once; one more submission renders one line, and
    looking the log up, listing the top folder and reading it render nothing."""
    calls: list[int] = []
    record = view_mod.submission_record

    def counting(s):  # type: ignore[no-untyped-def]
        calls.append(s.seq)
        return record(s)

    monkeypatch.setattr(view_mod, "submission_record", counting)
    idx = Index(":memory:")
    try:
        for seq in range(1, 301):
            _apply(idx, seq)
        view = StudyView(SimpleNamespace(index=idx), "s")  # type: ignore[arg-type]
        node = view.lookup(LOG_NAME)
        assert isinstance(node, LogFile) and node.seq == 300 and calls == list(range(1, 301))
        calls.clear()
        for _ in range(50):
            assert view.lookup(LOG_NAME) == node
            view.listdir("")
            view.read_log(node, 0, node.size)
        assert calls == []
        _apply(idx, 301)
        newer = view.lookup(LOG_NAME)
        assert isinstance(newer, LogFile) and newer.seq == 301 and calls == [301]
        assert view.read_log(newer, 0, newer.size).startswith(view.read_log(node, 0, node.size))
        for seq in (302, 303):
            _apply(idx, seq)
        view.listdir("")
        assert calls == [301, 302, 303]
    finally:
        idx.close()


def test_many_threads_read_the_log_and_list_while_an_ingest_runs(server: Server, tmp_path: Path) -> None:
    """Reader threads of one view (the mount's) look the log up, read it whole and in pieces,
    and list the top folder, while submissions are ingested: every read is a whole number of
    lines, the first node.seq of the log, and nodes only grow."""
    src = tmp_path / "src"
    _round(server, src, {"a.txt": b"0\n"})
    errors: list[str] = []
    stop = threading.Event()
    with Store.open(str(server.root)) as store:
        view = StudyView(store, server.study)

        def reader() -> None:
            last = 0
            try:
                while not stop.is_set():
                    node = view.lookup(LOG_NAME)
                    assert isinstance(node, LogFile)
                    if node.seq < last:
                        errors.append(f"went back from {last} to {node.seq}")
                    last = node.seq
                    data = b"".join(view.read_log(node, off, 97) for off in range(0, node.size, 97))
                    if data != view.read_log(node, 0, node.size) or len(data) != node.size:
                        errors.append("pieces differ")
                    if [d["seq"] for d in _lines(data)] != list(range(1, node.seq + 1)):
                        errors.append(f"log at {node.seq}: {data[-200:]!r}")
                    if [name for name, _ in view.listdir("")] != TOP:
                        errors.append("top")
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        threads = [threading.Thread(target=reader) for _ in range(6)]
        for t in threads:
            t.start()
        try:
            for i in range(1, 6):
                _round(server, src, {"a.txt": f"{i}\n".encode()})
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert not errors, errors[:5]
        final = view.lookup(LOG_NAME)
        assert isinstance(final, LogFile) and final.seq == 6
        assert _lines(_log_bytes(view, final)) == server.log()


# -- access ------------------------------------------------------------------------------------


def _other_group(not_gid: int) -> grp.struct_group:
    return next(g for g in grp.getgrall() if g.gr_gid != not_gid)


def test_access_follows_the_readers_setting_without_reopening(server: Server) -> None:
    top = os.stat(server.root / "store")
    with Store.open(str(server.root)) as store:
        view = StudyView(store, server.study)
        assert view.access == Access(top.st_uid, top.st_gid, 0o755, 0o444)
        assert view.access is view.access  # read once, until the settings change
        g = _other_group(top.st_gid)
        out = server.ok("study", "set", server.study, "--store", server.root, "--readers", g.gr_name).stdout
        assert f"readers {g.gr_name}" in out
        assert view.access == Access(top.st_uid, g.gr_gid, 0o2750, 0o440)
        doc = json.loads((server.root / "store/studies" / f"{server.study}.json").read_text())
        assert doc["readers"] == g.gr_name
        server.ok("study", "set", server.study, "--store", server.root, "--no-readers")
        assert view.access == Access(top.st_uid, top.st_gid, 0o755, 0o444)
        # a study added with --readers
        server.ok("study", "add", "r", "--store", server.root, "--readers", g.gr_name)
        assert StudyView(store, "r").access == Access(top.st_uid, g.gr_gid, 0o2750, 0o440)


def test_study_set_and_add_refuse_what_is_not_there(server: Server, tmp_path: Path) -> None:
    root = server.root
    no_group = server.proc("study", "set", server.study, "--store", root, "--readers", "dittohead-no-such-group")
    assert no_group.returncode == 2 and "no group named" in no_group.stderr, describe(no_group)
    no_study = server.proc("study", "set", "nosuch", "--store", root, "--readers", "root")
    assert no_study.returncode == 6 and "no study 'nosuch'" in no_study.stderr, describe(no_study)
    both = server.proc("study", "set", server.study, "--store", root, "--readers", "root", "--no-readers")
    assert both.returncode == 2, describe(both)
    added = server.proc("study", "add", "x", "--store", root, "--readers", "dittohead-no-such-group")
    assert added.returncode == 2 and not (root / "dropbox/x").exists(), describe(added)
    # --export / --no-export, and the settings printed
    dest = tmp_path / "out"
    out = server.ok("study", "set", server.study, "--store", root, "--export", dest).stdout
    assert f"export {dest}" in out
    assert "export (none)" in server.ok("study", "set", server.study, "--store", root, "--no-export").stdout
    assert "readers (everyone)" in server.ok("study", "set", server.study, "--store", root).stdout


# -- log.jsonl in the export ---------------------------------------------------------------------


def test_the_export_appends_to_its_log_and_leaves_a_strange_one(server: Server, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """DEST/log.jsonl is the view's; a later export appends the new lines only (after a clean
    export, rendering only them), finishes a line cut short, and leaves a log.jsonl that is not
    the start of the study's log as it is, reported."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    for i in range(3):
        _round(server, src, {"a.txt": f"{i}\n".encode()})
    server.ok("export", "--store", server.root, "--study", server.study, dest)
    log = dest / LOG_NAME
    assert _lines(log.read_bytes()) == server.log()
    assert stat.S_IMODE(log.stat().st_mode) == 0o444
    ino, first = log.stat().st_ino, log.read_bytes()

    _round(server, src, {"a.txt": b"3\n"})
    calls: list[int] = []
    record = view_mod.submission_record
    monkeypatch.setattr(view_mod, "submission_record", lambda s: calls.append(s.seq) or record(s))
    server.ok("export", "--store", server.root, "--study", server.study, dest)
    assert calls == [3, 4]  # its last line, checked, and the one new line
    now = log.read_bytes()
    assert log.stat().st_ino == ino and now.startswith(first) and _lines(now) == server.log()
    assert stat.S_IMODE(log.stat().st_mode) == 0o444

    # a crash while appending: a line cut short is finished
    os.truncate(log, len(now) - 10)
    _round(server, src, {"a.txt": b"4\n"})
    server.ok("export", "--store", server.root, "--study", server.study, dest)
    assert _lines(log.read_bytes()) == server.log()

    # not the study's log: left as it is, reported; the rest is exported
    os.chmod(log, 0o644)
    log.write_bytes(b'{"seq": 1, "forged": true}\n')
    _round(server, src, {"a.txt": b"5\n"})
    res = server.run("export", "--store", server.root, "--study", server.study, dest)
    assert res.exit_code == 0 and f"left untouched, not what the export would write: {log}" in res.stderr
    assert log.read_bytes() == b'{"seq": 1, "forged": true}\n'
    assert (dest / "current/a.txt").read_bytes() == b"5\n"


# -- the export's group and modes, with real accounts ----------------------------------------------


class Deployment:
    """A server root made by the daemon's account, with study s (open to every uploader)."""

    def __init__(self, accounts: Accounts, base: Path) -> None:
        self.accounts = accounts
        self.base = base
        srv = make_dir(base / "srv", accounts.daemon, 0o755)
        self.root = srv / "root"
        self.exports = make_dir(base / "exports", accounts.daemon, 0o755)
        self.src = make_dir(base / "src", accounts.up_a, 0o700)
        self.as_daemon("init", "--store", self.root)

    def run(self, who: Account, *args: object, expect: int | None = 0) -> subprocess.CompletedProcess:
        cp = self.accounts.run_as(who, *args)
        assert "Traceback" not in cp.stderr and "internal error" not in cp.stderr, describe(cp)
        if expect is not None:
            assert cp.returncode == expect, describe(cp)
        return cp

    def as_daemon(self, *args: object, expect: int | None = 0) -> subprocess.CompletedProcess:
        return self.run(self.accounts.daemon, *args, expect=expect)

    def submit(self, files: dict[str, bytes]) -> None:
        up = self.accounts.up_a
        for rel, data in files.items():
            path = self.src / rel
            for parent in reversed(path.relative_to(self.src).parents[:-1]):
                if not (self.src / parent).exists():
                    make_dir(self.src / parent, up, 0o700)
            path.write_bytes(data)
            os.chown(path, up.uid, up.gid)
        cp = self.run(up, "sync", self.src, "--study", "s", "--to", self.root, "--site", "lab-1")
        assert SUBMISSION_RE.search(cp.stdout), describe(cp)
        self.as_daemon("watch", "--store", self.root, "--once")

    def export(self, dest: Path, *extra: str, expect: int | None = 0) -> subprocess.CompletedProcess:
        return self.as_daemon("export", "--store", self.root, "--study", "s", dest, *extra, expect=expect)

    def log(self) -> list[dict]:
        return json.loads(self.as_daemon("log", "--store", self.root, "--study", "s", "--json").stdout)["submissions"]

    def reads(self, who: Account, path: Path) -> str:
        """What ``who`` gets reading the file ``path``: its bytes' length, or the error."""
        code = "import sys\ntry:\n    print(len(open(sys.argv[1], 'rb').read()))\nexcept OSError as e:\n    print(e.strerror)"
        return self.accounts.python_as(who, code, path).stdout.strip()


def _entries(dest: Path) -> list[tuple[Path, os.stat_result]]:
    """DEST and everything below it, as lstat gives it."""
    out = [(dest, os.lstat(dest))]
    for dirpath, dirnames, filenames in os.walk(dest):
        out += [(Path(dirpath, n), os.lstat(os.path.join(dirpath, n))) for n in dirnames + filenames]
    return out


def _assert_access(dest: Path, owner: Account, gid: int, dir_mode: int, file_mode: int) -> None:
    entries = _entries(dest)
    assert len(entries) > 10
    for path, st in entries:
        want = dir_mode if stat.S_ISDIR(st.st_mode) else file_mode
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (owner.uid, gid, want), (
            f"{path}: uid {st.st_uid} gid {st.st_gid} mode {stat.S_IMODE(st.st_mode):04o}")


@pytest.fixture
def dep(accounts: Accounts, acct_dir: Path) -> Deployment:
    return Deployment(accounts, acct_dir)


def test_an_export_with_readers_is_theirs_alone(dep: Deployment) -> None:
    """study add --readers GA, export as the daemon: folders setgid GA 2750, files 0440, DEST
    included; up_a (in GA) reads, reader and up_b (not in GA) are refused by the kernel; its
    log.jsonl is the study's log. study set --readers GB, a new submission, export: what is new
    is GB's; export --verify gives the rest to GB. --no-readers and --verify: everyone's."""
    acc = dep.accounts
    ga, gb = acc.ga, acc.gb
    dep.as_daemon("study", "add", "s", "--store", dep.root, "--readers", ga.name)
    dep.submit({"a.txt": b"first\n", "d/e/b.csv": b"1,2\n"})
    dep.submit({"a.txt": b"second\n"})
    dest = dep.exports / "s"
    dep.export(dest)
    _assert_access(dest, acc.daemon, ga.gid, 0o2750, 0o440)
    assert _lines((dest / LOG_NAME).read_bytes()) == dep.log()
    current = dest / "current/a.txt"
    assert dep.reads(acc.up_a, current) == str(len(b"second\n"))
    assert dep.reads(acc.up_a, dest / LOG_NAME) == str((dest / LOG_NAME).stat().st_size)
    for who in (acc.reader, acc.up_b):
        assert dep.reads(who, current) == "Permission denied", who.role
        assert dep.reads(who, dest / LOG_NAME) == "Permission denied", who.role

    # the readers change: what is new is theirs; --verify gives them the rest
    out = dep.as_daemon("study", "set", "s", "--store", dep.root, "--readers", gb.name).stdout
    assert f"readers {gb.name}" in out
    dep.submit({"a.txt": b"third\n", "n/new.txt": b"new\n"})
    dep.export(dest)
    assert os.lstat(dest / "current/n").st_gid == gb.gid
    assert os.lstat(dest / "current/n/new.txt").st_gid == gb.gid
    assert os.lstat(dest / "current/d/e/b.csv").st_gid == ga.gid  # an earlier one: until --verify
    out = dep.export(dest, "--verify").stdout
    assert "given the study's group and modes" in out, out
    _assert_access(dest, acc.daemon, gb.gid, 0o2750, 0o440)
    assert _lines((dest / LOG_NAME).read_bytes()) == dep.log()
    assert dep.reads(acc.up_b, current) == str(len(b"third\n"))
    for who in (acc.reader, acc.up_a):
        assert dep.reads(who, current) == "Permission denied", who.role
    again = dep.export(dest, "--verify").stdout
    assert "given the study's group and modes" not in again, again

    # no readers: everyone reads, after --verify
    dep.as_daemon("study", "set", "s", "--store", dep.root, "--no-readers")
    dep.export(dest, "--verify")
    for path, st in _entries(dest):
        assert stat.S_IMODE(st.st_mode) == (0o755 if stat.S_ISDIR(st.st_mode) else 0o444), path
    assert dep.reads(acc.reader, current) == str(len(b"third\n"))


def test_an_export_for_readers_the_daemon_is_not_among_stops_at_once(dep: Deployment) -> None:
    """Readers whose group the exporting account is not a member of: export (and watch's) says
    so in one line, with the usermod to run, and writes nothing."""
    acc = dep.accounts
    theirs = grp.getgrgid(acc.reader.gid).gr_name  # reader's own group: the daemon is not in it
    dest = dep.exports / "s"
    added = dep.as_daemon("study", "add", "s", "--store", dep.root, "--readers", theirs, "--export", dest)
    assert f"usermod -aG {theirs}" in added.stderr, describe(added)
    up = acc.up_a
    write = dep.src / "a.txt"
    write.write_bytes(b"x\n")
    os.chown(write, up.uid, up.gid)
    dep.run(up, "sync", dep.src, "--study", "s", "--to", dep.root, "--site", "lab-1")
    watched = dep.as_daemon("watch", "--store", dep.root, "--once", expect=1)
    assert f"usermod -aG {theirs}" in watched.stderr, describe(watched)
    cp = dep.export(dest, expect=1)
    assert f"group {theirs}" in cp.stderr and f"usermod -aG {theirs}" in cp.stderr, describe(cp)
    assert len(cp.stderr.strip().splitlines()) == 1, describe(cp)
    assert not dest.exists()
