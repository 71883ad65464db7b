"""How much memory and time ``manifest.decode`` takes for the largest manifests a limit admits.

    .venv/bin/python benchmarks/manifest_memory.py [--entries N] [--bytes B] [--shape SHAPE]...
                                                   [--mode submission|stored] [--workdir DIR]

Builds each manifest (msgpack written entry by entry, so the builder stays small), writes it to
a file, and decodes it in a fresh child process, which prints its figures: the manifest's size,
the decode's wall time, and the peak RSS (``ru_maxrss``) above the baseline taken after the
imports, so the figure includes the manifest's raw bytes as read from the file (ingest holds
them too) and everything ``decode`` builds.

Shapes (each capped by both limits, ``--entries`` and ``--bytes``):

- ``fill``: as many entries as the entry limit admits, with paths just long enough that the
  manifest comes close to the byte limit (the largest legal manifest, both limits used up).
- ``short``: as many entries as admitted, one chunk each, realistic short paths
  (``sub-0001/ses-01/eeg/file-000123.txt``).
- ``long``: paths of about 4,000 bytes (the path limit is 4096), as many as the byte limit admits.
- ``astral``: as ``long``, with one character outside the BMP (an emoji) at the end of each
  path: Python then keeps the whole path 4 bytes a character, 4 times its UTF-8 bytes (the most
  memory a legal path can cost per byte of manifest).
- ``chunks``: files of 10,000 chunks each, up to the byte limit (chunk references are the most
  numerous thing a manifest can hold per byte).

By default the limits are those for submissions in ``dittohead/format.py``
(``MANIFEST_MAX_ENTRIES``, ``MANIFEST_MAX_SIZE``); ``--old`` uses the limits before they were
lowered (4,000,000 entries, 512 MiB), decoded as stored manifests are read
(``--mode stored``) when the code has that mode.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import msgpack

from dittohead import format as fmt

SHAPES = ["fill", "short", "long", "astral", "chunks"]
OLD_ENTRIES = 4_000_000
OLD_BYTES = 512 * 1024 * 1024

CHILD = r"""
import gc, json, resource, sys, time
sys.path.insert(0, {repo!r})
from dittohead import manifest as mf
from dittohead import format as fmt
mode = {mode!r}
gc.collect()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with open({path!r}, "rb") as f:
    data = f.read()
kw = {{}}
if mode == "stored":
    kw["stored"] = True
else:  # the limits asked for, whatever format.py says
    fmt.MANIFEST_MAX_ENTRIES, fmt.MANIFEST_MAX_SIZE = {entries!r}, {nbytes!r}
t0 = time.perf_counter()
m = mf.decode(data, **kw)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = len(m.entries)
t1 = time.perf_counter()
chunks = sum(len(e.chunks) for e in m.entries)
walk = time.perf_counter() - t1
print(json.dumps({{"bytes": len(data), "entries": n, "chunks": chunks, "seconds": dt,
                  "walk_seconds": walk, "peak_mib": (peak - base) / 1024}}))
"""


def _header(n: int) -> bytes:
    head = {"format": 1, "kind": "manifest", "study": "bench", "site": "lab-1", "user": "ra",
            "host": "eeg-pc-01", "created_ns": 1_700_000_000_000_000_000}
    out = bytes([0x80 | (len(head) + 1)])
    for k, v in head.items():
        out += msgpack.packb(k, use_bin_type=True) + msgpack.packb(v, use_bin_type=True)
    out += msgpack.packb("entries", use_bin_type=True)
    if n < 16:
        out += bytes([0x90 | n])
    elif n < 1 << 16:
        out += b"\xdc" + n.to_bytes(2, "big")
    else:
        out += b"\xdd" + n.to_bytes(4, "big")
    return out


def _entry(path: str, nchunks: int, rnd: random.Random, tiny: bool = False) -> bytes:
    ids = [rnd.randbytes(32) for _ in range(nchunks)]
    # One-chunk files are small (a lab's many files are): sizes up to 64 KiB, or with ``tiny``
    # up to 127 bytes (the shortest entries, to fit the most in a byte limit).
    top = fmt.CHUNK_MAX if nchunks > 1 else 127 if tiny else 65535
    lengths = [rnd.randint(1, top) for _ in range(nchunks)]
    return msgpack.packb({
        "path": path, "size": sum(lengths), "mtime_ns": 1_700_000_000_123_456_789, "mode": 0o644,
        "hash": ids[0] if nchunks == 1 else rnd.randbytes(32),
        "chunks": [[i, n] for i, n in zip(ids, lengths)],
    }, use_bin_type=True)


def short_path(i: int) -> str:
    return f"sub-{i // 10000:04d}/ses-{i // 1000 % 10 + 1:02d}/eeg/file-{i:06d}.txt"


def long_path(i: int, length: int) -> str:
    """A path of about ``length`` bytes: components of 200 bytes, the last one unique."""
    tail = f"file-{i:08d}.txt"
    folders = max(0, (length - len(tail)) // 201)
    return "/".join(["d" * 199 + f"{k % 10}" for k in range(folders)] + [tail])


def padded_path(i: int, length: int) -> str:
    """A unique path of ``length`` ASCII bytes (at least 13), realistic folders."""
    base = short_path(i)
    if length < len(base):
        return f"s{i // 1000:04d}/{i % 1000:03d}.txt"
    if length == len(base):
        return base
    extra = length - len(base)
    folders = []
    while extra > 0:
        n = min(extra, 201)
        if n < 2:  # a component of 0 characters is not a path: put it on the last folder
            folders[-1] += "x" * n if folders else "x"
            break
        folders.append("p" * (n - 1))
        extra -= n
    return "/".join(folders + [base])


def build(path: str, shape: str, max_entries: int, max_bytes: int, seed: int = 1) -> tuple[int, int]:
    """Write a manifest of ``shape`` for these limits to ``path``; return (entries, bytes)."""
    rnd = random.Random(seed)
    one = len(_entry(short_path(0), 1, rnd)) - len(short_path(0).encode())  # an entry's overhead
    room = max_bytes - 200  # the header's share
    if shape == "short":
        n = min(max_entries, room // (one + 36))
        make = lambda i: _entry(short_path(i), 1, rnd)
    elif shape == "fill":
        n = max_entries
        per = room // n - one
        plen = max(13, min(fmt.PATH_MAX_BYTES - 8, per - 3))  # str8/str16 header: up to 3 bytes
        if plen >= len(short_path(0)):
            n = min(n, room // (one + plen + 3))
            make = lambda i: _entry(padded_path(i, plen), 1, rnd)
        else:  # the shortest entries there are: tiny files, paths of 8 bytes
            tiny = len(_entry("f0000000", 1, rnd, tiny=True))
            n = min(n, room // tiny)
            make = lambda i: _entry(f"f{i:07d}", 1, rnd, tiny=True)
    elif shape == "long":
        plen = 4000
        n = min(max_entries, room // (one + plen + 3))
        make = lambda i: _entry(long_path(i, plen), 1, rnd)
    elif shape == "astral":
        plen = 4000
        n = min(max_entries, room // (one + plen + 3))
        make = lambda i: _entry(long_path(i, plen - 4) + "\U0001f600", 1, rnd)
    elif shape == "chunks":
        per_file = 10_000
        n = max(1, min(max_entries, room // (one + 40 * per_file)))
        make = lambda i: _entry(short_path(i), per_file, rnd)
    else:
        raise SystemExit(f"unknown shape {shape}")
    # The header's count must be right before the entries are known: write, then check.
    with open(path, "wb") as f:
        f.write(_header(n))
        f.writelines(make(i) for i in range(n))
        size = f.tell()
    if size > max_bytes:
        raise SystemExit(f"{shape}: built {size} bytes, over the limit of {max_bytes}")
    return n, size


def measure(path: str, mode: str, entries: int, nbytes: int) -> dict:
    code = CHILD.format(repo=REPO, path=path, mode=mode, entries=entries, nbytes=nbytes)
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if cp.returncode != 0:
        return {"error": (cp.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(cp.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=None)
    ap.add_argument("--bytes", type=int, default=None)
    ap.add_argument("--old", action="store_true", help="the limits before they were lowered")
    ap.add_argument("--shape", action="append", choices=SHAPES)
    ap.add_argument("--mode", choices=["submission", "stored"], default=None)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    entries = args.entries or (OLD_ENTRIES if args.old else fmt.MANIFEST_MAX_ENTRIES)
    nbytes = args.bytes or (OLD_BYTES if args.old else fmt.MANIFEST_MAX_SIZE)
    from dittohead import manifest as mf

    has_stored = "stored" in inspect.signature(mf.decode).parameters
    mode = args.mode or ("stored" if args.old and has_stored else "submission")
    if mode == "stored" and not has_stored:
        raise SystemExit("this code's manifest.decode has no stored mode")
    print(f"limits: {entries:,} entries, {nbytes:,} bytes ({nbytes / 2**20:.0f} MiB); decode mode: {mode}")
    print(f"{'shape':8} {'entries':>10} {'chunks':>11} {'MB':>8} {'decode s':>9} {'walk s':>7} {'peak MiB':>9}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for shape in args.shape or SHAPES:
            path = os.path.join(tmp, f"manifest-{shape}")
            t0 = time.perf_counter()
            n, size = build(path, shape, entries, nbytes)
            built = time.perf_counter() - t0
            r = measure(path, mode, entries, nbytes)
            os.unlink(path)
            if "error" in r:
                print(f"{shape:8} {n:>10,} {'':>11} {size / 1e6:>8.1f} failed: {r['error']}")
                continue
            print(f"{shape:8} {r['entries']:>10,} {r['chunks']:>11,} {r['bytes'] / 1e6:>8.1f} "
                  f"{r['seconds']:>9.2f} {r['walk_seconds']:>7.2f} {r['peak_mib']:>9.0f}"
                  f"   (built in {built:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
