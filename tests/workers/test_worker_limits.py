"""Limits end to end: each bound hit ends (or refuses) only the offending connection, is
counted, and is reported in a ``limit`` event naming the setting, its value and the client."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway import Gateway, Origin

LIMITS = """
[limits]
handshake_timeout = 10.0
header_timeout = 1.0
max_connections_per_client = 2
max_header_count = 10
max_connect_header_bytes = 1024
socket_buffer = 16384
"""


@pytest.fixture
def gateway(tmp_path: Path, pki: dict[str, Path]) -> Iterator[Gateway]:
    config = tmp_path / "tlsgate.toml"
    config.write_text(LIMITS)
    args = ["--config", str(config), "--workers", "1"]
    with Gateway(tmp_path / "state", upstream_ca=pki["ca"], args=args) as gw:
        yield gw


def tunnel(gw: Gateway, origin: Origin) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(gw.ca_cert))
    raw = socket.create_connection((gw.host, gw.port), timeout=10)
    raw.sendall(f"CONNECT localhost:{origin.port} HTTP/1.1\r\n\r\n".encode())
    assert raw.recv(1024).startswith(b"HTTP/1.1 200")
    return ctx.wrap_socket(raw, server_hostname="localhost")


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Does the peer close (EOF, reset or TLS EOF) within ``seconds``?"""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except (ssl.SSLError, ConnectionResetError):
        return True
    except TimeoutError:
        return False
    return True


def curl_ok(gw: Gateway, origin: Origin, path: str) -> None:
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--proxy", gw.proxy, "--cacert", str(gw.ca_cert),
         f"https://localhost:{origin.port}{path}"],
        capture_output=True, timeout=20,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_a_connect_request_trickling_in_is_cut_at_the_header_timeout(
    gateway: Gateway, origin: Origin
) -> None:
    curl_ok(gateway, origin, "/ready")  # the worker is serving: accept happens at once
    with socket.create_connection((gateway.host, gateway.port), timeout=10) as slow:
        started = time.monotonic()
        slow.sendall(b"CONNECT localhost:")  # then nothing (the handshake timeout is 10 s)
        assert closed_within(slow, 5)
        assert time.monotonic() - started < 3
    [hit] = gateway.wait_match("limit", lambda e: e["limit"] == "header_timeout")
    assert hit["value"] == 1.0 and hit["client_ip"] == "127.0.0.1" and hit["conn"]
    closes = gateway.wait_match("conn_close", lambda e: e["close_reason"] == "header-timeout")
    assert closes
    curl_ok(gateway, origin, "/still-serving")


def test_an_http_request_head_trickling_in_a_tunnel_is_cut_at_the_header_timeout(
    gateway: Gateway, origin: Origin
) -> None:
    """Slowloris inside TLS: a header line every 0.3 s keeps the idle timer from firing."""
    with tunnel(gateway, origin) as tls:
        tls.sendall(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n")
        started = time.monotonic()
        closed = False
        for i in range(40):  # bounded: 12 s at most; the cut comes 1-3 s in (1 s sweep)
            try:
                tls.sendall(b"X-Drip-%d: 1\r\n" % (i % 5))
            except (ssl.SSLError, OSError):
                closed = True
                break
            if closed_within(tls, 0.3):
                closed = True
                break
        assert closed
        assert time.monotonic() - started < 8  # far below the idle timeout (300 s)
    [hit] = gateway.wait_match("limit", lambda e: e["limit"] == "header_timeout")
    assert hit["value"] == 1.0
    closes = gateway.wait_match("conn_close", lambda e: e["close_reason"] == "header-timeout")
    assert closes


def test_a_request_with_more_headers_than_max_header_count_ends_its_connection(
    gateway: Gateway, origin: Origin
) -> None:
    headers = b"".join(b"X-%d: v\r\n" % i for i in range(20))
    with tunnel(gateway, origin) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n" + headers + b"\r\n")
        assert closed_within(tls, 5)
    [hit] = gateway.wait_match("limit", lambda e: e["limit"] == "max_header_count")
    assert hit["value"] == 10 and hit["client_ip"] == "127.0.0.1"
    errors = gateway.wait_events("protocol_error", 1)
    assert "max_header_count" in errors[0]["error"]
    curl_ok(gateway, origin, "/after")


def test_connections_beyond_the_per_client_limit_are_refused_at_accept_and_reported(
    gateway: Gateway, origin: Origin
) -> None:
    held = [tunnel(gateway, origin) for _ in range(2)]
    try:
        extra = []
        for _ in range(3):
            sock = socket.create_connection((gateway.host, gateway.port), timeout=10)
            extra.append(sock)
            assert closed_within(sock, 5)  # closed at accept, nothing read
        for sock in extra:
            sock.close()
        hits = gateway.wait_match("limit", lambda e: e["limit"] == "max_connections_per_client")
        assert hits[0]["value"] == 2 and hits[0]["conn"] is None
        assert sum(e["count"] for e in gateway.events("limit")
                   if e["limit"] == "max_connections_per_client") == 3  # fmt: skip
        assert hits[0]["sources"][0]["client_ip"] == "127.0.0.1"
    finally:
        for tls in held:
            tls.close()
    gateway.wait_events("conn_close", 2)  # the gateway has seen both leave
    curl_ok(gateway, origin, "/after-the-others-left")


def test_socket_buffer_bounds_the_kernel_buffers_of_client_sockets(
    gateway: Gateway, origin: Origin
) -> None:
    with tunnel(gateway, origin) as tls:
        local_port = tls.getsockname()[1]
        # the gateway's side of this connection: its peer is our port
        out = subprocess.run(
            ["ss", "-tnmH", "state", "established", f"( dport = :{local_port} )"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    # the kernel doubles what is set: 16384 -> rb32768, tb32768 (autotuning starts ~131072)
    assert "rb32768" in out and "tb32768" in out, out


def test_a_connect_request_larger_than_max_connect_header_bytes_is_refused_with_431(
    gateway: Gateway, origin: Origin
) -> None:
    """A real client (curl) sending a CONNECT with a 2000-byte proxy header."""
    result = subprocess.run(
        ["curl", "-sS", "-v", "--max-time", "10", "--proxy", gateway.proxy,
         "--proxy-header", "X-Pad: " + "p" * 2000, "--cacert", str(gateway.ca_cert),
         f"https://localhost:{origin.port}/padded"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert result.returncode != 0
    assert "HTTP/1.1 431" in result.stderr, result.stderr
    [hit] = gateway.wait_match("limit", lambda e: e["limit"] == "max_connect_header_bytes")
    assert hit["value"] == 1024 and hit["client_ip"] == "127.0.0.1" and hit["conn"]
    [error] = gateway.wait_events("protocol_error", 1)
    assert error["stage"] == "connect" and "max_connect_header_bytes" in error["error"]
    closes = gateway.wait_match("conn_close", lambda e: e["close_reason"] == "protocol-error")
    assert closes
    curl_ok(gateway, origin, "/a-smaller-request-passes")


def test_a_connect_request_with_more_headers_than_max_header_count_is_refused_with_431(
    gateway: Gateway,
) -> None:
    headers = b"".join(b"X-%d: v\r\n" % i for i in range(11))
    with socket.create_connection((gateway.host, gateway.port), timeout=10) as sock:
        sock.sendall(b"CONNECT localhost:443 HTTP/1.1\r\n" + headers + b"\r\n")
        answer = b""
        while chunk := sock.recv(4096):  # bounded: the gateway closes after its answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 431 "), answer
    [hit] = gateway.wait_match("limit", lambda e: e["limit"] == "max_header_count")
    assert hit["value"] == 10 and hit["conn"]
