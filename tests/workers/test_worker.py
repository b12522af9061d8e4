"""The worker's bounds: handshake timeout, idle timeout and the connection limit, each
reported in an event; the gateway keeps serving others meanwhile."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway import Gateway, Origin

LIMITS = """
[limits]
handshake_timeout = 0.5
idle_timeout = 1.0
max_connections = 3
"""


@pytest.fixture
def gateway(tmp_path: Path, pki: dict[str, Path]) -> Iterator[Gateway]:
    config = tmp_path / "tlsgate.toml"
    config.write_text(LIMITS)
    args = ["--config", str(config), "--workers", "1"]  # the limits are per worker
    with Gateway(tmp_path / "state", upstream_ca=pki["ca"], args=args) as gw:
        yield gw


def curl_ok(gw: Gateway, origin: Origin, path: str) -> bool:
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--proxy", gw.proxy, "--cacert", str(gw.ca_cert),
         f"https://localhost:{origin.port}{path}"],
        capture_output=True, timeout=20,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return True


def test_a_client_that_never_completes_its_handshake_is_closed_at_the_handshake_timeout(
    gateway: Gateway, origin: Origin
) -> None:
    with socket.create_connection((gateway.host, gateway.port), timeout=5) as slow:
        slow.sendall(b"CONNECT localhost:")  # and nothing more (slowloris)
        started = time.monotonic()
        answer = slow.makefile("rb").read()
        assert answer.startswith(b"HTTP/1.1 408 ") and b"not complete within" in answer
        assert time.monotonic() - started < 3
    closes = gateway.wait_events("conn_close", 1)
    assert closes[0]["close_reason"] == "handshake-timeout"
    assert curl_ok(gateway, origin, "/still-serving")


def test_an_idle_tunnel_is_closed_at_the_idle_timeout(gateway: Gateway, origin: Origin) -> None:
    import ssl

    ctx = ssl.create_default_context(cafile=str(gateway.ca_cert))
    raw = socket.create_connection((gateway.host, gateway.port), timeout=10)
    raw.sendall(f"CONNECT localhost:{origin.port} HTTP/1.1\r\n\r\n".encode())
    assert raw.recv(1024).startswith(b"HTTP/1.1 200")
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"GET /once HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = b""
        while b"hello from /once" not in answer:
            answer += tls.recv(4096)
        started = time.monotonic()
        try:
            assert tls.recv(100) == b""  # then silence until the gateway ends it
        except (ssl.SSLEOFError, ConnectionResetError):
            pass
        assert 0.5 < time.monotonic() - started < 4
    closes = [e for e in gateway.wait_events("conn_close", 1) if e["requests"] == 1]
    assert closes[0]["close_reason"] == "idle-timeout"


def test_connections_beyond_the_limit_are_refused_at_accept_and_counted(
    gateway: Gateway, origin: Origin
) -> None:
    held = [socket.create_connection((gateway.host, gateway.port), timeout=5) for _ in range(3)]
    try:
        for sock in held:
            sock.sendall(b"CONNECT localhost:")  # occupy a slot each (until the timeout)
        time.sleep(0.2)
        extra = socket.create_connection((gateway.host, gateway.port), timeout=5)
        assert extra.recv(100) == b""  # closed at once, no work done for it
        extra.close()
    finally:
        for sock in held:
            sock.close()
    closes = gateway.wait_events("conn_close", 3)
    assert [e["close_reason"] for e in closes] == ["client-closed"] * 3
    assert curl_ok(gateway, origin, "/after-the-burst")
