"""Suricata EVE-JSON records from tlsgate inspection events (``tlsgate events --format eve``).

Contract (the field mapping is the "EVE-JSON" section of ``docs/events.md``; the target is
the JSON Schema Suricata 8.0 ships as ``etc/schema.json``):

- Sans-I/O. :func:`render_eve` is a pure function: one tlsgate event (a decoded map, see
  ``docs/events.md``) in, a list of zero or more EVE records (JSON-ready dicts) out.
  :class:`EveRenderer` wraps it for a stream of events and keeps the little state a stream
  needs, bounded (see below).
- What is rendered: ``http`` → one ``event_type: "http"`` record. ``conn_close`` of a
  connection whose ClientHello was read (its ``decision`` is not nil: intercepted,
  bypassed or blocked) → one ``event_type: "tls"`` record that joins the connection's
  ``conn_open`` (JA3, JA4, client ALPN) with the ``conn_close`` (SNI, the upstream
  server's TLS version, certificate subject and issuer, negotiated ALPN): the close is the
  first event that knows the server's side, the open the only one with the client's
  fingerprints. ``protocol_error`` → one ``event_type: "anomaly"`` record (``applayer``,
  a stable token per ``stage``). ``websocket`` of kind ``message`` → one
  ``event_type: "websocket"`` record: a whole message, so ``fin`` is true; ``opcode`` as
  tlsgate names it (``text``, ``binary``, ``close``, ``ping``, ``pong``); the payload only
  when content capture kept its first bytes (``payload_base64``, and ``payload_printable``
  with each byte outside printable ASCII as ``.``). No ``mask``: tlsgate does not keep the
  masking keys. ``direction`` is ``to_server`` for the client's messages, ``to_client`` for
  the server's. Every other type (``conn_open`` itself, ``policy``,
  ``upstream_refused``, ``gap``, ``hello``, unknown types) → no record.
- Records hold only names the schema defines (no ``worker``, ``seq``, ``version``, …). A
  value that is missing, nil or of the wrong type in the tlsgate event is left out of the
  record, never written as null; arrays the schema wants non-empty are left out when empty.
  Byte strings become text as in ``--format json`` (UTF-8, invalid bytes replaced).
- ``timestamp`` is Suricata's: local time (``local_tz``, default the system's time zone),
  microseconds, ``%z`` offset without a colon: ``2026-01-01T00:00:00.123456+0000``. A
  ``tls`` record is timed when the TLS handshakes completed (``conn_close`` ``ts`` −
  ``duration`` + ``handshake_duration``), else at the close. An event to be rendered
  whose ``ts`` is not a usable Unix time raises :class:`EveRenderError`: a record
  without a timestamp is not EVE.
- ``flow_id`` is a 51-bit integer (Suricata's range, exact in JavaScript) hashed from the
  gateway id and the ``conn`` id, so all records of one connection share it, and
  connection ids a restarted gateway reuses do not collide.
- :class:`EveRenderer` takes the gateway id from each ``hello`` and remembers the client
  side of each ``conn_open`` until that connection's ``conn_close``, at most
  ``max_tracked`` connections (the oldest is forgotten first and counted in
  :attr:`EveRenderer.evicted`; its ``tls`` record then lacks the client fingerprints).
  A ``hello`` starts a new stream: what was remembered is dropped.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, tzinfo
from typing import Any, Final, TypeGuard

from tlsgate.errors import RemoteProtocolError

#: Suricata's flow ids are 51-bit (``FlowGetId`` masks to this) so JSON consumers that
#: read numbers as doubles keep them exact.
FLOW_ID_MASK: Final = (1 << 51) - 1

#: Connections whose ``conn_open`` :class:`EveRenderer` remembers until their
#: ``conn_close`` (a few hundred bytes each).
MAX_TRACKED_CONNECTIONS: Final = 65536

#: The EVE names of the negotiated TLS versions tlsgate reports (OpenSSL's names).
#: Suricata's own names are inconsistent (``TLSv1`` for 1.0, ``TLS 1.2``); they are kept.
TLS_VERSION_NAMES: Final[Mapping[str, str]] = {
    "TLSv1.3": "TLS 1.3",
    "TLSv1.2": "TLS 1.2",
    "TLSv1.1": "TLS 1.1",
    "TLSv1": "TLSv1",
    "SSLv3": "SSLv3",
    "SSLv2": "SSLv2",
}

#: ``protocol_error`` ``stage`` → (``app_proto``, ``anomaly.event``).
ANOMALY_EVENTS: Final[Mapping[str, tuple[str, str]]] = {
    "connect": ("http", "INVALID_CONNECT_REQUEST"),
    "client_hello": ("tls", "INVALID_CLIENT_HELLO"),
    "tls": ("tls", "INVALID_TLS"),
    "http": ("http", "INVALID_HTTP"),
    "smtp": ("smtp", "INVALID_SMTP"),
    "imap": ("imap", "INVALID_IMAP"),
    "pop3": ("pop3", "INVALID_POP3"),
    "http2": ("http2", "INVALID_HTTP2"),
    "websocket": ("websocket", "INVALID_WEBSOCKET"),
}
#: ``anomaly.event`` of a ``protocol_error`` whose ``stage`` is not one of the above.
ANOMALY_OTHER: Final = "PROTOCOL_ERROR"

#: Recorded request headers that fill an ``http`` field of their own (the first one wins).
_REQUEST_HEADER_FIELDS: Final[Mapping[str, str]] = {
    "referer": "http_refer",
    "x-forwarded-for": "xff",
}
#: Recorded response headers that fill an ``http`` field of their own.
_RESPONSE_HEADER_FIELDS: Final[Mapping[str, str]] = {"location": "redirect"}

#: The ``conn_open`` fields the ``tls`` record uses (what :class:`EveRenderer` keeps).
_OPEN_FIELDS: Final = ("ja3", "ja3_hash", "ja4", "client_alpn", "sni")

_URL_SCHEMES: Final = ("http://", "https://")
_URL_AUTHORITY_END: Final = "/?#"
_MAX_PORT: Final = 65535
_MAX_PORT_DIGITS: Final = 5

_Record = dict[str, Any]
#: A record builder: (event, its conn_open, host, local_tz, gateway) → record or None.
_Render = Callable[
    [Mapping[str, Any], Mapping[str, Any] | None, str | None, tzinfo | None, str],
    _Record | None,
]


class EveRenderError(RemoteProtocolError):
    """A tlsgate event cannot become an EVE record (its ``ts`` is not a usable time)."""


def eve_timestamp(ts: float, local_tz: tzinfo | None = None) -> str:
    """``ts`` (Unix seconds) as Suricata writes it: ``2026-07-07T17:10:35.123456+0000``.

    ``local_tz`` None means the system's local time zone. Raises :class:`EveRenderError`
    if ``ts`` is not a finite number of a year between 1 and 9999.
    """
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise EveRenderError(f"ts {ts!r} is not a Unix time")
    try:
        if local_tz is None:
            moment = datetime.fromtimestamp(ts, UTC).astimezone()
        else:
            moment = datetime.fromtimestamp(ts, local_tz)
    except (OverflowError, OSError, ValueError) as exc:
        raise EveRenderError(f"ts {ts!r} is out of the range of dates: {exc}") from None
    offset = moment.utcoffset()
    seconds = int(offset.total_seconds()) if offset is not None else 0
    sign = "-" if seconds < 0 else "+"
    hours, rest = divmod(abs(seconds), 3600)
    minutes, rest = divmod(rest, 60)
    zone = (
        f"{sign}{hours:02d}{minutes:02d}{rest:02d}" if rest else f"{sign}{hours:02d}{minutes:02d}"
    )
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:"
        f"{moment.minute:02d}:{moment.second:02d}.{moment.microsecond:06d}{zone}"
    )


def flow_id(gateway: str, conn: str) -> int:
    """The EVE ``flow_id`` of connection ``conn`` of gateway ``gateway`` (0 … 2**51-1)."""
    key = f"{gateway}\0{conn}".encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") & FLOW_ID_MASK


def render_eve(
    event: Mapping[str, Any],
    *,
    host: str | None = None,
    local_tz: tzinfo | None = None,
    gateway: str = "",
    conn_open: Mapping[str, Any] | None = None,
) -> list[_Record]:
    """The EVE records (zero or more) for one tlsgate ``event``; see the module rules.

    ``host`` is the sensor name written as the top-level ``host`` (left out when None).
    ``local_tz`` is the time zone of ``timestamp`` (None: the system's). ``gateway`` is
    the id of the gateway that created the event (its stream's ``hello`` ``gateway``),
    hashed into ``flow_id``. ``conn_open`` is the ``conn_open`` event of the same
    connection, used when ``event`` is its ``conn_close``.
    """
    kind = event.get("type")
    render = _RENDERERS.get(kind) if isinstance(kind, str) else None
    if render is None:
        return []
    record = render(event, conn_open, host, local_tz, gateway)
    return [] if record is None else [record]


class EveRenderer:
    """Renders a stream of tlsgate events, in stream order, with bounded state."""

    __slots__ = ("_opened", "evicted", "gateway", "host", "local_tz", "max_tracked")

    def __init__(
        self,
        *,
        host: str | None = None,
        local_tz: tzinfo | None = None,
        max_tracked: int = MAX_TRACKED_CONNECTIONS,
    ) -> None:
        if max_tracked < 1:
            raise ValueError(f"max_tracked must be at least 1, not {max_tracked}")
        self.host: Final = host
        self.local_tz: Final = local_tz
        self.max_tracked: Final = max_tracked
        #: Id of the gateway of the current stream (from its ``hello``; "" before one).
        self.gateway = ""
        #: ``conn_open`` summaries forgotten before their ``conn_close`` (table full).
        self.evicted = 0
        self._opened: OrderedDict[str, dict[str, Any]] = OrderedDict()

    @property
    def tracked(self) -> int:
        """Connections whose ``conn_open`` is remembered right now."""
        return len(self._opened)

    def render(self, event: Mapping[str, Any]) -> list[_Record]:
        """The EVE records for the next ``event`` of the stream (see :func:`render_eve`)."""
        kind = event.get("type")
        opened = None
        if kind == "conn_open":
            self._remember(event)
            return []
        if kind == "conn_close":
            conn = event.get("conn")
            if isinstance(conn, str):
                opened = self._opened.pop(conn, None)
        elif kind == "hello":
            self._start(event)
            return []
        return render_eve(
            event,
            host=self.host,
            local_tz=self.local_tz,
            gateway=self.gateway,
            conn_open=opened,
        )

    def skip(self, event: Mapping[str, Any]) -> None:
        """Take note of an event whose records are not wanted (keeps the state right)."""
        kind = event.get("type")
        if kind == "conn_open":
            self._remember(event)
        elif kind == "conn_close":
            conn = event.get("conn")
            if isinstance(conn, str):
                self._opened.pop(conn, None)
        elif kind == "hello":
            self._start(event)

    def _start(self, hello: Mapping[str, Any]) -> None:
        gateway = _text(hello.get("gateway"))
        self.gateway = gateway if gateway is not None else ""
        self._opened.clear()

    def _remember(self, event: Mapping[str, Any]) -> None:
        conn = event.get("conn")
        if not isinstance(conn, str):
            return
        opened = self._opened
        opened.pop(conn, None)
        if len(opened) >= self.max_tracked:
            opened.popitem(last=False)
            self.evicted += 1
        opened[conn] = {name: event.get(name) for name in _OPEN_FIELDS}


# -- records --------------------------------------------------------------------------------


def _http(
    event: Mapping[str, Any],
    conn_open: Mapping[str, Any] | None,
    host: str | None,
    local_tz: tzinfo | None,
    gateway: str,
) -> _Record:
    record = _header(event, event.get("ts"), "http", "http", host, local_tz, gateway)
    http: _Record = {}
    url = _text(event.get("path"))
    hostname, port = _hostname_and_port(_text(event.get("host")), url)
    if hostname is not None:
        http["hostname"] = hostname
    if port is not None:
        http["http_port"] = port
    if url is not None:
        http["url"] = url
    _copy(http, event, (("http_user_agent", "user_agent", _text),))
    content_type = _text(event.get("content_type"))
    if content_type is not None:
        media_type = content_type.partition(";")[0].rstrip()
        if media_type:
            http["http_content_type"] = media_type
    _copy(http, event, (("http_method", "method", _text),))
    version = _text(event.get("http_version"))
    if version is not None:
        http["protocol"] = "HTTP/" + version
    _copy(http, event, (("status", "status", _int), ("length", "response_body_bytes", _int)))
    request_headers = _headers(event.get("request_headers"), _REQUEST_HEADER_FIELDS, http)
    response_headers = _headers(event.get("response_headers"), _RESPONSE_HEADER_FIELDS, http)
    if request_headers:
        http["request_headers"] = request_headers
    if response_headers:
        http["response_headers"] = response_headers
    record["http"] = http
    return record


def _tls(
    event: Mapping[str, Any],
    conn_open: Mapping[str, Any] | None,
    host: str | None,
    local_tz: tzinfo | None,
    gateway: str,
) -> _Record | None:
    if event.get("decision") is None:
        return None  # ended before a ClientHello was read: nothing TLS to report
    ts = event.get("ts")
    record = _header(event, _handshake_time(ts, event), "tls", "tls", host, local_tz, gateway)
    opened: Mapping[str, Any] = conn_open if conn_open is not None else {}
    tls: _Record = {}
    _copy(
        tls, event, (("subject", "upstream_subject", _text), ("issuerdn", "upstream_issuer", _text))
    )
    sni = _text(event.get("sni"))
    if sni is None:
        sni = _text(opened.get("sni"))
    if sni is not None:
        tls["sni"] = sni
    version = _text(event.get("upstream_tls_version"))
    if version is not None:
        tls["version"] = TLS_VERSION_NAMES.get(version, version)
    ja3: _Record = {}
    ja3_hash = _text(opened.get("ja3_hash"))
    if ja3_hash is not None:
        ja3["hash"] = ja3_hash
    ja3_string = _text(opened.get("ja3"))
    if ja3_string is not None:
        ja3["string"] = ja3_string
    if ja3:
        tls["ja3"] = ja3
    ja4 = _text(opened.get("ja4"))
    if ja4 is not None:
        tls["ja4"] = ja4
    client_alpns = _texts(opened.get("client_alpn"))
    if client_alpns:
        tls["client_alpns"] = client_alpns
    alpn = _text(event.get("alpn"))
    if alpn is not None:
        tls["server_alpns"] = [alpn]
    record["tls"] = tls
    return record


def _anomaly(
    event: Mapping[str, Any],
    conn_open: Mapping[str, Any] | None,
    host: str | None,
    local_tz: tzinfo | None,
    gateway: str,
) -> _Record:
    stage = event.get("stage")
    known = ANOMALY_EVENTS.get(stage) if isinstance(stage, str) else None
    app_proto = known[0] if known is not None else None
    record = _header(event, event.get("ts"), "anomaly", app_proto, host, local_tz, gateway)
    anomaly: _Record = {"type": "applayer"}
    if app_proto is not None:
        anomaly["app_proto"] = app_proto
    anomaly["event"] = known[1] if known is not None else ANOMALY_OTHER
    anomaly["layer"] = "proto_parser"
    record["anomaly"] = anomaly
    return record


def _websocket(
    event: Mapping[str, Any],
    conn_open: Mapping[str, Any] | None,
    host: str | None,
    local_tz: tzinfo | None,
    gateway: str,
) -> _Record | None:
    if event.get("kind") != "message":
        return None  # the opening is the http record of the Upgrade (or the h2 stream)
    record = _header(event, event.get("ts"), "websocket", "websocket", host, local_tz, gateway)
    direction = _DIRECTIONS.get(_text(event.get("direction")) or "")
    if direction is not None:
        record["direction"] = direction
    websocket: _Record = {"fin": True}
    _copy(websocket, event, (("opcode", "opcode", _text),))
    payload = event.get("payload")
    if isinstance(payload, bytes):
        websocket["payload_base64"] = base64.b64encode(payload).decode("ascii")
        websocket["payload_printable"] = payload.translate(_PRINTABLE).decode("ascii")
    record["websocket"] = websocket
    return record


#: Who sent a message, in Suricata's top-level ``direction`` words.
_DIRECTIONS: Final[Mapping[str, str]] = {"client": "to_server", "server": "to_client"}
#: Bytes outside printable ASCII become "." (Suricata's ``*_printable`` fields).
_PRINTABLE: Final = bytes(b if 0x20 <= b < 0x7F else 0x2E for b in range(256))

_RENDERERS: Final[Mapping[str, _Render]] = {
    "http": _http,
    "conn_close": _tls,
    "protocol_error": _anomaly,
    "websocket": _websocket,
}


def _header(
    event: Mapping[str, Any],
    ts: Any,
    event_type: str,
    app_proto: str | None,
    host: str | None,
    local_tz: tzinfo | None,
    gateway: str,
) -> _Record:
    """The top-level fields, in Suricata's order."""
    record: _Record = {"timestamp": eve_timestamp(ts, local_tz)}
    conn = _text(event.get("conn"))
    if conn is not None:
        record["flow_id"] = flow_id(gateway, conn)
    if host is not None:
        record["host"] = host
    record["event_type"] = event_type
    _copy(record, event, _ADDRESS_FIELDS)
    record["proto"] = "TCP"
    if app_proto is not None:
        record["app_proto"] = app_proto
    return record


#: Record fields copied from an event field when it holds a value of the right type.
_Fields = tuple[tuple[str, str, Callable[[Any], Any]], ...]


def _copy(record: _Record, event: Mapping[str, Any], fields: _Fields) -> None:
    """``record[name] = convert(event[source])`` for each field whose value converts."""
    for name, source, convert in fields:
        value = convert(event.get(source))
        if value is not None:
            record[name] = value


def _handshake_time(ts: Any, close: Mapping[str, Any]) -> Any:
    """When both TLS legs were up (``ts`` − ``duration`` + ``handshake_duration``), else ``ts``."""
    duration = close.get("duration")
    handshake = close.get("handshake_duration")
    if (
        _is_number(ts)
        and _is_number(duration)
        and _is_number(handshake)
        and 0 <= handshake <= duration
    ):
        return ts - duration + handshake
    return ts


def _hostname_and_port(host: str | None, url: str | None) -> tuple[str | None, int | None]:
    """Like Suricata: the host of an absolute URL, else of ``Host``; lower case, no port."""
    authority = host
    if url is not None and url[:8].lower().startswith(_URL_SCHEMES):
        start = url.index("://") + 3
        end = start
        while end < len(url) and url[end] not in _URL_AUTHORITY_END:
            end += 1
        authority = url[start:end].rpartition("@")[2]
    if not authority:
        return None, None
    port_text = ""
    if authority.startswith("["):
        close = authority.find("]")
        if close != -1 and authority[close + 1 : close + 2] == ":":
            authority, port_text = authority[: close + 1], authority[close + 2 :]
    else:
        name, colon, after = authority.rpartition(":")
        if colon and (not after or _is_digits(after)):
            authority, port_text = name, after
    hostname = authority.lower().rstrip(".")
    port = None
    if _is_digits(port_text) and len(port_text) <= _MAX_PORT_DIGITS:
        number = int(port_text)
        if number <= _MAX_PORT:
            port = number
    return (hostname or None), port


def _headers(value: Any, own_fields: Mapping[str, str], http: _Record) -> list[_Record]:
    """``[name, value]`` pairs as ``{name, value}`` objects; fills ``own_fields`` in ``http``."""
    if not isinstance(value, list | tuple):
        return []
    headers: list[_Record] = []
    for item in value:
        if not isinstance(item, list | tuple) or len(item) != 2:
            continue
        name = _text(item[0])
        text = _text(item[1])
        if name is None or text is None:
            continue
        headers.append({"name": name, "value": text})
        field = own_fields.get(name)
        if field is not None and field not in http:
            http[field] = text
    return headers


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None


def _texts(value: Any) -> list[str]:
    if not isinstance(value, list | tuple):
        return []
    return [text for text in map(_text, value) if text is not None]


def _is_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


_ADDRESS_FIELDS: Final[_Fields] = (
    ("src_ip", "client_ip", _text),
    ("src_port", "client_port", _int),
    ("dest_ip", "server_ip", _text),
    ("dest_port", "server_port", _int),
)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
