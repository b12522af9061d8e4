"""HTTP/2 and WebSocket through a real gateway: real clients (curl, the ``websockets``
package, an ``h2``-library client) to a real HTTP/2 server (hypercorn, tests/h2_server.py)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.events
import pytest
from websockets.asyncio.client import connect
from websockets.frames import Close, Frame, Opcode

from tests.gateway import Gateway
from tests.h2_client import H2Client, tunnel
from tests.h2_server import H2Origin

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


@pytest.fixture(scope="module")
def h2_origin(pki: dict[str, Path]) -> Iterator[H2Origin]:
    with H2Origin(pki["cert"], pki["key"]) as server:
        yield server


@pytest.fixture(scope="module")
def h1_origin(pki: dict[str, Path]) -> Iterator[H2Origin]:
    with H2Origin(pki["cert"], pki["key"], h1_only=True) as server:
        yield server


@pytest.fixture
def gateway(tmp_path: Path, pki: dict[str, Path]) -> Iterator[Gateway]:
    with Gateway(tmp_path / "state", upstream_ca=pki["ca"], args=["--workers", "1"]) as gw:
        yield gw


def curl(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", "--proxy", gw.proxy, "--cacert", str(gw.ca_cert),
         *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def of_conn(events: list[dict[str, Any]], conn: str) -> list[dict[str, Any]]:
    return [e for e in events if e["conn"] == conn]


def test_curl_http2_multiplexed_requests_each_give_an_http_event_with_its_stream(
    gateway: Gateway, h2_origin: H2Origin
) -> None:
    base = f"https://localhost:{h2_origin.port}"
    result = curl(
        gateway, "--http2", "--parallel", "--parallel-max", "10",
        "-H", "Authorization: Bearer secret-token", "-H", "X-Not-Recorded: 1",
        "-w", "%{http_version} %{response_code}\\n",
        f"{base}/size/1000", f"{base}/size/20000", f"{base}/a", f"{base}/trailers",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("2 200") == 4
    http = gateway.wait_events("http", 4)
    assert len(http) == 4
    assert len({e["conn"] for e in http}) == 1, "curl multiplexes them on one connection"
    by_path = {e["path"]: e for e in http}
    assert sorted(by_path) == ["/a", "/size/1000", "/size/20000", "/trailers"]
    assert sorted(e["stream_id"] for e in http) == [1, 3, 5, 7]
    for e in http:
        assert e["http_version"] == "2" and e["method"] == "GET" and e["status"] == 200
        assert e["host"] == f"localhost:{h2_origin.port}"
        assert e["complete"] is True and e["pushed"] is False
        assert ["authorization", "[redacted]"] in e["request_headers"]
        assert all(name != "x-not-recorded" for name, _ in e["request_headers"])
        assert e["user_agent"].startswith("curl/")
        assert e["content_type"] == "text/plain"
        assert e["request_body_bytes"] == 0
    assert by_path["/size/1000"]["response_body_bytes"] == 1000
    assert by_path["/size/20000"]["response_body_bytes"] == 20000
    assert by_path["/trailers"]["response_body_bytes"] == len("hello from /trailers\n")
    close = gateway.wait_match("conn_close", lambda e: e["conn"] == http[0]["conn"])[0]
    assert close["alpn"] == "h2" and close["requests"] == 4
    # curl closes its socket as soon as it has its four answers; frames still in flight to it
    # (the server's GOAWAY, or our close_notify) make its kernel answer with a reset. Any of
    # these is a normal end; a protocol error or an inspector failure is not.
    assert close["close_reason"] in ("client-closed", "upstream-closed", "client-reset")


def test_a_request_body_over_http2_is_counted(gateway: Gateway, h2_origin: H2Origin) -> None:
    body = "b" * 70000  # more than the 65535-byte initial window: flow control must work
    result = curl(gateway, "--http2", "--data-binary", body, "-H", "Content-Type: text/plain",
                  f"https://localhost:{h2_origin.port}/echo")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "70000\n"
    (e,) = gateway.wait_events("http", 1)
    assert e["method"] == "POST" and e["request_body_bytes"] == 70000
    assert e["request_content_type"] == "text/plain" and e["http_version"] == "2"


def test_a_client_offering_h2_to_an_http1_only_server_gets_http1(
    gateway: Gateway, h1_origin: H2Origin
) -> None:
    result = curl(gateway, "--http2", "-w", "%{http_version}",
                  f"https://localhost:{h1_origin.port}/old")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from /old\n1.1"
    (e,) = gateway.wait_events("http", 1)
    assert e["http_version"] == "1.1" and e["stream_id"] is None and e["path"] == "/old"
    close = gateway.wait_match("conn_close", lambda c: c["conn"] == e["conn"])[0]
    assert close["alpn"] == "http/1.1"
    opened = gateway.wait_match("conn_open", lambda c: c["conn"] == e["conn"])[0]
    assert opened["client_alpn"] == ["h2", "http/1.1"]


def test_server_push_gives_an_event_for_the_pushed_stream(
    gateway: Gateway, h2_origin: H2Origin, pki: dict[str, Path]
) -> None:
    tls = tunnel((gateway.host, gateway.port), "localhost", h2_origin.port, gateway.ca_cert)
    client = H2Client(tls, enable_push=True)
    try:
        client.conn.send_headers(1, [(":method", "GET"), (":scheme", "https"),
                                     (":authority", f"localhost:{h2_origin.port}"),
                                     (":path", "/push")], end_stream=True)  # fmt: skip
        client.flush()
        client.pump(lambda evs: client.ended(1) and client.ended(2))
        assert any(isinstance(e, h2.events.PushedStreamReceived) for e in client.events)
        assert client.data(2) == b"hello from /pushed.css\n"
    finally:
        client.close()
    http = gateway.wait_events("http", 2)
    by_stream = {e["stream_id"]: e for e in http}
    assert by_stream[1]["path"] == "/push" and by_stream[1]["pushed"] is False
    pushed = by_stream[2]
    assert pushed["pushed"] is True and pushed["path"] == "/pushed.css"
    assert pushed["method"] == "GET" and pushed["status"] == 200 and pushed["complete"]
    assert pushed["response_body_bytes"] == len(b"hello from /pushed.css\n")


def test_websocket_over_http1_echo_round_trip_gives_upgrade_and_message_events(
    gateway: Gateway, h2_origin: H2Origin, pki: dict[str, Path]
) -> None:
    ctx = ssl.create_default_context(cafile=str(gateway.ca_cert))

    async def session() -> list[Any]:
        uri = f"wss://localhost:{h2_origin.port}/chat"
        async with connect(
            uri, ssl=ctx, proxy=gateway.proxy, open_timeout=10, compression=None
        ) as ws:  # sizes as sent (no deflate)
            await ws.send("hello")
            first = await ws.recv()
            await ws.send(b"\x00\x01" * 3000)  # 6000 bytes: a 16-bit length
            second = await ws.recv()
            await ws.send(["frag-", "mented"])  # 3 frames: websockets ends with an empty one
            third = await ws.recv()
            await ws.send("close")
            try:
                await ws.recv()
            except Exception as exc:  # the server closes with 4001
                return [first, second, third, type(exc).__name__, ws.close_code]
        return [first, second, third]

    got = asyncio.run(asyncio.wait_for(session(), 20))
    assert got[:3] == ["hello", b"\x00\x01" * 3000, "frag-mented"]
    assert got[4] == 4001
    ws_events = gateway.wait_events("websocket", 10)
    upgrade = ws_events[0]
    assert upgrade["kind"] == "upgrade" and upgrade["http_version"] == "1.1"
    assert upgrade["path"] == "/chat" and upgrade["stream_id"] is None
    msgs = [(e["direction"], e["opcode"], e["size"], e["fragments"], e["close_code"])
            for e in ws_events[1:]]  # fmt: skip
    assert msgs[:8] == [
        ("client", "text", 5, 1, None), ("server", "text", 5, 1, None),
        ("client", "binary", 6000, 1, None), ("server", "binary", 6000, 1, None),
        ("client", "text", 11, 3, None), ("server", "text", 11, 1, None),
        ("client", "text", 5, 1, None), ("server", "close", 2, 1, 4001),
    ]  # fmt: skip
    assert ("client", "close", 2, 1, 4001) in msgs[8:]
    assert all("payload" not in e for e in ws_events), "no content capture: no payload"
    (http,) = gateway.wait_events("http", 1)
    assert http["status"] == 101 and http["upgrade"] == "websocket"


def test_websocket_over_http2_extended_connect(
    gateway: Gateway, h2_origin: H2Origin, pki: dict[str, Path]
) -> None:
    tls = tunnel((gateway.host, gateway.port), "localhost", h2_origin.port, gateway.ca_cert)
    client = H2Client(tls)
    try:
        client.pump(lambda evs: any(isinstance(e, h2.events.RemoteSettingsChanged)
                                    for e in evs))  # fmt: skip
        client.conn.send_headers(1, [
            (":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https"),
            (":authority", f"localhost:{h2_origin.port}"), (":path", "/h2chat"),
            ("sec-websocket-version", "13"),
        ])  # fmt: skip
        client.flush()
        client.pump(lambda evs: any(isinstance(e, h2.events.ResponseReceived) for e in evs))
        frames = [Frame(Opcode.TEXT, b"over h2"), Frame(Opcode.TEXT, b"close")]
        for frame in frames:
            client.conn.send_data(1, frame.serialize(mask=True))
        client.flush()
        client.pump(lambda evs: len(client.data(1)) >= 2 + 7 + 4)
        assert client.data(1).startswith(b"\x81\x07over h2")
        closing = Close(1000, "").serialize()
        client.conn.send_data(1, Frame(Opcode.CLOSE, closing).serialize(mask=True), end_stream=True)
        client.flush()
        client.pump(lambda evs: client.ended(1))
    finally:
        client.close()
    ws_events = gateway.wait_events("websocket", 6)
    assert ws_events[0]["kind"] == "upgrade" and ws_events[0]["http_version"] == "2"
    assert ws_events[0]["stream_id"] == 1 and ws_events[0]["path"] == "/h2chat"
    msgs = [(e["direction"], e["opcode"], e["size"], e["close_code"]) for e in ws_events[1:]]
    assert msgs[:4] == [("client", "text", 7, None), ("client", "text", 5, None),
                        ("server", "text", 7, None), ("server", "close", 2, 4001)]  # fmt: skip
    assert ("client", "close", 2, 1000) in msgs
    assert all(e["stream_id"] == 1 for e in ws_events)
    (http,) = gateway.wait_events("http", 1)
    assert http["method"] == "CONNECT" and http["upgrade"] == "websocket"
    assert http["status"] == 200 and http["stream_id"] == 1


def frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, stream id, payload) of the complete frames in ``data``."""
    out, pos = [], 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        sid = int.from_bytes(data[pos + 5 : pos + 9], "big")
        out.append((data[pos + 3], sid, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return out


def test_bytes_breaking_http2_give_a_protocol_error_a_goaway_and_a_clean_close(
    gateway: Gateway, h2_origin: H2Origin
) -> None:
    tls = tunnel((gateway.host, gateway.port), "localhost", h2_origin.port, gateway.ca_cert)
    tls.settimeout(10)
    received = b""
    try:
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        for _ in range(100):  # the server's SETTINGS
            received += tls.recv(65536)
            if any(t == 4 for t, _, _ in frames(received)):
                break
        tls.sendall(bytes([0, 0, 0, 4, 0, 0, 0, 0, 1]))  # SETTINGS on stream 1: not allowed
        for _ in range(100):
            chunk = tls.recv(65536)  # SSLEOFError here if the gateway closed without close_notify
            if not chunk:
                break
            received += chunk
    finally:
        tls.close()
    goaway = [p for t, sid, p in frames(received) if t == 7 and sid == 0]
    assert len(goaway) == 1, frames(received)
    assert goaway[0][4:8] == b"\x00\x00\x00\x01", "error code PROTOCOL_ERROR"
    assert b"protocol_error event" in goaway[0][8:]
    (err,) = gateway.wait_events("protocol_error", 1)
    assert err["stage"] == "http2"
    assert "SETTINGS frame on stream 1" in err["error"]
    close = gateway.wait_match("conn_close", lambda c: c["conn"] == err["conn"])[0]
    assert close["close_reason"] == "protocol-error"


def test_a_large_http2_download_flows_through_many_window_updates(
    gateway: Gateway, h2_origin: H2Origin
) -> None:
    # 5 MB against curl's window: the endpoints' own flow control paces it end to end
    result = curl(gateway, "--http2", "-o", "/dev/null", "-w", "%{size_download}",
                  f"https://localhost:{h2_origin.port}/size/5000000")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "5000000"
    (e,) = gateway.wait_events("http", 1)
    assert e["response_body_bytes"] == 5000000 and e["complete"] and e["http_version"] == "2"


def test_compressed_websocket_messages_and_payloads_under_content_capture(
    tmp_path: Path, pki: dict[str, Path], h2_origin: H2Origin
) -> None:
    pcap_dir = tmp_path / "pcap"
    pcap_dir.mkdir()
    args = ["--workers", "1", "--pcap-dir", str(pcap_dir)]
    with Gateway(tmp_path / "state", upstream_ca=pki["ca"], args=args) as gw:
        ctx = ssl.create_default_context(cafile=str(gw.ca_cert))

        async def session() -> str | bytes:
            uri = f"wss://localhost:{h2_origin.port}/deflate"
            async with connect(uri, ssl=ctx, proxy=gw.proxy, open_timeout=10) as ws:
                await ws.send("a" * 1000)  # permessage-deflate (the default) shrinks it
                return await ws.recv()

        assert asyncio.run(asyncio.wait_for(session(), 20)) == "a" * 1000
        msgs = gw.wait_match("websocket", lambda e: e["kind"] == "message", count=2)
    text = [m for m in msgs if m["opcode"] == "text"]
    assert {m["direction"] for m in text} == {"client", "server"}
    for m in text:
        assert m["compressed"] is True and 0 < m["size"] < 1000
        assert isinstance(m["payload"], bytes) and len(m["payload"]) == m["size"]
    # the client's frame was masked on the wire; the payload is reported unmasked, so both
    # directions carry the same deflated bytes
    assert text[0]["payload"] == text[1]["payload"]


def test_a_client_offering_only_http1_to_an_h2_server_speaks_http1_to_it(
    gateway: Gateway, h2_origin: H2Origin
) -> None:
    # the upstream first validated with h2 offered gets replaced by one made with the
    # client's own offer: both legs then negotiate http/1.1
    result = curl(gateway, "--http1.1", "-w", "%{http_version}",
                  f"https://localhost:{h2_origin.port}/h1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from /h1\n1.1"
    (e,) = gateway.wait_events("http", 1)
    assert e["http_version"] == "1.1" and e["stream_id"] is None
    close = gateway.wait_match("conn_close", lambda c: c["conn"] == e["conn"])[0]
    assert close["alpn"] == "http/1.1"
