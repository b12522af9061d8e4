"""Events from a worker process to the supervisor, over a socketpair, never blocking the relay.

- Worker side, :class:`PipeForwarder`: a thread drains the worker's bounded
  :class:`~tlsgate.workers.events.EventQueue` every few milliseconds and writes the events
  as one frame. If the supervisor stops reading, the thread blocks — the event loop does not:
  the queue fills, the emitter counts the drops and reports them in a ``gap`` event.
- Supervisor side, :class:`PipeSource`: a thread reads frames and keeps the events in its own
  bounded queue, which the event hub drains like any other source (``dropped``/``drain``).
  When that queue is full the thread stops reading (it never drops): the socket fills, the
  worker's forwarder waits, the worker's queue fills, and the worker's emitter counts the
  drops and reports them in a ``gap`` event — so every loss is reported where it happens.
- Frame: ``u32 total length`` then, per event, ``u32 length`` + the encoded event. Events are
  never decoded on the way (the hub fans out the worker's bytes as they are).
"""

from __future__ import annotations

import socket
import struct
import threading
from collections import deque

from tlsgate.workers.events import EventQueue

FLUSH_INTERVAL = 0.005
MAX_BATCH = 4096
MAX_FRAME_BYTES = 64 * 1024 * 1024
_U32 = struct.Struct("!I")


def encode_frame(events: list[bytes]) -> bytes:
    parts = []
    for event in events:
        parts.append(_U32.pack(len(event)))
        parts.append(event)
    body = b"".join(parts)
    return _U32.pack(len(body)) + body


def decode_frame(body: bytes) -> list[bytes]:
    """The events of a frame body; :class:`ValueError` for anything else (the worker that
    sent it may be compromised)."""
    events = []
    view = memoryview(body)
    pos = 0
    while pos < len(body):
        if pos + _U32.size > len(body):
            raise ValueError("event frame is truncated inside a length field")
        (n,) = _U32.unpack_from(view, pos)
        pos += 4
        if pos + n > len(body):
            raise ValueError("event frame is truncated")
        events.append(bytes(view[pos : pos + n]))
        pos += n
    return events


class PipeForwarder:
    """Worker side: queue → socket, in a daemon thread."""

    def __init__(self, queue: EventQueue, sock: socket.socket) -> None:
        self.queue = queue
        self.sock = sock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tlsgate-event-forwarder",
                                        daemon=True)  # fmt: skip

    def start(self) -> None:
        self.sock.setblocking(True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Flush what is queued, then stop."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(FLUSH_INTERVAL)
            while True:
                batch = self.queue.drain(MAX_BATCH)
                if not batch:
                    break
                try:
                    self.sock.sendall(encode_frame(batch))
                except OSError:
                    # the supervisor is gone: count what we cannot deliver and keep draining
                    self.queue.count_dropped(len(batch))
            if stopping:
                return


class PipeSource:
    """Supervisor side: socket → bounded queue the hub drains (backpressure, no drops)."""

    def __init__(self, sock: socket.socket, maxlen: int = 65536) -> None:
        self.sock = sock
        self.maxlen = maxlen
        self._items: deque[bytes] = deque()
        self._room = threading.Condition()
        self.closed = threading.Event()
        self.received = 0
        self._thread = threading.Thread(target=self._run, name="tlsgate-event-source",
                                        daemon=True)  # fmt: skip

    @property
    def dropped(self) -> int:
        return 0  # this stage never drops; see the module rules

    def drain(self, max_items: int) -> list[bytes]:
        with self._room:
            items = self._items
            n = min(max_items, len(items))
            batch = [items.popleft() for _ in range(n)]
            self._room.notify()
        return batch

    def __len__(self) -> int:
        return len(self._items)

    @property
    def finished(self) -> bool:
        """The worker's end closed and every event was handed to the hub."""
        return self.closed.is_set() and not self._items

    def start(self) -> None:
        self.sock.setblocking(True)
        self._thread.start()

    def _recv_exactly(self, n: int) -> bytes | None:
        chunks = []
        while n:
            chunk = self.sock.recv(min(n, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def _run(self) -> None:
        try:
            while True:
                head = self._recv_exactly(4)
                if head is None:
                    return
                (size,) = _U32.unpack(head)
                if size > MAX_FRAME_BYTES:
                    return  # a worker never sends this: treat the pipe as broken
                body = self._recv_exactly(size)
                if body is None:
                    return
                events = decode_frame(body)
                with self._room:
                    while len(self._items) + len(events) > self.maxlen and self._items:
                        self._room.wait(0.05)
                    self._items.extend(events)
                self.received += len(events)
        except (OSError, ValueError):
            return
        finally:
            self.closed.set()
            self.sock.close()
