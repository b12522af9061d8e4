"""Misbehaving peers and leak measurement for the fault tests.

- :class:`FaultyUpstream`: a real TCP (and TLS, with the test CA's ``localhost`` certificate)
  server on 127.0.0.1:0 that misbehaves the same way on every connection.
- :func:`tunnel`: a client that speaks CONNECT and TLS through the gateway, with
  :func:`reset` to abort it with an RST instead of a FIN.
- :class:`Footprint`: file descriptors and RSS of the supervisor and its workers, compared
  before and after N repetitions of a fault.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.gateway import Gateway
from tlsgate.loadtest.soak import ProcessSample, sample_process

#: Behaviours of FaultyUpstream.
RESET_IN_HANDSHAKE = "reset-in-handshake"  # read the ClientHello, answer with an RST
HANG = "hang"  # accept, read, never answer
RESET_MID_STREAM = "reset-mid-stream"  # TLS up, half a response, then RST
SILENT_AFTER_HANDSHAKE = "silent-after-handshake"  # TLS up, read the request, never answer

TIMEOUT = 10.0


def reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0): the abrupt end a crashed peer gives."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultyUpstream:
    """A server that misbehaves (``behaviour``) on every connection until closed."""

    def __init__(self, behaviour: str, cert: Path, key: Path) -> None:
        self.behaviour = behaviour
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.ctx.set_alpn_protocols(["http/1.1"])
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port: int = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self.accepted = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> FaultyUpstream:
        self._thread.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(TIMEOUT)
        with self._lock:
            for sock in self.held:
                sock.close()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(TIMEOUT)
        try:
            if self.behaviour == RESET_IN_HANDSHAKE:
                sock.recv(4096)
                reset(sock)
                return
            if self.behaviour == HANG:
                sock.recv(4096)
                self._hold(sock)
                return
            tls = self.ctx.wrap_socket(sock, server_side=True)
            tls.recv(4096)  # the request
            if self.behaviour == SILENT_AFTER_HANDSHAKE:
                self._hold(tls)
                return
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
            # long enough for a loaded gateway to have relayed the half response (an RST makes
            # the kernel drop what the gateway had not read yet, and the test checks the half)
            time.sleep(0.25)
            reset(tls)
        except OSError:
            sock.close()  # the gateway gave up first: fine for every behaviour

    def _hold(self, sock: socket.socket) -> None:
        with self._lock:
            self.held.append(sock)


def connect_through(
    gw: Gateway, host: str, port: int, rcvbuf: int | None = None
) -> tuple[socket.socket, bytes]:
    """Send CONNECT; return the socket and the proxy's answer head (``b""`` if it closed)."""
    sock = socket.socket()
    if rcvbuf is not None:  # set before connecting: the window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(TIMEOUT)
    sock.connect((gw.host, gw.port))
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        try:
            chunk = sock.recv(4096)
        except (ConnectionError, TimeoutError):
            break
        if not chunk:
            break
        head += chunk
    return sock, head


def tunnel(
    gw: Gateway, port: int, host: str = "localhost", rcvbuf: int | None = None
) -> ssl.SSLSocket:
    """A TLS connection to ``host:port`` through the gateway, trusting its CA."""
    sock, head = connect_through(gw, host, port, rcvbuf)
    if not head.startswith(b"HTTP/1.1 200"):
        sock.close()
        raise OSError(f"proxy refused: {head[:80]!r}")
    ctx = ssl.create_default_context(cafile=str(gw.ca_cert))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx.wrap_socket(sock, server_hostname=host)


def good_request(gw: Gateway, origin_port: int, path: str = "/good") -> bytes:
    """One GET through the gateway to the healthy origin; the body."""
    with tunnel(gw, origin_port) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                    .encode())  # fmt: skip
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1]


def status(gw: Gateway) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "tlsgate", "status", "--json", "--state-dir", str(gw.state_dir)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return dict(json.loads(result.stdout))


def wait_status(gw: Gateway, ok: Any, timeout: float = 30.0) -> dict[str, Any]:
    """The status once ``ok(status)`` holds, or the last one after ``timeout`` (callers
    assert on it; workers publish counters once a second)."""
    end = time.monotonic() + timeout
    while True:
        st = status(gw)
        if ok(st) or time.monotonic() > end:
            return st
        time.sleep(0.2)


def wait_settled(gw: Gateway, workers: int, timeout: float = 20.0) -> dict[str, Any]:
    """Every worker alive, heartbeating, and no connection open (accepted == closed)."""
    end = time.monotonic() + timeout
    while True:
        st = status(gw)
        ws = st["workers"]
        alive = [w for w in ws if w["alive"] and w["heartbeat_age"] < 3]
        if (len(alive) == workers and all(w["active"] == 0 for w in ws)
                and sum(w["accepted"] for w in ws) == sum(w["closed"] for w in ws)):  # fmt: skip
            return st
        if time.monotonic() > end:
            raise AssertionError(f"the gateway did not settle: {ws}")
        time.sleep(0.2)


#: Allowed growth after N faults. A per-fault leak of one descriptor or of 64 KiB shows as
#: at least N descriptors or N*64 KiB, well past these.
FD_TOLERANCE = 3
RSS_TOLERANCE_BYTES = 1536 * 1024


@dataclass
class Footprint:
    """Descriptors and RSS of the supervisor and of every worker, at one moment."""

    samples: dict[str, ProcessSample]

    @classmethod
    def of(cls, gw: Gateway, st: dict[str, Any]) -> Footprint:
        assert gw.proc is not None
        samples = {"supervisor": sample_process(gw.proc.pid)}
        for w in st["workers"]:
            samples[f"worker {w['id']}"] = sample_process(int(w["pid"]))
        return cls(samples)

    def assert_no_leak_since(
        self, before: Footprint, repetitions: int, rss_allowance: int = 0
    ) -> None:
        """``rss_allowance``: bytes a documented bounded buffer may hold on top."""
        assert self.samples.keys() == before.samples.keys(), "a process was replaced"
        grown = []
        for name, now in self.samples.items():
            then = before.samples[name]
            if now.fds - then.fds > FD_TOLERANCE:
                grown.append(f"{name}: {then.fds} -> {now.fds} descriptors")
            if now.rss_bytes - then.rss_bytes > RSS_TOLERANCE_BYTES + rss_allowance:
                grown.append(f"{name}: RSS {then.rss_bytes >> 10} -> {now.rss_bytes >> 10} KiB")
        assert not grown, f"after {repetitions} faults: " + "; ".join(grown)


def read_response(tls: ssl.SSLSocket) -> bytes:
    """One response with a Content-Length from a keep-alive connection: its body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            raise OSError(f"closed before a response head: {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    while len(body) < length:
        chunk = tls.recv(65536)
        if not chunk:
            raise OSError("closed inside a response body")
        body += chunk
    return body
