"""Sans-I/O inspection of an HTTP/2 connection (RFC 9113) inside an intercepted connection.

The worker relays the decrypted bytes unchanged and hands the same bytes to an
:class:`Http2Inspector`: client bytes to :meth:`~Http2Inspector.feed_client`, server bytes to
:meth:`~Http2Inspector.feed_server`, and calls :meth:`~Http2Inspector.finish` at the close.
Every stream becomes one :class:`~tlsgate.workers.http1.HttpExchange` (the ``http`` event of
HTTP/1.1, with ``http_version`` ``"2"`` and its ``stream_id``); a WebSocket bootstrapped by
an extended CONNECT (RFC 8441) becomes a :class:`~tlsgate.workers.websocket.WebSocketOpened`
followed by :class:`~tlsgate.workers.websocket.WebSocketMessage` objects.

Why a passive decoder: the inspector only *reads* both directions' frames; it never
terminates or re-encodes the connection. Flow control, SETTINGS, PING and priorities stay
the two endpoints' own, end to end, and the relay stays byte-transparent (no added latency,
no buffering beyond one TLS record). The cost is that the inspector must follow the HPACK
state of both directions exactly: every header block (requests, responses, trailers,
PUSH_PROMISE, blocks of streams already reported) is decoded with the decoder of the
direction that sent it, in order, with the table size the receiving side advertised.

Contract:

- ``feed_*`` returns the reports (exchanges, WebSocket upgrades and messages) the bytes
  completed, or raises :class:`Http2ProtocolError` -- never anything else. After an error
  the inspector is dead: every later feed raises it again. ``finish()`` returns the streams
  cut short (``complete=False``) and works after an error.
- Bounded memory: DATA payloads are counted as they stream and never buffered; other frames
  are buffered whole only up to :data:`MAX_BUFFERED_FRAME` bytes (GOAWAY debug data and
  unknown frame types are skipped, not buffered), a header block (HEADERS or PUSH_PROMISE plus
  CONTINUATIONs) up to ``max_header_bytes`` after decoding and :data:`MAX_BUFFERED_FRAME`
  before, the HPACK tables up to :data:`MAX_HPACK_TABLE` each, and at most ``max_streams``
  streams are tracked at once.
- Refused (a protocol error naming the rule): a client that does not start with the
  connection preface, a first frame other than SETTINGS in either direction, frames longer
  than the receiver's SETTINGS_MAX_FRAME_SIZE, frames on the wrong stream (connection frames
  on a stream, stream frames on stream 0), wrong fixed lengths (PING, RST_STREAM, PRIORITY,
  WINDOW_UPDATE, SETTINGS), invalid SETTINGS values, a frame other than CONTINUATION in the
  middle of a header block, HPACK errors, padding longer than the frame, HEADERS opening a
  stream with the wrong parity or a lower id, HEADERS or DATA on a stream the sender already
  ended, a request or response without its mandatory pseudo-headers (or with unknown ones,
  duplicate ones, or pseudo-headers after regular ones), upper-case header names, PUSH_PROMISE
  from the client or to a client that disabled push, trailers without END_STREAM.
- Frames for a stream that ended (reported) are still decoded (HPACK) and otherwise
  ignored: the two endpoints may legitimately race (a RST_STREAM crossing DATA in flight).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

import hpack

from tlsgate.errors import HttpProtocolError
from tlsgate.workers.http1 import (
    DEFAULT_RECORD_HEADERS,
    DEFAULT_REDACT_HEADERS,
    MAX_HEADER_BYTES,
    REDACTED,
    HttpExchange,
    _header_names,
)
from tlsgate.workers.websocket import (
    WebSocketInspector,
    WebSocketMessage,
    WebSocketOpened,
    WebSocketProtocolError,
)

__all__ = [
    "MAX_BUFFERED_FRAME",
    "MAX_HPACK_TABLE",
    "MAX_STREAMS",
    "PREFACE",
    "Http2Inspector",
    "Http2ProtocolError",
    "Report",
]

#: What every HTTP/2 client sends first (RFC 9113 section 3.4).
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: Largest non-DATA frame payload (and header block before decoding) held in memory.
MAX_BUFFERED_FRAME: Final = 256 * 1024
#: Largest HPACK dynamic table a receiver may grant its peer's encoder that we follow.
MAX_HPACK_TABLE: Final = 1024 * 1024
#: Streams tracked at once (open, or half-closed; typical SETTINGS_MAX_CONCURRENT_STREAMS
#: values are 100-256 per direction).
MAX_STREAMS: Final = 1024

Report = HttpExchange | WebSocketOpened | WebSocketMessage

# frame types (RFC 9113 section 6)
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
# flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

_FRAME_NAMES = {DATA: "DATA", HEADERS: "HEADERS", PRIORITY: "PRIORITY",
                RST_STREAM: "RST_STREAM", SETTINGS: "SETTINGS", PUSH_PROMISE: "PUSH_PROMISE",
                PING: "PING", GOAWAY: "GOAWAY", WINDOW_UPDATE: "WINDOW_UPDATE",
                CONTINUATION: "CONTINUATION"}  # fmt: skip
_CONNECTION_FRAMES = frozenset({SETTINGS, PING, GOAWAY})
_STREAM_FRAMES = frozenset({DATA, HEADERS, PRIORITY, RST_STREAM, PUSH_PROMISE, CONTINUATION})
_FIXED_LENGTHS = {PRIORITY: 5, RST_STREAM: 4, PING: 8, WINDOW_UPDATE: 4}

# settings (RFC 9113 section 6.5.2, RFC 8441)
_SETTINGS_HEADER_TABLE_SIZE = 0x1
_SETTINGS_ENABLE_PUSH = 0x2
_SETTINGS_INITIAL_WINDOW_SIZE = 0x4
_SETTINGS_MAX_FRAME_SIZE = 0x5
_SETTINGS_ENABLE_CONNECT_PROTOCOL = 0x8
_DEFAULT_MAX_FRAME = 16384
_LARGEST_MAX_FRAME = 16777215

_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
_RESPONSE_PSEUDO = frozenset({b":status"})

# phases of one direction's frame reader
_PREFACE = 0
_FRAME_HEADER = 1
_PAYLOAD = 2  # a non-DATA frame: its first `keep` bytes buffered, the rest skipped
_DATA_PAD_LENGTH = 3  # a padded DATA frame: its Pad Length byte
_DATA = 4  # DATA payload, streamed
_DATA_PADDING = 5  # DATA padding, skipped


class Http2ProtocolError(HttpProtocolError):
    """HTTP/2 frames inside an intercepted connection break RFC 9113 (or RFC 7541 HPACK)."""


@dataclass(slots=True, eq=False)
class _Stream:
    ex: HttpExchange
    #: the client (request side) / the server (response side) ended the stream
    req_done: bool = False
    resp_done: bool = False
    #: the final (non-1xx) response head arrived
    resp_final: bool = False
    #: the final response's content-length, if it declared a valid one
    resp_length: int | None = None
    #: an extended CONNECT (RFC 8441) with this :protocol
    protocol: str | None = None
    ws: WebSocketInspector | None = None


class _Side:
    """Frame-reading state of one direction."""

    __slots__ = (
        "at_boundary",
        "block",
        "block_flags_end_stream",
        "block_kind",
        "block_promised",
        "block_stream",
        "buf",
        "decoder",
        "flags",
        "ftype",
        "hdr",
        "keep",
        "last_stream",
        "length",
        "max_frame",
        "name",
        "pad",
        "phase",
        "preface_at",
        "remaining",
        "settled",
        "stream_id",
    )

    def __init__(self, name: str, max_header_bytes: int) -> None:
        self.name = name
        self.phase = _PREFACE if name == "client" else _FRAME_HEADER
        self.preface_at = 0
        self.hdr = bytearray()
        self.buf = bytearray()
        self.ftype = self.flags = self.stream_id = self.length = 0
        self.keep = 0
        self.remaining = 0
        self.pad = 0
        #: largest frame the receiver of this direction accepts (its SETTINGS_MAX_FRAME_SIZE)
        self.max_frame = _DEFAULT_MAX_FRAME
        #: the first frame (SETTINGS) was seen
        self.settled = False
        #: header block being assembled (HEADERS/PUSH_PROMISE + CONTINUATION)
        self.block: bytearray | None = None
        self.block_kind = 0
        self.block_stream = 0
        self.block_promised = 0
        self.block_flags_end_stream = False
        #: the bytes fed so far (every feed that did not fail) end at a frame boundary
        self.at_boundary = False
        #: highest stream id this side opened (client: odd requests; server: even pushes)
        self.last_stream = 0
        #: HPACK decoder for the header blocks this side sends
        self.decoder = hpack.Decoder(max_header_list_size=max_header_bytes)


class Http2Inspector:
    """Turns both directions of one HTTP/2 connection into reports (see the module rules).

    ``record_headers``/``redact_headers`` are header names as for HTTP/1.1;
    ``max_header_bytes`` caps one decoded header list; ``ws_payload_cap`` is None (no
    content capture: WebSocket payloads never kept) or the bytes kept per message.
    """

    def __init__(
        self,
        *,
        record_headers: Collection[str] = DEFAULT_RECORD_HEADERS,
        redact_headers: Collection[str] = DEFAULT_REDACT_HEADERS,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_streams: int = MAX_STREAMS,
        ws_payload_cap: int | None = None,
    ) -> None:
        record = _header_names(record_headers, "record_headers")
        redact = _header_names(redact_headers, "redact_headers")
        self._record = frozenset(n.encode("ascii") for n in record)
        self._redact = frozenset(n.encode("ascii") for n in redact)
        self._max_streams = max_streams
        self._ws_payload_cap = ws_payload_cap
        self._client = _Side("client", max_header_bytes)
        self._server = _Side("server", max_header_bytes)
        self._streams: dict[int, _Stream] = {}
        self._push_enabled = True
        self._error: Http2ProtocolError | None = None
        self._finished = False
        self._out: list[Report] = []
        #: first values of a few names in the header list last split (see _split)
        self._found: dict[bytes, bytes] = {}

    # ------------------------------------------------------------------ public API

    def feed_client(self, data: bytes | memoryview) -> list[Report]:
        """Client bytes; the reports they completed."""
        return self._feed(self._client, data)

    def feed_server(self, data: bytes | memoryview) -> list[Report]:
        """Server bytes; the reports they completed."""
        return self._feed(self._server, data)

    def finish(self) -> list[Report]:
        """Connection closed: the streams cut short, as ``complete=False`` exchanges."""
        if self._finished:
            return []
        self._finished = True
        out: list[Report] = []
        for st in self._streams.values():
            if st.ws is None:
                st.ex.complete = self._whole(st)
                out.append(st.ex)
        self._streams.clear()
        return out

    # ------------------------------------------------------------------ frame reading

    def _feed(self, side: _Side, data: bytes | memoryview) -> list[Report]:
        if self._error is not None:
            raise Http2ProtocolError(f"HTTP/2 connection already broken: {self._error}")
        if self._finished:
            raise Http2ProtocolError("HTTP/2 inspector fed after the connection closed")
        out: list[Report] = []
        self._out = out
        try:
            self._read(side, memoryview(data))
        except Http2ProtocolError as exc:
            self._error = exc
            raise
        except WebSocketProtocolError as exc:
            self._error = Http2ProtocolError(f"WebSocket over HTTP/2: {exc}")
            raise self._error from None
        side.at_boundary = side.phase == _FRAME_HEADER and not side.hdr and side.block is None
        return out

    def goaway(self, to_client: bool) -> bytes:
        """Frames that end the connection with PROTOCOL_ERROR towards one peer, to write
        after the bytes already relayed to it (b"" when they did not end at a frame boundary:
        then nothing may be added).

        Towards the client they come from the server's side (an empty SETTINGS first if the
        server has not sent its preface yet); towards the server from the client's side (only
        once the client's preface and SETTINGS went through).
        """
        sender = self._server if to_client else self._client
        receiver = self._client if to_client else self._server
        prefix = b""
        if not sender.at_boundary:
            if not to_client or sender.settled or sender.hdr:
                return b""
            prefix = _frame(SETTINGS, 0, 0, b"")  # the server preface it never sent
        debug = b"tlsgate: protocol error, see the gateway's protocol_error event"
        payload = receiver.last_stream.to_bytes(4, "big") + _PROTOCOL_ERROR.to_bytes(4, "big")
        return prefix + _frame(GOAWAY, 0, 0, payload + debug)

    def _read(self, side: _Side, view: memoryview) -> None:
        pos, n = 0, len(view)
        while pos < n:
            phase = side.phase
            if phase == _FRAME_HEADER:
                hdr = side.hdr
                take = min(9 - len(hdr), n - pos)
                hdr += view[pos : pos + take]
                pos += take
                if len(hdr) == 9:
                    self._frame_header(side, bytes(hdr))
                    hdr.clear()
            elif phase == _DATA:
                take = min(side.remaining, n - pos)
                self._data_bytes(side, view[pos : pos + take])
                pos += take
                side.remaining -= take
                if side.remaining == 0:
                    self._data_payload_end(side)
            elif phase == _PAYLOAD:
                take = min(side.remaining, n - pos)
                room = side.keep - len(side.buf)
                if room > 0:
                    side.buf += view[pos : pos + min(take, room)]
                pos += take
                side.remaining -= take
                if side.remaining == 0:
                    side.phase = _FRAME_HEADER
                    self._frame(side, bytes(side.buf))
                    side.buf.clear()
            elif phase == _DATA_PAD_LENGTH:
                side.pad = view[pos]
                pos += 1
                if side.pad > side.length - 1:
                    raise self._error_for(
                        side, f"DATA on stream {side.stream_id} has {side.pad} bytes of padding "
                        f"in a {side.length}-byte frame (RFC 9113 section 6.1)"
                    )  # fmt: skip
                side.remaining = side.length - 1 - side.pad
                side.phase = _DATA
                if side.remaining == 0:
                    self._data_payload_end(side)
            elif phase == _DATA_PADDING:
                take = min(side.remaining, n - pos)
                pos += take
                side.remaining -= take
                if side.remaining == 0:
                    self._data_frame_end(side)
            else:  # _PREFACE
                take = min(len(PREFACE) - side.preface_at, n - pos)
                expect = PREFACE[side.preface_at : side.preface_at + take]
                if view[pos : pos + take] != expect:
                    raise Http2ProtocolError(
                        "client did not start with the HTTP/2 connection preface although h2 "
                        "was negotiated (RFC 9113 section 3.4)"
                    )
                pos += take
                side.preface_at += take
                if side.preface_at == len(PREFACE):
                    side.phase = _FRAME_HEADER

    def _frame_header(self, side: _Side, hdr: bytes) -> None:
        length = int.from_bytes(hdr[0:3], "big")
        ftype, flags = hdr[3], hdr[4]
        stream_id = int.from_bytes(hdr[5:9], "big") & 0x7FFFFFFF
        side.length, side.ftype, side.flags, side.stream_id = length, ftype, flags, stream_id
        name = _FRAME_NAMES.get(ftype, f"type 0x{ftype:02x}")
        if not side.settled:
            if ftype != SETTINGS or flags & ACK:
                what = "a SETTINGS ACK" if ftype == SETTINGS else name
                raise self._error_for(
                    side, f"first frame is {what}, not SETTINGS (RFC 9113 section 3.4)"
                )
            side.settled = True
        if length > side.max_frame:
            raise self._error_for(
                side, f"{name} frame of {length} bytes exceeds the receiver's "
                f"SETTINGS_MAX_FRAME_SIZE of {side.max_frame} (RFC 9113 section 4.2)"
            )  # fmt: skip
        if side.block is not None and (ftype != CONTINUATION or stream_id != side.block_stream):
            raise self._error_for(
                side, f"{name} frame on stream {stream_id} inside the header block of stream "
                f"{side.block_stream}; only CONTINUATION may follow (RFC 9113 section 6.10)"
            )  # fmt: skip
        if ftype in _CONNECTION_FRAMES and stream_id != 0:
            raise self._error_for(side, f"{name} frame on stream {stream_id}, not stream 0")
        if ftype in _STREAM_FRAMES and stream_id == 0:
            raise self._error_for(side, f"{name} frame on stream 0 (RFC 9113 section 6)")
        fixed = _FIXED_LENGTHS.get(ftype)
        if fixed is not None and length != fixed:
            raise self._error_for(side, f"{name} frame of {length} bytes; it must have {fixed}")
        if ftype == CONTINUATION and side.block is None:
            raise self._error_for(
                side, f"CONTINUATION on stream {stream_id} without a header block in progress"
            )
        if ftype == DATA:
            self._data_start(side)
            if flags & PADDED:
                if length == 0:
                    raise self._error_for(side, "padded DATA frame without a Pad Length byte")
                side.phase = _DATA_PAD_LENGTH
            else:
                side.remaining = length
                side.phase = _DATA
                if length == 0:
                    self._data_payload_end(side)
            return
        if ftype in (HEADERS, PUSH_PROMISE, CONTINUATION, SETTINGS, RST_STREAM, PING, PRIORITY,
                     WINDOW_UPDATE):  # fmt: skip
            if length > MAX_BUFFERED_FRAME:
                raise self._error_for(
                    side, f"{name} frame of {length} bytes; tlsgate inspects at most "
                    f"{MAX_BUFFERED_FRAME} bytes of a header or control frame"
                )  # fmt: skip
            side.keep = length
        elif ftype == GOAWAY:
            if length < 8:
                raise self._error_for(side, f"GOAWAY frame of {length} bytes; it needs 8")
            side.keep = 8  # last stream id and error code; debug data skipped
        else:
            side.keep = 0  # unknown frame types are ignored (RFC 9113 section 5.5)
        side.remaining = length
        side.phase = _PAYLOAD
        if length == 0:
            side.phase = _FRAME_HEADER
            self._frame(side, b"")

    # ------------------------------------------------------------------ DATA

    def _data_start(self, side: _Side) -> None:
        sid = side.stream_id
        st = self._streams.get(sid)
        if st is None:
            self._check_closed_stream(side, sid, "DATA")
            return
        if (st.req_done if side is self._client else st.resp_done) or (
            side is self._server and not st.resp_final
        ):
            what = "after ending it" if side is self._client or st.resp_done else "before HEADERS"
            raise self._error_for(side, f"DATA on stream {sid} {what} (RFC 9113 section 5.1)")

    def _data_bytes(self, side: _Side, chunk: memoryview) -> None:
        st = self._streams.get(side.stream_id)
        if st is None:
            return
        if side is self._client:
            st.ex.request_body_bytes += len(chunk)
            if st.ws is not None:
                self._out.extend(st.ws.feed_client(chunk))
        else:
            st.ex.response_body_bytes += len(chunk)
            if st.ws is not None:
                self._out.extend(st.ws.feed_server(chunk))

    def _data_payload_end(self, side: _Side) -> None:
        if side.flags & PADDED and side.pad:
            side.remaining = side.pad
            side.phase = _DATA_PADDING
        else:
            self._data_frame_end(side)

    def _data_frame_end(self, side: _Side) -> None:
        side.phase = _FRAME_HEADER
        if side.flags & END_STREAM:
            self._end_stream(side, side.stream_id)

    # ------------------------------------------------------------------ other frames

    def _frame(self, side: _Side, payload: bytes) -> None:
        ftype, flags, sid = side.ftype, side.flags, side.stream_id
        if ftype == HEADERS or ftype == PUSH_PROMISE:
            body = self._strip_padding(side, payload)
            if ftype == HEADERS and flags & PRIORITY_FLAG:
                if len(body) < 5:
                    raise self._error_for(side, "HEADERS with PRIORITY flag but no priority")
                body = body[5:]
            promised = 0
            if ftype == PUSH_PROMISE:
                if side is self._client:
                    raise self._error_for(side, "client sent PUSH_PROMISE (RFC 9113 section 8.4)")
                if len(body) < 4:
                    raise self._error_for(side, "PUSH_PROMISE without a promised stream id")
                promised = int.from_bytes(body[:4], "big") & 0x7FFFFFFF
                body = body[4:]
            side.block = bytearray(body)
            side.block_kind = ftype
            side.block_stream = sid
            side.block_promised = promised
            side.block_flags_end_stream = bool(ftype == HEADERS and flags & END_STREAM)
            if flags & END_HEADERS:
                self._header_block_done(side)
        elif ftype == CONTINUATION:
            block = side.block
            assert block is not None
            if len(block) + len(payload) > MAX_BUFFERED_FRAME:
                raise self._error_for(
                    side, f"header block of stream {sid} exceeds {MAX_BUFFERED_FRAME} bytes"
                )
            block += payload
            if flags & END_HEADERS:
                self._header_block_done(side)
        elif ftype == SETTINGS:
            self._settings(side, flags, payload)
        elif ftype == RST_STREAM:
            self._reset(side, sid)
        elif ftype == WINDOW_UPDATE:
            if int.from_bytes(payload, "big") & 0x7FFFFFFF == 0 and sid == 0:
                raise self._error_for(side, "WINDOW_UPDATE with an increment of 0 on stream 0")
        # PRIORITY, PING, GOAWAY, unknown types: nothing to report

    def _strip_padding(self, side: _Side, payload: bytes) -> bytes:
        if not side.flags & PADDED:
            return payload
        if not payload or payload[0] > len(payload) - 1:
            raise self._error_for(
                side, f"{_FRAME_NAMES[side.ftype]} on stream {side.stream_id} has more padding "
                "than payload (RFC 9113 section 6.2)"
            )  # fmt: skip
        return payload[1 : len(payload) - payload[0]]

    def _settings(self, side: _Side, flags: int, payload: bytes) -> None:
        if flags & ACK:
            if payload:
                raise self._error_for(side, "SETTINGS ACK with a payload (RFC 9113 section 6.5)")
            return
        if len(payload) % 6:
            raise self._error_for(side, f"SETTINGS payload of {len(payload)} bytes, not 6*n")
        # the sender's settings bound what the *other* direction may send
        other = self._server if side is self._client else self._client
        for at in range(0, len(payload), 6):
            ident = int.from_bytes(payload[at : at + 2], "big")
            value = int.from_bytes(payload[at + 2 : at + 6], "big")
            if ident == _SETTINGS_HEADER_TABLE_SIZE:
                granted = min(value, MAX_HPACK_TABLE)
                dec = other.decoder
                dec.max_allowed_table_size = max(dec.max_allowed_table_size, granted)
            elif ident == _SETTINGS_ENABLE_PUSH:
                if value > 1 or (side is self._server and value):
                    raise self._error_for(side, f"SETTINGS_ENABLE_PUSH of {value}")
                if side is self._client:
                    self._push_enabled = value == 1
            elif ident == _SETTINGS_INITIAL_WINDOW_SIZE and value > 0x7FFFFFFF:
                raise self._error_for(side, f"SETTINGS_INITIAL_WINDOW_SIZE of {value}")
            elif ident == _SETTINGS_MAX_FRAME_SIZE:
                if not _DEFAULT_MAX_FRAME <= value <= _LARGEST_MAX_FRAME:
                    raise self._error_for(side, f"SETTINGS_MAX_FRAME_SIZE of {value}")
                other.max_frame = max(other.max_frame, value)
            elif ident == _SETTINGS_ENABLE_CONNECT_PROTOCOL and value > 1:
                raise self._error_for(side, f"SETTINGS_ENABLE_CONNECT_PROTOCOL of {value}")

    # ------------------------------------------------------------------ streams

    def _check_closed_stream(self, side: _Side, sid: int, what: str) -> None:
        """A frame for a stream not tracked: fine if it was (the ends may race), else error."""
        opener = self._client if sid % 2 else self._server
        if sid > opener.last_stream:
            raise self._error_for(
                side, f"{what} on stream {sid}, which was never opened (RFC 9113 section 5.1)"
            )

    def _header_block_done(self, side: _Side) -> None:
        block = side.block
        assert block is not None
        side.block = None
        try:
            headers = side.decoder.decode(bytes(block), raw=True)
        except hpack.HPACKError as exc:
            raise self._error_for(side, f"HPACK: {exc} (RFC 7541)") from None
        pairs: list[tuple[bytes, bytes]] = [(bytes(k), bytes(v)) for k, v in headers]
        sid = side.block_stream
        if side.block_kind == PUSH_PROMISE:
            self._push_promise(side, sid, side.block_promised, pairs)
        elif side is self._client:
            self._client_headers(side, sid, pairs)
        else:
            self._server_headers(side, sid, pairs)
        if side.block_flags_end_stream:
            self._end_stream(side, sid)

    def _client_headers(self, side: _Side, sid: int, pairs: list[tuple[bytes, bytes]]) -> None:
        st = self._streams.get(sid)
        if st is not None:
            if st.req_done:
                raise self._error_for(side, f"HEADERS on stream {sid} after the client ended it")
            self._trailers(side, sid, pairs)
            return
        if sid % 2 == 0 or sid <= side.last_stream:
            raise self._error_for(
                side, f"client HEADERS opening stream {sid}; new client streams have odd ids "
                f"above {side.last_stream} (RFC 9113 section 5.1.1)"
            )  # fmt: skip
        side.last_stream = sid
        self._open_stream(side, sid, pairs, pushed=False)

    def _open_stream(
        self, side: _Side, sid: int, pairs: list[tuple[bytes, bytes]], *, pushed: bool
    ) -> _Stream:
        if len(self._streams) >= self._max_streams:
            raise self._error_for(
                side, f"more than {self._max_streams} streams open at once; tlsgate tracks at "
                "most that many per connection"
            )  # fmt: skip
        ex = HttpExchange(version="2", stream_id=sid, pushed=pushed)
        pseudo = self._split(side, sid, pairs, _REQUEST_PSEUDO, ex.request_headers)
        method = pseudo.get(b":method")
        if method is None:
            raise self._malformed(side, sid, "request without :method")
        ex.method = method.decode("latin-1")
        authority = pseudo.get(b":authority")
        path = pseudo.get(b":path")
        protocol = pseudo.get(b":protocol")
        if method == b"CONNECT" and protocol is None:
            if authority is None or path is not None or b":scheme" in pseudo:
                raise self._malformed(side, sid, "CONNECT needs :authority and no :path/:scheme")
            path = authority
        elif path is None or b":scheme" not in pseudo:
            raise self._malformed(side, sid, "request without :scheme or :path")
        if protocol is not None and method != b"CONNECT":
            raise self._malformed(side, sid, ":protocol on a request that is not CONNECT")
        ex.path = path.decode("latin-1")
        if authority is None:
            authority = self._found.get(b"host")
        ex.host = authority.decode("latin-1") if authority is not None else None
        ua = self._found.get(b"user-agent")
        ex.user_agent = ua.decode("latin-1") if ua is not None else None
        ct = self._found.get(b"content-type")
        ex.request_content_type = ct.decode("latin-1") if ct is not None else None
        st = _Stream(ex, req_done=pushed)
        if protocol is not None:
            st.protocol = protocol.decode("latin-1")
        self._streams[sid] = st
        return st

    def _server_headers(self, side: _Side, sid: int, pairs: list[tuple[bytes, bytes]]) -> None:
        st = self._streams.get(sid)
        if st is None:
            self._check_closed_stream(side, sid, "HEADERS")
            return  # a stream already reported: decoded (HPACK state), nothing to add
        if st.resp_done:
            raise self._error_for(side, f"HEADERS on stream {sid} after the server ended it")
        if st.resp_final:
            self._trailers(side, sid, pairs)
            return
        found: list[tuple[str, str]] = []
        pseudo = self._split(side, sid, pairs, _RESPONSE_PSEUDO, found)
        raw = pseudo.get(b":status")
        if raw is None or len(raw) != 3 or not raw.isdigit():
            raise self._malformed(side, sid, f"response :status {raw!r} is not 3 digits")
        status = int(raw)
        if status == 101:
            raise self._malformed(side, sid, "status 101 does not exist in HTTP/2 (section 8.6)")
        if status < 200:
            return  # interim response: the final one follows (headers not recorded)
        ex = st.ex
        st.resp_final = True
        ex.status = status
        ex.response_headers = found
        ct = self._found.get(b"content-type")
        ex.content_type = ct.decode("latin-1") if ct is not None else None
        length = self._found.get(b"content-length")
        if length is not None and length.isdigit() and len(length) <= 19:
            st.resp_length = int(length)
        if st.protocol is not None and status < 300:
            ex.upgrade = st.protocol
            ex.complete = True
            self._out.append(ex)  # reported now; the stream carries the new protocol
            if st.protocol.lower() == "websocket":
                st.ws = WebSocketInspector(stream_id=sid, payload_cap=self._ws_payload_cap)
                self._out.append(
                    WebSocketOpened(http_version="2", stream_id=sid, host=ex.host, path=ex.path)
                )

    def _trailers(self, side: _Side, sid: int, pairs: list[tuple[bytes, bytes]]) -> None:
        if not side.block_flags_end_stream:
            raise self._malformed(side, sid, "trailers (a second HEADERS) without END_STREAM")
        for name, _ in pairs:
            if name.startswith(b":"):
                raise self._malformed(side, sid, "pseudo-header in trailers")
            if name != name.lower():
                raise self._malformed(side, sid, f"upper-case header name {name!r}")

    def _push_promise(
        self, side: _Side, sid: int, promised: int, pairs: list[tuple[bytes, bytes]]
    ) -> None:
        if not self._push_enabled:
            raise self._error_for(side, "PUSH_PROMISE although the client disabled push")
        if sid % 2 == 0 or sid > self._client.last_stream:
            raise self._error_for(side, f"PUSH_PROMISE on stream {sid}, not a client stream")
        if promised % 2 or promised <= side.last_stream:
            raise self._error_for(
                side, f"PUSH_PROMISE promising stream {promised}; pushed streams have even ids "
                f"above {side.last_stream} (RFC 9113 section 6.6)"
            )  # fmt: skip
        side.last_stream = promised
        self._open_stream(side, promised, pairs, pushed=True)

    def _split(
        self,
        side: _Side,
        sid: int,
        pairs: list[tuple[bytes, bytes]],
        allowed: frozenset[bytes],
        record: list[tuple[str, str]],
    ) -> dict[bytes, bytes]:
        """Pseudo-headers (checked) and the recorded regular headers of one header list;
        the first value of a few interesting names goes to ``self._found``."""
        pseudo: dict[bytes, bytes] = {}
        found: dict[bytes, bytes] = {}
        regular = False
        for name, value in pairs:
            if name.startswith(b":"):
                if regular or name not in allowed or name in pseudo:
                    raise self._malformed(
                        side, sid, f"pseudo-header {name!r} unknown, repeated or after regular "
                        "headers (RFC 9113 section 8.3)"
                    )  # fmt: skip
                pseudo[name] = value
                continue
            regular = True
            if name != name.lower():
                raise self._malformed(side, sid, f"upper-case header name {name!r}")
            if name in _FOUND_NAMES and name not in found:
                found[name] = value
            if name in self._record:
                text = REDACTED if name in self._redact else value.decode("latin-1")
                record.append((name.decode("latin-1"), text))
        self._found = found
        return pseudo

    def _end_stream(self, side: _Side, sid: int) -> None:
        st = self._streams.get(sid)
        if st is None:
            return
        if side is self._client:
            st.req_done = True
        else:
            st.resp_done = True
        if st.req_done and st.resp_done:
            del self._streams[sid]
            if st.ws is None:
                st.ex.complete = st.resp_final
                self._out.append(st.ex)

    def _reset(self, side: _Side, sid: int) -> None:
        st = self._streams.pop(sid, None)
        if st is None:
            self._check_closed_stream(side, sid, "RST_STREAM")
            return
        if st.ws is None:
            st.ex.complete = self._whole(st)
            self._out.append(st.ex)

    @staticmethod
    def _whole(st: _Stream) -> bool:
        """A stream cut by a reset or the close still carried a whole exchange when the request
        had ended and the response body reached its declared content-length: a client that has
        every byte may reset the stream (curl does, with STREAM_CLOSED) or close the connection
        before the server's END_STREAM arrives (RFC 9113 section 8.1.1)."""
        return (
            st.req_done
            and st.resp_final
            and st.resp_length is not None
            and st.ex.response_body_bytes == st.resp_length
        )

    # ------------------------------------------------------------------ errors

    def _error_for(self, side: _Side, what: str) -> Http2ProtocolError:
        return Http2ProtocolError(f"HTTP/2 {side.name}: {what}")

    def _malformed(self, side: _Side, sid: int, what: str) -> Http2ProtocolError:
        return Http2ProtocolError(
            f"HTTP/2 {side.name}: malformed header list on stream {sid}: {what}"
        )


_FOUND_NAMES: Final = frozenset({b"host", b"user-agent", b"content-type", b"content-length"})
_PROTOCOL_ERROR: Final = 0x1


def _frame(ftype: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((ftype, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )
