"""Where the gateway meets the network and the operator: its listening sockets and its
startup banner (used by :mod:`tlsgate.supervisor.supervisor`)."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path
from typing import Protocol, TextIO

from tlsgate import __version__
from tlsgate.errors import OperatorError
from tlsgate.paths import events_socket_path
from tlsgate.supervisor.config import Config


class CACertificate(Protocol):
    """What the banner shows of the CA (the signer's report; the key stays in the signer)."""

    @property
    def cert_path(self) -> Path: ...

    @property
    def fingerprint_sha256(self) -> str: ...


DRAIN_SECONDS = 10.0
LISTEN_BACKLOG = 4096


class ListenError(OperatorError):
    """The listening socket could not be created."""


def management_listener(address: tuple[str, int], what: str, setting: str) -> socket.socket:
    """A non-blocking listening socket for ``what`` (remote events, metrics) on ``address``."""
    host, port = address
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ListenError(
            f"cannot listen for {what} on {where}: {exc.strerror or exc}; choose another"
            f" {setting} address or port"
        ) from exc
    sock.setblocking(False)
    return sock


def make_listener(config: Config) -> socket.socket:
    """A listening socket on the configured address, ready to share with SO_REUSEPORT."""
    host, port = config.listen
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if config.mode == "transparent":
            try:
                sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
            except PermissionError:
                pass  # REDIRECT rules work without it; TPROXY needs CAP_NET_ADMIN
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(
            f"cannot listen on {host}:{port}: {exc.strerror}; choose another address with "
            "--listen ADDR:PORT or stop whatever is using it"
        ) from None
    sock.setblocking(False)
    return sock


def command_name() -> str:
    """How the operator can call this same tlsgate again (it may not be on PATH)."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "tlsgate":
        found = shutil.which("tlsgate")
        if found and Path(found).resolve() == argv0.resolve():
            return "tlsgate"
        return str(argv0.resolve())
    return f"{sys.executable} -m tlsgate"


def banner(
    config: Config, listen: tuple[str, int], ca: CACertificate, created: bool, out: TextIO
) -> None:
    host, port = listen[:2]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    cert = ca.cert_path
    prog = command_name()
    sock = events_socket_path(config.state_dir)
    state = (
        f" --state-dir {config.state_dir}" if config.state_dir != Path("/var/lib/tlsgate") else ""
    )
    lines = [
        f"tlsgate {__version__}: {config.mode} proxy listening on {where} "
        f"({config.workers} worker{'s' if config.workers != 1 else ''})",
        f"CA certificate: {cert} ({'created now' if created else 'loaded'}; "
        f"SHA-256 {ca.fingerprint_sha256})",
        f"  trust it on a client:  cp {cert} /usr/local/share/ca-certificates/tlsgate.crt "
        "&& update-ca-certificates",
        f"  or per command:        curl --proxy http://{where} --cacert {cert} https://example.com/"
        if config.mode == "explicit"
        else f"  or per command:        curl --cacert {cert} https://example.com/",
        f"  export it:             {prog} ca export{state} > tlsgate-ca.pem",
        f"Events: {prog} events{state}   (detection socket {sock})",
        f"Status: {prog} status{state}",
    ]
    if config.events_file:
        lines.append(f"Events are also appended to {config.events_file}")
    out.write("\n".join(lines) + "\n")
    out.flush()
