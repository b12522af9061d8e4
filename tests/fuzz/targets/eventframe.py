"""Worker-to-supervisor event frames (workers/eventpipe.py ``decode_frame``).

A compromised worker controls these bytes. Input: a frame body. Contract: ``decode_frame``
returns the events or raises ``ValueError``; what it returns re-encodes to the same body.
"""

from __future__ import annotations

from tlsgate.workers.eventpipe import decode_frame, encode_frame

ERRORS = (ValueError,)
MAX_LEN = 1 << 16


def one_input(data: bytes) -> None:
    events = decode_frame(data)
    assert encode_frame(events)[4:] == data
