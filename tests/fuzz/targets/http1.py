"""HTTP/1.1 inspection (workers/http1.py): decrypted bytes of both directions of a tunnel.

Input: a sequence of chunks ``direction (1 byte: even = client, odd = upstream) | length
(2 bytes, big-endian) | bytes``, fed in order as the relay would. Contract: ``feed_*``
return exchanges or raise ``HttpProtocolError``; after an error every feed raises it again;
``finish()`` never raises; recorded header sections stay within ``max_header_bytes`` (small
here, so the limits are reached) and no more than ``max_pending`` exchanges are in flight.
"""

from __future__ import annotations

from tlsgate.errors import HttpProtocolError
from tlsgate.workers.http1 import Http1Inspector, HttpExchange

ERRORS = (HttpProtocolError,)
MAX_LEN = 1 << 16
MAX_HEADER_BYTES = 2048
MAX_PENDING = 8


def chunks(data: bytes) -> list[tuple[bool, bytes]]:
    """Split an input into (from_client, bytes) chunks; a short tail is client bytes."""
    out = []
    pos = 0
    while pos + 3 <= len(data):
        length = int.from_bytes(data[pos + 1 : pos + 3], "big")
        out.append((data[pos] % 2 == 0, data[pos + 3 : pos + 3 + length]))
        pos += 3 + length
    if pos < len(data):
        out.append((True, data[pos:]))
    return out


def encode(parts: list[tuple[bool, bytes]]) -> bytes:
    """The inverse of :func:`chunks` (used by capture_corpus.py)."""
    out = bytearray()
    for from_client, payload in parts:
        for start in range(0, max(len(payload), 1), 0xFFFF):
            piece = payload[start : start + 0xFFFF]
            out += bytes((0 if from_client else 1,)) + len(piece).to_bytes(2, "big") + piece
    return bytes(out)


def _check(exchanges: list[HttpExchange]) -> None:
    for ex in exchanges:
        for headers in (ex.request_headers, ex.response_headers):
            assert sum(len(n) + len(v) + 4 for n, v in headers) <= MAX_HEADER_BYTES


def one_input(data: bytes) -> None:
    inspector = Http1Inspector(max_header_bytes=MAX_HEADER_BYTES, max_pending=MAX_PENDING)
    failed = False
    try:
        for from_client, payload in chunks(data):
            if failed:
                try:
                    (inspector.feed_request if from_client else inspector.feed_response)(payload)
                except HttpProtocolError:
                    continue
                raise AssertionError("a feed after an error did not raise HttpProtocolError")
            try:
                if from_client:
                    _check(inspector.feed_request(payload))
                else:
                    _check(inspector.feed_response(payload))
            except HttpProtocolError:
                failed = True
    finally:
        ends = inspector.finish()
    _check(ends)
    assert len(ends) <= MAX_PENDING + 2
    assert inspector.finish() == []
