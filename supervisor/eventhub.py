"""The event hub: collects encoded events from the workers and fans them out to the IDS.

Rules:

- Input is encoded event bytes from *sources* (:class:`EventSource`, e.g. a worker's
  :class:`~tlsgate.workers.events.EventQueue`). The hub thread drains every source every
  :data:`DRAIN_INTERVAL` seconds in batches; producers never make a syscall per event
  and never wait for the hub.
- Outputs: the detection socket (Unix stream), optionally a TCP listener with mutual TLS
  (:class:`RemoteListener`, see :mod:`tlsgate.supervisor.mtls`) serving exactly the same
  stream to remote subscribers, any number of subscribers up to ``max_subscribers`` in
  all, and optionally a file the same bytes are appended to. Each output stream starts
  with a ``hello`` event (``schema``, ``gateway``, ``started``, ``pid``) and then carries
  every event as a msgpack stream.
- Remote subscribers: the TLS handshake runs non-blocking on the hub thread, at most
  :data:`MAX_PENDING_HANDSHAKES` at once, each within :data:`HANDSHAKE_TIMEOUT` seconds.
  A client without a certificate of the events CA in the subscriber role (or with a
  revoked one) is refused during the handshake and counted by reason; it never receives
  a byte of the stream. :meth:`EventHub.set_revoked` (on reload) refuses those serials
  from then on and disconnects subscribers that hold one.
- Every subscriber has its own bounded buffer (``subscriber_buffer_bytes``) and a
  non-blocking socket. When an event does not fit, whole events are dropped for that
  subscriber alone; once its buffer has drained to half, it gets a ``gap`` event
  (``stage`` ``"subscriber"``) whose ``dropped`` is the exact count, then events again.
  A slow subscriber never slows the gateway or the other subscribers. Subscribers only
  read: one that sends anything or shuts down its sending side is disconnected.
- The file is written by the hub thread, never by a worker. If a write fails (disk full)
  the partial write is truncated away, the batch is counted as dropped, and the next
  write that succeeds is preceded by a ``gap`` event (``stage`` ``"file"``).
- Events the hub makes itself carry ``worker`` -1 and a ``seq`` counted per output
  stream (the ``hello`` is 0).
- A subscriber that goes away while the gateway runs (it closed, reset, sent data, or its
  certificate was revoked) is reported to
  ``on_subscriber_closed(reason, undelivered_events, undelivered_bytes)`` (the supervisor
  turns it into a ``subscriber_closed`` event); what was buffered for it is freed at once.
- A source whose ``finished`` attribute is true (a worker's pipe after the worker exited)
  is drained one last time and then forgotten, so restarts do not accumulate sources.
- The socket is created with ``socket_mode`` already set
  (:func:`~tlsgate.supervisor.unixsocket.create_unix_listener`). A socket file left by a
  dead gateway is removed; one that accepts connections means another gateway is
  running, which is an :class:`~tlsgate.errors.OperatorError`.
- :meth:`EventHub.stop` stops accepting, removes the socket file (only if it is still
  the one this hub created) and the remote listener, drains the sources one last time,
  gives subscribers up to :data:`STOP_FLUSH_TIMEOUT` seconds to take what is buffered,
  and closes everything.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from OpenSSL import SSL

from tlsgate.errors import OperatorError
from tlsgate.supervisor import mtls
from tlsgate.supervisor.listeners import management_listener
from tlsgate.supervisor.selectorservice import SelectorService
from tlsgate.supervisor.unixsocket import create_unix_listener, peer_name
from tlsgate.workers.events import (
    GAP,
    HELLO,
    SCHEMA_VERSION,
    STAGE_FILE,
    STAGE_SUBSCRIBER,
    STAGE_WORKER_QUEUE,
    encode_hub_event,
    new_packer,
)

logger = logging.getLogger(__name__)

#: Default per-subscriber buffer (bytes of whole events waiting for the socket).
DEFAULT_SUBSCRIBER_BUFFER_BYTES: Final = 8 * 1024 * 1024
#: Smallest per-subscriber buffer accepted: a few of the largest ordinary events.
MIN_SUBSCRIBER_BUFFER_BYTES: Final = 64 * 1024
#: Subscribers connected at once; each may hold a full buffer in memory.
MAX_SUBSCRIBERS: Final = 128
#: Seconds between two drains of the sources when nothing else wakes the hub.
DRAIN_INTERVAL: Final = 0.005
#: Events taken from one source per drain; more waiting means drain again at once.
MAX_DRAIN_PER_SOURCE: Final = 8192
#: Buffers handed to one sendmsg() call (Linux IOV_MAX is 1024).
MAX_SEND_BUFFERS: Final = 512
#: Bytes handed to one TLS send (joined from whole events; TLS records are 16 KiB).
MAX_TLS_SEND_BYTES: Final = 256 * 1024
#: Remote subscribers whose TLS handshake is in progress at once; more are refused.
MAX_PENDING_HANDSHAKES: Final = 16
#: Seconds a remote subscriber has to complete its TLS handshake.
HANDSHAKE_TIMEOUT: Final = 10.0
#: Seconds stop() waits for subscribers to take what is buffered for them.
STOP_FLUSH_TIMEOUT: Final = 2.0
#: Permission bits of the event file when the hub creates it.
FILE_MODE: Final = 0o640

UNIX: Final = "unix"
TLS: Final = "tls"


class EventSource(Protocol):
    """Where the hub takes encoded events from (an ``EventQueue``, later a worker pipe)."""

    @property
    def dropped(self) -> int:
        """Events lost before reaching the hub (reported as stage ``worker-queue``)."""
        ...

    def drain(self, max_items: int) -> list[bytes]:
        """Remove and return up to ``max_items`` encoded events, oldest first."""
        ...


@dataclass(frozen=True)
class RemoteListener:
    """The optional TCP listener for remote subscribers (mutual TLS)."""

    address: tuple[str, int]
    context: SSL.Context
    #: The context's leaf checks (its deny list is replaced by :meth:`EventHub.set_revoked`).
    check: mtls.ClientCheck


class _SubscriberGone(Exception):
    """The subscriber's connection failed; the message says how."""


class _Subscriber:
    """One subscriber connection and what is buffered for it."""

    __slots__ = ("buffered", "chunks", "delivered", "dropped", "fd", "head_offset", "id",
                 "name", "on_ready", "owed", "seq", "serial", "sock", "tls", "transport",
                 "want_write")  # fmt: skip

    def __init__(
        self, sub_id: int, sock: socket.socket, name: str,
        handler: Callable[[_Subscriber, int], None], tls: SSL.Connection | None = None,
        serial: int | None = None,
    ) -> None:  # fmt: skip
        self.id = sub_id
        self.sock = sock
        self.fd = sock.fileno()
        self.name = name
        self.tls = tls
        self.transport = UNIX if tls is None else TLS
        #: Serial of the client certificate (remote subscribers), for revocation.
        self.serial = serial
        #: Selector callback for this subscriber: ``handler(self, mask)``.
        self.on_ready: Callable[[int], None] = functools.partial(handler, self)
        #: Whole encoded events not yet fully sent; the head may be partly sent.
        self.chunks: deque[bytes] = deque()
        #: Bytes of ``chunks[0]`` already sent.
        self.head_offset = 0
        #: Bytes in ``chunks`` not yet sent.
        self.buffered = 0
        #: Events dropped for this subscriber and not yet reported by a gap event.
        self.owed = 0
        #: Events sent to / dropped for this subscriber in all.
        self.delivered = 0
        self.dropped = 0
        #: ``seq`` of the next hub event (hello, gap) on this stream.
        self.seq = 0
        #: Waiting for the socket to become writable.
        self.want_write = False

    def send(self) -> int:
        """Send from the head of ``chunks`` without blocking: bytes taken, -1 if none."""
        chunks = self.chunks
        head: bytes | memoryview = chunks[0]
        if self.head_offset:
            head = memoryview(head)[self.head_offset :]
        tls = self.tls
        if tls is None:
            try:
                return self.sock.sendmsg([head, *itertools.islice(chunks, 1, MAX_SEND_BUFFERS)])
            except BlockingIOError:
                return -1
            except OSError as exc:
                raise _SubscriberGone(_reason(exc)) from exc
        # TLS: one contiguous buffer; a retry after WantWrite passes at least the same bytes
        # (the buffer only grows until something is sent), as OpenSSL requires.
        parts = [head]
        size = len(head)
        for chunk in itertools.islice(chunks, 1, None):
            if size >= MAX_TLS_SEND_BYTES:
                break
            parts.append(chunk)
            size += len(chunk)
        try:
            return tls.send(b"".join(parts) if len(parts) > 1 else bytes(head))
        except (SSL.WantWriteError, SSL.WantReadError):
            return -1
        except (SSL.Error, OSError) as exc:
            raise _SubscriberGone(_reason(exc)) from exc

    def poll_closed(self) -> str | None:
        """Read what the peer sent (subscribers only listen): why to close it, or None."""
        try:
            data = self.sock.recv(1) if self.tls is None else self.tls.recv(1)
        except (BlockingIOError, SSL.WantReadError, SSL.WantWriteError):
            return None
        except SSL.ZeroReturnError:
            return "closed"
        except (SSL.Error, OSError) as exc:
            return _reason(exc)
        return "sent data" if data else "closed"


def _reason(exc: Exception) -> str:
    """A subscriber's connection error as the ``reason`` of ``subscriber_closed``."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror  # "Connection reset by peer", "Broken pipe"
    return str(exc) or type(exc).__name__


class _Handshake:
    """A remote subscriber whose TLS handshake is in progress."""

    __slots__ = ("deadline", "fd", "on_ready", "peer", "record", "sock", "tls")

    def __init__(self, sock: socket.socket, tls: SSL.Connection, record: mtls.PeerRecord,
                 peer: str, handler: Callable[[_Handshake, int], None]) -> None:  # fmt: skip
        self.sock = sock
        self.fd = sock.fileno()
        self.tls = tls
        self.record = record
        self.peer = peer
        self.deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        self.on_ready: Callable[[int], None] = functools.partial(handler, self)


class EventHub(SelectorService):
    """Fans encoded events out to the subscribers (local and remote) and a file.

    Construct, :meth:`add_source` (before or after :meth:`start`), :meth:`start`,
    ..., :meth:`stop`. Everything but :meth:`add_source`, :meth:`set_revoked`,
    :meth:`stats` and :meth:`stop` happens on the hub's own thread.
    """

    thread_name = "tlsgate-eventhub"
    failure_consequence = "events are no longer delivered"

    def __init__(
        self,
        socket_path: Path | None,
        *,
        file_path: Path | None = None,
        socket_mode: int = 0o660,
        gateway_id: str,
        subscriber_buffer_bytes: int = DEFAULT_SUBSCRIBER_BUFFER_BYTES,
        max_subscribers: int = MAX_SUBSCRIBERS,
        remote: RemoteListener | None = None,
        on_subscriber_closed: Callable[[str, int, int], None] | None = None,
    ) -> None:
        if subscriber_buffer_bytes < MIN_SUBSCRIBER_BUFFER_BYTES:
            raise ValueError(
                f"subscriber_buffer_bytes must be at least {MIN_SUBSCRIBER_BUFFER_BYTES},"
                f" not {subscriber_buffer_bytes}"
            )
        super().__init__()
        self.socket_path: Final = socket_path
        self.file_path: Final = file_path
        self.socket_mode: Final = socket_mode
        self.gateway_id: Final = gateway_id
        self.remote: Final = remote
        self._limit = subscriber_buffer_bytes
        self._low_water = subscriber_buffer_bytes // 2
        self._max_subscribers = max_subscribers
        self._on_subscriber_closed = on_subscriber_closed
        #: Subscribers that went away while the gateway ran.
        self.subscribers_closed = 0

        self.produced = 0
        self.delivered = 0
        self._dropped_subscriber = 0
        self._dropped_file = 0
        #: Remote connections refused, by reason (:data:`~tlsgate.supervisor.mtls.REFUSAL_REASONS`).
        self.refused = dict.fromkeys(mtls.REFUSAL_REASONS, 0)

        self._sources: tuple[EventSource, ...] = ()
        self._sources_lock = threading.Lock()
        self._subscribers: dict[int, _Subscriber] = {}
        self._handshakes: dict[int, _Handshake] = {}
        self._ids = itertools.count(1)
        self._packer = new_packer()
        self._started_at = 0.0
        self._pid = os.getpid()
        self._backlog = False
        self._recheck_revoked = False
        self._remote_address: tuple[str, int] | None = None

        self._file_fd: int | None = None
        self._file_seq = 0
        self._file_owed = 0

    # -- control (any thread) -------------------------------------------------------

    def add_source(self, queue: EventSource) -> None:
        """Take events from ``queue`` from now on (thread-safe)."""
        with self._sources_lock:
            self._sources = (*self._sources, queue)

    def start(self) -> None:
        """Open the file, create the sockets, start the hub thread; OperatorError on failure."""
        self._started_at = time.time()
        self._start_service(self._set_up)

    def set_revoked(self, serials: frozenset[int]) -> None:
        """Refuse these client certificate serials from now on; disconnect their holders."""
        if self.remote is None:
            return
        self.remote.check.revoked = serials
        self._recheck_revoked = True
        self._wake()

    @property
    def remote_address(self) -> tuple[str, int] | None:
        """Where the remote listener is bound (the real port when 0 was asked for)."""
        return self._remote_address

    def stats(self) -> dict[str, Any]:
        """Counters: ``produced``, ``delivered``, ``dropped`` per stage, ``subscribers``.

        ``produced`` counts events taken from the sources; ``delivered`` events written
        in full to subscriber sockets (hello and gap events included); ``dropped`` maps
        each stage (``worker-queue``, ``subscriber``, ``file``) to the events lost there.
        ``per_subscriber`` lists each connected subscriber's own counters; ``remote`` (when
        the TCP listener is on) its address, handshakes in progress and refusals by reason.
        """
        subscribers = list(self._subscribers.values())
        stats: dict[str, Any] = {
            "produced": self.produced,
            "delivered": self.delivered,
            "dropped": {
                STAGE_WORKER_QUEUE: sum(source.dropped for source in self._sources),
                STAGE_SUBSCRIBER: self._dropped_subscriber,
                STAGE_FILE: self._dropped_file,
            },
            "subscribers": len(subscribers),
            "subscribers_closed": self.subscribers_closed,
            "sources": len(self._sources),
            "per_subscriber": [
                {
                    "id": sub.id,
                    "name": sub.name,
                    "transport": sub.transport,
                    "delivered": sub.delivered,
                    "dropped": sub.dropped,
                    "buffered_bytes": sub.buffered,
                }
                for sub in subscribers
            ],
        }
        if self.remote is not None:
            address = self._remote_address or self.remote.address
            stats["remote"] = {
                "listen": _format_address(address),
                "handshakes": len(self._handshakes),
                "refused": dict(self.refused),
            }
        return stats

    # -- set-up ---------------------------------------------------------------------

    def _set_up(self) -> None:
        if self.file_path is not None:
            self._open_file(self.file_path)
        if self.socket_path is not None:
            listener = create_unix_listener(self.socket_path, "events", self.socket_mode)
            self._listen(listener.sock, "events socket", self._on_unix_subscriber,
                         listener.close)  # fmt: skip
        if self.remote is not None:
            sock = management_listener(
                self.remote.address, "remote event subscribers", "[events] remote_listen"
            )
            self._remote_address = sock.getsockname()[:2]
            self._listen(sock, "remote events listener", self._on_remote_connection)

    def _open_file(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise OperatorError(
                f"cannot open the event file {path}: {exc.strerror};"
                " check that its directory exists and is writable, or pick another file"
            ) from exc
        self._file_fd = fd
        self._write_file(())

    # -- the hub thread -------------------------------------------------------------

    def _select_timeout(self) -> float | None:
        if self._backlog:
            return 0
        if self._handshakes:
            first = min(h.deadline for h in self._handshakes.values())
            return max(0.0, min(DRAIN_INTERVAL, first - time.monotonic()))
        return DRAIN_INTERVAL

    def _tick(self) -> None:
        if self._handshakes:
            self._expire_handshakes()
        if self._recheck_revoked:
            self._recheck_revoked = False
            self._drop_revoked()
        self._backlog = self._pump()

    def _on_stop(self) -> None:
        self._close_listeners()
        for handshake in list(self._handshakes.values()):
            self._end_handshake(handshake)
        while self._pump():
            pass
        selector = self._selector
        assert selector is not None
        deadline = time.monotonic() + STOP_FLUSH_TIMEOUT
        while any(sub.chunks for sub in self._subscribers.values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stuck = sum(1 for sub in self._subscribers.values() if sub.chunks)
                logger.warning(
                    "event hub stopped with events still buffered for %d slow subscriber(s)",
                    stuck,
                )
                break
            for key, mask in selector.select(remaining):
                key.data(mask)

    def _pump(self) -> bool:
        """Drain every source once and dispatch; True if a source had more waiting."""
        more = False
        finished = []
        for source in self._sources:
            done = getattr(source, "finished", False)  # read before draining: no race
            batch = source.drain(MAX_DRAIN_PER_SOURCE)
            if batch:
                self._dispatch(batch)
                more = more or len(batch) >= MAX_DRAIN_PER_SOURCE
            elif done:
                finished.append(source)
        if finished:
            with self._sources_lock:
                self._sources = tuple(s for s in self._sources if s not in finished)
        return more

    def _dispatch(self, batch: Sequence[bytes]) -> None:
        self.produced += len(batch)
        if self._file_fd is not None:
            self._write_file(batch)
        if not self._subscribers:
            return
        size = sum(map(len, batch))
        for sub in list(self._subscribers.values()):
            self._offer(sub, batch, size)
            if not sub.want_write:
                self._flush(sub)

    def _offer(self, sub: _Subscriber, batch: Sequence[bytes], size: int) -> None:
        """Buffer the longest prefix of ``batch`` that fits; count the rest as dropped."""
        if sub.owed:
            if sub.buffered > self._low_water:
                sub.owed += len(batch)
                sub.dropped += len(batch)
                self._dropped_subscriber += len(batch)
                return
            self._queue_gap(sub)
        if sub.buffered + size <= self._limit:
            sub.chunks.extend(batch)
            sub.buffered += size
            return
        room = self._limit - sub.buffered
        taken = 0
        for data in batch:
            if len(data) > room:
                break
            room -= len(data)
            taken += 1
        if taken:
            sub.chunks.extend(itertools.islice(batch, taken))
            sub.buffered = self._limit - room
        lost = len(batch) - taken
        sub.owed += lost
        sub.dropped += lost
        self._dropped_subscriber += lost

    def _queue_gap(self, sub: _Subscriber) -> None:
        gap = encode_hub_event(
            self._packer,
            GAP,
            sub.seq,
            time.time(),
            {"dropped": sub.owed, "stage": STAGE_SUBSCRIBER},
        )
        sub.seq += 1
        sub.owed = 0
        sub.chunks.append(gap)
        sub.buffered += len(gap)

    def _hello(self, seq: int) -> bytes:
        return encode_hub_event(
            self._packer,
            HELLO,
            seq,
            time.time(),
            {
                "schema": SCHEMA_VERSION,
                "gateway": self.gateway_id,
                "started": self._started_at,
                "pid": self._pid,
            },
        )

    def _flush(self, sub: _Subscriber) -> None:
        """Send what the socket takes without blocking; then wait for writability or not."""
        chunks = sub.chunks
        while True:
            if sub.owed and sub.buffered <= self._low_water:
                self._queue_gap(sub)
            if not chunks:
                break
            try:
                sent = sub.send()
            except _SubscriberGone as exc:
                logger.info("event subscriber %s went away: %s", sub.name, exc)
                self._close_subscriber(sub, str(exc))
                return
            if sent < 0:
                break
            sub.buffered -= sent
            sent += sub.head_offset
            popped = 0
            while chunks and sent >= len(chunks[0]):
                sent -= len(chunks.popleft())
                popped += 1
            sub.delivered += popped
            self.delivered += popped
            sub.head_offset = sent
            if sent and sub.tls is None:
                break  # the socket took part of an event: its buffer is full
        self._set_want_write(sub, bool(chunks))

    def _set_want_write(self, sub: _Subscriber, want: bool) -> None:
        if want == sub.want_write:
            return
        sub.want_write = want
        assert self._selector is not None
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
        self._selector.modify(sub.sock, events, sub.on_ready)

    def _on_subscriber(self, sub: _Subscriber, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            reason = sub.poll_closed()
            if reason is not None:
                if reason == "sent data":
                    logger.warning("event subscriber %s sent data; closing it", sub.name)
                else:
                    logger.info("event subscriber %s %s", sub.name, reason)
                self._close_subscriber(sub, reason)
                return
        if mask & selectors.EVENT_WRITE or (sub.tls is not None and sub.chunks):
            self._flush(sub)

    def _room_for_subscriber(self, sock: socket.socket, where: str) -> bool:
        if len(self._subscribers) + len(self._handshakes) < self._max_subscribers:
            return True
        logger.warning("%s refused a subscriber: %d are connected already", where,
                       len(self._subscribers))  # fmt: skip
        sock.close()
        return False

    def _on_unix_subscriber(self, conn: socket.socket, address: object) -> None:
        if self._room_for_subscriber(conn, "the events socket"):
            self._add_subscriber(conn, f"unix:{peer_name(conn)}")

    def _add_subscriber(
        self, sock: socket.socket, name: str, tls: SSL.Connection | None = None,
        serial: int | None = None,
    ) -> None:  # fmt: skip
        sub = _Subscriber(next(self._ids), sock, name, self._on_subscriber, tls, serial)
        self._subscribers[sub.fd] = sub
        assert self._selector is not None
        self._selector.register(sock, selectors.EVENT_READ, sub.on_ready)
        hello = self._hello(sub.seq)
        sub.seq += 1
        sub.chunks.append(hello)
        sub.buffered += len(hello)
        self._flush(sub)

    # -- remote subscribers ---------------------------------------------------------

    def _on_remote_connection(self, sock: socket.socket, address: Any) -> None:
        remote = self.remote
        assert remote is not None and self._selector is not None
        peer = _format_address(address[:2])
        if len(self._handshakes) >= MAX_PENDING_HANDSHAKES:
            self.refused[mtls.LIMIT] += 1
            logger.warning("remote events listener refused %s: %d handshakes are in progress",
                           peer, len(self._handshakes))  # fmt: skip
            sock.close()
            return
        if not self._room_for_subscriber(sock, "the remote events listener"):
            self.refused[mtls.LIMIT] += 1
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls, record = mtls.new_server_connection(remote.context, sock)
        handshake = _Handshake(sock, tls, record, peer, self._on_handshake)
        self._handshakes[handshake.fd] = handshake
        self._selector.register(sock, selectors.EVENT_READ, handshake.on_ready)
        self._on_handshake(handshake, selectors.EVENT_READ)

    def _on_handshake(self, handshake: _Handshake, mask: int) -> None:
        try:
            handshake.tls.do_handshake()
        except SSL.WantReadError:
            self._await(handshake, selectors.EVENT_READ)
            return
        except SSL.WantWriteError:
            self._await(handshake, selectors.EVENT_WRITE)
            return
        except (SSL.Error, OSError) as exc:
            reason = mtls.refusal_reason(handshake.record, exc)
            self._refuse(handshake, reason, str(exc) or type(exc).__name__)
            return
        self._end_handshake(handshake, close=False)
        record = handshake.record
        name = f"tls:{record.name}@{handshake.peer}"
        logger.info("remote event subscriber %s connected (certificate serial %x)", name,
                    record.serial or 0)  # fmt: skip
        self._add_subscriber(handshake.sock, name, handshake.tls, record.serial)

    def _await(self, handshake: _Handshake, events: int) -> None:
        assert self._selector is not None
        self._selector.modify(handshake.sock, events, handshake.on_ready)

    def _refuse(self, handshake: _Handshake, reason: str, detail: str) -> None:
        self.refused[reason] += 1
        name = handshake.record.name
        who = f"{handshake.peer} ({name})" if name else handshake.peer
        logger.warning("remote events listener refused %s: %s (%s)", who, reason, detail)
        self._end_handshake(handshake)

    def _end_handshake(self, handshake: _Handshake, close: bool = True) -> None:
        if self._handshakes.pop(handshake.fd, None) is None:
            return
        self._unregister(handshake.sock)
        if close:
            handshake.sock.close()

    def _expire_handshakes(self) -> None:
        now = time.monotonic()
        for handshake in [h for h in self._handshakes.values() if h.deadline <= now]:
            self._refuse(handshake, mtls.TIMEOUT, f"no handshake within {HANDSHAKE_TIMEOUT:g} s")

    def _drop_revoked(self) -> None:
        assert self.remote is not None
        revoked = self.remote.check.revoked
        for sub in list(self._subscribers.values()):
            if sub.serial is not None and sub.serial in revoked:
                logger.warning("event subscriber %s disconnected: its certificate (serial %x)"
                               " is revoked", sub.name, sub.serial)  # fmt: skip
                self._close_subscriber(sub, "certificate revoked")

    # -- the event file -------------------------------------------------------------

    def _write_file(self, batch: Sequence[bytes]) -> None:
        """Append ``batch`` (after a hello or gap if one is due) to the event file."""
        fd = self._file_fd
        assert fd is not None
        hub_events: list[bytes] = []
        if self._file_seq == 0:
            hub_events.append(self._hello(0))
        if self._file_owed:
            hub_events.append(
                encode_hub_event(
                    self._packer,
                    GAP,
                    self._file_seq + len(hub_events),
                    time.time(),
                    {"dropped": self._file_owed, "stage": STAGE_FILE},
                )
            )
        view = memoryview(b"".join((*hub_events, *batch)) if hub_events else b"".join(batch))
        written = 0
        try:
            while written < len(view):
                written += os.write(fd, view[written:])
        except OSError as exc:
            self._file_write_failed(fd, written, len(batch), exc)
            return
        if hub_events:
            self._file_seq += len(hub_events)
            if self._file_owed:
                logger.warning(
                    "event file %s is written again; %d events were lost",
                    self.file_path,
                    self._file_owed,
                )
                self._file_owed = 0

    def _file_write_failed(self, fd: int, written: int, lost: int, exc: OSError) -> None:
        if not self._file_owed:
            logger.error(
                "cannot write the event file %s (%s); events are dropped until it works",
                self.file_path,
                exc.strerror or exc,
            )
        self._file_owed += lost
        self._dropped_file += lost
        if written:
            # Keep the file a clean event stream: cut the partial write away.
            try:
                os.ftruncate(fd, os.fstat(fd).st_size - written)
            except OSError as trunc_exc:
                logger.error(
                    "event file %s now ends in a partial event: truncating failed (%s)",
                    self.file_path,
                    trunc_exc.strerror or trunc_exc,
                )

    # -- tear-down ------------------------------------------------------------------

    def _close_subscriber(self, sub: _Subscriber, reason: str | None = None) -> None:
        """Forget ``sub``; ``reason`` (it went away while we run) is reported."""
        if self._subscribers.get(sub.fd) is not sub:
            return  # closed already (its descriptor number may belong to a new one)
        del self._subscribers[sub.fd]
        self._unregister(sub.sock)
        if sub.tls is not None:
            try:
                sub.tls.shutdown()  # close_notify, best effort: the socket is non-blocking
            except (SSL.Error, OSError):
                pass  # the connection is being dropped either way
        sub.sock.close()
        if reason is not None:
            self.subscribers_closed += 1
            undelivered = len(sub.chunks) + sub.owed
            buffered = sub.buffered
            sub.chunks.clear()
            if self._on_subscriber_closed is not None:
                self._on_subscriber_closed(reason, undelivered, buffered)

    def _close_connections(self) -> None:
        for sub in list(self._subscribers.values()):
            self._close_subscriber(sub)
        for handshake in list(self._handshakes.values()):
            self._end_handshake(handshake)
        if self._file_fd is not None:
            os.close(self._file_fd)
            self._file_fd = None


def _format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
