"""A small real HTTP/2 client (the ``h2`` library over stdlib TLS) through the gateway's
CONNECT tunnel, for what curl cannot do here: accept server push, and open a WebSocket with
an extended CONNECT (RFC 8441). Every wait is bounded by the socket timeout and a deadline.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings

TIMEOUT = 10.0


def tunnel(
    proxy: tuple[str, int], host: str, port: int, cafile: Path, alpn: tuple[str, ...] = ("h2",)
) -> ssl.SSLSocket:
    """CONNECT through the gateway and start TLS (trusting the gateway's CA)."""
    sock = socket.create_connection(proxy, timeout=TIMEOUT)
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer and len(answer) < 8192:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    if not answer.startswith(b"HTTP/1.1 200"):
        sock.close()
        raise ConnectionError(f"CONNECT refused: {answer!r}")
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.set_alpn_protocols(list(alpn))
    return ctx.wrap_socket(sock, server_hostname=host)


class H2Client:
    """One HTTP/2 connection; collects the h2 events it receives."""

    def __init__(self, tls: ssl.SSLSocket, *, enable_push: bool = True) -> None:
        assert tls.selected_alpn_protocol() == "h2", tls.selected_alpn_protocol()
        self.tls = tls
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.ENABLE_PUSH: int(enable_push)}
        )
        self.conn.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.tls.sendall(data)

    def pump(self, until: object, timeout: float = TIMEOUT) -> None:
        """Read until ``until(self.events)`` is true (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        while not until(self.events):  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no expected h2 events; got {self.events}")
            data = self.tls.recv(65536)
            if not data:
                raise ConnectionError(f"connection closed; events {self.events}")
            for event in self.conn.receive_data(data):
                self.events.append(event)
                if isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
            self.flush()

    def ended(self, stream_id: int) -> bool:
        return any(
            isinstance(e, h2.events.StreamEnded | h2.events.StreamReset)
            and e.stream_id == stream_id
            for e in self.events
        )

    def data(self, stream_id: int) -> bytes:
        return b"".join(
            e.data for e in self.events
            if isinstance(e, h2.events.DataReceived) and e.stream_id == stream_id
        )  # fmt: skip

    def close(self) -> None:
        self.conn.close_connection()
        self.flush()
        self.tls.close()
