"""The event hub: collects encoded events from the workers and fans them out to the IDS.

Rules:

- Input is encoded event bytes from *sources* (:class:`EventSource`, e.g. a worker's
  :class:`~tlsgate.workers.events.EventQueue`). The hub thread drains every source every
  :data:`DRAIN_INTERVAL` seconds in batches; producers never make a syscall per event
  and never wait for the hub.
- Outputs: the detection socket (Unix stream, any number of subscribers up to
  ``max_subscribers``) and optionally a file the same bytes are appended to. Each output
  stream starts with a ``hello`` event (``schema``, ``gateway``, ``started``, ``pid``)
  and then carries every event as a msgpack stream.
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
- A subscriber that goes away while the gateway runs (it closed, reset, or sent data) is
  reported to ``on_subscriber_closed(reason, undelivered_events, undelivered_bytes)``
  (the supervisor turns it into a ``subscriber_closed`` event); what was buffered for it
  is freed at once.
- A source whose ``finished`` attribute is true (a worker's pipe after the worker exited)
  is drained one last time and then forgotten, so restarts do not accumulate sources.
- The socket is created with ``socket_mode`` already set (bound under a temporary name,
  chmod-ed, then hard-linked into place, which also fails if the name was taken). A
  socket file left by a dead gateway is removed; one that accepts connections means
  another gateway is running, which is an :class:`~tlsgate.errors.OperatorError`.
- :meth:`EventHub.stop` stops accepting, removes the socket file (only if it is still
  the one this hub created), drains the sources one last time, gives subscribers up to
  :data:`STOP_FLUSH_TIMEOUT` seconds to take what is buffered, and closes everything.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import secrets
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

from tlsgate.errors import OperatorError
from tlsgate.supervisor.unixsocket import remove_stale_socket, unlink_quietly
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
#: Connections accepted per wake-up of the listening socket.
MAX_ACCEPTS_PER_WAKEUP: Final = 64
#: Seconds to stop accepting after accept() failed (e.g. out of file descriptors).
ACCEPT_RETRY_DELAY: Final = 1.0
#: Buffers handed to one sendmsg() call (Linux IOV_MAX is 1024).
MAX_SEND_BUFFERS: Final = 512
#: Seconds stop() waits for subscribers to take what is buffered for them.
STOP_FLUSH_TIMEOUT: Final = 2.0
#: Pending connections the listening socket queues.
LISTEN_BACKLOG: Final = 64
#: Permission bits of the event file when the hub creates it.
FILE_MODE: Final = 0o640


class EventSource(Protocol):
    """Where the hub takes encoded events from (an ``EventQueue``, later a worker pipe)."""

    @property
    def dropped(self) -> int:
        """Events lost before reaching the hub (reported as stage ``worker-queue``)."""
        ...

    def drain(self, max_items: int) -> list[bytes]:
        """Remove and return up to ``max_items`` encoded events, oldest first."""
        ...


class _Subscriber:
    """One connection to the detection socket and what is buffered for it."""

    __slots__ = (
        "buffered",
        "chunks",
        "fd",
        "head_offset",
        "on_ready",
        "owed",
        "seq",
        "sock",
        "want_write",
    )

    def __init__(self, sock: socket.socket, handler: Callable[[_Subscriber, int], None]) -> None:
        self.sock = sock
        self.fd = sock.fileno()
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
        #: ``seq`` of the next hub event (hello, gap) on this stream.
        self.seq = 0
        #: Waiting for the socket to become writable.
        self.want_write = False


class EventHub:
    """Fans encoded events out to the detection socket's subscribers and a file.

    Construct, :meth:`add_source` (before or after :meth:`start`), :meth:`start`,
    ..., :meth:`stop`. Everything but :meth:`add_source`, :meth:`stats` and
    :meth:`stop` happens on the hub's own thread.
    """

    def __init__(
        self,
        socket_path: Path | None,
        *,
        file_path: Path | None = None,
        socket_mode: int = 0o660,
        gateway_id: str,
        subscriber_buffer_bytes: int = DEFAULT_SUBSCRIBER_BUFFER_BYTES,
        max_subscribers: int = MAX_SUBSCRIBERS,
        on_subscriber_closed: Callable[[str, int, int], None] | None = None,
    ) -> None:
        if subscriber_buffer_bytes < MIN_SUBSCRIBER_BUFFER_BYTES:
            raise ValueError(
                f"subscriber_buffer_bytes must be at least {MIN_SUBSCRIBER_BUFFER_BYTES},"
                f" not {subscriber_buffer_bytes}"
            )
        self.socket_path: Final = socket_path
        self.file_path: Final = file_path
        self.socket_mode: Final = socket_mode
        self.gateway_id: Final = gateway_id
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

        self._sources: tuple[EventSource, ...] = ()
        self._sources_lock = threading.Lock()
        self._subscribers: dict[int, _Subscriber] = {}
        self._packer = new_packer()
        self._started_at = 0.0
        self._pid = os.getpid()

        self._selector: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._listener_id: tuple[int, int] | None = None
        self._accept_paused_until = 0.0
        self._file_fd: int | None = None
        self._file_seq = 0
        self._file_owed = 0
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failure: BaseException | None = None

    # -- control (any thread) -------------------------------------------------------

    def add_source(self, queue: EventSource) -> None:
        """Take events from ``queue`` from now on (thread-safe)."""
        with self._sources_lock:
            self._sources = (*self._sources, queue)

    def start(self) -> None:
        """Open the file, create the socket, start the hub thread; OperatorError on failure."""
        if self._thread is not None:
            raise RuntimeError("EventHub.start() called twice")
        self._started_at = time.time()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        try:
            if self.file_path is not None:
                self._open_file(self.file_path)
            if self.socket_path is not None:
                self._listener = self._create_listener(self.socket_path)
                self._selector.register(self._listener, selectors.EVENT_READ, self._on_accept)
        except BaseException:
            self._close_all()
            raise
        self._thread = threading.Thread(target=self._run, name="tlsgate-eventhub", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Flush what is queued (bounded by :data:`STOP_FLUSH_TIMEOUT`) and close cleanly.

        Idempotent; returns once the hub thread has finished and everything is closed.
        """
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake()
        thread.join()

    @property
    def running(self) -> bool:
        """True while the hub thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def failure(self) -> BaseException | None:
        """The error that killed the hub thread (it is also logged), if one did."""
        return self._failure

    def stats(self) -> dict[str, Any]:
        """Counters: ``produced``, ``delivered``, ``dropped`` per stage, ``subscribers``.

        ``produced`` counts events taken from the sources; ``delivered`` events written
        in full to subscriber sockets (hello and gap events included); ``dropped`` maps
        each stage (``worker-queue``, ``subscriber``, ``file``) to the events lost there.
        """
        return {
            "produced": self.produced,
            "delivered": self.delivered,
            "dropped": {
                STAGE_WORKER_QUEUE: sum(source.dropped for source in self._sources),
                STAGE_SUBSCRIBER: self._dropped_subscriber,
                STAGE_FILE: self._dropped_file,
            },
            "subscribers": len(self._subscribers),
            "subscribers_closed": self.subscribers_closed,
            "sources": len(self._sources),
        }

    def _wake(self) -> None:
        if self._wake_w is None:
            return
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            # Full means a wake-up is already pending; closed means the hub is gone.
            pass

    # -- set-up ---------------------------------------------------------------------

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

    def _create_listener(self, path: Path) -> socket.socket:
        if not path.parent.is_dir():
            raise OperatorError(
                f"cannot create the events socket {path}: directory {path.parent} does not"
                " exist; create it or choose another socket path"
            )
        remove_stale_socket(path, "events")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound under a temporary name so that the mode is right before anyone can
        # connect, then linked into place: link() refuses to replace an existing name.
        temp = path.parent / f".{secrets.token_hex(5)}"
        try:
            try:
                listener.bind(str(temp))
                os.chmod(temp, self.socket_mode)
                listener.listen(LISTEN_BACKLOG)
                os.link(temp, path)
            finally:
                unlink_quietly(temp)
            st = os.lstat(path)
        except FileExistsError as exc:
            listener.close()
            raise OperatorError(
                f"another gateway is running: it created the events socket {path} just now;"
                " stop it or use another --state-dir"
            ) from exc
        except OSError as exc:
            listener.close()
            raise OperatorError(
                f"cannot create the events socket {path}: {exc.strerror or exc};"
                " check the directory's permissions (and that the path is short enough"
                " for a Unix socket), or choose another socket path"
            ) from exc
        listener.setblocking(False)
        self._listener_id = (st.st_dev, st.st_ino)
        return listener

    # -- the hub thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
            self._shutdown()
        except BaseException as exc:
            self._failure = exc
            logger.critical("the event hub failed; events are no longer delivered", exc_info=True)
        finally:
            self._close_all()

    def _loop(self) -> None:
        selector = self._selector
        assert selector is not None
        backlog = False
        while not self._stopping:
            for key, mask in selector.select(0 if backlog else DRAIN_INTERVAL):
                key.data(mask)
            if self._accept_paused_until and time.monotonic() >= self._accept_paused_until:
                self._resume_accepting()
            backlog = self._pump()

    def _shutdown(self) -> None:
        self._close_listener()
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
            head: bytes | memoryview = chunks[0]
            if sub.head_offset:
                head = memoryview(head)[sub.head_offset :]
            buffers = [head, *itertools.islice(chunks, 1, MAX_SEND_BUFFERS)]
            try:
                sent = sub.sock.sendmsg(buffers)
            except BlockingIOError:
                sent = -1
            except OSError as exc:
                logger.info("event subscriber %d went away: %s", sub.fd, exc)
                self._close_subscriber(sub, exc.strerror or str(exc))
                return
            if sent < 0:
                break
            sub.buffered -= sent
            sent += sub.head_offset
            while chunks and sent >= len(chunks[0]):
                sent -= len(chunks.popleft())
                self.delivered += 1
            sub.head_offset = sent
            if sent:
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
            # Subscribers only listen: data or end-of-stream both end the subscription.
            try:
                data = sub.sock.recv(1)
            except BlockingIOError:
                pass
            except OSError as exc:
                logger.info("event subscriber %d went away: %s", sub.fd, exc)
                self._close_subscriber(sub, exc.strerror or str(exc))
                return
            else:
                if data:
                    logger.warning("event subscriber %d sent data; closing it", sub.fd)
                self._close_subscriber(sub, "sent data" if data else "closed")
                return
        if mask & selectors.EVENT_WRITE:
            self._flush(sub)

    def _on_accept(self, mask: int) -> None:
        listener = self._listener
        if listener is None or self._selector is None:
            return
        for _ in range(MAX_ACCEPTS_PER_WAKEUP):
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                logger.warning(
                    "event socket cannot accept subscribers (%s); retrying in %.0f s",
                    exc,
                    ACCEPT_RETRY_DELAY,
                )
                self._selector.unregister(listener)
                self._accept_paused_until = time.monotonic() + ACCEPT_RETRY_DELAY
                return
            if len(self._subscribers) >= self._max_subscribers:
                logger.warning(
                    "event socket refused a subscriber: %d are connected already",
                    len(self._subscribers),
                )
                conn.close()
                continue
            conn.setblocking(False)
            sub = _Subscriber(conn, self._on_subscriber)
            self._subscribers[sub.fd] = sub
            self._selector.register(conn, selectors.EVENT_READ, sub.on_ready)
            hello = self._hello(sub.seq)
            sub.seq += 1
            sub.chunks.append(hello)
            sub.buffered += len(hello)
            self._flush(sub)

    def _resume_accepting(self) -> None:
        self._accept_paused_until = 0.0
        if self._listener is not None and self._selector is not None:
            self._selector.register(self._listener, selectors.EVENT_READ, self._on_accept)

    def _on_wake(self, mask: int) -> None:
        assert self._wake_r is not None
        try:
            self._wake_r.recv(4096)
        except BlockingIOError:
            pass

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
        if self._selector is not None:
            self._selector.unregister(sub.sock)
        sub.sock.close()
        if reason is not None:
            self.subscribers_closed += 1
            undelivered = len(sub.chunks) + sub.owed
            buffered = sub.buffered
            sub.chunks.clear()
            if self._on_subscriber_closed is not None:
                self._on_subscriber_closed(reason, undelivered, buffered)

    def _close_listener(self) -> None:
        listener = self._listener
        if listener is None:
            return
        self._listener = None
        if self._selector is not None and not self._accept_paused_until:
            self._selector.unregister(listener)
        listener.close()
        path = self.socket_path
        assert path is not None
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._listener_id:
            unlink_quietly(path)

    def _close_all(self) -> None:
        for sub in list(self._subscribers.values()):
            self._close_subscriber(sub)
        self._close_listener()
        if self._file_fd is not None:
            os.close(self._file_fd)
            self._file_fd = None
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None
        if self._selector is not None:
            self._selector.close()
            self._selector = None
