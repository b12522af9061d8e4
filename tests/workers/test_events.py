"""Event encoding, the worker's bounded queue and its gap events, and decoding."""

from __future__ import annotations

import itertools
import json
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsgate.errors import RemoteProtocolError
from tlsgate.workers.events import (
    COMMON_FIELDS,
    CONN_OPEN,
    EVENT_TYPES,
    GAP,
    HTTP,
    HUB_WORKER_ID,
    SCHEMA_VERSION,
    STAGE_WORKER_QUEUE,
    EventDecodeError,
    EventDecoder,
    EventEmitter,
    EventQueue,
    decode_events,
    encode_hub_event,
    new_packer,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 0.25
        return self.now


def emitted(queue: EventQueue) -> list[dict[str, Any]]:
    return list(decode_events(b"".join(queue.drain(10**9))))


def conn_fields(n: int) -> dict[str, Any]:
    return {"conn": f"3-{n}", "sni": "example.com", "client_port": 40000 + n}


def test_every_event_starts_with_type_version_ts_worker_and_seq_then_its_fields() -> None:
    queue = EventQueue()
    clock = FakeClock()
    EventEmitter(3, queue, clock).emit(CONN_OPEN, conn_fields(1))
    (event,) = emitted(queue)
    assert list(event) == [*COMMON_FIELDS, "conn", "sni", "client_port"]
    assert event == {
        "type": CONN_OPEN,
        "version": SCHEMA_VERSION,
        "ts": clock.now,
        "worker": 3,
        "seq": 0,
        "conn": "3-1",
        "sni": "example.com",
        "client_port": 40001,
    }
    assert isinstance(event["ts"], float)


def test_seq_counts_from_zero_without_holes_per_worker() -> None:
    queue = EventQueue()
    emitter = EventEmitter(0, queue)
    for n in range(100):
        emitter.emit(HTTP, conn_fields(n))
    assert [event["seq"] for event in emitted(queue)] == list(range(100))
    assert emitter.next_seq == 100


def test_bytes_are_encoded_as_msgpack_bin_and_text_as_str() -> None:
    queue = EventQueue()
    EventEmitter(0, queue).emit(HTTP, {"path": "/é", "raw": b"\xff\x00"})
    (data,) = queue.drain(1)
    event = msgpack.unpackb(data, raw=True)
    assert event[b"path"] == "/é".encode()
    assert msgpack.unpackb(data)["raw"] == b"\xff\x00"
    assert b"\xc4\x02\xff\x00" in data  # bin 8, length 2


def test_fields_that_set_a_common_key_are_refused_without_using_a_seq() -> None:
    queue = EventQueue()
    emitter = EventEmitter(0, queue)
    with pytest.raises(ValueError, match=r"common keys \['seq'\]"):
        emitter.emit(HTTP, {"seq": 99, "path": "/"})
    emitter.emit(HTTP, {"path": "/"})
    assert [event["seq"] for event in emitted(queue)] == [0]


def test_a_value_msgpack_cannot_encode_is_a_type_error_and_uses_no_seq() -> None:
    queue = EventQueue()
    emitter = EventEmitter(0, queue)
    with pytest.raises(TypeError):
        emitter.emit(HTTP, {"path": object()})
    emitter.emit(HTTP, {"path": "/"})
    assert [event["seq"] for event in emitted(queue)] == [0]


def test_queue_put_refuses_when_full_and_counts_the_drop() -> None:
    queue = EventQueue(maxlen=2)
    assert queue.put(b"a") and queue.put(b"b")
    assert not queue.put(b"c")
    assert queue.dropped == 1
    assert len(queue) == 2
    assert queue.room() == 0


def test_queue_drain_hands_out_at_most_max_items_oldest_first() -> None:
    queue = EventQueue(maxlen=10)
    for n in range(5):
        queue.put(bytes([n]))
    assert queue.drain(2) == [b"\x00", b"\x01"]
    assert queue.drain(10) == [b"\x02", b"\x03", b"\x04"]
    assert queue.drain(10) == []


def test_a_queue_must_hold_a_gap_and_the_event_behind_it() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        EventQueue(maxlen=1)


def test_a_full_queue_counts_drops_and_the_next_event_follows_a_gap_explaining_the_hole() -> None:
    queue = EventQueue(maxlen=4)
    emitter = EventEmitter(7, queue)
    for n in range(10):
        emitter.emit(HTTP, conn_fields(n))
    assert queue.dropped == 6
    assert emitter.unreported == 6
    first = emitted(queue)
    assert [event["seq"] for event in first] == [0, 1, 2, 3]

    emitter.emit(HTTP, conn_fields(10))
    gap, event = emitted(queue)
    assert gap["type"] == GAP
    assert gap["worker"] == 7
    assert gap["dropped"] == 6
    assert gap["stage"] == STAGE_WORKER_QUEUE
    # The hole is exactly the `dropped` seqs right before the gap.
    assert gap["seq"] == 10
    assert list(range(gap["seq"] - gap["dropped"], gap["seq"])) == [4, 5, 6, 7, 8, 9]
    assert event["seq"] == 11
    assert emitter.unreported == 0


def test_emit_never_waits_for_a_consumer_that_never_drains() -> None:
    queue = EventQueue(maxlen=16)
    emitter = EventEmitter(0, queue)
    fields = conn_fields(1)
    for _ in range(50_000):
        emitter.emit(HTTP, fields)
    assert len(queue) == 16
    assert queue.dropped == 50_000 - 16
    assert emitter.next_seq == 50_000


def test_no_event_overtakes_a_pending_gap_when_there_is_room_for_only_one() -> None:
    queue = EventQueue(maxlen=2)
    emitter = EventEmitter(0, queue)
    for n in range(3):  # seq 2 is dropped
        emitter.emit(HTTP, conn_fields(n))
    assert [event["seq"] for event in emitted(queue)[:1]] == [0]  # drained both
    queue.put(b"\xc0")  # someone else holds one slot: room for one event only
    emitter.emit(HTTP, conn_fields(3))  # seq 3: no room for gap + event, dropped
    assert len(queue) == 1
    assert emitter.unreported == 2
    queue.drain(1)
    emitter.emit(HTTP, conn_fields(4))
    gap, event = emitted(queue)
    assert (gap["type"], gap["seq"], gap["dropped"]) == (GAP, 4, 2)
    assert event["seq"] == 5


def test_flush_gap_reports_drops_at_the_end_of_a_burst_without_a_new_event() -> None:
    queue = EventQueue(maxlen=2)
    emitter = EventEmitter(0, queue)
    for n in range(5):
        emitter.emit(HTTP, conn_fields(n))
    assert emitter.flush_gap() is False  # still full
    queue.drain(2)
    assert emitter.flush_gap() is True
    (gap,) = emitted(queue)
    assert (gap["type"], gap["seq"], gap["dropped"]) == (GAP, 5, 3)
    assert emitter.flush_gap() is True
    assert len(queue) == 0


class RefusesGapsOnce(EventQueue):
    """A queue that another producer fills right when the first gap arrives."""

    refused = False

    def put(self, data: bytes) -> bool:
        if not self.refused and msgpack.unpackb(data)["type"] == GAP:
            self.refused = True
            self.dropped += 1
            return False
        return super().put(data)


def test_a_gap_that_could_not_be_queued_is_itself_counted_by_the_next_gap() -> None:
    queue = RefusesGapsOnce(maxlen=2)
    emitter = EventEmitter(0, queue)
    for n in range(3):  # seq 2 dropped
        emitter.emit(HTTP, conn_fields(n))
    queue.drain(2)
    emitter.emit(HTTP, conn_fields(3))  # gap seq 3 refused, event seq 4 lost behind it
    assert len(queue) == 0
    emitter.emit(HTTP, conn_fields(5))
    gap, event = emitted(queue)
    assert (gap["seq"], gap["dropped"]) == (5, 3)  # seqs 2, 3 (the lost gap) and 4
    assert event["seq"] == 6


def test_threads_sharing_an_emitter_queue_events_in_seq_order() -> None:
    queue = EventQueue(maxlen=100_000)
    emitter = EventEmitter(0, queue)
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:

        def work() -> None:
            for n in range(5000):
                emitter.emit(HTTP, conn_fields(n))

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(old_interval)
    assert [event["seq"] for event in emitted(queue)] == list(range(20_000))


def test_hub_events_carry_worker_minus_one_and_the_given_seq() -> None:
    data = encode_hub_event(new_packer(), GAP, 4, 12.5, {"dropped": 3, "stage": "subscriber"})
    assert msgpack.unpackb(data) == {
        "type": GAP,
        "version": SCHEMA_VERSION,
        "ts": 12.5,
        "worker": HUB_WORKER_ID,
        "seq": 4,
        "dropped": 3,
        "stage": "subscriber",
    }


def stream(n: int) -> bytes:
    queue = EventQueue()
    emitter = EventEmitter(1, queue)
    for i in range(n):
        emitter.emit(HTTP, {**conn_fields(i), "request_headers": [["host", "example.com"]]})
    return b"".join(queue.drain(n))


def test_the_streaming_decoder_returns_each_event_once_it_is_complete() -> None:
    data = stream(3)
    decoder = EventDecoder()
    seen: list[int] = []
    for i in range(len(data)):
        seen.extend(event["seq"] for event in decoder.feed(data[i : i + 1]))
    assert seen == [0, 1, 2]
    assert decoder.pending_bytes == 0
    decoder.close()


@given(st.lists(st.integers(min_value=0, max_value=2000), max_size=6))
@settings(max_examples=60, deadline=None)
def test_any_split_of_a_stream_decodes_to_the_same_events(cuts: list[int]) -> None:
    data = stream(5)
    points = sorted({min(cut, len(data)) for cut in cuts} | {0, len(data)})
    decoder = EventDecoder()
    events: list[dict[str, Any]] = []
    for start, end in itertools.pairwise(points):
        events.extend(decoder.feed(data[start:end]))
    decoder.close()
    assert events == list(decode_events(data))
    assert [event["seq"] for event in events] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xc1", "not valid msgpack"),  # the one byte msgpack never uses
        (msgpack.packb(42), "msgpack int where an event map belongs"),
        (msgpack.packb({"seq": 1}), "without a string 'type'"),
        (msgpack.packb({"type": 5}), "without a string 'type'"),
        (msgpack.packb({"type": "http", "x": msgpack.ExtType(5, b"z")}), "extension type 5"),
        (b"\x81\xa4type\xa2\xff\xfe", "not valid msgpack"),  # str that is not UTF-8
    ],
)
def test_garbage_raises_event_decode_error(data: bytes, message: str) -> None:
    with pytest.raises(EventDecodeError, match=message):
        list(decode_events(data))


def test_event_decode_error_is_a_remote_protocol_error() -> None:
    assert issubclass(EventDecodeError, RemoteProtocolError)


def test_a_stream_cut_inside_an_event_is_an_error_at_close() -> None:
    data = stream(2)
    with pytest.raises(EventDecodeError, match="ends inside an event"):
        list(decode_events(data[:-3]))
    decoder = EventDecoder()
    assert len(list(decoder.feed(data[:-3]))) == 1
    assert decoder.pending_bytes > 0
    with pytest.raises(EventDecodeError, match="ends inside an event"):
        decoder.close()


def test_an_event_larger_than_the_limit_is_refused_before_it_is_buffered_whole() -> None:
    big = msgpack.packb({"type": "http", "body": "x" * 500_000})
    decoder = EventDecoder(max_event_bytes=100_000)
    with pytest.raises(EventDecodeError, match="larger than 100000 bytes"):
        for start in range(0, len(big), 4096):
            list(decoder.feed(big[start : start + 4096]))


def test_a_container_header_claiming_huge_length_is_refused() -> None:
    data = b"\xdd\xff\xff\xff\xff"  # array32 of 4 billion elements
    with pytest.raises(EventDecodeError):
        list(decode_events(data + b"\x00" * 16))


@given(st.binary(max_size=512))
@settings(max_examples=500, deadline=None)
def test_random_bytes_decode_to_events_or_raise_event_decode_error(data: bytes) -> None:
    try:
        events = list(decode_events(data))
    except EventDecodeError:
        return
    for event in events:
        assert isinstance(event, dict)
        assert isinstance(event["type"], str)


@given(st.binary(min_size=1, max_size=256), st.integers(min_value=0, max_value=4))
@settings(max_examples=300, deadline=None)
def test_garbage_after_valid_events_still_yields_the_valid_ones_first(tail: bytes, n: int) -> None:
    data = stream(n) + tail
    got: list[dict[str, Any]] = []
    iterator: Iterator[dict[str, Any]] = decode_events(data)
    try:
        for event in iterator:
            got.append(event)
    except EventDecodeError:
        pass
    assert [event["seq"] for event in got[:n]] == list(range(n))


DOCS = Path(__file__).resolve().parents[2] / "docs" / "events.md"


def test_every_event_type_is_documented_with_valid_json_examples() -> None:
    text = DOCS.read_text()
    examples: list[dict[str, Any]] = []
    for block in re.findall(r"```json\n(.*?)```", text, re.DOTALL):
        try:
            examples.append(json.loads(block))
        except json.JSONDecodeError:  # several one-line events
            examples.extend(json.loads(line) for line in block.splitlines() if line.strip())
    for example in examples:
        assert list(example)[: len(COMMON_FIELDS)] == list(COMMON_FIELDS), example
        assert example["version"] == SCHEMA_VERSION
    assert {example["type"] for example in examples} == set(EVENT_TYPES)
    for name in EVENT_TYPES:
        assert f"### `{name}`" in text
