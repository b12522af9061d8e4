"""`tlsgate run`: the gateway process.

For now one worker serves the listener inside this process (``--workers 1``); the
supervisor issue turns this into a root supervisor that forks one worker per core behind
eBPF steering. What is already split the way it will stay:

- the CA key is loaded here and used only by the :class:`LeafSigner`;
- the worker gets interfaces (signer, certificate cache, event queue), not the key file;
- the event hub (detection socket, optional file) runs in its own thread, fed from the
  worker's bounded queue, so neither the disk nor a subscriber can stall the relay.

Exit codes: 0 clean shutdown, 2 operator error (bad config, unusable CA), 3 cannot listen.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TextIO

from tlsgate import __version__
from tlsgate.errors import OperatorError
from tlsgate.paths import events_socket_path, runtime_dir
from tlsgate.supervisor.ca import LoadedCA, ensure_ca
from tlsgate.supervisor.config import Config
from tlsgate.supervisor.eventhub import EventHub
from tlsgate.supervisor.signer import LeafSigner, generate_leaf_key
from tlsgate.workers.certs import (
    ClientContexts,
    LocalMinter,
    LruCertificateCache,
    chain_to_send,
)
from tlsgate.workers.events import EventEmitter, EventQueue
from tlsgate.workers.upstream import UpstreamValidator
from tlsgate.workers.worker import Worker

DRAIN_SECONDS = 10.0
LISTEN_BACKLOG = 4096


class ListenError(OperatorError):
    """The listening socket could not be created."""


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


def banner(
    config: Config, listen: tuple[str, int], ca: LoadedCA, created: bool, out: TextIO
) -> None:
    host, port = listen[:2]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    cert = ca.cert_path
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
        f"  export it:             tlsgate ca export{state} > tlsgate-ca.pem",
        f"Events: tlsgate events{state}   (detection socket {sock})",
    ]
    if config.events_file:
        lines.append(f"Events are also appended to {config.events_file}")
    out.write("\n".join(lines) + "\n")
    out.flush()


def run_gateway(config: Config, passphrase: bytes | None = None, out: TextIO = sys.stderr) -> int:
    """Run until SIGTERM/SIGINT; drain in-flight connections; return the exit code."""
    ca, created = ensure_ca(config.state_dir, passphrase)
    listener = make_listener(config)
    run_dir = runtime_dir(config.state_dir)
    run_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    validator = UpstreamValidator(
        ca_bundle=str(config.upstream_ca_bundle) if config.upstream_ca_bundle else None
    )
    leaf_key = generate_leaf_key()
    cache = LruCertificateCache()
    contexts = ClientContexts(
        LocalMinter(LeafSigner(ca, leaf_key), cache),
        leaf_key,
        chain_to_send(ca.cert, ca.chain),
        cache,
    )
    queue = EventQueue()
    emitter = EventEmitter(0, queue)
    hub = EventHub(
        events_socket_path(config.state_dir),
        file_path=config.events_file,
        gateway_id=f"{socket.gethostname()}:{os.getpid()}",
    )
    hub.add_source(queue)
    worker = Worker(
        0, config, listener, validator=validator, client_contexts=contexts, emitter=emitter
    )
    hub.start()
    try:
        banner(config, listener.getsockname(), ca, created, out)
        asyncio.run(_serve(worker))
    finally:
        listener.close()
        hub.stop()
    return 0


async def _serve(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.serve()
    await worker.drain(DRAIN_SECONDS)
