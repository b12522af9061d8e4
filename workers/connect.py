"""Sans-I/O parser for the HTTP CONNECT request of an explicit-proxy client, and replies.

The worker peeks at the first bytes and calls :func:`parse_connect` until it returns a
:class:`ConnectRequest`; it then consumes ``header_length`` bytes (what follows may
already be the ClientHello) and answers with :func:`connect_established` or, on a
:class:`~tlsgate.errors.ConnectRequestError`, with :func:`connect_refusal`.

Rules (RFC 9110 section 9.3.6, RFC 9112):

- Bounded by ``[limits]`` (the caller passes them; the defaults are the settings'
  defaults): the header block ends with CRLF CRLF within ``max_bytes``
  (``max_connect_header_bytes``, 8192), else 431; the request line is at most
  ``max_request_line`` bytes, else 414; at most ``max_header_count`` header lines, else
  431. Each is raised as :class:`~tlsgate.errors.ConnectLimitExceeded` naming the setting,
  as soon as the bytes received prove it (no waiting for the rest).
  Lines end with CRLF (a bare CR or LF is refused); no obsolete line folding.
- Request line: ``CONNECT SP host:port SP HTTP/1.x`` with single spaces. Another method
  is refused with 405 (tlsgate is an HTTPS proxy only); anything else malformed with 400.
- Target (authority-form, port required, 1..65535): a host name (see
  :func:`~tlsgate.workers.clienthello.normalize_hostname`: letters, digits, ``-``, ``_``,
  labels <= 63, <= 253 characters, lower-cased, trailing dot stripped, xn-- A-labels as
  sent), a dotted-quad IPv4 address, or a bracketed IPv6 address (``[::1]:443``); IP
  addresses are returned in canonical form. Names whose last label is a number
  (``127.1``, ``0x7f000001``) are refused: resolvers read them as IPv4 addresses.
- Headers: ``name: value`` with a token name and no control characters in the value. We
  keep only whether ``Proxy-Authorization`` is present (never its value) and the first
  ``User-Agent``. A CONNECT request has no content: ``Transfer-Encoding`` or a non-zero
  ``Content-Length`` is refused with 400.
- Raises :class:`~tlsgate.errors.ConnectRequestError` (``status`` set) and nothing else,
  for any input.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from http import HTTPStatus

from tlsgate.errors import ConnectLimitExceeded, ConnectRequestError
from tlsgate.workers.clienthello import normalize_hostname
from tlsgate.workers.http1 import MAX_HEADER_COUNT, MAX_REQUEST_LINE

#: Largest request line plus headers (CRLF CRLF included) we wait for, by default
#: (``limits.max_connect_header_bytes``).
MAX_CONNECT_HEADER_BYTES = 8192
#: Longest reason text put in a refusal body (characters, before the newline).
MAX_REFUSAL_REASON_CHARS = 300
#: Longest User-Agent value kept (characters).
MAX_USER_AGENT_CHARS = 512

_END = b"\r\n\r\n"
_CRLF = b"\r\n"
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_REQUEST_LINE = re.compile(rb"([^ ]+) ([^ ]+) HTTP/1\.([0-9])")
_PORT = re.compile(rb"[0-9]{1,5}")
_IPV4 = re.compile(rb"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
# Field values: visible ASCII, obs-text, SP and HTAB; no other control characters.
_BAD_VALUE_CHAR = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Bytes that may not appear in a reason put into a refusal body.
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")

_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A well-formed ``CONNECT host:port`` request."""

    #: Host name (lower-case, no trailing dot) or IP address in canonical form (no brackets).
    host: str
    port: int
    host_is_ip: bool
    #: Bytes of request line and headers, CRLF CRLF included: consume these from the socket.
    header_length: int
    user_agent: str | None
    has_proxy_authorization: bool


def _bad(detail: str, status: int = 400) -> ConnectRequestError:
    return ConnectRequestError(f"bad CONNECT request: {detail}", status)


def _show(data: bytes, limit: int = 64) -> str:
    return repr(data[:limit]) + ("..." if len(data) > limit else "")


def parse_connect(
    data: bytes,
    *,
    max_bytes: int = MAX_CONNECT_HEADER_BYTES,
    max_request_line: int = MAX_REQUEST_LINE,
    max_header_count: int = MAX_HEADER_COUNT,
) -> ConnectRequest | None:
    """Parse the CONNECT request at the start of ``data``.

    Returns ``None`` while the header block is incomplete (and below the limits), a
    :class:`ConnectRequest` once it is complete, or raises :class:`ConnectRequestError`
    as soon as the bytes cannot be an acceptable CONNECT request.
    """
    line_end = data.find(_CRLF, 0, max_request_line + 2)
    if line_end < 0:  # the line so far (its CR may have come without the LF yet)
        line_end = len(data) - data.endswith(b"\r")
    if line_end > max_request_line:
        raise ConnectLimitExceeded(
            f"CONNECT request line is longer than {max_request_line} bytes (max_request_line)",
            414, "max_request_line",
        )  # fmt: skip
    end = data.find(_END, 0, max_bytes)
    if end < 0:
        if len(data) >= max_bytes:
            raise ConnectLimitExceeded(
                f"CONNECT request header is larger than {max_bytes} bytes "
                "(max_connect_header_bytes)",
                431, "max_connect_header_bytes",
            )  # fmt: skip
        # Check what is complete already, so garbage is refused without waiting.
        complete = data.rfind(_CRLF)
        tail = data[complete + 2 :] if complete >= 0 else data
        if b"\n" in tail or b"\r" in tail[:-1]:
            raise _bad("lines must end with CRLF (bare CR or LF found)")
        if complete >= 0:
            lines = data[:complete].split(_CRLF)
            _check_header_count(lines, max_header_count)
            _parse_request_line(lines[0])
            _parse_headers(lines[1:])
        return None
    # A bare CR or LF inside a line fails the request-line, name or value checks.
    lines = data[:end].split(_CRLF)
    _check_header_count(lines, max_header_count)
    host, port, is_ip = _parse_request_line(lines[0])
    user_agent, has_auth = _parse_headers(lines[1:])
    return ConnectRequest(
        host=host,
        port=port,
        host_is_ip=is_ip,
        header_length=end + len(_END),
        user_agent=user_agent,
        has_proxy_authorization=has_auth,
    )


def _check_header_count(lines: list[bytes], max_header_count: int) -> None:
    """``lines``: the request line, then header lines."""
    if len(lines) - 1 > max_header_count:
        raise ConnectLimitExceeded(
            f"CONNECT request has more than {max_header_count} header lines "
            "(max_header_count)",
            431, "max_header_count",
        )  # fmt: skip


def _parse_request_line(line: bytes) -> tuple[str, int, bool]:
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        method = line.split(b" ", 1)[0]
        if method != b"CONNECT" and _TOKEN.fullmatch(method):
            raise _method_not_allowed(method)
        raise _bad(f"request line {_show(line)} is not 'CONNECT host:port HTTP/1.1'")
    method, target, _minor = match.groups()
    if method != b"CONNECT":
        if _TOKEN.fullmatch(method) is None:
            raise _bad(f"request line {_show(line)} does not start with a method")
        raise _method_not_allowed(method)
    return _parse_target(target)


def _method_not_allowed(method: bytes) -> ConnectRequestError:
    return ConnectRequestError(
        f"method {_show(method, 16)} not allowed: tlsgate is an HTTPS (CONNECT) proxy only; "
        "send plain-HTTP requests directly or use https:// URLs",
        405,
    )


def _parse_target(target: bytes) -> tuple[str, int, bool]:
    if target.startswith(b"["):
        close = target.find(b"]")
        if close < 0 or target[close + 1 : close + 2] != b":":
            raise _bad(f"target {_show(target)} is not '[IPv6 address]:port'")
        host_part, port_part = target[1:close], target[close + 2 :]
        port = _parse_port(port_part, target)
        try:
            if b"%" in host_part:
                raise ValueError("zone identifiers are not accepted")
            address = ipaddress.IPv6Address(host_part.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            raise _bad(f"target {_show(target)} holds no valid IPv6 address") from None
        return str(address), port, True
    host_part, colon, port_part = target.rpartition(b":")
    if not colon:
        raise _bad(f"target {_show(target)} is not 'host:port' (the port is required)")
    if b":" in host_part:
        raise _bad(f"target {_show(target)}: an IPv6 address must be in brackets")
    port = _parse_port(port_part, target)
    if _IPV4.fullmatch(host_part):
        try:
            return str(ipaddress.IPv4Address(host_part.decode("ascii"))), port, True
        except ValueError:
            raise _bad(f"target {_show(target)} holds no valid IPv4 address") from None
    try:
        return normalize_hostname(host_part), port, False
    except ValueError as exc:
        raise _bad(f"invalid target host: {exc}") from None


def _parse_port(port_part: bytes, target: bytes) -> int:
    if _PORT.fullmatch(port_part) is None or not 1 <= int(port_part) <= 65535:
        raise _bad(f"target {_show(target)} has no port in 1..65535")
    return int(port_part)


def _parse_headers(lines: list[bytes]) -> tuple[str | None, bool]:
    user_agent: str | None = None
    has_auth = False
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise _bad("obsolete header line folding is not accepted")
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise _bad(f"header line {_show(line)} is not 'name: value'")
        if _BAD_VALUE_CHAR.search(value) is not None:
            raise _bad(f"header {_show(name, 32)} holds a control character")
        key = name.lower()
        if key == b"proxy-authorization":
            has_auth = True
        elif key == b"user-agent":
            if user_agent is None:
                text = value.strip(b" \t")[:MAX_USER_AGENT_CHARS]
                user_agent = text.decode("ascii", "backslashreplace")
        elif key == b"transfer-encoding":
            raise _bad("a CONNECT request has no content (Transfer-Encoding sent)")
        elif key == b"content-length" and value.strip(b" \t") != b"0":
            raise _bad("a CONNECT request has no content (Content-Length is not 0)")
    return user_agent, has_auth


def connect_established() -> bytes:
    """The reply that opens the tunnel: ``HTTP/1.1 200 Connection established``."""
    return _ESTABLISHED


def connect_refusal(status: int, reason: str) -> bytes:
    """A complete ``HTTP/1.1`` error response carrying ``reason`` as a one-line body.

    ``status`` must be a standard HTTP status code (else :class:`ValueError`). ``reason``
    is made one line of printable ASCII (CR, LF and TAB become spaces, any other character
    ``?``) and cut to :data:`MAX_REFUSAL_REASON_CHARS`. The response closes the connection.
    """
    phrase = HTTPStatus(status).phrase
    text = reason.replace("\r", " ").replace("\n", " ").replace("\t", " ")
    text = _UNPRINTABLE.sub("?", text.strip())
    if len(text) > MAX_REFUSAL_REASON_CHARS:
        text = text[: MAX_REFUSAL_REASON_CHARS - 3] + "..."
    body = (text + "\n").encode("ascii")
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        "Content-Type: text/plain\r\n"
        "Connection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body
