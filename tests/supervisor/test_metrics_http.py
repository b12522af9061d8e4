"""The metrics endpoint's protocol, sans I/O: a request head in, the response out."""

from __future__ import annotations

import pytest

from tlsgate.supervisor.metrics_http import CONTENT_TYPE, answer

TEXT = "# HELP tlsgate_x X.\n# TYPE tlsgate_x gauge\ntlsgate_x 1\n"


def render() -> str:
    return TEXT


def split(response: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines), body


def test_get_metrics_answers_the_exposition_text_and_closes() -> None:
    status, headers, body = split(answer(b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n", render))
    assert status == "HTTP/1.1 200 OK"
    assert headers["Content-Type"] == CONTENT_TYPE
    assert headers["Connection"] == "close"
    assert body == TEXT.encode() and headers["Content-Length"] == str(len(body))


def test_head_answers_the_headers_without_the_body() -> None:
    status, headers, body = split(answer(b"HEAD /metrics HTTP/1.0\r\n\r\n", render))
    assert (status, body) == ("HTTP/1.1 200 OK", b"")
    assert headers["Content-Length"] == str(len(TEXT))


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
        (b"POST /metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 405 Method Not Allowed"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"GET /metrics\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"GET /metrics SPDY/3\r\n\r\n", "HTTP/1.1 400 Bad Request"),
    ],
)
def test_anything_but_get_metrics_gets_an_error_and_no_metrics(head: bytes, status: str) -> None:
    got, _, body = split(answer(head, render))
    assert got == status
    assert b"tlsgate_x" not in body


def test_a_query_string_is_ignored() -> None:
    assert answer(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n", render).startswith(b"HTTP/1.1 200")
