"""The detection stream end to end: workers → supervisor → detection socket subscribers.
Every event is delivered or its loss is counted exactly in a gap event."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.gateway import Gateway, Origin
from tests.loadclient import run_load

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the supervisor runs as root")


class Subscriber:
    """A real subscriber of the detection socket, reading in a thread (or not at all)."""

    def __init__(self, path: Path, *, read: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if not read:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(str(path))
        self.events: list[dict[str, Any]] = []
        self._unpacker = msgpack.Unpacker(raw=False)
        self._thread: threading.Thread | None = None
        if read:
            self.start()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            self._unpacker.feed(data)
            self.events.extend(self._unpacker)

    def wait(self, predicate: Any, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while not predicate(self.events):
            assert time.monotonic() < end, "events did not arrive in time"
            time.sleep(0.05)

    def close(self) -> None:
        self.sock.close()


def worker_events(events: list[dict[str, Any]]) -> dict[int, list[int]]:
    seqs: dict[int, list[int]] = defaultdict(list)
    for e in events:
        if e["worker"] >= 0:
            seqs[e["worker"]].append(e["seq"])
    return seqs


def test_a_thousand_requests_give_a_thousand_http_events_with_contiguous_sequence_numbers(
    tmp_path: Path, pki: dict[str, Path], origin: Origin
) -> None:
    with Gateway(tmp_path, upstream_ca=pki["ca"], args=["--workers", "2"]) as gw:
        sub = Subscriber(tmp_path / "run" / "events.sock")
        sub.wait(lambda ev: any(e["type"] == "hello" for e in ev))
        load = run_load((gw.host, gw.port), origin.port, str(gw.ca_cert), total=1000)
        assert load.failures == []
        sub.wait(lambda ev: sum(e["type"] == "conn_close" for e in ev) >= 1000)
        sub.close()
    events = sub.events
    assert events[0]["type"] == "hello"
    http = [e for e in events if e["type"] == "http"]
    assert len(http) == 1000
    assert sorted(e["path"] for e in http) == sorted(f"/load/{i}" for i in range(1000))
    assert all(e["status"] == 200 and e["method"] == "GET" for e in http)
    assert {e["worker"] for e in http} == {0, 1}  # both workers served
    assert not [e for e in events if e["type"] == "gap"]
    for worker, seqs in worker_events(events).items():
        assert seqs == list(range(len(seqs))), f"worker {worker} has holes or reordering"


def test_a_subscriber_that_reads_nothing_gets_gaps_that_add_up_exactly_and_slows_nobody(
    tmp_path: Path, pki: dict[str, Path], origin: Origin
) -> None:
    config = tmp_path / "tlsgate.toml"
    config.write_text("[events]\nsubscriber_buffer = 65536\n")
    args = ["--workers", "2", "--config", str(config)]
    with Gateway(tmp_path / "state", upstream_ca=pki["ca"], args=args) as gw:
        events_sock = tmp_path / "state" / "run" / "events.sock"
        fast = Subscriber(events_sock)
        slow = Subscriber(events_sock, read=False)
        fast.wait(lambda ev: any(e["type"] == "hello" for e in ev))
        started = time.monotonic()
        load = run_load((gw.host, gw.port), origin.port, str(gw.ca_cert), total=600)
        elapsed = time.monotonic() - started
        assert load.failures == []
        fast.wait(lambda ev: sum(e["type"] == "conn_close" for e in ev) >= 600)
        slow.start()  # now it reads: what it missed arrives as counted gaps
        expected = sum(len(s) for s in worker_events(fast.events).values())
        slow.wait(lambda ev: len([e for e in ev if e["worker"] >= 0])
                  + sum(e["dropped"] for e in ev if e["type"] == "gap") >= expected)  # fmt: skip
        fast.close()
        slow.close()
    gaps = [e for e in slow.events if e["type"] == "gap"]
    assert gaps and all(g["stage"] == "subscriber" for g in gaps)
    received = len([e for e in slow.events if e["worker"] >= 0])
    assert received + sum(g["dropped"] for g in gaps) == expected
    assert not [e for e in fast.events if e["type"] == "gap"]  # the fast one lost nothing
    assert elapsed < 60
