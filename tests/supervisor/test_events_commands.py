"""`tlsgate events`, parsed by a local argparse root the way tlsgate/cli.py registers it."""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tlsgate.errors import OperatorError
from tlsgate.paths import events_socket_path
from tlsgate.supervisor.eventhub import EventHub
from tlsgate.supervisor.events_commands import add_events_parser
from tlsgate.workers.events import (
    CONN_OPEN,
    GAP,
    HELLO,
    HTTP,
    EventEmitter,
    EventQueue,
    decode_events,
    new_packer,
)

TIMEOUT = 10.0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tlsgate")
    add_events_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["events", *argv])


def run(argv: list[str]) -> int:
    args = parse(argv)
    result: int = args.func(args)
    return result


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A state dir with a short path (Unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ev", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


class Gateway:
    """The hub and worker emitter of a gateway running with ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.socket = events_socket_path(state_dir)
        self.socket.parent.mkdir(mode=0o750)
        self.queue = EventQueue()
        self.emitter = EventEmitter(0, self.queue)
        self.hub = EventHub(self.socket, gateway_id="gw-under-test")
        self.hub.add_source(self.queue)
        self.hub.start()

    def wait_for_subscribers(self, n: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.hub.stats()["subscribers"] < n:
            assert time.monotonic() < deadline, "the command never subscribed"
            time.sleep(0.001)


@pytest.fixture
def gateway(state_dir: Path) -> Iterator[Gateway]:
    gw = Gateway(state_dir)
    try:
        yield gw
    finally:
        gw.hub.stop()
        assert gw.hub.failure is None


def in_thread(argv: list[str]) -> Callable[[], int]:
    """Run the command in a thread; return a function that joins it and gives its code."""
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(run(argv)))
    thread.start()

    def join() -> int:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "the command did not finish"
        return result[0]

    return join


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_count_n_prints_n_json_lines_from_the_gateway_of_the_state_dir(
    state_dir: Path, gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    join = in_thread(["--state-dir", str(state_dir), "--count", "4"])
    gateway.wait_for_subscribers(1)
    for n in range(10):
        gateway.emitter.emit(HTTP, {"conn": f"0-{n}"})
    assert join() == 0
    events = json_lines(capsys.readouterr().out)
    assert [event["type"] for event in events] == [HELLO, HTTP, HTTP, HTTP]
    assert events[0]["gateway"] == "gw-under-test"
    assert [event["conn"] for event in events[1:]] == ["0-0", "0-1", "0-2"]


def test_the_socket_option_subscribes_to_that_socket(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["--socket", str(gateway.socket), "--count", "1"]) == 0
    (hello,) = json_lines(capsys.readouterr().out)
    assert hello["type"] == HELLO


def test_filter_keeps_only_the_named_types(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    join = in_thread(["--socket", str(gateway.socket), "--filter", CONN_OPEN, "--count", "2"])
    gateway.wait_for_subscribers(1)
    for n in range(6):
        gateway.emitter.emit(HTTP if n % 2 else CONN_OPEN, {"n": n})
    assert join() == 0
    events = json_lines(capsys.readouterr().out)
    assert [(event["type"], event["n"]) for event in events] == [(CONN_OPEN, 0), (CONN_OPEN, 2)]


def test_filter_accepts_several_types_and_repeats() -> None:
    args = parse(["--filter", "http", "gap", "--filter", "conn_open"])
    assert args.filter == ["http", "gap", "conn_open"]


def test_an_unknown_filter_type_is_refused_by_the_parser(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse(["--filter", "htp"])
    assert "invalid choice: 'htp'" in capsys.readouterr().err


@pytest.mark.parametrize("count", ["0", "-3", "many"])
def test_count_must_be_a_positive_number(count: str) -> None:
    with pytest.raises(SystemExit):
        parse(["--count", count])


def test_socket_file_and_state_dir_exclude_each_other() -> None:
    with pytest.raises(SystemExit):
        parse(["--socket", "/x", "--file", "/y"])


def test_the_command_ends_with_exit_code_0_when_the_gateway_stops(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    join = in_thread(["--socket", str(gateway.socket)])
    gateway.wait_for_subscribers(1)
    for n in range(50):
        gateway.emitter.emit(HTTP, {"n": n})
    gateway.hub.stop()
    assert join() == 0
    events = json_lines(capsys.readouterr().out)
    assert [event["n"] for event in events[1:]] == list(range(50))


def test_a_missing_socket_names_the_state_dir_and_how_to_start_a_gateway(
    state_dir: Path,
) -> None:
    with pytest.raises(OperatorError) as caught:
        run(["--state-dir", str(state_dir)])
    message = str(caught.value)
    assert message == (
        f"no gateway is running with state dir {state_dir} (no socket at"
        f" {state_dir}/run/events.sock); start one with `tlsgate run --state-dir {state_dir}`"
    )
    assert "\n" not in message


def test_a_socket_nobody_listens_on_says_no_gateway_is_listening(state_dir: Path) -> None:
    path = state_dir / "events.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    with pytest.raises(OperatorError, match="no gateway is listening on"):
        run(["--socket", str(path)])


def write_recording(path: Path, events: list[dict[str, Any]]) -> bytes:
    pack = new_packer().pack
    data = b"".join(pack(event) for event in events)
    path.write_bytes(data)
    return data


RECORDED = [
    {"type": HELLO, "version": 1, "ts": 1.5, "worker": -1, "seq": 0, "schema": 1},
    {
        "type": HTTP,
        "version": 1,
        "ts": 2.5,
        "worker": 0,
        "seq": 0,
        "path": "/caf\u00e9",
        "raw": b"ok\xff",
        "request_headers": [["host", "example.com"], ["x-bin", b"\x80"]],
    },
    {"type": GAP, "version": 1, "ts": 3.5, "worker": 0, "seq": 3, "dropped": 2, "stage": "x"},
]


def test_json_lines_keep_the_encoded_key_order_and_show_bytes_as_text(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = state_dir / "events.msgpack"
    write_recording(record, RECORDED)
    assert run(["--file", str(record)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == (
        '{"type":"http","version":1,"ts":2.5,"worker":0,"seq":0,"path":"/caf\\u00e9",'
        '"raw":"ok\\ufffd","request_headers":[["host","example.com"],["x-bin","\\ufffd"]]}'
    )
    assert [json.loads(line)["type"] for line in lines] == [HELLO, HTTP, GAP]


def test_msgpack_format_writes_the_event_stream_itself(
    state_dir: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    record = state_dir / "events.msgpack"
    data = write_recording(record, RECORDED)
    assert run(["--file", str(record), "--format", "msgpack", "--filter", "http", "gap"]) == 0
    out = capsysbinary.readouterr().out
    assert list(decode_events(out)) == RECORDED[1:]
    assert out == data[len(new_packer().pack(RECORDED[0])) :]


def test_a_recording_cut_inside_an_event_prints_what_is_complete_and_exits_1(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = state_dir / "events.msgpack"
    data = write_recording(record, RECORDED)
    record.write_bytes(data[:-4])
    assert run(["--file", str(record)]) == 1
    captured = capsys.readouterr()
    assert [event["type"] for event in json_lines(captured.out)] == [HELLO, HTTP]
    assert "ends inside an event" in captured.err


def test_a_file_that_is_not_an_event_stream_is_an_operator_error(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = state_dir / "notes.txt"
    record.write_bytes(msgpack.packb(RECORDED[0]) + b"\xc1 not msgpack")
    with pytest.raises(OperatorError, match="does not carry tlsgate events"):
        run(["--file", str(record)])
    # The events before the garbage were printed.
    assert [event["type"] for event in json_lines(capsys.readouterr().out)] == [HELLO]


def test_a_missing_recording_is_an_operator_error(state_dir: Path) -> None:
    with pytest.raises(OperatorError, match="cannot read the event file"):
        run(["--file", str(state_dir / "none.msgpack")])


def test_the_recording_of_a_hub_reads_back_with_count(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = state_dir / "events.msgpack"
    queue = EventQueue()
    emitter = EventEmitter(0, queue)
    hub = EventHub(None, file_path=record, gateway_id="gw")
    hub.add_source(queue)
    hub.start()
    for n in range(20):
        emitter.emit(HTTP, {"n": n})
    hub.stop()
    assert run(["--file", str(record), "--count", "3"]) == 0
    events = json_lines(capsys.readouterr().out)
    assert [event["type"] for event in events] == [HELLO, HTTP, HTTP]
