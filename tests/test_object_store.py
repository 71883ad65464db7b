"""The ObjectStore contract (dittohead/store/objects.py): every operation the store uses, in one
suite that runs against each backend. Only the local directory exists today; a second backend
(S3-compatible) adds itself to BACKENDS and must pass the same tests, nothing else.

What the store relies on: an object is created whole or not at all, never overwritten
(``put_bytes`` and ``put_file`` return False for a key that exists, and leave it as it was);
whole reads refuse more than a limit (FormatError: damage) and say FileNotFoundError for a
missing key; ranged reads; listings sorted, by prefix, recursively (``list``) or one level with
a delimiter (``names``); temporaries never listed; no key outside the store.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dittohead.errors import FormatError, StoreError
from dittohead.store.objects import LocalObjectStore, ObjectStore


def _local(tmp_path: Path) -> ObjectStore:
    root = tmp_path / "store"
    root.mkdir()
    return LocalObjectStore(str(root))


BACKENDS: dict[str, Callable[[Path], ObjectStore]] = {"local": _local}


@pytest.fixture(params=sorted(BACKENDS))
def objects(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    yield BACKENDS[request.param](tmp_path)


def test_an_object_is_created_once_and_never_overwritten(objects: ObjectStore) -> None:
    assert not objects.exists("manifests/ab/abc")
    assert objects.put_bytes("manifests/ab/abc", b"first") is True
    assert objects.put_bytes("manifests/ab/abc", b"second, longer") is False
    assert objects.get("manifests/ab/abc", 100) == b"first"
    assert objects.exists("manifests/ab/abc") and objects.size("manifests/ab/abc") == 5


def test_whole_and_ranged_reads(objects: ObjectStore) -> None:
    data = bytes(range(256)) * 40
    objects.put_bytes("packs/00/p.pack", data)
    assert objects.get("packs/00/p.pack", len(data)) == data
    with pytest.raises(FormatError):
        objects.get("packs/00/p.pack", len(data) - 1)  # over the limit: damage, not a ValueError
    assert objects.read_range("packs/00/p.pack", 1000, 300) == data[1000:1300]
    assert objects.read_range("packs/00/p.pack", len(data) - 10, 100) == data[-10:]  # short at the end
    with pytest.raises(FileNotFoundError):
        objects.get("packs/00/none.pack", 10)
    with pytest.raises(FileNotFoundError):
        objects.size("packs/00/none.pack")


def test_a_file_written_for_an_object_is_put_whole(objects: ObjectStore) -> None:
    path, f = objects.new_tmp()
    f.write(b"x" * 5000)
    f.write(memoryview(b"y" * 3))
    f.finish()
    assert objects.put_file("packs/aa/one.pack", path) is True
    assert objects.get("packs/aa/one.pack", 10_000) == b"x" * 5000 + b"yyy"
    path2, f2 = objects.new_tmp()
    f2.write(b"other")
    f2.finish()
    assert objects.put_file("packs/aa/one.pack", path2) is False  # taken: left as it was
    assert objects.get("packs/aa/one.pack", 10_000) == b"x" * 5000 + b"yyy"
    assert list(objects.list("packs")) == ["packs/aa/one.pack"]  # no temporary is listed


def test_listings_are_sorted_by_prefix_and_level(objects: ObjectStore) -> None:
    for key in ("studies/s/0000000002.rec", "studies/s/0000000001.rec", "studies/t/0000000001.rec",
                "studies/s.log", "packs/01/b.pack", "packs/00/a.pack"):
        objects.put_bytes(key, b"-")
    assert list(objects.list("packs")) == ["packs/00/a.pack", "packs/01/b.pack"]
    assert list(objects.list("studies")) == ["studies/s.log", "studies/s/0000000001.rec",
                                             "studies/s/0000000002.rec", "studies/t/0000000001.rec"]
    assert list(objects.names("studies")) == ["s.log", "s/", "t/"]
    assert list(objects.names("studies/s")) == ["0000000001.rec", "0000000002.rec"]
    assert list(objects.names("nothing/here")) == [] and list(objects.list("nothing")) == []


def test_no_key_reaches_outside_the_store(objects: ObjectStore) -> None:
    for key in ("../escape", "packs/../../escape", "/etc/passwd"):
        with pytest.raises(StoreError):
            objects.put_bytes(key, b"x")


def test_a_local_backend_may_adopt_a_file_of_its_filesystem(objects: ObjectStore, tmp_path: Path) -> None:
    """Optional: a backend on this machine's disks says where an object is and adopts a
    finished file of its own filesystem without copying; any other says None."""
    device = objects.local_device()
    if device is None:
        assert objects.local_path("packs/00/a.pack") is None
        return
    src = Path(objects.local_path("tmp/adoptee") or "")
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(b"adopted bytes")
    assert os.stat(src).st_dev == device
    assert objects.adopt_file("packs/cc/adopted.pack", str(src), mode=0o600) is True
    assert objects.get("packs/cc/adopted.pack", 100) == b"adopted bytes"
    assert os.stat(objects.local_path("packs/cc/adopted.pack") or "").st_ino == os.stat(src).st_ino
    assert objects.adopt_file("packs/cc/adopted.pack", str(src), mode=0o600) is False
