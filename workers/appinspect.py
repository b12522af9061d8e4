"""Which inspector reads an intercepted connection, and what its reports become as events.

The worker asks :func:`new_inspector` for the inspector of the application protocol the
client leg negotiated (ALPN, which is always the upstream's selection):

- ``h2``: :class:`~tlsgate.workers.http2.Http2Inspector` (every stream, pushes, RFC 8441
  WebSockets);
- ``http/1.1`` or no ALPN: :class:`Http1Session`, HTTP/1.1 that continues into WebSocket
  after a ``101`` to an ``Upgrade: websocket`` request;
- anything else: None (relayed opaquely, byte counts only).

Every inspector has the same sans-I/O interface -- ``feed_client(bytes)``,
``feed_server(bytes)``, ``finish()``, each returning a list of reports -- and raises only
its :class:`~tlsgate.errors.RemoteProtocolError` subclass, whose ``stage`` (see
:func:`error_stage`) names the protocol in the ``protocol_error`` event.
:func:`event_of` turns a report into an event type and its fields (without the connection
fields the worker adds).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Protocol

from tlsgate.errors import HttpProtocolError, RemoteProtocolError
from tlsgate.workers import events as ev
from tlsgate.workers.http1 import Http1Inspector, HttpExchange
from tlsgate.workers.http2 import Http2Inspector, Http2ProtocolError, Report
from tlsgate.workers.relay import EndpointError, Relay, WouldBlock
from tlsgate.workers.websocket import (
    WebSocketInspector,
    WebSocketMessage,
    WebSocketOpened,
    WebSocketProtocolError,
    message_fields,
    opened_fields,
)

if TYPE_CHECKING:
    from tlsgate.supervisor.config import Limits

__all__ = [
    "Http1Session",
    "Inspector",
    "close_after_protocol_error",
    "error_stage",
    "event_of",
    "new_inspector",
]


class Inspector(Protocol):
    """What the worker feeds (see the module docstring)."""

    def feed_client(self, data: bytes) -> list[Report]: ...
    def feed_server(self, data: bytes) -> list[Report]: ...
    def finish(self) -> list[Report]: ...


class Http1Session:
    """HTTP/1.1 inspection that continues into WebSocket after a successful Upgrade.

    Any other protocol switch (``101`` to another Upgrade, ``2xx`` to CONNECT) leaves the rest
    of the connection opaque, as before. The client must wait for the ``101`` before sending
    frames (RFC 6455 section 4.1); bytes it sent before it cannot be framed: protocol error.
    """

    __slots__ = ("_http", "_payload_cap", "_ws")

    def __init__(
        self,
        *,
        record_headers: Collection[str],
        redact_headers: Collection[str],
        ws_payload_cap: int | None,
        limits: Limits | None = None,
    ) -> None:
        bounds: dict[str, int] = {}
        if limits is not None:
            bounds = {"max_header_bytes": limits.max_header_bytes,
                      "max_request_line": limits.max_request_line,
                      "max_header_count": limits.max_header_count}  # fmt: skip
        self._http = Http1Inspector(
            record_headers=record_headers, redact_headers=redact_headers, **bounds
        )
        self._payload_cap = ws_payload_cap
        self._ws: WebSocketInspector | None = None

    @property
    def request_head_id(self) -> int | None:
        """While the client sends an HTTP request head: its id (for the header timeout)."""
        return self._http.request_head_id if self._ws is None else None

    @property
    def opaque(self) -> bool:
        """The connection switched to a protocol other than WebSocket: nothing to parse."""
        return self._http.opaque and self._ws is None

    def feed_client(self, data: bytes) -> list[Report]:
        if self._ws is not None:
            return list(self._ws.feed_client(data))
        return list(self._http.feed_request(data))

    def feed_server(self, data: bytes) -> list[Report]:
        if self._ws is not None:
            return list(self._ws.feed_server(data))
        http = self._http
        reports: list[Report] = list(http.feed_response(data))
        if http.opaque:
            switched = [r for r in reports if isinstance(r, HttpExchange) and r.upgrade]
            if switched and switched[-1].upgrade == "websocket":
                ex = switched[-1]
                if http.held_bytes:
                    raise WebSocketProtocolError(
                        f"client sent {http.held_bytes} bytes after its WebSocket Upgrade "
                        "request before the 101 answer (RFC 6455 section 4.1 forbids it); "
                        "they cannot be framed"
                    )
                self._ws = WebSocketInspector(payload_cap=self._payload_cap)
                reports.append(WebSocketOpened("1.1", None, ex.host, ex.path))
                if http.switch_rest:
                    reports.extend(self._ws.feed_server(http.switch_rest))
        return reports

    def finish(self) -> list[Report]:
        return list(self._http.finish())


def new_inspector(
    alpn: bytes | None,
    *,
    record_headers: Collection[str],
    redact_headers: Collection[str],
    ws_payload_cap: int | None,
    limits: Limits | None = None,
) -> Http1Session | Http2Inspector | None:
    """The inspector for a connection that negotiated ``alpn`` (None: no ALPN); ``limits``
    (the ``[limits]`` of the config) bound header sections, else the inspectors' defaults."""
    if alpn == b"h2":
        h2_bounds = {"max_header_bytes": limits.max_header_bytes} if limits is not None else {}
        return Http2Inspector(record_headers=record_headers, redact_headers=redact_headers,
                              ws_payload_cap=ws_payload_cap, **h2_bounds)  # fmt: skip
    if alpn in (None, b"http/1.1"):
        return Http1Session(record_headers=record_headers, redact_headers=redact_headers,
                            ws_payload_cap=ws_payload_cap, limits=limits)  # fmt: skip
    return None


def close_after_protocol_error(relay: Relay, inspector: object) -> None:
    """End both TLS legs cleanly after a protocol error: an HTTP/2 GOAWAY (PROTOCOL_ERROR)
    where the bytes relayed so far end at a frame boundary, then close_notify. Best effort,
    never blocking: a leg whose socket is full, or with relayed bytes still pending (the
    peer got a partial chunk), gets only what fits, or nothing but the TCP close."""
    for pipe, to_client in ((relay.down, True), (relay.up, False)):
        if pipe.pending is not None:
            continue
        data = inspector.goaway(to_client) if isinstance(inspector, Http2Inspector) else b""
        try:
            if data and pipe.dst.send(data) < len(data):
                continue  # cut short: no close_notify after half a frame
        except (WouldBlock, EndpointError):
            continue
        pipe.dst.close_write()


def error_stage(exc: RemoteProtocolError) -> str:
    """``stage`` of the ``protocol_error`` event for an inspector's error."""
    if isinstance(exc, Http2ProtocolError):
        return "http2"
    if isinstance(exc, WebSocketProtocolError):
        return "websocket"
    if isinstance(exc, HttpProtocolError):
        return "http"
    return "tls"


def event_of(report: Report) -> tuple[str, dict[str, Any]]:
    """Event type and fields of one report (the worker adds the connection fields)."""
    if isinstance(report, WebSocketMessage):
        return ev.WEBSOCKET, message_fields(report)
    if isinstance(report, WebSocketOpened):
        return ev.WEBSOCKET, opened_fields(report)
    x = report
    return ev.HTTP, {
        "method": x.method, "host": x.host, "path": x.path, "http_version": x.version,
        "status": x.status, "request_headers": x.request_headers,
        "response_headers": x.response_headers,
        "request_body_bytes": x.request_body_bytes,
        "response_body_bytes": x.response_body_bytes,
        "content_type": x.content_type, "user_agent": x.user_agent,
        "request_content_type": x.request_content_type,
        "complete": x.complete, "upgrade": x.upgrade,
        "stream_id": x.stream_id, "pushed": x.pushed,
    }  # fmt: skip
