"""The SSH sign-in's parts that need no server: addresses, fingerprints, the host-key policy,
key files. (Everything with a server: test_sftp_*.py, against a real sshd.)"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
from pathlib import Path

import paramiko
import pytest
from click.testing import CliRunner

from dittohead.cli import cli
from dittohead.client import ssh
from dittohead.errors import TransportError, UsageError


class Answers:
    """Prompts with fixed answers, recording what was asked."""

    def __init__(self, secrets: list[str | None] | None = None, confirm: bool | None = None) -> None:
        self.secrets = list(secrets or [])
        self.answer = confirm
        self.asked: list[str] = []

    def secret(self, prompt: str) -> str | None:
        self.asked.append(prompt)
        return self.secrets.pop(0) if self.secrets else None

    def confirm(self, text: str) -> bool | None:
        self.asked.append(text)
        return self.answer


@pytest.mark.parametrize(("url", "want"), [
    ("sftp://ra1@lab.example.org/srv/dittohead", ssh.Address("lab.example.org", None, "ra1", "/srv/dittohead")),
    ("sftp://lab.example.org:2222/srv", ssh.Address("lab.example.org", 2222, None, "/srv")),
    ("sftp://ra%40x@[::1]:22/", ssh.Address("::1", 22, "ra@x", "/")),
    ("sftp://h", ssh.Address("h", None, None, "/")),
    ("sftp://u@h/~/drop", ssh.Address("h", None, "u", "drop")),
    ("sftp://u@h/~", ssh.Address("h", None, "u", ".")),
    ("sftp://u@h/a%20b", ssh.Address("h", None, "u", "/a b")),
])
def test_parse_url(url: str, want: ssh.Address) -> None:
    assert ssh.parse_url(url) == want


@pytest.mark.parametrize(("url", "why"), [
    ("sftp://u:secret@h/x", "password in the address"),
    ("sftp:///x", "no host"),
    ("sftp://h:99999/x", "port"),
    ("sftp://h:0/x", "port"),
    ("sftp://h:abc/x", "port"),
    ("sftp://h/x?y=1", "query"),
    ("sftp://h/x%00y", "NUL"),
])
def test_parse_url_refuses(url: str, why: str) -> None:
    with pytest.raises(UsageError, match=why):
        ssh.parse_url(url)


def test_password_in_the_address_is_not_echoed() -> None:
    with pytest.raises(UsageError) as e:
        ssh.parse_url("sftp://u:hunter2@h/x")
    assert "hunter2" not in str(e.value)


def test_parse_jump() -> None:
    assert ssh.parse_jump("gw") == [ssh.Address("gw")]
    assert ssh.parse_jump("me@gw:2200,you@inner") == [ssh.Address("gw", 2200, "me"), ssh.Address("inner", None, "you")]
    for bad in ("", "gw,", "u:pw@gw", "gw/path"):
        with pytest.raises(UsageError):
            ssh.parse_jump(bad)


def _host_key(tmp_path: Path, name: str = "hk") -> paramiko.PKey:
    path = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return paramiko.PKey.from_path(str(path))


@pytest.fixture(autouse=True)
def _need_ssh_keygen() -> None:
    import shutil

    if shutil.which("ssh-keygen") is None:
        pytest.skip("needs ssh-keygen (Debian's openssh-client; make test installs it as root)")


def test_fingerprint_is_what_ssh_keygen_prints(tmp_path: Path) -> None:
    key = _host_key(tmp_path)
    out = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "hk.pub")], capture_output=True, text=True, check=True).stdout
    assert ssh.fingerprint(key) == out.split()[1]
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    assert ssh.fingerprint(key) == "SHA256:" + digest


def test_host_key_name() -> None:
    assert ssh.host_key_name("h", 22) == "h"
    assert ssh.host_key_name("127.0.0.1", 2222) == "[127.0.0.1]:2222"


def test_unknown_key_without_terminal_is_refused_with_the_fingerprint(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DITTOHEAD_STATE_DIR", str(tmp_path / "state"))
    key = _host_key(tmp_path)
    policy = ssh.HostKeyPolicy([ssh.own_known_hosts()], ssh.NoPrompts())
    with pytest.raises(TransportError) as e:
        policy.check("[h]:2222", key, "h:2222")
    msg = str(e.value)
    assert ssh.fingerprint(key) in msg and "dittohead trust-host h:2222" in msg and "\n" not in msg
    assert not os.path.exists(ssh.own_known_hosts())  # nothing recorded


def test_unknown_key_declined_on_a_terminal_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DITTOHEAD_STATE_DIR", str(tmp_path / "state"))
    key = _host_key(tmp_path)
    prompts = Answers(confirm=False)
    with pytest.raises(TransportError, match="not trusted"):
        ssh.HostKeyPolicy([ssh.own_known_hosts()], prompts).check("h", key, "h")
    assert ssh.fingerprint(key) in prompts.asked[0]
    assert not os.path.exists(ssh.own_known_hosts())


def test_unknown_key_accepted_on_a_terminal_is_recorded_and_then_known(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DITTOHEAD_STATE_DIR", str(tmp_path / "state"))
    key = _host_key(tmp_path)
    ssh.HostKeyPolicy([ssh.own_known_hosts()], Answers(confirm=True)).check("[h]:2222", key, "h:2222")
    assert oct(os.stat(ssh.own_known_hosts()).st_mode & 0o777) == "0o600"
    # Known now: no question asked, whoever asks.
    ssh.HostKeyPolicy([ssh.own_known_hosts()], ssh.NoPrompts()).check("[h]:2222", key, "h:2222")
    # The same key under another port is another host.
    with pytest.raises(TransportError, match="unknown host key"):
        ssh.HostKeyPolicy([ssh.own_known_hosts()], ssh.NoPrompts()).check("[h]:2223", key, "h:2223")


def test_changed_key_is_refused_loudly_even_if_the_user_would_say_yes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DITTOHEAD_STATE_DIR", str(tmp_path / "state"))
    old, new = _host_key(tmp_path, "old"), _host_key(tmp_path, "new")
    known = tmp_path / "known_hosts"  # the user's ~/.ssh/known_hosts, say
    known.write_text(f"lab.example.org {old.get_name()} {old.get_base64()}\n")
    prompts = Answers(confirm=True)
    with pytest.raises(TransportError, match="CHANGED") as e:
        ssh.HostKeyPolicy([str(known), ssh.own_known_hosts()], prompts).check("lab.example.org", new, "lab.example.org")
    assert ssh.fingerprint(new) in str(e.value)
    assert prompts.asked == []
    assert not os.path.exists(ssh.own_known_hosts())


def test_hashed_known_hosts_entries_are_found(tmp_path: Path) -> None:
    key = _host_key(tmp_path)
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:2222 {key.get_name()} {key.get_base64()}\n")
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(known)], check=True, capture_output=True)
    assert "127.0.0.1" not in known.read_text()
    ssh.HostKeyPolicy([str(known)], ssh.NoPrompts()).check("[127.0.0.1]:2222", key, "127.0.0.1:2222")


def test_unreadable_known_hosts_lines_are_skipped(tmp_path: Path, caplog) -> None:
    key = _host_key(tmp_path)
    known = tmp_path / "known_hosts"
    known.write_text(f"h ssh-ed25519 not-base64!!\nnonsense\n\n# comment\nh {key.get_name()} {key.get_base64()}\n")
    ssh.HostKeyPolicy([str(known)], ssh.NoPrompts()).check("h", key, "h")
    assert f"{known}:1: not a known_hosts line" in caplog.text and f"{known}:2:" in caplog.text


def _key_file(tmp_path: Path, passphrase: str) -> str:
    path = tmp_path / ("enc" if passphrase else "plain")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", str(path)], check=True)
    return str(path)


def test_encrypted_key_asks_for_its_passphrase(tmp_path: Path) -> None:
    path = _key_file(tmp_path, "correct horse")
    prompts = Answers(secrets=["wrong", "correct horse"])
    key = ssh._load_key(path, prompts, explicit=True)
    assert key is not None and key.get_name() == "ssh-ed25519"
    assert prompts.asked == [f"passphrase for {path}: "] * 2


def test_encrypted_key_without_terminal(tmp_path: Path) -> None:
    path = _key_file(tmp_path, "correct horse")
    with pytest.raises(UsageError, match="no terminal") as e:
        ssh._load_key(path, ssh.NoPrompts(), explicit=True)
    assert "ssh-agent" in str(e.value)
    assert ssh._load_key(path, ssh.NoPrompts(), explicit=False) is None  # a default key: skipped


def test_wrong_passphrase_three_times(tmp_path: Path) -> None:
    path = _key_file(tmp_path, "correct horse")
    with pytest.raises(UsageError, match="wrong passphrase") as e:
        ssh._load_key(path, Answers(secrets=["a", "b", "c"]), explicit=True)
    assert "correct horse" not in str(e.value)


def test_missing_or_bad_key_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such key file"):
        ssh._load_key(str(tmp_path / "nope"), ssh.NoPrompts(), explicit=True)
    (tmp_path / "junk").write_text("not a key\n")
    with pytest.raises(UsageError, match="not a private key"):
        ssh._load_key(str(tmp_path / "junk"), ssh.NoPrompts(), explicit=True)
    assert ssh._load_key(str(tmp_path / "junk"), ssh.NoPrompts(), explicit=False) is None


def test_ssh_config_gives_host_port_user_identity_and_jump(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text(
        "Host lab\n  HostName 10.1.2.3\n  Port 2222\n  User ra1\n  IdentityFile ~/.ssh/lab_key\n"
        "  ProxyJump gate@gw.example.org:2200\n")
    r = ssh.resolve(ssh.parse_url("sftp://lab/srv"))
    assert (r.host, r.port, r.user) == ("10.1.2.3", 2222, "ra1")
    assert r.identities == (str(tmp_path / ".ssh" / "lab_key"),) and r.explicit_identity
    assert r.jump == (ssh.Address("gw.example.org", 2200, "gate"),)
    # What the command line says wins.
    r = ssh.resolve(ssh.parse_url("sftp://me@lab:22/srv"), identity="k", jump=[])
    assert (r.port, r.user, r.identities, r.jump) == (22, "me", ("k",), ())


@pytest.mark.parametrize("args", [
    ["--identity", "k"], ["--password-stdin"], ["--jump", "gw"],
])
def test_ssh_options_only_for_sftp(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "src").mkdir()
    r = CliRunner().invoke(cli, ["sync", str(tmp_path / "src"), "--study", "foo", "--to", str(tmp_path), *args])
    assert r.exit_code == 2, r.output
    assert "only for sftp://" in r.output


def test_password_stdin_empty_is_refused(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    r = CliRunner().invoke(cli, ["sync", str(tmp_path / "src"), "--study", "foo", "--to",
                                 "sftp://u@127.0.0.1:1/x", "--password-stdin"], input="")
    assert r.exit_code == 2 and "gave no password" in r.output
