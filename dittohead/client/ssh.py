"""Signing in to an SSH server, for sftp:// destinations and ``trust-host``.

The address: ``sftp://[user@]host[:port]/path``; the user's ``~/.ssh/config`` may give the host's
real name, port, user, identity files and ``ProxyJump``, as it does for ``ssh``.

The host key is checked against the user's ``~/.ssh/known_hosts``, the system's
``/etc/ssh/ssh_known_hosts`` and dittohead's own file (``known_hosts`` in the client's state
folder, where ``trust-host`` and a "yes" at the prompt record keys). A key that differs from the
one recorded is refused, loudly. An unknown key is shown (its SHA256 fingerprint, as ``ssh``
shows it) and asked about on a terminal; without one it is refused, with the command that trusts
it. It is never accepted silently.

Signing in tries, in order: the keys of an ssh-agent (Pageant on Windows), the identity files
(``--identity``, else ``IdentityFile`` from ``~/.ssh/config``, else the usual
``~/.ssh/id_ed25519``, ``id_ecdsa``, ``id_rsa``; an encrypted one asks for its passphrase on a
terminal), then a password (asked on a terminal, or read once from standard input with
``--password-stdin``). A password is held only for the call that sends it: never in argv, the
environment, a log, a file or an error message.

Every network step has a timeout: connecting, the key exchange, signing in, and each SFTP
request (``Session.timeout``); keepalives go every ``KEEPALIVE`` seconds. A link that dies ends
the run with a ``TransportError`` within that time.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote, urlsplit

import paramiko

from dittohead.errors import TransportError, UsageError

log = logging.getLogger("dittohead.ssh")

DEFAULT_PORT = 22
DEFAULT_TIMEOUT = 30.0  # seconds: --timeout's default
KEEPALIVE = 10  # seconds between keepalive messages on an idle link
PASSWORD_TRIES = 3  # on a terminal; a password from standard input is tried once
DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")
KNOWN_HOSTS_NAME = "known_hosts"  # dittohead's own, in the client's state folder
SYSTEM_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
# AES-GCM first: one pass through OpenSSL for cipher and MAC (paramiko's default puts it last).
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")



class Prompts(Protocol):
    """How the library asks the person at the keyboard; each returns None where nobody can be
    asked (no terminal)."""

    def secret(self, prompt: str) -> str | None: ...
    def confirm(self, text: str) -> bool | None: ...


class NoPrompts:
    """Nobody to ask (scripts, tests)."""

    def secret(self, prompt: str) -> str | None:
        return None

    def confirm(self, text: str) -> bool | None:
        return None


@dataclass(frozen=True)
class Address:
    """Where to sign in: ``user`` None means "from ~/.ssh/config, else this computer's user";
    ``port`` None means "from ~/.ssh/config, else 22"."""

    host: str
    port: int | None = None
    user: str | None = None
    path: str = "/"


def parse_url(dest: str) -> Address:
    """``sftp://[user@]host[:port]/path`` (a path starting ``/~/`` is relative to the account's
    home). A password in the address is refused: it would show in the process list."""
    u = urlsplit(dest)
    if u.scheme != "sftp":
        raise UsageError(f"{dest!r}: not an sftp:// address")
    if u.password is not None:
        raise UsageError("a password in the address would show in the process list: leave it out; "
                         "dittohead asks for it (or reads it with --password-stdin)")
    if u.query or u.fragment:
        raise UsageError(f"{dest!r}: an sftp:// address has no ?query or #fragment")
    addr = _host_port(u, dest)
    path = unquote(u.path) or "/"
    if path == "/~" or path.startswith("/~/"):
        path = path[3:] or "."
    if "\0" in path:
        raise UsageError(f"{dest!r}: a NUL in the path")
    return Address(addr.host, addr.port, addr.user, path)


def parse_jump(spec: str) -> list[Address]:
    """``[user@]host[:port]``, or several of them separated by commas (hops in order), as
    OpenSSH's ``-J`` and ``ProxyJump`` take them."""
    hops = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise UsageError(f"--jump {spec!r}: an empty hop")
        if "://" in part:
            part = part.split("://", 1)[1]
        u = urlsplit("ssh://" + part)
        if u.password is not None or u.path not in ("", "/"):
            raise UsageError(f"--jump {part!r}: give [user@]host[:port]")
        hops.append(_host_port(u, part))
    return hops


def _host_port(u, shown: str) -> Address:
    if not u.hostname:
        raise UsageError(f"{shown!r}: no host (sftp://user@host[:port]/path/to/root)")
    try:
        port = u.port
    except ValueError:
        raise UsageError(f"{shown!r}: the port is not a number from 1 to 65535") from None
    if port == 0:
        raise UsageError(f"{shown!r}: the port is not a number from 1 to 65535")
    return Address(u.hostname, port, unquote(u.username) if u.username else None)


def fingerprint(key: paramiko.PKey) -> str:
    """A host key's fingerprint as OpenSSH shows it: ``SHA256:`` and unpadded base64."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def host_key_name(host: str, port: int) -> str:
    """The name a host's key goes under in known_hosts."""
    return host if port == DEFAULT_PORT else f"[{host}]:{port}"


def own_known_hosts() -> str:
    from dittohead.client.cache import state_dir

    return os.path.join(state_dir(), KNOWN_HOSTS_NAME)


def _known_host_files(config: dict) -> list[str]:
    files = [os.path.expanduser(p) for p in (config.get("userknownhostsfile") or "~/.ssh/known_hosts").split()]
    return [*files, SYSTEM_KNOWN_HOSTS, own_known_hosts()]


def _load_host_keys(files: list[str]) -> paramiko.HostKeys:
    """The keys of these known_hosts files; a line that cannot be read is skipped (as ssh does),
    with a warning."""
    keys = paramiko.HostKeys()
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.readlines()
        except FileNotFoundError:
            continue
        except OSError as e:
            log.warning("%s: cannot read it: %s", path, e.strerror)
            continue
        for lineno, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                entry = paramiko.hostkeys.HostKeyEntry.from_line(line, lineno)
            except (paramiko.SSHException, paramiko.hostkeys.InvalidHostKey, ValueError):
                entry = None
            if entry is None or entry.key is None:
                log.warning("%s:%d: not a known_hosts line dittohead can read; skipped", path, lineno)
                continue
            for name in entry.hostnames:
                keys.add(name, entry.key.get_name(), entry.key)
    return keys


def record_host_key(name: str, key: paramiko.PKey, path: str | None = None) -> str:
    """Append ``name``'s key to dittohead's own known_hosts (made 0600); returns the file."""
    path = path or own_known_hosts()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="ascii") as f:
        f.write(f"{name} {key.get_name()} {key.get_base64()}\n")
    return path


def forget_host_key(name: str, path: str | None = None) -> None:
    """Remove every key of ``name`` from dittohead's own known_hosts (``trust-host --replace``)."""
    path = path or own_known_hosts()
    if not os.path.isfile(path):
        return
    keys = paramiko.HostKeys(path)
    if name in keys:
        del keys[name]
        tmp = path + ".tmp"
        keys.save(tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)


class HostKeyPolicy:
    """What to do with the key a server shows (see the module's docstring)."""

    def __init__(self, files: list[str], prompts: Prompts, *, record: bool = True) -> None:
        self.files = files
        self.keys = _load_host_keys(files)
        self.prompts = prompts
        self.record = record

    def known_types(self, name: str) -> list[str]:
        entry = self.keys.lookup(name)
        return list(entry.keys()) if entry else []

    def check(self, name: str, key: paramiko.PKey, shown: str) -> None:
        known = self.keys.lookup(name) or {}
        fp = fingerprint(key)
        same_type = known.get(key.get_name())
        if same_type is not None:
            if same_type.asbytes() == key.asbytes():
                return
            raise TransportError(
                f"the host key of {shown} has CHANGED (it now shows {key.get_name()} {fp}): someone "
                "may be intercepting the connection, or the server was set up again. Nothing was "
                "sent. Ask the server's admin; if they confirm the new key, run "
                f"'dittohead trust-host --replace {shown}' (and remove the old line from "
                "~/.ssh/known_hosts if it is there)")
        other = f" (known with another key type: {', '.join(known)})" if known else ""
        answer = self.prompts.confirm(
            f"The server {shown} is not known yet{other}.\n"
            f"Its {key.get_name()} key's fingerprint is {fp}.\n"
            "Compare it with the fingerprint your server's admin gave you. Trust this key and go on?")
        if not answer:
            why = "not trusted" if answer is False else "no terminal to ask"
            raise TransportError(
                f"unknown host key for {shown}: {key.get_name()} {fp} ({why}); nothing was sent. "
                f"If the server's admin confirms that fingerprint, run: dittohead trust-host {shown}")
        if self.record:
            record_host_key(name, key)
            self.keys.add(name, key.get_name(), key)


def _ssh_config(host: str) -> dict:
    path = os.path.expanduser("~/.ssh/config")
    if not os.path.isfile(path):
        return {}
    try:
        cfg = paramiko.SSHConfig.from_path(path)
        return dict(cfg.lookup(host))
    except (OSError, paramiko.SSHException, ValueError) as e:
        raise UsageError(f"{path}: {e}") from None


@dataclass(frozen=True)
class Resolved:
    """An address with ~/.ssh/config applied."""

    shown: str  # host[:port] as the user named it (for messages and trust-host)
    host: str
    port: int
    user: str
    identities: tuple[str, ...]
    explicit_identity: bool
    jump: tuple[Address, ...]
    known_hosts: tuple[str, ...]


def resolve(addr: Address, *, identity: str | None = None, jump: list[Address] | None = None) -> Resolved:
    config = _ssh_config(addr.host)
    host = config.get("hostname") or addr.host
    try:
        port = addr.port or int(config.get("port") or DEFAULT_PORT)
    except ValueError:
        raise UsageError(f"~/.ssh/config: Port for {addr.host} is not a number") from None
    user = addr.user or config.get("user") or _local_user()
    identities: tuple[str, ...]
    if identity:
        identities, explicit = (identity,), True
    elif config.get("identityfile"):
        identities, explicit = tuple(os.path.expanduser(p) for p in config["identityfile"]), True
    else:
        home = os.path.expanduser("~/.ssh")
        identities, explicit = tuple(os.path.join(home, n) for n in DEFAULT_IDENTITIES), False
        identities = tuple(p for p in identities if os.path.isfile(p))
    if jump is None:
        pj = config.get("proxyjump")
        jump = parse_jump(pj) if pj and pj.lower() != "none" else []
    shown = addr.host if (addr.port or DEFAULT_PORT) == DEFAULT_PORT else f"{addr.host}:{addr.port}"
    return Resolved(shown, host, port, user, identities, explicit, tuple(jump), tuple(_known_host_files(config)))


def _local_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError, ImportError):  # no user name in the environment or the password database
        raise UsageError("no user name: give one in the address (sftp://user@host/...)") from None


class Session:
    """One signed-in SSH connection (and the hops it goes through); ``close`` ends them all."""

    def __init__(self, transport: paramiko.Transport, hops: list[paramiko.Transport],
                 target: Resolved, timeout: float) -> None:
        self.transport = transport
        self.hops = hops
        self.target = target
        self.timeout = timeout

    def close(self) -> None:
        for t in [self.transport, *reversed(self.hops)]:
            with contextlib.suppress(Exception):
                t.close()


@contextlib.contextmanager
def link_errors(where: str) -> Iterator[None]:
    """Turns the ways a link fails into a one-line ``TransportError``."""
    try:
        yield
    except paramiko.AuthenticationException as e:
        raise TransportError(f"{where}: {e}") from None
    except TimeoutError:
        raise TransportError(f"{where}: no answer in time (the link is down or the server is stuck)") from None
    except socket.gaierror as e:
        raise TransportError(f"{where}: unknown host ({e.strerror})") from None
    except ConnectionRefusedError:
        raise TransportError(f"{where}: connection refused (is the SSH server running, on that port?)") from None
    except (ConnectionError, EOFError) as e:
        why = str(e).strip().splitlines()
        raise TransportError(f"{where}: the connection was lost" + (f" ({why[0]})" if why else "")) from None
    except paramiko.SSHException as e:
        raise TransportError(f"{where}: {_reason(e)}") from None
    except OSError as e:
        if e.errno is None or isinstance(e, (PermissionError, FileNotFoundError)):
            raise  # the SFTP server's answer to one request (paramiko gives it no errno, or these)
        raise TransportError(f"{where}: {e.strerror or e}") from None


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def connect(target: Resolved, prompts: Prompts, *, password: Callable[[str], str | None] | None = None,
            timeout: float = DEFAULT_TIMEOUT, record: bool = True) -> Session:
    """Connect to ``target`` (through its hops), check its host key, sign in.

    ``password`` gives the password for a prompt (None: none to give); by default the prompt is
    ``prompts.secret``. Each hop is signed in to the same way, with its own host key checked."""
    policy = HostKeyPolicy(list(target.known_hosts), prompts, record=record)
    with _closed_on_error() as hops:
        sock = _through(target, hops, policy, prompts, password, timeout)
        t = _open(target, policy, prompts, password, timeout, sock)
        return Session(t, list(hops), target, timeout)


def host_key(target: Resolved, prompts: Prompts, *, password: Callable[[str], str | None] | None = None,
             timeout: float = DEFAULT_TIMEOUT) -> tuple[paramiko.PKey, list[paramiko.Transport]]:
    """The key ``target`` shows, read without signing in (through its hops, which are signed in
    to): for ``trust-host``. The caller closes the transports returned."""
    policy = HostKeyPolicy(list(target.known_hosts), prompts)
    with _closed_on_error() as hops:
        sock = _through(target, hops, policy, prompts, password, timeout)
        t = _start(target, policy, timeout, sock)
        hops.append(t)
        return t.get_remote_server_key(), list(hops)


@contextlib.contextmanager
def _closed_on_error() -> Iterator[list[paramiko.Transport]]:
    """A list of transports opened along the way, closed (last first) if what follows fails."""
    opened: list[paramiko.Transport] = []
    try:
        yield opened
    except BaseException:
        for t in reversed(opened):
            with contextlib.suppress(Exception):
                t.close()
        raise


def _through(target: Resolved, hops: list[paramiko.Transport], policy: HostKeyPolicy, prompts: Prompts,
             password: Callable[[str], str | None] | None, timeout: float) -> paramiko.Channel | None:
    """Sign in to each of ``target``'s gateways in turn (each added to ``hops``); the channel
    to the target through the last one (None without gateways)."""
    sock = None
    for hop in target.jump:
        r = _hop(hop, target)
        t = _open(r, policy, prompts, password, timeout, sock)
        hops.append(t)
        sock = _forward(t, r, target, timeout)
    return sock


def _hop(hop: Address, target: Resolved) -> Resolved:
    """A gateway's address resolved; without identity files of its own it is offered the
    target's (a collector's one key usually opens both)."""
    r = resolve(hop, jump=[])
    if r.explicit_identity or not target.explicit_identity:
        return r
    return Resolved(r.shown, r.host, r.port, r.user, target.identities, True, (), r.known_hosts)


def _forward(t: paramiko.Transport, gateway: Resolved, target: Resolved, timeout: float) -> paramiko.Channel:
    """A channel through the gateway ``t`` to the target's SSH port."""
    with link_errors(gateway.shown):
        try:
            return t.open_channel("direct-tcpip", (target.host, target.port), ("127.0.0.1", 0), timeout=timeout)
        except paramiko.ChannelException as e:
            raise TransportError(f"{gateway.shown}: the gateway would not connect to {target.shown} "
                                 f"({e.text}; its admin allows it with AllowTcpForwarding)") from None


def _start(r: Resolved, policy: HostKeyPolicy, timeout: float, sock) -> paramiko.Transport:
    """Connect and run the key exchange (no host key check, no sign-in yet)."""
    with link_errors(r.shown):
        if sock is None:
            sock = socket.create_connection((r.host, r.port), timeout=timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        t = paramiko.Transport(sock)
        try:
            t.banner_timeout = t.handshake_timeout = t.auth_timeout = timeout
            t.set_keepalive(KEEPALIVE)
            opts = t.get_security_options()
            opts.ciphers = tuple(c for c in CIPHERS if c in opts.ciphers) + tuple(
                c for c in opts.ciphers if c not in CIPHERS)
            name = host_key_name(r.host, r.port)
            known = policy.known_types(name)
            if known:  # ask for the key type we know, as ssh does
                want = []
                for k in known:
                    want += ["rsa-sha2-512", "rsa-sha2-256", k] if k == "ssh-rsa" else [k]
                want = [k for k in want if k in opts.key_types]
                opts.key_types = tuple(want) + tuple(k for k in opts.key_types if k not in want)
            t.start_client(timeout=timeout)
        except BaseException:
            t.close()
            raise
    return t


def _open(r: Resolved, policy: HostKeyPolicy, prompts: Prompts,
          password: Callable[[str], str | None] | None, timeout: float, sock) -> paramiko.Transport:
    t = _start(r, policy, timeout, sock)
    try:
        policy.check(host_key_name(r.host, r.port), t.get_remote_server_key(), r.shown)
        with link_errors(r.shown):
            _sign_in(t, r, prompts, password or prompts.secret)
    except BaseException:
        t.close()
        raise
    return t


def _sign_in(t: paramiko.Transport, r: Resolved, prompts: Prompts,
             password: Callable[[str], str | None]) -> None:
    """Keys first (the agent's, then the identity files), then a password. The methods the
    server takes are learned from its first refusal, not asked for first: each failed attempt
    costs a delay that OpenSSH adds on purpose."""
    who = f"{r.user}@{r.shown}"
    allowed: set[str] | None = None  # unknown until the server refuses something
    tried: list[str] = []

    def attempt(method: Callable[..., object], *args: object) -> bool:
        nonlocal allowed
        try:
            method(r.user, *args)
        except paramiko.BadAuthenticationType as e:
            allowed = set(e.allowed_types)
            return False
        except paramiko.AuthenticationException:
            return False
        return t.is_authenticated()

    def takes(*methods: str) -> bool:
        return allowed is None or bool(allowed.intersection(methods))

    if takes("publickey"):
        agent_keys = _agent_keys()
        if agent_keys:
            tried.append("the ssh-agent's keys")
        for key in agent_keys:
            if not takes("publickey"):
                break
            if attempt(t.auth_publickey, key):
                return
        for path in r.identities:
            if not takes("publickey"):
                break
            key = _load_key(path, prompts, r.explicit_identity)
            if key is None:
                continue
            tried.append(path)
            if attempt(t.auth_publickey, key):
                return
    for _ in range(PASSWORD_TRIES):
        if not takes("password", "keyboard-interactive"):
            break
        secret = password(f"{who}'s password: ")
        if secret is None:
            break
        tried.append("a password")
        try:
            # falls back to keyboard-interactive by itself
            if attempt(t.auth_password, secret):
                return
        finally:
            del secret
    # Nothing was refused, so nothing was tried: ask what the server takes (or whether this
    # account needs no credentials at all).
    if allowed is None and attempt(t.auth_none):
        return
    shown = ", ".join(sorted(allowed or ())) or "nothing"
    if "a password" in tried:
        how = ", ".join(dict.fromkeys(tried))
        raise paramiko.AuthenticationException(f"cannot sign in as {r.user}: refused (tried {how})")
    how = ", ".join(dict.fromkeys(tried)) or "nothing: no ssh-agent, no key file, no terminal to ask for a password"
    raise paramiko.AuthenticationException(
        f"cannot sign in as {r.user} (tried {how}; the server takes {shown}). "
        "Without a terminal: an ssh-agent, --identity KEYFILE, or --password-stdin")


def _agent_keys() -> tuple:
    try:
        agent = paramiko.Agent()
    except (paramiko.SSHException, OSError):
        return ()
    try:
        return tuple(agent.get_keys())
    except (paramiko.SSHException, OSError):
        return ()


def _load_key(path: str, prompts: Prompts, explicit: bool) -> paramiko.PKey | None:
    """A private key from a file, its passphrase asked for if it is encrypted. A file named by
    the user that cannot be used is an error; a default one is skipped."""
    try:
        return paramiko.PKey.from_path(path)
    except (paramiko.PasswordRequiredException, TypeError):  # TypeError: cryptography's "no password given"
        pass
    except FileNotFoundError:
        if explicit:
            raise UsageError(f"{path}: no such key file") from None
        return None
    except (OSError, paramiko.SSHException, ValueError) as e:
        if explicit:
            raise UsageError(f"{path}: not a private key dittohead can use ({_reason(e)})") from None
        return None
    for _ in range(PASSWORD_TRIES):
        phrase = prompts.secret(f"passphrase for {path}: ")
        if phrase is None:
            if explicit:
                raise UsageError(f"{path} is encrypted and there is no terminal to ask for its "
                                 "passphrase: add the key to an ssh-agent (ssh-add) for scripts")
            return None
        try:
            return paramiko.PKey.from_path(path, phrase.encode())
        except (paramiko.SSHException, ValueError):
            continue
        finally:
            del phrase
    raise UsageError(f"{path}: wrong passphrase")
