"""HTTP/1.x inspection: one HttpExchange per request/response pair, whatever the chunking."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httptools
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from tlsgate.errors import ConfigError, HttpProtocolError
from tlsgate.workers import http1
from tlsgate.workers.http1 import (
    DEFAULT_RECORD_HEADERS,
    DEFAULT_REDACT_HEADERS,
    MAX_NAME_CACHE,
    REDACTED,
    Http1Inspector,
    HttpExchange,
    looks_like_http_request,
)

TIMEOUT = 10.0

GET = b"GET /index.html?q=1 HTTP/1.1\r\nHost: example.com:8443\r\nUser-Agent: test/1.0\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"


def req(method: str = "GET", path: str = "/", *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: example.com", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def resp(status: int = 200, *headers: str, body: bytes = b"", length: bool = True) -> bytes:
    lines = [f"HTTP/1.1 {status} Reason", *headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(*parts: bytes, trailers: Sequence[str] = ()) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p)
    return out + b"0\r\n" + "".join(t + "\r\n" for t in trailers).encode() + b"\r\n"


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def feed(
    inspector: Http1Inspector, request: bytes, response: bytes, size: int = 0
) -> list[HttpExchange]:
    """All request bytes, then all response bytes, in pieces of ``size`` (0: in one go)."""
    out: list[HttpExchange] = []
    for piece in pieces(request, size or len(request) or 1):
        out += inspector.feed_request(piece)
    for piece in pieces(response, size or len(response) or 1):
        out += inspector.feed_response(piece)
    return out


def one(request: bytes, response: bytes, inspector: Http1Inspector | None = None) -> HttpExchange:
    exchanges = feed(inspector or Http1Inspector(), request, response)
    assert len(exchanges) == 1, exchanges
    return exchanges[0]


def refused(inspector: Http1Inspector, request: bytes = b"", response: bytes = b"") -> str:
    with pytest.raises(HttpProtocolError) as caught:
        feed(inspector, request, response)
    return str(caught.value)


# -- one exchange ------------------------------------------------------------------------------


def test_a_request_and_its_response_make_one_complete_exchange() -> None:
    inspector = Http1Inspector()
    assert inspector.feed_request(GET) == []
    [exchange] = inspector.feed_response(OK)
    assert exchange == HttpExchange(
        method="GET",
        host="example.com:8443",
        path="/index.html?q=1",
        version="1.1",
        status=200,
        request_headers=[("host", "example.com:8443"), ("user-agent", "test/1.0")],
        response_headers=[("content-type", "text/plain"), ("content-length", "5")],
        request_body_bytes=0,
        response_body_bytes=5,
        content_type="text/plain",
        request_content_type=None,
        user_agent="test/1.0",
        complete=True,
        upgrade=None,
    )
    assert inspector.finish() == []


def test_only_configured_headers_are_recorded_lower_cased_and_credentials_redacted() -> None:
    request = req(
        "POST",
        "/login",
        "AUTHORIZATION: Basic dXNlcjpwYXNz",
        "cOoKiE: sid=1",
        "Accept-Language: en",
        "Content-Type: application/json",
        body=b"",
    )
    response = resp(302, "Set-Cookie: sid=2", "Location: /home", "Date: today")
    exchange = one(request, response)
    assert exchange.request_headers == [
        ("host", "example.com"),
        ("authorization", REDACTED),
        ("cookie", REDACTED),
        ("content-type", "application/json"),
    ]
    assert exchange.response_headers == [
        ("set-cookie", REDACTED),
        ("location", "/home"),
        ("content-length", "0"),
    ]
    assert exchange.request_content_type == "application/json"
    assert exchange.content_type is None


def test_the_operator_chooses_which_headers_are_recorded_and_redacted() -> None:
    request = req("GET", "/", "X-Api-Key: k", "Accept: */*", "User-Agent: ua")
    inspector = Http1Inspector(
        record_headers=["X-API-Key", "x-trace", "Host"], redact_headers=("X-Api-Key",)
    )
    exchange = one(request, resp(200, "X-Trace: t"), inspector)
    assert exchange.request_headers == [("host", "example.com"), ("x-api-key", REDACTED)]
    assert exchange.response_headers == [("x-trace", "t")]
    assert exchange.user_agent == "ua"  # exchange fields do not depend on the record list


def test_header_values_are_decoded_as_latin_1_so_any_byte_survives() -> None:
    request = b"GET /caf%C3%A9 HTTP/1.1\r\nHost: h\r\nUser-Agent: na\xefve \x80\r\n\r\n"
    exchange = one(request, resp())
    assert exchange.path == "/caf%C3%A9"
    assert exchange.user_agent == "na\xefve \x80"


def test_the_first_user_agent_and_content_type_win() -> None:
    request = req("GET", "/", "User-Agent: first", "User-Agent: second", "Content-Type: q/1")
    request = request[:-2] + b"Content-Type: q/2\r\n\r\n"
    response = resp(200, "Content-Type: a/b", "Content-Type: c/d")
    exchange = one(request, response)
    assert exchange.user_agent == "first"
    assert exchange.request_content_type == "q/1"
    assert exchange.content_type == "a/b"


def test_unusual_header_name_spellings_are_recognised_and_the_spelling_cache_is_bounded() -> None:
    bits_of, _ = http1._name_tables(DEFAULT_RECORD_HEADERS, DEFAULT_REDACT_HEADERS)
    exchange = one(req("GET", "/", "uSeR-aGeNt: odd"), resp())
    assert exchange.user_agent == "odd"
    assert ("user-agent", "odd") in exchange.request_headers
    many = [f"X-{i}: v" for i in range(MAX_NAME_CACHE + 50)]
    inspector = Http1Inspector(max_header_bytes=1 << 20, max_header_count=1 << 20)
    feed(inspector, req("GET", "/", *many), resp())
    assert len(bits_of) <= MAX_NAME_CACHE
    # Once the cache is full, new spellings of configured names still resolve.
    assert one(req("GET", "/", "user-AGENT: late"), resp()).user_agent == "late"


# -- keep-alive, pipelining, chunking ----------------------------------------------------------

KEEP_ALIVE_REQUESTS = [
    req("GET", "/a"),
    req("POST", "/b", "Content-Type: text/plain", "Content-Length: 11", body=b"hello world"),
    req("PUT", "/c", "Transfer-Encoding: chunked", body=chunked(b"abc", b"defgh")),
    req("HEAD", "/d"),
    req("DELETE", "/e"),
]
KEEP_ALIVE_RESPONSES = [
    resp(200, "Content-Type: text/html", body=b"<html>HTTP/1.1 200 OK\r\n\r\n</html>"),
    resp(201, body=b""),
    resp(200, "Transfer-Encoding: chunked", body=chunked(b"x" * 300, b"y"), length=False),
    resp(200, "Content-Length: 12345", length=False),  # HEAD: no body whatever it says
    resp(204, "Content-Length: 7", length=False),  # 204: no body whatever it says
]
KEEP_ALIVE_EXPECTED = [
    ("GET", "/a", 200, 0, 32),
    ("POST", "/b", 201, 11, 0),
    ("PUT", "/c", 200, 8, 301),
    ("HEAD", "/d", 200, 0, 0),
    ("DELETE", "/e", 204, 0, 0),
]


def summary(exchanges: list[HttpExchange]) -> list[tuple[str, str, int | None, int, int]]:
    assert all(x.complete for x in exchanges)
    return [
        (x.method, x.path, x.status, x.request_body_bytes, x.response_body_bytes) for x in exchanges
    ]


@pytest.mark.parametrize("size", [0, 1, 2, 3, 7, 64])
def test_keep_alive_exchanges_come_out_the_same_whatever_the_chunk_size(size: int) -> None:
    inspector = Http1Inspector()
    out = []
    for request, response in zip(KEEP_ALIVE_REQUESTS, KEEP_ALIVE_RESPONSES, strict=True):
        out += feed(inspector, request, response, size)
    assert summary(out) == KEEP_ALIVE_EXPECTED


@pytest.mark.parametrize("size", [0, 1, 5, 29])
def test_pipelined_requests_are_matched_with_their_responses_in_order(size: int) -> None:
    inspector = Http1Inspector()
    out = feed(inspector, b"".join(KEEP_ALIVE_REQUESTS), b"".join(KEEP_ALIVE_RESPONSES), size)
    assert summary(out) == KEEP_ALIVE_EXPECTED


@given(data=st.data())
@settings(max_examples=150, deadline=None)
def test_any_split_of_a_pipelined_stream_gives_the_same_exchanges(data: st.DataObject) -> None:
    request = b"".join(KEEP_ALIVE_REQUESTS)
    response = b"".join(KEEP_ALIVE_RESPONSES)
    cuts_q = sorted(data.draw(st.sets(st.integers(1, len(request) - 1), max_size=12)))
    cuts_r = sorted(data.draw(st.sets(st.integers(1, len(response) - 1), max_size=12)))
    inspector = Http1Inspector()
    out = []
    for a, b in zip([0, *cuts_q], [*cuts_q, len(request)], strict=True):
        out += inspector.feed_request(request[a:b])
    for a, b in zip([0, *cuts_r], [*cuts_r, len(response)], strict=True):
        out += inspector.feed_response(response[a:b])
    assert summary(out) == KEEP_ALIVE_EXPECTED


TRICKY_BODIES = [
    b"",
    b"x",
    b"HTTP/1.1 200 OK\r\n\r\n",
    b"\r\n\r\nHTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n",
    b"0\r\n\r\n",
    bytes(range(256)),
]


@st.composite
def conversation(draw: st.DrawFn) -> tuple[list[bytes], list[bytes], list[tuple], bool]:
    """Random keep-alive traffic: request and response bytes per exchange, expected summary."""
    requests, responses, expected = [], [], []
    count = draw(st.integers(1, 6))
    for i in range(count):
        method = draw(st.sampled_from(["GET", "HEAD", "POST", "PUT", "OPTIONS"]))
        path = f"/{i}"
        body = draw(st.sampled_from(TRICKY_BODIES)) if method in ("POST", "PUT") else b""
        if method in ("POST", "PUT") and draw(st.booleans()):
            parts = [body[:3], body[3:]] if len(body) > 3 else [body]
            requests.append(req(method, path, "Transfer-Encoding: chunked", body=chunked(*parts)))
        elif body:
            requests.append(req(method, path, f"Content-Length: {len(body)}", body=body))
        else:
            requests.append(req(method, path))
        interim = draw(st.sampled_from([b"", b"HTTP/1.1 100 Continue\r\n\r\n"]))
        status = draw(st.sampled_from([200, 201, 204, 304, 404]))
        payload = draw(st.sampled_from(TRICKY_BODIES))
        framing = draw(st.sampled_from(["length", "chunked", "close"]))
        if framing == "close" and (i < count - 1 or method == "HEAD" or status in (204, 304)):
            framing = "length"
        if method == "HEAD" or status in (204, 304):
            announced = draw(st.sampled_from(["Content-Length: 77", "Transfer-Encoding: chunked"]))
            response = resp(status, announced, length=False)
            payload = b""
        elif framing == "length":
            response = resp(status, body=payload)
        elif framing == "chunked":
            response = resp(
                status, "Transfer-Encoding: chunked", body=chunked(payload), length=False
            )
        else:
            response = resp(status, "Connection: close", body=payload, length=False)
        responses.append(interim + response)
        expected.append((method, path, status, len(body), len(payload)))
    return requests, responses, expected, framing == "close"


def split(data: bytes, drawer: st.DataObject) -> list[bytes]:
    cuts = sorted(drawer.draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=6)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if a < b]


@given(conv=conversation(), pipelined=st.booleans(), data=st.data())
@settings(max_examples=400, deadline=None)
def test_random_keep_alive_traffic_in_random_pieces_gives_the_expected_exchanges(
    conv: tuple[list[bytes], list[bytes], list[tuple], bool],
    pipelined: bool,
    data: st.DataObject,
) -> None:
    requests, responses, expected, close_delimited = conv
    inspector = Http1Inspector()
    out: list[HttpExchange] = []
    if pipelined:
        for piece in split(b"".join(requests), data):
            out += inspector.feed_request(piece)
        for piece in split(b"".join(responses), data):
            out += inspector.feed_response(piece)
    else:
        for request, response in zip(requests, responses, strict=True):
            for piece in split(request, data):
                out += inspector.feed_request(piece)
            for piece in split(response, data):
                out += inspector.feed_response(piece)
    assert len(out) == len(expected) - close_delimited
    out += inspector.finish()
    assert summary(out) == expected


def test_chunked_bodies_count_decoded_bytes_and_trailers_are_accepted_but_not_recorded() -> None:
    request = req(
        "POST",
        "/up",
        "Transfer-Encoding: chunked",
        body=chunked(b"a" * 17, b"b" * 300, trailers=["Cookie: in-trailer"]),
    )
    response = resp(
        200,
        "Transfer-Encoding: chunked",
        body=chunked(b"z" * 4096, trailers=["Content-Type: bogus/trailer", "X-Sum: 1"]),
        length=False,
    )
    exchange = one(request, response)
    assert (exchange.request_body_bytes, exchange.response_body_bytes) == (317, 4096)
    assert exchange.content_type is None
    assert ("cookie", REDACTED) not in exchange.request_headers
    assert [n for n, _ in exchange.response_headers] == ["transfer-encoding"]


def test_http_1_0_without_keep_alive_ends_with_a_close_delimited_response() -> None:
    inspector = Http1Inspector()
    assert inspector.feed_request(b"GET /old HTTP/1.0\r\nUser-Agent: lynx\r\n\r\n") == []
    assert inspector.feed_response(b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nsome ") == []
    assert inspector.feed_response(b"bytes") == []
    [exchange] = inspector.finish()
    assert exchange.complete
    assert (exchange.version, exchange.host, exchange.status) == ("1.0", None, 200)
    assert exchange.response_body_bytes == 10


@pytest.mark.parametrize("coding", [b"gzip", b"chunked, gzip", b"chunked , "])
def test_a_body_whose_last_transfer_coding_is_not_chunked_ends_with_the_close(
    coding: bytes,
) -> None:
    inspector = Http1Inspector()
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n3\r\nabc\r\n"
    assert feed(inspector, GET, response) == []
    [exchange] = inspector.finish()
    assert exchange.complete and exchange.response_body_bytes == 8


@pytest.mark.parametrize(
    "response",
    [
        resp(200, body=b"hello")[:-2],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-",
    ],
    ids=["short-content-length", "chunked-not-started", "chunked-cut", "head-cut"],
)
def test_a_response_cut_short_by_the_close_is_reported_incomplete(response: bytes) -> None:
    inspector = Http1Inspector()
    assert feed(inspector, GET, response) == []
    [exchange] = inspector.finish()
    assert not exchange.complete
    assert exchange.method == "GET"


def test_finish_reports_every_unanswered_request_in_order_and_only_once() -> None:
    inspector = Http1Inspector()
    out = feed(inspector, req("GET", "/1") + req("GET", "/2") + req("GET", "/3")[:20], resp())
    assert [x.path for x in out] == ["/1"]
    left = inspector.finish()
    assert [(x.path, x.status, x.complete) for x in left] == [
        ("/2", None, False),
        ("/3", None, False),
    ]
    assert inspector.finish() == []
    with pytest.raises(HttpProtocolError, match="after finish"):
        inspector.feed_request(b"GET")
    with pytest.raises(HttpProtocolError, match="after finish"):
        inspector.feed_response(b"HTTP")


def test_an_early_response_waits_for_the_end_of_its_request_body() -> None:
    inspector = Http1Inspector()
    head = req("POST", "/big", "Content-Length: 10")
    assert inspector.feed_request(head + b"12345") == []
    assert inspector.feed_response(resp(413, body=b"no")) == []
    [exchange] = inspector.feed_request(b"67890")
    assert (exchange.status, exchange.request_body_bytes, exchange.complete) == (413, 10, True)


def test_an_early_response_to_a_request_that_never_ends_is_incomplete() -> None:
    inspector = Http1Inspector()
    inspector.feed_request(req("POST", "/big", "Content-Length: 10") + b"123")
    assert inspector.feed_response(resp(413)) == []
    [exchange] = inspector.finish()
    assert (exchange.status, exchange.complete) == (413, False)


# -- responses whose framing depends on the request --------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5])
def test_a_response_to_head_has_no_body_whatever_its_headers_say(size: int) -> None:
    inspector = Http1Inspector()
    head_responses = [
        resp(200, "Content-Length: 5000", length=False),
        resp(200, "Transfer-Encoding: chunked", length=False),
        resp(200, length=False),  # no length: would be close-delimited after a GET
    ]
    out = []
    for response in head_responses:
        out += feed(inspector, req("HEAD", "/"), response, size)
    out += feed(inspector, req("GET", "/after"), resp(200, body=b"body"), size)
    assert summary(out) == [
        ("HEAD", "/", 200, 0, 0),
        ("HEAD", "/", 200, 0, 0),
        ("HEAD", "/", 200, 0, 0),
        ("GET", "/after", 200, 0, 4),
    ]


@pytest.mark.parametrize("size", [0, 1, 3, 17])
def test_a_head_response_pipelined_behind_a_body_mentioning_http_is_found(size: int) -> None:
    body = b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\nHTTP/"
    requests = req("GET", "/1") + req("HEAD", "/2") + req("GET", "/3") + req("HEAD", "/4")
    responses = (
        resp(200, body=body)
        + resp(200, "Content-Length: 999", length=False)
        + resp(200, "Transfer-Encoding: chunked", body=chunked(body), length=False)
        + resp(200, "Transfer-Encoding: chunked", length=False)
    )
    out = feed(Http1Inspector(), requests, responses, size)
    assert summary(out) == [
        ("GET", "/1", 200, 0, len(body)),
        ("HEAD", "/2", 200, 0, 0),
        ("GET", "/3", 200, 0, len(body)),
        ("HEAD", "/4", 200, 0, 0),
    ]


def test_a_head_response_split_anywhere_near_its_start_or_end_is_delimited_exactly() -> None:
    before = resp(200, body=b"x\r\n")
    head_response = resp(200, "Content-Length: 42", length=False)
    after = resp(200, body=b"HTTP/1.1 200 OK\r\n\r\n")
    stream = before + head_response + after
    start, end = len(before), len(before) + len(head_response)
    cuts = sorted({*range(start - 4, start + 7), *range(end - 6, end + 4)})
    for i, j in ((i, j) for i in cuts for j in cuts if i < j):
        inspector = Http1Inspector()
        inspector.feed_request(req("GET", "/1") + req("HEAD", "/2") + req("GET", "/3"))
        out = []
        for piece in (stream[:i], stream[i:j], stream[j:]):
            out += inspector.feed_response(piece)
        assert summary(out) == [
            ("GET", "/1", 200, 0, 3),
            ("HEAD", "/2", 200, 0, 0),
            ("GET", "/3", 200, 0, 19),
        ], (i, j)


def test_blank_lines_before_a_head_response_do_not_end_its_head_early() -> None:
    out = feed(
        Http1Inspector(),
        req("HEAD", "/"),
        b"\r\n\r\n\r\n" + resp(200, "Content-Length: 9", length=False),
    )
    assert summary(out) == [("HEAD", "/", 200, 0, 0)]


def test_a_special_response_that_does_not_start_with_http_is_refused() -> None:
    requests = req("GET", "/") + req("HEAD", "/")
    responses = resp(200) + b"RTSP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n"
    assert "could not delimit" in refused(Http1Inspector(), requests, responses)


@pytest.mark.parametrize("size", [0, 1, 9])
def test_interim_responses_belong_to_the_exchange_of_the_final_response(size: int) -> None:
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        + b"HTTP/1.1 103 Early Hints\r\nContent-Type: early/hint\r\nLink: </s.css>\r\n\r\n"
    )
    post = req("POST", "/", "Expect: 100-continue", "Content-Length: 4", body=b"data")
    final = resp(201, "Content-Type: final/type", body=b"ok")
    head_final = resp(201, "Content-Type: final/type", "Content-Length: 2", length=False)
    for request, response in ((post, interim + final), (req("HEAD", "/"), interim + head_final)):
        [exchange] = feed(Http1Inspector(), request, response, size)
        assert exchange.status == 201
        assert exchange.content_type == "final/type"
        assert exchange.response_headers[0] == ("content-type", "final/type")


def test_an_interim_response_alone_leaves_the_exchange_without_status() -> None:
    inspector = Http1Inspector()
    feed(inspector, req("HEAD", "/", "Expect: 100-continue"), b"HTTP/1.1 100 Continue\r\n\r\n")
    [exchange] = inspector.finish()
    assert (exchange.status, exchange.complete, exchange.response_headers) == (None, False, [])


def test_204_and_304_responses_have_no_body_whatever_their_headers_say() -> None:
    out = feed(
        Http1Inspector(),
        req("GET", "/1") + req("GET", "/2") + req("GET", "/3"),
        resp(204, "Content-Length: 10", length=False)
        + resp(304, "Transfer-Encoding: chunked", length=False)
        + resp(200, body=b"x"),
    )
    assert summary(out) == [
        ("GET", "/1", 204, 0, 0),
        ("GET", "/2", 304, 0, 0),
        ("GET", "/3", 200, 0, 1),
    ]


# -- protocol switches -------------------------------------------------------------------------

WS_REQUEST = req(
    "GET", "/chat", "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13"
)
WS_101 = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\r\n"
WS_FRAMES = b"\x81\x05hello\x88\x00"


@pytest.mark.parametrize("size", [0, 1, 4])
def test_a_101_switches_the_connection_to_opaque_and_later_bytes_are_ignored(size: int) -> None:
    inspector = Http1Inspector()
    # A client may send frames before the 101 arrives: they are not parsed as HTTP.
    out = feed(inspector, WS_REQUEST + WS_FRAMES, WS_101 + WS_FRAMES + b"not HTTP", size)
    [exchange] = out
    assert (exchange.status, exchange.upgrade, exchange.complete) == (101, "websocket", True)
    assert inspector.opaque
    assert feed(inspector, WS_FRAMES + b"\x00garbage", WS_FRAMES) == []
    assert inspector.finish() == []


def test_the_protocol_is_the_one_the_server_chose_among_those_offered() -> None:
    request = req("GET", "/", "Upgrade: h2c, WebSocket", "Connection: Upgrade")
    [exchange] = feed(Http1Inspector(), request, WS_101)
    assert exchange.upgrade == "websocket"


def test_a_101_without_an_upgrade_header_takes_the_protocol_from_the_request() -> None:
    inspector = Http1Inspector()
    [exchange] = feed(inspector, WS_REQUEST, b"HTTP/1.1 101 OK\r\n\r\n" + WS_FRAMES)
    assert exchange.upgrade == "websocket"
    assert inspector.opaque


@pytest.mark.parametrize("head", [b"HEAD", b"GET"])
def test_a_101_to_a_request_that_did_not_ask_for_an_upgrade_is_refused(head: bytes) -> None:
    request = head + b" / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n"  # no Connection
    assert "did not ask" in refused(Http1Inspector(), request, WS_101)


@pytest.mark.parametrize("size", [0, 1])
def test_a_2xx_to_connect_switches_to_opaque_whatever_its_headers_say(size: int) -> None:
    inspector = Http1Inspector()
    request = b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n"
    answer = b"HTTP/1.1 200 Connection established\r\nContent-Length: 100\r\n\r\n"
    out = feed(inspector, request, answer + b"\x16\x03\x01 tunnel bytes", size)
    [exchange] = out
    assert (exchange.method, exchange.path, exchange.status) == ("CONNECT", "db.internal:5432", 200)
    assert exchange.upgrade is None and inspector.opaque


def test_a_refused_connect_or_upgrade_continues_as_http() -> None:
    inspector = Http1Inspector()
    out = feed(inspector, b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n", resp(407, body=b"auth!"))
    out += feed(inspector, WS_REQUEST, resp(426, "Content-Length: 3", length=False) + b"no!")
    out += feed(inspector, req("GET", "/next"), resp(200, body=b"ok"))
    assert summary(out) == [
        ("CONNECT", "a:1", 407, 0, 5),
        ("GET", "/chat", 426, 0, 3),
        ("GET", "/next", 200, 0, 2),
    ]
    assert [x.upgrade for x in out] == [None, None, None]
    assert not inspector.opaque


def test_bytes_sent_before_the_answer_to_an_upgrade_are_refused_if_it_is_refused() -> None:
    inspector = Http1Inspector()
    assert inspector.feed_request(WS_REQUEST + b"GET /smuggled HTTP/1.1\r\n\r\n") == []
    assert "possible request smuggling" in refused(inspector, b"", resp(400))


def test_after_a_switch_client_bytes_are_ignored_even_if_its_request_was_unfinished() -> None:
    inspector = Http1Inspector()
    inspector.feed_request(b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n")
    assert inspector.feed_response(b"HTTP/1.1 200 OK\r\n\r\n") == []
    assert inspector.opaque
    assert inspector.feed_request(b"\r\n\x16\x03\x01 not HTTP") == []
    [connect] = inspector.finish()
    assert (connect.method, connect.status, connect.complete) == ("CONNECT", 200, False)


def test_a_connect_refused_before_the_request_ended_does_not_block_the_connection() -> None:
    inspector = Http1Inspector()
    inspector.feed_request(b"CONNECT a:1 HTTP/1.1\r\n")
    assert inspector.feed_response(resp(400)) == []
    [refused_connect] = inspector.feed_request(b"Host: a:1\r\n\r\n")
    assert refused_connect.status == 400 and not inspector.opaque
    [after] = feed(inspector, req("GET", "/after"), resp(200))
    assert after.path == "/after"


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",  # bare LF
        b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    ],
)
def test_a_client_sending_something_other_than_http_1_is_refused(garbage: bytes) -> None:
    message = refused(Http1Inspector(), garbage)
    assert "client request is not valid HTTP/1.1" in message


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b""])
def test_only_http_1_0_and_1_1_requests_are_inspected(version: bytes) -> None:
    request = b"GET / " + version + b"\r\nHost: a\r\n\r\n" if version else b"GET /\r\n\r\n"
    assert "only HTTP/1.0 and HTTP/1.1" in refused(Http1Inspector(), request)


@pytest.mark.parametrize(
    "request_line", [b"DESCRIBE / RTSP/1.0\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]
)
def test_a_method_of_another_protocol_is_refused(request_line: bytes) -> None:
    assert "not an HTTP method" in refused(Http1Inspector(), request_line)


def test_two_host_headers_are_refused() -> None:
    request = b"GET / HTTP/1.1\r\nHost: good\r\nhost: evil\r\n\r\n"
    assert "two Host headers" in refused(Http1Inspector(), request)


def test_an_invalid_response_is_refused() -> None:
    assert "upstream response is not valid" in refused(Http1Inspector(), GET, b"HTTP/1.1 2x0\r\n")


def test_a_response_without_a_request_is_refused() -> None:
    assert "no request was outstanding" in refused(Http1Inspector(), b"", resp(408))
    inspector = Http1Inspector()
    feed(inspector, GET, OK)
    assert "no request was outstanding" in refused(inspector, b"", resp(200))


def test_too_many_pipelined_requests_are_refused() -> None:
    inspector = Http1Inspector(max_pending=3)
    assert feed(inspector, req() * 3, b"") == []
    assert "pipelined more than 3" in refused(inspector, req())
    inspector = Http1Inspector(max_pending=3)  # answered ones do not count
    for _ in range(5):
        assert len(feed(inspector, req() * 3, resp() * 3)) == 3


def test_after_an_error_every_feed_raises_but_finish_still_reports() -> None:
    inspector = Http1Inspector()
    inspector.feed_request(req("GET", "/ok"))
    first = refused(inspector, b"\x00garbage")
    for attempt in (lambda: inspector.feed_request(GET), lambda: inspector.feed_response(OK)):
        with pytest.raises(HttpProtocolError, match="already stopped") as caught:
            attempt()
        assert first in str(caught.value)
    [cut] = inspector.finish()
    assert (cut.path, cut.complete) == ("/ok", False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_header_bytes": 0}, "max_header_bytes"),
        ({"max_pending": 0}, "max_pending"),
        ({"record_headers": ["Host", "bad name"]}, "'bad name' is not an HTTP header name"),
        ({"redact_headers": ["caf\xe9"]}, "is not an HTTP header name"),
        ({"record_headers": [""]}, "is not an HTTP header name"),
        ({"record_headers": ["x-\x00"]}, "is not an HTTP header name"),
        ({"record_headers": "host"}, "must be a list of header names"),
    ],
)
def test_invalid_settings_are_an_operator_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Http1Inspector(**kwargs)


def test_errors_from_the_parser_glue_become_protocol_errors_and_our_bugs_propagate() -> None:
    from httptools import HttpParserCallbackError, HttpParserError

    inspector = Http1Inspector()
    glue = HttpParserCallbackError("User callback error")
    glue.__context__ = HttpParserError("invalid headers state")
    assert "invalid headers state" in str(inspector._translate(glue, "client request"))
    bug = HttpParserCallbackError("User callback error")
    bug.__context__ = KeyError("oops")
    with pytest.raises(KeyError):
        inspector._translate(bug, "client request")


# -- bounded memory ----------------------------------------------------------------------------


def padded(size: int, *, line: int = 1000) -> bytes:
    """A GET whose header section is exactly ``size`` bytes (request line through CRLF CRLF)."""
    start = b"GET / HTTP/1.1\r\n"
    filler = []
    left = size - len(start) - 2
    while left > 0:
        take = min(line, left)
        assert take >= 5, "choose sizes that leave room for a whole header line"
        filler.append(b"X: " + b"v" * (take - 5) + b"\r\n")
        left -= take
    data = start + b"".join(filler) + b"\r\n"
    assert len(data) == size
    return data


@pytest.mark.parametrize("size", [0, 1500])
def test_a_request_header_section_at_the_limit_passes_and_one_byte_more_is_refused(
    size: int,
) -> None:
    limit = 6000
    ok = padded(limit)
    assert len(feed(Http1Inspector(max_header_bytes=limit), ok, resp(), size)) == 1
    too_big = padded(limit + 1)
    assert "exceeds 6000 bytes" in refused(Http1Inspector(max_header_bytes=limit), too_big)


def test_a_response_header_section_above_the_limit_is_refused() -> None:
    big = [f"X-{i}: {'v' * 90}" for i in range(100)]
    for method in ("GET", "HEAD"):
        inspector = Http1Inspector(max_header_bytes=8000)
        message = refused(inspector, req(method, "/"), resp(200, *big))
        assert "response header section exceeds 8000 bytes" in message


@pytest.mark.parametrize("side", ["request", "response"])
def test_one_endless_header_line_is_cut_off_while_it_streams_in(side: str) -> None:
    inspector = Http1Inspector(max_header_bytes=4096)
    feed_side = inspector.feed_request if side == "request" else inspector.feed_response
    if side == "response":
        inspector.feed_request(GET)
    feed_side(b"GET / HTTP/1.1\r\nX: " if side == "request" else b"HTTP/1.1 200 OK\r\nX: ")
    with pytest.raises(HttpProtocolError, match=f"{side} header section exceeds"):
        for _ in range(100):
            feed_side(b"v" * 100)


def test_an_endless_head_response_head_is_cut_off_while_it_streams_in() -> None:
    inspector = Http1Inspector(max_header_bytes=4096)
    inspector.feed_request(req("HEAD", "/"))
    inspector.feed_response(b"HTTP/1.1 200 OK\r\nX: ")
    with pytest.raises(HttpProtocolError, match="response header section exceeds"):
        for _ in range(100):
            inspector.feed_response(b"v" * 100)


@pytest.mark.parametrize("side", ["request", "response"])
def test_trailers_are_capped_like_a_header_section(side: str) -> None:
    trailers = [f"X-{i}: {'t' * 90}" for i in range(60)]
    body = chunked(b"data", trailers=trailers)
    inspector = Http1Inspector(max_header_bytes=4096)
    if side == "request":
        message = refused(inspector, req("POST", "/", "Transfer-Encoding: chunked", body=body))
    else:
        response = resp(200, "Transfer-Encoding: chunked", body=body, length=False)
        message = refused(inspector, GET, response)
    assert f"{side} header section exceeds 4096" in message


@pytest.mark.parametrize("side", ["request", "response"])
def test_an_endless_trailer_line_is_cut_off_while_it_streams_in(side: str) -> None:
    inspector = Http1Inspector(max_header_bytes=4096)
    if side == "request":
        feed_side = inspector.feed_request
        feed_side(req("POST", "/", "Transfer-Encoding: chunked") + b"1\r\nx\r\n0\r\nX: ")
    else:
        feed_side = inspector.feed_response
        inspector.feed_request(GET)
        feed_side(resp(200, "Transfer-Encoding: chunked", length=False) + b"0\r\nX: ")
    with pytest.raises(HttpProtocolError, match=f"{side} header section exceeds"):
        for _ in range(100):
            feed_side(b"v" * 100)


@pytest.mark.parametrize("ends_in_next_head", [False, True])
def test_bytes_after_the_end_of_a_header_section_do_not_count_toward_its_limit(
    ends_in_next_head: bool,
) -> None:
    body = b"b" * 5000
    request = req("POST", "/", f"Content-Length: {len(body)}", body=body)
    response = resp(200, body=body)
    if ends_in_next_head:
        request += b"GET /next HTTP/1.1\r\nX: 1"
        response += b"HTTP/1.1 200 OK\r\nX: 1"
    inspector = Http1Inspector(max_header_bytes=1024)
    out = []
    # Per side: one feed ending inside the header section, one closing it with 5000 bytes more.
    for piece in (request[:20], request[20:]):
        out += inspector.feed_request(piece)
    for piece in (response[:20], response[20:]):
        out += inspector.feed_response(piece)
    assert summary(out) == [("POST", "/", 200, len(body), len(body))]


def test_a_large_chunked_body_in_small_chunks_is_not_mistaken_for_a_header_section() -> None:
    body = chunked(*([b"z" * 50] * 400))
    request = req("POST", "/", "Transfer-Encoding: chunked", body=body)
    response = resp(200, "Transfer-Encoding: chunked", body=body, length=False)
    [exchange] = feed(Http1Inspector(max_header_bytes=1024), request, response, 7)
    assert exchange.request_body_bytes == exchange.response_body_bytes == 20000


# -- the contract under arbitrary input ----------------------------------------------------------

VALID_STREAMS = [
    (b"".join(KEEP_ALIVE_REQUESTS), b"".join(KEEP_ALIVE_RESPONSES)),
    (WS_REQUEST, WS_101 + WS_FRAMES),
    (b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n", resp(407, body=b"x") + resp(200)),
    (
        req("POST", "/", "Expect: 100-continue", "Transfer-Encoding: chunked", body=chunked(b"q"))
        + req("HEAD", "/"),
        b"HTTP/1.1 100 Continue\r\n\r\n" + resp(200, body=b"y") + resp(200, "Content-Length: 3"),
    ),
]


def mutate(data: bytes, draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["keep", "truncate", "flip", "insert", "delete"]))
    if kind == "keep" or not data:
        return data
    at = draw(st.integers(0, len(data) - 1))
    if kind == "truncate":
        return data[:at]
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    if kind == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    return data[:at] + data[at + draw(st.integers(1, 8)) :]


@st.composite
def traffic(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    """A feed schedule: valid-ish or random streams, mutated, split and interleaved."""
    if draw(st.booleans()):
        request, response = draw(st.sampled_from(VALID_STREAMS))
        for _ in range(draw(st.integers(0, 3))):
            request = mutate(request, draw)
            response = mutate(response, draw)
    else:
        request, response = draw(st.binary(max_size=300)), draw(st.binary(max_size=300))
    schedule = []
    for side, data in (("request", request), ("response", response)):
        cuts = sorted(draw(st.sets(st.integers(0, len(data)), max_size=8)))
        schedule += [(side, data[a:b]) for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    order = draw(st.permutations(range(len(schedule))))
    return [schedule[i] for i in order] if draw(st.booleans()) else schedule


@given(schedule=traffic(), limits=st.sampled_from([(65536, 64), (40, 2), (200, 1)]))
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(schedule=[("request", b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nX\r\n")],
         limits=(65536, 64))  # fmt: skip
def test_feeds_return_a_list_or_raise_http_protocol_error_and_nothing_else(
    schedule: list[tuple[str, bytes]], limits: tuple[int, int]
) -> None:
    inspector = Http1Inspector(max_header_bytes=limits[0], max_pending=limits[1])
    failed = False
    for side, data in schedule:
        method = inspector.feed_request if side == "request" else inspector.feed_response
        try:
            out = method(data)
        except HttpProtocolError as exc:
            assert str(exc)
            failed = True
            continue
        assert not failed, "a dead inspector must keep raising"
        assert isinstance(out, list)
        assert all(isinstance(x, HttpExchange) and x.complete for x in out)
    left = inspector.finish()
    assert isinstance(left, list) and len(left) <= limits[1] + 1
    assert inspector.finish() == []


@given(st.binary(max_size=64))
def test_random_bytes_never_escape_the_contract(data: bytes) -> None:
    assume(data)
    for side in ("request", "response"):
        inspector = Http1Inspector()
        try:
            getattr(inspector, f"feed_{side}")(data)
        except HttpProtocolError:
            pass
        assert isinstance(inspector.finish(), list)


# -- sniffing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (b"GET / HTTP/1.1\r\n", True),
        (b"M-SEARCH * HTTP/1.1\r\n", True),
        (b"MKCALENDAR /x HTTP/1.1", True),
        (b"QUERY ", True),
        (b"get / HTTP/1.1\r\n", False),  # methods are case-sensitive
        (b"GET", False),
        (b"GETX / HTTP/1.1", False),
        (b"PRI * HTTP/2.0\r\n", False),
        (b"DESCRIBE rtsp://x RTSP/1.0", False),
        (b" GET /", False),
        (b"\x16\x03\x01\x02\x00\x01\x00", False),
        (b"", False),
    ],
)
def test_the_sniff_recognises_an_http_method_followed_by_a_space(
    first: bytes, expected: bool
) -> None:
    assert looks_like_http_request(first) is expected


# -- real clients and servers ------------------------------------------------------------------


@dataclass
class Recorded:
    request: bytes = b""


class _EndOfMessage:
    """httptools protocol noting where the first request ends (the canned server's only need)."""

    def __init__(self, ended: list[bool]) -> None:
        self.ended = ended

    def on_message_complete(self) -> None:
        self.ended.append(True)


def canned_server(answer: bytes, recorded: Recorded) -> tuple[socket.socket, threading.Thread]:
    """A plain-TCP listener on 127.0.0.1:0 that records one request and answers ``answer``."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            ended: list[bool] = []
            parser = httptools.HttpRequestParser(_EndOfMessage(ended))
            while not ended and (data := conn.recv(65536)):
                recorded.request += data
                parser.feed_data(data)
            conn.sendall(answer)
            conn.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def run_curl(args: list[str], answer: bytes) -> bytes:
    recorded = Recorded()
    listener, thread = canned_server(answer, recorded)
    port = listener.getsockname()[1]
    with listener:
        subprocess.run(
            [
                "curl",
                "-sS",
                "--http1.1",
                "--max-time",
                str(TIMEOUT),
                "-o",
                os.devnull,
                *args,
                f"http://127.0.0.1:{port}/path?x=1",
            ],
            check=True,
            timeout=TIMEOUT + 5,
            stdin=subprocess.DEVNULL,
        )
        thread.join(TIMEOUT)
    assert not thread.is_alive()
    return recorded.request


def test_what_curl_sends_is_inspected() -> None:
    answer = resp(200, "Content-Type: text/plain", "Connection: close", body=b"pong")
    request = run_curl(["-H", "Authorization: Bearer s3cret", "-A", "curl-test"], answer)
    exchange = one(request, answer)
    assert (exchange.method, exchange.path, exchange.status) == ("GET", "/path?x=1", 200)
    assert exchange.host == exchange.request_headers[0][1]
    assert exchange.host.startswith("127.0.0.1:")
    assert exchange.user_agent == "curl-test"
    assert ("authorization", REDACTED) in exchange.request_headers
    assert b"s3cret" in request and "s3cret" not in repr(exchange)


def test_a_chunked_upload_from_curl_is_inspected() -> None:
    answer = resp(201, "Connection: close")
    request = run_curl(
        ["-H", "Transfer-Encoding: chunked", "-H", "Content-Type: application/x-test",
         "--data-binary", "x" * 3000],
        answer,
    )  # fmt: skip
    exchange = one(request, answer)
    assert (exchange.method, exchange.request_body_bytes, exchange.status) == ("POST", 3000, 201)
    assert exchange.request_content_type == "application/x-test"


def test_a_head_request_from_curl_is_inspected() -> None:
    answer = resp(200, "Content-Length: 123456", "Connection: close", length=False)
    request = run_curl(["-I"], answer)
    exchange = one(request, answer)
    assert (exchange.method, exchange.status, exchange.response_body_bytes) == ("HEAD", 200, 0)


class _Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test output is about the inspector."""


def test_what_python_http_server_answers_is_inspected(tmp_path: Path) -> None:
    (tmp_path / "page.html").write_bytes(b"<h1>hi</h1>" * 100)

    def handler(*args: object) -> _Handler:
        return _Handler(*args, directory=str(tmp_path))  # type: ignore[arg-type]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        requests = (
            req("GET", "/page.html")
            + req("HEAD", "/page.html")
            + req("GET", "/page.html")
            + req("GET", "/missing")  # errors close the connection (send_error)
        )
        answer = b""
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=TIMEOUT) as conn:
            conn.sendall(requests)
            while data := conn.recv(65536):
                answer += data
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)
    for size in (0, 1, 13):
        inspector = Http1Inspector()
        out = feed(inspector, requests, answer, size) + inspector.finish()
        assert [(x.method, x.status, x.response_body_bytes, x.complete) for x in out] == [
            ("GET", 200, 1100, True),
            ("HEAD", 200, 0, True),
            ("GET", 200, 1100, True),
            ("GET", 404, out[3].response_body_bytes, True),
        ]
        assert out[0].content_type == "text/html"
        assert out[3].response_body_bytes > 0
        assert ("server", out[0].response_headers[0][1]) == out[0].response_headers[0]
