"""The HTTP/2 inspector, fed byte streams recorded between real clients and a real server
(tests/workers/data: curl 7.88 and nghttp 1.52 against hypercorn, TLS terminated by a
recorder), and arbitrary bytes."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.settings
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsgate.workers.http1 import HttpExchange
from tlsgate.workers.http2 import PREFACE, Http2Inspector, Http2ProtocolError, Report

DATA = Path(__file__).parent / "data"


def recorded(name: str) -> list[tuple[str, bytes]]:
    return [(d, base64.b64decode(b)) for d, b in json.loads((DATA / name).read_text())]


def replay(chunks: list[tuple[str, bytes]], inspector: Http2Inspector | None = None,
           split: int = 0) -> list[Report]:  # fmt: skip
    """Feed the chunks (each cut into ``split``-byte pieces if ``split``), then finish."""
    insp = inspector or Http2Inspector(record_headers=["user-agent", "authorization"])
    out: list[Report] = []
    for direction, data in chunks:
        feed = insp.feed_client if direction == "client" else insp.feed_server
        pieces = [data[i : i + split] for i in range(0, len(data), split)] if split else [data]
        for piece in pieces:
            out.extend(feed(piece))
    out.extend(insp.finish())
    return out


def exchanges(reports: list[Report]) -> dict[int, HttpExchange]:
    return {r.stream_id or 0: r for r in reports if isinstance(r, HttpExchange)}


def test_curl_multiplexed_streams_each_become_a_complete_exchange() -> None:
    got = exchanges(replay(recorded("h2-curl-multiplexed.json")))
    assert sorted(got) == [1, 3, 5]
    assert [got[s].path for s in (1, 3, 5)] == ["/size/1000", "/size/70000", "/trailers"]
    assert [got[s].response_body_bytes for s in (1, 3, 5)] == [1000, 70000, 21]
    for ex in got.values():
        assert ex.version == "2" and ex.method == "GET" and ex.status == 200 and ex.complete
        assert ex.request_headers == [("user-agent", "curl/7.88.1"),
                                      ("authorization", "[redacted]")]  # fmt: skip
        assert ex.content_type == "text/plain" and ex.host is not None


def test_one_byte_at_a_time_gives_the_same_reports() -> None:
    chunks = recorded("h2-curl-multiplexed.json")
    assert replay(chunks, split=1) == replay(chunks)


def test_a_request_body_is_counted_without_padding_or_framing() -> None:
    (ex,) = exchanges(replay(recorded("h2-curl-post.json"))).values()
    assert ex.method == "POST" and ex.request_body_bytes == 12813
    assert ex.response_body_bytes == len(b"12813\n")


def test_a_pushed_stream_is_its_own_exchange_marked_pushed() -> None:
    got = exchanges(replay(recorded("h2-nghttp-push.json")))
    assert got[13].path == "/push" and not got[13].pushed
    assert got[2].path == "/pushed.css" and got[2].pushed and got[2].method == "GET"
    assert got[2].status == 200 and got[2].complete and got[2].response_body_bytes == 23


def test_streams_cut_short_by_the_close_are_reported_incomplete() -> None:
    chunks = recorded("h2-curl-multiplexed.json")
    first_data = next(i for i, (d, c) in enumerate(chunks) if d == "server" and i > 3)
    got = exchanges(replay(chunks[:first_data]))
    assert got and all(not ex.complete for ex in got.values())


def pair() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection, Http2Inspector]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    insp = Http2Inspector()
    hello = client.data_to_send()
    insp.feed_client(hello)
    server.receive_data(hello)
    hello = server.data_to_send()
    insp.feed_server(hello)
    client.receive_data(hello)
    return client, server, insp


REQUEST = [(":method", "GET"), (":scheme", "https"), (":authority", "a.test"), (":path", "/")]


def test_a_reset_stream_is_reported_incomplete_at_once() -> None:
    client, _server, insp = pair()
    client.send_headers(1, REQUEST, end_stream=True)
    assert insp.feed_client(client.data_to_send()) == []
    client.reset_stream(1)
    (ex,) = insp.feed_client(client.data_to_send())
    assert isinstance(ex, HttpExchange) and ex.stream_id == 1 and not ex.complete


def respond(client: h2.connection.H2Connection, server: h2.connection.H2Connection,
            insp: Http2Inspector, body: bytes, declared: int) -> None:  # fmt: skip
    """A GET answered with ``body`` under ``content-length: declared``, END_STREAM not yet sent."""
    client.send_headers(1, REQUEST, end_stream=True)
    request = client.data_to_send()
    insp.feed_client(request)
    server.receive_data(request)
    server.send_headers(1, [(":status", "200"), ("content-length", str(declared))])
    server.send_data(1, body)
    assert insp.feed_server(server.data_to_send()) == []


def test_a_client_resetting_after_the_whole_declared_body_has_a_complete_exchange() -> None:
    # curl resets a stream (STREAM_CLOSED) once content-length is met, before END_STREAM arrives
    client, server, insp = pair()
    respond(client, server, insp, b"x" * 100, declared=100)
    client.reset_stream(1, error_code=h2.errors.ErrorCodes.STREAM_CLOSED)
    (ex,) = insp.feed_client(client.data_to_send())
    assert isinstance(ex, HttpExchange) and ex.response_body_bytes == 100 and ex.complete


def test_a_reset_or_close_before_the_declared_body_is_whole_is_incomplete() -> None:
    client, server, insp = pair()
    respond(client, server, insp, b"x" * 99, declared=100)
    client.reset_stream(1)
    (ex,) = insp.feed_client(client.data_to_send())
    assert isinstance(ex, HttpExchange) and not ex.complete
    client, server, insp = pair()
    respond(client, server, insp, b"x" * 99, declared=100)
    (ex,) = insp.finish()
    assert isinstance(ex, HttpExchange) and not ex.complete


def test_a_close_after_the_whole_declared_body_has_a_complete_exchange() -> None:
    client, server, insp = pair()
    respond(client, server, insp, b"x" * 100, declared=100)
    (ex,) = insp.finish()
    assert isinstance(ex, HttpExchange) and ex.complete


def test_trailers_and_interim_responses_belong_to_their_stream() -> None:
    client, server, insp = pair()
    client.send_headers(1, REQUEST, end_stream=True)
    request = client.data_to_send()
    insp.feed_client(request)
    server.receive_data(request)
    server.send_headers(1, [(":status", "103"), ("link", "</a.css>")])
    server.send_headers(1, [(":status", "200"), ("content-type", "text/html")])
    server.send_data(1, b"x" * 10)
    server.send_headers(1, [("x-checksum", "1")], end_stream=True)
    (ex,) = insp.feed_server(server.data_to_send())
    assert isinstance(ex, HttpExchange)
    assert ex.status == 200 and ex.response_body_bytes == 10 and ex.complete


@pytest.mark.parametrize(
    ("client_bytes", "error"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "connection preface"),
        (PREFACE + bytes([0, 0, 0, 6, 0, 0, 0, 0, 0]), "first frame is PING"),
        (PREFACE + bytes([0, 0, 0, 4, 0, 0, 0, 0, 1]), "SETTINGS frame on stream 1"),
        (PREFACE + bytes([0, 0, 5, 4, 0, 0, 0, 0, 0]) + b"12345", r"not 6\*n"),
        (PREFACE + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0x40, 1, 6, 0, 0, 0, 0, 0]),
         "exceeds the receiver's SETTINGS_MAX_FRAME_SIZE"),
        (PREFACE + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 2, 1, 5, 0, 0, 0, 2]) + b"\xff\xff",
         "HPACK"),
        (PREFACE + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1]),
         "DATA on stream 1, which was never opened"),
    ],
)  # fmt: skip
def test_protocol_violations_are_refused_naming_the_rule(client_bytes: bytes, error: str) -> None:
    insp = Http2Inspector()
    with pytest.raises(Http2ProtocolError, match=error):
        insp.feed_client(client_bytes)
    with pytest.raises(Http2ProtocolError, match="already broken"):
        insp.feed_client(b"")


def test_too_many_open_streams_are_refused() -> None:
    insp = Http2Inspector(max_streams=3)
    insp.feed_client(PREFACE + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.data_to_send()
    for sid in (1, 3, 5):
        client.send_headers(sid, REQUEST)
    insp.feed_client(client.data_to_send())
    client.send_headers(7, REQUEST)
    with pytest.raises(Http2ProtocolError, match="more than 3 streams"):
        insp.feed_client(client.data_to_send())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.binary(max_size=512))
def test_arbitrary_bytes_after_the_preface_raise_only_the_protocol_error(
    client: bytes, server: bytes
) -> None:
    insp = Http2Inspector()
    try:
        insp.feed_client(PREFACE + client)
        insp.feed_server(server)
    except Http2ProtocolError:
        pass
    insp.finish()


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_recorded_streams_with_arbitrary_bytes_changed_raise_only_the_protocol_error(
    data: st.DataObject,
) -> None:
    chunks = recorded("h2-nghttp-push.json")
    i = data.draw(st.integers(0, len(chunks) - 1))
    direction, chunk = chunks[i]
    at = data.draw(st.integers(0, len(chunk) - 1))
    junk = data.draw(st.binary(min_size=1, max_size=8))
    chunks[i] = (direction, chunk[:at] + junk + chunk[at + 1 :])
    try:
        replay(chunks)
    except Http2ProtocolError:
        pass


def test_after_an_error_goaway_is_offered_only_where_the_relayed_bytes_end_on_a_frame() -> None:
    client, _server, insp = pair()
    client.send_headers(1, REQUEST, end_stream=True)
    insp.feed_client(client.data_to_send())
    insp.feed_server(bytes([0, 0, 8, 6, 0, 0, 0, 0]))  # half a PING header, relayed
    with pytest.raises(Http2ProtocolError):
        insp.feed_client(bytes([0, 0, 0, 4, 0, 0, 0, 0, 1]))
    assert insp.goaway(to_client=True) == b"", "the client got a partial frame: add nothing"
    to_server = insp.goaway(to_client=False)
    assert to_server[:9] == bytes([0, 0, len(to_server) - 9, 7, 0, 0, 0, 0, 0])
    assert to_server[9:17] == bytes([0, 0, 0, 0, 0, 0, 0, 1])  # no pushes; PROTOCOL_ERROR


def test_goaway_to_a_client_the_server_never_answered_starts_with_settings() -> None:
    insp = Http2Inspector()
    insp.feed_client(PREFACE + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
    with pytest.raises(Http2ProtocolError):
        insp.feed_client(bytes([0, 0, 0, 4, 0, 0, 0, 0, 1]))
    to_client = insp.goaway(to_client=True)
    assert to_client[:9] == bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
    assert to_client[12] == 7 and to_client[18:22] == bytes(4)  # last stream id 0


def test_a_push_promise_to_a_client_that_disabled_push_is_refused() -> None:
    insp = Http2Inspector()
    no_push = bytes([0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0])  # SETTINGS_ENABLE_PUSH=0
    insp.feed_client(PREFACE + no_push)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.data_to_send()
    client.send_headers(1, REQUEST, end_stream=True)
    insp.feed_client(client.data_to_send())
    insp.feed_server(bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
    promise = bytes([0, 0, 5, 5, 4, 0, 0, 0, 1, 0, 0, 0, 2, 0x82])  # promised 2, ":method GET"
    with pytest.raises(Http2ProtocolError, match="client disabled push"):
        insp.feed_server(promise)


def test_hpack_follows_a_table_size_the_receiver_granted_in_its_settings() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.HEADER_TABLE_SIZE: 65536}
    )
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    insp = Http2Inspector(record_headers=["x-big"])

    def client_to_server() -> list[Report]:
        data = client.data_to_send()
        server.receive_data(data)
        return insp.feed_client(data)

    def server_to_client() -> list[Report]:
        # not handed to the h2 client: its decoder applies its own setting only later
        return insp.feed_server(server.data_to_send())

    server.initiate_connection()
    client.initiate_connection()
    client_to_server()
    server_to_client()
    got: list[Report] = []
    for i in range(8):  # 8 x 6000-byte values: only a table larger than 4096 indexes them
        sid = 1 + 2 * i
        client.send_headers(sid, REQUEST, end_stream=True)
        client_to_server()
        server.send_headers(sid, [(":status", "200"), ("x-big", "v" * 6000)], end_stream=True)
        got.extend(server_to_client())
    assert server.encoder.header_table_size == 65536
    assert [r.response_headers for r in got if isinstance(r, HttpExchange)] == [
        [("x-big", "v" * 6000)]
    ] * 8
