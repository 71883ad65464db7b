"""The command line as a user meets it: exit codes, messages, options, what sync skips.

Exit codes (dittohead.errors): 0 ok, 1 failure (one line on stderr, never a traceback), 2 usage,
3 damage, 4 locked, 5 unsupported format, 130 interrupted. Where the exact message or exit code
a user sees matters, the test runs a real ``python -m dittohead`` process.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import re
import signal
import subprocess
import tempfile
import time
import unicodedata
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import Server, describe, raised, store_snapshot, tree_snapshot, write_file

from dittohead import errors
from dittohead.cli import cli

CONTRACT_COMMANDS = {
    ("init",),
    ("study", "add"),
    ("sync",),
    ("watch",),
    ("log",),
    ("ls",),
    ("versions",),
    ("cat",),
    ("export",),
    ("fsck",),
}


def all_commands(group: click.Command, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    if isinstance(group, click.Group):
        ctx = click.Context(group)
        for name in group.list_commands(ctx):
            sub = group.get_command(ctx, name)
            assert sub is not None, name
            found.append(prefix + (name,))
            found += all_commands(sub, prefix + (name,))
    return found


def assert_one_line_failure(
    cp: subprocess.CompletedProcess, code: int = errors.EXIT_FAILURE
) -> str:
    assert cp.returncode == code, describe(cp)
    message = cp.stderr.strip()
    assert message, describe(cp)
    assert "Traceback" not in cp.stderr, describe(cp)
    assert len(message.splitlines()) == 1, f"not one line:\n{cp.stderr}"
    assert cp.stdout == b"", describe(cp)
    return message


def assert_usage_error(cp: subprocess.CompletedProcess) -> None:
    assert cp.returncode == errors.EXIT_USAGE, describe(cp)
    assert "Traceback" not in cp.stderr, describe(cp)
    assert cp.stderr.strip(), describe(cp)


@pytest.fixture
def synced(server: Server, tmp_path: Path) -> Path:
    """A source with two files, synced and ingested; returns the source."""
    src = tmp_path / "src"
    write_file(src / "a.txt", b"alpha\n")
    write_file(src / "dir/b.csv", b"1,2,3\n")
    server.sync(src)
    server.ingest()
    return src


# -- help and usage ---------------------------------------------------------------------------


def test_help_of_every_command(server: Server) -> None:
    commands = all_commands(cli)
    assert CONTRACT_COMMANDS <= set(commands), sorted(CONTRACT_COMMANDS - set(commands))
    result = server.ok("--help")
    assert "Usage" in result.stdout
    for command in commands:
        result = server.ok(*command, "--help")
        assert "Usage" in result.stdout, (command, result.stdout)


def test_help_through_the_console_entry_point(server: Server) -> None:
    cp = server.proc("--help")
    assert cp.returncode == 0, describe(cp)
    assert b"Usage" in cp.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["sync", "--no-such-option"],
        ["no-such-command"],
        ["log", "--study", "s"],  # no --store and no DITTOHEAD_STORE
        ["cat", "--study", "s", "a.txt"],  # no --store
        ["cat", "--store", "{root}", "--study", "s", "a.txt", "--version", "0"],
        ["cat", "--store", "{root}", "--study", "s", "a.txt", "--version", "-1"],
        ["cat", "--store", "{root}", "--study", "s", "a.txt", "--version", "x"],
        ["sync", "{root}", "--study", "s"],  # no --to
        ["sync", "{root}", "--to", "{root}", "--study", "s", "--min-age", "soon"],
    ],
)
def test_usage_errors_exit_2_without_traceback(
    server: Server, synced: Path, args: list[str]
) -> None:
    argv = [a.replace("{root}", str(server.root)) for a in args]
    result = server.run(*argv)
    assert result.exit_code == errors.EXIT_USAGE and raised(result) is None, describe(result)
    assert "Traceback" not in result.stderr
    assert result.stdout == "", describe(result)


def test_usage_error_through_a_real_process(server: Server) -> None:
    assert_usage_error(
        server.proc("cat", "--store", server.root, "--study", "s", "a.txt", "--version", "0")
    )
    assert_usage_error(server.proc("log", "--study", "s"))


def test_store_from_environment(server: Server, synced: Path) -> None:
    env = {"DITTOHEAD_STORE": str(server.root)}
    result = server.ok("cat", "--study", "s", "a.txt", env=env)
    assert result.stdout_bytes == b"alpha\n"
    log = json.loads(server.ok("log", "--study", "s", "--json", env=env).stdout)
    assert len(log["submissions"]) == 1
    cp = server.proc("cat", "--study", "s", "dir/b.csv", env=env)
    assert cp.returncode == 0, describe(cp)
    assert cp.stdout == b"1,2,3\n"


# -- failures: one line, exit 1 ----------------------------------------------------------------


def test_paths_are_taken_as_typed(server: Server, tmp_path: Path) -> None:
    """cat and versions find a path however a shell spells it: a leading or doubled slash, a
    ``.`` part. Its bytes are its own: an NFC and an NFD name are two files, each found only by
    its own bytes."""
    nfc = unicodedata.normalize("NFC", "caf\u00e9 \u00fc.txt")
    nfd = unicodedata.normalize("NFD", nfc)
    write_file(tmp_path / "src" / "d" / nfc, b"latte\n")
    write_file(tmp_path / "src" / "d" / nfd, b"decomposed latte\n")
    server.sync(tmp_path / "src")
    server.ingest()
    for typed in (f"d/{nfc}", f"/d/{nfc}", f"./d//{nfc}", f"d/./{nfc}/"):
        assert server.cat(typed) == b"latte\n", typed
        res = server.run("versions", "--store", server.root, "--study", "s", typed, "--json")
        assert res.exit_code == 0, describe(res)
        assert json.loads(res.stdout)["path"] == f"d/{nfc}"
    assert server.cat(f"d/{nfd}") == b"decomposed latte\n"
    assert server.run("cat", "--store", server.root, "--study", "s", f"d/../d/{nfc}").exit_code == 1


def test_cat_of_missing_path_or_version_fails_in_one_line(server: Server, synced: Path) -> None:
    message = assert_one_line_failure(
        server.proc("cat", "--store", server.root, "--study", "s", "nope.txt")
    )
    assert "nope.txt" in message
    assert_one_line_failure(
        server.proc("cat", "--store", server.root, "--study", "s", "a.txt", "--version", "2")
    )
    assert_one_line_failure(
        server.proc("cat", "--store", server.root, "--study", "nostudy", "a.txt"), errors.EXIT_NO_STUDY
    )
    assert_one_line_failure(
        server.proc("versions", "--store", server.root, "--study", "s", "nope.txt", "--json")
    )
    cp = server.proc("cat", "--store", server.root, "--study", "s", "a.txt", "--version", "1")
    assert cp.returncode == 0 and cp.stdout == b"alpha\n", describe(cp)


def test_commands_on_a_missing_store_fail_in_one_line(tmp_path: Path) -> None:
    server = Server(tmp_path)  # never initialised
    src = tmp_path / "src"
    write_file(src / "a.txt", b"x")
    assert_one_line_failure(server.proc("log", "--store", server.root, "--study", "s"))
    assert_one_line_failure(server.proc("watch", "--store", server.root, "--once"))
    assert_one_line_failure(server.proc("sync", src, "--study", "s", "--to", server.root))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root, to run as nobody")
def test_a_store_the_account_may_not_read_says_permission_denied() -> None:
    """As an account other than the daemon's, the store (0700) is unreadable: the error says so,
    not that the root is not a server root."""
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)  # reachable by the unprivileged account; store/ stays 0700
        server = Server(Path(tmp))
        server.ok("init", "--store", server.root)
        # Imported first: here the interpreter's own library may be unreadable to nobody.
        importlib.import_module("dittohead.cli.read")
        importlib.import_module("dittohead.store.repo")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: the nobody account, running the command in this process
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                res = CliRunner().invoke(cli, ["log", "--store", str(server.root), "--study", "s"])
                os.write(w, json.dumps([res.exit_code, res.stderr]).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            code, stderr = json.loads(f.read())
        os.waitpid(pid, 0)
    assert code == errors.EXIT_FAILURE
    assert "permission denied" in stderr and "not a dittohead server root" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_a_destination_that_is_a_file_and_an_empty_export_dest(server: Server, synced: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_bytes(b"not a server root\n")
    message = assert_one_line_failure(server.proc("sync", synced, "--study", "s", "--to", a_file))
    assert "not a folder" in message, message
    res = server.run("export", "--store", server.root, "--study", "s", "")
    assert res.exit_code == errors.EXIT_USAGE and "empty path" in res.stderr, describe(res)
    assert a_file.read_bytes() == b"not a server root\n"


def test_sync_of_a_missing_source_or_study_fails_in_one_line(
    server: Server, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    write_file(src / "a.txt", b"x")
    # A SOURCE that does not exist is a bad argument: a usage error.
    assert_usage_error(
        server.proc("sync", tmp_path / "nonexistent", "--study", "s", "--to", server.root)
    )
    assert_one_line_failure(
        server.proc("sync", src, "--study", "nostudy", "--to", server.root), errors.EXIT_NO_STUDY
    )
    assert server.inbox_entries() == []


# -- sync's options and summary ----------------------------------------------------------------


def test_dry_run_sends_nothing_and_says_what_it_would_send(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_file(src / "first file.txt", b"one\n")
    write_file(src / "nested/second.csv", b"two\n")
    before = tree_snapshot(server.root)
    dry = server.sync(src, dry_run=True)
    assert server.inbox_entries() == []
    assert tree_snapshot(server.root) == before, "a dry run changed the server root"
    out = dry.output
    assert "2 files" in out or ("first file.txt" in out and "nested/second.csv" in out), out
    # The dry run did not make the real one think the files were already sent.
    real = server.sync(src)
    assert real.submission is not None, real.output
    server.ingest()
    assert server.cat("first file.txt") == b"one\n"
    assert server.cat("nested/second.csv") == b"two\n"


def test_nothing_to_send_says_so_and_makes_no_submission(
    server: Server, synced: Path, tmp_path: Path
) -> None:
    again = server.sync(synced)
    assert again.submission is None
    assert re.search("nothing to send", again.output, re.IGNORECASE), again.output
    assert server.inbox_entries() == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert server.sync(empty).submission is None
    assert server.inbox_entries() == []
    assert len(server.log()) == 1


def test_min_age_skips_a_file_written_just_now(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_file(src / "old.txt", b"finished two hours ago\n")
    two_hours_ago = time.time_ns() - 2 * 3600 * 10**9
    os.utime(src / "old.txt", ns=(two_hours_ago, two_hours_ago))
    write_file(src / "recording.txt", b"still being written\n")
    sent = server.sync(src, min_age=3600)
    assert sent.submission is not None, sent.output
    assert skipped_count(sent.output) == 1 and re.search("too new|min-age", sent.output), (
        f"the summary does not say a file was skipped as too new:\n{sent.output}"
    )
    server.ingest()
    assert server.cat("old.txt") == b"finished two hours ago\n"
    assert server.run("cat", "--store", server.root, "--study", "s", "recording.txt").exit_code == 1
    # Without --min-age it goes.
    later = server.sync(src)
    assert later.submission is not None, later.output
    server.ingest()
    assert server.cat("recording.txt") == b"still being written\n"


def test_include_and_exclude_globs(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    names = ["a.csv", "b.txt", "x.tmp", "sub/c.csv", "sub/d.txt", "sub/y.tmp", "sub/skip_me.csv"]
    for name in names:
        write_file(src / name, name.encode())
    first_run = server.sync(src, include=["*.csv"], exclude=["*skip*"])
    assert "; 5 files left out by --include/--exclude" in first_run.output, first_run.output
    server.ingest()
    server.sync(src, site="second", exclude=["*.tmp"])
    server.ingest()
    nothing = server.sync(src, include=["/abs/*"])  # matches nothing: said, not silent
    assert nothing.submission is None
    assert "nothing to send (0 unchanged files); 7 files left out by --include/--exclude" in nothing.output
    sent = {
        name
        for name in names
        if server.run("cat", "--store", server.root, "--study", "s", name).exit_code == 0
    }
    assert sent == {"a.csv", "sub/c.csv", "b.txt", "sub/d.txt", "sub/skip_me.csv"}
    first, second = server.log()
    assert first["new_versions"] == 2, first  # a.csv, sub/c.csv
    assert second["new_versions"] == 3, second  # b.txt, sub/d.txt, sub/skip_me.csv
    for name in sent:
        assert server.cat(name) == name.encode()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs symlinks and FIFOs (POSIX)")
def test_symlinks_and_fifos_are_skipped_and_counted(server: Server, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write_file(outside / "secret.txt", b"SECRET-OUTSIDE-THE-SOURCE")
    write_file(outside / "dir/inner.txt", b"SECRET-INSIDE-A-LINKED-DIR")
    src = tmp_path / "src"
    write_file(src / "a.txt", b"regular\n")
    os.symlink(outside / "secret.txt", src / "link.txt")
    os.symlink(outside / "dir", src / "linked dir")
    os.mkfifo(src / "pipe")
    # A real process with a time-out: opening the FIFO would hang it.
    cp = server.proc(*server.sync_args(src), timeout=60)
    assert cp.returncode == 0, describe(cp)
    summary = cp.stdout.decode() + cp.stderr
    assert skipped_count(summary) == 3, f"the summary does not count 3 skipped entries:\n{summary}"
    server.ingest()
    assert server.cat("a.txt") == b"regular\n"
    for path in ("link.txt", "linked dir/inner.txt", "linked dir", "pipe"):
        assert (
            server.run("versions", "--store", server.root, "--study", "s", path, "--json").exit_code
            == 1
        ), path
    stored = b"".join(p.read_bytes() for p in (server.root / "store").rglob("*") if p.is_file())
    assert b"SECRET" not in stored
    assert (outside / "secret.txt").read_bytes() == b"SECRET-OUTSIDE-THE-SOURCE"


@pytest.mark.skipif(os.name != "posix", reason="names with control characters and backslashes (POSIX)")
def test_every_name_is_sent_under_its_own_bytes(server: Server, tmp_path: Path) -> None:
    """Names format 1 skipped (a tab, a backslash, bytes that are not UTF-8) and long paths are
    sent, stored and read back under their own bytes; the sync names none of them as a problem."""
    src = tmp_path / "src"
    write_file(src / "ok/a.txt", b"kept\n")
    write_file(src / "ok/tab\there.txt", b"control character")
    write_file(src / "back\\slash/inner.txt", b"in a folder whose name has a backslash")
    os.makedirs(os.path.join(os.fsencode(src), b"lat\xe9n"))
    with open(os.path.join(os.fsencode(src), b"lat\xe9n", b"\xff.csv"), "wb") as f:
        f.write(b"latin-1 folder, a byte that is never UTF-8")
    write_file(src / ("x" * 200) / ("y" * 200) / ("z" * 200) / "deep.txt", b"fine: each name is short")
    cp = server.proc(*server.sync_args(src), timeout=60)
    assert cp.returncode == 0, describe(cp)
    summary = cp.stdout.decode() + cp.stderr
    assert "skipped" not in summary and "warning" not in summary, summary
    server.ingest()
    assert server.cat("ok/a.txt") == b"kept\n"
    assert server.cat("/".join(("x" * 200, "y" * 200, "z" * 200, "deep.txt"))) == b"fine: each name is short"
    assert server.cat("ok/tab\there.txt") == b"control character"
    assert server.cat("back\\slash/inner.txt") == b"in a folder whose name has a backslash"
    assert server.cat(os.fsdecode(b"lat\xe9n/\xff.csv")) == b"latin-1 folder, a byte that is never UTF-8"
    assert server.cat("lat\\xe9n/\\xff.csv") == b"latin-1 folder, a byte that is never UTF-8"  # as printed


def skipped_count(summary: str) -> int:
    """The total of the counts in the summary's "skipped: 2 symlinks, 1 special file" part."""
    match = re.search(r"skipped:?([^\n]*)", summary, re.IGNORECASE)
    assert match, f"no 'skipped' in the summary:\n{summary}"
    return sum(int(n) for n in re.findall(r"\b(\d+)\b", match.group(1)))


# -- JSON output -------------------------------------------------------------------------------


def test_log_json_is_one_document(server: Server, synced: Path) -> None:
    cp = server.proc("log", "--store", server.root, "--study", "s", "--json")
    assert cp.returncode == 0, describe(cp)
    doc = json.loads(cp.stdout)  # raises on anything but exactly one document
    assert doc["study"] == "s"
    (sub,) = doc["submissions"]
    assert sub["seq"] == 1
    assert sub["files"] == 2 and sub["new_versions"] == 2
    assert sub["bytes"] == len(b"alpha\n") + len(b"1,2,3\n")
    assert (
        isinstance(sub["ingested_ns"], int)
        and abs(sub["ingested_ns"] - time.time_ns()) < 3600 * 10**9
    )
    assert re.fullmatch(r"[0-9a-f]{64}", sub["manifest"]), sub
    for key in ("name", "site", "user", "host"):
        assert isinstance(sub[key], str), (key, sub)


def test_versions_json_is_one_document(server: Server, synced: Path) -> None:
    write_file(synced / "a.txt", b"alpha, edited\n")
    server.sync(synced, site="lab2")
    server.ingest()
    cp = server.proc("versions", "--store", server.root, "--study", "s", "a.txt", "--json")
    assert cp.returncode == 0, describe(cp)
    doc = json.loads(cp.stdout)
    assert doc["study"] == "s" and doc["path"] == "a.txt"
    v1, v2 = doc["versions"]
    assert (v1["version"], v2["version"]) == (1, 2)
    assert (v1["seq"], v2["seq"]) == (1, 2)
    assert (v1["size"], v2["size"]) == (6, 14)
    assert v2["site"] == "lab2"
    assert v1["ingested_ns"] <= v2["ingested_ns"]
    assert v1["hash"] != v2["hash"] and re.fullmatch(r"[0-9a-f]{64}", v2["hash"])
    assert v2["mtime_ns"] == os.stat(synced / "a.txt").st_mtime_ns
    assert server.cat("a.txt", version=1) == b"alpha\n"
    assert server.cat("a.txt") == b"alpha, edited\n"


# -- ls ------------------------------------------------------------------------------------------


def test_ls_lists_a_folder_as_current_shows_it(server: Server, synced: Path) -> None:
    """Folders (NAME/), and for each file its versions, latest size and latest ingest time; a
    file that became a folder is listed twice, the file as NAME~file; a file's PATH lists it."""
    write_file(synced / "a.txt", b"alpha, edited\n")
    write_file(synced / "data", b"a file called data\n")
    server.sync(synced)
    server.ingest()
    (synced / "data").unlink()
    write_file(synced / "data/inner.txt", b"now a folder\n")
    server.sync(synced)
    server.ingest()
    log = server.log()

    def ls(*args: object) -> list[str]:
        cp = server.proc("ls", "--store", server.root, "--study", "s", *args)
        assert cp.returncode == 0 and not cp.stderr, describe(cp)
        return cp.stdout.decode().splitlines()

    from dittohead.units import utc_iso

    header, *lines = ls()
    assert header.split() == ["versions", "size", "ingested", "name"]
    assert [line.split()[-1] for line in lines] == ["a.txt", "data/", "data~file", "dir/"]
    a = lines[0].split("  ")
    assert [x.strip() for x in a if x.strip()] == ["2", "14 B", utc_iso(log[1]["ingested_ns"]), "a.txt"]
    assert lines[1].strip() == "data/" and lines[3].strip() == "dir/"
    assert lines[2].split()[0] == "1" and utc_iso(log[1]["ingested_ns"]) in lines[2]
    assert [line.split()[-1] for line in ls("dir")[1:]] == ["b.csv"]
    assert [line.split()[-1] for line in ls("/data/")[1:]] == ["inner.txt"]
    (one,) = ls("dir/b.csv")[1:]
    assert one.split()[0] == "1" and one.endswith("  dir/b.csv")
    assert ls("data~file")[1].endswith("  data~file")

    cp = server.proc("ls", "--store", server.root, "--study", "s", "--json")
    assert cp.returncode == 0, describe(cp)
    doc = json.loads(cp.stdout)
    assert (doc["study"], doc["path"], doc["kind"]) == ("s", "", "folder")
    by_name = {e["name"]: e for e in doc["entries"]}
    assert list(by_name) == ["a.txt", "data", "data~file", "dir"]
    assert by_name["a.txt"] == {"name": "a.txt", "path": "a.txt", "kind": "file", "versions": 2, "size": 14,
                                "ingested_ns": log[1]["ingested_ns"], "ingested": utc_iso(log[1]["ingested_ns"])}
    assert by_name["data~file"]["path"] == "data" and by_name["data~file"]["versions"] == 1
    assert by_name["dir"] == {"name": "dir", "path": "dir", "kind": "folder", "versions": None, "size": None,
                              "ingested_ns": None, "ingested": None}
    cp = server.proc("ls", "--store", server.root, "--study", "s", "dir/b.csv", "--json")
    doc = json.loads(cp.stdout)
    assert doc["kind"] == "file" and [e["path"] for e in doc["entries"]] == ["dir/b.csv"]


@pytest.mark.skipif(os.name != "posix", reason="a name that is not UTF-8 (POSIX)")
def test_ls_takes_and_prints_names_escaped(server: Server, tmp_path: Path) -> None:
    """A PATH as stored or as printed (the rule of cat and versions); names printed escaped, and
    in --json as text with their bytes in base64 where they are not UTF-8."""
    src = tmp_path / "src"
    os.makedirs(os.path.join(os.fsencode(src), b"lat\xe9n"))
    with open(os.path.join(os.fsencode(src), b"lat\xe9n", b"r\xe9sum\xe9" + "\u202e".encode() + b".csv"), "wb") as f:
        f.write(b"latin-1\n")
    server.sync(src)
    server.ingest()
    printed = "r\\xe9sum\\xe9\\u202e.csv"
    for typed in (os.fsdecode(b"lat\xe9n"), "lat\\xe9n"):
        cp = server.proc("ls", "--store", server.root, "--study", "s", typed)
        assert cp.returncode == 0 and not cp.stderr, describe(cp)
        out = cp.stdout.decode("ascii")  # nothing a name holds reaches the terminal raw
        assert out.splitlines()[1].endswith("  " + printed), out
    cp = server.proc("ls", "--store", server.root, "--study", "s", "--json")
    (entry,) = json.loads(cp.stdout)["entries"]
    assert entry["name"] == os.fsdecode(b"lat\xe9n") and entry["name_b64"] == "bGF06W4="


def test_ls_of_a_path_that_is_not_there_fails_in_one_line(server: Server, synced: Path, tmp_path: Path) -> None:
    message = assert_one_line_failure(server.proc("ls", "--store", server.root, "--study", "s", "nope"))
    assert "no file or folder 'nope'" in message
    assert_one_line_failure(server.proc("ls", "--store", server.root, "--study", "s", "dir/b.csv/x"))
    assert_one_line_failure(server.proc("ls", "--store", server.root, "--study", "s", "no\u202eth", "--json"))
    assert_one_line_failure(server.proc("ls", "--store", server.root, "--study", "nostudy"), errors.EXIT_NO_STUDY)
    server.ok("study", "add", "empty", "--store", server.root)
    cp = server.proc("ls", "--store", server.root, "--study", "empty")
    assert cp.returncode == 0 and cp.stdout == b"empty: no submissions yet\n", describe(cp)
    cp = server.proc("ls", "--store", server.root, "--study", "empty", "--json")
    assert json.loads(cp.stdout)["entries"] == [], describe(cp)


# -- ingest rejections, fsck, format versions ---------------------------------------------------


def test_tampered_submission_is_rejected_with_a_reason(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_file(src / "a.bin", random.Random(3).randbytes(50_000))
    sent = server.sync(src)
    assert sent.submission is not None
    packs = sorted((server.dropbox("inbox") / sent.submission).glob("*.pack"))
    assert packs, os.listdir(server.dropbox("inbox") / sent.submission)
    data = bytearray(packs[0].read_bytes())
    data[len(data) // 3] ^= 0x01  # one bit, inside the chunk bytes
    packs[0].write_bytes(bytes(data))
    store_before = store_snapshot(server.root)

    result = server.run("watch", "--store", server.root, "--once")
    assert result.exit_code == errors.EXIT_FAILURE and raised(result) is None, describe(result)
    reason = server.dropbox("failed") / sent.submission / "REASON"
    assert reason.is_file(), list(server.dropbox("failed").rglob("*"))
    assert reason.read_text().strip()
    assert server.log() == []
    assert store_snapshot(server.root) == store_before, "a rejected submission changed the store"
    assert server.run("cat", "--store", server.root, "--study", "s", "a.bin").exit_code == 1


def test_fsck_clean_and_damaged(server: Server, synced: Path) -> None:
    clean = server.proc("fsck", "--store", server.root, "--read-data", "--json")
    assert clean.returncode == 0, describe(clean)
    doc = json.loads(clean.stdout)
    assert doc["ok"] is True and doc["findings"] == [], doc
    packs = sorted((server.root / "store" / "packs").rglob("*.pack"))
    assert packs
    pack = packs[0]
    os.chmod(pack, 0o600)
    data = bytearray(pack.read_bytes())
    data[20] ^= 0x80  # inside the first chunk's bytes (after the 12-byte header)
    pack.write_bytes(bytes(data))
    damaged = server.proc("fsck", "--store", server.root, "--read-data", "--json")
    assert damaged.returncode == errors.EXIT_DAMAGE, describe(damaged)
    doc = json.loads(damaged.stdout)
    assert doc["ok"] is False and doc["findings"], doc
    # Reads verify: the damaged chunk is never served as data.
    for path in ("a.txt", "dir/b.csv"):
        cp = server.proc("cat", "--store", server.root, "--study", "s", path)
        if cp.stdout:
            assert cp.stdout in (b"alpha\n", b"1,2,3\n") and cp.returncode == 0, describe(cp)
        else:
            # Invariant 4: an I/O error and a log line (so the reason may come twice), never data.
            assert cp.returncode == errors.EXIT_FAILURE, describe(cp)
            assert "Traceback" not in cp.stderr and "does not match" in cp.stderr, describe(cp)


# -- locks and interrupts: a real sync caught mid-upload ---------------------------------------


def start_slow_sync(server: Server, tmp_path: Path) -> subprocess.Popen | None:
    """Start a sync of a large source; return it once its staging folder is in the inbox (it
    then holds its lock), or None if it finished before it could be caught."""
    src = tmp_path / "big"
    rng = random.Random(11)
    for i in range(6):
        write_file(src / f"part{i}.bin", rng.randbytes(16 * 1024 * 1024))
    # stderr to a file, not a pipe: a full pipe would stall the sync.
    with open(tmp_path / "first.err", "wb") as err:
        proc = server.popen(*server.sync_args(src), stderr=err)
    inbox = server.dropbox("inbox")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if any(name.startswith(".") for name in os.listdir(inbox)):
            return proc
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    return None


@pytest.mark.slow
def test_second_sync_while_one_holds_the_lock_exits_4(server: Server, tmp_path: Path) -> None:
    first = start_slow_sync(server, tmp_path)
    if first is None:
        pytest.skip("the first sync finished before it could be caught holding its lock")
    first.send_signal(signal.SIGSTOP)
    try:
        small = tmp_path / "small"
        write_file(small / "x.txt", b"x")
        second = server.proc(*server.sync_args(small), timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert_one_line_failure(second, errors.EXIT_LOCKED)
    first.wait(timeout=120)
    assert first.returncode == 0, (tmp_path / "first.err").read_text()
    server.ingest()
    assert len(server.log()) == 1


@pytest.mark.slow
def test_interrupted_sync_exits_130_in_one_line(server: Server, tmp_path: Path) -> None:
    proc = start_slow_sync(server, tmp_path)
    if proc is None:
        pytest.skip("the sync finished before it could be interrupted")
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    err = (tmp_path / "first.err").read_text()
    assert proc.returncode == errors.EXIT_INTERRUPTED, err
    assert "Traceback" not in err, err
    assert err.strip(), "no message on stderr"
    # Nothing half-written was committed; the next sync completes.
    assert [n for n in server.inbox_entries() if not n.startswith(".")] == []
    small = tmp_path / "small"
    write_file(small / "x.txt", b"x")
    assert server.sync(small).submission is not None


@pytest.mark.parametrize(
    "change", [{"version": 99}, {"chunking": {"chunker": "fastcdc2020", "min": 1}}]
)
def test_unsupported_store_format_exits_5(server: Server, synced: Path, change: dict) -> None:
    config = server.root / "store" / "config"
    doc = json.loads(config.read_text())
    doc.update(change)
    os.chmod(config, 0o600)
    config.write_text(json.dumps(doc))
    assert_one_line_failure(
        server.proc("log", "--store", server.root, "--study", "s"), errors.EXIT_UNSUPPORTED
    )
    assert_one_line_failure(
        server.proc("cat", "--store", server.root, "--study", "s", "a.txt"), errors.EXIT_UNSUPPORTED
    )


def test_ctrl_c_outside_a_command_is_the_same_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while click starts, or after a command has printed its last line, comes through
    main() rather than the command's own handling: still one line and exit 130, no traceback."""
    import dittohead.cli as cli_pkg

    def interrupted(**kw: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_pkg, "cli", interrupted)
    with pytest.raises(SystemExit) as e:
        cli_pkg.main()
    assert e.value.code == errors.EXIT_INTERRUPTED
    assert capsys.readouterr().err == "dittohead: interrupted\n"
