"""Shared fixtures: real server roots in tmp dirs, driven through the public command line.

Every test runs with its own client state dir (``DITTOHEAD_STATE_DIR``) and without
``DITTOHEAD_STORE`` (the autouse fixture ``_isolated_env``). A :class:`Server` bundles one
server root and one client state dir; it drives the CLI in-process through click's CliRunner
(fast, used for most calls) or as a real ``python -m dittohead`` process (``proc``: for exit
codes and messages exactly as a user sees them, for time-outs, and for the crash tests).

Fixtures:
    server      a Server whose root is initialised with study "s"
    root        that server's root (a Path)
    run         run(*args, input=None, env=None) -> click Result, in-process
    sync        sync(src, **opts) -> SyncResult; asserts exit 0
    ingest      ingest() -> Result of ``watch --once``; asserts exit 0
    cat         cat(path, version=None) -> bytes; asserts exit 0
    versions    versions(path) -> list of version dicts (``versions --json``)
    new_server  new_server(base_dir) -> a fresh initialised Server (for hypothesis examples and
                loops that need a root of their own per run)

Real accounts (tests/accounts.py; root only, skipped otherwise): for tests that cross accounts,
each side runs as its own unprivileged account, never as root.
    accounts    the session's Accounts: daemon, up_a (group ga), up_b (group gb), reader; run
                ``python -m dittohead`` as one with accounts.run_as(acct, *args), a snippet with
                python_as(acct, code), a daemon to SIGKILL with spawn_as(acct, *args)
    acct_dir    a fresh /tmp/dittohead-acct-XXXXXX (0755, root's) the accounts can traverse
                (tmp_path they cannot); removed after the test, with spawn_as children killed
                first. make_dir(path, owner, mode) makes a folder there owned by an account.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from accounts import Accounts, Unavailable
from click.testing import CliRunner, Result

from dittohead.cli import cli

STUDY = "s"
PYTHON = sys.executable

# "... submission NAME" in sync's summary line (followed by "; skipped: ..." when it skipped some).
SUBMISSION_RE = re.compile(r"submission\s+([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:;|$)", re.MULTILINE)
NOTHING_RE = re.compile(r"nothing to send", re.IGNORECASE)


def describe(result: Any) -> str:
    """A readable account of a CLI run (in-process Result or CompletedProcess), for asserts."""
    if isinstance(result, subprocess.CompletedProcess):
        out = (
            result.stdout
            if isinstance(result.stdout, str)
            else result.stdout.decode("utf-8", "replace")
        )
        err = (
            result.stderr
            if isinstance(result.stderr, str)
            else result.stderr.decode("utf-8", "replace")
        )
        return (
            f"args={result.args!r}\nexit={result.returncode}\n"
            f"stdout={out[-3000:]!r}\nstderr={err[-3000:]!r}"
        )
    text = (
        f"exit={result.exit_code}\n"
        f"stdout={result.stdout[-3000:]!r}\nstderr={result.stderr[-3000:]!r}"
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        text += "\nexception:\n" + "".join(traceback.format_exception(*result.exc_info))
    return text


def raised(result: Result) -> BaseException | None:
    """The exception an in-process run let escape (a traceback for a real user), if any."""
    exc = result.exception
    if exc is None or isinstance(exc, SystemExit):
        return None
    return exc


@dataclass
class SyncResult:
    result: Result
    submission: str | None  # the name the summary line ends with, None for "nothing to send"

    @property
    def output(self) -> str:
        return self.result.stdout + self.result.stderr


def tree_snapshot(top: Path) -> dict[str, tuple]:
    """Every entry under top: files as (size, mtime_ns, blake2b of bytes), dirs as ("dir",).

    Directory mtimes are left out on purpose (a temp file created and removed changes them
    without changing anything stored)."""
    snap: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for d in dirnames:
            snap[os.path.relpath(os.path.join(dirpath, d), top)] = ("dir",)
        for f in filenames:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            with open(p, "rb") as fh:
                digest = hashlib.blake2b(fh.read()).hexdigest()
            snap[os.path.relpath(p, top)] = (st.st_size, st.st_mtime_ns, digest)
    return snap


# Files in ROOT/store that are bookkeeping, not stored data: the ingest daemon's lock file (an
# empty file every ``watch`` opens) and the SQLite index with its WAL files, a derived cache whose
# bytes move with every checkpoint. Their content is compared through log/versions instead.
STORE_BOOKKEEPING = re.compile(r"^(lock|index\.sqlite(-wal|-shm|-journal)?)$")


def store_snapshot(root: Path) -> dict[str, tuple]:
    """tree_snapshot of ROOT/store without the bookkeeping files: what the store holds."""
    snap = tree_snapshot(Path(root) / "store")
    return {k: v for k, v in snap.items() if not STORE_BOOKKEEPING.match(k)}


def dir_bytes(top: Path) -> int:
    """Total size of the regular files under top."""
    total = 0
    for dirpath, _dirs, files in os.walk(top):
        for f in files:
            total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def storage_reads() -> int:
    """Bytes this process has had read from storage, not served by the page cache (Linux)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def storage_reads_of(paths: Iterable[Path]) -> int:
    """What reading ``paths`` whole cost in reads from storage: 0 if the cache held them."""
    before = storage_reads()
    for p in paths:
        p.read_bytes()
    return storage_reads() - before


def skip_unless_storage_reads_counted(where: Path) -> None:
    """Skip unless a read from storage under ``where`` shows in /proc/self/io (not on tmpfs, not
    without posix_fadvise to drop a file from the cache)."""
    if not (hasattr(os, "posix_fadvise") and os.path.exists("/proc/self/io")):
        pytest.skip("needs posix_fadvise and /proc/self/io (Linux)")
    probe = where / ".storage-read-probe"
    probe.write_bytes(os.urandom(1 << 20))
    os.sync()
    with open(probe, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    counted = storage_reads_of([probe]) >= 1 << 20
    probe.unlink()
    if not counted:
        pytest.skip(f"{where}: its filesystem reports no reads from storage (tmpfs?)")


def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


class Server:
    """One server root (with its studies) and one client state dir, driven through the CLI."""

    def __init__(self, base: Path, study: str = STUDY, state: Path | None = None):
        self.base = Path(base)
        self.root = self.base / "root"
        self.state = Path(state) if state is not None else self.base / "state"
        self.state.mkdir(parents=True, exist_ok=True)
        self.study = study
        self.runner = CliRunner()

    # -- generic runners ---------------------------------------------------------------------

    def env(self, extra: Mapping[str, str | None] | None = None) -> dict[str, str | None]:
        env: dict[str, str | None] = {
            "DITTOHEAD_STATE_DIR": str(self.state),
            "DITTOHEAD_STORE": None,
        }
        if extra:
            env.update(extra)
        return env

    def run(
        self,
        *args: Any,
        input: bytes | str | None = None,
        env: Mapping[str, str | None] | None = None,
    ) -> Result:
        """Run the CLI in-process; never raises for a failing command (check exit_code)."""
        argv = [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args]
        return self.runner.invoke(cli, argv, input=input, env=self.env(env), catch_exceptions=True)

    def ok(self, *args: Any, **kw: Any) -> Result:
        """Run in-process and assert exit 0 with no escaped exception."""
        result = self.run(*args, **kw)
        assert result.exit_code == 0 and raised(result) is None, describe(result)
        return result

    def proc_env(self, extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in self.env(extra).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def popen(self, *args: Any, env: Mapping[str, str | None] | None = None, **kw: Any):
        """Start ``python -m dittohead ARGS``; output goes nowhere unless kw says otherwise."""
        argv = [
            PYTHON,
            "-m",
            "dittohead",
            *(os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args),
        ]
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        return subprocess.Popen(argv, env=self.proc_env(env), stdin=subprocess.DEVNULL, **kw)

    def proc(
        self,
        *args: Any,
        timeout: float = 120,
        env: Mapping[str, str | None] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``python -m dittohead ARGS`` as a real process (bytes stdout, text stderr)."""
        argv = [
            PYTHON,
            "-m",
            "dittohead",
            *(os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args),
        ]
        cp = subprocess.run(
            argv,
            env=self.proc_env(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        return subprocess.CompletedProcess(
            cp.args, cp.returncode, cp.stdout, cp.stderr.decode("utf-8", "replace")
        )

    # -- the commands ------------------------------------------------------------------------

    def init(self, studies: Iterable[str] = (STUDY,)) -> Server:
        self.ok("init", "--store", self.root)
        for name in studies:
            self.ok("study", "add", name, "--store", self.root)
        return self

    def sync_args(
        self,
        src: Path,
        *,
        study: str | None = None,
        site: str | None = None,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        dry_run: bool = False,
        min_age: float | None = None,
    ) -> list[Any]:
        args: list[Any] = ["sync", src, "--study", study or self.study, "--to", self.root]
        if site is not None:
            args += ["--site", site]
        for g in include:
            args += ["--include", g]
        for g in exclude:
            args += ["--exclude", g]
        if dry_run:
            args.append("--dry-run")
        if min_age is not None:
            args += ["--min-age", str(min_age)]
        return args

    def sync(self, src: Path, *, expect: int = 0, **opts: Any) -> SyncResult:
        result = self.run(*self.sync_args(src, **opts))
        assert result.exit_code == expect and raised(result) is None, describe(result)
        if opts.get("dry_run"):
            return SyncResult(result, None)
        return SyncResult(result, parse_submission(result.stdout + "\n" + result.stderr))

    def ingest(self, *, expect: int = 0) -> Result:
        result = self.run("watch", "--store", self.root, "--once")
        assert result.exit_code == expect and raised(result) is None, describe(result)
        return result

    def cat(self, path: str, version: int | None = None, study: str | None = None) -> bytes:
        args: list[Any] = ["cat", "--store", self.root, "--study", study or self.study, path]
        if version is not None:
            args += ["--version", version]
        return self.ok(*args).stdout_bytes

    def versions(self, path: str, study: str | None = None) -> list[dict]:
        result = self.ok(
            "versions", "--store", self.root, "--study", study or self.study, path, "--json"
        )
        doc = json.loads(result.stdout)
        assert doc["path"] == path, doc
        return doc["versions"]

    def log(self, study: str | None = None) -> list[dict]:
        result = self.ok("log", "--store", self.root, "--study", study or self.study, "--json")
        doc = json.loads(result.stdout)
        assert doc["study"] == (study or self.study), doc
        return doc["submissions"]

    def fsck(self, *extra: str) -> Result:
        return self.run("fsck", "--store", self.root, *extra)

    # -- the drop box, seen from outside ---------------------------------------------------

    def dropbox(self, part: str, study: str | None = None) -> Path:
        return self.root / "dropbox" / (study or self.study) / part

    def inbox_entries(self, study: str | None = None) -> list[str]:
        """Everything in the inbox, committed or staging (names with a leading dot)."""
        return sorted(os.listdir(self.dropbox("inbox", study)))


def parse_submission(text: str) -> str | None:
    """The submission name that sync's summary names, or None if it said "nothing to send"."""
    matches = SUBMISSION_RE.findall(text)
    if matches:
        return matches[-1]
    assert NOTHING_RE.search(text), (
        f"sync named no submission and did not say 'nothing to send':\n{text}"
    )
    return None


def invoke(*args: Any) -> Result:
    """Run the CLI in-process with these arguments (paths allowed); never raises."""
    return CliRunner().invoke(cli, [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args])


def ok(*args: Any) -> Result:
    """Run the CLI in-process and insist on exit 0."""
    res = invoke(*args)
    assert res.exit_code == 0, (args, res.exit_code, res.output, res.exception)
    return res


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's store, state or config."""
    monkeypatch.delenv("DITTOHEAD_STORE", raising=False)
    monkeypatch.setenv("DITTOHEAD_STATE_DIR", str(tmp_path / "state"))
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME"):
        monkeypatch.setenv(var, str(tmp_path / "xdg" / var.lower()))
    (tmp_path / "state").mkdir(exist_ok=True)


@pytest.fixture
def new_server() -> Callable[..., Server]:
    """new_server(base_dir, study="s") -> an initialised Server with its own state dir."""

    def make(base: Path, study: str = STUDY, state: Path | None = None) -> Server:
        return Server(Path(base), study=study, state=state).init([study])

    return make


@pytest.fixture
def server(tmp_path: Path) -> Server:
    # The same state dir as the autouse fixture's, so that processes started with the
    # test's own environment share it.
    return Server(tmp_path, state=tmp_path / "state").init()


@pytest.fixture
def root(server: Server) -> Path:
    return server.root


@pytest.fixture
def run(server: Server) -> Callable[..., Result]:
    return server.run


@pytest.fixture
def sync(server: Server) -> Callable[..., SyncResult]:
    return server.sync


@pytest.fixture
def ingest(server: Server) -> Callable[..., Result]:
    return server.ingest


@pytest.fixture
def cat(server: Server) -> Callable[..., bytes]:
    return server.cat


@pytest.fixture
def versions(server: Server) -> Callable[..., list]:
    return server.versions


@pytest.fixture(scope="session")
def accounts() -> Iterator[Accounts]:
    """The session's real accounts (tests/accounts.py), removed at the end of the session."""
    try:
        accts = Accounts()
    except Unavailable as e:
        pytest.skip(str(e))
    try:
        accts.resolve_python()
    except Unavailable as e:
        accts.close()
        pytest.skip(str(e))
    try:
        yield accts
    finally:
        accts.close()


@pytest.fixture
def acct_dir(accounts: Accounts) -> Iterator[Path]:
    """A fresh world-traversable dir for a test with real accounts (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="dittohead-acct-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        accounts.reap()
        # As root, whoever owns what is inside; rm, not shutil.rmtree, which recurses in Python
        # and fails on the folders nested deeper than its recursion limit that tests make.
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=True)
