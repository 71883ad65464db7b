"""Readers beside the writer, as they run for weeks: an ingest takes dozens of submissions while
``log``, ``versions``, ``cat``, ``export`` and ``fsck`` (with and without ``--read-data``) run in
loops beside it, each as its own process. Every reader run succeeds, or says "no file" for a
path whose submission is not ingested yet; fsck never reports damage (it may say it did not
compare the index while the ingest held the lock); the ingest never fails; at the end every
version of every path reads back right and fsck is clean.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest
from conftest import Server, describe, write_file

ROUNDS = 30  # submissions committed before the ingest starts, one per round


def _content(rnd: int, name: str) -> bytes:
    return f"{name} in round {rnd}\n".encode() * (1 + rnd % 7) + random.Random(f"{name}{rnd}").randbytes(300 * rnd)


@pytest.mark.slow
def test_readers_in_loops_beside_an_ingest_of_dozens_of_submissions(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    expected: dict[str, list[bytes]] = {}  # path -> its versions' bytes, in order
    for rnd in range(1, ROUNDS + 1):
        names = ["always.txt", f"round-{rnd:02d}.csv"] + (["every-third.bin"] if rnd % 3 == 0 else [])
        for name in names:
            data = _content(rnd, name)
            write_file(src / "d" / name, data)
            if not expected.get(name) or expected[name][-1] != data:
                expected.setdefault(name, []).append(data)
        server.sync(src)
    assert len(server.inbox_entries()) == ROUNDS

    failures: list[str] = []
    runs: dict[str, int] = {}
    stop = threading.Event()
    export_dest = tmp_path / "export"

    def loop(label: str, args: list, allowed: tuple[int, ...] = (0,), check=None) -> None:
        while not stop.is_set():
            cp = server.proc(*args, timeout=120)
            runs[label] = runs.get(label, 0) + 1
            if cp.returncode not in allowed or "Traceback" in cp.stderr or "internal error" in cp.stderr:
                failures.append(f"{label}: {describe(cp)}")
            elif check is not None:
                problem = check(cp)
                if problem:
                    failures.append(f"{label}: {problem}")

    def fsck_check(cp) -> str | None:
        doc = json.loads(cp.stdout)
        bad = [f for f in doc["findings"] if f["severity"] != "warning"]
        return f"findings beside the ingest: {bad}" if bad else None

    def log_check(cp) -> str | None:
        seqs = [s["seq"] for s in json.loads(cp.stdout)["submissions"]]
        return None if seqs == list(range(1, len(seqs) + 1)) else f"log shows {seqs}"

    def versions_check(cp) -> str | None:
        if cp.returncode:
            return None if "no file" in cp.stderr else f"not 'no file': {cp.stderr}"
        vs = json.loads(cp.stdout)["versions"]
        return None if [v["version"] for v in vs] == list(range(1, len(vs) + 1)) else f"versions {vs}"

    def cat_check(cp) -> str | None:
        if cp.returncode:
            return None if "no file" in cp.stderr else f"not 'no file': {cp.stderr}"
        return None if cp.stdout in expected["every-third.bin"] else "cat gave bytes that were never sent"

    store = ["--store", server.root, "--study", "s"]
    readers = [
        ("log", ["log", *store, "--json"], (0,), log_check),
        ("versions", ["versions", *store, "d/always.txt", "--json"], (0, 1), versions_check),
        ("cat", ["cat", *store, "d/every-third.bin"], (0, 1), cat_check),
        ("export", ["export", *store, export_dest], (0,), None),
        ("fsck", ["fsck", "--store", server.root, "--json"], (0,), fsck_check),
        ("fsck --read-data", ["fsck", "--store", server.root, "--read-data", "--json"], (0,), fsck_check),
    ]
    threads = [threading.Thread(target=loop, args=r, daemon=True) for r in readers]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the readers are going when the ingest begins
    ingest = server.proc("watch", "--store", server.root, "--once", timeout=600)
    time.sleep(0.5)  # and go on a little after it
    stop.set()
    for t in threads:
        t.join(180)
    assert ingest.returncode == 0, describe(ingest)
    assert not failures, "\n".join(failures[:10])
    assert all(runs.get(label, 0) >= 2 for label, *_ in readers), runs

    assert [s["seq"] for s in server.log()] == list(range(1, ROUNDS + 1))
    for name, datas in expected.items():
        for n, data in enumerate(datas, 1):
            assert server.cat(f"d/{name}", version=n) == data, (name, n)
    res = server.run("fsck", "--store", server.root, "--read-data", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["findings"] == [], describe(res)
    final = server.run("export", *store, export_dest)
    assert final.exit_code == 0, describe(final)
    for name, datas in expected.items():
        assert (export_dest / "current" / "d" / name).read_bytes() == datas[-1], name
