"""The golden store of format version 1 stays readable, byte for byte, by every later dittohead.

    DO NOT REGENERATE tests/data/golden-v1.tar.gz (or its .json) to make these tests pass. If
    they fail, the code broke compatibility with stores that exist: fix the code, or bump the
    format version with a migration and a new golden store (golden-v2) next to this one. See the
    top of tests/make_golden.py, which made it.

The tarball is unpacked into a tmp dir; tests/data/golden-v1.json says what it holds: every
(path, version) with its size and SHA-256, the two submissions as ``log`` showed them, fsck's
counts. Checked: ``fsck --read-data`` is clean; every version reads back with its SHA-256
through ``cat``; ``log`` and ``versions`` show the recorded history; and all of that again with
index.sqlite deleted first (it is derived, and rebuilt).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest
from conftest import invoke, ok

DATA = Path(__file__).resolve().parent / "data"
TARBALL = DATA / "golden-v1.tar.gz"
EXPECTED = json.loads((DATA / "golden-v1.json").read_text(encoding="utf-8"))
STUDY = EXPECTED["study"]


# The state dir is isolated by conftest's autouse fixture; invoke and ok come from there.


def unpack(dest: Path) -> Path:
    with tarfile.open(TARBALL, "r:gz") as tar:
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


def by_path() -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for v in EXPECTED["versions"]:
        out.setdefault(v["path"], []).append(v)
    return out


def test_the_golden_data_is_what_the_tests_assume() -> None:
    assert EXPECTED["format"] == 1
    assert TARBALL.stat().st_size < 200 * 1024
    paths = by_path()
    assert any(v["size"] == 0 for v in EXPECTED["versions"]), "an empty file"
    assert any(not p.isascii() for p in paths), "a non-ASCII path"
    assert any(v["chunks"] >= 2 for v in EXPECTED["versions"]), "a file of several chunks"
    assert any(len(vs) == 2 for vs in paths.values()), "a path with two versions"
    assert [s["seq"] for s in EXPECTED["submissions"]] == [1, 2]


def test_store_config_is_format_version_1(golden: Path) -> None:
    config = json.loads((golden / "store" / "config").read_text())
    assert config["version"] == 1


def check_fsck_clean(root: Path) -> None:
    res = invoke("fsck", "--store", root, "--read-data", "--json")
    assert res.exit_code == 0, (res.exit_code, res.stdout, res.stderr)
    doc = json.loads(res.stdout)
    assert doc["ok"] is True and doc["read_data"] is True
    assert doc["findings"] == [], doc["findings"]
    for key, want in EXPECTED["fsck_stats"].items():
        assert doc["stats"][key] == want, (key, doc["stats"])


def check_reads(root: Path) -> None:
    for v in EXPECTED["versions"]:
        res = ok("cat", "--store", root, "--study", STUDY, v["path"], "--version", v["version"])
        data = res.stdout_bytes
        assert len(data) == v["size"] and hashlib.sha256(data).hexdigest() == v["sha256"], (v["path"], v["version"])
    for path, vs in by_path().items():
        latest = ok("cat", "--store", root, "--study", STUDY, path).stdout_bytes
        assert hashlib.sha256(latest).hexdigest() == vs[-1]["sha256"], path


def check_history(root: Path) -> None:
    subs = json.loads(ok("log", "--store", root, "--study", STUDY, "--json").stdout)["submissions"]
    assert len(subs) == 2
    for got, want in zip(subs, EXPECTED["submissions"]):
        for key, value in want.items():
            assert got[key] == value, (key, got, want)
    assert subs[0]["ingested_ns"] < subs[1]["ingested_ns"]
    for path, vs in by_path().items():
        listed = json.loads(ok("versions", "--store", root, "--study", STUDY, path, "--json").stdout)["versions"]
        assert [v["version"] for v in listed] == list(range(1, len(vs) + 1)), (path, listed)
        assert [(v["seq"], v["size"]) for v in listed] == [(v["seq"], v["size"]) for v in vs], (path, listed)
    missing = invoke("cat", "--store", root, "--study", STUDY, "no/such/file")
    assert missing.exit_code == 1 and missing.stdout_bytes == b""
    too_far = invoke("cat", "--store", root, "--study", STUDY, EXPECTED["versions"][0]["path"], "--version", 99)
    assert too_far.exit_code == 1 and too_far.stdout_bytes == b""


def test_fsck_read_data_is_clean(golden: Path) -> None:
    check_fsck_clean(golden)


def test_every_version_reads_back(golden: Path) -> None:
    check_reads(golden)


def test_log_and_versions(golden: Path) -> None:
    check_history(golden)


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


def test_a_dropbox_made_0755_is_a_warning(golden: Path) -> None:
    """The store as its dittohead made it, ROOT/dropbox/ 0755 (every uploader could list the
    studies' names): no damage (exit 0), one warning with the chmod that makes it 0711."""
    dropbox = golden / "dropbox"
    os.chmod(dropbox, 0o755)
    res = invoke("fsck", "--store", golden, "--json")
    assert res.exit_code == 0, res.output
    [f] = json.loads(res.stdout)["findings"]
    assert (f["severity"], f["kind"], f["object"]) == ("warning", "permissions", str(dropbox)), f
    assert f["message"] == (f"mode 0755, as earlier dittoheads made it: every uploader can list the studies' "
                            f"names; want 0711 (chmod 711 {dropbox})"), f
    res = invoke("fsck", "--store", golden)
    assert res.exit_code == 0 and f"warning: permissions {dropbox}: mode 0755" in res.stderr, res.output


def test_fsck_rebuilds_a_deleted_index(golden: Path) -> None:
    (golden / "store" / "index.sqlite").unlink()
    res = invoke("fsck", "--store", golden, "--read-data", "--json")
    assert res.exit_code == 0, res.output
    kinds = [(f["severity"], f["kind"]) for f in json.loads(res.stdout)["findings"]]
    assert kinds == [("repaired", "index")], kinds
    check_history(golden)
    check_reads(golden)


def test_a_store_of_version_1_takes_new_submissions(golden: Path, tmp_path: Path, monkeypatch) -> None:
    """The first ingest into a store of dittohead 0.1/0.2 copies its study log into record
    objects once (studies/NAME/SEQ.rec, then studies/NAME.log-copied) and never writes the old
    log again; what was there reads as before, the new submission after it."""
    monkeypatch.setenv("DITTOHEAD_STATE_DIR", str(tmp_path / "state"))
    old_log = golden / "store" / "studies" / f"{STUDY}.log"
    before = old_log.read_bytes()
    src = tmp_path / "src"
    src.mkdir()
    (src / "new.txt").write_bytes(b"after the upgrade\n")
    ok("sync", src, "--study", STUDY, "--to", golden, "--site", "lab-c")
    ok("watch", "--store", golden, "--once")
    assert old_log.read_bytes() == before
    records = sorted(p.name for p in (golden / "store" / "studies" / STUDY).iterdir())
    assert records == ["0000000001.rec", "0000000002.rec", "0000000003.rec"], records
    assert (golden / "store" / "studies" / f"{STUDY}.log-copied").exists()
    check_reads(golden)
    subs = json.loads(ok("log", "--store", golden, "--study", STUDY, "--json").stdout)["submissions"]
    assert [s["seq"] for s in subs] == [1, 2, 3]
    assert ok("cat", "--store", golden, "--study", STUDY, "new.txt").stdout_bytes == b"after the upgrade\n"
    res = invoke("fsck", "--store", golden, "--read-data", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["findings"] == [], res.output
