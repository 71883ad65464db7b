"""What a terminal or a log is shown of a name a client chose: printable, and reversible."""

from __future__ import annotations

import os
import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from dittohead.display import escape, unescape


@given(st.binary(max_size=64))
def test_any_name_bytes_escape_to_printable_text_and_back(raw: bytes) -> None:
    shown = escape(raw)
    assert shown.isprintable()
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in shown)
    assert unescape(shown) == raw


@given(st.text(max_size=32))
def test_any_text_escapes_to_printable_text_and_back(text: str) -> None:
    shown = escape(text)
    assert shown.isprintable()
    assert unescape(shown) == text.encode("utf-8", "surrogatepass")


def test_what_a_terminal_must_not_get_raw() -> None:
    assert escape("lab\u202eevil") == "lab\\u202eevil"  # a bidi override
    assert escape("a\x1b[31mb") == "a\\u001b[31mb"  # a terminal escape
    assert escape("x\u0085y") == "x\\u0085y"  # C1 (NEL)
    assert escape(b"caf\xe9") == "caf\\xe9"  # Latin-1, not UTF-8
    assert escape("back\\slash") == "back\\\\slash"
    assert escape("plain-name_01.txt") == "plain-name_01.txt"
    assert escape("Übung ñ 日本") == "Übung ñ 日本"  # printable text stays as it is


def test_log_shows_a_site_with_a_bidi_override_escaped(server, sync, ingest, run, tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"a\n")
    sync(src, site="lab\u202e\u0085x")
    ingest()
    out = run("log", "--store", server.root, "--study", server.study).stdout
    assert "\u202e" not in out and "\u0085" not in out
    assert "lab\\u202e\\u0085x" in out


def test_a_path_is_taken_as_stored_or_as_printed_and_after_dashdash(server, sync, ingest, run, tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    odd = "report\u202etxt.exe"  # a bidi override: stored as it is, printed escaped
    (src / odd).write_bytes(b"odd\n")
    (src / "-dash.txt").write_bytes(b"dash\n")
    sync(src)
    ingest()
    for typed in (odd, escape(odd)):
        res = run("cat", "--store", server.root, "--study", server.study, typed)
        assert res.exit_code == 0 and res.stdout_bytes == b"odd\n", (typed, res.output)
        res = run("versions", "--store", server.root, "--study", server.study, typed, "--json")
        assert res.exit_code == 0 and '"path": "report\\u202etxt.exe"' in res.stdout, res.output
    res = run("cat", "--store", server.root, "--study", server.study, "--", "-dash.txt")
    assert res.exit_code == 0 and res.stdout_bytes == b"dash\n", res.output
    res = run("cat", "--store", server.root, "--study", server.study, "no\u202eth")
    assert res.exit_code == 1 and "no file 'no\\u202eth'" in res.output and "\u202e" not in res.output


def test_a_path_that_names_two_files_takes_the_one_typed_and_says_so(server, ingest, run, tmp_path) -> None:
    """A file literally named 'a\\xfc.txt' (a backslash, then x, f, c) beside the Latin-1 file
    b'a\\xfc.txt', which dittohead prints as 'a\\xfc.txt': typed that way, the argument is the
    first one's name, which is taken (a script that passes names as they are gets its file), and
    stderr names the other; each can be named without doubt."""
    from test_export import _commit_by_hand

    literal, latin = b"a\\xfc.txt", b"a\xfc.txt"
    _commit_by_hand(server, {literal: b"literal\n", latin: b"latin-1\n"})
    ingest()
    res = run("cat", "--store", server.root, "--study", server.study, "a\\xfc.txt")
    assert res.exit_code == 0 and res.stdout_bytes == b"literal\n", res.output
    assert "note: 'a\\\\xfc.txt' is also how dittohead prints the file 'a\\xfc.txt'" in res.stderr, res.stderr
    res = run("cat", "--store", server.root, "--study", server.study, "a\\\\xfc.txt")  # the literal one, as printed
    assert res.exit_code == 0 and res.stdout_bytes == b"literal\n" and "note" not in res.stderr, res.output
    res = run("cat", "--store", server.root, "--study", server.study, os.fsdecode(latin))  # by its bytes
    assert res.exit_code == 0 and res.stdout_bytes == b"latin-1\n" and "note" not in res.stderr, res.output
