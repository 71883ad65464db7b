"""One exit code for "no such study" and one for "already exists", whichever command meets it
(docs/exit-codes.md), checked as a user sees it: real ``python -m dittohead`` processes."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from conftest import Server, describe, write_file

from dittohead import errors
from dittohead.cli import cli


def _one_line(cp, code: int) -> str:
    assert cp.returncode == code, describe(cp)
    assert "Traceback" not in cp.stderr and len(cp.stderr.strip().splitlines()) == 1, describe(cp)
    return cp.stderr.strip()


def _commands_taking_a_study() -> list[str]:
    ctx = click.Context(cli)
    out = []
    for name in cli.list_commands(ctx):
        cmd = cli.get_command(ctx, name)
        if cmd is not None and any(isinstance(p, click.Option) and "--study" in p.opts for p in cmd.params):
            out.append(name)
    return out


def _argv(name: str, server: Server, tmp: Path) -> list[object]:
    """The command with --study nosuch and a plausible value for each argument it requires."""
    cmd = cli.get_command(click.Context(cli), name)
    assert cmd is not None
    src = tmp / "src"
    write_file(src / "a.txt", b"alpha\n")
    values = {"path": "a.txt", "dest": tmp / "out", "source": src, "mountpoint": tmp / "mnt"}
    (tmp / "mnt").mkdir(exist_ok=True)
    args: list[object] = [name]
    for p in cmd.params:
        if isinstance(p, click.Argument) and p.required:
            assert p.name in values, f"{name}: give the test a value for argument {p.name!r}"
            args.append(values[p.name])
    if name == "sync":
        return [*args, "--study", "nosuch", "--to", server.root]
    return [*args, "--store", server.root, "--study", "nosuch"]


def test_every_command_that_takes_a_study_covers_the_contract() -> None:
    assert {"log", "versions", "cat", "export", "sync"} <= set(_commands_taking_a_study())


@pytest.mark.parametrize("name", _commands_taking_a_study())
def test_no_such_study_is_one_code(server: Server, tmp_path: Path, name: str) -> None:
    message = _one_line(server.proc(*_argv(name, server, tmp_path)), errors.EXIT_NO_STUDY)
    assert "no study 'nosuch'" in message, message
    assert not (tmp_path / "out").exists()  # export made nothing for a study that is not there


def test_a_missing_path_or_version_is_not_a_missing_study(server: Server, tmp_path: Path) -> None:
    write_file(tmp_path / "src" / "a.txt", b"alpha\n")
    server.sync(tmp_path / "src")
    server.ingest()
    for args in (["cat", "b.txt"], ["versions", "b.txt"], ["cat", "a.txt", "--version", "2"]):
        cp = server.proc(*args, "--store", server.root, "--study", "s")
        _one_line(cp, errors.EXIT_FAILURE)


def test_init_on_a_server_root_exits_exists_and_changes_nothing(server: Server) -> None:
    config = (server.root / "store" / "config").read_bytes()
    message = _one_line(server.proc("init", "--store", server.root), errors.EXIT_EXISTS)
    assert "already a dittohead server root" in message
    assert (server.root / "store" / "config").read_bytes() == config


def test_init_into_a_folder_holding_something_else_is_a_usage_error(tmp_path: Path) -> None:
    server = Server(tmp_path)
    write_file(server.root / "notes.txt", b"mine\n")
    message = _one_line(server.proc("init", "--store", server.root), errors.EXIT_USAGE)
    assert "not empty" in message
    assert sorted(p.name for p in server.root.iterdir()) == ["notes.txt"]


def test_study_add_of_an_existing_study_exits_exists_and_changes_nothing(server: Server) -> None:
    settings = server.root / "store" / "studies" / "s.json"
    before = settings.read_bytes()
    cp = server.proc("study", "add", "s", "--store", server.root, "--notify", "x@example.org")
    message = _one_line(cp, errors.EXIT_EXISTS)
    assert "'s' exists already" in message
    assert settings.read_bytes() == before


def test_the_codes_are_distinct_and_documented() -> None:
    codes = [v for k, v in vars(errors).items() if k.startswith("EXIT_")]
    assert len(codes) == len(set(codes))
    table = (Path(__file__).parent.parent / "docs" / "exit-codes.md").read_text()
    for code in codes:
        assert f"\n| {code} |" in table, code
