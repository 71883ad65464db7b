"""Every constant of on-disk format version 2, in one place (spec: docs/format.md).

Changing any value here changes the format: a new FORMAT_VERSION and a "Changes" entry in the
spec. Chunking parameters are written into the store's config at ``init`` and compared on every
use, so that every client cuts the same file the same way as the store expects.
"""

from __future__ import annotations

import re
import struct

FORMAT_VERSION = 2  # 2: a manifest's paths are the exact name bytes (docs/format.md, "Changes")
SUPPORTED_VERSIONS = frozenset({1, 2})

# Hashes: BLAKE3-256 everywhere (chunk ids, file hashes, manifest ids, pack ids, checksums).
HASH_NAME = "blake3-256"
HASH_SIZE = 32

# Chunking: FastCDC 2020 (pyfastcdc). A file shorter than CHUNK_MIN is one chunk; an empty file
# has no chunks.
CHUNKER_NAME = "fastcdc2020"
CHUNK_MIN = 256 * 1024
CHUNK_AVG = 1024 * 1024
CHUNK_MAX = 4 * 1024 * 1024
CHUNK_NORMALIZATION = 1  # pyfastcdc's normalized_chunking (NC level)
CHUNK_SEED = 0  # pyfastcdc's gear table seed (0 = the paper's table)


def chunking_params() -> dict[str, object]:
    """The chunking parameters as stored in the store's config."""
    return {
        "chunker": CHUNKER_NAME,
        "min": CHUNK_MIN,
        "avg": CHUNK_AVG,
        "max": CHUNK_MAX,
        "normalization": CHUNK_NORMALIZATION,
        "seed": CHUNK_SEED,
    }


# Packs: HEADER, chunk bytes back to back, TRAILER (msgpack list of [id, offset, length, codec]),
# FOOTER (trailer length u32le, BLAKE3-256 of the trailer, magic).
PACK_MAGIC = b"DITTOPAK"
PACK_HEADER = struct.Struct("<8sI")  # magic, format version
PACK_FOOTER = struct.Struct("<I32s8s")  # trailer length, trailer hash, magic
PACK_SUFFIX = ".pack"
PACK_TARGET_SIZE = 16 * 1024 * 1024  # a pack is closed once it holds this many chunk bytes...
PACK_TARGET_CHUNKS = 16384  # ...or this many chunks
PACK_MAX_SIZE = 256 * 1024 * 1024  # untrusted limit
PACK_MAX_TRAILER = 32 * 1024 * 1024  # untrusted limit, bytes
PACK_MAX_ENTRIES = 1 << 20  # untrusted limit
CODEC_RAW = 0
CODECS = frozenset({CODEC_RAW})

# Manifests: a msgpack map; its id is the BLAKE3-256 of its bytes.
MANIFEST_KIND = "manifest"
MANIFEST_NAME = "manifest"  # the file's name inside a submission
# A submission's manifest (untrusted): decoding the largest one stays within about 250 MB of
# memory; a sync with more to send makes several submissions (docs/format.md, "Manifest").
MANIFEST_MAX_SIZE = 48 * 1024 * 1024
MANIFEST_MAX_ENTRIES = 200_000
# A manifest read back from the store: accepted by an ingest already, possibly under the limits of
# dittohead 0.1 (which admitted submissions this large), so these stay.
STORED_MANIFEST_MAX_SIZE = 512 * 1024 * 1024
STORED_MANIFEST_MAX_ENTRIES = 4_000_000
MANIFEST_MAX_CHUNKS_PER_FILE = 1 << 22  # 16 TiB of minimum-size chunks; more is not a lab file
# A path's limits hold whatever name a source filesystem can give: a Windows name is up to 255
# UTF-16 units (765 bytes of WTF-8), a Windows path up to 32,767 units.
PATH_MAX_BYTES = 96 * 1024
NAME_MAX_BYTES = 1024
TEXT_MAX = 256  # site, user, host: free text, at most this many characters

# Study logs: HEADER, then records of (length u32le, msgpack payload, BLAKE3-256 of payload).
LOG_MAGIC = b"DITTOLOG"
LOG_HEADER = struct.Struct("<8sI")
LOG_RECORD_LEN = struct.Struct("<I")
LOG_RECORD_MAX = 1024 * 1024
LOG_KIND = "ingest"
LOG_RECORD_SUFFIX = ".rec"  # studies/NAME/SEQ.rec: one record an object (format 2)

# Have-segments: HEADER, chunk ids (32 bytes each), BLAKE3-256 of everything before it.
HAVE_MAGIC = b"DITTOHAV"
HAVE_HEADER = struct.Struct("<8sI")
HAVE_SUFFIX = ".have"
HAVE_MAX_SIZE = 64 * 1024 * 1024

# Receipts: a msgpack map, named after the submission.
RECEIPT_KIND = "receipt"
RECEIPT_MAX_SIZE = 64 * 1024

# Store config: JSON, human-readable.
CONFIG_KIND = "dittohead-store"
CONFIG_MAX_SIZE = 64 * 1024

# Names. A submission is a directory in the inbox; its staging name has a leading dot.
STUDY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
SUBMISSION_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
PACK_FILE_RE = re.compile(r"^[0-9a-f]{64}\.pack\Z")
STAGING_PREFIX = "."
REASON_NAME = "REASON"  # failed/NAME/REASON: why a submission was rejected
