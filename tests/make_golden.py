"""Make the golden store of format version 1: tests/data/golden-v1.tar.gz + golden-v1.json.

    DO NOT REGENERATE THE GOLDEN STORE CASUALLY. It is checked in so that tests/test_golden.py
    proves that stores written by an earlier dittohead stay readable by every later one. A store
    made by today's code proves nothing about yesterday's. Make a new golden store (golden-v2,
    ...) when the format version changes, and keep the old ones and their tests. Regenerate
    golden-v1 only if it is itself broken, and say why in the commit message.

Run from the repository root, with the package installed (.venv):

    .venv/bin/python tests/make_golden.py            # refuses to overwrite
    .venv/bin/python tests/make_golden.py --force    # only for the reasons above

The store is built through the public command line (in-process), from deterministic content:
study "golden", two submissions from two sites; an empty file, a non-ASCII path (NFC), a 600 KiB
file of two content-defined chunks whose second version shares the first chunk, a file with
two versions and one unchanged in the second submission. File mtimes, user and host are fixed;
the store id, the submission names and the ingest times are whatever they were when it was made.
golden-v1.json lists every (path, version) with its size and SHA-256 (an independent hash: not
the format's BLAKE3), the submissions as ``log`` showed them, and fsck's counts.

golden-v1 was made by dittohead 0.1.0, which wrote format 1. A later dittohead writes a later
format, so this script refuses to run under it (it would make a store of that format and call
it golden-v1): it stays as the record of how golden-v1 was made. tests/make_golden_v2.py makes
golden-v2, and shares this script's helpers.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import sqlite3
import sys
import tarfile
import tempfile
import unicodedata
from pathlib import Path
from unittest import mock

from click.testing import CliRunner

from dittohead import format as fmt
from dittohead.chunking import Chunker
from dittohead.cli import cli

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
TARBALL = DATA / "golden-v1.tar.gz"
INDEX_JSON = DATA / "golden-v1.json"
TOP = "golden-v1"  # the server root's folder name inside the tarball
STUDY = "golden"
KiB = 1024
MTIME_NS = 1_704_164_645_000_000_000  # 2024-01-02T03:04:05Z: client-reported mtimes (+1 day)
MAX_TARBALL = 200 * KiB
NON_ASCII = "Probanden/M\u00fcller \u00c4\u00d6\u00dc/\u30c7\u30fc\u30bf \u00e9t\u00e9.csv"
assert unicodedata.normalize("NFC", NON_ASCII) == NON_ASCII


def big_file() -> bytes:
    """600 KiB that gzip squeezes to almost nothing yet FastCDC cuts in two: zeros (which never
    cut) around 40 KiB of seeded random bytes; the first seed whose bytes make a cut wins."""
    for seed in range(10_000):
        data = bytearray(600 * KiB)
        data[280 * KiB : 320 * KiB] = random.Random(seed).randbytes(40 * KiB)
        if len(list(Chunker().cut_bytes(bytes(data)))) >= 2:
            return bytes(data)
    raise SystemExit("no seed gave a content-defined cut")


def contents() -> tuple[dict[str, bytes], dict[str, bytes]]:
    big1 = big_file()
    big2 = big1[: -4 * KiB] + b"trailer, version 2\n" * 215 + big1[-4 * KiB + 19 * 215 :]
    assert len(big2) == len(big1) and big2[:-4 * KiB] == big1[:-4 * KiB]
    first = {
        "README.txt": b"Golden store of dittohead format version 1.\n",
        "empty.dat": b"",
        NON_ASCII: "trial,rt,antwort\n1,512,\u00e4\n2,498,\u00f6\n".encode("utf-8"),
        "results/sub-01.csv": b"trial,rt\n1,500\n2,480\n",
        "eyetracker/run 1.bin": big1,
    }
    second = {
        "results/sub-01.csv": b"trial,rt\n1,500\n2,480\n3,455\n",  # a second version
        "results/sub-02.csv": b"trial,rt\n1,610\n",  # new
        "eyetracker/run 1.bin": big2,  # a second version sharing the first chunk
        "README.txt": first["README.txt"],  # unchanged: not a new version
    }
    return first, second


def invoke(*args: object) -> str:
    res = CliRunner().invoke(cli, [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args])
    if res.exit_code != 0:
        raise SystemExit(f"dittohead {' '.join(map(str, args))}: exit {res.exit_code}\n{res.output}{res.exception or ''}")
    return res.stdout


def write_tree(src: Path, files: dict[str, bytes], mtime_ns: int) -> None:
    for rel, data in files.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.exists() and p.read_bytes() == data:
            continue  # unchanged: keep its mtime, as a lab PC would
        p.write_bytes(data)
        os.utime(p, ns=(mtime_ns, mtime_ns))


def build(work: Path) -> tuple[Path, dict]:
    root, src = work / TOP, work / "src"
    first, second = contents()
    os.environ.update(DITTOHEAD_STATE_DIR=str(work / "client-state"), USER="golden", LOGNAME="golden")
    os.environ.pop("DITTOHEAD_STORE", None)
    with mock.patch("socket.gethostname", return_value="golden-host"):
        invoke("init", "--store", root)
        invoke("study", "add", STUDY, "--store", root)
        write_tree(src, first, MTIME_NS)
        invoke("sync", src, "--study", STUDY, "--to", root, "--site", "lab-a")
        invoke("watch", "--store", root, "--once")
        write_tree(src, second, MTIME_NS + 86_400 * 10**9)  # the next day
        invoke("sync", src, "--study", STUDY, "--to", root, "--site", "lab-b")
        invoke("watch", "--store", root, "--once")

    log = json.loads(invoke("log", "--store", root, "--study", STUDY, "--json"))["submissions"]
    assert [s["seq"] for s in log] == [1, 2], log
    model: dict[str, list[bytes]] = {}
    for files in (first, second):
        for rel, data in files.items():
            if not model.get(rel) or model[rel][-1] != data:
                model.setdefault(rel, []).append(data)
    versions = []
    for rel in sorted(model):
        listed = json.loads(invoke("versions", "--store", root, "--study", STUDY, rel, "--json"))["versions"]
        assert [v["version"] for v in listed] == list(range(1, len(model[rel]) + 1)), (rel, listed)
        for v, data in zip(listed, model[rel]):
            got = CliRunner().invoke(cli, ["cat", "--store", str(root), "--study", STUDY, rel,
                                           "--version", str(v["version"])]).stdout_bytes
            assert got == data, rel
            versions.append({"path": rel, "version": v["version"], "seq": v["seq"], "size": len(data),
                             "sha256": hashlib.sha256(data).hexdigest(),
                             "chunks": len(list(Chunker().cut_bytes(data)))})
    fsck = json.loads(invoke("fsck", "--store", root, "--read-data", "--json"))
    assert fsck["ok"] and not fsck["findings"], fsck
    doc = {
        "comment": "Golden store of dittohead format version 1, made by tests/make_golden.py. "
                   "Never regenerate it casually: see the top of that script.",
        "format": fmt.FORMAT_VERSION,
        "root": TOP,
        "study": STUDY,
        "submissions": [{k: s[k] for k in ("seq", "name", "site", "user", "host", "files", "new_versions",
                                           "ingested_ns", "manifest")} for s in log],
        "versions": versions,
        "fsck_stats": {k: fsck["stats"][k] for k in ("packs", "chunks", "studies", "submissions", "versions")},
    }
    assert any(v["chunks"] >= 2 for v in versions), "one file must have several chunks"

    seal_index(root)
    return root, doc


def seal_index(root: Path) -> None:
    """The in-process CLI leaves SQLite connections to the garbage collector: close them, then
    fold the index's WAL into the file so that the tarball holds one self-contained index."""
    gc.collect()
    db = sqlite3.connect(root / "store" / "index.sqlite")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("PRAGMA journal_mode=DELETE")
    db.close()
    for suffix in ("-wal", "-shm"):
        Path(str(root / "store" / "index.sqlite") + suffix).unlink(missing_ok=True)


def tarball(root: Path, top: str = TOP) -> bytes:
    """A reproducible tar.gz of the server root (as folder ``top``): sorted, fixed owners and
    times, modes kept; PAX, names in UTF-8 (a name that is not would be kept as its bytes)."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT,
                         encoding="utf-8", errors="surrogateescape") as tar:
        for p in [root, *sorted(root.rglob("*"))]:
            if p.name == "lock" and p.parent.name == "store":
                continue  # the ingest lock: bookkeeping, not data
            info = tar.gettarinfo(str(p), arcname=str(Path(top) / p.relative_to(root)))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = MTIME_NS // 10**9
            if info.isfile():
                with open(p, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="overwrite an existing golden store (read the warning)")
    ap.add_argument("--out", type=Path, default=DATA, help="where to write (default tests/data)")
    args = ap.parse_args()
    if fmt.FORMAT_VERSION != 1:
        print(f"this dittohead writes format {fmt.FORMAT_VERSION}, not 1: it cannot make golden-v1 "
              f"(see the top of {Path(__file__).name})", file=sys.stderr)
        return 1
    out_tar, out_json = args.out / TARBALL.name, args.out / INDEX_JSON.name
    if (out_tar.exists() or out_json.exists()) and not args.force:
        print(f"{out_tar} exists. The golden store is not regenerated casually: see the top of "
              f"{Path(__file__).name}.", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="dittohead-golden-") as tmp:
        root, doc = build(Path(tmp))
        blob = tarball(root)
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
