"""The client's state cache across the change to exact name bytes (format 2)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from dittohead.client import cache as cc

OLD_SCHEMA = cc.SCHEMA.replace("path BLOB", "path TEXT")  # dittohead 0.2's tables


def test_a_cache_of_text_paths_is_converted_and_keeps_what_it_knew(tmp_path: Path) -> None:
    """A cache written by dittohead 0.2 (paths as text) is converted on open: the files it had
    read and what it had sent are known under the same paths, so a sync re-reads and re-sends
    nothing; names that were never UTF-8 now have their own rows beside them."""
    db_path = tmp_path / "state.sqlite"
    db = sqlite3.connect(db_path)
    db.executescript(OLD_SCHEMA)
    key = ("dest", "s")
    db.execute("INSERT INTO files VALUES (?, ?, ?, 1, 2, 3, 4, ?, ?)", (*key, "d/caf\u00e9.txt", b"h" * 32, b""))
    db.execute("INSERT INTO subs VALUES (?, ?, 'sub-1', ?, 0, 1)", (*key, cc.INGESTED))
    db.execute("INSERT INTO sent VALUES (?, ?, ?, 'sub-1', ?)", (*key, "d/caf\u00e9.txt", b"h" * 32))
    db.commit()
    db.close()

    cache = cc.StateCache(str(db_path), *key)
    try:
        assert cache.load_files() == {"d/caf\u00e9.txt": cc.CachedFile(1, 2, 3, 4, b"h" * 32, b"")}
        assert cache.last_sent() == {"d/caf\u00e9.txt": b"h" * 32}
        odd = "lat\udce9n.txt"  # b"lat\xe9n.txt": a Latin-1 name
        cache.put_files([(odd, cc.CachedFile(5, 6, 7, 8, b"k" * 32, b""))])
        with cache.transaction():
            cache.record_sent("sub-1", [(odd, b"k" * 32)])
    finally:
        cache.close()
    again = cc.StateCache(str(db_path), *key)  # opened again: nothing converted twice
    try:
        assert set(again.load_files()) == {"d/caf\u00e9.txt", odd}
        assert again.last_sent() == {"d/caf\u00e9.txt": b"h" * 32, odd: b"k" * 32}
    finally:
        again.close()
    raw = sqlite3.connect(db_path)
    assert {r[0] for r in raw.execute("SELECT typeof(path) FROM files")} == {"blob"}
    assert b"lat\xe9n.txt" in {r[0] for r in raw.execute("SELECT path FROM files")}
    raw.close()
