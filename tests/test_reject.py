"""Invariant 3 (and the chunk-reference half of invariant 6): bytes from a client are never trusted.

Every case here hands ``watch --once`` a committed submission that breaks one rule, and checks
the same four things:

1. it is rejected with its reason: ``failed/NAME/REASON`` and the ``rejected s/NAME: ...`` line on
   stderr both say what is wrong (a meaningful substring, not just "rejected"), exit 1, no
   traceback;
2. the store does not change: ``ROOT/store`` byte for byte (the derived index.sqlite* left out)
   and ``log --json`` of every study; no have-segment, no receipt;
3. the ingest goes on: the same bad submission committed again, then a good one synced after it,
   in one ``watch --once`` run: the bad one is rejected, the good one ingested, and none of the
   bad one's chunks reach a store pack;
4. ``fsck --read-data`` exits 0 afterwards.

A case is a function that takes a valid, hand-built submission (``Sub``: a manifest map, packs,
hooks on the staging folder) and breaks it; ``test_valid_submission_is_ingested`` checks that the
unbroken submission is accepted, so each rejection is due to the one thing its case changed.
Submissions are built with the package's own PackWriter and msgpack encoder, never with mocks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import msgpack
import pytest
from click.testing import CliRunner, Result

from dittohead import codec
from dittohead import format as fmt
from dittohead import pack as pk
from dittohead.chunking import Chunker
from dittohead.cli import cli
from dittohead.hashing import digest

STUDY = "s"
OTHER = "t"
BAD1, BAD2 = "0bad-1", "0bad-2"  # sort before the client's "YYYYmmddT..." names on a ctime tie
BIG = 1_200_000  # with a seed picked by big_blob, cut into two or more chunks by FastCDC


# -- content: deterministic, distinct per role --------------------------------------------------


@cache
def blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@cache
def big_blob(seed: int) -> bytes:
    """BIG random bytes that FastCDC cuts into two or more chunks: the first such seed from
    ``seed`` on (deterministic; most seeds do at this size)."""
    for s in range(seed, seed + 1000):
        data = blob(s, BIG)
        if len(chunks_of(data)) >= 2:
            return data
    raise AssertionError("no multi-chunk content found")


@cache
def chunks_of(data: bytes) -> tuple[tuple[bytes, bytes], ...]:
    """(chunk id, chunk bytes) as every client would cut ``data``."""
    return tuple((c.id, bytes(c.data)) for c in Chunker().cut_bytes(data))


# -- running the CLI in-process ------------------------------------------------------------------


def run(*args: Any, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(cli, [os.fspath(a) for a in args], env=env, catch_exceptions=True)


def escaped(result: Result) -> BaseException | None:
    exc = result.exception
    return None if exc is None or isinstance(exc, SystemExit) else exc


def ok(*args: Any, env: dict[str, str | None] | None = None) -> Result:
    result = run(*args, env=env)
    assert result.exit_code == 0 and escaped(result) is None, (
        f"{args}: exit {result.exit_code}\nstdout={result.stdout}\nstderr={result.stderr}\n{result.exception!r}"
    )
    return result


def log_json(root: Path, study: str, env: dict[str, str | None] | None = None) -> list[dict]:
    return json.loads(ok("log", "--store", root, "--study", study, "--json", env=env).stdout)[
        "submissions"
    ]


# -- the store, seen from outside ------------------------------------------------------------------


def store_snapshot(root: Path) -> dict[str, tuple]:
    """{relative path: (size, sha256)} of ROOT/store (folders as ("dir",)), without the derived
    index (index.sqlite*, rebuildable from the rest; opening it may touch it)."""
    top = root / "store"
    snap: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for d in dirnames:
            snap[os.path.relpath(os.path.join(dirpath, d), top)] = ("dir",)
        for f in filenames:
            rel = os.path.relpath(os.path.join(dirpath, f), top)
            if rel.startswith("index.sqlite"):
                continue
            data = Path(dirpath, f).read_bytes()
            snap[rel] = (len(data), hashlib.sha256(data).hexdigest())
    return snap


def stored_chunk_ids(root: Path) -> set[bytes]:
    """Every chunk id in every store pack (read from the packs themselves, not the index)."""
    ids: set[bytes] = set()
    for p in (root / "store" / "packs").rglob("*" + fmt.PACK_SUFFIX):
        with open(p, "rb") as f:
            ids.update(e.id for e in pk.read_entries(f, what=str(p)))
    return ids


def dropbox(root: Path, part: str, study: str = STUDY) -> Path:
    return root / "dropbox" / study / part


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.is_dir() else []


# -- hand-built submissions --------------------------------------------------------------------------


def make_pack(chunks: list[tuple[bytes, bytes]]) -> tuple[str, bytes]:
    """A pack (as a client uploads it) holding ``chunks``: (file name, bytes)."""
    buf = io.BytesIO()
    w = pk.PackWriter(buf)
    for cid, data in chunks:
        w.add(cid, data)
    pid, _ = w.finish()
    return pid.hex() + fmt.PACK_SUFFIX, buf.getvalue()


def file_entry(path: str | bytes, data: bytes, **over: Any) -> dict:
    e = {
        "path": path.encode() if isinstance(path, str) else path,  # format 2: the name's bytes
        "size": len(data),
        "mtime_ns": 1_700_000_000_000_000_000,
        "mode": 0o644,
        "hash": digest(data),
        "chunks": [[cid, len(c)] for cid, c in chunks_of(data)],
    }
    e.update(over)
    return e


def manifest_map(entries: list[dict], study: str = STUDY) -> dict:
    return {
        "format": fmt.FORMAT_VERSION,
        "kind": fmt.MANIFEST_KIND,
        "study": study,
        "site": "lab-1",
        "user": "ra",
        "host": "eprime-pc",
        "created_ns": 1_700_000_000_000_000_000,
        "entries": entries,
    }


Hook = Callable[["Sub", Path, "Ctx"], None]


@dataclass
class Sub:
    """A submission before it is committed: what its folder will hold, and how it gets there."""

    manifest: Any  # the msgpack object written as "manifest" (normally the map)
    packs: dict[str, bytes]  # pack file name -> bytes
    files: dict[str, bytes] = field(default_factory=dict)  # further regular files
    raw: bytes | None = None  # the manifest file's bytes, instead of encoding ``manifest``
    no_manifest: bool = False
    hooks: list[Hook] = field(default_factory=list)  # run on the staging folder before commit
    place: Callable[[Sub, Path, str, Ctx], None] | None = None  # replaces the folder commit
    name_prefix: str | None = None  # instead of "0bad" (for bad submission names)
    small: str = ""  # the pack holding a.txt and dir/c.txt
    big: str = ""  # the pack holding big.bin's chunks

    def manifest_bytes(self) -> bytes:
        return self.raw if self.raw is not None else codec.pack(self.manifest)

    def entry(self, path: str) -> dict:
        return next(e for e in self.manifest["entries"] if e["path"] == path.encode())

    def write_into(self, folder: Path, ctx: Ctx) -> None:
        folder.mkdir(mode=0o750)
        for name, data in {**self.packs, **self.files}.items():
            (folder / name).write_bytes(data)
        if not self.no_manifest:
            (folder / fmt.MANIFEST_NAME).write_bytes(self.manifest_bytes())
        for hook in self.hooks:
            hook(self, folder, ctx)

    def commit(self, ctx: Ctx, name: str) -> None:
        """Put the submission in the inbox under ``name`` (staging folder, then rename)."""
        inbox = dropbox(ctx.root, "inbox")
        if self.place is not None:
            self.place(self, inbox, name, ctx)
            return
        staging = inbox / (fmt.STAGING_PREFIX + name)
        self.write_into(staging, ctx)
        os.rename(staging, inbox / name)


# Content of the bad submission (seeds 20.., 220..) differs from the baseline's (10.., 110..),
# study t's (40.., 410..) and the good follow-ups' (31..), so its chunks are its own.
A_TXT = blob(20, 1000)
C_TXT = blob(21, 5000)
BIG_BIN = big_blob(220)
BAD_IDS = {cid for data in (A_TXT, C_TXT, BIG_BIN) for cid, _ in chunks_of(data)}


def valid_sub() -> Sub:
    """A valid submission for study s: a small file, a file in a folder, an empty file and a
    multi-chunk file, in two packs; tests break exactly one thing of it."""
    big = list(chunks_of(BIG_BIN))
    assert len(big) >= 2
    small_name, small = make_pack(list(chunks_of(A_TXT)) + list(chunks_of(C_TXT)))
    big_name, big_pack = make_pack(big)
    entries = [
        file_entry("a.txt", A_TXT),
        file_entry("dir/c.txt", C_TXT),
        file_entry("empty.txt", b""),
        file_entry("big.bin", BIG_BIN),
    ]
    return Sub(
        manifest_map(entries),
        {small_name: small, big_name: big_pack},
        small=small_name,
        big=big_name,
    )


# -- the test context: a server root with a baseline submission ingested -----------------------------

BASE_SMALL = blob(10, 3000)
BASE_BIG = big_blob(110)
OTHER_FILE = blob(40, 7000)  # study t's file (single chunk)
OTHER_BIG = big_blob(410)  # study t's big file (several chunks)


@dataclass
class Ctx:
    tmp: Path
    root: Path
    outside: Path  # a folder outside the drop box (symlink and hard-link targets)
    src: Path  # the good collector's source folder
    good_count: int = 0

    def sync_good(self, study: str = STUDY) -> None:
        self.good_count += 1
        (self.src / f"good-{self.good_count}.txt").write_bytes(blob(30 + self.good_count, 2000))
        ok("sync", self.src, "--study", study, "--to", self.root, "--site", "lab-2")


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DITTOHEAD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("DITTOHEAD_STORE", raising=False)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A server root with studies s and t, built once per module through the CLI (with its own
    client state dir); s holds a baseline (a small and a multi-chunk file), t two files of its own.
    Each test works on a copy of it."""
    base = tmp_path_factory.mktemp("reject-template")
    env = {"DITTOHEAD_STATE_DIR": str(base / "state"), "DITTOHEAD_STORE": None}
    root = base / "root"
    ok("init", "--store", root, env=env)
    ok("study", "add", STUDY, "--store", root, env=env)
    ok("study", "add", OTHER, "--store", root, env=env)
    (base / "src" / "base").mkdir(parents=True)
    (base / "src" / "base" / "small.txt").write_bytes(BASE_SMALL)
    (base / "src" / "base" / "big.bin").write_bytes(BASE_BIG)
    ok("sync", base / "src", "--study", STUDY, "--to", root, "--site", "lab-1", env=env)
    (base / "tsrc").mkdir()
    (base / "tsrc" / "secret.txt").write_bytes(OTHER_FILE)
    (base / "tsrc" / "secret.bin").write_bytes(OTHER_BIG)
    ok("sync", base / "tsrc", "--study", OTHER, "--to", root, "--site", "lab-t", env=env)
    ok("watch", "--store", root, "--once", env=env)
    assert len(log_json(root, STUDY, env)) == 1 and len(log_json(root, OTHER, env)) == 1
    assert len(chunks_of(BASE_BIG)) >= 2 and len(chunks_of(OTHER_BIG)) >= 2
    return root


@pytest.fixture
def ctx(tmp_path: Path, template: Path) -> Ctx:
    """A copy of the template root (no ingest is running on the template), a folder outside the
    drop box, and an empty source folder for the good collector (with the test's own state dir)."""
    root = tmp_path / "root"
    shutil.copytree(template, root, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    src = tmp_path / "src"
    src.mkdir()
    return Ctx(tmp_path, root, outside, src)


# -- the one check every case goes through ------------------------------------------------------------


def reject_line(stderr: str, name: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith(f"rejected {STUDY}/{name}: ")]
    assert len(lines) == 1, f"no single 'rejected {STUDY}/{name}: ...' line on stderr:\n{stderr}"
    return lines[0]


def assert_rejected(ctx: Ctx, make: Callable[[Ctx], Sub], reason: str) -> None:
    """``make`` builds the bad submission (afresh for each commit); ``reason`` is a regex that
    both the REASON file and the stderr line must match."""
    root = ctx.root
    before = store_snapshot(root)
    logs_before = {st: log_json(root, st) for st in (STUDY, OTHER)}
    have_before = listing(dropbox(root, "have"))

    # 1. alone: rejected with its reason, and the store does not change
    sub = make(ctx)
    name1 = (sub.name_prefix or "0bad") + "-1"
    sub.commit(ctx, name1)
    res = run("watch", "--store", root, "--once")
    assert res.exit_code == 1 and escaped(res) is None, (
        f"exit {res.exit_code}\nstdout={res.stdout}\nstderr={res.stderr}\n{res.exception!r}"
    )
    line = reject_line(res.stderr, name1)
    assert re.search(reason, line), f"stderr line {line!r} does not say {reason!r}"
    failed = dropbox(root, "failed") / name1
    text = (failed / fmt.REASON_NAME).read_text()
    assert text.startswith("rejected: ") and re.search(reason, text), (
        f"REASON {text!r} does not say {reason!r}"
    )
    assert store_snapshot(root) == before
    assert {st: log_json(root, st) for st in (STUDY, OTHER)} == logs_before
    assert listing(dropbox(root, "have")) == have_before
    assert not (dropbox(root, "receipts") / name1).exists()
    # The uploader's folder is gone, or, holding a folder with something in it (which the daemon
    # does not walk), set aside under a dot name that nothing reads.
    assert [n for n in listing(dropbox(root, "inbox")) if not n.startswith(".~left-")] == []
    assert listing(dropbox(root, "processing")) == []
    assert not (dropbox(root, "done") / name1).exists()

    # 2. the ingest goes on: the bad one again, then a good one, in one run
    stored_before = stored_chunk_ids(root)
    sub = make(ctx)
    name2 = (sub.name_prefix or "0bad") + "-2"
    sub.commit(ctx, name2)
    ctx.sync_good()
    res = run("watch", "--store", root, "--once")
    assert res.exit_code == 1 and escaped(res) is None, (
        f"exit {res.exit_code}\nstdout={res.stdout}\nstderr={res.stderr}\n{res.exception!r}"
    )
    assert re.search(reason, reject_line(res.stderr, name2))
    after = log_json(root, STUDY)
    assert after[:-1] == logs_before[STUDY] and len(after) == len(logs_before[STUDY]) + 1
    good = after[-1]
    assert not good["name"].startswith("0bad") and good["site"] == "lab-2"
    assert f"ingested {STUDY}/{good['name']} as #{good['seq']}" in res.stdout
    assert log_json(root, OTHER) == logs_before[OTHER]
    snap = store_snapshot(root)
    for rel, val in before.items():  # the good submission's objects are new ones; nothing else changed
        assert snap.get(rel) == val, f"store/{rel} changed"
    assert not ((stored_chunk_ids(root) - stored_before) & BAD_IDS), (
        "a chunk of the rejected submission was stored"
    )

    # 3. the store is sound
    fsck = run("fsck", "--store", root, "--read-data")
    assert fsck.exit_code == 0, f"fsck: {fsck.stdout}\n{fsck.stderr}"


# -- the cases: each breaks one thing of valid_sub() -------------------------------------------------

Mutate = Callable[[Sub, Ctx], "Sub | None"]
CASES: list[Any] = []


def case(case_id: str, reason: str, fn: Mutate) -> None:
    CASES.append(pytest.param(fn, reason, id=case_id))


def maker(fn: Mutate) -> Callable[[Ctx], Sub]:
    def make(ctx: Ctx) -> Sub:
        sub = valid_sub()
        return fn(sub, ctx) or sub

    return make


def raw(data: bytes) -> Mutate:
    def fn(sub: Sub, ctx: Ctx) -> None:
        sub.raw = data

    return fn


def with_manifest(change: Callable[[dict], None]) -> Mutate:
    def fn(sub: Sub, ctx: Ctx) -> None:
        change(sub.manifest)

    return fn


def with_entry(path: str, change: Callable[[dict], None]) -> Mutate:
    def fn(sub: Sub, ctx: Ctx) -> None:
        change(sub.entry(path))

    return fn


def setitem(key: str, value: Any) -> Callable[[dict], None]:
    def change(d: dict) -> None:
        d[key] = value

    return change


def delitem(key: str) -> Callable[[dict], None]:
    def change(d: dict) -> None:
        del d[key]

    return change


VALID_MANIFEST = valid_sub().manifest_bytes()
NOT_MSGPACK = r"manifest: not valid msgpack"

# manifests: not msgpack, truncated, too big, nested too deep
CUTS = {
    "1-byte": 1,
    "2-bytes": 2,
    "40-bytes": 40,
    "half": len(VALID_MANIFEST) // 2,
    "all-but-1": len(VALID_MANIFEST) - 1,
}
for where, cut in CUTS.items():
    case(f"manifest-truncated-{where}", NOT_MSGPACK, raw(VALID_MANIFEST[:cut]))
case("manifest-empty-file", NOT_MSGPACK, raw(b""))
case("manifest-not-msgpack-0xc1", NOT_MSGPACK, raw(b"\xc1" + VALID_MANIFEST))
case("manifest-text", r"manifest: trailing bytes", raw(b"this is not a manifest\n"))
case("manifest-json", r"manifest: trailing bytes", raw(json.dumps({"format": 1}).encode()))
case("manifest-trailing-bytes", r"manifest: trailing bytes", raw(VALID_MANIFEST + b"\x00"))
case(
    "manifest-garbage-3MB",
    r"manifest: (trailing bytes|not valid msgpack|expected a map)",
    raw(blob(50, 3 << 20)),
)
case("manifest-not-a-map", r"manifest: expected a map, got list", raw(codec.pack([1, 2, 3])))
case(
    "manifest-entries-declared-2**31",
    NOT_MSGPACK,
    raw(b"\x81" + codec.pack("entries") + b"\xdd" + (1 << 31).to_bytes(4, "big")),
)
case("manifest-map-declared-2**32-1", NOT_MSGPACK, raw(b"\xdf\xff\xff\xff\xff"))
case(
    "manifest-str-declared-4GiB",
    NOT_MSGPACK,
    raw(b"\x81" + codec.pack("site") + b"\xdb\xff\xff\xff\xff" + b"x" * 100),
)
case(
    "manifest-too-many-entries",
    r"manifest: too many entries",
    with_manifest(setitem("entries", [None] * (fmt.MANIFEST_MAX_ENTRIES + 1))),
)
case(
    "manifest-site-10MB",
    r"field 'site' longer than 256 characters",
    with_manifest(setitem("site", "x" * (10 << 20))),
)
case(
    "manifest-user-257",
    r"field 'user' longer than 256 characters",
    with_manifest(setitem("user", "u" * 257)),
)
case(
    "manifest-host-control-char",
    r"field 'host' contains control characters",
    with_manifest(setitem("host", "pc\n1")),
)
case("manifest-nested-100000-deep", NOT_MSGPACK, raw(b"\x91" * 100_000 + b"\xc0"))
case(
    "manifest-site-nested-deep",
    NOT_MSGPACK,
    raw(VALID_MANIFEST.replace(codec.pack("lab-1"), b"\x91" * 100_000 + b"\xc0")),
)
case("manifest-int-key", NOT_MSGPACK, raw(b"\x81\x01\x02"))
case(
    "manifest-ext-type",
    r"manifest: .*(extension type|max_ext_len)",
    raw(VALID_MANIFEST.replace(codec.pack("lab-1"), msgpack.packb(msgpack.ExtType(5, b"abc")))),
)
case(
    "manifest-invalid-utf8",
    NOT_MSGPACK,
    raw(VALID_MANIFEST.replace(b"eprime-pc", b"eprime-\xff\xfe")),
)

# manifests: wrong types and values at the top level
case(
    "format-99",
    r"manifest: format version 99 is not supported",
    with_manifest(setitem("format", 99)),
)
case(
    "format-0", r"manifest: format version 0 is not supported", with_manifest(setitem("format", 0))
)
case("format-as-string", r"field 'format' has type str", with_manifest(setitem("format", "1")))
case("format-as-bool", r"field 'format' has type bool", with_manifest(setitem("format", True)))
case("format-missing", r"missing field 'format'", with_manifest(delitem("format")))
case("kind-receipt", r"kind is not 'manifest'", with_manifest(setitem("kind", "receipt")))
case("study-as-int", r"field 'study' has type int", with_manifest(setitem("study", 7)))
case("site-missing", r"missing field 'site'", with_manifest(delitem("site")))
case(
    "created-as-float",
    r"field 'created_ns' has type float",
    with_manifest(setitem("created_ns", 1.5e18)),
)
case(
    "created-2**63",
    r"field 'created_ns' out of range",
    with_manifest(setitem("created_ns", 1 << 63)),
)
case(
    "entries-as-map",
    r"field 'entries' has type dict",
    with_manifest(setitem("entries", {"a.txt": 1})),
)
case("entries-missing", r"missing field 'entries'", with_manifest(delitem("entries")))
case(
    "entry-as-list",
    r"manifest entry 0: expected a map, got list",
    with_manifest(lambda m: m["entries"].insert(0, ["a.txt", 1])),
)
case(
    "unknown-field",
    r"manifest: unknown fields \['signature'\]",
    with_manifest(setitem("signature", b"x")),
)
case(
    "unknown-entry-field",
    r"unknown fields \['owner'\]",
    with_entry("a.txt", setitem("owner", "root")),
)

# manifests: wrong types and values in an entry
case("size-as-string", r"field 'size' has type str", with_entry("a.txt", setitem("size", "1000")))
case("size-as-bool", r"field 'size' has type bool", with_entry("empty.txt", setitem("size", False)))
case("size-negative", r"field 'size' out of range", with_entry("a.txt", setitem("size", -1)))
case("size-as-float", r"field 'size' has type float", with_entry("a.txt", setitem("size", 1000.0)))
case(
    "hash-31-bytes",
    r"field 'hash' is 31 bytes, not 32",
    with_entry("a.txt", lambda e: e.update(hash=e["hash"][:31])),
)
case(
    "hash-33-bytes",
    r"field 'hash' is 33 bytes, not 32",
    with_entry("a.txt", lambda e: e.update(hash=e["hash"] + b"\0")),
)
case(
    "hash-as-hex-string",
    r"field 'hash' has type str",
    with_entry("a.txt", lambda e: e.update(hash=e["hash"].hex())),
)
case("hash-missing", r"missing field 'hash'", with_entry("a.txt", delitem("hash")))
case(
    "mode-with-file-type-bits",
    r"field 'mode' out of range",
    with_entry("a.txt", setitem("mode", 0o100644)),
)
case(
    "mtime-as-string",
    r"field 'mtime_ns' has type str",
    with_entry("a.txt", setitem("mtime_ns", "yesterday")),
)
case(
    "chunks-as-map",
    r"field 'chunks' has type dict",
    with_entry("a.txt", lambda e: e.update(chunks={"id": e["chunks"][0][0]})),
)
case(
    "chunks-as-bytes",
    r"field 'chunks' has type bytes",
    with_entry("a.txt", lambda e: e.update(chunks=e["chunks"][0][0])),
)
case("chunks-missing", r"missing field 'chunks'", with_entry("a.txt", delitem("chunks")))
case(
    "chunk-not-a-pair",
    r"chunk 0 is not \[32-byte id, length\]",
    with_entry("a.txt", lambda e: e.update(chunks=[[e["chunks"][0][0]]])),
)
case(
    "chunk-id-31-bytes",
    r"chunk 0 is not \[32-byte id, length\]",
    with_entry("a.txt", lambda e: e.update(chunks=[[e["chunks"][0][0][:31], 1000]])),
)
case(
    "chunk-length-as-string",
    r"chunk 0 is not \[32-byte id, length\]",
    with_entry("a.txt", lambda e: e.update(chunks=[[e["chunks"][0][0], "1000"]])),
)
case(
    "chunk-length-zero",
    r"chunk 1 has length 0, out of range",
    with_entry("a.txt", lambda e: e["chunks"].append([digest(b""), 0])),
)
case(
    "chunk-length-over-max",
    r"chunk 0 has length \d+, out of range",
    with_entry(
        "a.txt",
        lambda e: e.update(size=fmt.CHUNK_MAX + 1, chunks=[[e["chunks"][0][0], fmt.CHUNK_MAX + 1]]),
    ),
)

# manifests: study and emptiness
case(
    "manifest-for-another-study",
    r"manifest is for study 't', not 's'",
    with_manifest(setitem("study", OTHER)),
)
case(
    "manifest-for-study-S",
    r"manifest is for study 'S', not 's'",
    with_manifest(setitem("study", "S")),
)
case(
    "manifest-zero-entries",
    r"manifest lists no files \(empty submission\)",
    with_manifest(setitem("entries", [])),
)


def no_manifest(sub: Sub, ctx: Ctx) -> None:
    sub.no_manifest = True


def empty_folder(sub: Sub, ctx: Ctx) -> None:
    sub.no_manifest = True
    sub.packs = {}


case("no-manifest", r"no manifest", no_manifest)
case("empty-folder", r"no manifest", empty_folder)


# paths
def set_path(old: str, new: Any) -> Mutate:
    """Entry ``old``'s path becomes ``new``: a str is written as its UTF-8 bytes (format 2's
    bin); any other value as it is."""
    return with_entry(old, setitem("path", new.encode() if isinstance(new, str) else new))


case("path-absolute", r"absolute path: '/etc/passwd'", set_path("a.txt", "/etc/passwd"))
case("path-dotdot", r"'\.\.' component", set_path("a.txt", "../a.txt"))
case("path-dotdot-inside", r"'\.\.' component", set_path("dir/c.txt", "dir/../../c.txt"))
case("path-dot", r"'\.' or '\.\.' component", set_path("a.txt", "./a.txt"))
case("path-trailing-slash", r"empty, '\.' or '\.\.' component", set_path("a.txt", "a.txt/"))
case("path-double-slash", r"empty, '\.' or '\.\.' component", set_path("dir/c.txt", "dir//c.txt"))
case("path-nul", r"path contains NUL", set_path("a.txt", "a\x00.txt"))
case("path-nul-not-utf8", r"path contains NUL: 'a\\xff\\u0000'", set_path("a.txt", b"a\xff\x00"))
case("path-empty", r"empty path", set_path("a.txt", ""))
case("path-dotdot-not-utf8", r"'\.\.' component: '\.\./\\xe9'", set_path("a.txt", b"../\xe9"))
case("path-too-long", r"path longer than 98304 bytes", set_path("a.txt", "d/" * 49152 + "a"))
case(
    "path-component-too-long", r"path component longer than 1024 bytes", set_path("a.txt", "x" * 1025)
)
case("path-component-too-long-bytes", r"path component longer than 1024 bytes",
     set_path("a.txt", b"\xff" * 1025))
case("path-str-in-format-2", r"field 'path' has type str",
     with_manifest(lambda m: m["entries"][0].update(path="a.txt")))
case("path-bytes-in-format-1", r"field 'path' has type bytes",
     with_manifest(lambda m: m.update(format=1)))
case(
    "path-duplicate",
    r"duplicate path: 'a\.txt'",
    with_manifest(lambda m: m["entries"].append(dict(m["entries"][0]))),
)
case(
    "path-duplicate-other-content", r"duplicate path: 'empty\.txt'", set_path("a.txt", "empty.txt")
)


def file_and_folder(sub: Sub, ctx: Ctx) -> None:
    sub.entry("a.txt")["path"] = b"x"
    sub.entry("dir/c.txt")["path"] = b"x/c.txt"


case("path-file-and-folder", r"path 'x' is a file and also a folder of 'x/c\.txt'", file_and_folder)
case(
    "path-folder-and-file-order",
    r"path 'dir' is a file and also a folder of 'dir/c\.txt'",
    with_manifest(lambda m: m["entries"].append(file_entry("dir", b""))),
)


# packs: damage
def change_pack(which: str, change: Callable[[bytes], bytes]) -> Mutate:
    def fn(sub: Sub, ctx: Ctx) -> None:
        name = sub.small if which == "small" else sub.big
        sub.packs[name] = change(sub.packs[name])

    return fn


def flip(where: Callable[[bytes], int], bit: int = 0) -> Callable[[bytes], bytes]:
    def change(data: bytes) -> bytes:
        b = bytearray(data)
        b[where(data)] ^= 1 << bit
        return bytes(b)

    return change


def trailer_start(data: bytes) -> int:
    tlen = fmt.PACK_FOOTER.unpack(data[-fmt.PACK_FOOTER.size :])[0]
    return len(data) - fmt.PACK_FOOTER.size - tlen


FOOT = fmt.PACK_FOOTER.size  # 4 (trailer length) + 32 (trailer hash) + 8 (magic)
MISMATCH = r"pack [0-9a-f]{64}\.pack: chunk [0-9a-f]{64} at offset \d+ does not match its id"
case(
    "pack-bit-in-first-chunk", MISMATCH, change_pack("small", flip(lambda d: fmt.PACK_HEADER.size))
)
case(
    "pack-bit-in-last-chunk-byte",
    MISMATCH,
    change_pack("small", flip(lambda d: trailer_start(d) - 1, 7)),
)
case("pack-bit-in-big-chunk", MISMATCH, change_pack("big", flip(lambda d: len(d) // 2, 3)))
case(
    "pack-bit-in-trailer",
    r"trailer checksum mismatch",
    change_pack("small", flip(lambda d: trailer_start(d) + 5)),
)
case(
    "pack-bit-in-trailer-last-byte",
    r"trailer checksum mismatch",
    change_pack("big", flip(lambda d: len(d) - FOOT - 1)),
)
case(
    "pack-bit-in-footer-length-low",
    r"trailer (checksum mismatch|length)",
    change_pack("small", flip(lambda d: len(d) - FOOT)),
)
case(
    "pack-bit-in-footer-length-high",
    r"trailer length \d+ does not fit the pack",
    change_pack("small", flip(lambda d: len(d) - FOOT + 3, 7)),
)
case(
    "pack-bit-in-footer-hash",
    r"trailer checksum mismatch",
    change_pack("small", flip(lambda d: len(d) - 20)),
)
case(
    "pack-bit-in-footer-magic",
    r"bad footer magic",
    change_pack("small", flip(lambda d: len(d) - 1, 1)),
)
case(
    "pack-bit-in-header-magic",
    r"not a pack \(bad header magic\)",
    change_pack("big", flip(lambda d: 0)),
)
case(
    "pack-bit-in-header-version",
    r"pack format version 0 is not supported",
    change_pack("small", flip(lambda d: 8, 1)),
)
case("pack-truncated-last-byte", r"bad footer magic", change_pack("small", lambda d: d[:-1]))
case("pack-truncated-half", r"bad footer magic", change_pack("big", lambda d: d[: len(d) // 2]))
case(
    "pack-truncated-to-data",
    r"bad footer magic",
    change_pack("small", lambda d: d[: trailer_start(d)]),
)
case(
    "pack-truncated-to-header",
    r"too short to be a pack",
    change_pack("small", lambda d: d[: fmt.PACK_HEADER.size]),
)
case("pack-truncated-to-3-bytes", r"too short to be a pack", change_pack("small", lambda d: d[:3]))
case("pack-empty-file", r"too short to be a pack", change_pack("small", lambda d: b""))
case("pack-trailing-garbage", r"bad footer magic", change_pack("small", lambda d: d + b"garbage"))


def crafted_pack(data: bytes, trailer: Any) -> Mutate:
    """Replace the small pack by HEADER + data + a trailer that says ``trailer`` (with a correct
    checksum and footer): the pack is well-formed and lies."""

    def fn(sub: Sub, ctx: Ctx) -> None:
        t = trailer if isinstance(trailer, bytes) else codec.pack(trailer)
        body = fmt.PACK_HEADER.pack(fmt.PACK_MAGIC, fmt.FORMAT_VERSION) + data
        sub.packs[sub.small] = body + t + fmt.PACK_FOOTER.pack(len(t), digest(t), fmt.PACK_MAGIC)

    return fn


((A_ID, A_DATA),) = chunks_of(A_TXT)
H = fmt.PACK_HEADER.size
case(
    "pack-trailer-unknown-codec",
    r"trailer entry 0: unknown codec 1",
    crafted_pack(A_DATA, [[A_ID, H, 1000, 1]]),
)
case(
    "pack-trailer-chunk-twice",
    r"trailer entry 1: chunk [0-9a-f]{64} appears twice",
    crafted_pack(A_DATA * 2, [[A_ID, H, 1000, 0], [A_ID, H + 1000, 1000, 0]]),
)
case(
    "pack-trailer-gap",
    r"trailer entry 0: offset 13, expected 12",
    crafted_pack(b"\0" + A_DATA, [[A_ID, H + 1, 1000, 0]]),
)
case(
    "pack-trailer-overlap",
    r"trailer entry 1: offset 12, expected 1012",
    crafted_pack(A_DATA, [[A_ID, H, 1000, 0], [digest(A_DATA[:10]), H, 10, 0]]),
)
case(
    "pack-trailer-length-over-max",
    r"trailer entry 0: chunk length 4194305 out of range",
    crafted_pack(A_DATA, [[A_ID, H, fmt.CHUNK_MAX + 1, 0]]),
)
case(
    "pack-trailer-length-zero",
    r"trailer entry 0: chunk length 0 out of range",
    crafted_pack(b"", [[A_ID, H, 0, 0]]),
)
case(
    "pack-trailer-id-31-bytes",
    r"trailer entry 0: chunk id is not 32 bytes",
    crafted_pack(A_DATA, [[A_ID[:31], H, 1000, 0]]),
)
case(
    "pack-trailer-offset-as-string",
    r"trailer entry 0: offset, length and codec must be integers",
    crafted_pack(A_DATA, [[A_ID, "12", 1000, 0]]),
)
case("pack-trailer-not-a-list", r"trailer is not a list", crafted_pack(A_DATA, {"id": A_ID}))
case(
    "pack-trailer-entry-not-4",
    r"trailer entry 0 is not \[id, offset, length, codec\]",
    crafted_pack(A_DATA, [[A_ID, H, 1000]]),
)
case(
    "pack-trailer-not-msgpack",
    r"trailer: (not valid msgpack|trailing bytes)",
    crafted_pack(A_DATA, b"\xc1garbage"),
)
case(
    "pack-trailer-data-after-chunks",
    r"chunk data ends at 1012, trailer starts at 1013",
    crafted_pack(A_DATA + b"!", [[A_ID, H, 1000, 0]]),
)
case(
    "pack-trailer-says-one-byte-less",
    r"chunk data ends at 1011, trailer starts at 1012",
    crafted_pack(A_DATA, [[A_ID, H, 999, 0]]),
)
case("pack-chunk-under-wrong-id", MISMATCH, crafted_pack(A_DATA, [[digest(C_TXT), H, 1000, 0]]))


# packs: names and extra files
def rename_pack(new: Callable[[str], str]) -> Mutate:
    def fn(sub: Sub, ctx: Ctx) -> None:
        sub.packs[new(sub.small)] = sub.packs.pop(sub.small)

    return fn


UNEXPECTED = r"unexpected file in a submission"
case("pack-name-not-hex", r"notapack\.pack: " + UNEXPECTED, rename_pack(lambda n: "notapack.pack"))
case("pack-name-upper-hex", UNEXPECTED, rename_pack(lambda n: n[:64].upper() + ".pack"))
case("pack-name-63-hex", UNEXPECTED, rename_pack(lambda n: n[1:]))
case("pack-name-no-suffix", UNEXPECTED, rename_pack(lambda n: n[:64]))
case(
    "pack-name-tmp-upload",
    r"\.tmp-[0-9a-f]{64}\.pack: " + UNEXPECTED,
    rename_pack(lambda n: ".tmp-" + n),
)
case("pack-name-double-suffix", UNEXPECTED, rename_pack(lambda n: n + ".pack"))
case(
    "extra-file",
    r"notes\.txt: " + UNEXPECTED,
    lambda sub, ctx: sub.files.update({"notes.txt": b"hi"}),
)
case(
    "extra-hidden-file",
    r"\.DS_Store: " + UNEXPECTED,
    lambda sub, ctx: sub.files.update({".DS_Store": b""}),
)
case(
    "extra-manifest-copy",
    r"manifest\.bak: " + UNEXPECTED,
    lambda sub, ctx: sub.files.update({"manifest.bak": VALID_MANIFEST}),
)


# what is in the folder: symlinks, FIFOs, hard links, folders
def hook(fn: Hook) -> Mutate:
    def add(sub: Sub, ctx: Ctx) -> None:
        sub.hooks.append(fn)

    return add


def symlink_pack_elsewhere(sub: Sub, folder: Path, ctx: Ctx) -> None:
    target = ctx.outside / f"{folder.name}-{sub.small}"
    os.rename(folder / sub.small, target)
    os.symlink(target, folder / sub.small)


def symlink_manifest(sub: Sub, folder: Path, ctx: Ctx) -> None:
    target = ctx.outside / f"{folder.name}-manifest"
    os.rename(folder / fmt.MANIFEST_NAME, target)
    os.symlink(target, folder / fmt.MANIFEST_NAME)


def symlink_manifest_to_store_config(sub: Sub, folder: Path, ctx: Ctx) -> None:
    os.unlink(folder / fmt.MANIFEST_NAME)
    os.symlink(ctx.root / "store" / "config", folder / fmt.MANIFEST_NAME)


def symlink_pack_to_store_pack(sub: Sub, folder: Path, ctx: Ctx) -> None:
    stored = next((ctx.root / "store" / "packs").rglob("*.pack"))
    os.symlink(stored, folder / (stored.name))


def fifo_manifest(sub: Sub, folder: Path, ctx: Ctx) -> None:
    os.unlink(folder / fmt.MANIFEST_NAME)
    os.mkfifo(folder / fmt.MANIFEST_NAME)


def fifo_pack(sub: Sub, folder: Path, ctx: Ctx) -> None:
    os.unlink(folder / sub.small)
    os.mkfifo(folder / sub.small)


def hardlink_pack_outside(sub: Sub, folder: Path, ctx: Ctx) -> None:
    os.link(folder / sub.small, ctx.outside / f"{folder.name}-link")


def hardlink_manifest_outside(sub: Sub, folder: Path, ctx: Ctx) -> None:
    os.link(folder / fmt.MANIFEST_NAME, ctx.outside / f"{folder.name}-manifest-link")


def hardlink_pack_inside(sub: Sub, folder: Path, ctx: Ctx) -> None:
    os.link(folder / sub.small, folder / ("f" * 64 + fmt.PACK_SUFFIX))


def subfolder(sub: Sub, folder: Path, ctx: Ctx) -> None:
    (folder / "sub").mkdir()
    shutil.copyfile(folder / sub.small, folder / "sub" / sub.small)


def folder_named_like_pack(sub: Sub, folder: Path, ctx: Ctx) -> None:
    os.unlink(folder / sub.small)
    (folder / sub.small).mkdir()


def folder_named_manifest(sub: Sub, folder: Path, ctx: Ctx) -> None:
    os.unlink(folder / fmt.MANIFEST_NAME)
    (folder / fmt.MANIFEST_NAME).mkdir()
    (folder / fmt.MANIFEST_NAME / fmt.MANIFEST_NAME).write_bytes(VALID_MANIFEST)


def sparse_pack_over_limit(sub: Sub, folder: Path, ctx: Ctx) -> None:
    os.truncate(folder / sub.small, fmt.PACK_MAX_SIZE + 1)  # sparse: nothing is written


def socket_manifest(sub: Sub, folder: Path, ctx: Ctx) -> None:
    import socket

    os.unlink(folder / fmt.MANIFEST_NAME)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:  # bind through /proc/self/fd: a tmp path can be longer than a socket address allows
        sock.bind(f"/proc/self/fd/{fd}/{fmt.MANIFEST_NAME}")
    except OSError as e:
        pytest.skip(f"cannot create a unix socket here: {e}")
    finally:
        sock.close()
        os.close(fd)


def device_manifest(sub: Sub, folder: Path, ctx: Ctx) -> None:
    import stat

    os.unlink(folder / fmt.MANIFEST_NAME)
    try:  # /dev/zero: reading it would never end
        os.mknod(folder / fmt.MANIFEST_NAME, 0o644 | stat.S_IFCHR, os.makedev(1, 5))
    except OSError as e:
        pytest.skip(f"cannot create a device node here: {e}")


case(
    "symlink-pack-to-pack-elsewhere", r"[0-9a-f]{64}\.pack: a symlink", hook(symlink_pack_elsewhere)
)
case("symlink-manifest", r"manifest: a symlink", hook(symlink_manifest))
case(
    "symlink-manifest-to-store-config",
    r"manifest: a symlink",
    hook(symlink_manifest_to_store_config),
)
case(
    "symlink-pack-to-store-pack", r"[0-9a-f]{64}\.pack: a symlink", hook(symlink_pack_to_store_pack)
)
case("fifo-manifest", r"manifest: not a regular file", hook(fifo_manifest))
case("fifo-pack", r"[0-9a-f]{64}\.pack: not a regular file", hook(fifo_pack))
case(
    "hardlink-pack-outside",
    r"[0-9a-f]{64}\.pack: a hard link \(link count 2\)",
    hook(hardlink_pack_outside),
)
case(
    "hardlink-manifest-outside",
    r"manifest: a hard link \(link count 2\)",
    hook(hardlink_manifest_outside),
)
case(
    "hardlink-pack-inside",
    r"[0-9a-f]{64}\.pack: a hard link \(link count 2\)",
    hook(hardlink_pack_inside),
)
case("subfolder", r"sub: not a regular file", hook(subfolder))
case(
    "folder-named-like-pack",
    r"[0-9a-f]{64}\.pack: not a regular file",
    hook(folder_named_like_pack),
)
case("folder-named-manifest", r"manifest: not a regular file", hook(folder_named_manifest))
case("socket-manifest", r"manifest: not a regular file", hook(socket_manifest))
case("device-manifest", r"manifest: not a regular file", hook(device_manifest))
case(
    "pack-over-size-limit",
    r"[0-9a-f]{64}\.pack: 268435457 bytes, larger than the pack limit",
    hook(sparse_pack_over_limit),
)


# the submission itself
def place(fn: Callable[[Sub, Path, str, Ctx], None]) -> Mutate:
    def set_place(sub: Sub, ctx: Ctx) -> None:
        sub.place = fn

    return set_place


def as_symlink_to_folder(sub: Sub, inbox: Path, name: str, ctx: Ctx) -> None:
    target = ctx.outside / f"real-{name}"
    sub.write_into(target, ctx)  # a valid submission, reached through a symlink
    os.symlink(target, inbox / name)


def as_symlink_to_store(sub: Sub, inbox: Path, name: str, ctx: Ctx) -> None:
    os.symlink(ctx.root / "store", inbox / name)


def as_symlink_to_done(sub: Sub, inbox: Path, name: str, ctx: Ctx) -> None:
    done = dropbox(ctx.root, "done", OTHER)
    os.symlink(done / listing(done)[0], inbox / name)


def as_dangling_symlink(sub: Sub, inbox: Path, name: str, ctx: Ctx) -> None:
    os.symlink(ctx.outside / "nothing-here", inbox / name)


def as_regular_file(sub: Sub, inbox: Path, name: str, ctx: Ctx) -> None:
    tmp = inbox / (fmt.STAGING_PREFIX + name)
    tmp.write_bytes(sub.manifest_bytes())
    os.rename(tmp, inbox / name)


def as_fifo(sub: Sub, inbox: Path, name: str, ctx: Ctx) -> None:
    os.mkfifo(inbox / name)


case("submission-symlink-to-folder", r"the submission is a symlink", place(as_symlink_to_folder))
case("submission-symlink-to-store", r"the submission is a symlink", place(as_symlink_to_store))
case(
    "submission-symlink-to-other-study-done",
    r"the submission is a symlink",
    place(as_symlink_to_done),
)
case("submission-dangling-symlink", r"the submission is a symlink", place(as_dangling_symlink))
case("submission-regular-file", r"the submission is not a folder", place(as_regular_file))
case("submission-fifo", r"the submission is not a folder", place(as_fifo))
case(
    "submission-name-leading-dash",
    r"bad submission name '-bad-\d'",
    lambda sub, ctx: setattr(sub, "name_prefix", "-bad"),
)
case(
    "submission-name-too-long",
    r"bad submission name 'x{130}-\d'",
    lambda sub, ctx: setattr(sub, "name_prefix", "x" * 130),
)
case(
    "submission-name-with-space",
    r"bad submission name '0 bad-\d'",
    lambda sub, ctx: setattr(sub, "name_prefix", "0 bad"),
)


# chunk references and file hashes
def other_chunk_ref(sub: Sub, ctx: Ctx) -> None:
    """An s submission naming t's file by its chunk id, without carrying the chunk."""
    sub.manifest["entries"].append(file_entry("stolen.txt", OTHER_FILE))


def other_big_chunk_ref(sub: Sub, ctx: Ctx) -> None:
    """t's multi-chunk file: the first chunk carried (the uploader has it), the rest not."""
    first_id, first = chunks_of(OTHER_BIG)[0]
    name, data = make_pack([(first_id, first)])
    sub.packs[name] = data
    sub.manifest["entries"].append(file_entry("stolen.bin", OTHER_BIG))


def unknown_chunk_ref(sub: Sub, ctx: Ctx) -> None:
    data = blob(60, 1234)  # nobody has it
    sub.manifest["entries"].append(file_entry("ghost.txt", data))


def uncarried(study: str) -> str:
    return (
        rf"chunk [0-9a-f]{{64}} is neither held by study '{study}' nor carried by this submission"
    )


case("chunk-of-other-study", uncarried(STUDY), other_chunk_ref)
case("chunks-of-other-study-multi", uncarried(STUDY), other_big_chunk_ref)
case("chunk-nobody-has", uncarried(STUDY), unknown_chunk_ref)
case(
    "chunk-not-carried-pack-missing",
    uncarried(STUDY),
    lambda sub, ctx: setattr(sub, "packs", {sub.small: sub.packs[sub.small]}),
)

NO_MATCH = r"its bytes do not match the file hash in the manifest"
case(
    "multi-chunk-hash-wrong",
    r"'big\.bin': " + NO_MATCH,
    with_entry("big.bin", setitem("hash", digest(b"something else"))),
)
case(
    "multi-chunk-reordered",
    r"'big\.bin': " + NO_MATCH,
    with_entry("big.bin", lambda e: e["chunks"].reverse()),
)
case(
    "multi-chunk-hash-of-first-chunk",
    r"'big\.bin': " + NO_MATCH,
    with_entry("big.bin", lambda e: e.update(hash=e["chunks"][0][0])),
)
case(
    "single-chunk-hash-differs-from-id",
    r"'a\.txt': " + NO_MATCH,
    with_entry("a.txt", setitem("hash", digest(A_TXT + b"\n"))),
)
case(
    "single-chunk-hash-of-other-chunk",
    r"'a\.txt': " + NO_MATCH,
    with_entry("a.txt", setitem("hash", digest(C_TXT))),
)
case(
    "empty-file-wrong-hash",
    r"'empty\.txt': empty file with the wrong hash",
    with_entry("empty.txt", setitem("hash", digest(b"x"))),
)


def empty_with_a_chunk(sub: Sub, ctx: Ctx) -> None:
    sub.entry("empty.txt")["chunks"] = list(sub.entry("a.txt")["chunks"])


case(
    "empty-file-with-a-chunk",
    r"'empty\.txt': chunk lengths add up to 1000, size says 0",
    empty_with_a_chunk,
)
case(
    "size-more-than-chunks",
    r"'a\.txt': chunk lengths add up to 1000, size says 1001",
    with_entry("a.txt", setitem("size", 1001)),
)
case(
    "size-less-than-chunks",
    r"'big\.bin': chunk lengths add up to \d+, size says 1",
    with_entry("big.bin", setitem("size", 1)),
)
case(
    "chunk-length-differs-from-pack",
    r"the manifest says 1001 bytes, the pack holds 1000",
    with_entry("a.txt", lambda e: e.update(size=1001, chunks=[[e["chunks"][0][0], 1001]])),
)


def shift_first_chunk_boundary(e: dict) -> None:
    """One byte moves from big.bin's second chunk to its first: the sizes still add up."""
    e["chunks"][0][1] += 1
    e["chunks"][1][1] -= 1


case(
    "chunk-lengths-shifted-in-multi",
    r"the manifest says \d+ bytes, the pack holds \d+",
    with_entry("big.bin", shift_first_chunk_boundary),
)
case(
    "chunk-listed-with-two-lengths",
    r"is listed with two different lengths",
    with_manifest(
        lambda m: m["entries"].append(
            {
                **m["entries"][0],
                "path": b"b.txt",
                "size": 999,
                "chunks": [[m["entries"][0]["chunks"][0][0], 999]],
            }
        )
    ),
)


def base_entry(path: str, data: bytes, **over: Any) -> Mutate:
    """An entry built on the chunks study s already holds (the baseline), without carrying them."""

    def fn(sub: Sub, ctx: Ctx) -> None:
        sub.manifest["entries"].append(file_entry(path, data, **over))

    return fn


def base_chunks(change: Callable[[list], list], **over: Any) -> Mutate:
    def fn(sub: Sub, ctx: Ctx) -> None:
        e = file_entry("base/big.bin", BASE_BIG)
        e["chunks"] = change(e["chunks"])
        e.update(over)
        sub.manifest["entries"].append(e)

    return fn


case(
    "held-chunk-wrong-length",
    r"chunk [0-9a-f]{64}: length 2999 differs from the stored chunk's",
    base_entry("copy.txt", BASE_SMALL, size=2999, chunks=[[chunks_of(BASE_SMALL)[0][0], 2999]]),
)
case(
    "held-single-chunk-wrong-hash",
    r"'copy\.txt': " + NO_MATCH,
    base_entry("copy.txt", BASE_SMALL, hash=digest(b"not it")),
)
case(
    "held-multi-chunk-wrong-hash",
    r"'copy\.bin': " + NO_MATCH,
    base_entry("copy.bin", BASE_BIG, hash=digest(b"not it")),
)
case(
    "held-multi-chunk-reordered-new-path",
    r"'copy\.bin': " + NO_MATCH,
    base_entry(
        "copy.bin", BASE_BIG, chunks=[[c, len(d)] for c, d in reversed(chunks_of(BASE_BIG))]
    ),
)
case(
    "held-multi-chunk-reordered-same-path-and-hash",
    r"'base/big\.bin': " + NO_MATCH,
    base_chunks(lambda cs: list(reversed(cs))),
)
case(
    "held-multi-chunk-one-dropped-same-hash",
    r"'base/big\.bin': " + NO_MATCH,
    base_chunks(lambda cs: cs[:-1], size=len(BASE_BIG) - len(chunks_of(BASE_BIG)[-1][1])),
)


# -- the tests ----------------------------------------------------------------------------------------


def test_valid_submission_is_ingested(ctx: Ctx) -> None:
    """The submission every case breaks is itself accepted (so each rejection is the case's)."""
    valid_sub().commit(ctx, BAD1)
    res = ok("watch", "--store", ctx.root, "--once")
    assert f"ingested {STUDY}/{BAD1} as #2" in res.stdout
    assert ok("cat", "--store", ctx.root, "--study", STUDY, "big.bin").stdout_bytes == BIG_BIN
    assert ok("cat", "--store", ctx.root, "--study", STUDY, "dir/c.txt").stdout_bytes == C_TXT
    assert BAD_IDS <= stored_chunk_ids(ctx.root)
    assert run("fsck", "--store", ctx.root, "--read-data").exit_code == 0


# Names format 1 refused: every one is a file's own name now (issue 9), and comes back by it.
ODD_NAMES = [b"a\n.txt", b"..\\a.txt", "cafe\u0301.txt".encode(), b"\xed\xa0\x80.t", b"lat\xe9n.txt",
             b"-rf", b"trailing space ", b"c1\xc2\x85", "bidi\u202etxt.exe".encode(), b"\x1b[31mred"]


@pytest.mark.parametrize("name", ODD_NAMES, ids=repr)
def test_any_name_bytes_are_ingested_and_read_back(ctx: Ctx, name: bytes) -> None:
    sub = valid_sub()
    sub.entry("a.txt")["path"] = name
    sub.commit(ctx, BAD1)
    ok("watch", "--store", ctx.root, "--once")
    arg = os.fsdecode(name)  # the argument's bytes are the name's
    assert ok("cat", "--store", ctx.root, "--study", STUDY, "--", arg).stdout_bytes == A_TXT
    vs = json.loads(ok("versions", "--store", ctx.root, "--study", STUDY, "--json", "--", arg).stdout)
    shown = vs["path"].encode("utf-8", "surrogateescape")
    assert shown == name and (vs.get("path_b64") is None) == (name.decode("utf-8", "replace").encode() == name)
    assert run("fsck", "--store", ctx.root, "--read-data").exit_code == 0


@pytest.mark.parametrize("mutate, reason", CASES)
def test_rejected(ctx: Ctx, mutate: Mutate, reason: str) -> None:
    assert_rejected(ctx, maker(mutate), reason)


def test_forged_reason_file_is_not_kept(ctx: Ctx) -> None:
    """A REASON file in a submission is unexpected; failed/NAME is the daemon's own folder, with
    its own REASON and the manifest as received, and nothing else of the uploader's."""

    def make(c: Ctx) -> Sub:
        sub = valid_sub()
        sub.files[fmt.REASON_NAME] = b"rejected: all is well\n"
        return sub

    assert_rejected(ctx, make, r"REASON: unexpected file in a submission")
    failed = dropbox(ctx.root, "failed") / BAD1
    assert (failed / fmt.REASON_NAME).read_text().startswith("rejected: REASON: unexpected file")
    assert sorted(os.listdir(failed)) == [fmt.REASON_NAME]  # rejected before anything was copied
    assert failed.stat().st_uid == os.geteuid() and stat.S_IMODE(failed.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    "mutate", [other_chunk_ref, other_big_chunk_ref], ids=["single-chunk", "multi-chunk"]
)
def test_chunk_of_another_study_does_not_leak(ctx: Ctx, mutate: Mutate) -> None:
    """Invariant 6: a manifest may only reference chunks its own study holds or its own packs
    carry. Naming study t's chunks by id gets s nothing of t: no version, no have-segment entry,
    no receipt, and the reason names only ids the uploader itself sent."""
    other_ids = {cid for data in (OTHER_FILE, OTHER_BIG) for cid, _ in chunks_of(data)}
    assert other_ids <= stored_chunk_ids(ctx.root)
    assert_rejected(ctx, maker(mutate), uncarried(STUDY))
    from dittohead import records

    for seg in listing(dropbox(ctx.root, "have")):
        ids = set(records.decode_have((dropbox(ctx.root, "have") / seg).read_bytes()))
        assert not (ids & other_ids), f"have-segment {seg} of s lists a chunk of t"
    for path in ("stolen.txt", "stolen.bin", "secret.txt", "secret.bin"):
        assert run("cat", "--store", ctx.root, "--study", STUDY, path).exit_code != 0
        assert run("versions", "--store", ctx.root, "--study", STUDY, path).exit_code != 0
    assert listing(dropbox(ctx.root, "receipts")) == sorted(
        s["name"] for s in log_json(ctx.root, STUDY)
    )
    for name in (BAD1, BAD2):
        reason = (dropbox(ctx.root, "failed") / name / fmt.REASON_NAME).read_text()
        assert "secret" not in reason and f"'{OTHER}'" not in reason


def test_carrying_the_other_studys_chunk_is_accepted(ctx: Ctx) -> None:
    """The complement: an s submission that carries the bytes of a chunk t holds proves it has
    them, and is ingested; the chunk is not stored twice, and what s is told (receipt, log,
    have-segment) counts it as new to s, so it cannot learn that another study has it."""
    from dittohead import records

    before = stored_chunk_ids(ctx.root)
    sub = valid_sub()
    ((cid, data),) = chunks_of(OTHER_FILE)
    name, pdata = make_pack([(cid, data)])
    sub.packs[name] = pdata
    sub.manifest["entries"].append(file_entry("mine.txt", OTHER_FILE))
    sub.commit(ctx, BAD1)
    ok("watch", "--store", ctx.root, "--once")
    assert ok("cat", "--store", ctx.root, "--study", STUDY, "mine.txt").stdout_bytes == OTHER_FILE
    assert stored_chunk_ids(ctx.root) - before == BAD_IDS  # t's chunk was there already
    new_to_s = len(A_TXT) + len(C_TXT) + len(BIG_BIN) + len(OTHER_FILE)
    receipt = records.decode_receipt((dropbox(ctx.root, "receipts") / BAD1).read_bytes())
    assert receipt.new_chunk_bytes == new_to_s
    assert log_json(ctx.root, STUDY)[-1]["new_chunk_bytes"] == new_to_s
    segment = dropbox(ctx.root, "have") / f"{receipt.seq:010d}{fmt.HAVE_SUFFIX}"
    assert set(records.decode_have(segment.read_bytes())) == BAD_IDS | {cid}


def test_name_of_an_ingested_submission_is_rejected(ctx: Ctx) -> None:
    """A submission that reuses the name of one already ingested cannot be ingested under that
    name (names are unique per study) and must not be passed off as ingested."""
    taken = log_json(ctx.root, STUDY)[0]["name"]
    before = store_snapshot(ctx.root)
    logs = log_json(ctx.root, STUDY)
    valid_sub().commit(ctx, taken)
    res = run("watch", "--store", ctx.root, "--once")
    assert store_snapshot(ctx.root) == before and log_json(ctx.root, STUDY) == logs
    assert res.exit_code == 1, f"exit {res.exit_code}: {res.stdout} {res.stderr}"
    assert reject_line(res.stderr, taken)
    assert listing(dropbox(ctx.root, "failed")) == [taken]
