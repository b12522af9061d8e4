"""Event frames from a worker to the supervisor: the supervisor decodes what a possibly
compromised worker sends, so a malformed frame is a ValueError, never another exception."""

from __future__ import annotations

import pytest

from tlsgate.workers.eventpipe import decode_frame, encode_frame


def test_a_frame_round_trips_its_events() -> None:
    events = [b"\x81\xa4type\xa3gap", b"", b"x" * 70000]
    assert decode_frame(encode_frame(events)[4:]) == events


@pytest.mark.parametrize("body", [b"\n", b"\x00\x00\x00", b"\x00\x00\x00\x00\x00"])
def test_a_body_cut_inside_a_length_field_is_a_value_error(body: bytes) -> None:
    # found by the eventframe fuzz target: struct.error escaped for b"\n"
    with pytest.raises(ValueError, match="truncated inside a length field"):
        decode_frame(body)


def test_a_body_cut_inside_an_event_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="truncated"):
        decode_frame(b"\x00\x00\x00\x05abc")
