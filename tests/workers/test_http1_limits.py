"""The HTTP/1.x inspector's bounds: request line, header count, header bytes (each named
by the setting it exceeds), no body ever kept, and the request-head marker the worker's
header timeout samples."""

from __future__ import annotations

import tracemalloc

import pytest

from tests.workers.test_http1 import req, resp
from tlsgate.errors import HttpLimitExceeded
from tlsgate.workers.http1 import Http1Inspector


def limit_hit(inspector: Http1Inspector, request: bytes = b"", response: bytes = b"") -> str:
    with pytest.raises(HttpLimitExceeded) as caught:
        if request:
            inspector.feed_request(request)
        if response:
            inspector.feed_response(response)
    return caught.value.limit


def test_a_request_line_longer_than_max_request_line_is_refused_naming_the_setting() -> None:
    assert Http1Inspector(max_request_line=200).feed_request(req("GET", "/" + "a" * 150)) == []
    inspector = Http1Inspector(max_request_line=200)
    assert limit_hit(inspector, req("GET", "/" + "a" * 250)) == "max_request_line"


def test_a_long_request_line_streamed_in_small_pieces_is_cut_off_while_it_streams() -> None:
    inspector = Http1Inspector(max_request_line=100, max_header_bytes=4096)
    inspector.feed_request(b"GET /")
    with pytest.raises(HttpLimitExceeded) as caught:
        for _ in range(100):  # bounded: the limit trips long before 100 x 50 bytes
            inspector.feed_request(b"a" * 50)
    assert caught.value.limit in ("max_request_line", "max_header_bytes")


def test_more_header_lines_than_max_header_count_are_refused_in_requests_and_responses() -> None:
    headers = [f"X-{i}: v" for i in range(20)]
    assert Http1Inspector(max_header_count=21).feed_request(req("GET", "/", *headers)) == []
    assert limit_hit(Http1Inspector(max_header_count=20), req("GET", "/", *headers)) == (
        "max_header_count"
    )
    inspector = Http1Inspector(max_header_count=20)
    inspector.feed_request(req("GET", "/"))
    assert limit_hit(inspector, response=resp(200, *headers)) == "max_header_count"


def test_the_header_count_starts_again_for_each_message() -> None:
    inspector = Http1Inspector(max_header_count=12)
    headers = [f"X-{i}: v" for i in range(10)]  # plus Host: 11 of 12
    for _ in range(5):
        inspector.feed_request(req("GET", "/", *headers))
        [exchange] = inspector.feed_response(resp(200, *headers))
        assert exchange.complete


def test_a_header_section_larger_than_max_header_bytes_is_a_limit_hit() -> None:
    inspector = Http1Inspector(max_header_bytes=1024)
    assert limit_hit(inspector, req("GET", "/", "X-Big: " + "b" * 2000)) == "max_header_bytes"


def test_bodies_are_counted_never_buffered() -> None:
    """64 MiB of request and response body through one inspector: its memory does not grow
    with the body (a buffered body would show as megabytes allocated)."""
    inspector = Http1Inspector()
    size = 64 * 1024 * 1024
    piece = b"x" * 65536
    tracemalloc.start()
    try:
        inspector.feed_request(req("POST", "/upload", f"Content-Length: {size}"))
        for _ in range(size // len(piece)):
            inspector.feed_request(piece)
        inspector.feed_response(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        exchanges = []
        for _ in range(size // len(piece)):
            exchanges += inspector.feed_response(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    [exchange] = exchanges
    assert exchange.request_body_bytes == size and exchange.response_body_bytes == size
    assert peak < 1024 * 1024, f"the inspector held {peak} bytes while bodies streamed"


def test_request_head_id_marks_a_head_in_progress_and_changes_with_each_head() -> None:
    inspector = Http1Inspector()
    assert inspector.request_head_id is None
    inspector.feed_request(b"GET / HTTP/1.1\r\nHost: a\r\n")
    first = inspector.request_head_id
    assert first is not None
    inspector.feed_request(b"X-Slow: 1\r\n")
    assert inspector.request_head_id == first  # the same head, still trickling in
    inspector.feed_request(b"\r\n")
    assert inspector.request_head_id is None  # complete: no longer a head
    inspector.feed_response(resp(200))
    inspector.feed_request(b"GET /2 HTTP/1.1\r\n")
    assert inspector.request_head_id not in (None, first)
