"""The CONNECT request parser and the replies that open or refuse a tunnel."""

from __future__ import annotations

import httptools
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlsgate.errors import ConnectLimitExceeded, ConnectRequestError
from tlsgate.workers.connect import (
    MAX_CONNECT_HEADER_BYTES,
    MAX_REFUSAL_REASON_CHARS,
    ConnectRequest,
    connect_established,
    connect_refusal,
    parse_connect,
)

CURL = (
    b"CONNECT www.example.com:443 HTTP/1.1\r\n"
    b"Host: www.example.com:443\r\n"
    b"User-Agent: curl/7.88.1\r\n"
    b"Proxy-Connection: Keep-Alive\r\n"
    b"\r\n"
)
CLIENT_HELLO_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def request(target: bytes, *headers: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    lines = [b"CONNECT " + target + b" " + version, *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def refused(data: bytes) -> ConnectRequestError:
    with pytest.raises(ConnectRequestError) as caught:
        parse_connect(data)
    return caught.value


# -- accepted requests ---------------------------------------------------------------------


def test_a_complete_request_gives_host_port_and_the_bytes_to_consume() -> None:
    parsed = parse_connect(CURL + CLIENT_HELLO_START)
    assert parsed == ConnectRequest(
        host="www.example.com",
        port=443,
        host_is_ip=False,
        header_length=len(CURL),
        user_agent="curl/7.88.1",
        has_proxy_authorization=False,
    )


def test_none_is_returned_while_the_header_block_is_incomplete() -> None:
    for cut in range(len(CURL)):
        assert parse_connect(CURL[:cut]) is None
    assert parse_connect(CURL) is not None


def test_proxy_authorization_is_noted_but_its_value_is_not_kept() -> None:
    secret = b"Basic dXNlcjpodW50ZXIy"
    parsed = parse_connect(request(b"a.example:443", b"Proxy-Authorization: " + secret))
    assert parsed is not None
    assert parsed.has_proxy_authorization
    assert secret.decode() not in repr(parsed)
    assert parsed.user_agent is None


def test_the_first_user_agent_is_kept_without_surrounding_whitespace() -> None:
    parsed = parse_connect(
        request(b"a.example:443", b"user-agent: \t Mozilla/5.0 (X11) \t", b"User-Agent: second")
    )
    assert parsed is not None
    assert parsed.user_agent == "Mozilla/5.0 (X11)"


@pytest.mark.parametrize(
    ("target", "host", "port", "is_ip"),
    [
        (b"Example.COM.:8443", "example.com", 8443, False),
        (b"_dmarc.example:443", "_dmarc.example", 443, False),
        (b"xn--bcher-kva.example:443", "xn--bcher-kva.example", 443, False),
        (b"192.0.2.10:443", "192.0.2.10", 443, True),
        (b"[2001:DB8:0::1]:443", "2001:db8::1", 443, True),
        (b"[::1]:65535", "::1", 65535, True),
        (b"a.example:1", "a.example", 1, False),
    ],
)
def test_host_names_ipv4_and_bracketed_ipv6_targets_are_accepted_in_canonical_form(
    target: bytes, host: str, port: int, is_ip: bool
) -> None:
    parsed = parse_connect(request(target))
    assert parsed is not None
    assert (parsed.host, parsed.port, parsed.host_is_ip) == (host, port, is_ip)


def test_http_1_0_is_accepted() -> None:
    assert parse_connect(request(b"a.example:443", version=b"HTTP/1.0")) is not None


def test_a_zero_content_length_is_accepted() -> None:
    assert parse_connect(request(b"a.example:443", b"Content-Length: 0")) is not None


def test_a_header_block_ending_exactly_at_the_limit_is_accepted() -> None:
    head = request(b"a.example:443", b"X-Pad: ")
    padded = head[:-4] + b"p" * (MAX_CONNECT_HEADER_BYTES - len(head)) + b"\r\n\r\n"
    assert len(padded) == MAX_CONNECT_HEADER_BYTES
    parsed = parse_connect(padded)
    assert parsed is not None
    assert parsed.header_length == MAX_CONNECT_HEADER_BYTES


# -- refused requests ----------------------------------------------------------------------


def test_a_header_block_larger_than_8192_bytes_is_refused_with_431() -> None:
    data = request(b"a.example:443", b"X-Pad: " + b"p" * MAX_CONNECT_HEADER_BYTES)
    error = refused(data[:MAX_CONNECT_HEADER_BYTES])
    assert error.status == 431
    assert refused(data).status == 431


def limit_refusal(data: bytes, **limits: int) -> ConnectLimitExceeded:
    with pytest.raises(ConnectLimitExceeded) as caught:
        parse_connect(data, **limits)
    return caught.value


def test_the_configured_header_size_bounds_the_request_and_names_its_setting() -> None:
    data = request(b"a.example:443", b"X-Pad: " + b"p" * 600)
    assert parse_connect(data, max_bytes=1024) is not None
    error = limit_refusal(data[:512], max_bytes=512)  # refused before the block is complete
    assert (error.status, error.limit) == (431, "max_connect_header_bytes")
    assert "512" in str(error)


def test_a_request_line_longer_than_max_request_line_is_refused_with_414() -> None:
    data = request(b".".join([b"a" * 50] * 4) + b".example:443")
    assert parse_connect(data, max_request_line=len(data.split(b"\r\n")[0])) is not None
    error = limit_refusal(data, max_request_line=100)
    assert (error.status, error.limit) == (414, "max_request_line")
    assert limit_refusal(data[:120], max_request_line=100).limit == "max_request_line"
    # a line exactly at the limit whose LF has not arrived yet is not too long
    line = data.split(b"\r\n")[0]
    assert parse_connect(line + b"\r", max_request_line=len(line)) is None


def test_more_header_lines_than_max_header_count_are_refused_with_431() -> None:
    headers = [b"X-%d: v" % i for i in range(5)]
    assert parse_connect(request(b"a.example:443", *headers), max_header_count=5) is not None
    error = limit_refusal(request(b"a.example:443", *headers, b"X-6: v"), max_header_count=5)
    assert (error.status, error.limit) == (431, "max_header_count")
    incomplete = request(b"a.example:443", *headers, b"X-6: v")[:-2]
    assert limit_refusal(incomplete, max_header_count=5).limit == "max_header_count"


@pytest.mark.parametrize(
    "data",
    [
        b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n",
        b"GET / HTTP/1.1\r\n",  # refused before the header block is complete
        b"connect a.example:443 HTTP/1.1\r\n\r\n",  # methods are case-sensitive
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # an HTTP/2 client's preface
    ],
)
def test_a_method_other_than_connect_is_refused_with_405(data: bytes) -> None:
    error = refused(data)
    assert error.status == 405
    assert "tlsgate is an HTTPS (CONNECT) proxy only" in str(error)


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (request(b"a.example"), "the port is required"),
        (request(b"a.example:"), "no port in 1..65535"),
        (request(b"a.example:0"), "no port in 1..65535"),
        (request(b"a.example:65536"), "no port in 1..65535"),
        (request(b"a.example:https"), "no port in 1..65535"),
        (request(b"a.example:+443"), "no port in 1..65535"),
        (request(b":443"), "the host name is empty"),
        (request(b"a.example:443", version=b"HTTP/2.0"), "is not 'CONNECT host:port HTTP/1.1'"),
        (request(b"a.example:443", version=b"HTTP/1.1 x"), "is not 'CONNECT host:port HTTP/1.1'"),
        (request(b" a.example:443"), "is not 'CONNECT host:port HTTP/1.1'"),
        (request(b"user@a.example:443"), "other than letters"),
        (request(b"::1:443"), "must be in brackets"),
        (request(b"[::1]443"), "is not '[IPv6 address]:port'"),
        (request(b"[::1:443"), "is not '[IPv6 address]:port'"),
        (request(b"[fe80::1%25eth0]:443"), "no valid IPv6 address"),
        (request(b"[not-an-address]:443"), "no valid IPv6 address"),
        (request(b"192.0.2.256:443"), "no valid IPv4 address"),
        (request(b"127.1:443"), "IP address literal"),  # resolvers read it as 127.0.0.1
        (request(b"0x7f000001:443"), "IP address literal"),
        (request(b"a..example:443"), "empty label"),
        (request("bücher.example:443".encode()), "xn--"),
        (request(b"a" * 250 + b".example:443"), "at most 253"),
        (request(b"a.example:443", b"Transfer-Encoding: chunked"), "Transfer-Encoding"),
        (request(b"a.example:443", b"Content-Length: 5"), "Content-Length"),
        (request(b"a.example:443", b"No colon here"), "is not 'name: value'"),
        (request(b"a.example:443", b"Bad Name: x"), "is not 'name: value'"),
        (request(b"a.example:443", b"Name : x"), "is not 'name: value'"),
        (request(b"a.example:443", b"X-Ok: 1", b" folded: x"), "folding"),
        (request(b"a.example:443", b"X-Ctl: a\x00b"), "control character"),
        (b"CONNECT a.example:443 HTTP/1.1\nHost: a\r\n\r\n", "is not 'CONNECT host:port"),
        (b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\rb\r\n\r\n", "control character"),
        (b"CONNECT a.example:443 HTTP/1.1\n", "bare CR or LF"),  # header incomplete
        (b"CONNECT a.example:443 HTTP/1.1\r\nHost: x\nmore", "bare CR or LF"),
        (b"C@NNECT a.example:443 HTTP/1.1\r\n", "does not start with a method"),
        (b"\r\n\r\n", "is not 'CONNECT host:port HTTP/1.1'"),
    ],
)
def test_malformed_requests_are_refused_with_400_saying_what_is_wrong(
    data: bytes, complaint: str
) -> None:
    error = refused(data)
    assert error.status == 400
    assert str(error).startswith("bad CONNECT request: ")
    assert complaint in str(error)


def test_a_malformed_header_is_refused_before_the_header_block_is_complete() -> None:
    assert refused(b"CONNECT a.example:443 HTTP/1.1\r\nTransfer-Encoding: x\r\n").status == 400


# -- replies -------------------------------------------------------------------------------


def test_connect_established_is_the_200_response() -> None:
    assert connect_established() == b"HTTP/1.1 200 Connection established\r\n\r\n"


class _Response:
    def __init__(self, data: bytes) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.complete = False
        self.parser = httptools.HttpResponseParser(self)
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def test_connect_refusal_is_a_complete_http_response_with_the_reason_as_body() -> None:
    data = connect_refusal(502, "upstream certificate rejected: certificate has expired")
    assert data.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    response = _Response(data)
    assert response.complete
    assert response.parser.get_status_code() == 502
    assert response.headers[b"content-type"] == b"text/plain"
    assert response.headers[b"connection"] == b"close"
    assert response.headers[b"content-length"] == str(len(response.body)).encode()
    assert response.body == b"upstream certificate rejected: certificate has expired\n"


def test_connect_refusal_uses_the_standard_reason_phrase() -> None:
    assert connect_refusal(431, "x").startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert connect_refusal(405, "x").startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    with pytest.raises(ValueError):
        connect_refusal(999, "x")


def test_connect_refusal_reason_cannot_inject_lines_or_grow_unbounded() -> None:
    injected = _Response(connect_refusal(403, "blocked\r\nSet-Cookie: a=b\n\u00e9"))
    assert b"set-cookie" not in injected.headers
    assert injected.body == b"blocked  Set-Cookie: a=b ?\n"
    long = _Response(connect_refusal(502, "x" * 10_000))
    assert long.complete
    assert len(long.body) == MAX_REFUSAL_REASON_CHARS + 1
    assert long.body.endswith(b"...\n")


# -- any input: a request, None, or ConnectRequestError ------------------------------------


def outcome(data: bytes) -> None:
    try:
        result = parse_connect(data)
    except ConnectRequestError as exc:
        assert exc.status in (400, 405, 414, 431)
        return
    if result is not None:
        assert 0 < result.header_length <= min(len(data), MAX_CONNECT_HEADER_BYTES)
        assert 1 <= result.port <= 65535


@given(st.binary(max_size=400))
def test_any_bytes_give_a_request_none_or_a_connect_request_error(data: bytes) -> None:
    outcome(data)


_pieces = st.sampled_from(
    [b"CONNECT ", b"GET ", b" ", b":", b"443", b"[", b"]", b"::1", b"a.example", b"\r\n",
     b"\r\n\r\n", b"\n", b"\r", b"HTTP/1.1", b"Host: x", b"Proxy-Authorization: y",
     b"User-Agent: z", b"\x00", b"\xff", b".", b"-", b"_", b"%", b"Content-Length: 1"]
)  # fmt: skip


@given(st.lists(st.one_of(_pieces, st.binary(max_size=8)), max_size=30))
def test_request_like_bytes_give_a_request_none_or_a_connect_request_error(
    pieces: list[bytes],
) -> None:
    outcome(b"".join(pieces))
    outcome(b"CONNECT " + b"".join(pieces) + b"\r\n\r\n")
