"""The Prometheus endpoint: ``GET /metrics`` over HTTP/1.1, local by default, mutual TLS otherwise.

Rules:

- Off unless ``[metrics] listen`` (``--metrics-listen``) is set. It serves the very text
  of the control socket's ``metrics`` command (``render``), nothing else: ``GET /metrics``
  → 200 (``text/plain; version=0.0.4``), another path → 404, another method → 405, a
  request that is not HTTP → 400. Every answer closes the connection.
- A non-loopback address is refused by the configuration unless ``mtls`` is on; with mTLS
  the handshake requires a client certificate of the events CA in the ``metrics-scraper``
  role (:mod:`tlsgate.supervisor.mtls`), refusals counted by reason.
- Bounded: at most :data:`MAX_CLIENTS` connections served at once (more are closed at
  once and counted as ``limit``), a request head of at most :data:`MAX_HEAD_BYTES`, and
  :data:`REQUEST_TIMEOUT` seconds for the whole exchange (TLS handshake included): a slow
  client costs one thread for that long, never the supervisor's loop or the gateway.
- :func:`answer` is the protocol, sans I/O: a request head in, the response bytes out.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from OpenSSL import SSL

from tlsgate.supervisor import mtls
from tlsgate.supervisor.listeners import management_listener

logger = logging.getLogger(__name__)

MAX_CLIENTS: Final = 8
MAX_HEAD_BYTES: Final = 8192
REQUEST_TIMEOUT: Final = 5.0
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

_STATUS_TEXT: Final = {200: "OK", 400: "Bad Request", 404: "Not Found",
                       405: "Method Not Allowed"}  # fmt: skip


def _response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
              extra: str = "") -> bytes:  # fmt: skip
    head = (
        f"HTTP/1.1 {status} {_STATUS_TEXT[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def answer(head: bytes, render: Callable[[], str]) -> bytes:
    """The response to a request ``head`` (bytes up to the blank line); see the rules."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _response(400, b"not an HTTP/1.x request\n")
    method, target = parts[0], parts[1]
    if method not in (b"GET", b"HEAD"):
        return _response(405, b"only GET /metrics\n", extra="Allow: GET, HEAD\r\n")
    if target.split(b"?", 1)[0] != b"/metrics":
        return _response(404, b"metrics are at /metrics\n")
    body = render().encode("utf-8")
    response = _response(200, body, CONTENT_TYPE)
    return response[: len(response) - len(body)] if method == b"HEAD" else response


class MetricsServer:
    """Serves :func:`answer` on ``address`` in threads; ``context`` enables mutual TLS."""

    def __init__(
        self,
        address: tuple[str, int],
        render: Callable[[], str],
        context: SSL.Context | None = None,
    ) -> None:
        self.address = address
        self.context = context
        self._render = render
        self._sock: socket.socket | None = None
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._lock = threading.Lock()
        self.requests = 0
        self.refused = dict.fromkeys(mtls.REFUSAL_REASONS, 0)

    @property
    def bound(self) -> tuple[str, int]:
        assert self._sock is not None
        host, port = self._sock.getsockname()[:2]
        return host, port

    def start(self) -> None:
        sock = management_listener(self.address, "metrics scrapers", "[metrics] listen")
        sock.setblocking(True)
        self._sock = sock
        threading.Thread(target=self._serve, name="tlsgate-metrics", daemon=True).start()

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected: closing is enough
            sock.close()

    def stats(self) -> dict[str, Any]:
        host, port = self.bound if self._sock is not None else self.address
        with self._lock:
            return {"listen": f"{host}:{port}", "mtls": self.context is not None,
                    "requests": self.requests, "refused": dict(self.refused)}  # fmt: skip

    def _count(self, reason: str | None) -> None:
        with self._lock:
            if reason is None:
                self.requests += 1
            else:
                self.refused[reason] += 1

    def _serve(self) -> None:
        while (listener := self._sock) is not None:
            try:
                conn, address = listener.accept()
            except OSError:
                return  # stopped
            if not self._slots.acquire(blocking=False):
                self._count(mtls.LIMIT)
                conn.close()
                continue
            threading.Thread(target=self._one, args=(conn, address), daemon=True).start()

    def _one(self, conn: socket.socket, address: Any) -> None:
        deadline = time.monotonic() + REQUEST_TIMEOUT
        # Kernel timeouts on a blocking socket: pyOpenSSL then sees EAGAIN, never hangs.
        timeout = struct.pack("ll", int(REQUEST_TIMEOUT), 0)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
        peer = f"{address[0]}:{address[1]}"
        try:
            if self.context is None:
                self._exchange(conn.recv, conn.sendall, deadline)
                return
            tls, record = mtls.new_server_connection(self.context, conn)
            try:
                tls.do_handshake()
            except (SSL.Error, OSError) as exc:
                reason = mtls.refusal_reason(record, exc)
                if isinstance(exc, SSL.WantReadError | SSL.WantWriteError):
                    reason = mtls.TIMEOUT
                self._count(reason)
                logger.warning("metrics endpoint refused %s: %s", peer, reason)
                return
            self._exchange(tls.recv, tls.sendall, deadline)
            tls.shutdown()
        except (SSL.Error, OSError) as exc:
            logger.info("metrics client %s went away: %s", peer, exc or type(exc).__name__)
        finally:
            conn.close()
            self._slots.release()

    def _exchange(self, recv: Callable[[int], bytes], send: Callable[[bytes], Any],
                  deadline: float) -> None:  # fmt: skip
        head = b""
        while b"\r\n\r\n" not in head:
            if len(head) > MAX_HEAD_BYTES or time.monotonic() > deadline:
                send(_response(400, b"request head too large or too slow\n"))
                return
            chunk = recv(4096)
            if not chunk:
                return
            head += chunk
        self._count(None)
        send(answer(head, self._render))
