"""Study logs: the history of one study, one record per ingested submission.

A record is an object of its own, ``studies/NAME/SEQ.rec`` (``record_key``; SEQ in 10 digits):
HEADER (magic, version), then the record as (length u32le, msgpack payload, BLAKE3-256 of the
payload). Creating it, never overwriting, is the commit point of an ingest: an object store
creates an object whole or not at all, so there is no torn record, and the next record's key
says where the history goes on without reading what came before (``parse_one``).

dittohead 0.1 and 0.2 kept a study's records in one object, ``studies/NAME.log``: the same
HEADER, then every record back to back, appended (``parse``). A crash could leave a torn last
record there; ``parse`` recognises it (it is the last thing in the file and fails its length or
checksum), reports it, and never takes it as committed. A bad record with good ones after it is
damage, not a tear. The ingest copies such a log into record objects once, and never writes
to it again (``Store.upgrade_logs``).

A record is a map: ``kind`` ("ingest"), ``seq`` (1, 2, ... as ingested: the server's order),
``submission`` (its name in the inbox), ``manifest`` (id), ``ingested_ns`` (the server's clock),
``packs`` (ids of the store packs this ingest wrote).
"""

from __future__ import annotations

from dataclasses import dataclass

from dittohead import codec
from dittohead import format as fmt
from dittohead.errors import FormatError, UnsupportedFormat
from dittohead.hashing import digest


@dataclass(frozen=True)
class LogRecord:
    seq: int
    submission: str
    manifest: bytes
    ingested_ns: int
    packs: tuple[bytes, ...]


@dataclass(frozen=True)
class ParsedLog:
    records: list[LogRecord]
    good_size: int  # bytes up to the end of the last good record
    torn: bool  # bytes after good_size that do not form a record


def header() -> bytes:
    return fmt.LOG_HEADER.pack(fmt.LOG_MAGIC, fmt.FORMAT_VERSION)


def encode_record(rec: LogRecord) -> bytes:
    if not fmt.SUBMISSION_NAME_RE.match(rec.submission):  # never write what parse would refuse
        raise ValueError(f"bad submission name {rec.submission!r}")
    payload = codec.pack(
        {
            "kind": fmt.LOG_KIND,
            "seq": rec.seq,
            "submission": rec.submission,
            "manifest": rec.manifest,
            "ingested_ns": rec.ingested_ns,
            "packs": list(rec.packs),
        }
    )
    return fmt.LOG_RECORD_LEN.pack(len(payload)) + payload + digest(payload)


def _decode_payload(payload: bytes, what: str) -> LogRecord:
    m = codec.as_map(codec.unpack(payload, what=what, max_size=fmt.LOG_RECORD_MAX), what=what)
    if codec.field(m, "kind", str, what=what) != fmt.LOG_KIND:
        raise FormatError(f"{what}: unknown kind")
    seq = codec.uint(m, "seq", what=what)
    sub = codec.text(m, "submission", what=what, limit=fmt.TEXT_MAX)
    if not fmt.SUBMISSION_NAME_RE.match(sub):
        raise FormatError(f"{what}: bad submission name")
    mid = codec.digest(m, "manifest", what=what)
    ingested_ns = codec.uint(m, "ingested_ns", what=what)
    packs = codec.field(m, "packs", list, what=what)
    if not all(isinstance(p, bytes) and len(p) == fmt.HASH_SIZE for p in packs):
        raise FormatError(f"{what}: bad pack id")
    return LogRecord(seq, sub, mid, ingested_ns, tuple(packs))


def _check_header(data: bytes, what: str) -> None:
    magic, version = fmt.LOG_HEADER.unpack(data[: fmt.LOG_HEADER.size])
    if magic != fmt.LOG_MAGIC:
        raise FormatError(f"{what}: not a study log (bad magic)")
    if version not in fmt.SUPPORTED_VERSIONS:
        raise UnsupportedFormat(f"{what}: log format version {version} is not supported")


def parse(data: bytes, *, what: str) -> ParsedLog:
    """Parse a whole log; FormatError for damage, a torn tail reported in the result."""
    hsize = fmt.LOG_HEADER.size
    if len(data) < hsize:
        # A crash while creating the log: nothing was ever committed in it.
        if fmt.LOG_MAGIC.startswith(data[:8]):
            return ParsedLog([], 0, torn=bool(data))
        raise FormatError(f"{what}: not a study log")
    _check_header(data, what)
    records: list[LogRecord] = []
    pos = hsize
    lsize = fmt.LOG_RECORD_LEN.size
    while pos < len(data):
        start = pos
        if pos + lsize > len(data):
            return ParsedLog(records, start, torn=True)
        (n,) = fmt.LOG_RECORD_LEN.unpack_from(data, pos)
        end = pos + lsize + n + fmt.HASH_SIZE
        if n > fmt.LOG_RECORD_MAX or end > len(data):
            # Reaches past the end: a write cut short, which leaves at most one record's bytes.
            # More than that means a damaged length field. (A damaged length in the last record
            # looks like a tear; the index, receipts and have-segments still know the record, and
            # fsck and ingest compare them: Store.committed_seq.)
            if len(data) - start > lsize + fmt.LOG_RECORD_MAX + fmt.HASH_SIZE:
                raise FormatError(f"{what}: record at byte {start} has a bad length")
            return ParsedLog(records, start, torn=True)
        payload = data[pos + lsize : pos + lsize + n]
        if digest(payload) != data[pos + lsize + n : end]:
            if end == len(data):
                return ParsedLog(records, start, torn=True)
            raise FormatError(f"{what}: record at byte {start} fails its checksum")
        rec = _decode_payload(payload, f"{what}: record at byte {start}")
        if rec.seq != len(records) + 1:
            raise FormatError(f"{what}: record at byte {start} has seq {rec.seq}, expected {len(records) + 1}")
        records.append(rec)
        pos = end
    return ParsedLog(records, pos, torn=False)


def record_key(study: str, seq: int) -> str:
    """The object that holds record ``seq`` of ``study``'s log."""
    return f"studies/{study}/{seq:010d}{fmt.LOG_RECORD_SUFFIX}"


def record_seq(name: str) -> int | None:
    """The seq a record object's name (its last part) gives, or None if it names none."""
    digits = name[: -len(fmt.LOG_RECORD_SUFFIX)]
    if not name.endswith(fmt.LOG_RECORD_SUFFIX) or len(digits) != 10 or not digits.isdigit():
        return None
    return int(digits)


def encode_one(rec: LogRecord) -> bytes:
    """A record object's bytes: HEADER, then the record."""
    return header() + encode_record(rec)


def parse_one(data: bytes, seq: int, *, what: str) -> LogRecord:
    """A record object's record, which must be record ``seq`` and all the object holds;
    FormatError (damage) otherwise."""
    hsize, lsize = fmt.LOG_HEADER.size, fmt.LOG_RECORD_LEN.size
    if len(data) < hsize + lsize:
        raise FormatError(f"{what}: too short to be a record")
    _check_header(data, what)
    (n,) = fmt.LOG_RECORD_LEN.unpack_from(data, hsize)
    if hsize + lsize + n + fmt.HASH_SIZE != len(data):
        raise FormatError(f"{what}: its length field does not match its size")
    payload = data[hsize + lsize : hsize + lsize + n]
    if digest(payload) != data[hsize + lsize + n :]:
        raise FormatError(f"{what}: fails its checksum")
    rec = _decode_payload(payload, what)
    if rec.seq != seq:
        raise FormatError(f"{what}: says seq {rec.seq}")
    return rec
