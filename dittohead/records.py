"""The small server-written records that clients read: have-segments and receipts.

Have-segment (``dropbox/NAME/have/SEQ.have``): HEADER (magic, version), the 32-byte ids of the
chunks the study gained in submission SEQ, then the BLAKE3-256 of all bytes before it. Clients
skip uploading chunks listed in any segment of their study. A segment is at most
``HAVE_MAX_SIZE``: ids that do not fit in one go on in ``SEQ.2.have``, ``SEQ.3.have``...
(``have_segments``), so no reader ever meets a larger one.

Receipt (``dropbox/NAME/receipts/SUBMISSION``): a msgpack map telling the client that its
submission was ingested, under which sequence number, and what it added.
"""

from __future__ import annotations

from dataclasses import dataclass

from dittohead import codec
from dittohead import format as fmt
from dittohead.errors import FormatError, UnsupportedFormat
from dittohead.hashing import digest


def have_name(seq: int, part: int = 1) -> str:
    """``SEQ.have`` (10 digits), and ``SEQ.PART.have`` for the further parts of one submission's
    segment; a client reads every ``*.have`` in the folder, whatever its name."""
    return f"{seq:010d}{'' if part == 1 else f'.{part}'}{fmt.HAVE_SUFFIX}"


def have_ids_max() -> int:
    """How many chunk ids one segment holds within ``HAVE_MAX_SIZE``."""
    return (fmt.HAVE_MAX_SIZE - fmt.HAVE_HEADER.size - fmt.HASH_SIZE) // fmt.HASH_SIZE


def encode_have(ids: list[bytes]) -> bytes:
    """One segment; more ids than one may hold are refused (split them with ``have_segments``)."""
    if len(ids) > have_ids_max():
        raise ValueError(f"{len(ids)} chunk ids do not fit in one have-segment of at most "
                         f"{fmt.HAVE_MAX_SIZE} bytes (use have_segments)")
    body = fmt.HAVE_HEADER.pack(fmt.HAVE_MAGIC, fmt.FORMAT_VERSION) + b"".join(ids)
    return body + digest(body)


def have_segments(seq: int, ids: list[bytes]) -> list[tuple[str, bytes]]:
    """The segments publishing the chunks submission ``seq`` brought, as (file name, bytes):
    none for no ids, else ``SEQ.have`` and as many further parts as the size limit needs."""
    per = have_ids_max()
    return [(have_name(seq, i // per + 1), encode_have(ids[i : i + per])) for i in range(0, len(ids), per)]


def decode_have(data: bytes, *, what: str = "have-segment") -> list[bytes]:
    hsize, hs = fmt.HAVE_HEADER.size, fmt.HASH_SIZE
    if len(data) > fmt.HAVE_MAX_SIZE:
        raise FormatError(f"{what}: larger than {fmt.HAVE_MAX_SIZE} bytes")
    if len(data) < hsize + hs or (len(data) - hsize - hs) % hs:
        raise FormatError(f"{what}: bad length {len(data)}")
    magic, version = fmt.HAVE_HEADER.unpack_from(data)
    if magic != fmt.HAVE_MAGIC:
        raise FormatError(f"{what}: bad magic")
    if version not in fmt.SUPPORTED_VERSIONS:
        raise UnsupportedFormat(f"{what}: format version {version} is not supported")
    body = data[:-hs]
    if digest(body) != data[-hs:]:
        raise FormatError(f"{what}: checksum mismatch")
    return [body[i : i + hs] for i in range(hsize, len(body), hs)]


@dataclass(frozen=True)
class Receipt:
    study: str
    submission: str
    seq: int
    manifest: bytes
    ingested_ns: int
    files: int
    new_versions: int
    new_chunk_bytes: int


def encode_receipt(r: Receipt) -> bytes:
    return codec.pack(
        {
            "format": fmt.FORMAT_VERSION,
            "kind": fmt.RECEIPT_KIND,
            "study": r.study,
            "submission": r.submission,
            "seq": r.seq,
            "manifest": r.manifest,
            "ingested_ns": r.ingested_ns,
            "files": r.files,
            "new_versions": r.new_versions,
            "new_chunk_bytes": r.new_chunk_bytes,
        }
    )


def decode_receipt(data: bytes) -> Receipt:
    what = "receipt"
    m = codec.as_map(codec.unpack(data, what=what, max_size=fmt.RECEIPT_MAX_SIZE), what=what)
    version = codec.field(m, "format", int, what=what)
    if version not in fmt.SUPPORTED_VERSIONS:
        raise UnsupportedFormat(f"{what}: format version {version} is not supported")
    if codec.field(m, "kind", str, what=what) != fmt.RECEIPT_KIND:
        raise FormatError(f"{what}: wrong kind")
    return Receipt(
        study=codec.text(m, "study", what=what, limit=fmt.TEXT_MAX),
        submission=codec.text(m, "submission", what=what, limit=fmt.TEXT_MAX),
        seq=codec.uint(m, "seq", what=what),
        manifest=codec.digest(m, "manifest", what=what),
        ingested_ns=codec.uint(m, "ingested_ns", what=what),
        files=codec.uint(m, "files", what=what),
        new_versions=codec.uint(m, "new_versions", what=what),
        new_chunk_bytes=codec.uint(m, "new_chunk_bytes", what=what),
    )
