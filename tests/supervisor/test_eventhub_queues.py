"""The hub's buffering shortcuts, each checked where it could go wrong.

The per-subscriber buffer takes a whole batch in one step when it fits, the longest prefix
when it does not, and nothing at all while a gap is owed and the buffer is above half; the
hub drains a backlogged source again at once instead of waiting for the next interval; the
worker pipe's source hands out events oldest first and never drops (it stops reading).
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tlsgate.supervisor import eventhub
from tlsgate.supervisor.eventhub import EventHub, _Subscriber
from tlsgate.workers.eventpipe import PipeSource, encode_frame
from tlsgate.workers.events import (
    GAP,
    HTTP,
    EventEmitter,
    EventQueue,
    decode_events,
)

LIMIT = 64 * 1024
TIMEOUT = 10.0


@pytest.fixture
def parts() -> Iterator[tuple[EventHub, _Subscriber]]:
    """A hub that is not running and one subscriber on a socketpair, driven by hand."""
    hub = EventHub(None, gateway_id="t", subscriber_buffer_bytes=LIMIT)
    mine, theirs = socket.socketpair()
    sub = _Subscriber(1, mine, "test", lambda s, m: None)
    try:
        yield hub, sub
    finally:
        mine.close()
        theirs.close()


def offer(hub: EventHub, sub: _Subscriber, batch: list[bytes]) -> None:
    hub._offer(sub, batch, sum(map(len, batch)))


def test_a_batch_that_fits_is_buffered_whole_in_order(parts: tuple[EventHub, _Subscriber]) -> None:
    hub, sub = parts
    batch = [bytes([n]) * 100 for n in range(10)]
    offer(hub, sub, batch)
    assert list(sub.chunks) == batch
    assert (sub.buffered, sub.owed, sub.dropped) == (1000, 0, 0)


def test_a_batch_that_does_not_fit_keeps_its_longest_prefix_only(
    parts: tuple[EventHub, _Subscriber],
) -> None:
    hub, sub = parts
    offer(hub, sub, [b"a" * (LIMIT - 1000)])
    # 600 fits, 600 does not; the 10-byte event after it would fit but must not jump the queue
    offer(hub, sub, [b"b" * 600, b"c" * 600, b"d" * 10])
    assert [chunk[:1] for chunk in sub.chunks] == [b"a", b"b"]
    assert sub.buffered == LIMIT - 1000 + 600
    assert (sub.owed, sub.dropped, hub.stats()["dropped"]["subscriber"]) == (2, 2, 2)


def test_while_a_gap_is_owed_above_half_nothing_is_buffered_even_what_fits(
    parts: tuple[EventHub, _Subscriber],
) -> None:
    hub, sub = parts
    offer(hub, sub, [b"a" * (LIMIT - 10), b"b" * 100])  # b is dropped: a gap is owed
    offer(hub, sub, [b"c" * 5])  # would fit, but would arrive before the gap's place
    assert [chunk[:1] for chunk in sub.chunks] == [b"a"]
    assert (sub.owed, sub.dropped) == (2, 2)


def test_below_half_the_owed_gap_comes_first_then_the_batch(
    parts: tuple[EventHub, _Subscriber],
) -> None:
    hub, sub = parts
    offer(hub, sub, [b"a" * (LIMIT - 10), b"b" * 100])
    sub.chunks.popleft()  # as if the socket took it
    sub.buffered = 0
    offer(hub, sub, [b"c" * 5])
    gap, c = sub.chunks
    (event,) = decode_events(gap)
    assert (event["type"], event["dropped"], event["seq"], event["worker"]) == (GAP, 1, 0, -1)
    assert c == b"c" * 5 and sub.owed == 0


def test_a_backlogged_source_is_drained_again_at_once_not_once_per_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(eventhub, "MAX_DRAIN_PER_SOURCE", 2)
    monkeypatch.setattr(eventhub, "DRAIN_INTERVAL", 60.0)
    directory = Path(tempfile.mkdtemp(prefix="hq", dir="/tmp"))
    queue = EventQueue()
    emitter = EventEmitter(0, queue)
    for n in range(7):
        emitter.emit(HTTP, {"n": n})
    hub = EventHub(directory / "events.sock", gateway_id="t")
    hub.add_source(queue)
    hub.start()
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(str(directory / "events.sock"))  # the accept wakes the hub once
        sock.settimeout(TIMEOUT)
        data = b""
        deadline = time.monotonic() + TIMEOUT
        while len(list(decode_events(data))) < 8:
            assert time.monotonic() < deadline, "the backlog waited for the next interval"
            data += sock.recv(65536)
        assert [e.get("n") for e in decode_events(data)] == [None, 0, 1, 2, 3, 4, 5, 6]
    finally:
        sock.close()
        hub.stop()
        shutil.rmtree(directory)
    assert hub.failure is None


def test_the_pipe_source_hands_out_events_oldest_first_at_most_max_items() -> None:
    mine, theirs = socket.socketpair()
    source = PipeSource(mine)
    source.start()
    try:
        theirs.sendall(encode_frame([b"1", b"2", b"3"]) + encode_frame([b"4"]))
        deadline = time.monotonic() + TIMEOUT
        while source.received < 4:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert source.drain(2) == [b"1", b"2"]
        assert source.drain(10) == [b"3", b"4"]
        assert source.drain(10) == []
    finally:
        theirs.close()
        source.closed.wait(TIMEOUT)


def test_a_full_pipe_source_stops_reading_instead_of_dropping() -> None:
    mine, theirs = socket.socketpair()
    source = PipeSource(mine, maxlen=4)
    source.start()
    frames = [encode_frame([f"{n}".encode()]) for n in range(50)]

    def write_all() -> None:
        for frame in frames:
            theirs.sendall(frame)

    writer = threading.Thread(target=write_all)
    writer.start()
    got: list[bytes] = []
    try:
        deadline = time.monotonic() + TIMEOUT
        while len(got) < 50:
            assert time.monotonic() < deadline, f"only {len(got)} of 50 events arrived"
            assert len(source) <= 4
            got += source.drain(1)
            time.sleep(0.0005)
        assert got == [f"{n}".encode() for n in range(50)]
        assert source.dropped == 0
    finally:
        writer.join(TIMEOUT)
        theirs.close()
        source.closed.wait(TIMEOUT)
