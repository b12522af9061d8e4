"""Sans-I/O inspection of the HTTP/1.x stream inside an intercepted connection.

The worker relays decrypted bytes between client and upstream and hands *the same* ``bytes``
objects to an :class:`Http1Inspector`: client bytes to :meth:`~Http1Inspector.feed_request`,
upstream bytes to :meth:`~Http1Inspector.feed_response`, and calls
:meth:`~Http1Inspector.finish` when the connection closes. The inspector produces one
:class:`HttpExchange` per request/response pair; the worker turns it into an ``http`` event.

Contract:

- The inspector never changes, delays or keeps the relayed data. It stores no copy of a body or
  of a header section: only the configured header values of the messages in flight, a 3-byte
  window while it looks for the end of a response head, and counters.
- Each side is fed in the order its bytes were read, and request bytes before the response
  bytes that answer them (the worker reads a request before the server can answer it).
- ``feed_*`` returns the exchanges these bytes completed (usually 0 or 1), in request order,
  or raises :class:`~tlsgate.errors.HttpProtocolError` -- never anything else. After an error
  the inspector is dead: every later feed raises ``HttpProtocolError`` again. ``finish()``
  still works after an error and returns the exchanges cut short (``complete=False``); it
  omits bytes that never got past a method token.
- A successful protocol switch (``101`` to an Upgrade request, ``2xx`` to ``CONNECT``) sets
  :attr:`~Http1Inspector.opaque`; later feeds are ignored: the worker relays the rest as an
  opaque stream and counts its bytes itself.

Rules (llhttp in its strict default mode does the framing -- CRLF only, no obs-fold, no
Content-Length together with Transfer-Encoding; this module adds what a response parser cannot
know on its own, and the limits):

- A response's framing depends on its request: a response to ``HEAD`` has no body, a ``2xx``
  to ``CONNECT`` ends HTTP on the connection, a ``101`` ends it after an Upgrade request,
  whatever their headers say. llhttp cannot be told the request method, so the head of such a
  response is delimited here (at the first CRLF CRLF, which llhttp's strict CRLF rule makes
  exact) and only the head is fed; after a HEAD response the response parser is replaced by a
  fresh one. When such a response is pipelined behind ordinary ones, the ordinary ones are fed
  up to each ``HTTP/`` so that the parser stops where the special response begins.
- 1xx interim responses (``100 Continue``, ``103 Early Hints``) belong to the exchange of the
  final response that follows; their headers are not recorded. A response that ends with the
  close (no Content-Length, last transfer coding not chunked) completes in ``finish()``.
- After an Upgrade or CONNECT request the client must wait for the answer: bytes it sends
  before the answer are counted, not parsed. If the server refuses the switch and such bytes
  were sent, they cannot be framed as HTTP (a request-smuggling pattern): ``HttpProtocolError``.
- Refused as well: HTTP versions other than 1.0/1.1 and methods of other protocols (llhttp
  accepts HTTP/0.9, HTTP/2.0 and RTSP request lines), two Host headers in one request
  (RFC 9112 section 3.2), a ``101`` to a request that did not ask for an Upgrade, and a
  response while no request is outstanding.
- Bounded memory: a header section (start line and header lines, counted as
  ``name: value CRLF``; the trailers of a chunked body are a section of their own) may not
  exceed ``max_header_bytes`` nor hold more than ``max_header_count`` header lines, and a
  request line (method, target, version) may not exceed ``max_request_line``; each of these
  raises :class:`~tlsgate.errors.HttpLimitExceeded` naming the setting. Bodies are counted,
  never kept. A section spanning several feeds is also capped by the bytes fed
  while inside it, so one endless header line is cut off while it streams in. At most
  ``max_pending`` exchanges may be unfinished (pipelined requests waiting for responses).
- Header names are recorded lower-cased, values decoded as ISO-8859-1 (lossless for any byte);
  values of redacted names are replaced by ``"[redacted]"`` so the IDS sees that a credential
  was sent without seeing it. Trailers are parsed and counted, not recorded.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import lru_cache

from httptools import (
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
    HttpResponseParser,
)

from tlsgate.errors import ConfigError, HttpLimitExceeded, HttpProtocolError

__all__ = [
    "DEFAULT_RECORD_HEADERS",
    "DEFAULT_REDACT_HEADERS",
    "HTTP_METHODS",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_COUNT",
    "MAX_NAME_CACHE",
    "MAX_PENDING",
    "MAX_REQUEST_LINE",
    "REDACTED",
    "Http1Inspector",
    "HttpExchange",
    "looks_like_http_request",
]

#: Header values of these names are recorded as :data:`REDACTED`.
DEFAULT_REDACT_HEADERS: frozenset[str] = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie"}
)

#: Header names recorded (request and response) unless the operator configures others.
DEFAULT_RECORD_HEADERS: frozenset[str] = frozenset(
    {
        "host",
        "user-agent",
        "content-type",
        "content-length",
        "transfer-encoding",
        "referer",
        "accept",
        "x-forwarded-for",
        "server",
        "location",
        "cache-control",
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
    }
)

#: Value recorded in place of a redacted header's value.
REDACTED = "[redacted]"

#: Default cap on one header section (start line plus header lines), in bytes.
MAX_HEADER_BYTES = 65536
#: Default cap on a request line (method, target and version), in bytes.
MAX_REQUEST_LINE = 8192
#: Default cap on the header lines of one header section.
MAX_HEADER_COUNT = 128
#: Default cap on unfinished exchanges (pipelined requests waiting for their responses).
MAX_PENDING = 64
#: Raw header-name spellings remembered per configuration (saves lower-casing each header).
MAX_NAME_CACHE = 1024

#: The HTTP methods llhttp accepts in an HTTP/1.x request line (RTSP methods and PRI excluded).
HTTP_METHODS: frozenset[str] = frozenset(
    "DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH "
    "SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY "
    "SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY".split()
)
_METHOD_NAMES: dict[bytes, str] = {m.encode("ascii"): m for m in HTTP_METHODS}
_SNIFF_SPACE_WITHIN = max(map(len, _METHOD_NAMES)) + 1
#: Methods whose response framing does not follow the response headers.
_SPECIAL_METHODS = frozenset({"HEAD", "CONNECT"})
_VERSIONS = frozenset({"1.0", "1.1"})

#: Characters of an RFC 9110 token (header names).
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")

_HEAD_END = b"\r\n\r\n"
_HTTP_PREFIX = b"HTTP/"
#: What a request line adds to method and target: two spaces, ``HTTP/1.1``, CRLF.
_REQUEST_LINE_EXTRA = 12
#: What a status line adds to its reason phrase: ``HTTP/1.1 200 `` and CRLF.
_STATUS_LINE_EXTRA = 15
#: What a header line adds to name and value: ``: `` and CRLF.
_HEADER_LINE_EXTRA = 4
#: The CRLF closing a header section.
_SECTION_END = 2

# Action bits per header name (see _name_tables).
_RECORD = 1
_REDACT = 2
_HOST = 4
_USER_AGENT = 8
_CONTENT_TYPE = 16
_CONTENT_LENGTH = 32
_TRANSFER_ENCODING = 64
_UPGRADE = 128
_REQUEST_FIELDS = _HOST | _USER_AGENT | _CONTENT_TYPE | _UPGRADE
_RESPONSE_FIELDS = _CONTENT_TYPE | _CONTENT_LENGTH | _TRANSFER_ENCODING | _UPGRADE
_ACTION_NAMES = {
    "host": _HOST,
    "user-agent": _USER_AGENT,
    "content-type": _CONTENT_TYPE,
    "content-length": _CONTENT_LENGTH,
    "transfer-encoding": _TRANSFER_ENCODING,
    "upgrade": _UPGRADE,
}

#: Frequent header names, seeded (as not configured) so they need no lower-casing either.
_COMMON_NAMES = (
    "accept-encoding accept-language accept-ranges access-control-allow-credentials "
    "access-control-allow-headers access-control-allow-methods access-control-allow-origin "
    "access-control-expose-headers access-control-max-age access-control-request-headers "
    "access-control-request-method age alt-svc connection content-disposition "
    "content-encoding content-language content-range content-security-policy date dnt etag "
    "expect expires if-match if-modified-since if-none-match if-range if-unmodified-since "
    "keep-alive last-modified link nel origin pragma priority range referrer-policy "
    "report-to retry-after sec-ch-ua sec-ch-ua-mobile sec-ch-ua-platform sec-fetch-dest "
    "sec-fetch-mode sec-fetch-site sec-fetch-user server-timing strict-transport-security te "
    "timing-allow-origin trailer upgrade-insecure-requests vary via www-authenticate "
    "x-content-type-options x-frame-options x-powered-by x-request-id x-requested-with "
    "x-xss-protection"
).split()

# Phase of one side's parser. Odd phases are header-like sections, capped by max_header_bytes.
_IDLE = 0  # between messages
_HEAD = 1  # start line and headers
_BODY = 2  # body, or between chunks
_CHUNK_START = 3  # after a chunk-size line: a data chunk follows, or the trailer section


@dataclass(slots=True)
class HttpExchange:
    """One request and its final response, as the ``http`` event reports them."""

    method: str = ""
    #: Host header as sent (port kept); None when absent.
    host: str | None = None
    #: Request target as sent (origin, absolute, authority or asterisk form).
    path: str = ""
    #: Request HTTP version: "1.1" or "1.0".
    version: str = ""
    #: Final response status; None when the connection ended before a final response.
    status: int | None = None
    #: Configured request headers in order: (lower-cased name, value or "[redacted]").
    request_headers: list[tuple[str, str]] = field(default_factory=list)
    #: Configured headers of the final response, same form.
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    #: Decoded request body size (chunked framing not counted).
    request_body_bytes: int = 0
    #: Decoded response body size (chunked framing not counted).
    response_body_bytes: int = 0
    #: Response Content-Type.
    content_type: str | None = None
    #: Request Content-Type.
    request_content_type: str | None = None
    user_agent: str | None = None
    #: False when the connection closed or broke before request and response were complete.
    complete: bool = False
    #: Protocol a 101 switched to (Upgrade header, lower-cased), e.g. "websocket".
    upgrade: str | None = None
    #: HTTP/2 stream id (None for HTTP/1.x).
    stream_id: int | None = None
    #: HTTP/2 server push: the request came from the server's PUSH_PROMISE.
    pushed: bool = False


_new_object = object.__new__


def _new_exchange() -> HttpExchange:
    """HttpExchange() at half the cost of the generated __init__ (one per request)."""
    ex: HttpExchange = _new_object(HttpExchange)
    ex.method = ex.path = ex.version = ""
    ex.host = ex.content_type = ex.request_content_type = ex.user_agent = ex.upgrade = None
    ex.status = None
    ex.request_headers = []
    ex.response_headers = []
    ex.request_body_bytes = ex.response_body_bytes = 0
    ex.complete = False
    ex.stream_id = None
    ex.pushed = False
    return ex


def looks_like_http_request(first_bytes: bytes) -> bool:
    """Cheap sniff for connections without ALPN: an HTTP method token followed by a space."""
    space = first_bytes.find(b" ", 0, _SNIFF_SPACE_WITHIN)
    return space > 0 and first_bytes[:space] in _METHOD_NAMES


@lru_cache(maxsize=16)
def _name_tables(
    record: frozenset[str], redact: frozenset[str]
) -> tuple[dict[bytes, int], dict[bytes, str]]:
    """Raw header-name spelling -> action bits, and -> lower-cased name (for names with bits).

    Seeded with the lower, Title-Case and UPPER spellings; shared by every inspector with the
    same configuration, and extended with spellings met on the wire up to MAX_NAME_CACHE.
    """
    bits_of: dict[bytes, int] = {}
    lower_of: dict[bytes, str] = {}
    for name in _COMMON_NAMES:
        raw = name.encode("ascii")
        bits_of[raw] = bits_of[raw.title()] = 0
    for name in record | _ACTION_NAMES.keys():
        bits = _ACTION_NAMES.get(name, 0)
        if name in record:
            bits |= _RECORD | (_REDACT if name in redact else 0)
        raw = name.encode("ascii")
        for spelling in (raw, raw.title(), raw.upper()):
            bits_of[spelling] = bits
            lower_of[spelling] = name
    return bits_of, lower_of


def _header_names(names: Collection[str], what: str) -> frozenset[str]:
    """Lower-cased header names from configuration; each must be an RFC 9110 token."""
    if isinstance(names, str):
        raise ConfigError(f"{what} must be a list of header names, not the string {names!r}")
    result = frozenset(name.lower() for name in names)
    for name in result:
        if not name or not _TOKEN_CHARS.issuperset(name):
            raise ConfigError(f"{what}: {name!r} is not an HTTP header name")
    return result


class _Callbacks:
    """The protocol object httptools reads its callbacks from (bound inspector methods)."""

    __slots__ = (
        "on_body",
        "on_chunk_complete",
        "on_chunk_header",
        "on_header",
        "on_headers_complete",
        "on_message_begin",
        "on_message_complete",
        "on_status",
        "on_url",
    )

    def __init__(
        self,
        *,
        on_message_begin: Callable[[], None],
        on_url: Callable[[bytes], None] | None = None,
        on_status: Callable[[bytes], None] | None = None,
        on_header: Callable[[bytes, bytes], None],
        on_headers_complete: Callable[[], None],
        on_body: Callable[[bytes], None],
        on_message_complete: Callable[[], None],
        on_chunk_header: Callable[[], None],
        on_chunk_complete: Callable[[], None],
    ) -> None:
        self.on_message_begin = on_message_begin
        self.on_url = on_url
        self.on_status = on_status
        self.on_header = on_header
        self.on_headers_complete = on_headers_complete
        self.on_body = on_body
        self.on_message_complete = on_message_complete
        self.on_chunk_header = on_chunk_header
        self.on_chunk_complete = on_chunk_complete


class Http1Inspector:
    """Pairs the requests and responses of one HTTP/1.x connection into :class:`HttpExchange`.

    ``record_headers``/``redact_headers`` are header names (any case); ``max_header_bytes``
    caps one header section, ``max_pending`` the exchanges waiting for their response.
    Invalid settings raise :class:`~tlsgate.errors.ConfigError`.
    """

    __slots__ = (
        "_awaiting",
        "_bits_of",
        "_blocked",
        "_blocked_upgrade",
        "_closed",
        "_error",
        "_hd_active",
        "_hd_bytes",
        "_hd_msg_done",
        "_hd_tail",
        "_held",
        "_lower_of",
        "_max_header_bytes",
        "_max_header_count",
        "_max_pending",
        "_max_request_line",
        "_opaque",
        "_out",
        "_req_count",
        "_req_cur",
        "_req_headers",
        "_req_parser",
        "_req_phase",
        "_req_prev",
        "_req_prev_answered",
        "_req_resp_done",
        "_req_sections",
        "_req_streamed",
        "_req_upgrade",
        "_resp_cb",
        "_resp_count",
        "_resp_cur",
        "_resp_eof_body",
        "_resp_framed",
        "_resp_headers",
        "_resp_heads",
        "_resp_parser",
        "_resp_phase",
        "_resp_sections",
        "_resp_status",
        "_resp_streamed",
        "_resp_upgrade",
        "_specials",
        "_switch_end",
        "_unfinished",
        "switch_rest",
    )

    def __init__(
        self,
        *,
        record_headers: Collection[str] = DEFAULT_RECORD_HEADERS,
        redact_headers: Collection[str] = DEFAULT_REDACT_HEADERS,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_pending: int = MAX_PENDING,
        max_request_line: int = MAX_REQUEST_LINE,
        max_header_count: int = MAX_HEADER_COUNT,
    ) -> None:
        for setting, value in (("max_header_bytes", max_header_bytes),
                               ("max_request_line", max_request_line),
                               ("max_header_count", max_header_count)):  # fmt: skip
            if value < 1:
                raise ConfigError(f"{setting} must be at least 1, not {value}")
        if max_pending < 1:
            raise ConfigError(f"max_pending must be at least 1, not {max_pending}")
        record = (
            DEFAULT_RECORD_HEADERS
            if record_headers is DEFAULT_RECORD_HEADERS
            else _header_names(record_headers, "record_headers")
        )
        redact = (
            DEFAULT_REDACT_HEADERS
            if redact_headers is DEFAULT_REDACT_HEADERS
            else _header_names(redact_headers, "redact_headers")
        )
        self._bits_of, self._lower_of = _name_tables(record, redact)
        self._max_header_bytes = max_header_bytes
        self._max_pending = max_pending
        self._max_request_line = max_request_line
        self._max_header_count = max_header_count
        self._error: HttpProtocolError | None = None
        self._closed = False
        self._opaque = False
        self._out: list[HttpExchange] = []
        #: Exchanges not yet returned, in request order.
        self._unfinished: deque[HttpExchange] = deque()
        #: Exchanges whose response has not begun, in request order.
        self._awaiting: deque[HttpExchange] = deque()
        #: Exchanges whose response head must be delimited here (HEAD, CONNECT, Upgrade).
        self._specials = 0
        # The Upgrade/CONNECT request waiting for its answer; request bytes are only counted.
        self._blocked: HttpExchange | None = None
        self._blocked_upgrade: str | None = None
        self._held = 0
        self._switch_end = 0
        #: Upstream bytes after the head of the response that switched protocols (fed in the
        #: same call): the first bytes of the new protocol.
        self.switch_rest = b""

        self._req_parser = HttpRequestParser(
            _Callbacks(
                on_message_begin=self._req_on_message_begin,
                on_url=self._req_on_url,
                on_header=self._req_on_header,
                on_headers_complete=self._req_on_headers_complete,
                on_body=self._req_on_body,
                on_message_complete=self._req_on_message_complete,
                on_chunk_header=self._req_on_chunk_header,
                on_chunk_complete=self._req_on_chunk_complete,
            )
        )
        self._req_cur: HttpExchange | None = None
        self._req_prev: HttpExchange | None = None
        self._req_prev_answered = False
        self._req_resp_done = False
        self._req_phase = _IDLE
        self._req_count = 0
        self._req_headers = 0
        self._req_sections = 0
        self._req_streamed = 0
        self._req_upgrade: str | None = None

        self._resp_cb = _Callbacks(
            on_message_begin=self._resp_on_message_begin,
            on_status=self._resp_on_status,
            on_header=self._resp_on_header,
            on_headers_complete=self._resp_on_headers_complete,
            on_body=self._resp_on_body,
            on_message_complete=self._resp_on_message_complete,
            on_chunk_header=self._resp_on_chunk_header,
            on_chunk_complete=self._resp_on_chunk_complete,
        )
        self._resp_parser = HttpResponseParser(self._resp_cb)
        self._resp_cur: HttpExchange | None = None
        self._resp_phase = _IDLE
        self._resp_count = 0
        self._resp_headers = 0
        self._resp_sections = 0
        self._resp_streamed = 0
        self._resp_heads = 0
        self._resp_status = 0
        self._resp_upgrade: str | None = None
        self._resp_framed = False
        self._resp_eof_body = False
        # Delimiting the head of a response to HEAD / CONNECT / Upgrade.
        self._hd_active = False
        self._hd_bytes = 0
        self._hd_tail = b""
        self._hd_msg_done = False

    @property
    def request_head_id(self) -> int | None:
        """While the client is inside a request head (request line and headers): a number
        that identifies that head; None otherwise. For the caller's header timeout."""
        return self._req_sections if self._req_phase == _HEAD else None

    @property
    def opaque(self) -> bool:
        """True once the connection switched protocols; feeds are ignored from then on."""
        return self._opaque

    @property
    def held_bytes(self) -> int:
        """Client bytes sent after a switch request before its answer (counted, not parsed)."""
        return self._held

    # ------------------------------------------------------------------ public API

    def feed_request(self, data: bytes) -> list[HttpExchange]:
        """Parse client bytes; return the exchanges they completed, in request order."""
        if self._error is not None or self._closed:
            raise self._refuse_feed()
        out: list[HttpExchange] = []
        if self._opaque:
            return out
        if self._blocked is not None:
            self._held += len(data)
            return out
        self._out = out
        try:
            self._feed_requests(data)
        except HttpProtocolError as exc:
            raise self._die(exc) from None
        except HttpParserError as exc:
            raise self._die(self._translate(exc, "client request")) from None
        return out

    def feed_response(self, data: bytes) -> list[HttpExchange]:
        """Parse upstream bytes; return the exchanges they completed, in request order."""
        if self._error is not None or self._closed:
            raise self._refuse_feed()
        out: list[HttpExchange] = []
        if self._opaque:
            return out
        self._out = out
        try:
            if self._specials:
                self._feed_responses(data)
                if self._opaque:
                    self.switch_rest = bytes(data[self._switch_end :])
            else:
                self._feed_resp_parser(data)
        except HttpProtocolError as exc:
            raise self._die(exc) from None
        except (HttpParserError, HttpParserUpgrade) as exc:
            raise self._die(self._translate(exc, "upstream response")) from None
        return out

    def finish(self) -> list[HttpExchange]:
        """Connection closed: end a close-delimited response, return what was cut short.

        The first entry may be a complete exchange whose response body ended with the
        close; every other entry has ``complete=False``. Later calls return ``[]``.
        """
        out: list[HttpExchange] = []
        if self._closed:
            return out
        self._closed = True
        self._out = out
        ex = self._resp_cur
        if (
            ex is not None
            and self._error is None
            and not self._opaque
            and self._resp_phase == _BODY
            and self._resp_eof_body
        ):
            self._resp_final(ex)
        for ex in self._unfinished:
            if ex.method:  # not for bytes that never got past a method token
                ex.complete = False
                out.append(ex)
        self._unfinished.clear()
        self._awaiting.clear()
        self._req_cur = self._resp_cur = self._req_prev = self._blocked = None
        return out

    # ------------------------------------------------------------------ errors

    def _die(self, exc: HttpProtocolError) -> HttpProtocolError:
        self._error = exc
        return exc

    def _refuse_feed(self) -> HttpProtocolError:
        if self._error is not None:
            return HttpProtocolError(
                f"HTTP inspection of this connection already stopped: {self._error}"
            )
        return HttpProtocolError("bytes fed after finish(): the connection was reported closed")

    def _translate(self, exc: Exception, what: str) -> HttpProtocolError:
        """Turn an httptools error into HttpProtocolError (our own bugs propagate)."""
        cause = exc.__context__
        if isinstance(cause, HttpProtocolError):
            return cause  # raised by one of our callbacks
        if isinstance(cause, HttpParserError):
            exc = cause  # raised by httptools' own callback glue
        elif cause is not None:
            raise cause
        reason = exc.args[0] if exc.args else type(exc).__name__
        return HttpProtocolError(
            f"{what} is not valid HTTP/1.1 ({reason}); inspection of this connection stops"
        )

    def _too_big(self, side: str) -> HttpLimitExceeded:
        return HttpLimitExceeded(
            f"{side} header section exceeds {self._max_header_bytes} bytes "
            "(max_header_bytes); refusing to buffer more of it",
            "max_header_bytes",
        )

    def _too_many(self, side: str) -> HttpLimitExceeded:
        return HttpLimitExceeded(
            f"{side} header section has more than {self._max_header_count} header lines "
            "(max_header_count)",
            "max_header_count",
        )

    # ------------------------------------------------------------------ requests

    def _feed_requests(self, data: bytes) -> None:
        chunk: bytes | memoryview = data
        while True:
            sections = self._req_sections
            phase = self._req_phase
            try:
                self._req_parser.feed_data(chunk)
            except HttpParserUpgrade as upgrade:
                # An Upgrade/CONNECT request just completed (on_message_complete ran).
                offset: int = upgrade.args[0]
                if not self._req_prev_answered:
                    ex = self._blocked = self._req_prev
                    assert ex is not None
                    if ex.method not in _SPECIAL_METHODS:
                        self._specials += 1
                    self._blocked_upgrade = self._req_upgrade
                    self._held = len(chunk) - offset
                    return
                # Already refused (the server answered before the request ended): go on.
                chunk = memoryview(chunk)[offset:]
                continue
            if phase & 1 and self._req_phase == phase and self._req_sections == sections:
                # The whole chunk lies inside one header section.
                self._req_streamed += len(chunk)
                if self._req_streamed > self._max_header_bytes:
                    raise self._too_big("request")
            return

    def _req_on_message_begin(self) -> None:
        unfinished = self._unfinished
        if len(unfinished) >= self._max_pending:
            raise HttpProtocolError(
                f"client pipelined more than {self._max_pending} requests without waiting "
                "for responses (max_pending)"
            )
        ex = self._req_cur = _new_exchange()
        unfinished.append(ex)
        self._awaiting.append(ex)
        self._req_phase = _HEAD
        self._req_count = _REQUEST_LINE_EXTRA + _SECTION_END
        self._req_headers = 0
        self._req_sections += 1
        self._req_streamed = 0
        self._req_upgrade = None

    def _req_on_url(self, url: bytes) -> None:
        ex = self._req_cur
        assert ex is not None
        if not ex.method:
            raw = self._req_parser.get_method()
            method = _METHOD_NAMES.get(raw)
            if method is None:
                raise HttpProtocolError(
                    f"client used the method {raw.decode('latin-1')!r}, which is not an HTTP "
                    "method (RTSP?); only HTTP/1.x is inspected"
                )
            ex.method = method
            if method in _SPECIAL_METHODS:
                self._specials += 1
            self._req_count += len(raw)
        self._req_count += len(url)
        if self._req_count - _SECTION_END > self._max_request_line:
            raise HttpLimitExceeded(
                f"request line exceeds {self._max_request_line} bytes (max_request_line)",
                "max_request_line",
            )
        ex.path += url.decode("latin-1")

    def _req_on_header(self, name: bytes, value: bytes) -> None:
        count = self._req_count = self._req_count + len(name) + len(value) + _HEADER_LINE_EXTRA
        if count > self._max_header_bytes:
            raise self._too_big("request")
        self._req_headers += 1
        if self._req_headers > self._max_header_count:
            raise self._too_many("request")
        bits = self._bits_of.get(name)
        if bits is None:
            bits = self._learn_name(name)
        if bits and self._req_phase == _HEAD:  # configured, and not a trailer
            ex = self._req_cur
            assert ex is not None
            if bits & _RECORD:
                ex.request_headers.append(
                    (self._lower_of[name], REDACTED if bits & _REDACT else value.decode("latin-1"))
                )
            if bits & _REQUEST_FIELDS:
                self._req_field(ex, bits, value.decode("latin-1"))

    def _req_field(self, ex: HttpExchange, bits: int, text: str) -> None:
        """A header that sets an exchange field (Host, User-Agent, Content-Type, Upgrade)."""
        if bits & _HOST:
            if ex.host is not None:
                raise HttpProtocolError(
                    "client sent two Host headers in one request (RFC 9112 section 3.2: "
                    "must be refused); possible request smuggling"
                )
            ex.host = text
        elif bits & _USER_AGENT:
            if ex.user_agent is None:
                ex.user_agent = text
        elif bits & _CONTENT_TYPE:
            if ex.request_content_type is None:
                ex.request_content_type = text
        else:
            self._req_upgrade = text.strip().lower()

    def _req_on_headers_complete(self) -> None:
        ex = self._req_cur
        assert ex is not None
        version = self._req_parser.get_http_version()
        if version not in _VERSIONS:
            raise HttpProtocolError(
                f"client sent an HTTP/{version} request; only HTTP/1.0 and HTTP/1.1 are "
                "inspected on this connection"
            )
        ex.version = version
        self._req_phase = _BODY

    def _req_on_body(self, body: bytes) -> None:
        ex = self._req_cur
        assert ex is not None
        ex.request_body_bytes += len(body)
        self._req_phase = _BODY

    def _req_on_chunk_header(self) -> None:
        self._req_phase = _CHUNK_START
        self._req_count = _SECTION_END
        self._req_headers = 0
        self._req_sections += 1
        self._req_streamed = 0

    def _req_on_chunk_complete(self) -> None:
        self._req_phase = _BODY

    def _req_on_message_complete(self) -> None:
        ex = self._req_cur
        assert ex is not None
        self._req_cur = None
        self._req_prev = ex
        self._req_phase = _IDLE
        if self._req_resp_done:
            self._req_resp_done = False
            self._req_prev_answered = True
            self._emit(ex)
        else:
            self._req_prev_answered = False

    # ------------------------------------------------------------------ responses

    def _feed_resp_parser(self, chunk: bytes | memoryview) -> None:
        sections = self._resp_sections
        phase = self._resp_phase
        self._resp_parser.feed_data(chunk)
        if phase & 1 and self._resp_phase == phase and self._resp_sections == sections:
            # The whole chunk lies inside one header section.
            self._resp_streamed += len(chunk)
            if self._resp_streamed > self._max_header_bytes:
                raise self._too_big("response")

    def _feed_responses(self, data: bytes) -> None:
        """Feed with HEAD/CONNECT/Upgrade exchanges outstanding (see the module rules)."""
        n = len(data)
        pos = 0
        view = memoryview(data)
        awaiting = self._awaiting
        while pos < n and not self._opaque:
            target = self._resp_cur
            if target is None and awaiting:
                target = awaiting[0]
            if target is not None and self._resp_phase != _BODY and self._is_special(target):
                pos = self._feed_special_head(data, view, pos)
                continue
            end = n
            if self._special_behind():
                found = data.find(_HTTP_PREFIX, pos + 1)
                if found > 0:
                    end = found
            self._feed_resp_parser(view[pos:end])
            pos = end

    def _is_special(self, ex: HttpExchange) -> bool:
        """Does the framing of this exchange's response depend on its request?"""
        return ex.method in _SPECIAL_METHODS or ex is self._blocked

    def _special_behind(self) -> bool:
        """Is a special response queued behind the one being (or about to be) parsed?"""
        awaiting = self._awaiting
        for i in range(0 if self._resp_cur is not None else 1, len(awaiting)):
            if self._is_special(awaiting[i]):
                return True
        return False

    def _feed_special_head(self, data: bytes, view: memoryview, pos: int) -> int:
        """Feed the head of a response to HEAD/CONNECT/Upgrade and no further; return pos."""
        if not self._hd_active:
            self._hd_active = True
            self._hd_bytes = 0
            self._hd_tail = b""
            self._hd_msg_done = False
        n = len(data)
        while True:
            end = self._find_head_end(data, pos)
            stop = n if end < 0 else end
            self._hd_bytes += stop - pos
            if self._hd_bytes > self._max_header_bytes:
                raise self._too_big("response")
            heads = self._resp_heads
            try:
                self._resp_parser.feed_data(view[pos:stop])
            except HttpParserUpgrade:
                pass  # 101 with Upgrade headers: _special_verdict switches
            except HttpParserError:
                # llhttp also stops after a 101 without Upgrade headers, with an error.
                if self._resp_heads == heads or self._resp_status != 101:
                    raise
            if stop - pos >= 3:
                self._hd_tail = data[stop - 3 : stop]
            else:
                self._hd_tail = (self._hd_tail + data[pos:stop])[-3:]
            if self._resp_heads != heads:
                self._switch_end = stop
                return self._special_verdict(stop, n)
            if end < 0:
                return n
            pos = end  # that CRLF CRLF was blank lines before the status line

    def _find_head_end(self, data: bytes, pos: int) -> int:
        """Index just past the first CRLF CRLF at or after pos (with the carried tail), or -1."""
        tail = self._hd_tail
        if tail:
            found = (tail + data[pos : pos + 3]).find(_HEAD_END)
            if found >= 0:
                return pos - len(tail) + found + 4
        found = data.find(_HEAD_END, pos)
        return found + 4 if found >= 0 else -1

    def _special_verdict(self, end: int, n: int) -> int:
        """A special response head ended at ``end``: decide what follows; return new pos."""
        self._hd_active = False
        ex = self._resp_cur
        assert ex is not None
        status = self._resp_status
        if 100 <= status < 200 and status != 101:
            return end  # interim response (already reset): the final one follows
        self._specials -= 1
        if status == 101:
            if ex is not self._blocked:
                raise self._unrequested_switch()
            ex.upgrade = self._resp_upgrade or self._blocked_upgrade
            return self._switch(ex, n)
        if ex.method == "CONNECT" and status < 300:
            return self._switch(ex, n)
        if ex is self._blocked:
            if self._held:
                raise HttpProtocolError(
                    f"client sent {self._held} bytes after its {ex.method} request asking to "
                    f"switch protocols, before the answer, and the server refused (status "
                    f"{status}): those bytes cannot be framed as HTTP (possible request "
                    "smuggling)"
                )
            self._blocked = None
        if ex.method == "HEAD":
            if not self._hd_msg_done:
                # llhttp expects the body the headers announce; a HEAD response has none.
                self._resp_parser = HttpResponseParser(self._resp_cb)
            self._resp_final(ex)
        elif self._hd_msg_done:
            self._resp_final(ex)
        return end

    def _switch(self, ex: HttpExchange, n: int) -> int:
        self._resp_final(ex)
        self._opaque = True
        return n

    def _unrequested_switch(self) -> HttpProtocolError:
        return HttpProtocolError(
            "upstream answered 101 Switching Protocols to a request that did not ask for an "
            "Upgrade; the rest of the connection cannot be parsed as HTTP"
        )

    def _resp_on_message_begin(self) -> None:
        if self._resp_cur is None:
            if not self._awaiting:
                raise HttpProtocolError(
                    "upstream sent a response while no request was outstanding (unsolicited "
                    "response, e.g. a 408 before closing, or response smuggling)"
                )
            self._resp_cur = self._awaiting.popleft()
        self._resp_phase = _HEAD
        self._resp_count = _STATUS_LINE_EXTRA + _SECTION_END
        self._resp_headers = 0
        self._resp_sections += 1
        self._resp_streamed = 0
        self._resp_upgrade = None
        self._resp_framed = False

    def _resp_on_status(self, reason: bytes) -> None:
        self._resp_count += len(reason)

    def _resp_on_header(self, name: bytes, value: bytes) -> None:
        count = self._resp_count = self._resp_count + len(name) + len(value) + _HEADER_LINE_EXTRA
        if count > self._max_header_bytes:
            raise self._too_big("response")
        self._resp_headers += 1
        if self._resp_headers > self._max_header_count:
            raise self._too_many("response")
        bits = self._bits_of.get(name)
        if bits is None:
            bits = self._learn_name(name)
        if bits and self._resp_phase == _HEAD:  # configured, and not a trailer
            ex = self._resp_cur
            assert ex is not None
            if bits & _RECORD:
                ex.response_headers.append(
                    (self._lower_of[name], REDACTED if bits & _REDACT else value.decode("latin-1"))
                )
            if bits & _RESPONSE_FIELDS:
                self._resp_field(ex, bits, value)

    def _resp_field(self, ex: HttpExchange, bits: int, value: bytes) -> None:
        """A header that sets a field or decides framing (Content-Type, -Length, TE, Upgrade)."""
        if bits & _CONTENT_TYPE:
            if ex.content_type is None:
                ex.content_type = value.decode("latin-1")
        elif bits & _CONTENT_LENGTH:
            self._resp_framed = True
        elif bits & _TRANSFER_ENCODING:
            # llhttp frames a response as chunked only when chunked is the last coding.
            self._resp_framed = value.rpartition(b",")[2].strip().lower() == b"chunked"
        else:
            self._resp_upgrade = value.decode("latin-1").strip().lower()

    def _resp_on_headers_complete(self) -> None:
        ex = self._resp_cur
        assert ex is not None
        status = self._resp_status = self._resp_parser.get_status_code()
        ex.status = status
        self._resp_phase = _BODY
        self._resp_heads += 1
        # A body delimited by the close: no Content-Length, no final chunked coding.
        self._resp_eof_body = not self._resp_framed
        if not self._hd_active:
            if status == 101:
                raise self._unrequested_switch()
            if self._specials and self._is_special(ex):
                raise HttpProtocolError(
                    f"could not delimit the upstream's response to {ex.method}: it does not "
                    "start with 'HTTP/'"
                )

    def _resp_on_body(self, body: bytes) -> None:
        ex = self._resp_cur
        assert ex is not None
        ex.response_body_bytes += len(body)
        self._resp_phase = _BODY

    def _resp_on_chunk_header(self) -> None:
        self._resp_phase = _CHUNK_START
        self._resp_count = _SECTION_END
        self._resp_headers = 0
        self._resp_sections += 1
        self._resp_streamed = 0

    def _resp_on_chunk_complete(self) -> None:
        self._resp_phase = _BODY

    def _resp_on_message_complete(self) -> None:
        ex = self._resp_cur
        assert ex is not None
        self._resp_phase = _IDLE
        status = self._resp_status
        if status < 200 and status != 101:
            # Interim response: the exchange waits for its final response.
            ex.status = None
            ex.response_headers.clear()
            ex.content_type = None
            return
        if self._hd_active:
            self._hd_msg_done = True  # _special_verdict finishes the exchange
            return
        self._resp_final(ex)

    def _resp_final(self, ex: HttpExchange) -> None:
        """The final response of ``ex`` is complete."""
        self._resp_cur = None
        self._resp_phase = _IDLE
        if ex is self._req_cur:
            self._req_resp_done = True  # answered before the request ended
        else:
            self._emit(ex)

    # ------------------------------------------------------------------ shared

    def _emit(self, ex: HttpExchange) -> None:
        ex.complete = True
        self._unfinished.popleft()
        self._out.append(ex)

    def _learn_name(self, name: bytes) -> int:
        """Action bits of a header-name spelling not seen yet; remember it (bounded)."""
        lower = name.lower()
        bits = self._bits_of.get(lower, 0)
        if len(self._bits_of) < MAX_NAME_CACHE:
            if bits:
                self._lower_of[name] = self._lower_of[lower]
            self._bits_of[name] = bits
        elif bits:
            # Cache full: keep resolvable without remembering the spelling.
            self._lower_of.setdefault(name, self._lower_of[lower])
        return bits
