"""Make the golden store of format version 2: tests/data/golden-v2.tar.gz + golden-v2.json.

    DO NOT REGENERATE THE GOLDEN STORE CASUALLY. It is checked in so that tests/test_golden_v2.py
    proves that stores written by dittohead 0.3 (format 2) stay readable by every later one. A
    store made by today's code proves nothing about yesterday's. Make a new golden store
    (golden-v3, ...) when the format version changes, and keep the old ones and their tests.
    Regenerate golden-v2 only if it is itself broken, and say why in the commit message.

Run from the repository root, with the package installed (.venv):

    .venv/bin/python tests/make_golden_v2.py            # refuses to overwrite
    .venv/bin/python tests/make_golden_v2.py --force    # only for the reasons above

The store is built as golden-v1 was (tests/make_golden.py, whose helpers this script uses):
through the public command line (in-process), from deterministic content, study "golden", two
submissions from two sites; an empty file, a 600 KiB file of two content-defined chunks whose
second version shares the first chunk, files with two versions and one unchanged in the second
submission. Besides, it holds the names format 1 could not (docs/format.md, "Paths"), each the
exact bytes of a name on the source filesystem (see ``NAMES``): "café" in NFC and in NFD side by
side with different contents, Latin-1 bytes that are not UTF-8 (in a file name and a folder
name), a tab, a newline, an ESC and a C1 control, a backslash, a leading "-" (at the top, where
it looks like an option), a trailing space, a bidi override (U+202E), a WTF-8 lone surrogate
(ED A0 80, as a Windows client sends an unpaired surrogate), and a path of 60 components.
File mtimes, user and host are fixed; the store id, the submission names and the ingest times
are whatever they were when it was made.

golden-v2.json lists every (path, version) with its size and SHA-256 (an independent hash: not
the format's BLAKE3). A path is recorded twice: ``path_hex``, its exact bytes (the truth), and
``path``, the form dittohead 0.3 printed (``dittohead.display.escape``: plain printable text,
which ``cat`` and ``versions`` also accept). It also lists the submissions as ``log`` showed them
and fsck's counts. Before writing, the script checks that every version reads back through
``cat`` (by its bytes and by its printed form) and that ``export`` writes every current file
under its exact name bytes.

The tarball holds the server root only: its own names are ASCII (hex ids, submission names);
the study paths live inside the manifests. It is written as PAX with names in UTF-8 and
surrogateescape all the same, and read back to check the names came through.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import unicodedata
from pathlib import Path
from unittest import mock

from click.testing import CliRunner
from make_golden import MAX_TARBALL, MTIME_NS, KiB, big_file, invoke, seal_index, tarball

from dittohead import format as fmt
from dittohead import paths
from dittohead.chunking import Chunker
from dittohead.cli import cli
from dittohead.display import escape

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
TARBALL = DATA / "golden-v2.tar.gz"
INDEX_JSON = DATA / "golden-v2.json"
TOP = "golden-v2"  # the server root's folder name inside the tarball
STUDY = "golden"
FORMAT = 2

CAFE_NFC = "caf\u00e9.txt".encode()
CAFE_NFD = "cafe\u0301.txt".encode()
assert unicodedata.normalize("NFD", CAFE_NFC.decode()) == CAFE_NFD.decode() != CAFE_NFC.decode()
DEEP = b"/".join([b"deep"] + [b"d%02d" % i for i in range(1, 59)] + [b"leaf.txt"])
assert DEEP.count(b"/") + 1 == 60

# Every name format 1 could not hold, as the bytes a source filesystem gives: what it tests.
NAMES: dict[bytes, str] = {
    b"names/" + CAFE_NFC: "NFC spelling of a name (U+00E9)",
    b"names/" + CAFE_NFD: "NFD spelling of the same name (e + U+0301), another file",
    b"names/M\xfcller.csv": "Latin-1 byte, not UTF-8",
    b"names/J\xf6rg/rt.csv": "Latin-1 byte in a folder name",
    b"names/\xed\xa0\x80.txt": "WTF-8: an unpaired surrogate U+D800 from a Windows name",
    b"names/tab\there.txt": "a tab",
    b"names/new\nline.txt": "a newline",
    b"names/esc\x1b[31mred.txt": "an ESC (ANSI colour sequence)",
    "names/nel\u0085.txt".encode(): "a C1 control (U+0085)",
    b"names/back\\slash.txt": "a backslash",
    "names/evil\u202etxt.exe".encode(): "a bidi override (U+202E)",
    b"names/trailing space.txt ": "a trailing space",
    b"-n leading dash.txt": "a leading '-' (at the top: looks like an option)",
    DEEP: "60 components",
}


def contents() -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    """The two submissions: path bytes -> content."""
    big1 = big_file()
    big2 = big1[: -4 * KiB] + b"trailer, version 2\n" * 215 + big1[-4 * KiB + 19 * 215 :]
    assert len(big2) == len(big1) and big2[: -4 * KiB] == big1[: -4 * KiB]
    first = {
        b"README.txt": b"Golden store of dittohead format version 2.\n",
        b"empty.dat": b"",
        b"results/sub-01.csv": b"trial,rt\n1,500\n2,480\n",
        b"eyetracker/run 1.bin": big1,
    }
    for name, what in NAMES.items():
        first[name] = b"golden v2: " + what.encode() + b"\n" + name + b"\n"
    second = {
        b"results/sub-01.csv": b"trial,rt\n1,500\n2,480\n3,455\n",  # a second version
        b"results/sub-02.csv": b"trial,rt\n1,610\n",  # new
        b"eyetracker/run 1.bin": big2,  # a second version sharing the first chunk
        b"README.txt": first[b"README.txt"],  # unchanged: not a new version
        b"names/M\xfcller.csv": b"Versuch,RT\n1,512\n",  # a second version of a non-UTF-8 path
        b"names/" + CAFE_NFD: b"NFD, version 2\n",  # the NFD name moves on, the NFC one does not
    }
    return first, second


def write_tree(src: bytes, files: dict[bytes, bytes], mtime_ns: int) -> None:
    for rel, data in files.items():
        p = os.path.join(src, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        if os.path.exists(p):
            with open(p, "rb") as f:
                if f.read() == data:
                    continue  # unchanged: keep its mtime, as a lab PC would
        with open(p, "wb") as f:
            f.write(data)
        os.utime(p, ns=(mtime_ns, mtime_ns))


def cat(root: Path, path: str, version: int) -> bytes:
    res = CliRunner().invoke(cli, ["cat", "--store", str(root), "--study", STUDY, "--version", str(version), "--", path])
    if res.exit_code != 0:
        raise SystemExit(f"cat {escape(path)} v{version}: exit {res.exit_code}\n{res.output}{res.exception or ''}")
    return res.stdout_bytes


def build(work: Path) -> tuple[Path, dict]:
    root, src = work / TOP, os.fsencode(work / "src")
    first, second = contents()
    os.environ.update(DITTOHEAD_STATE_DIR=str(work / "client-state"), USER="golden", LOGNAME="golden")
    os.environ.pop("DITTOHEAD_STORE", None)
    with mock.patch("socket.gethostname", return_value="golden-host"):
        invoke("init", "--store", root)
        invoke("study", "add", STUDY, "--store", root)
        write_tree(src, first, MTIME_NS)
        invoke("sync", os.fsdecode(src), "--study", STUDY, "--to", root, "--site", "lab-a")
        invoke("watch", "--store", root, "--once")
        write_tree(src, second, MTIME_NS + 86_400 * 10**9)  # the next day
        invoke("sync", os.fsdecode(src), "--study", STUDY, "--to", root, "--site", "lab-b")
        invoke("watch", "--store", root, "--once")

    assert json.loads((root / "store" / "config").read_text())["version"] == FORMAT
    log = json.loads(invoke("log", "--store", root, "--study", STUDY, "--json"))["submissions"]
    assert [s["seq"] for s in log] == [1, 2], log
    changed = [rel for rel, data in second.items() if first.get(rel) != data]  # the client sends only these
    assert [s["files"] for s in log] == [len(first), len(changed)], log  # and skips no file for its name
    model: dict[bytes, list[bytes]] = {}
    for files in (first, second):
        for rel, data in files.items():
            if not model.get(rel) or model[rel][-1] != data:
                model.setdefault(rel, []).append(data)
    versions = []
    for raw in sorted(model):
        path = paths.from_bytes(raw)
        listed = json.loads(invoke("versions", "--store", root, "--study", STUDY, "--json", "--", path))
        assert listed["path"] == path and listed.get("path_b64") == (
            None if raw.decode("utf-8", "replace").encode() == raw else base64.b64encode(raw).decode()), listed
        listed = listed["versions"]
        assert [v["version"] for v in listed] == list(range(1, len(model[raw]) + 1)), (raw, listed)
        for v, data in zip(listed, model[raw]):
            assert cat(root, path, v["version"]) == data == cat(root, escape(raw), v["version"]), raw
            versions.append({"path": escape(raw), "path_hex": raw.hex(), "version": v["version"], "seq": v["seq"],
                             "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                             "chunks": len(list(Chunker().cut_bytes(data)))})
    assert any(v["chunks"] >= 2 for v in versions), "one file must have several chunks"
    fsck = json.loads(invoke("fsck", "--store", root, "--read-data", "--json"))
    assert fsck["ok"] and not fsck["findings"], fsck

    dest = work / "export"
    invoke("export", "--store", root, "--study", STUDY, dest)
    for raw, datas in model.items():
        with open(os.path.join(os.fsencode(dest), b"current", raw), "rb") as f:
            assert f.read() == datas[-1], raw

    doc = {
        "comment": "Golden store of dittohead format version 2, made by tests/make_golden_v2.py. "
                   "Never regenerate it casually: see the top of that script. A path's exact bytes "
                   "are path_hex; path is the form dittohead prints (dittohead.display.escape).",
        "format": fmt.FORMAT_VERSION,
        "root": TOP,
        "study": STUDY,
        "names": [{"path": escape(raw), "path_hex": raw.hex(), "what": what} for raw, what in NAMES.items()],
        "submissions": [{k: s[k] for k in ("seq", "name", "site", "user", "host", "files", "new_versions",
                                           "ingested_ns", "manifest")} for s in log],
        "versions": versions,
        "fsck_stats": {k: fsck["stats"][k] for k in ("packs", "chunks", "studies", "submissions", "versions")},
    }
    seal_index(root)
    return root, doc


def check_tarball(blob: bytes) -> None:
    """The tarball's names read back as written (PAX, UTF-8, surrogateescape)."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz", encoding="utf-8", errors="surrogateescape") as tar:
        names = tar.getnames()
    assert names[0] == TOP and all(n.startswith(TOP + "/") for n in names[1:]), names
    assert len(names) == len(set(names)), names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="overwrite an existing golden store (read the warning)")
    ap.add_argument("--out", type=Path, default=DATA, help="where to write (default tests/data)")
    args = ap.parse_args()
    if fmt.FORMAT_VERSION != FORMAT:
        print(f"this dittohead writes format {fmt.FORMAT_VERSION}, not {FORMAT}: it cannot make {TOP} "
              f"(see the top of {Path(__file__).name})", file=sys.stderr)
        return 1
    out_tar, out_json = args.out / TARBALL.name, args.out / INDEX_JSON.name
    if (out_tar.exists() or out_json.exists()) and not args.force:
        print(f"{out_tar} exists. The golden store is not regenerated casually: see the top of "
              f"{Path(__file__).name}.", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="dittohead-golden-") as tmp:
        root, doc = build(Path(tmp))
        blob = tarball(root, TOP)
        check_tarball(blob)
        shutil.rmtree(root)
    if len(blob) > MAX_TARBALL:
        print(f"tarball is {len(blob)} bytes, more than {MAX_TARBALL}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    out_tar.write_bytes(blob)
    out_json.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out_tar} ({len(blob)} bytes) and {out_json}: {len(doc['versions'])} versions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
