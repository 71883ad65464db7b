"""The index: a SQLite cache derived from packs, manifests and study logs only.

It answers what the store's files cannot answer quickly: where a chunk lives, which chunks a
study holds, and every path's history (path -> versions, kept as ingest goes: invariant 9). It
can always be rebuilt from the store (``Store.rebuild_index``), and fsck compares the two.
A submission is applied in one SQLite transaction, together with the study's ``last_seq``, so the
index is always exactly "the log up to last_seq". Paths are kept as BLOBs of their exact bytes
(``paths.to_bytes``); every method takes and gives study paths as ``str`` (``dittohead.paths``).
The tree table holds the read-only view's folders (see below), so that every query the view
makes reads what it answers and nothing else: no method here reads a whole study's history.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from dittohead.chunking import pack_chunk_list
from dittohead.hashing import blake3
from dittohead.manifest import Manifest
from dittohead.paths import from_bytes, to_bytes
from dittohead.studylog import LogRecord

SCHEMA_VERSION = 4  # 2: paths as BLOBs (format version 2's exact name bytes); 3: the tree table; 4: indexes for the ingest's lookups

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    id BLOB PRIMARY KEY, pack BLOB NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS studies (name TEXT PRIMARY KEY, last_seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS study_chunks (
    study TEXT NOT NULL, id BLOB NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (study, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS submissions (
    study TEXT NOT NULL, seq INTEGER NOT NULL, name TEXT NOT NULL, manifest BLOB NOT NULL,
    ingested_ns INTEGER NOT NULL, site TEXT NOT NULL, user TEXT NOT NULL, host TEXT NOT NULL,
    created_ns INTEGER NOT NULL, files INTEGER NOT NULL, bytes INTEGER NOT NULL,
    new_versions INTEGER NOT NULL, new_chunk_bytes INTEGER NOT NULL,
    PRIMARY KEY (study, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS versions (
    study TEXT NOT NULL, path BLOB NOT NULL, n INTEGER NOT NULL, seq INTEGER NOT NULL,
    hash BLOB NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, mode INTEGER NOT NULL,
    chunks BLOB NOT NULL,
    PRIMARY KEY (study, path, n)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entries (
    study TEXT NOT NULL, seq INTEGER NOT NULL, path BLOB NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (study, seq, path)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tree (
    study TEXT NOT NULL, seq INTEGER NOT NULL, parent BLOB NOT NULL, name BLOB NOT NULL,
    kind INTEGER NOT NULL,
    PRIMARY KEY (study, seq, parent, name, kind)
) WITHOUT ROWID;
-- Looked up by every ingest (submission_named, chunks_gained): a search, not a scan of the study.
CREATE INDEX IF NOT EXISTS submissions_by_name ON submissions (study, name);
CREATE INDEX IF NOT EXISTS study_chunks_by_seq ON study_chunks (study, seq);
"""

# The tree table: the folders of the read-only view (dittohead/view.py), so that one folder is
# listed by one range of rows, never by reading the study. A row is a name in a folder: ``kind``
# FOLDER (some path goes on below it) or FILE (a path ends there; a name may be both). ``seq`` 0
# is the tree of every path the study ever received (current/ and versions/); ``seq`` N that of
# submission N's own entries (submissions/). A folder is named by its key: ``TOP_KEY`` for the
# top, ``folder_key(parent's key, name)`` below: 16 bytes of BLAKE3 down the chain of names, so
# a row costs the bytes of its own name, not of its whole path (a path may have 48,000
# components), and a folder's key follows from its path without a query.
FOLDER, FILE = 0, 1
TOP_KEY = blake3(b"dittohead: the top folder of a study").digest(length=16)


def folder_key(parent: bytes, name: bytes) -> bytes:
    """The key of the folder ``name`` (its bytes) in the folder whose key is ``parent``."""
    return blake3(parent + name).digest(length=16)


def _tree_rows(study: str, seq: int, m: Manifest,
               made: dict[bytes, tuple[int, bytes]]) -> Iterable[tuple[str, int, bytes, bytes, int]]:
    """The tree rows of submission ``seq`` (its folders and files, in tree ``seq``), and those a
    path new to the study (its version 1 is in ``made``) adds to tree 0 (its folders and file),
    one at a time: nothing per entry is held. A folder the path shares with the path before it
    is in both trees already (tree 0 has the folders of every path the study ever received), and
    each other folder is given once per tree."""
    chain = FolderChain()
    in_sub: set[bytes] = set()  # keys of the folders given for tree ``seq``
    in_study: set[bytes] = set()  # and for tree 0
    for e in m.entries:
        path = to_bytes(e.path)
        parts = path.split(b"/")
        fresh = chain.descend(parts)
        keys = chain.keys
        grows = made.get(path, (0, b""))[0] == 1
        for i in range(fresh, len(parts)):
            if keys[i] not in in_sub:
                in_sub.add(keys[i])
                yield (study, seq, keys[i - 1], parts[i - 1], FOLDER)
            if grows and keys[i] not in in_study:
                in_study.add(keys[i])
                yield (study, 0, keys[i - 1], parts[i - 1], FOLDER)
        yield (study, seq, keys[-1], parts[-1], FILE)
        if grows:
            yield (study, 0, keys[-1], parts[-1], FILE)


class FolderChain:
    """The keys of the folders on a path, from the top down, kept from one path to the next so
    that a path shares the work of the one before (a manifest's paths come grouped by folder).
    After ``descend(parts)``, ``keys[i]`` is the key of the folder ``parts[:i]`` (``keys[0]`` the
    top, ``keys[-1]`` the folder that holds ``parts[-1]``)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.keys: list[bytes] = [TOP_KEY]

    def descend(self, parts: list[bytes]) -> int:
        """Move to the path ``parts``; returns the first i (from 1) whose folder ``parts[:i]``
        was not also a folder of the path before."""
        folders = len(parts) - 1
        common = 0
        limit = min(folders, len(self.parts))
        while common < limit and self.parts[common] == parts[common]:
            common += 1
        del self.parts[common:]
        del self.keys[common + 1:]
        for name in parts[common:folders]:
            self.keys.append(folder_key(self.keys[-1], name))
            self.parts.append(name)
        return common + 1



class Version(NamedTuple):  # a tuple: a listing makes one for each of 10,000 files
    study: str
    path: str
    n: int
    seq: int
    hash: bytes
    size: int
    mtime_ns: int
    mode: int
    chunks: bytes  # packed chunk list; see chunking.unpack_chunk_list
    ingested_ns: int
    site: str


@dataclass(frozen=True)
class Submission:
    study: str
    seq: int
    name: str
    manifest: bytes
    ingested_ns: int
    site: str
    user: str
    host: str
    created_ns: int
    files: int
    size: int
    new_versions: int
    new_chunk_bytes: int


@dataclass(frozen=True)
class Applied:
    files: int
    size: int
    new_versions: int
    new_chunk_bytes: int
    new_chunks: list[bytes]  # chunks the study did not hold before (its have-segment)


_VERSION_COLS = (
    "v.study, v.path, v.n, v.seq, v.hash, v.size, v.mtime_ns, v.mode, v.chunks, s.ingested_ns, s.site"
)
_VERSION_FROM = "versions v JOIN submissions s ON s.study = v.study AND s.seq = v.seq"


def _version(row: tuple) -> Version:
    return Version(row[0], from_bytes(row[1]), *row[2:])


def sqlite_uri(path: str, mode: str = "rwc") -> str:
    """An SQLite URI for ``path`` (``:memory:`` stays a private in-memory database) opened with
    ``mode``: ``rwc``, ``ro``, or ``immutable`` (read-only, with no locks and no -shm: only for a
    file no writer is using)."""
    if path == ":memory:":
        return "file::memory:"
    query = "immutable=1" if mode == "immutable" else f"mode={mode}"
    return f"file:{urllib.parse.quote(os.path.abspath(path))}?{query}"


def connect_readonly(path: str) -> sqlite3.Connection:
    """A read-only connection to the index file ``path``, for any account that may read it.

    With a writer at work (its -wal and -shm files there), it reads through them, as SQLite's
    readers do. With none, the account that owns the index opens it the same way (SQLite may
    leave its empty -wal and -shm files, the account's own, beside it); any other account must
    not make files there, the writer's to use later, and reads the file alone as the whole
    database (``immutable``: what the last writer left; docs/server-root.md). Raises
    sqlite3.Error as ``connect`` does."""
    if not os.path.exists(path + "-wal") and hasattr(os, "geteuid") and os.stat(path).st_uid != os.geteuid():
        return sqlite3.connect(sqlite_uri(path, "immutable"), uri=True, isolation_level=None,
                               check_same_thread=False)
    db = sqlite3.connect(sqlite_uri(path, "ro"), uri=True, isolation_level=None, timeout=60,
                         check_same_thread=False)
    try:
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        return db
    except sqlite3.OperationalError:  # no -shm could be made (a full disk, a read-only folder)
        db.close()
        with contextlib.suppress(FileNotFoundError):
            if os.path.getsize(path + "-wal"):  # a writer's log we cannot read without its -shm
                raise
    return sqlite3.connect(sqlite_uri(path, "immutable"), uri=True, isolation_level=None,
                           check_same_thread=False)


class Index:
    """The index file, opened by the ingest (``readonly`` False: the one writer, under the
    store's lock) or by a reader (``readonly``: nothing is ever written, not even the schema)."""

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        if readonly:
            self.db = connect_readonly(path)
            try:
                row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            except sqlite3.OperationalError as e:  # no meta table: empty, or not an index of ours
                raise sqlite3.DatabaseError(f"not an index: {e}") from e
            self.schema_ok = row is not None and row[0] == SCHEMA_VERSION
            return
        self.db = sqlite3.connect(sqlite_uri(path), uri=True, isolation_level=None, timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        self.schema_ok = row is None or row[0] == SCHEMA_VERSION

    def close(self) -> None:
        self.db.close()

    # -- chunks
    def chunk(self, cid: bytes) -> tuple[bytes, int, int] | None:
        return self.db.execute("SELECT pack, offset, length FROM chunks WHERE id=?", (cid,)).fetchone()

    def has_chunks(self, ids: Iterable[bytes]) -> set[bytes]:
        q = self.db.execute
        if not q("SELECT 1 FROM chunks LIMIT 1").fetchone():
            return set()  # an empty store: no look-up per chunk
        return {cid for cid in ids if q("SELECT 1 FROM chunks WHERE id=?", (cid,)).fetchone()}

    def study_holds(self, study: str, ids: Iterable[bytes]) -> dict[bytes, int]:
        """Of ``ids``, those the study holds, with their stored lengths."""
        q = self.db.execute
        out: dict[bytes, int] = {}
        if not q("SELECT 1 FROM study_chunks WHERE study=? LIMIT 1", (study,)).fetchone():
            return out  # the study's first submission: no look-up per chunk
        for cid in ids:
            row = q("SELECT c.length FROM study_chunks s JOIN chunks c ON c.id = s.id "
                    "WHERE s.study=? AND s.id=?", (study, cid)).fetchone()
            if row:
                out[cid] = row[0]
        return out

    def add_chunks(self, rows: Iterable[tuple[bytes, bytes, int, int]]) -> None:
        """(id, pack, offset, length) rows; the first location of a chunk is kept."""
        if self.db.in_transaction:
            self.db.executemany("INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?)", rows)
            return
        self.db.execute("BEGIN")
        try:
            self.db.executemany("INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?)", rows)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    # -- studies and history
    def last_seq(self, study: str) -> int:
        row = self.db.execute("SELECT last_seq FROM studies WHERE name=?", (study,)).fetchone()
        return row[0] if row else 0

    def latest(self, study: str, path: str) -> tuple[int, bytes] | None:
        """The latest version of ``path``: (n, hash)."""
        return self._latest(study, to_bytes(path))

    def _latest(self, study: str, key: bytes) -> tuple[int, bytes] | None:
        return self.db.execute(
            "SELECT n, hash FROM versions WHERE study=? AND path=? ORDER BY n DESC LIMIT 1", (study, key)
        ).fetchone()

    def apply(self, study: str, rec: LogRecord, m: Manifest,
              chunk_rows: Iterable[tuple[bytes, bytes, int, int]] = ()) -> Applied:
        """Apply one committed log record (in one transaction). Idempotent by seq.

        Rows go in as batches, once it is known what they are. What the study held before, and
        each path's latest version, are looked up row by row only if the study holds anything at
        all: its first submission (most of a fresh store, and of an index rebuilt from one) needs
        no lookups.
        """
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            if self.last_seq(study) >= rec.seq:
                db.execute("ROLLBACK")
                raise ValueError(f"index already holds {study} seq {rec.seq}")
            self.add_chunks(chunk_rows)
            held_any = db.execute("SELECT 1 FROM study_chunks WHERE study=? LIMIT 1", (study,)).fetchone()
            versioned = db.execute("SELECT 1 FROM versions WHERE study=? LIMIT 1", (study,)).fetchone()
            met: set[bytes] = set()  # chunks of this submission looked at
            made: dict[bytes, tuple[int, bytes]] = {}  # path -> the version this submission made of it
            versions: list[tuple] = []
            entries: list[tuple[str, int, bytes, int]] = []
            new_chunks: list[bytes] = []
            new_chunk_bytes = 0
            total = 0
            for e in m.entries:
                total += e.size
                for cid, length in e.chunks:
                    if cid in met:
                        continue
                    met.add(cid)
                    if held_any and db.execute("SELECT 1 FROM study_chunks WHERE study=? AND id=?",
                                               (study, cid)).fetchone():
                        continue
                    new_chunks.append(cid)
                    new_chunk_bytes += length
                path = to_bytes(e.path)
                latest = made.get(path) or (self._latest(study, path) if versioned else None)
                if latest is not None and latest[1] == e.hash:
                    n = latest[0]
                else:
                    n = 1 if latest is None else latest[0] + 1
                    versions.append((study, path, n, rec.seq, e.hash, e.size, e.mtime_ns, e.mode,
                                     pack_chunk_list(e.chunks)))
                    made[path] = (n, e.hash)
                entries.append((study, rec.seq, path, n))
            db.executemany("INSERT INTO study_chunks VALUES (?, ?, ?)", [(study, cid, rec.seq) for cid in new_chunks])
            db.executemany("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", versions)
            db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?)", entries)
            db.executemany("INSERT OR IGNORE INTO tree VALUES (?, ?, ?, ?, ?)",
                           _tree_rows(study, rec.seq, m, made))
            db.execute(
                "INSERT INTO submissions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (study, rec.seq, rec.submission, rec.manifest, rec.ingested_ns, m.site, m.user, m.host,
                 m.created_ns, len(m.entries), total, len(versions), new_chunk_bytes),
            )
            db.execute("INSERT OR REPLACE INTO studies VALUES (?, ?)", (study, rec.seq))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return Applied(len(m.entries), total, len(versions), new_chunk_bytes, new_chunks)

    def chunks_gained(self, study: str, seq: int) -> list[bytes]:
        """The chunks study first held with submission ``seq`` (its have-segment)."""
        return [r[0] for r in self.db.execute(
            "SELECT id FROM study_chunks WHERE study=? AND seq=? ORDER BY id", (study, seq))]

    def version_chunks(self, study: str, path: str, n: int) -> bytes | None:
        row = self.db.execute("SELECT chunks FROM versions WHERE study=? AND path=? AND n=?",
                              (study, to_bytes(path), n)).fetchone()
        return row[0] if row else None

    def studies(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM studies ORDER BY name")]

    def submissions(self, study: str) -> list[Submission]:
        return [Submission(*r) for r in self.db.execute(
            "SELECT * FROM submissions WHERE study=? ORDER BY seq", (study,))]

    def submission_named(self, study: str, name: str) -> Submission | None:
        r = self.db.execute("SELECT * FROM submissions INDEXED BY submissions_by_name WHERE study=? AND name=?",
                            (study, name)).fetchone()
        return Submission(*r) if r else None

    def versions(self, study: str, path: str) -> list[Version]:
        try:
            key = to_bytes(path)
        except UnicodeEncodeError:  # no path has such a name
            return []
        return [_version(r) for r in self.db.execute(
            f"SELECT {_VERSION_COLS} FROM {_VERSION_FROM} WHERE v.study=? AND v.path=? ORDER BY v.n",
            (study, key))]

    # -- the view's folders (the tree table; dittohead/view.py)
    def tree_kinds(self, study: str, seq: int, parent: bytes, name: bytes) -> set[int]:
        """What ``name`` is in the folder whose key is ``parent`` in tree ``seq`` (0: the study's;
        N: submission N's): {FOLDER}, {FILE}, both, or nothing."""
        return {r[0] for r in self.db.execute(
            "SELECT kind FROM tree WHERE study=? AND seq=? AND parent=? AND name=?", (study, seq, parent, name))}

    def tree_names(self, study: str, seq: int, parent: bytes) -> list[tuple[bytes, int]]:
        """The names in the folder whose key is ``parent`` in tree ``seq``: (name, kind), sorted."""
        return self.db.execute("SELECT name, kind FROM tree WHERE study=? AND seq=? AND parent=? "
                               "ORDER BY name, kind", (study, seq, parent)).fetchall()

    def tree_list(self, study: str, seq: int, parent: bytes, prefix: bytes) -> list[tuple[bytes, int, Version | None]]:
        """The names in the folder whose key is ``parent`` and whose path is ``prefix`` (with its
        trailing ``/``; empty for the top), in tree ``seq``: (name, kind, version), sorted by name
        and kind, where a file's version is its latest (tree 0) or the one submission ``seq``
        brought (tree N), and a folder's is None. One query: a range of the tree's key, and for
        each file a look-up by its path (a file's path is the folder's, ``prefix``, and its name:
        concatenated in SQL as bytes, which ``CAST(... AS BLOB)`` keeps exactly)."""
        if seq == 0:
            join = ("LEFT JOIN versions v ON t.kind = 1 AND v.study = t.study AND v.path = CAST(?4 || t.name AS BLOB) "
                    "AND v.n = (SELECT max(x.n) FROM versions x WHERE x.study = t.study "
                    "AND x.path = CAST(?4 || t.name AS BLOB))")
        else:
            join = ("LEFT JOIN entries e ON t.kind = 1 AND e.study = t.study AND e.seq = t.seq "
                    "AND e.path = CAST(?4 || t.name AS BLOB) "
                    "LEFT JOIN versions v ON v.study = e.study AND v.path = e.path AND v.n = e.n")
        rows = self.db.execute(
            f"SELECT t.name, t.kind, {_VERSION_COLS} FROM tree t {join} "
            "LEFT JOIN submissions s ON s.study = v.study AND s.seq = v.seq "
            "WHERE t.study = ?1 AND t.seq = ?2 AND t.parent = ?3 ORDER BY t.name, t.kind",
            (study, seq, parent, prefix))
        return [(r[0], r[1], None if r[2] is None else _version(r[2:])) for r in rows]

    def latest_version(self, study: str, path: str) -> Version | None:
        r = self.db.execute(f"SELECT {_VERSION_COLS} FROM {_VERSION_FROM} WHERE v.study=? AND v.path=? "
                            "ORDER BY v.n DESC LIMIT 1", (study, to_bytes(path))).fetchone()
        return _version(r) if r else None

    def version(self, study: str, path: str, n: int) -> Version | None:
        r = self.db.execute(f"SELECT {_VERSION_COLS} FROM {_VERSION_FROM} WHERE v.study=? AND v.path=? AND v.n=?",
                            (study, to_bytes(path), n)).fetchone()
        return _version(r) if r else None

    def entry_version(self, study: str, seq: int, path: str) -> Version | None:
        """The version of ``path`` that submission ``seq`` carried, if it carried ``path``."""
        r = self.db.execute(f"SELECT {_VERSION_COLS} FROM entries e "
                            "JOIN versions v ON v.study = e.study AND v.path = e.path AND v.n = e.n "
                            "JOIN submissions s ON s.study = v.study AND s.seq = v.seq "
                            "WHERE e.study=? AND e.seq=? AND e.path=?", (study, seq, to_bytes(path))).fetchone()
        return _version(r) if r else None

    def versions_brought(self, study: str, after: int, upto: int) -> Iterator[Version]:
        """The versions that submissions ``after`` + 1 to ``upto`` made, in the order they made
        them (by seq, then path), one at a time: a range of the entries' key, never the study's
        whole history."""
        for r in self.db.execute(
                f"SELECT {_VERSION_COLS} FROM entries e "
                "JOIN versions v ON v.study = e.study AND v.path = e.path AND v.n = e.n "
                "JOIN submissions s ON s.study = v.study AND s.seq = v.seq "
                "WHERE e.study = ? AND e.seq > ? AND e.seq <= ? AND v.seq = e.seq ORDER BY e.seq, e.path",
                (study, after, upto)):
            yield _version(r)

    def paths_changed(self, study: str, after: int, upto: int) -> Iterator[tuple[str, int]]:
        """(path, n) for each path that submissions ``after`` + 1 to ``upto`` carried, with the
        last version of it they brought or carried, sorted by path, one at a time."""
        for path, n in self.db.execute(
                "SELECT path, max(n) FROM entries WHERE study = ? AND seq > ? AND seq <= ? "
                "GROUP BY path ORDER BY path", (study, after, upto)):
            yield from_bytes(path), n

    def submission(self, study: str, seq: int) -> Submission | None:
        r = self.db.execute("SELECT * FROM submissions WHERE study=? AND seq=?", (study, seq)).fetchone()
        return Submission(*r) if r else None

    def latest_ingest(self, study: str) -> tuple[int, int]:
        """(last seq, its ingest time in ns) of the study; (0, 0) before its first submission."""
        r = self.db.execute("SELECT s.seq, s.ingested_ns FROM studies t JOIN submissions s "
                            "ON s.study = t.name AND s.seq = t.last_seq WHERE t.name=?", (study,)).fetchone()
        return (r[0], r[1]) if r else (0, 0)

    @classmethod
    def latest_ingests(cls, path: str, studies: Iterable[str]) -> dict[str, tuple[int, int]]:
        """``latest_ingest`` of each of ``studies``, read from the index file at ``path`` as a
        reader does (read-only: nothing is made or written), for those that only look (the
        daemon's state, ``status``). No index there yet is a server where nothing was ingested,
        not an error: every study is (0, 0). An index that cannot be read, or one of another
        schema (an earlier dittohead's, until the next ingest rebuilds it), raises sqlite3.Error
        (OSError where the file cannot be opened at all)."""
        studies = list(studies)
        if not os.path.exists(path):
            return dict.fromkeys(studies, (0, 0))
        idx = cls(path, readonly=True)
        try:
            if not idx.schema_ok:
                raise sqlite3.DatabaseError("an index of another dittohead version (the next ingest rebuilds it)")
            return {s: idx.latest_ingest(s) for s in studies}
        finally:
            idx.close()

    def dump(self) -> dict[str, list[tuple]]:
        """Every derived row, for comparing this index with a rebuilt one."""
        return {table: list(self.db.execute(f"SELECT {cols} FROM {table} ORDER BY {order}"))
                for table, cols, order in _DERIVED}

    def differs_from(self, path: str) -> list[str]:
        """The tables whose dump() differs from that of the index file at ``path``, sorted.

        Compared inside SQLite, with the file attached to this connection, instead of making a
        Python tuple of every row on both sides. Every table's rows are unique (a primary key), so
        equal counts and nothing of this side missing from the other means equal dumps. Raises
        sqlite3.DatabaseError as dump() would on a damaged file.
        """
        q = self.db.execute
        try:
            q("ATTACH DATABASE ? AS other", (sqlite_uri(path, "ro"),))
            q("SELECT 1 FROM other.sqlite_master LIMIT 1").fetchall()
        except sqlite3.OperationalError:  # as connect_readonly: no writer, and no -shm we may make
            with contextlib.suppress(sqlite3.OperationalError):
                q("DETACH DATABASE other")
            with contextlib.suppress(FileNotFoundError):
                if os.path.getsize(path + "-wal"):
                    raise
            q("ATTACH DATABASE ? AS other", (sqlite_uri(path, "immutable"),))
        try:
            out = []
            for table, cols, _ in _DERIVED:
                n = q(f"SELECT count(*) FROM main.{table}").fetchone()[0]
                if n != q(f"SELECT count(*) FROM other.{table}").fetchone()[0]:
                    out.append(table)
                elif n and cols == "*" and (len(q(f"SELECT * FROM main.{table} LIMIT 0").description)
                                            != len(q(f"SELECT * FROM other.{table} LIMIT 0").description)):
                    out.append(table)  # rows of another shape never equal these
                elif n and q(f"SELECT 1 FROM (SELECT {cols} FROM main.{table} EXCEPT "
                             f"SELECT {cols} FROM other.{table}) LIMIT 1").fetchone():
                    out.append(table)
            return sorted(out)
        finally:
            q("DETACH DATABASE other")


# What dump() and differs_from() compare: (table, columns, order by).
_DERIVED = [("studies", "*", "name"), ("study_chunks", "*", "study, id"), ("submissions", "*", "study, seq"),
            ("versions", "*", "study, path, n"), ("entries", "*", "study, seq, path"),
            ("tree", "*", "study, seq, parent, name, kind"),
            ("chunks", "id, length", "id")]
DERIVED_TABLES = [table for table, _, _ in _DERIVED]
