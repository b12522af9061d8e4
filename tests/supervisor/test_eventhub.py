"""The event hub: real Unix sockets, real threads, real files."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tlsgate.errors import OperatorError
from tlsgate.supervisor.eventhub import EventHub
from tlsgate.workers.events import (
    CONN_CLOSE,
    GAP,
    HELLO,
    HTTP,
    HUB_WORKER_ID,
    SCHEMA_VERSION,
    STAGE_FILE,
    STAGE_SUBSCRIBER,
    EventDecoder,
    EventEmitter,
    EventQueue,
    decode_events,
)

TIMEOUT = 10.0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="hub", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


class Subscriber:
    """A subscriber on the detection socket that decodes what it reads."""

    def __init__(self, path: Path, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(str(path))
        self.sock.settimeout(TIMEOUT)
        self.decoder = EventDecoder()
        self.events: list[dict[str, Any]] = []
        self.closed = False

    def read_until(self, done: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
        deadline = time.monotonic() + TIMEOUT
        while not done(self.events):
            assert time.monotonic() < deadline, f"gave up after {len(self.events)} events"
            try:
                chunk = self.sock.recv(256 * 1024)
            except ConnectionResetError:  # closed with our bytes unread
                chunk = b""
            if not chunk:
                self.closed = True
                break
            self.events.extend(self.decoder.feed(chunk))
        return self.events

    def read_to_end(self) -> list[dict[str, Any]]:
        return self.read_until(lambda _: False)

    def worker_events(self) -> list[dict[str, Any]]:
        return [event for event in self.events if event["worker"] != HUB_WORKER_ID]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def connect() -> Iterator[Callable[..., Subscriber]]:
    """Open subscribers for a test; all are closed afterwards."""
    opened: list[Subscriber] = []

    def open_subscriber(path: Path, rcvbuf: int | None = None) -> Subscriber:
        sub = Subscriber(path, rcvbuf)
        opened.append(sub)
        return sub

    yield open_subscriber
    for sub in opened:
        sub.close()


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


def close_fields(n: int) -> dict[str, Any]:
    """A conn_close event with the fields the worker fills (about 650 bytes encoded)."""
    return {
        "conn": f"0-{n}",
        "client_ip": "10.0.0.5",
        "client_port": 40000 + n % 20000,
        "server_ip": "93.184.216.34",
        "server_port": 443,
        "sni": "www.example.com",
        "decision": "intercept",
        "client_tls_version": "TLSv1.3",
        "client_cipher": "TLS_AES_128_GCM_SHA256",
        "upstream_tls_version": "TLSv1.3",
        "upstream_cipher": "TLS_AES_256_GCM_SHA384",
        "alpn": "http/1.1",
        "upstream_subject": "CN=www.example.com",
        "upstream_issuer": "CN=DigiCert Global G2 TLS RSA SHA256 2020 CA1,O=DigiCert Inc,C=US",
        "upstream_fingerprint_sha256": "ab" * 32,
        "upstream_verdict": "valid",
        "upstream_verdict_reason": None,
        "bytes_from_client": 1234,
        "bytes_from_server": 567890,
        "duration": 1.25,
        "handshake_duration": 0.045,
        "requests": 3,
        "close_reason": "client-closed",
    }


def make_hub(socket_path: Path | None, **kwargs: Any) -> tuple[EventHub, EventEmitter, EventQueue]:
    queue = EventQueue()
    emitter = EventEmitter(0, queue)
    hub = EventHub(socket_path, gateway_id="test-gw", **kwargs)
    hub.add_source(queue)
    return hub, emitter, queue


@pytest.fixture
def running() -> Iterator[Callable[..., tuple[EventHub, EventEmitter, EventQueue]]]:
    """Start hubs for a test and stop them (and check they did not fail) afterwards."""
    hubs: list[EventHub] = []

    def start(socket_path: Path | None, **kwargs: Any) -> tuple[EventHub, EventEmitter, EventQueue]:
        hub, emitter, queue = make_hub(socket_path, **kwargs)
        hub.start()
        hubs.append(hub)
        return hub, emitter, queue

    yield start
    for hub in hubs:
        hub.stop()
        assert hub.failure is None


def test_a_new_subscriber_first_gets_a_hello(short_dir: Path, running: Any, connect: Any) -> None:
    before = time.time()
    running(short_dir / "events.sock")
    sub = connect(short_dir / "events.sock")
    (hello,) = sub.read_until(lambda events: len(events) >= 1)
    assert hello["type"] == HELLO
    assert hello["version"] == SCHEMA_VERSION
    assert hello["worker"] == HUB_WORKER_ID
    assert hello["seq"] == 0
    assert hello["schema"] == SCHEMA_VERSION
    assert hello["gateway"] == "test-gw"
    assert hello["pid"] == os.getpid()
    assert before <= hello["started"] <= hello["ts"] <= time.time()


def test_a_slow_subscriber_loses_whole_events_counted_exactly_and_never_slows_a_fast_one(
    short_dir: Path, running: Any, connect: Any
) -> None:
    path = short_dir / "events.sock"
    hub, emitter, queue = running(path, subscriber_buffer_bytes=1024 * 1024)
    fast = connect(path)
    slow = connect(path, rcvbuf=4096)  # never reads until the end
    wait_for(lambda: hub.stats()["subscribers"] == 2)

    total, batch = 20_000, 500
    for start in range(0, total, batch):
        for n in range(start, start + batch):
            emitter.emit(CONN_CLOSE, close_fields(n))
        fast.read_until(lambda events, want=start + batch: len(events) == want + 1)

    assert fast.events[0]["type"] == HELLO
    assert [event["seq"] for event in fast.worker_events()] == list(range(total))
    assert queue.dropped == 0

    def accounted(events: list[dict[str, Any]]) -> int:
        received = sum(1 for event in events if event["worker"] != HUB_WORKER_ID)
        return received + sum(event["dropped"] for event in events if event["type"] == GAP)

    slow.read_until(lambda events: accounted(events) >= total)
    assert accounted(slow.events) == total
    gaps = [event for event in slow.events if event["type"] == GAP]
    assert gaps, "the slow subscriber should have lost events"
    assert all(gap["stage"] == STAGE_SUBSCRIBER for gap in gaps)
    received = [event["seq"] for event in slow.worker_events()]
    assert received == sorted(received)
    assert len(received) < total
    # Hub events have their own contiguous seq per subscriber: hello 0, gaps 1, 2, ...
    hub_seqs = [event["seq"] for event in slow.events if event["worker"] == HUB_WORKER_ID]
    assert hub_seqs == list(range(len(gaps) + 1))
    # Each gap stands exactly where its events were lost.
    expected_seq = 0
    for event in slow.events[1:]:
        if event["type"] == GAP:
            expected_seq += event["dropped"]
        else:
            assert event["seq"] == expected_seq
            expected_seq += 1
    stats = hub.stats()
    assert stats["produced"] == total
    assert stats["dropped"][STAGE_SUBSCRIBER] == total - len(received)


def test_a_queue_that_overflowed_reaches_subscribers_as_a_hole_and_a_gap_event(
    short_dir: Path, connect: Any
) -> None:
    path = short_dir / "events.sock"
    hub = EventHub(path, gateway_id="gw")
    hub.start()
    try:
        sub = connect(path)
        sub.read_until(lambda events: len(events) >= 1)  # subscribed: hello
        queue = EventQueue(maxlen=10)
        emitter = EventEmitter(2, queue)
        for n in range(25):  # nobody drains this queue yet: 15 are dropped
            emitter.emit(HTTP, {"n": n})
        hub.add_source(queue)
        sub.read_until(lambda events: len(events) >= 11)
        assert hub.stats()["dropped"]["worker-queue"] == 15
        emitter.emit(HTTP, {"n": 25})
        events = sub.read_until(lambda events: len(events) >= 13)
        assert [event["n"] for event in events[1:11]] == list(range(10))
        gap, last = events[11], events[12]
        assert (gap["type"], gap["worker"], gap["seq"], gap["dropped"]) == (GAP, 2, 25, 15)
        assert gap["stage"] == "worker-queue"
        assert (last["seq"], last["n"]) == (26, 25)
    finally:
        hub.stop()


def test_the_socket_is_created_with_the_requested_mode(short_dir: Path, running: Any) -> None:
    running(short_dir / "a.sock", socket_mode=0o600)
    running(short_dir / "b.sock", socket_mode=0o660)
    assert stat.S_ISSOCK(os.lstat(short_dir / "a.sock").st_mode)
    assert stat.S_IMODE(os.lstat(short_dir / "a.sock").st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(short_dir / "b.sock").st_mode) == 0o660
    assert sorted(p.name for p in short_dir.iterdir()) == ["a.sock", "b.sock"]


def test_stop_flushes_what_is_queued_closes_subscribers_and_removes_the_socket(
    short_dir: Path, connect: Any
) -> None:
    path = short_dir / "events.sock"
    hub, emitter, _ = make_hub(path)
    hub.start()
    sub = connect(path)
    sub.read_until(lambda events: len(events) >= 1)
    for n in range(3000):
        emitter.emit(HTTP, {"n": n})
    hub.stop()
    assert not path.exists()
    assert not hub.running
    events = sub.read_to_end()
    assert sub.closed
    assert [event["n"] for event in events[1:]] == list(range(3000))
    assert hub.failure is None
    hub.stop()  # idempotent


def test_a_stale_socket_left_by_a_dead_gateway_is_replaced(
    short_dir: Path, running: Any, connect: Any
) -> None:
    path = short_dir / "events.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens
    running(path)
    sub = connect(path)
    assert sub.read_until(lambda events: len(events) >= 1)[0]["type"] == HELLO


def test_a_socket_someone_listens_on_means_another_gateway_is_running(
    short_dir: Path, running: Any, connect: Any
) -> None:
    path = short_dir / "events.sock"
    running(path)
    second, _, _ = make_hub(path)
    with pytest.raises(OperatorError, match="another gateway is running"):
        second.start()
    # The first gateway still serves its socket.
    sub = connect(path)
    assert sub.read_until(lambda events: len(events) >= 1)[0]["gateway"] == "test-gw"
    assert sorted(p.name for p in short_dir.iterdir()) == ["events.sock"]


def test_a_file_that_is_not_a_socket_is_left_alone(short_dir: Path) -> None:
    path = short_dir / "events.sock"
    path.write_text("keep me")
    hub, _, _ = make_hub(path)
    with pytest.raises(OperatorError, match="is not a socket"):
        hub.start()
    assert path.read_text() == "keep me"


def test_a_missing_socket_directory_is_an_operator_error(short_dir: Path) -> None:
    hub, _, _ = make_hub(short_dir / "nope" / "events.sock")
    with pytest.raises(OperatorError, match="does not exist"):
        hub.start()


def test_stop_leaves_a_socket_that_another_gateway_put_in_its_place(short_dir: Path) -> None:
    path = short_dir / "events.sock"
    hub, _, _ = make_hub(path)
    hub.start()
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(path))
    other.listen()
    hub.stop()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    other.close()


def test_every_event_is_appended_to_the_file_after_a_hello(short_dir: Path, connect: Any) -> None:
    record = short_dir / "events.msgpack"
    record.write_bytes(b"")
    hub, emitter, _ = make_hub(short_dir / "events.sock", file_path=record)
    hub.start()
    sub = connect(short_dir / "events.sock")
    sub.read_until(lambda events: len(events) >= 1)
    for n in range(500):
        emitter.emit(HTTP, {"n": n})
    hub.stop()
    from_file = list(decode_events(record.read_bytes()))
    assert from_file[0]["type"] == HELLO
    assert from_file[0]["seq"] == 0
    assert from_file[1:] == sub.read_to_end()[1:]
    assert [event["seq"] for event in from_file[1:]] == list(range(500))


def test_the_file_is_appended_to_across_runs_without_a_socket(short_dir: Path) -> None:
    record = short_dir / "events.msgpack"
    for run in range(2):
        hub, emitter, _ = make_hub(None, file_path=record)
        hub.start()
        emitter.emit(HTTP, {"run": run})
        hub.stop()
        assert hub.failure is None
    events = list(decode_events(record.read_bytes()))
    assert [(event["type"], event.get("run")) for event in events] == [
        (HELLO, None),
        (HTTP, 0),
        (HELLO, None),
        (HTTP, 1),
    ]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(record.stat().st_mode) == 0o640 & ~umask


def test_an_event_file_that_cannot_be_opened_is_an_operator_error(short_dir: Path) -> None:
    hub, _, _ = make_hub(None, file_path=short_dir / "missing" / "events.msgpack")
    with pytest.raises(OperatorError, match="cannot open the event file"):
        hub.start()


def test_failed_file_writes_are_counted_and_the_next_write_starts_with_a_gap(
    short_dir: Path, connect: Any
) -> None:
    record = short_dir / "events.msgpack"
    path = short_dir / "events.sock"
    hub, emitter, _ = make_hub(path, file_path=record)
    hub.start()
    try:
        sub = connect(path)
        sub.read_until(lambda events: len(events) >= 1)
        file_fd = hub._file_fd  # the disk fills up: writes now fail with ENOSPC
        assert file_fd is not None
        saved = os.dup(file_fd)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, file_fd)
        os.close(full)
        for n in range(10):
            emitter.emit(HTTP, {"n": n})
        # Subscribers are not affected by the disk.
        sub.read_until(lambda events: len(events) >= 11)
        wait_for(lambda: hub.stats()["dropped"][STAGE_FILE] == 10)
        os.dup2(saved, file_fd)  # space again
        os.close(saved)
        for n in (10, 11):  # one batch each
            emitter.emit(HTTP, {"n": n})
            sub.read_until(lambda events, n=n: len(events) >= n + 2)
    finally:
        hub.stop()
    events = list(decode_events(record.read_bytes()))
    assert [event["type"] for event in events] == [HELLO, GAP, HTTP, HTTP]
    gap = events[1]
    assert (gap["worker"], gap["seq"], gap["dropped"], gap["stage"]) == (-1, 1, 10, STAGE_FILE)
    assert [event["n"] for event in events[2:]] == [10, 11]


def test_stats_count_produced_delivered_dropped_and_subscribers(
    short_dir: Path, running: Any, connect: Any
) -> None:
    path = short_dir / "events.sock"
    hub, emitter, _ = running(path)
    assert hub.stats() == {
        "produced": 0,
        "delivered": 0,
        "dropped": {"worker-queue": 0, "subscriber": 0, "file": 0},
        "subscribers": 0,
        "subscribers_closed": 0,
        "sources": 1,
    }
    subs = [connect(path), connect(path)]
    wait_for(lambda: hub.stats()["subscribers"] == 2)
    for n in range(100):
        emitter.emit(HTTP, {"n": n})
    for sub in subs:
        sub.read_until(lambda events: len(events) >= 101)
    wait_for(lambda: hub.stats()["delivered"] == 2 * 101)
    assert hub.stats()["produced"] == 100
    subs[0].close()
    wait_for(lambda: hub.stats()["subscribers"] == 1)
    assert hub.stats()["subscribers_closed"] == 1


def test_a_subscriber_that_resets_with_events_buffered_is_reported_with_what_it_missed(
    short_dir: Path, running: Any, connect: Any
) -> None:
    path = short_dir / "events.sock"
    reports: list[tuple[str, int, int]] = []
    hub, emitter, _ = running(path, on_subscriber_closed=lambda *a: reports.append(a),
                              subscriber_buffer_bytes=1 << 20)  # fmt: skip
    sub = connect(path, rcvbuf=4096)
    sub.read_until(lambda events: len(events) >= 1)
    for n in range(2000):
        emitter.emit(HTTP, {"n": n, "pad": "x" * 200})
    wait_for(lambda: hub.stats()["produced"] == 2000)
    sub.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sub.close()
    wait_for(lambda: len(reports) == 1)
    reason, undelivered, undelivered_bytes = reports[0]
    assert reason in {"Connection reset by peer", "closed", "Broken pipe"}
    assert undelivered > 0 and undelivered_bytes > 0
    assert hub.stats()["subscribers"] == 0


def test_a_finished_source_is_drained_then_forgotten(short_dir: Path, running: Any) -> None:
    hub, _, _ = running(short_dir / "events.sock")

    class Finished(EventQueue):
        finished = False

    done = Finished()
    EventEmitter(1, done).emit(HTTP, {"n": 1})
    hub.add_source(done)
    wait_for(lambda: hub.stats()["produced"] == 1)
    assert hub.stats()["sources"] == 2
    done.finished = True
    wait_for(lambda: hub.stats()["sources"] == 1)


def test_subscribers_beyond_the_limit_are_refused(
    short_dir: Path, running: Any, connect: Any
) -> None:
    path = short_dir / "events.sock"
    hub, _, _ = running(path, max_subscribers=1)
    first = connect(path)
    first.read_until(lambda events: len(events) >= 1)
    second = connect(path)
    assert second.read_to_end() == []
    assert second.closed
    assert hub.stats()["subscribers"] == 1


def test_a_subscriber_that_sends_data_is_disconnected(
    short_dir: Path, running: Any, connect: Any
) -> None:
    path = short_dir / "events.sock"
    hub, _, _ = running(path)
    sub = connect(path)
    sub.read_until(lambda events: len(events) >= 1)
    sub.sock.sendall(b"hello?")
    sub.read_to_end()
    assert sub.closed
    wait_for(lambda: hub.stats()["subscribers"] == 0)


def test_a_buffer_too_small_for_real_events_is_refused() -> None:
    with pytest.raises(ValueError, match="at least"):
        EventHub(None, gateway_id="gw", subscriber_buffer_bytes=1000)
