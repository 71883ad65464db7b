"""The golden store of format version 2 stays readable, byte for byte, by every later dittohead.

    DO NOT REGENERATE tests/data/golden-v2.tar.gz (or its .json) to make these tests pass. If
    they fail, the code broke compatibility with stores that exist: fix the code, or bump the
    format version with a migration and a new golden store (golden-v3) next to this one. See the
    top of tests/make_golden_v2.py, which made it.

As tests/test_golden.py does for golden-v1, with the names format 2 brought (docs/format.md,
"Paths"): NFC and NFD spellings of one name as two files, bytes that are not UTF-8, a WTF-8
lone surrogate, control characters, a backslash, a leading "-", a trailing space, a bidi
override, a path of 60 components. tests/data/golden-v2.json records each path as its exact
bytes (``path_hex``, the truth here) and as dittohead 0.3 printed it (``path``, escaped).
Checked: ``fsck --read-data`` is clean; every version reads back with its SHA-256 through
``cat``, by its bytes and by its printed form; ``versions --json`` gives the bytes back
(``path``, ``path_b64``); ``log`` shows the recorded submissions; all of that again with
index.sqlite deleted first (it is derived, and rebuilt); and ``export`` writes every file under
its own name bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tarfile
import unicodedata
from pathlib import Path

import msgpack
import pytest
from conftest import invoke, ok

from dittohead.display import escape, unescape

DATA = Path(__file__).resolve().parent / "data"
TARBALL = DATA / "golden-v2.tar.gz"
EXPECTED = json.loads((DATA / "golden-v2.json").read_text(encoding="utf-8"))
STUDY = EXPECTED["study"]


def raw(v: dict) -> bytes:
    """A recorded path's exact bytes."""
    return bytes.fromhex(v["path_hex"])


def arg(path: bytes) -> str:
    """A path as a command-line argument carries it (its bytes, as the OS would pass them)."""
    return os.fsdecode(path)


def is_utf8(path: bytes) -> bool:
    try:
        path.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def by_path() -> dict[bytes, list[dict]]:
    out: dict[bytes, list[dict]] = {}
    for v in EXPECTED["versions"]:
        out.setdefault(raw(v), []).append(v)
    return out


def spellings(path: bytes) -> list[str]:
    """Every way a PATH argument may name ``path``: its bytes, the escaped form dittohead 0.3
    printed (recorded in the json), and today's ``escape`` of it if that differs."""
    recorded = sorted({v["path"] for v in EXPECTED["versions"] if raw(v) == path})
    return list(dict.fromkeys([arg(path), *recorded, escape(path)]))


def unpack(dest: Path) -> Path:
    with tarfile.open(TARBALL, "r:gz", encoding="utf-8", errors="surrogateescape") as tar:
        names = tar.getnames()
        assert all(n == EXPECTED["root"] or n.startswith(EXPECTED["root"] + "/") for n in names), names
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python without extraction filters
            tar.extractall(dest)  # our own checked-in tarball
        # The filter drops setgid/sticky bits and folder modes: put back the server root's
        # permission model as it was made, so that fsck's layout check has nothing to say.
        for member in tar.getmembers():
            os.chmod(dest / member.name, member.mode & 0o7777)
    # ROOT/dropbox/ was made 0755 then; this dittohead makes it 0711, and fsck warns of 0755
    # until the admin's chmod (test_golden.py: test_a_dropbox_made_0755_is_a_warning).
    os.chmod(dest / EXPECTED["root"] / "dropbox", 0o711)
    return dest / EXPECTED["root"]


@pytest.fixture
def golden(tmp_path: Path) -> Path:
    return unpack(tmp_path)


def test_the_golden_data_is_what_the_tests_assume() -> None:
    assert EXPECTED["format"] == 2
    assert TARBALL.stat().st_size < 200 * 1024
    vs = EXPECTED["versions"]
    paths = by_path()
    assert any(v["size"] == 0 for v in vs), "an empty file"
    assert any(v["chunks"] >= 2 for v in vs), "a file of several chunks"
    assert sum(len(v) == 2 for v in paths.values()) >= 2, "paths with two versions"
    assert [s["seq"] for s in EXPECTED["submissions"]] == [1, 2]
    assert {s["site"] for s in EXPECTED["submissions"]} == {"lab-a", "lab-b"}
    names = [p.rsplit(b"/", 1)[-1] for p in paths]
    nfc, nfd = "caf\u00e9.txt".encode(), "cafe\u0301.txt".encode()
    assert nfc in names and nfd in names, "NFC and NFD spellings of one name, side by side"
    assert unicodedata.normalize("NFC", nfd.decode()) == nfc.decode()
    assert len({paths[p][0]["sha256"] for p in paths if p.endswith((b"/" + nfc, b"/" + nfd))}) == 2
    assert b"M\xfcller.csv" in names and any(b"\xf6" in p.split(b"/")[-2] for p in paths if b"/" in p), "Latin-1"
    assert b"\xed\xa0\x80.txt" in names, "a WTF-8 lone surrogate"
    assert any(b"\t" in n for n in names) and any(b"\n" in n for n in names) and any(b"\x1b" in n for n in names)
    assert any("\u0085".encode() in n for n in names), "a C1 control"
    assert any(b"\\" in n for n in names), "a backslash"
    assert any(p.startswith(b"-") for p in paths), "a leading '-' on the whole path"
    assert any(n.endswith(b" ") for n in names), "a trailing space"
    assert any("\u202e".encode() in n for n in names), "a bidi override"
    assert any(p.count(b"/") + 1 >= 60 for p in paths), "a deep path"
    assert any(not is_utf8(p) and len(pv) == 2 for p, pv in paths.items()), "a non-UTF-8 path of two versions"
    for v in [*vs, *EXPECTED["names"]]:  # the printed form names the same bytes
        assert unescape(v["path"]) == raw(v), v
    assert {raw(n) for n in EXPECTED["names"]} <= set(paths)


def test_tarball_holds_the_server_root_only() -> None:
    with tarfile.open(TARBALL, "r:gz", encoding="utf-8", errors="surrogateescape") as tar:
        members = tar.getmembers()
    assert all(m.isdir() or m.isfile() for m in members)
    assert all(m.uid == 0 and m.gid == 0 for m in members)
    assert {m.name for m in members} >= {f"{EXPECTED['root']}/store/config", f"{EXPECTED['root']}/store/index.sqlite"}


def test_store_config_is_format_version_2(golden: Path) -> None:
    config = json.loads((golden / "store" / "config").read_text())
    assert config["version"] == 2


def test_manifests_hold_the_exact_name_bytes(golden: Path) -> None:
    """Read with plain msgpack, not dittohead's decoder: format 2 manifests, each path a bin of
    the name's bytes, and together exactly the recorded submissions' paths."""
    by_id = {}
    for f in (golden / "store" / "manifests").glob("*/*"):
        by_id[f.name] = msgpack.unpackb(f.read_bytes(), raw=False, strict_map_key=True)
    assert sorted(by_id) == sorted(s["manifest"] for s in EXPECTED["submissions"])
    for sub in EXPECTED["submissions"]:
        manifest = by_id[sub["manifest"]]
        assert manifest["format"] == 2 and manifest["kind"] == "manifest"
        assert all(type(e["path"]) is bytes for e in manifest["entries"])
        got = {e["path"]: e["size"] for e in manifest["entries"]}
        assert got == {raw(v): v["size"] for v in EXPECTED["versions"] if v["seq"] == sub["seq"]}, sub


def check_fsck_clean(root: Path) -> None:
    res = invoke("fsck", "--store", root, "--read-data", "--json")
    assert res.exit_code == 0, (res.exit_code, res.stdout, res.stderr)
    doc = json.loads(res.stdout)
    assert doc["ok"] is True and doc["read_data"] is True
    assert doc["findings"] == [], doc["findings"]
    for key, want in EXPECTED["fsck_stats"].items():
        assert doc["stats"][key] == want, (key, doc["stats"])


def cat(root: Path, path: str, version: int | None = None) -> bytes:
    opts = [] if version is None else ["--version", version]
    return ok("cat", "--store", root, "--study", STUDY, *opts, "--", path).stdout_bytes


def check_reads(root: Path) -> None:
    for v in EXPECTED["versions"]:
        for spelling in spellings(raw(v)):
            data = cat(root, spelling, v["version"])
            assert len(data) == v["size"] and hashlib.sha256(data).hexdigest() == v["sha256"], (spelling, v)
    for path, vs in by_path().items():
        for spelling in spellings(path):
            latest = cat(root, spelling)
            assert hashlib.sha256(latest).hexdigest() == vs[-1]["sha256"], spelling


def check_history(root: Path) -> None:
    subs = json.loads(ok("log", "--store", root, "--study", STUDY, "--json").stdout)["submissions"]
    assert len(subs) == 2
    for got, want in zip(subs, EXPECTED["submissions"]):
        for key, value in want.items():
            assert got[key] == value, (key, got, want)
    assert subs[0]["ingested_ns"] < subs[1]["ingested_ns"]
    for path, vs in by_path().items():
        for spelling in spellings(path):
            doc = json.loads(ok("versions", "--store", root, "--study", STUDY, "--json", "--", spelling).stdout)
            assert doc["path"].encode("utf-8", "surrogateescape") == path, (spelling, doc)
            if is_utf8(path):
                assert "path_b64" not in doc, doc
            else:
                assert base64.b64decode(doc["path_b64"], validate=True) == path, doc
            listed = doc["versions"]
            assert [v["version"] for v in listed] == list(range(1, len(vs) + 1)), (spelling, listed)
            assert [(v["seq"], v["size"]) for v in listed] == [(v["seq"], v["size"]) for v in vs], (spelling, listed)
    missing = invoke("cat", "--store", root, "--study", STUDY, "no/such/file")
    assert missing.exit_code == 1 and missing.stdout_bytes == b""
    too_far = invoke("cat", "--store", root, "--study", STUDY, "--version", 99, "--", arg(raw(EXPECTED["versions"][0])))
    assert too_far.exit_code == 1 and too_far.stdout_bytes == b""


def test_fsck_read_data_is_clean(golden: Path) -> None:
    check_fsck_clean(golden)


def test_every_version_reads_back(golden: Path) -> None:
    check_reads(golden)


def test_log_and_versions(golden: Path) -> None:
    check_history(golden)


def test_nfc_and_nfd_are_two_files(golden: Path) -> None:
    nfc, nfd = "names/caf\u00e9.txt".encode(), "names/cafe\u0301.txt".encode()
    assert cat(golden, arg(nfc)) != cat(golden, arg(nfd))
    assert cat(golden, arg(nfd), 1) != cat(golden, arg(nfd), 2)
    assert invoke("cat", "--store", golden, "--study", STUDY, "--version", 2, "--", arg(nfc)).exit_code == 1


def test_without_the_index(golden: Path) -> None:
    """index.sqlite is derived: deleted, readers answer from packs, manifests and logs (an index
    of their own, outside the store: they never write under store/), and the one writer (fsck,
    here, holding the lock) rebuilds it."""
    (golden / "store" / "index.sqlite").unlink()
    check_history(golden)
    check_reads(golden)
    assert not (golden / "store" / "index.sqlite").exists()
    res = invoke("fsck", "--store", golden, "--json")
    assert res.exit_code == 0 and (golden / "store" / "index.sqlite").exists(), res.output
    check_fsck_clean(golden)


def test_fsck_rebuilds_a_deleted_index(golden: Path) -> None:
    (golden / "store" / "index.sqlite").unlink()
    res = invoke("fsck", "--store", golden, "--read-data", "--json")
    assert res.exit_code == 0, res.output
    kinds = [(f["severity"], f["kind"]) for f in json.loads(res.stdout)["findings"]]
    assert kinds == [("repaired", "index")], kinds
    check_history(golden)
    check_reads(golden)


def files_under(top: bytes) -> dict[bytes, bytes]:
    """Every regular file below ``top`` (bytes paths all the way): relative path -> content."""
    out: dict[bytes, bytes] = {}
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            p = os.path.join(dirpath, name)
            assert not os.path.islink(p), p
            with open(p, "rb") as f:
                out[os.path.relpath(p, top)] = f.read()
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("rebuilt", [False, True], ids=["index", "no-index"])
def test_export_writes_every_file_under_its_own_name(golden: Path, tmp_path: Path, rebuilt: bool) -> None:
    if rebuilt:
        (golden / "store" / "index.sqlite").unlink()
    dest = os.fsencode(tmp_path / "export")
    ok("export", "--store", golden, "--study", STUDY, os.fsdecode(dest))
    assert sorted(os.listdir(dest)) == [b"current", b"log.jsonl", b"submissions", b"versions"]
    with open(os.path.join(dest, b"log.jsonl"), "rb") as f:
        assert [json.loads(line)["seq"] for line in f] == [s["seq"] for s in EXPECTED["submissions"]]
    paths = by_path()
    current = files_under(os.path.join(dest, b"current"))
    assert set(current) == set(paths), sorted(set(current) ^ set(paths))
    for path, vs in paths.items():
        assert sha(current[path]) == vs[-1]["sha256"], path
        folder = os.path.join(dest, b"versions", path)
        listed = sorted(os.listdir(folder))
        assert [sha(files_under(folder)[n]) for n in listed] == [v["sha256"] for v in vs], path
    top = os.path.join(dest, b"submissions")
    subs = sorted(os.listdir(top))
    assert len(subs) == 2
    for sub, want in zip(subs, EXPECTED["submissions"]):
        got = {p: sha(d) for p, d in files_under(os.path.join(top, sub)).items()}
        assert got == {raw(v): v["sha256"] for v in EXPECTED["versions"] if v["seq"] == want["seq"]}, sub


def test_the_study_log_is_one_object_a_record(golden: Path) -> None:
    """Format 2's study log: studies/NAME/SEQ.rec, each one whole record; no appended log."""
    studies = golden / "store" / "studies"
    assert not (studies / f"{STUDY}.log").exists()
    names = sorted(p.name for p in (studies / STUDY).iterdir())
    assert names == [f"{seq:010d}.rec" for seq in range(1, len(EXPECTED["submissions"]) + 1)], names
