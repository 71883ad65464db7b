"""Property tests on the pure core of format version 1: chunking, packs, manifests, study logs,
have-segments and receipts.

No store, no CLI: bytes in, bytes out. The properties:

* chunking: cut and reassemble gives the same bytes; every chunk within the format's bounds; the
  streaming cutter, the in-memory cutter, the small-file fast path and raw pyfastcdc with the
  format's parameters all cut the same bytes the same way; boundaries stay put after a local edit.
* packs: write, read back, verify; every single-bit flip and every truncation is noticed.
* manifests: round trip; every path rule enforced by ``decode``.
* "one strict decoder": whatever bytes come in, manifest.decode, studylog.parse,
  records.decode_have, records.decode_receipt and pack.parse_pack_tail either succeed or raise
  FormatError: never another exception (random bytes, and structured near-misses that get past
  the first checks).
* study logs: round trip; a log cut at every byte parses to a prefix with ``torn`` set exactly
  off record boundaries; a damaged record with good ones after it is damage.
"""

from __future__ import annotations

import io
import os
import random
import tempfile

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pyfastcdc import FastCDC

from dittohead import codec, pack, records, studylog
from dittohead import format as fmt
from dittohead import manifest as mf
from dittohead.chunking import Chunker
from dittohead.errors import FormatError, IntegrityError
from dittohead.hashing import EMPTY_HASH, digest

KiB = 1024
MiB = 1024 * KiB

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.data_too_large])
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def randbytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


# ----------------------------------------------------------------------------------- chunking


def raw_cdc() -> FastCDC:
    """pyfastcdc with the format's parameters, built here from format.py, not via chunking.py."""
    return FastCDC(fmt.CHUNK_AVG, min_size=fmt.CHUNK_MIN, max_size=fmt.CHUNK_MAX,
                   normalized_chunking=fmt.CHUNK_NORMALIZATION,  # type: ignore[arg-type]
                   seed=fmt.CHUNK_SEED)


def check_chunking(data: bytes) -> list[bytes]:
    """Every chunking property for one input; returns the chunk ids."""
    ch = Chunker()
    chunks = list(ch.cut_bytes(data))
    assert b"".join(c.data for c in chunks) == data
    assert sum(c.length for c in chunks) == len(data)
    if not data:
        assert chunks == []  # an empty file has no chunks
    for i, c in enumerate(chunks):
        assert 0 < c.length <= fmt.CHUNK_MAX
        if i < len(chunks) - 1:
            assert c.length >= fmt.CHUNK_MIN, (i, c.length)
        assert c.id == digest(c.data)
    if len(data) <= fmt.CHUNK_MIN and data:
        assert len(chunks) == 1  # "a file smaller than the minimum is one chunk"
    # The streaming cutter (with a right size hint, and with a hint that is too small: the file
    # grew between stat and read) cuts the same way.
    # A streamed chunk's data is only valid until the next one is cut: copy it at once.
    for hint in {len(data), 0}:
        streamed = [(c.id, bytes(c.data)) for c in Chunker().cut_stream(io.BytesIO(data), hint)]
        assert streamed == [(c.id, c.data) for c in chunks], hint
        assert all(cid == digest(b) for cid, b in streamed)
    # The real chunker with the format's parameters agrees, including for small inputs (so the
    # small-file fast path cuts what pyfastcdc would cut).
    raw = [bytes(c.data) for c in raw_cdc().cut_buf(data)] if data else []
    assert raw == [c.data for c in chunks]
    return [c.id for c in chunks]


BOUNDARY_SIZES = [0, 1, 2, fmt.CHUNK_MIN - 1, fmt.CHUNK_MIN, fmt.CHUNK_MIN + 1,
                  2 * fmt.CHUNK_MIN, fmt.CHUNK_AVG, fmt.CHUNK_MAX - 1, fmt.CHUNK_MAX,
                  fmt.CHUNK_MAX + 1, fmt.CHUNK_MAX + fmt.CHUNK_MIN - 1]


@pytest.mark.parametrize("size", BOUNDARY_SIZES)
@pytest.mark.parametrize("kind", ["random", "zeros"])
def test_chunking_at_boundary_sizes(size: int, kind: str) -> None:
    data = randbytes(size, size) if kind == "random" else bytes(size)
    check_chunking(data)


def test_chunking_low_entropy_cuts_at_the_maximum() -> None:
    data = bytes(3 * fmt.CHUNK_MAX + 5)
    ch = list(Chunker().cut_bytes(data))
    assert [c.length for c in ch] == [fmt.CHUNK_MAX] * 3 + [5]
    assert len({c.id for c in ch}) == 2  # dedup inside one file: three identical chunks


@FAST
@given(st.binary(max_size=4096))
def test_chunking_small_binary(data: bytes) -> None:
    check_chunking(data)


@FEW
@given(seed=st.integers(0, 2**32), size=st.integers(fmt.CHUNK_MIN - 2, 6 * MiB))
def test_chunking_large_random(seed: int, size: int) -> None:
    check_chunking(randbytes(seed, size))


@FEW
@given(seed=st.integers(0, 2**32), period=st.integers(1, 5000), size=st.integers(0, 3 * MiB))
def test_chunking_repetitive(seed: int, period: int, size: int) -> None:
    unit = randbytes(seed, period)
    check_chunking((unit * (size // period + 1))[:size])


def test_boundaries_stay_put_after_a_local_edit() -> None:
    data = randbytes(42, 8 * MiB)
    mid = len(data) // 2
    edited = data[:mid] + bytes(b ^ 0x5A for b in data[mid:mid + 100]) + data[mid + 100:]
    assert len(edited) == len(data)

    def spans(buf: bytes) -> list[tuple[int, int, bytes]]:
        out, pos = [], 0
        for c in Chunker().cut_bytes(buf):
            out.append((pos, pos + c.length, c.id))
            pos += c.length
        return out

    before, after = spans(data), spans(edited)
    assert len(before) >= 4, "8 MiB of random data should make several chunks"
    after_ids = {cid for _, _, cid in after}
    # Every chunk that ends before the edit keeps its id (and its place).
    ahead = [s for s in before if s[1] <= mid]
    assert ahead and all(s in after for s in ahead)
    # Chunks well after the edit (past the chunk that holds it and one more for resync) too.
    behind = [s for s in before if s[0] >= mid + 100 + 2 * fmt.CHUNK_MAX]
    far = [s for s in before if s[0] >= mid + 100]
    kept = [s for s in far if s[2] in after_ids]
    assert len(kept) >= len(far) - 2, (len(kept), len(far))
    assert all(s[2] in after_ids for s in behind)
    # Changed chunks: only around the edit.
    changed = [s for s in after if s[2] not in {cid for _, _, cid in before}]
    assert 1 <= len(changed) <= 3
    # An insertion shifts everything after it, yet the chunks downstream resynchronise.
    inserted = data[:mid] + b"x" * 100 + data[mid:]
    ins_ids = {cid for _, _, cid in spans(inserted)}
    assert sum(1 for s in far if s[2] in ins_ids) >= len(far) - 2


# -------------------------------------------------------------------------------------- packs


def build_pack(chunks: list[bytes]) -> tuple[bytes, bytes, list[bytes]]:
    """(pack bytes, pack id, distinct chunk datas in order)."""
    buf = io.BytesIO()
    w = pack.PackWriter(buf)
    seen: dict[bytes, bytes] = {}
    for c in chunks:
        cid = digest(c)
        e = w.add(cid, c)
        assert e.id == cid and e.length == len(c)
        seen.setdefault(cid, c)
    pid, size = w.finish()
    data = buf.getvalue()
    assert size == len(data) and pid == digest(data)
    return data, pid, list(seen.values())


def parse_bytes(data: bytes) -> list[pack.PackEntry]:
    return pack.parse_pack_tail(data[:fmt.PACK_HEADER.size], data, len(data), what="pack")


@pytest.fixture
def tmpfile():
    fd, path = tempfile.mkstemp(prefix="dittohead-pack-")
    os.close(fd)
    yield path
    os.unlink(path)


@FAST
@given(st.lists(st.binary(min_size=1, max_size=700), max_size=12))
def test_pack_round_trip(chunks: list[bytes]) -> None:
    data, _, distinct = build_pack(chunks)
    entries = parse_bytes(data)
    assert [e.id for e in entries] == [digest(c) for c in distinct]
    assert [e.length for e in entries] == [len(c) for c in distinct]
    got = [bytes(d) for _, d in pack.iter_verified(io.BytesIO(data), entries, what="pack")]
    assert got == distinct
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        assert pack.read_entries(f, what="pack") == entries
        for e, c in zip(entries, distinct):
            assert pack.read_chunk(f, e, what="pack") == c


SMALL_PACK_CHUNKS = [b"first chunk", randbytes(1, 57), b"\x00" * 33, "dr\u00fcckt".encode() * 5]


def _check_pack_file(path: str) -> str:
    """'format', 'integrity' or 'ok' for the pack file at path."""
    with open(path, "rb") as f:
        try:
            entries = pack.read_entries(f, what="pack")
        except FormatError:
            return "format"
        try:
            f.seek(0)
            list(pack.iter_verified(f, entries, what="pack"))
        except IntegrityError:
            return "integrity"
    return "ok"


def test_pack_every_single_bit_flip_is_noticed(tmpfile: str) -> None:
    data, _, _ = build_pack(SMALL_PACK_CHUNKS)
    with open(tmpfile, "wb") as f:
        f.write(data)
    assert _check_pack_file(tmpfile) == "ok"
    unnoticed = []
    data_start = fmt.PACK_HEADER.size
    data_end = data_start + sum(len(c) for c in SMALL_PACK_CHUNKS)
    fd = os.open(tmpfile, os.O_RDWR)
    try:
        for pos in range(len(data)):
            for bit in range(8):  # every bit, not only (pos % 8): the pack is small
                os.pwrite(fd, bytes([data[pos] ^ (1 << bit)]), pos)
                verdict = _check_pack_file(tmpfile)
                os.pwrite(fd, data[pos:pos + 1], pos)
                if verdict == "ok":
                    unnoticed.append((pos, bit))
                elif data_start <= pos < data_end:
                    # A flip in chunk data leaves the trailer sound: it is an integrity error.
                    assert verdict == "integrity", (pos, bit, verdict)
                else:
                    assert verdict == "format", (pos, bit, verdict)
    finally:
        os.close(fd)
    assert not unnoticed


def test_pack_every_truncation_and_extension_is_noticed(tmpfile: str) -> None:
    data, _, _ = build_pack(SMALL_PACK_CHUNKS)
    for n in range(len(data)):
        with open(tmpfile, "wb") as f:
            f.write(data[:n])
        assert _check_pack_file(tmpfile) == "format", n
    for extra in (b"\x00", b"x" * 100, data[-fmt.PACK_FOOTER.size:]):
        with open(tmpfile, "wb") as f:
            f.write(data + extra)
        assert _check_pack_file(tmpfile) == "format", extra


def test_empty_pack_round_trip() -> None:
    data, _, _ = build_pack([])
    assert parse_bytes(data) == []


# ---------------------------------------------------------------------------------- manifests


# A name: any bytes but "/" and NUL (format 2), as a study path's text; not "." or "..".
COMPONENT = (
    st.binary(min_size=1, max_size=12).map(lambda b: b.replace(b"/", b"_").replace(b"\x00", b"~"))
    .filter(lambda b: b not in (b".", b".."))
    .map(lambda b: b.decode("utf-8", "surrogateescape"))
) | st.text(alphabet=st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=12).filter(
    lambda s: s not in (".", ".."))
PATH = st.lists(COMPONENT, min_size=1, max_size=3).map("/".join)
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=40)
I64 = st.integers(-(2**63), 2**63 - 1)
ID = st.binary(min_size=32, max_size=32)


def _tree_ok(paths: list[str]) -> bool:
    """No duplicates and no path that is also a folder of another (an independent check)."""
    s = set(paths)
    return len(s) == len(paths) and not any(q.startswith(p + "/") for p in s for q in s)


@st.composite
def entries(draw, path: str) -> mf.Entry:
    chunks = draw(st.lists(st.tuples(ID, st.integers(1, fmt.CHUNK_MAX)), max_size=4))
    fhash = EMPTY_HASH if not chunks else draw(ID)
    return mf.Entry(path=path, size=sum(n for _, n in chunks), mtime_ns=draw(I64),
                    mode=draw(st.integers(0, 0o7777)), hash=fhash, chunks=tuple(chunks))


@st.composite
def manifests(draw) -> mf.Manifest:
    paths = draw(st.lists(PATH, max_size=6, unique=True).filter(_tree_ok))
    return mf.Manifest(study=draw(TEXT), site=draw(TEXT), user=draw(TEXT), host=draw(TEXT),
                       created_ns=draw(I64), entries=tuple(draw(entries(p)) for p in paths))


@FAST
@given(manifests())
def test_manifest_round_trip(m: mf.Manifest) -> None:
    data = mf.encode(m)
    assert mf.decode(data) == m
    assert mf.encode(mf.decode(data)) == data  # deterministic encoding: the id is stable
    assert mf.manifest_id(data) == digest(data)


def _manifest_with_paths(*paths: str) -> bytes:
    ents = [mf.Entry(p, 3, 0, 0o644, digest(b"abc"), ((digest(b"abc"), 3),)) for p in paths]
    return mf.encode(mf.Manifest("s", "site", "user", "host", 0, tuple(ents)))


BAD_PATHS = [
    "..", "../a", "a/..", "a/../b", ".", "./a", "a/.",
    "/abs", "/", "a//b", "a/", "",
    "a\x00b", "\udcff\x00",
    "x" * 1025, "\udcff" * 1025, "/".join(["y" * 1000] * 99),
]


@pytest.mark.parametrize("bad", BAD_PATHS)
def test_manifest_rejects_bad_paths(bad: str) -> None:
    with pytest.raises(FormatError):
        mf.decode(_manifest_with_paths("ok.txt", bad))


@pytest.mark.parametrize("paths", [("a", "a"), ("a/b", "a/b"), ("a", "a/b"), ("a/b", "a"), ("x/y", "x/y/z")])
def test_manifest_rejects_duplicates_and_file_folder_clashes(paths: tuple[str, ...]) -> None:
    with pytest.raises(FormatError):
        mf.decode(_manifest_with_paths(*paths))


def test_manifest_accepts_the_edges() -> None:
    """Every name a filesystem gives, exactly: what format 1 refused (NFD, control characters, a
    backslash, bytes that are not UTF-8) included, up to the limits."""
    ok = ["x" * 1024, "/".join(["y" * 1000] * 98), "\u00c5ngstr\u00f6m/\u65e5\u672c.csv", "a b/ c ", "...",
          ".hidden", "e\u0301.txt", "\u00e9.txt", "\u212b", "a\nb", "a\x7fb", "a\\b", "lat\udce9n",
          "\udced\udca0\udc80", "-rf", "\u202eexe.txt"]
    m = mf.decode(_manifest_with_paths(*ok))
    assert [e.path for e in m.entries] == ok
    raw = codec.unpack(_manifest_with_paths(*ok), what="t", max_size=1 << 24)
    assert [e["path"] for e in raw["entries"]] == [p.encode("utf-8", "surrogateescape") for p in ok]


def test_a_format_1_manifest_reads_as_before() -> None:
    """A manifest of format version 1 (paths as str) decodes to the same paths."""
    m = _good_manifest_map()
    m["format"] = 1
    for e in m["entries"]:
        e["path"] = e["path"].decode()
    assert [e.path for e in mf.decode(codec.pack(m)).entries] == ["a.txt", "d/b.bin"]


def _good_manifest_map() -> dict:
    return codec.unpack(_manifest_with_paths("a.txt", "d/b.bin"), what="t", max_size=1 << 20)


@pytest.mark.parametrize("change", [
    lambda m: m.update(format=3),
    lambda m: m.update(format=1),  # paths are bin: version 2's
    lambda m: m["entries"][0].update(path="a.txt"),  # a str path in version 2
    lambda m: m.update(kind="receipt"),
    lambda m: m.pop("site"),
    lambda m: m.update(site="a\x01b"),
    lambda m: m.update(site="x" * 257),
    lambda m: m.update(created_ns=True),
    lambda m: m.update(extra=1),
    lambda m: m["entries"][0].update(size=4),  # chunk lengths do not add up
    lambda m: m["entries"][0].update(size=-1),
    lambda m: m["entries"][0].update(mode=0o10000),
    lambda m: m["entries"][0].update(hash=b"short"),
    lambda m: m["entries"][0].update(chunks=[[b"x" * 32, 0]]),
    lambda m: m["entries"][0].update(chunks=[[b"x" * 32, fmt.CHUNK_MAX + 1]], size=fmt.CHUNK_MAX + 1),
    lambda m: m["entries"][0].update(chunks=[], size=0),  # empty file with the wrong hash
    lambda m: m["entries"][0].update(colour="red"),
    lambda m: m["entries"].append(7),
])
def test_manifest_rejects_bad_fields(change) -> None:
    m = _good_manifest_map()
    change(m)
    with pytest.raises(FormatError):
        mf.decode(codec.pack(m))


@pytest.mark.parametrize("where", ["manifest", "entry"])
def test_manifest_unknown_keys_of_mixed_types_are_a_format_error(where: str) -> None:
    """Found by these tests (fixed since): sorting {b'a', 'b'} for the "unknown fields" message
    raised TypeError, which ingest did not catch."""
    m = _good_manifest_map()
    target = m if where == "manifest" else m["entries"][0]
    target[b"bytes-key"] = 1
    target["str-key"] = 2
    with pytest.raises(FormatError):
        mf.decode(codec.pack(m))


# ------------------------------------------------------------- one strict decoder: fuzzing

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**64) + 1, 2**64 - 1), st.floats(),
                    st.text(max_size=20), st.binary(max_size=40))
# msgpack-able values; map keys text or bytes (msgpack's strict_map_key admits both).
VALUES = st.recursive(SCALARS, lambda kids: st.one_of(
    st.lists(kids, max_size=5),
    st.dictionaries(st.one_of(st.text(max_size=8), st.binary(max_size=8)), kids, max_size=5)), max_leaves=20)


def _safe_pack(obj) -> bytes:
    try:
        return codec.pack(obj)
    except (OverflowError, TypeError, ValueError):
        assume(False)
        raise


def only_format_errors(decode, data: bytes) -> None:
    try:
        decode(data)
    except FormatError:
        pass  # the only failure a decoder may have (UnsupportedFormat is one)


DECODERS = {
    "manifest": mf.decode,
    "studylog": lambda d: studylog.parse(d, what="log"),
    "have": lambda d: records.decode_have(d),
    "receipt": records.decode_receipt,
    "pack": parse_bytes,
}


@FUZZ
@given(name=st.sampled_from(sorted(DECODERS)), data=st.binary(max_size=600))
def test_random_bytes_only_format_errors(name: str, data: bytes) -> None:
    only_format_errors(DECODERS[name], data)


@FUZZ
@given(name=st.sampled_from(sorted(DECODERS)), obj=VALUES)
def test_random_msgpack_only_format_errors(name: str, obj) -> None:
    only_format_errors(DECODERS[name], _safe_pack(obj))


def _valid_samples() -> dict[str, bytes]:
    rec = studylog.LogRecord(1, "sub-1", digest(b"m"), 5, (digest(b"p"),))
    rec2 = studylog.LogRecord(2, "sub-2", digest(b"n"), 6, ())
    receipt = records.Receipt("s", "sub-1", 1, digest(b"m"), 5, 2, 2, 100)
    return {
        "manifest": _manifest_with_paths("a.txt", "d/b.bin"),
        "studylog": studylog.header() + studylog.encode_record(rec) + studylog.encode_record(rec2),
        "have": records.encode_have([digest(b"1"), digest(b"2")]),
        "receipt": records.encode_receipt(receipt),
        "pack": build_pack([b"abc", b"defgh"])[0],
    }


VALID = _valid_samples()


@FUZZ
@given(name=st.sampled_from(sorted(DECODERS)), data=st.data())
def test_mutated_valid_bytes_only_format_errors(name: str, data) -> None:
    buf = bytearray(VALID[name])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        if not buf:
            break
        i = data.draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del buf[i:]
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del buf[i:i + data.draw(st.integers(1, 8))]
    only_format_errors(DECODERS[name], bytes(buf))


def _mutate_map(data, m: dict) -> dict:
    """Replace, drop or add one field of a (possibly nested) map with an arbitrary value."""
    targets = [m] + [e for e in m.get("entries", []) if isinstance(e, dict)]
    t = data.draw(st.sampled_from(targets))
    op = data.draw(st.sampled_from(["replace", "drop", "add"]))
    if op == "replace" and t:
        t[data.draw(st.sampled_from(sorted(t, key=repr)))] = data.draw(VALUES)
    elif op == "drop" and t:
        del t[data.draw(st.sampled_from(sorted(t, key=repr)))]
    else:
        t[data.draw(st.one_of(st.text(max_size=8), st.binary(max_size=8)))] = data.draw(VALUES)
    return m


def _log_with_payload(payload: bytes) -> bytes:
    return studylog.header() + fmt.LOG_RECORD_LEN.pack(len(payload)) + payload + digest(payload)


def _pack_with_trailer(trailer: bytes, data: bytes = b"abcdefgh") -> bytes:
    return (fmt.PACK_HEADER.pack(fmt.PACK_MAGIC, 1) + data + trailer
            + fmt.PACK_FOOTER.pack(len(trailer), digest(trailer), fmt.PACK_MAGIC))


@FUZZ
@given(name=st.sampled_from(["manifest", "studylog", "receipt", "pack"]), data=st.data())
def test_structured_near_misses_only_format_errors(name: str, data) -> None:
    """Valid framing and checksums around a decoded map with one field wrong: this reaches the
    field checks that random bytes never get to."""
    if name == "manifest":
        m = _mutate_map(data, _good_manifest_map())
        blob = _safe_pack(m)
    elif name == "receipt":
        r = VALID["receipt"]
        m = _mutate_map(data, codec.unpack(r, what="t", max_size=1 << 20))
        blob = _safe_pack(m)
    elif name == "studylog":
        rec = studylog.LogRecord(1, "sub-1", digest(b"m"), 5, (digest(b"p"),))
        m = codec.unpack(studylog.encode_record(rec)[4:-32], what="t", max_size=1 << 20)
        blob = _log_with_payload(_safe_pack(_mutate_map(data, m)))
    else:
        entries = [[digest(b"abc"), 12, 3, 0], [digest(b"defgh"), 15, 5, 0]]
        i = data.draw(st.integers(0, 1))
        j = data.draw(st.integers(0, 4))
        item = entries[i]
        if j < 4:
            item[j] = data.draw(VALUES)
        else:
            entries[i] = data.draw(VALUES)
        blob = _pack_with_trailer(_safe_pack(entries if data.draw(st.booleans()) else data.draw(VALUES)))
    only_format_errors(DECODERS[name], blob)


# ---------------------------------------------------------------------------------- study logs

SUBMISSION = st.from_regex(fmt.SUBMISSION_NAME_RE, fullmatch=True)


@st.composite
def log_records(draw) -> list[studylog.LogRecord]:
    n = draw(st.integers(0, 4))
    return [studylog.LogRecord(seq=i + 1, submission=draw(SUBMISSION), manifest=draw(ID),
                               ingested_ns=draw(st.integers(0, 2**63 - 1)),
                               packs=tuple(draw(st.lists(ID, max_size=3))))
            for i in range(n)]


def _encode_log(recs: list[studylog.LogRecord]) -> tuple[bytes, list[int]]:
    """The log's bytes and the offsets where each record ends."""
    data = studylog.header()
    ends = []
    for r in recs:
        data += studylog.encode_record(r)
        ends.append(len(data))
    return data, ends


@FAST
@given(log_records())
def test_studylog_round_trip(recs: list[studylog.LogRecord]) -> None:
    data, _ = _encode_log(recs)
    parsed = studylog.parse(data, what="log")
    assert parsed.records == recs and not parsed.torn and parsed.good_size == len(data)


def _check_every_cut(recs: list[studylog.LogRecord]) -> None:
    data, ends = _encode_log(recs)
    hsize = fmt.LOG_HEADER.size
    boundaries = {0, hsize, *ends}
    for cut in range(len(data) + 1):
        parsed = studylog.parse(data[:cut], what="log")  # never raises
        k = sum(1 for e in ends if e <= cut)
        assert parsed.records == recs[:k], cut
        assert parsed.torn == (cut not in boundaries), cut
        assert parsed.good_size == (max([hsize, *[e for e in ends if e <= cut]]) if cut >= hsize else 0)


def test_studylog_cut_at_every_byte() -> None:
    recs = [studylog.LogRecord(i, f"2024010{i}T000000Z-abc{i}", digest(bytes([i])), 10**18 + i,
                               tuple(digest(bytes([i, j])) for j in range(i))) for i in range(1, 4)]
    _check_every_cut(recs)


@settings(max_examples=20, deadline=None)
@given(log_records())
def test_studylog_cut_at_every_byte_property(recs: list[studylog.LogRecord]) -> None:
    _check_every_cut(recs)


def test_studylog_damage_before_good_records_is_damage() -> None:
    """A bit flip in the payload or checksum of a record that has good records after it is
    damage (FormatError), never a silently ignored torn tail."""
    recs = [studylog.LogRecord(i, f"sub-{i}", digest(bytes([i])), i, ()) for i in range(1, 4)]
    data, ends = _encode_log(recs)
    lsize = fmt.LOG_RECORD_LEN.size
    for start, end in zip([fmt.LOG_HEADER.size] + ends[:-1], ends[:-1]):
        for pos in range(start + lsize, end):  # payload and checksum of a non-last record
            bad = bytearray(data)
            bad[pos] ^= 1 << (pos % 8)
            with pytest.raises(FormatError):
                studylog.parse(bytes(bad), what="log")


def test_studylog_torn_last_record_is_not_damage() -> None:
    recs = [studylog.LogRecord(i, f"sub-{i}", digest(bytes([i])), i, ()) for i in range(1, 3)]
    data, ends = _encode_log(recs)
    for pos in range(ends[0] + fmt.LOG_RECORD_LEN.size, ends[1]):  # flip in the last record
        bad = bytearray(data)
        bad[pos] ^= 1 << (pos % 8)
        parsed = studylog.parse(bytes(bad), what="log")
        assert parsed.records == recs[:1] and parsed.torn and parsed.good_size == ends[0]


@pytest.mark.parametrize("data", [b"NOTALOG!\x01\x00\x00\x00", b"XITTOLOG", b"garbage"])
def test_studylog_not_a_log(data: bytes) -> None:
    with pytest.raises(FormatError):
        studylog.parse(data, what="log")


def test_studylog_unsupported_version() -> None:
    from dittohead.errors import UnsupportedFormat

    with pytest.raises(UnsupportedFormat):
        studylog.parse(fmt.LOG_HEADER.pack(fmt.LOG_MAGIC, 3), what="log")


def test_studylog_sequence_gap_is_damage() -> None:
    recs = [studylog.LogRecord(1, "a", digest(b"1"), 1, ()), studylog.LogRecord(3, "b", digest(b"2"), 2, ())]
    with pytest.raises(FormatError):
        studylog.parse(_encode_log(recs)[0], what="log")


# -------------------------------------------------------------------- have-segments, receipts


@FAST
@given(st.lists(ID, max_size=50))
def test_have_round_trip(ids: list[bytes]) -> None:
    data = records.encode_have(ids)
    assert records.decode_have(data) == ids
    for pos in range(0, len(data), max(1, len(data) // 40)):
        bad = bytearray(data)
        bad[pos] ^= 1 << (pos % 8)
        with pytest.raises(FormatError):
            records.decode_have(bytes(bad))


@FAST
@given(st.builds(records.Receipt, study=TEXT, submission=TEXT, seq=st.integers(0, 2**63 - 1),
                 manifest=ID, ingested_ns=st.integers(0, 2**63 - 1), files=st.integers(0, 2**63 - 1),
                 new_versions=st.integers(0, 2**63 - 1), new_chunk_bytes=st.integers(0, 2**63 - 1)))
def test_receipt_round_trip(r: records.Receipt) -> None:
    assert records.decode_receipt(records.encode_receipt(r)) == r


@FAST
@given(st.lists(st.one_of(st.characters(codec="utf-8"), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)),
                min_size=1, max_size=12).map("".join))
def test_a_windows_name_has_one_wtf8_form_that_gives_it_back(name: str) -> None:
    """A Windows name (UTF-16, unpaired surrogates allowed, as Python lists it) is stored as
    WTF-8 and comes back unchanged; every name has exactly one form (no two names share it)."""
    from dittohead import paths

    stored = paths.to_bytes(paths.from_windows_name(name))
    assert stored.decode("utf-8", "surrogatepass") == name
    assert paths.from_bytes(stored) == paths.from_windows_name(name)
