"""The read-only view model that the export uses now and the FUSE mount will adapt."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dittohead.cli import cli
from dittohead.store.repo import Store
from dittohead.view import CONFLICT_SUFFIX, Dir, File, FileReader, StoreView, StudyView

BIG = random.Random(7).randbytes(3 * 1024 * 1024 + 12345)  # several chunks


def _ok(*args: object) -> None:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, (args, res.output, res.exception)


def _sync(root: Path, src: Path, study: str = "s") -> None:
    _ok("sync", src, "--study", study, "--to", root, "--site", "lab A")
    _ok("watch", "--store", root, "--once")


def _store(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("DITTOHEAD_STATE_DIR", str(tmp_path / "state"))
    root, src = tmp_path / "root", tmp_path / "src"
    _ok("init", "--store", root)
    _ok("study", "add", "s", "--store", root)
    _ok("study", "add", "t", "--store", root)
    src.mkdir()
    (src / "big.bin").write_bytes(BIG)
    (src / "a").write_bytes(b"a file called a\n")
    _sync(root, src)
    # 'a' becomes a folder: both must stay visible.
    (src / "a").unlink()
    (src / "a").mkdir()
    (src / "a" / "b.txt").write_bytes(b"b\n")
    (src / "big.bin").write_bytes(BIG[:1000] + b"edit" + BIG[1004:])
    _sync(root, src)
    return root


def test_layout_and_name_clash(tmp_path: Path, monkeypatch) -> None:
    root = _store(tmp_path, monkeypatch)
    with Store.open(str(root)) as store:
        view = StudyView(store, "s")
        current = view.lookup("current")
        assert isinstance(current, Dir)
        assert [name for name, _ in view.listdir("current")] == ["a", "a" + CONFLICT_SUFFIX, "big.bin"]
        assert isinstance(view.lookup("current/a/b.txt"), File)
        clash = view.lookup("current/a" + CONFLICT_SUFFIX)
        assert isinstance(clash, File) and clash.version.path == "a"
        versions = view.lookup("versions/big.bin")
        assert isinstance(versions, Dir) and len(view.children(versions)) == 2
        subs = view.lookup("submissions")
        assert isinstance(subs, Dir) and len(view.children(subs)) == 2
        assert sorted(StoreView(store).studies()) == ["s", "t"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ranges=st.lists(st.tuples(st.integers(0, len(BIG) + 10), st.integers(0, 3 * 1024 * 1024)),
                       min_size=1, max_size=8))
def test_reads_at_any_offset_equal_the_bytes(tmp_path_factory, ranges) -> None:
    root = _golden_root(tmp_path_factory)
    with Store.open(str(root)) as store:
        versions = store.index.versions("s", "big.bin")
        want = {1: BIG, 2: BIG[:1000] + b"edit" + BIG[1004:]}
        for v in versions:
            reader = FileReader(store, v)
            assert reader.size == len(want[v.n])
            for offset, size in ranges:
                assert reader.read(offset, size) == want[v.n][offset : offset + size]


_CACHE: dict[str, Path] = {}


def _golden_root(tmp_path_factory) -> Path:
    """One store for every hypothesis example (built once, read only)."""
    if "root" not in _CACHE:
        base = tmp_path_factory.mktemp("view")
        mp = _Env()
        try:
            _CACHE["root"] = _store(base, mp)
        finally:
            mp.undo()
    return _CACHE["root"]


class _Env:
    """A minimal monkeypatch for a store built outside a function-scoped fixture."""

    def __init__(self) -> None:
        self.old = os.environ.get("DITTOHEAD_STATE_DIR")

    def setenv(self, key: str, value: str) -> None:
        os.environ[key] = value

    def undo(self) -> None:
        if self.old is None:
            os.environ.pop("DITTOHEAD_STATE_DIR", None)
        else:
            os.environ["DITTOHEAD_STATE_DIR"] = self.old


def test_a_damaged_chunk_is_an_error_not_wrong_bytes(tmp_path: Path, monkeypatch) -> None:
    root = _store(tmp_path, monkeypatch)
    work = tmp_path / "copy"
    shutil.copytree(root, work)
    with Store.open(str(work)) as store:
        v = store.index.versions("s", "big.bin")[0]
        cid, _ = FileReader(store, v).chunks[1]
        pid, offset, length = store.index.chunk(cid)
        path = work / "store" / "packs" / pid.hex()[:2] / f"{pid.hex()}.pack"
        data = bytearray(path.read_bytes())
        data[offset + length // 2] ^= 1
        path.write_bytes(bytes(data))
        reader = FileReader(store, v)
        first = reader.offsets[1]
        assert reader.read(0, first) == BIG[:first]  # the chunk before is intact
        try:
            reader.read(first, 10)
        except Exception as e:  # noqa: BLE001
            assert type(e).__name__ == "IntegrityError"
        else:
            raise AssertionError("a damaged chunk was served")


def test_many_threads_read_through_one_view_and_its_bounded_cache(tmp_path: Path, monkeypatch) -> None:
    """Reader threads of one view (a connection to the index each, one chunk cache for all, small
    enough to evict all the time) read random ranges of every version: every read is right."""
    import random
    import threading

    root = _store(tmp_path, monkeypatch)
    want = {1: BIG, 2: BIG[:1000] + b"edit" + BIG[1004:]}
    with Store.open(str(root)) as store:
        view = StudyView(store, "s")
        view.cache.max_bytes = 600 * 1024  # about two chunks
        versions = [node.version for node in (view.lookup(f"versions/big.bin/{name}")
                                              for name, _ in view.listdir("versions/big.bin"))]
        assert [v.n for v in versions] == [1, 2]
        errors: list[str] = []

        def reader(seed: int) -> None:
            rnd = random.Random(seed)
            for _ in range(40):
                v = rnd.choice(versions)
                f = view.open(v)
                off, size = rnd.randrange(len(BIG)), rnd.randrange(1, 2 * 1024 * 1024)
                if f.read(off, size) != want[v.n][off : off + size]:
                    errors.append(f"v{v.n} [{off}:{off + size}]")
                if view.lookup("current/big.bin").version.n != 2:  # the index, from this thread
                    errors.append("lookup")

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[:5]
        assert view.cache.bytes <= view.cache.max_bytes + 4 * 1024 * 1024  # bounded (one chunk over at most)
