"""HTTP/2 inspection (workers/http2.py): decrypted bytes of both directions of an h2 tunnel.

Input: chunks as for the ``http1`` target (``direction | length | bytes``; even = client).
Contract: ``feed_client``/``feed_server`` return reports or raise ``Http2ProtocolError``
(an ``HttpProtocolError``), never anything else -- HPACK errors included; after an error
every feed raises it again; ``finish()`` never raises; recorded headers stay within
``max_header_bytes`` and no more than ``max_streams`` streams are reported cut short.
"""

from __future__ import annotations

from tests.fuzz.targets.http1 import chunks
from tlsgate.errors import HttpProtocolError
from tlsgate.workers.http1 import HttpExchange
from tlsgate.workers.http2 import Http2Inspector

ERRORS = (HttpProtocolError,)
MAX_LEN = 1 << 17
MAX_HEADER_BYTES = 2048
MAX_STREAMS = 8
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _check(reports: list[object]) -> None:
    for report in reports:
        if isinstance(report, HttpExchange):
            for headers in (report.request_headers, report.response_headers):
                assert sum(len(n) + len(v) for n, v in headers) <= MAX_HEADER_BYTES


def one_input(data: bytes) -> None:
    inspector = Http2Inspector(max_header_bytes=MAX_HEADER_BYTES, max_streams=MAX_STREAMS)
    failed = False
    try:
        for i, (from_client, payload) in enumerate(chunks(data)):
            if i == 0 and from_client and not payload.startswith(PREFACE[:1]):
                payload = PREFACE + payload  # spend the mutations past the preface
            feed = inspector.feed_client if from_client else inspector.feed_server
            try:
                reports = feed(payload)
            except HttpProtocolError:
                if failed:
                    continue
                failed = True
                continue
            assert not failed, "a feed after an error did not raise"
            _check(list(reports))
    finally:
        ends = inspector.finish()
    _check(list(ends))
    assert len(ends) <= MAX_STREAMS + 1
    assert inspector.finish() == []
