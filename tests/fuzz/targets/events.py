"""Event stream decoder (workers/events.py ``EventDecoder``): what ``tlsgate events`` and any
consumer reads from the detection socket or an event file.

Input: byte 0 picks where the stream is cut into two feeds; the rest is the stream.
Contract: events come out as maps with a string ``type``, or ``EventDecodeError`` is raised;
the buffered partial event never exceeds ``max_event_bytes`` plus one feed chunk (a small
limit here, so it is reached); ``close()`` raises the same error for a cut stream.
"""

from __future__ import annotations

from tlsgate.workers.events import FEED_CHUNK_BYTES, EventDecodeError, EventDecoder

ERRORS = (EventDecodeError,)
MAX_LEN = 1 << 17
MAX_EVENT_BYTES = 4096


def one_input(data: bytes) -> None:
    if not data:
        return
    cut = data[0] * len(data) // 256 + 1
    decoder = EventDecoder(MAX_EVENT_BYTES)
    for piece in (data[1:cut], data[cut:]):
        for event in decoder.feed(piece):
            assert isinstance(event, dict) and isinstance(event["type"], str)
        assert 0 <= decoder.pending_bytes <= MAX_EVENT_BYTES + FEED_CHUNK_BYTES
    decoder.close()
