"""Have-segments stay within HAVE_MAX_SIZE (docs/format.md, "Have-segment"): the writer splits
what does not fit into further parts, and refuses to encode one segment over the limit."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Server, write_file

from dittohead import format as fmt
from dittohead import records
from dittohead.hashing import digest

IDS_PER_SEGMENT = 3


@pytest.fixture
def small_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    """A limit that holds three ids, so that a few chunks need several segments."""
    limit = fmt.HAVE_HEADER.size + (IDS_PER_SEGMENT + 1) * fmt.HASH_SIZE
    monkeypatch.setattr(fmt, "HAVE_MAX_SIZE", limit)
    return limit


def _ids(n: int) -> list[bytes]:
    return [digest(str(i).encode()) for i in range(n)]


def test_the_real_limit_holds_two_million_ids_and_no_more() -> None:
    per = records.have_ids_max()
    assert per == 2_097_150
    one = [digest(b"x")] * per  # the same id, so that this costs 64 MiB, not a list of them
    assert len(records.encode_have(one)) <= fmt.HAVE_MAX_SIZE
    with pytest.raises(ValueError, match="have_segments"):
        records.encode_have(one + [digest(b"y")])


@pytest.mark.parametrize("n", [0, 1, IDS_PER_SEGMENT, IDS_PER_SEGMENT + 1, 3 * IDS_PER_SEGMENT + 2])
def test_have_segments_split_at_the_limit(small_limit: int, n: int) -> None:
    ids = _ids(n)
    segments = records.have_segments(42, ids)
    assert len(segments) == -(-n // IDS_PER_SEGMENT)
    names = [name for name, _ in segments]
    assert names == [f"0000000042{f'.{i}' if i > 1 else ''}.have" for i in range(1, len(names) + 1)]
    assert all(len(data) <= small_limit for _, data in segments)
    assert [i for _, data in segments for i in records.decode_have(data)] == ids
    with pytest.raises(ValueError):
        records.encode_have(_ids(IDS_PER_SEGMENT + 1))


def test_an_ingest_of_many_new_chunks_publishes_segments_within_the_limit(
    server: Server, tmp_path: Path, small_limit: int
) -> None:
    src = tmp_path / "src"
    for i in range(10):  # small files: one chunk each, ten new chunks
        write_file(src / f"f{i}.txt", f"file {i}\n".encode())
    server.sync(src)
    server.ingest()
    have = server.dropbox("have")
    files = sorted(have.iterdir())
    assert len(files) == 4, files
    ids = [i for f in files for i in records.decode_have(f.read_bytes())]
    assert all(f.stat().st_size <= small_limit for f in files)
    assert len(ids) == len(set(ids)) == 10
    # A client that knows nothing yet reads them all, and sends no chunk the study holds.
    other = Server(tmp_path / "other")
    other.root = server.root
    submission = other.sync(src).submission
    assert submission is not None
    sent = sorted(p.name for p in (server.dropbox("inbox") / submission).iterdir())
    assert sent == [fmt.MANIFEST_NAME], sent  # a manifest, and no pack
