"""The client's local state: a SQLite cache per machine, keyed by destination and study.

It remembers what each file looked like when last read (size, mtime_ns, ctime_ns, inode -> hash and
chunks), what this client has told the server (per path, the content hash and the submission),
the submissions it made and their state, the have-segments it has read, and the packs already
complete in an unfinished staging folder. Losing it costs time, never correctness: the server
checks everything and never makes a version twice. Paths are kept as BLOBs of their exact bytes
(``dittohead.paths``); a cache from before (paths as text, dittohead 0.2) is converted on open.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from typing import NamedTuple

from dittohead.paths import from_bytes, to_bytes

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    dest TEXT, study TEXT, path BLOB, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, ino INTEGER,
    hash BLOB, chunks BLOB, PRIMARY KEY (dest, study, path)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subs (
    dest TEXT, study TEXT, name TEXT, state TEXT, created_ns INTEGER, local_seq INTEGER,
    PRIMARY KEY (dest, study, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sent (
    dest TEXT, study TEXT, path BLOB, submission TEXT, hash BLOB,
    PRIMARY KEY (dest, study, path, submission)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS staged (
    dest TEXT, study TEXT, submission TEXT, pack TEXT, size INTEGER, ids BLOB,
    PRIMARY KEY (dest, study, submission, pack)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS have_segments (
    dest TEXT, study TEXT, segment TEXT, PRIMARY KEY (dest, study, segment)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS have (
    dest TEXT, study TEXT, id BLOB, PRIMARY KEY (dest, study, id)) WITHOUT ROWID;
"""

PATHS_AS_BYTES = 1  # PRAGMA user_version from which paths are BLOBs

# Submission states, in the order they move.
STAGING = "staging"  # a .NAME folder on the server is being filled
COMMITTING = "committing"  # about to rename .NAME -> NAME (sent rows written)
PENDING = "pending"  # committed, no receipt yet
INGESTED = "ingested"  # the receipt is there
LOST = "lost"  # gone from the inbox with no receipt: rejected (its files will be sent again)


def state_dir() -> str:
    if os.environ.get("DITTOHEAD_STATE_DIR"):
        return os.environ["DITTOHEAD_STATE_DIR"]
    import platformdirs

    return platformdirs.user_data_dir("dittohead", appauthor=False)


class CachedFile(NamedTuple):  # a tuple: 20,000 of them are made for every sync
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    hash: bytes
    chunks: bytes


class StateCache:
    def __init__(self, path: str, dest: str, study: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        cols = [r[1] for r in self.db.execute("PRAGMA table_info(files)")]
        if cols and "ctime_ns" not in cols:  # a cache from before ctime was kept: re-read files once
            self.db.execute("DROP TABLE files")
        self.db.executescript(SCHEMA)
        if self.db.execute("PRAGMA user_version").fetchone()[0] < PATHS_AS_BYTES:
            with self.transaction():  # text paths were UTF-8: their bytes are the same path
                for table in ("files", "sent"):
                    self.db.execute(f"UPDATE {table} SET path = CAST(path AS BLOB) WHERE typeof(path) = 'text'")
                self.db.execute(f"PRAGMA user_version = {PATHS_AS_BYTES}")
        self.key = (dest, study)

    def close(self) -> None:
        self.db.close()

    def transaction(self):
        return _Tx(self.db)

    # -- files as last read
    def load_files(self) -> dict[str, CachedFile]:
        make = CachedFile._make
        return {from_bytes(r[0]): make(r[1:]) for r in self.db.execute(
            "SELECT path, size, mtime_ns, ctime_ns, ino, hash, chunks FROM files WHERE dest=? AND study=?",
            self.key)}

    def put_files(self, rows: list[tuple[str, CachedFile]]) -> None:
        with self.transaction():
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                ((*self.key, to_bytes(p), f.size, f.mtime_ns, f.ctime_ns, f.ino, f.hash, f.chunks)
                                 for p, f in rows))

    # -- what the server was told
    def last_sent(self) -> dict[str, bytes]:
        """path -> hash of the content most recently sent in a submission not known lost."""
        return {from_bytes(p): h for p, h in self.db.execute(  # in order: a later submission's hash wins
            "SELECT t.path, t.hash FROM sent t JOIN subs s ON s.dest=t.dest AND s.study=t.study "
            "AND s.name=t.submission WHERE t.dest=? AND t.study=? AND s.state IN (?, ?, ?) "
            "ORDER BY s.local_seq", (*self.key, COMMITTING, PENDING, INGESTED))}

    def record_sent(self, submission: str, rows: Iterable[tuple[str, bytes]]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO sent VALUES (?, ?, ?, ?, ?)",
                            ((*self.key, to_bytes(p), submission, h) for p, h in rows))

    def forget_sent(self, submission: str) -> None:
        self.db.execute("DELETE FROM sent WHERE dest=? AND study=? AND submission=?", (*self.key, submission))

    # -- submissions
    def submissions(self, states: tuple[str, ...]) -> list[str]:
        marks = ",".join("?" * len(states))
        return [r[0] for r in self.db.execute(
            f"SELECT name FROM subs WHERE dest=? AND study=? AND state IN ({marks}) ORDER BY local_seq",
            (*self.key, *states))]

    def set_state(self, name: str, state: str, created_ns: int = 0) -> None:
        row = self.db.execute("SELECT local_seq FROM subs WHERE dest=? AND study=? AND name=?",
                              (*self.key, name)).fetchone()
        if row is None:
            seq = self.db.execute("SELECT COALESCE(MAX(local_seq), 0) + 1 FROM subs").fetchone()[0]
            self.db.execute("INSERT INTO subs VALUES (?, ?, ?, ?, ?, ?)", (*self.key, name, state, created_ns, seq))
        else:
            self.db.execute("UPDATE subs SET state=? WHERE dest=? AND study=? AND name=?", (state, *self.key, name))

    # -- packs complete in a staging folder
    def staged(self, submission: str) -> dict[str, tuple[int, bytes]]:
        return {r[0]: (r[1], r[2]) for r in self.db.execute(
            "SELECT pack, size, ids FROM staged WHERE dest=? AND study=? AND submission=?", (*self.key, submission))}

    def add_staged(self, submission: str, pack: str, size: int, ids: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO staged VALUES (?, ?, ?, ?, ?, ?)",
                        (*self.key, submission, pack, size, ids))

    def drop_staged(self, submission: str, pack: str | None = None) -> None:
        if pack is None:
            self.db.execute("DELETE FROM staged WHERE dest=? AND study=? AND submission=?", (*self.key, submission))
        else:
            self.db.execute("DELETE FROM staged WHERE dest=? AND study=? AND submission=? AND pack=?",
                            (*self.key, submission, pack))

    # -- the server's have-segments
    def read_segments(self) -> set[str]:
        return {r[0] for r in self.db.execute(
            "SELECT segment FROM have_segments WHERE dest=? AND study=?", self.key)}

    def add_segment(self, segment: str, ids: list[bytes]) -> None:
        with self.transaction():
            self.db.executemany("INSERT OR IGNORE INTO have VALUES (?, ?, ?)", ((*self.key, i) for i in ids))
            self.db.execute("INSERT OR IGNORE INTO have_segments VALUES (?, ?, ?)", (*self.key, segment))

    def have(self) -> set[bytes]:
        return {r[0] for r in self.db.execute("SELECT id FROM have WHERE dest=? AND study=?", self.key)}


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        return False
