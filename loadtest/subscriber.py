"""A detection-socket subscriber that counts what it receives (a thread of the suite).

Per scenario the suite compares the gateway's produced events (its hub's counters) with
what this subscriber received plus the losses gap events reported: an IDS must be able to
account for every event.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import msgpack

#: ``worker`` of the events the supervisor creates (docs/events.md).
SUPERVISOR_WORKER_ID = -2


@dataclass(frozen=True)
class Counts:
    received: int
    gaps: int
    #: conn_close events, and how many of them resumed a session on each leg
    closes: int = 0
    client_resumed: int = 0
    upstream_resumed: int = 0
    #: http events (inspected HTTP exchanges)
    http: int = 0
    #: events the supervisor created (worker -2: worker_exit, signer_restart, ...), in received
    supervisor: int = 0

    def __sub__(self, other: Counts) -> Counts:
        return Counts(*(a - b for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[int, ...]:
        return (self.received, self.gaps, self.closes, self.client_resumed,
                self.upstream_resumed, self.http, self.supervisor)  # fmt: skip


class CountingSubscriber:
    """Connects to ``events.sock`` and counts worker events, gap losses and resumed
    connections (``conn_close``) until closed."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock.connect(str(path))
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    self._sock.close()
                    raise RuntimeError(f"cannot subscribe to {path}: {exc}") from exc
                time.sleep(0.05)
        self._lock = threading.Lock()
        self._counts = Counts(0, 0)
        self._supervisor_types: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._read, name="event-counter", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        unpacker = msgpack.Unpacker(raw=False)
        while True:
            try:
                chunk = self._sock.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            unpacker.feed(chunk)
            received = gaps = closes = client = upstream = http = supervisor = 0
            kinds: Counter[str] = Counter()
            for event in unpacker:
                kind = event.get("type")
                worker = int(event.get("worker", -1))
                if kind == "gap":
                    gaps += int(event.get("dropped", 0))
                elif worker == SUPERVISOR_WORKER_ID:
                    # produced like a worker's (the supervisor is one of the hub's sources)
                    received += 1
                    supervisor += 1
                    kinds[str(kind)] += 1
                elif worker >= 0:
                    received += 1
                    http += kind == "http"
                    if kind == "conn_close":
                        closes += 1
                        client += event.get("client_resumed") is True
                        upstream += event.get("upstream_resumed") is True
            with self._lock:
                self._supervisor_types.update(kinds)
                c = self._counts
                self._counts = Counts(
                    c.received + received,
                    c.gaps + gaps,
                    c.closes + closes,
                    c.client_resumed + client,
                    c.upstream_resumed + upstream,
                    c.http + http,
                    c.supervisor + supervisor,
                )

    def counts(self) -> Counts:
        with self._lock:
            return self._counts

    def supervisor_types(self) -> dict[str, int]:
        """Types of the supervisor's events received so far, with their counts."""
        with self._lock:
            return dict(self._supervisor_types)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)
