"""The relay: both directions with backpressure, half-close, and fail-closed inspection.

Real sockets (socketpairs) on a real asyncio loop; TLS endpoints use pyOpenSSL over a
socketpair with a certificate from a trustme CA."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

from tlsgate.workers.relay import TCP_READ_SIZE, EndpointError, Relay, TcpEndpoint, TlsEndpoint

SMALL_BUFFER = 16384


def pair(small: bool = False) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
        if small:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    return a, b


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 20))


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.005)


async def read_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < n:
        out += await loop.sock_recv(sock, n - len(out))
    return bytes(out)


def test_a_reader_that_stops_reading_stops_the_relay_reading_the_other_side() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        client, relay_client = pair(small=True)
        relay_upstream, server = pair(small=True)
        relay = Relay(loop, TcpEndpoint("client", relay_client), TcpEndpoint("upstream",
                      relay_upstream))  # fmt: skip
        relay.start()
        chunk = b"x" * 4096
        sent = 0
        stalled_rounds = 0
        while stalled_rounds < 20:  # the client keeps pushing while the server reads nothing
            try:
                sent += client.send(chunk)
                stalled_rounds = 0
            except BlockingIOError:
                stalled_rounds += 1
                await asyncio.sleep(0.01)
        # everything the client managed to send sits in kernel buffers plus at most one read
        kernel = 4 * 2 * SMALL_BUFFER * 2  # both pairs, both directions' buffers, doubled by Linux
        assert sent <= kernel + TCP_READ_SIZE
        assert relay.up.pending is not None  # held, not buffered further
        assert relay_client.fileno() not in relay._readers
        received = await read_exactly(server, sent)
        assert received == chunk * (sent // len(chunk)) + chunk[: sent % len(chunk)]
        await until(lambda: relay.up.pending is None)
        assert relay.up.bytes == sent
        relay.stop("test-over")
        for s in (client, relay_client, relay_upstream, server):
            s.close()

    run(scenario)


def test_end_of_stream_is_forwarded_and_the_other_direction_keeps_flowing() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        client, relay_client = pair()
        relay_upstream, server = pair()
        relay = Relay(loop, TcpEndpoint("client", relay_client), TcpEndpoint("upstream",
                      relay_upstream))  # fmt: skip
        relay.start()
        await loop.sock_sendall(client, b"request")
        client.shutdown(socket.SHUT_WR)
        assert await read_exactly(server, 7) == b"request"
        assert await loop.sock_recv(server, 10) == b""  # the half-close reached upstream
        await loop.sock_sendall(server, b"late answer")
        assert await read_exactly(client, 11) == b"late answer"
        assert not relay.done.done()
        server.close()
        assert await asyncio.wait_for(relay.done, 5) == "client-closed"
        assert relay.up.bytes == 7 and relay.down.bytes == 11
        for s in (client, relay_client, relay_upstream):
            s.close()

    run(scenario)


def test_an_inspector_that_rejects_the_bytes_ends_the_connection_before_they_are_forwarded() -> (
    None
):
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        client, relay_client = pair()
        relay_upstream, server = pair()

        def inspect(data: bytes) -> None:
            if b"EVIL" in data:
                raise EndpointError("protocol-error")

        relay = Relay(loop, TcpEndpoint("client", relay_client),
                      TcpEndpoint("upstream", relay_upstream), inspect_client=inspect)  # fmt: skip
        relay.start()
        await loop.sock_sendall(client, b"fine")
        assert await read_exactly(server, 4) == b"fine"
        await loop.sock_sendall(client, b"EVIL bytes")
        assert await asyncio.wait_for(relay.done, 5) == "protocol-error"
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.recv(100)  # nothing of the rejected chunk went through
        for s in (client, relay_client, relay_upstream, server):
            s.close()

    run(scenario)


def test_an_inspector_that_fails_unexpectedly_ends_the_connection_instead_of_passing_bytes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A bug in an inspector must close the connection at once (fail closed), not escape
    # into the event loop and leave the connection hanging until the idle timeout.
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        client, relay_client = pair()
        relay_upstream, server = pair()

        def inspect(data: bytes) -> None:
            if b"BUG" in data:
                raise KeyError("inspector bug")

        relay = Relay(loop, TcpEndpoint("client", relay_client),
                      TcpEndpoint("upstream", relay_upstream), inspect_client=inspect)  # fmt: skip
        relay.start()
        await loop.sock_sendall(client, b"fine")
        assert await read_exactly(server, 4) == b"fine"
        await loop.sock_sendall(client, b"BUG here")
        assert await asyncio.wait_for(relay.done, 5) == "inspector-error"
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.recv(100)
        for s in (client, relay_client, relay_upstream, server):
            s.close()

    with caplog.at_level("ERROR", logger="tlsgate.workers.relay"):
        run(scenario)
    assert "inspector failed" in caplog.text and "KeyError" in caplog.text


def test_a_reset_is_reported_with_the_side_that_reset() -> None:
    """The client closes with an answer still unread: its kernel sends RST."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        client, relay_client = socket.socketpair()
        relay_upstream, server = pair()
        relay_client.setblocking(False)
        relay = Relay(loop, TcpEndpoint("client", relay_client), TcpEndpoint("upstream",
                      relay_upstream))  # fmt: skip
        relay.start()
        await loop.sock_sendall(server, b"answer")
        server.close()  # upstream goes away while the client still talks
        await until(lambda: relay.down.eof)
        client.close()
        reason = await asyncio.wait_for(relay.done, 5)
        assert reason == "client-reset"
        relay_client.close()
        relay_upstream.close()

    run(scenario)


@pytest.fixture(scope="module")
def tls_contexts() -> tuple[SSL.Context, SSL.Context]:
    ca = trustme.CA()
    leaf = ca.issue_cert("relay.test")
    server = SSL.Context(SSL.TLS_SERVER_METHOD)
    server.use_certificate(x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()))
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    server.use_privatekey(key)
    client = SSL.Context(SSL.TLS_CLIENT_METHOD)
    return server, client


async def tls_pair(
    server_ctx: SSL.Context, client_ctx: SSL.Context
) -> tuple[SSL.Connection, socket.socket, SSL.Connection, socket.socket]:
    loop = asyncio.get_running_loop()
    a, b = pair()
    sconn = SSL.Connection(server_ctx, a)
    sconn.set_accept_state()
    cconn = SSL.Connection(client_ctx, b)
    cconn.set_connect_state()
    done = {"s": False, "c": False}
    while not all(done.values()):
        for key, conn in (("s", sconn), ("c", cconn)):
            if done[key]:
                continue
            try:
                conn.do_handshake()
                done[key] = True
            except SSL.WantReadError:
                pass
        await asyncio.sleep(0)
    del loop
    return sconn, a, cconn, b


def test_tls_plaintext_is_relayed_and_close_notify_is_passed_on(
    tls_contexts: tuple[SSL.Context, SSL.Context],
) -> None:
    server_ctx, client_ctx = tls_contexts

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        # client <-> relay(client side, server role) and relay(upstream side) <-> server
        relay_c, relay_c_sock, client, client_sock = await tls_pair(server_ctx, client_ctx)
        server, server_sock, relay_u, relay_u_sock = await tls_pair(server_ctx, client_ctx)
        seen: list[bytes] = []
        relay = Relay(loop, TlsEndpoint("client", relay_c_sock, relay_c),
                      TlsEndpoint("upstream", relay_u_sock, relay_u),
                      inspect_client=seen.append)  # fmt: skip
        relay.start()
        payload = bytes(range(256)) * 300  # several TLS records
        client.sendall(payload)
        got = bytearray()
        while len(got) < len(payload):
            try:
                got += server.recv(65536)
            except SSL.WantReadError:
                await asyncio.sleep(0.002)
        assert bytes(got) == payload
        assert b"".join(seen) == payload
        client.shutdown()  # close_notify from the client ...
        while True:
            try:
                server.recv(1024)
            except SSL.WantReadError:
                await asyncio.sleep(0.002)
            except SSL.ZeroReturnError:
                break  # ... reaches the server as close_notify
        server.shutdown()
        assert await asyncio.wait_for(relay.done, 5) == "client-closed"
        for s in (relay_c_sock, client_sock, server_sock, relay_u_sock):
            s.close()

    run(scenario)
