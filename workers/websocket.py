"""Sans-I/O inspection of WebSocket traffic (RFC 6455) inside an intercepted connection.

A :class:`WebSocketInspector` watches both directions of one WebSocket: after an HTTP/1.1
``101`` (the rest of the TLS connection) or after a ``2xx`` to an HTTP/2 extended CONNECT
with ``:protocol websocket`` (RFC 8441; the DATA payload of that one stream). The worker
hands it the bytes it relays, unchanged: client bytes to :meth:`~WebSocketInspector.feed_client`,
server bytes to :meth:`~WebSocketInspector.feed_server`. Each returns the
:class:`WebSocketMessage` objects those bytes completed.

Contract:

- The inspector never changes, delays or keeps the relayed data. Memory per connection is
  bounded whatever the message sizes: a frame header (at most 14 bytes), the first bytes of a
  close frame's payload (the code, 2 bytes), counters, and -- only under content capture --
  the first ``payload_cap`` bytes of the message being received, unmasked.
- A message is counted as it streams: fragments (continuation frames) are reassembled for
  counting only, so ``size`` is the payload size of the whole message and ``fragments`` the
  number of frames it took. Control frames (ping, pong, close) may arrive between the
  fragments of a message and are messages of their own.
- ``feed_*`` returns the completed messages or raises :class:`WebSocketProtocolError`
  (a :class:`~tlsgate.errors.RemoteProtocolError`) -- never anything else. After an error
  both directions are dead: every later feed raises it again.
- Rules enforced (RFC 6455 section 5): client frames are masked and server frames are not;
  opcodes 3-7 and 11-15 are reserved; control frames have FIN set and at most 125 bytes; a
  continuation needs a message in progress and a new data frame needs none; a close payload
  is empty or holds a 2-byte code; a 64-bit length has its top bit clear; nothing follows a
  close frame in the same direction. RSV1 is accepted (permessage-deflate, RFC 7692, the
  only deployed extension) and reported as ``compressed``; RSV2 and RSV3 are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from tlsgate.errors import RemoteProtocolError

__all__ = [
    "CLIENT",
    "DEFAULT_PAYLOAD_CAP",
    "SERVER",
    "WebSocketDirection",
    "WebSocketInspector",
    "WebSocketMessage",
    "WebSocketOpened",
    "WebSocketProtocolError",
    "message_fields",
    "opened_fields",
]

#: ``direction`` of a message sent by the client / by the server.
CLIENT: Final = "client"
SERVER: Final = "server"

#: Bytes of each message's payload kept (unmasked) for the event under content capture.
DEFAULT_PAYLOAD_CAP: Final = 4096

OPCODE_NAMES: Final = {0x1: "text", 0x2: "binary", 0x8: "close", 0x9: "ping", 0xA: "pong"}
_CONTINUATION = 0x0
_CLOSE = 0x8
_MAX_CONTROL_PAYLOAD = 125

# phases of a direction's decoder
_HEADER = 0  # reading a frame header (2 to 14 bytes)
_PAYLOAD = 1  # inside a frame's payload


class WebSocketProtocolError(RemoteProtocolError):
    """WebSocket frames inside an intercepted connection break RFC 6455."""


@dataclass(slots=True)
class WebSocketOpened:
    """A connection (HTTP/1.1) or a stream (HTTP/2) switched to WebSocket."""

    http_version: str
    stream_id: int | None
    host: str | None
    path: str


@dataclass(slots=True)
class WebSocketMessage:
    """One complete message (all its fragments), or one control frame."""

    #: Who sent it: "client" or "server".
    direction: str
    #: "text", "binary", "close", "ping" or "pong" (of the first frame, for fragmented data).
    opcode: str
    #: Payload bytes of the whole message (after unmasking: the application's size).
    size: int
    #: Frames it took (1 if not fragmented).
    fragments: int
    #: RSV1 set on its first frame (permessage-deflate): ``size`` is the compressed size.
    compressed: bool
    #: HTTP/2 stream carrying the WebSocket (RFC 8441); None over HTTP/1.1.
    stream_id: int | None
    #: Status code of a close frame (None if it had no payload, or not a close).
    close_code: int | None = None
    #: First payload bytes, unmasked; only under content capture, else None.
    payload: bytes | None = None


def opened_fields(opened: WebSocketOpened) -> dict[str, Any]:
    """The ``websocket`` event fields (``kind`` ``"upgrade"``) of a switch."""
    return {
        "kind": "upgrade",
        "stream_id": opened.stream_id,
        "http_version": opened.http_version,
        "host": opened.host,
        "path": opened.path,
    }


def message_fields(msg: WebSocketMessage) -> dict[str, Any]:
    """The ``websocket`` event fields (``kind`` ``"message"``) of a message."""
    fields: dict[str, Any] = {
        "kind": "message",
        "stream_id": msg.stream_id,
        "direction": msg.direction,
        "opcode": msg.opcode,
        "size": msg.size,
        "fragments": msg.fragments,
        "compressed": msg.compressed,
        "close_code": msg.close_code,
    }
    if msg.payload is not None:
        fields["payload"] = msg.payload
    return fields


class WebSocketDirection:
    """Frames of one direction, decoded incrementally (see the module rules)."""

    __slots__ = (
        "_close_head",
        "_closed",
        "_control",
        "_ctl_keep",
        "_data_keep",
        "_fin",
        "_frame_opcode",
        "_hdr",
        "_mask",
        "_mask_pos",
        "_masked",
        "_msg",
        "_payload_cap",
        "_phase",
        "_remaining",
        "direction",
        "stream_id",
    )

    def __init__(self, direction: str, stream_id: int | None, payload_cap: int | None) -> None:
        self.direction = direction
        self.stream_id = stream_id
        #: None: no content capture (payload never kept); else bytes kept per message.
        self._payload_cap = payload_cap
        self._masked = direction == CLIENT
        self._phase = _HEADER
        self._hdr = bytearray()
        self._remaining = 0
        self._mask = b""
        self._mask_pos = 0
        self._frame_opcode = 0
        self._fin = False
        self._control: WebSocketMessage | None = None
        self._msg: WebSocketMessage | None = None
        # first payload bytes kept under content capture: of the data message, of the control
        # frame (a control frame may come between the fragments of a data message)
        self._data_keep = bytearray()
        self._ctl_keep = bytearray()
        self._close_head = bytearray()
        self._closed = False

    def feed(self, data: bytes | memoryview) -> list[WebSocketMessage]:
        """Decode ``data``; return the messages it completed."""
        out: list[WebSocketMessage] = []
        view = memoryview(data)
        pos, n = 0, len(view)
        while pos < n:
            if self._phase == _HEADER:
                pos = self._read_header(view, pos, out)
            else:
                take = min(self._remaining, n - pos)
                self._payload_bytes(view[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._frame_done(out)
        return out

    # -- frame header ---------------------------------------------------------------------
    def _read_header(self, view: memoryview, pos: int, out: list[WebSocketMessage]) -> int:
        hdr = self._hdr
        if self._closed:
            raise WebSocketProtocolError(
                f"{self.direction} sent bytes after its close frame (RFC 6455 section 5.5.1)"
            )
        need = 2
        while True:
            if len(hdr) < need:
                take = min(need - len(hdr), len(view) - pos)
                hdr += view[pos : pos + take]
                pos += take
                if len(hdr) < need:
                    return pos
            total = _header_length(hdr)
            if total == need:
                break
            need = total
        self._start_frame(bytes(hdr), out)
        hdr.clear()
        return pos

    def _start_frame(self, hdr: bytes, out: list[WebSocketMessage]) -> None:
        b0, b1 = hdr[0], hdr[1]
        fin = bool(b0 & 0x80)
        if b0 & 0x30:
            raise WebSocketProtocolError(
                f"{self.direction} frame has RSV2/RSV3 set (byte 0x{b0:02x}); no extension "
                "using them is deployed (RFC 6455 section 5.2)"
            )
        opcode = b0 & 0x0F
        masked = bool(b1 & 0x80)
        if masked != self._masked:
            raise WebSocketProtocolError(
                f"{self.direction} frame is {'masked' if masked else 'not masked'}; RFC 6455 "
                f"section 5.1 requires {'client' if self._masked else 'server'} frames "
                f"{'to be' if self._masked else 'not to be'} masked"
            )
        length = b1 & 0x7F
        at = 2
        if length == 126:
            length = int.from_bytes(hdr[2:4], "big")
            at = 4
        elif length == 127:
            length = int.from_bytes(hdr[2:10], "big")
            at = 10
            if length >> 63:
                raise WebSocketProtocolError(
                    f"{self.direction} frame length has its top bit set (RFC 6455 section 5.2)"
                )
        self._mask = hdr[at : at + 4] if masked else b""
        self._mask_pos = 0
        self._frame_opcode = opcode
        if opcode >= 0x8:
            if opcode not in OPCODE_NAMES:
                raise self._reserved(opcode)
            if not fin or length > _MAX_CONTROL_PAYLOAD:
                raise WebSocketProtocolError(
                    f"{self.direction} control frame ({OPCODE_NAMES[opcode]}) is fragmented or "
                    f"longer than 125 bytes ({length}) (RFC 6455 section 5.5)"
                )
            if opcode == _CLOSE and length == 1:
                raise WebSocketProtocolError(
                    f"{self.direction} close frame has a 1-byte payload; it must be empty or "
                    "start with a 2-byte status code (RFC 6455 section 5.5.1)"
                )
            self._control = self._new_message(opcode, length, bool(b0 & 0x40))
            self._close_head.clear()
            self._ctl_keep.clear()
        elif opcode == _CONTINUATION:
            msg = self._msg
            if msg is None:
                raise WebSocketProtocolError(
                    f"{self.direction} sent a continuation frame with no fragmented message "
                    "in progress (RFC 6455 section 5.4)"
                )
            if b0 & 0x40:
                raise WebSocketProtocolError(
                    f"{self.direction} continuation frame has RSV1 set; only a message's "
                    "first frame may (RFC 7692 section 6.1)"
                )
            msg.size += length
            msg.fragments += 1
        else:
            if opcode not in OPCODE_NAMES:
                raise self._reserved(opcode)
            if self._msg is not None:
                raise WebSocketProtocolError(
                    f"{self.direction} started a new {OPCODE_NAMES[opcode]} message while a "
                    "fragmented one was in progress (RFC 6455 section 5.4)"
                )
            self._msg = self._new_message(opcode, length, bool(b0 & 0x40))
            self._data_keep.clear()
        self._remaining = length
        self._fin = fin
        if length:
            self._phase = _PAYLOAD
        else:
            self._frame_done(out)

    def _new_message(self, opcode: int, size: int, compressed: bool) -> WebSocketMessage:
        return WebSocketMessage(
            direction=self.direction,
            opcode=OPCODE_NAMES[opcode],
            size=size,
            fragments=1,
            compressed=compressed,
            stream_id=self.stream_id,
        )

    def _reserved(self, opcode: int) -> WebSocketProtocolError:
        return WebSocketProtocolError(
            f"{self.direction} frame uses reserved opcode 0x{opcode:x} (RFC 6455 section 5.2)"
        )

    # -- payload ---------------------------------------------------------------------------
    def _payload_bytes(self, chunk: memoryview) -> None:
        if self._frame_opcode == _CLOSE and len(self._close_head) < 2:
            self._close_head += self._unmask(chunk[: 2 - len(self._close_head)])
        if self._payload_cap is not None:
            keep = self._ctl_keep if self._frame_opcode >= 0x8 else self._data_keep
            room = self._payload_cap - len(keep)
            if room > 0:
                keep += self._unmask(chunk[:room])
        if self._mask:
            self._mask_pos = (self._mask_pos + len(chunk)) % 4

    def _unmask(self, chunk: memoryview) -> bytes:
        """``chunk`` (starting at the current mask position) without the client's mask."""
        mask = self._mask
        if not mask:
            return bytes(chunk)
        start = self._mask_pos
        key = (mask * 2)[start : start + 4]
        data = bytes(chunk)
        repeat = (key * (len(data) // 4 + 1))[: len(data)]
        return (int.from_bytes(data, "big") ^ int.from_bytes(repeat, "big")).to_bytes(
            len(data), "big"
        )

    def _frame_done(self, out: list[WebSocketMessage]) -> None:
        self._phase = _HEADER
        opcode = self._frame_opcode
        capture = self._payload_cap is not None
        if opcode >= 0x8:
            msg = self._control
            assert msg is not None
            self._control = None
            if opcode == _CLOSE:
                self._closed = True
                if len(self._close_head) == 2:
                    msg.close_code = int.from_bytes(self._close_head, "big")
            if capture:
                msg.payload = bytes(self._ctl_keep)
            out.append(msg)
        elif self._fin:
            msg = self._msg
            assert msg is not None
            self._msg = None
            if capture:
                msg.payload = bytes(self._data_keep)
            out.append(msg)


def _header_length(hdr: bytearray) -> int:
    """Total header length implied by its first two bytes."""
    b1 = hdr[1]
    length = b1 & 0x7F
    extra = 2 if length == 126 else 8 if length == 127 else 0
    return 2 + extra + (4 if b1 & 0x80 else 0)


class WebSocketInspector:
    """Both directions of one WebSocket (see the module rules)."""

    __slots__ = ("_client", "_error", "_server")

    def __init__(self, stream_id: int | None = None, payload_cap: int | None = None) -> None:
        self._client = WebSocketDirection(CLIENT, stream_id, payload_cap)
        self._server = WebSocketDirection(SERVER, stream_id, payload_cap)
        self._error: WebSocketProtocolError | None = None

    def feed_client(self, data: bytes | memoryview) -> list[WebSocketMessage]:
        """Client bytes; the messages they completed."""
        return self._feed(self._client, data)

    def feed_server(self, data: bytes | memoryview) -> list[WebSocketMessage]:
        """Server bytes; the messages they completed."""
        return self._feed(self._server, data)

    def _feed(self, side: WebSocketDirection, data: bytes | memoryview) -> list[WebSocketMessage]:
        if self._error is not None:
            raise WebSocketProtocolError(f"WebSocket already broken: {self._error}")
        try:
            return side.feed(data)
        except WebSocketProtocolError as exc:
            self._error = exc
            raise
