"""A manifest's limits: what a submission may hold, what decoding it costs, and how a sync that
has more to send stays within them.

* The largest manifests a submission may hold (both limits used up; long paths that Python keeps
  4 bytes a character; many chunks) decode in a fresh process within the memory target.
* One entry or one byte over a limit is a FormatError that says so; exactly at the limit is fine.
  A stored manifest (``stored=True``) is read under the larger limits of format version 1.
* The streaming decoder (entries longer than 64 KiB are read field by field) says exactly what
  the whole-entry decoder says, for valid entries and for every near miss.
* ``entry_size_max`` and ``header_size_max`` bound what ``encode`` writes.
* A sync with more files than one submission holds sends several, each complete, and every file
  comes back; a file too large for any submission is a warning, never a silent loss.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from conftest import Server, write_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dittohead import codec
from dittohead import format as fmt
from dittohead import manifest as mf
from dittohead.client import sync as sync_mod
from dittohead.errors import FormatError
from dittohead.hashing import EMPTY_HASH, digest

REPO = Path(__file__).resolve().parent.parent
RSS_TARGET_MIB = 300  # decode of the largest submission manifest, raw bytes included

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ID = st.binary(min_size=32, max_size=32)


# -- building large manifests without building a Manifest ------------------------------------


def _header(count: int, **changes: object) -> bytes:
    head = {"format": 1, "kind": "manifest", "study": "s", "site": "lab-1", "user": "ra",
            "host": "eeg-pc-01", "created_ns": 1_700_000_000_000_000_000}
    head.update(changes)
    out = bytes([0x80 | (len(head) + 1)])
    for k, v in head.items():
        out += codec.pack(k) + codec.pack(v)
    return out + codec.pack("entries") + b"\xdd" + count.to_bytes(4, "big")


def _entry(path: str, nchunks: int = 1, length: int = 1000, seed: int = 0) -> bytes:
    rnd = random.Random(seed)
    ids = [rnd.randbytes(32) for _ in range(nchunks)]
    return codec.pack({"path": path, "size": length * nchunks, "mtime_ns": 1_700_000_000_123_456_789,
                       "mode": 0o644, "hash": ids[0] if nchunks == 1 else digest(path.encode()),
                       "chunks": [[i, length] for i in ids]})


def _padded(i: int, length: int, tail: str = "") -> str:
    """A unique path of ``length`` bytes of UTF-8 (``tail`` at its end), folders of 200 bytes."""
    name = f"file-{i:07d}.txt" + tail
    rest = length - len(name.encode())
    parts = []
    while rest > 0:
        n = min(rest, 201)
        if n == 1:  # no room for "x/": lengthen the last folder instead
            parts[-1] += "x"
            break
        parts.append("d" * (n - 1))
        rest -= n
    return "/".join([*parts, name])


def largest(shape: str) -> bytes:
    """The largest manifest of ``shape`` that the submission limits admit."""
    room = fmt.MANIFEST_MAX_SIZE - len(_header(0))
    if shape == "fill":  # every entry allowed, paths as long as the bytes allow
        n = fmt.MANIFEST_MAX_ENTRIES
        plen = room // n - (len(_entry("x" * 300)) - 300)
        assert 20 <= plen <= 4000, plen
        entries = (_entry(_padded(i, plen), seed=i) for i in range(n))
    elif shape == "astral":  # paths of ~4 KB that Python keeps 4 bytes a character
        plen = 4000
        n = room // len(_entry(_padded(0, plen, "\U0001f600")))
        entries = (_entry(_padded(i, plen, "\U0001f600"), seed=i) for i in range(n))
    else:  # "chunks": files of 50,000 chunks, the most numerous thing per byte
        per = len(_entry("f/000000", 50_000))
        n = room // per
        entries = (_entry(f"f/{i:06d}", 50_000, seed=i) for i in range(n))
    data = _header(n) + b"".join(entries)
    assert fmt.MANIFEST_MAX_SIZE * 0.97 < len(data) <= fmt.MANIFEST_MAX_SIZE, (shape, len(data))
    return data


CHILD = """
import json, resource, sys, time
from dittohead import manifest as mf
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data = open(sys.argv[1], "rb").read()
t = time.perf_counter()
m = mf.decode(data)
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"entries": len(m.entries), "seconds": dt, "peak_mib": (peak - base) / 1024}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB: Linux")
@pytest.mark.parametrize("shape", ["fill", "astral", "chunks"])
def test_largest_submission_manifest_decodes_within_the_memory_target(shape: str, tmp_path: Path) -> None:
    path = tmp_path / "manifest"
    data = largest(shape)
    path.write_bytes(data)
    del data
    cp = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True,
                        cwd=REPO, timeout=300, check=False)
    assert cp.returncode == 0, cp.stderr
    got = json.loads(cp.stdout)
    assert got["peak_mib"] <= RSS_TARGET_MIB, got
    if shape == "fill":
        assert got["entries"] == fmt.MANIFEST_MAX_ENTRIES


# -- the limits, exactly -------------------------------------------------------------------


def _of_size(target: int) -> bytes:
    """A valid manifest of exactly ``target`` bytes: a file of many chunks, and one whose path
    takes up the rest."""
    fixed = len(_header(2)) + len(_entry(_padded(1, 300)))
    per = len(_entry("big", 2)) - len(_entry("big", 1))
    n = (target - fixed - len(_entry("big", 1)) - 500) // per
    big = _entry("big", n)
    plen = 300 + target - fixed - len(big)
    assert 256 <= plen <= 4000, plen
    data = _header(2) + big + _entry(_padded(1, plen), seed=1)
    assert len(data) == target
    return data


def test_a_manifest_of_the_byte_limit_passes_and_one_byte_more_does_not() -> None:
    at = _of_size(fmt.MANIFEST_MAX_SIZE)
    assert len(mf.decode(at).entries) == 2
    over = _of_size(fmt.MANIFEST_MAX_SIZE + 1)
    with pytest.raises(FormatError, match=rf"^manifest: {fmt.MANIFEST_MAX_SIZE + 1} bytes, more than the "
                                          rf"limit of {fmt.MANIFEST_MAX_SIZE}$"):
        mf.decode(over)
    assert len(mf.decode(over, stored=True).entries) == 2


def test_the_entry_limit_passes_and_one_entry_more_does_not() -> None:
    n = fmt.MANIFEST_MAX_ENTRIES
    one = [_entry(f"f{i:07d}", length=100) for i in range(n + 1)]
    at = _header(n) + b"".join(one[:n])
    assert len(mf.decode(at).entries) == n
    over = _header(n + 1) + b"".join(one)
    with pytest.raises(FormatError, match=r"^manifest: too many entries$"):
        mf.decode(over)
    assert len(mf.decode(over, stored=True).entries) == n + 1


def test_a_store_holding_manifests_over_todays_submission_limits_stays_readable(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Manifests that a store of version 1 took under the old, larger limits: every read
    command and fsck still read them (stored manifests keep the limits of version 1)."""
    src = tmp_path / "src"
    files = {f"f{i}.txt": f"file {i}\n".encode() for i in range(6)}
    for rel, data in files.items():
        write_file(src / rel, data)
    server.sync(src)
    server.ingest()
    (manifest,) = (p for p in (server.root / "store" / "manifests").rglob("*") if p.is_file())
    monkeypatch.setattr(fmt, "MANIFEST_MAX_ENTRIES", 3)  # lower than what the store holds
    monkeypatch.setattr(fmt, "MANIFEST_MAX_SIZE", manifest.stat().st_size - 1)
    with pytest.raises(FormatError):
        mf.decode(manifest.read_bytes())  # as a submission, it would be refused now
    for rel, data in files.items():
        assert server.cat(rel) == data
    res = server.run("fsck", "--store", server.root, "--read-data")
    assert res.exit_code == 0, res.output
    assert server.run("export", "--store", server.root, "--study", server.study, tmp_path / "out").exit_code == 0
    assert (tmp_path / "out" / "current" / "f5.txt").read_bytes() == files["f5.txt"]


def test_a_count_larger_than_the_bytes_is_not_msgpack(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FormatError, match="not valid msgpack"):
        mf.decode(_header(5) + _entry("a"))
    monkeypatch.setattr(fmt, "MANIFEST_MAX_ENTRIES", 3)
    with pytest.raises(FormatError, match="too many entries"):  # the count decides, before the rest is read
        mf.decode(_header(4) + b"\xc0" * 4)
    with pytest.raises(FormatError, match="format version 3 is not supported"):
        mf.decode(_header(4, format=3) + b"\xc0" * 4)


# -- the streaming decoder says what the whole-entry decoder says -----------------------------


def _outcome(data: bytes, *, streamed: bool, monkeypatch: pytest.MonkeyPatch) -> object:
    with monkeypatch.context() as m:
        if streamed:
            m.setattr(mf, "_SMALL_ENTRY", 0)  # every entry read field by field
        try:
            return mf.decode(data)
        except FormatError as e:
            return f"{type(e).__name__}: {e}"


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
                    st.text(max_size=10), st.binary(max_size=40))
VALUES = st.recursive(SCALARS, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=6), kids, max_size=3)), max_leaves=10)


@st.composite
def near_misses(draw) -> dict:
    """A manifest map with up to three fields changed, anywhere, chunks included."""
    ids = [digest(bytes([i])) for i in range(3)]
    m = {"format": 1, "kind": "manifest", "study": "s", "site": "x", "user": "u", "host": "h",
         "created_ns": 5, "entries": [
             {"path": "a.txt", "size": 7, "mtime_ns": 1, "mode": 0o644, "hash": ids[0],
              "chunks": [[ids[0], 3], [ids[1], 4]]},
             {"path": "d/e", "size": 0, "mtime_ns": -1, "mode": 0, "hash": EMPTY_HASH, "chunks": []},
             {"path": "d/f", "size": 5, "mtime_ns": 2, "mode": 0o600, "hash": ids[2], "chunks": [[ids[2], 5]]},
         ]}
    ents = m["entries"]  # the maps to change, even once the list is replaced
    for _ in range(draw(st.integers(0, 3))):
        e = draw(st.sampled_from(ents))
        target = draw(st.sampled_from(["manifest", "entry", "chunks", "chunk"]))
        chunks = e.get("chunks")
        if target == "manifest":
            m[draw(st.sampled_from([*sorted(m), "extra"]))] = draw(VALUES)
        elif target == "entry":
            key = draw(st.sampled_from([*sorted(e, key=repr), "colour", b"bytes-key"]))
            if draw(st.booleans()) and key in e:
                del e[key]
            else:
                e[key] = draw(VALUES)
        elif target == "chunk" and isinstance(chunks, list) and chunks:
            j = draw(st.integers(0, len(chunks) - 1))
            if isinstance(chunks[j], list) and chunks[j] and draw(st.booleans()):
                chunks[j][draw(st.integers(0, len(chunks[j]) - 1))] = draw(VALUES)
            else:
                chunks[j] = draw(VALUES)
        else:
            e["chunks"] = draw(st.one_of(VALUES, st.lists(
                st.tuples(ID, st.integers(-1, fmt.CHUNK_MAX + 1)).map(list), max_size=3)))
    return m


@FAST
@given(near_misses())
def test_the_streaming_decoder_agrees_with_the_whole_entry_decoder(m: dict) -> None:
    try:
        data = codec.pack(m)
    except (OverflowError, TypeError, ValueError):
        return
    with pytest.MonkeyPatch.context() as mp:
        whole = _outcome(data, streamed=False, monkeypatch=mp)
        streamed = _outcome(data, streamed=True, monkeypatch=mp)
    assert whole == streamed


def test_long_chunk_lists_stream_and_come_back_whole() -> None:
    ids = [digest(i.to_bytes(4, "little")) for i in range(5000)]
    e = mf.Entry("big.bin", 5000 * 1000, 1, 0o644, digest(b"x"), tuple((i, 1000) for i in ids))
    m = mf.Manifest("s", "site", "u", "h", 0, (e, mf.Entry("small", 3, 0, 0o644, ids[0], ((ids[0], 3),))))
    data = mf.encode(m)
    assert len(data) > mf._SMALL_ENTRY  # the big entry goes the streaming way
    back = mf.decode(data)
    assert back == m
    assert isinstance(back.entries[0].chunks, mf.Chunks)
    assert back.entries[0].chunks[4999] == (ids[4999], 1000)
    assert back.entries[0].chunks.blob[:36] == ids[0] + (1000).to_bytes(4, "little")
    assert mf.encode(back) == data


def test_chunks_read_like_a_tuple_of_pairs() -> None:
    a, b = digest(b"a"), digest(b"b")
    c = mf.Chunks([(a, 1), (b, 2)])
    assert len(c) == 2 and list(c) == [(a, 1), (b, 2)]
    assert c[0] == (a, 1) and c[-1] == (b, 2) and c[1:] == ((b, 2),)
    with pytest.raises(IndexError):
        c[2]
    assert c == ((a, 1), (b, 2)) and ((a, 1), (b, 2)) == c and c == [(a, 1), (b, 2)]
    assert c != ((a, 1),) and c != ((a, 1), (b, 3)) and c != "ab"
    assert hash(c) == hash(((a, 1), (b, 2)))
    assert mf.Chunks.from_blob(c.blob) == c
    assert not mf.Chunks() and mf.Chunks() == ()
    e = mf.Entry("p", 3, 0, 0o644, a, c)
    assert e == mf.Entry("p", 3, 0, 0o644, a, ((a, 1), (b, 2)))


# -- the size bounds a client keeps its manifests within --------------------------------------

PATHS = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=1400)


@FAST
@given(path=PATHS, chunks=st.lists(st.tuples(ID, st.integers(1, fmt.CHUNK_MAX)), max_size=20),
       mtime=st.integers(-(2**63), 2**63 - 1), mode=st.integers(0, 0o7777),
       text=st.text(max_size=fmt.TEXT_MAX), created=st.integers(-(2**63), 2**63 - 1),
       count=st.sampled_from([0, 1, 15, 16, 65535, 65536]))
def test_size_bounds_hold(path: str, chunks: list, mtime: int, mode: int, text: str, created: int,
                          count: int) -> None:
    e = mf.Entry(path, sum(n for _, n in chunks) or (1 << 62), mtime, mode, digest(b""), tuple(chunks))
    encoded = len(codec.pack(mf._entry_map(e)))
    bound = mf.entry_size_max(len(path.encode()), len(chunks))
    assert encoded <= bound <= encoded + 30 + 4 * len(chunks)  # small ints take fewer bytes
    m = mf.Manifest(text, text, text, text, created, ())
    head = len(mf.encode(m)) - 1  # without the empty list's header
    list_header = len(msgpack.packb([None] * count)) - count
    assert head + list_header <= mf.header_size_max(m)


# -- sync: several submissions when one cannot hold everything --------------------------------


def _submissions_of(output: str) -> list[str]:
    """The submissions a summary line names: one, or "N submissions, FIRST to LAST"."""
    m = re.search(r"; (\d+) submissions, (\S+) to (\S+?)(?:;|$)", output, re.MULTILINE)
    if m:
        return [m[2], m[3]] if int(m[1]) == 2 else [m[2], "...", m[3]]
    m = re.search(r"submission (\S+?)(?:;|$)", output, re.MULTILINE)
    return [m[1]] if m else []


def _tree(src: Path, n: int, seed: int = 7) -> dict[str, bytes]:
    """n small files, some with the same content (chunks shared across submissions), and one of
    several chunks."""
    rnd = random.Random(seed)
    files: dict[str, bytes] = {}
    for i in range(n):
        path = f"sub-{i % 3:02d}/ses-01/file-{i:03d}.txt"
        files[path] = b"same content\n" if i % 4 == 0 else rnd.randbytes(rnd.randint(0, 3000))
    files["sub-00/physio/big.bin"] = rnd.randbytes(9 * 1024 * 1024)  # 3 chunks at least (4 MiB at most each)
    for path, data in files.items():
        write_file(src / path, data)
    return files


def _everything_back(server: Server, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        assert server.cat(path) == data, path
        assert len(server.versions(path)) == 1, path


def test_a_sync_with_more_files_than_a_submission_holds_sends_several(
        server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fmt, "MANIFEST_MAX_ENTRIES", 5)  # the client's limit and the server's
    src = tmp_path / "src"
    files = _tree(src, 22)  # 23 files: 5 submissions, the last one of 3
    dry = server.run(*server.sync_args(src, dry_run=True))
    assert dry.exit_code == 0, dry.output
    assert "as 5 submissions" in dry.stdout, dry.stdout
    res = server.run(*server.sync_args(src))
    assert res.exit_code == 0, res.output
    assert re.search(r"23 new, 0 changed, 0 unchanged files; .* sent; 5 submissions, ", res.stdout), res.stdout
    names = _submissions_of(res.stdout)
    inbox = server.inbox_entries()
    assert len(inbox) == 5 and not any(n.startswith(".") for n in inbox), inbox
    assert inbox == sorted(inbox) and inbox[0] == names[0] and inbox[-1] == names[-1]
    assert inbox[1:] == [f"{inbox[0]}.{k:04d}" for k in range(2, 6)], inbox
    for name in inbox:  # each one complete: a manifest within the limit, and its own packs
        folder = server.dropbox("inbox") / name
        manifest = mf.decode((folder / fmt.MANIFEST_NAME).read_bytes())
        assert 1 <= len(manifest.entries) <= 5
    server.ingest()
    log = server.log()
    assert [s["name"] for s in log] == inbox, log
    assert sum(s["files"] for s in log) == 23, log
    _everything_back(server, files)
    again = server.sync(src)
    assert again.submission is None, again.output


def test_the_byte_limit_splits_too_and_a_file_too_large_is_a_warning(
        server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    files = _tree(src, 9)
    path_bytes = max(len(p.encode()) for p in files)
    header = mf.header_size_max(mf.Manifest("s", "lab", sync_mod._user(), socket.gethostname(), 0))
    # Room for one one-chunk file a submission, and not for the file of several chunks.
    monkeypatch.setattr(fmt, "MANIFEST_MAX_SIZE", header + mf.entry_size_max(path_bytes, 1) + 10)
    res = server.run(*server.sync_args(src, site="lab"))
    assert res.exit_code == 0, res.output
    big = "sub-00/physio/big.bin"
    assert re.search(rf"warning: '{re.escape(big)}': too large to send \(\d+ chunks", res.stderr), res.stderr
    assert "skipped: 1 too large for one submission" in res.stdout, res.stdout
    assert re.search(r"9 new, 0 changed, 0 unchanged files; .* 9 submissions, ", res.stdout), res.stdout
    server.ingest()
    assert sum(s["files"] for s in server.log()) == 9
    del files[big]
    _everything_back(server, files)
    # Not lost: the next run tries it again, and says so again; with room, it goes.
    again = server.run(*server.sync_args(src, site="lab"))
    assert "too large to send" in again.stderr and "nothing to send" in again.stdout, again.output
    monkeypatch.setattr(fmt, "MANIFEST_MAX_SIZE", 1 << 20)
    last = server.sync(src)
    assert last.submission is not None, last.output
    server.ingest()
    assert server.cat(big) == (src / big).read_bytes()


def test_an_interrupted_split_sync_resumes_and_loses_nothing(
        server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The third submission's commit fails: the two before it stand, and the next run sends the
    rest (resuming the staging folder), and every file comes back."""
    from dittohead.client import transport as tr

    monkeypatch.setattr(fmt, "MANIFEST_MAX_ENTRIES", 4)
    src = tmp_path / "src"
    files = _tree(src, 11)  # 12 files: 3 submissions
    real_commit = tr.LocalTransport.commit
    commits = []

    def failing_commit(self, study: str, name: str) -> None:
        commits.append(name)
        if len(commits) == 3:
            raise OSError(5, "Input/output error")
        real_commit(self, study, name)

    monkeypatch.setattr(tr.LocalTransport, "commit", failing_commit)
    res = server.run(*server.sync_args(src))
    assert res.exit_code != 0, res.output
    monkeypatch.setattr(tr.LocalTransport, "commit", real_commit)
    inbox = server.inbox_entries()
    assert len([n for n in inbox if not n.startswith(".")]) == 2, inbox
    again = server.sync(src)
    assert again.submission is not None, again.output
    server.ingest()
    assert sum(s["files"] for s in server.log()) == 12
    _everything_back(server, files)


def test_docs_name_the_limits() -> None:
    text = (REPO / "docs" / "format.md").read_text(encoding="utf-8")
    assert f"{fmt.MANIFEST_MAX_ENTRIES:,}" in text and f"{fmt.MANIFEST_MAX_SIZE >> 20} MiB" in text
    assert f"{fmt.STORED_MANIFEST_MAX_ENTRIES:,}" in text
    assert os.path.exists(REPO / "benchmarks" / "manifest_memory.py")
