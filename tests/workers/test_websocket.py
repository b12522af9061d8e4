"""The WebSocket inspector: recorded real sessions (the ``websockets`` client against
hypercorn, over HTTP/1.1 and over HTTP/2 extended CONNECT), frames from the ``websockets``
sans-I/O serializer, RFC 6455 rules, and arbitrary bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode

from tests.workers.test_http2 import recorded
from tlsgate.workers.appinspect import new_inspector
from tlsgate.workers.websocket import (
    WebSocketInspector,
    WebSocketMessage,
    WebSocketOpened,
    WebSocketProtocolError,
)


def session(name: str, alpn: bytes, cap: int | None) -> list[object]:
    insp = new_inspector(alpn, record_headers=[], redact_headers=[], ws_payload_cap=cap)
    assert insp is not None
    out: list[object] = []
    for direction, data in recorded(name):
        out.extend((insp.feed_client if direction == "client" else insp.feed_server)(data))
    return out


def summary(reports: list[object]) -> list[tuple[str, str, int, int, int | None]]:
    return [(m.direction, m.opcode, m.size, m.fragments, m.close_code)
            for m in reports if isinstance(m, WebSocketMessage)]  # fmt: skip


def test_an_http1_upgrade_then_every_message_in_both_directions() -> None:
    reports = session("ws-h1-websockets.json", b"http/1.1", None)
    opened = [r for r in reports if isinstance(r, WebSocketOpened)]
    assert opened == [WebSocketOpened("1.1", None, opened[0].host, "/chat")]
    assert summary(reports) == [
        ("client", "text", 5, 1, None), ("server", "text", 5, 1, None),
        ("client", "binary", 70000, 1, None), ("server", "binary", 70000, 1, None),
        ("client", "text", 11, 3, None), ("server", "text", 11, 1, None),
        ("client", "text", 5, 1, None), ("server", "close", 2, 1, 4001),
        ("client", "close", 2, 1, 4001),
    ]  # fmt: skip
    assert all(m.payload is None for m in reports if isinstance(m, WebSocketMessage))


def test_under_content_capture_the_first_payload_bytes_are_kept_unmasked() -> None:
    msgs = [r for r in session("ws-h1-websockets.json", b"http/1.1", 8)
            if isinstance(r, WebSocketMessage)]  # fmt: skip
    assert [m.payload for m in msgs[:6]] == [b"hello", b"hello", b"\0" * 8, b"\0" * 8,
                                             b"frag-men", b"frag-men"]  # fmt: skip


def test_a_websocket_over_http2_extended_connect() -> None:
    reports = session("ws-h2-extended-connect.json", b"h2", 64)
    assert next(r for r in reports if isinstance(r, WebSocketOpened)).stream_id == 1
    assert summary(reports) == [
        ("client", "text", 7, 1, None), ("server", "text", 7, 1, None),
        ("client", "close", 5, 1, 1000), ("server", "close", 5, 1, 1000),
    ]  # fmt: skip
    msgs = [r for r in reports if isinstance(r, WebSocketMessage)]
    assert msgs[0].payload == b"over h2" and msgs[2].payload == b"\x03\xe8bye"


def test_a_control_frame_between_fragments_is_its_own_message() -> None:
    ws = WebSocketInspector(payload_cap=100)
    data = (Frame(Opcode.TEXT, b"ab", fin=False).serialize(mask=True)
            + Frame(Opcode.PING, b"p").serialize(mask=True)
            + Frame(Opcode.CONT, b"cd").serialize(mask=True))  # fmt: skip
    out = ws.feed_client(data)
    assert [(m.opcode, m.size, m.fragments, m.payload) for m in out] == [
        ("ping", 1, 1, b"p"), ("text", 4, 2, b"abcd")]  # fmt: skip


def test_a_huge_message_is_counted_as_it_streams_with_bounded_memory() -> None:
    ws = WebSocketInspector(payload_cap=16)
    header = bytes([0x82, 127]) + (10**9).to_bytes(8, "big")  # 1 GB binary, server side
    assert ws.feed_server(header) == []
    chunk = b"\0" * 65536
    for _ in range(10**9 // 65536):
        assert ws.feed_server(chunk) == []
    (msg,) = ws.feed_server(b"\0" * (10**9 % 65536))
    assert msg.size == 10**9 and msg.payload == b"\0" * 16


CLOSE_1000 = Frame(Opcode.CLOSE, Close(1000, "").serialize()).serialize(mask=False)


@pytest.mark.parametrize(
    ("side", "data", "error"),
    [
        ("client", Frame(Opcode.TEXT, b"x").serialize(mask=False), "not masked"),
        ("server", Frame(Opcode.TEXT, b"x").serialize(mask=True), "is masked"),
        ("server", bytes([0x83, 0]), "reserved opcode 0x3"),
        ("server", bytes([0x80, 0]), "continuation frame with no fragmented message"),
        ("server", bytes([0x09, 0]), "control frame .* fragmented"),
        ("server", bytes([0x89, 126, 0, 126]) + b"x" * 126, "longer than 125"),
        ("server", bytes([0x88, 1, 0]), "1-byte payload"),
        ("server", bytes([0xA1, 0]), "RSV2/RSV3"),
        ("server", bytes([0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0]), "top bit"),
        ("server", bytes([0x01, 0, 0x81, 0]), "new text message while a fragmented"),
        ("server", CLOSE_1000 + b"\x81\x00", "after its close frame"),
    ],
)  # fmt: skip
def test_rfc6455_violations_are_refused(side: str, data: bytes, error: str) -> None:
    ws = WebSocketInspector()
    feed = ws.feed_client if side == "client" else ws.feed_server
    with pytest.raises(WebSocketProtocolError, match=error):
        feed(data)
    with pytest.raises(WebSocketProtocolError, match="already broken"):
        ws.feed_client(b"")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=300)), max_size=8),
       st.one_of(st.none(), st.integers(0, 64)))  # fmt: skip
def test_arbitrary_bytes_raise_only_the_protocol_error(
    chunks: list[tuple[bool, bytes]], cap: int | None
) -> None:
    ws = WebSocketInspector(payload_cap=cap)
    try:
        for from_client, data in chunks:
            for msg in (ws.feed_client if from_client else ws.feed_server)(data):
                assert msg.size >= 0 and (cap is None or len(msg.payload or b"") <= cap)
    except WebSocketProtocolError:
        pass
