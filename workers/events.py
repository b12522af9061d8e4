"""Inspection events: how a worker encodes them, queues them, and how consumers decode them.

Contract (the schema itself is ``docs/events.md``):

- An event is one msgpack map. Its first five keys, in this order, are ``type`` (str),
  ``version`` (int, :data:`SCHEMA_VERSION`), ``ts`` (float, Unix seconds), ``worker`` (int)
  and ``seq`` (int); the type's own fields follow. Strings are msgpack str (UTF-8), bytes
  are msgpack bin. Events are concatenated with no framing: a stream of events is a
  msgpack stream.
- ``seq`` counts from 0 per worker and advances for every event the worker *creates*,
  including the ones it then has to drop. A consumer therefore sees a hole in ``seq``
  for every lost event, and a ``gap`` event that explains it.
- Emitting never blocks and never drops silently. :class:`EventEmitter` pushes encoded
  events into a bounded :class:`EventQueue`; when the queue is full the event is counted
  and dropped. Until the emitter has put a ``gap`` event (``stage`` ``"worker-queue"``,
  ``dropped`` = N) into the queue, nothing else goes in, so a gap with ``seq`` S and
  ``dropped`` N always explains exactly the hole ``S-N .. S-1``. The emitter encodes the
  gap (it owns ``seq``); it does so on the next :meth:`EventEmitter.emit` or
  :meth:`EventEmitter.flush_gap` that finds room for the gap and the event behind it.
- Events the hub creates itself (``hello``, and ``gap`` with ``stage`` ``"subscriber"`` or
  ``"file"``) carry ``worker`` :data:`HUB_WORKER_ID` (-1) and their own ``seq``, counted
  per output stream, starting with the ``hello`` at 0.
- :class:`EventDecoder` turns a byte stream back into events with bounded memory: it
  raises :class:`EventDecodeError` (a :class:`~tlsgate.errors.RemoteProtocolError`) on
  anything that is not a stream of events, including a single event larger than its
  ``max_event_bytes``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

import msgpack

from tlsgate.errors import RemoteProtocolError

SCHEMA_VERSION: Final = 1

CONN_OPEN: Final = "conn_open"
CONN_CLOSE: Final = "conn_close"
HTTP: Final = "http"
UPSTREAM_REFUSED: Final = "upstream_refused"
PROTOCOL_ERROR: Final = "protocol_error"
POLICY: Final = "policy"
GAP: Final = "gap"
HELLO: Final = "hello"
CAPTURE_DROP: Final = "capture_drop"
STARTTLS: Final = "starttls"
SMTP: Final = "smtp"
IMAP: Final = "imap"
POP3: Final = "pop3"
BYPASS_LEARNED: Final = "bypass_learned"
BYPASS_EXPIRED: Final = "bypass_expired"
WEBSOCKET: Final = "websocket"
ACCESS_REFUSED: Final = "access_refused"
LIMIT: Final = "limit"
WORKER_EXIT: Final = "worker_exit"
SUBSCRIBER_CLOSED: Final = "subscriber_closed"
SIGNER_RESTART: Final = "signer_restart"

#: Every event type of schema version 1.
EVENT_TYPES: Final = (
    CONN_OPEN,
    CONN_CLOSE,
    HTTP,
    UPSTREAM_REFUSED,
    PROTOCOL_ERROR,
    POLICY,
    GAP,
    HELLO,
    CAPTURE_DROP,
    STARTTLS,
    SMTP,
    IMAP,
    POP3,
    BYPASS_LEARNED,
    BYPASS_EXPIRED,
    WEBSOCKET,
    ACCESS_REFUSED,
    LIMIT,
    WORKER_EXIT,
    SUBSCRIBER_CLOSED,
    SIGNER_RESTART,
)

#: The keys every event starts with, in encoding order.
COMMON_FIELDS: Final = ("type", "version", "ts", "worker", "seq")

#: ``worker`` of the events the hub creates itself (``hello``, subscriber/file gaps).
HUB_WORKER_ID: Final = -1

#: ``worker`` of the events the supervisor creates (``worker_exit``, ``subscriber_closed``,
#: ``signer_restart``);
#: they have their own ``seq``, counted like a worker's.
SUPERVISOR_WORKER_ID: Final = -2

#: ``stage`` values of ``gap`` events: where the events were lost.
STAGE_WORKER_QUEUE: Final = "worker-queue"
STAGE_SUBSCRIBER: Final = "subscriber"
STAGE_FILE: Final = "file"

#: Default capacity, in events, of a worker's queue towards the hub.
DEFAULT_QUEUE_MAXLEN: Final = 65536

#: Largest single encoded event a decoder accepts by default. Workers bound what they
#: put in an event (header lists, strings) far below this.
MAX_EVENT_BYTES: Final = 1024 * 1024

#: Largest array or map (in elements) a decoder accepts inside an event.
MAX_EVENT_CONTAINER_LEN: Final = 65536

#: Bytes fed to the msgpack unpacker at a time; its buffer holds at most one partial
#: event plus one such piece.
FEED_CHUNK_BYTES: Final = 64 * 1024

_N_COMMON: Final = len(COMMON_FIELDS)
_COMMON_KEYS: Final = frozenset(COMMON_FIELDS)

#: What msgpack raises on malformed input (UnpackValueError, FormatError, StackError and
#: ExtraData are ValueErrors; BufferFull is only an UnpackException; unhashable map keys
#: surface as TypeError).
_UNPACK_ERRORS: Final = (ValueError, TypeError, msgpack.UnpackException)


class EventDecodeError(RemoteProtocolError):
    """Bytes that should be a tlsgate event stream are not one."""


def new_packer() -> msgpack.Packer:
    """A packer with the settings every event producer uses (str as str, bytes as bin)."""
    return msgpack.Packer(use_bin_type=True, datetime=False)


def encode_hub_event(
    packer: msgpack.Packer, type: str, seq: int, ts: float, fields: Mapping[str, Any]
) -> bytes:
    """Encode an event created by the hub (``worker`` is :data:`HUB_WORKER_ID`)."""
    event: dict[str, Any] = {
        "type": type,
        "version": SCHEMA_VERSION,
        "ts": ts,
        "worker": HUB_WORKER_ID,
        "seq": seq,
    }
    event.update(fields)
    data: bytes = packer.pack(event)
    return data


class EventQueue:
    """A thread-safe bounded FIFO of encoded events, from one worker to the hub.

    :meth:`put` never waits: when the queue holds ``maxlen`` events it returns False and
    counts the event in :attr:`dropped`. Gap bookkeeping is the emitter's job (it owns
    ``seq``); the queue only stores, counts and hands out batches.
    """

    __slots__ = ("_items", "_lock", "dropped", "maxlen")

    def __init__(self, maxlen: int = DEFAULT_QUEUE_MAXLEN) -> None:
        if maxlen < 2:
            # A gap event and the event behind it must fit together.
            raise ValueError(f"EventQueue maxlen must be at least 2, not {maxlen}")
        self.maxlen: Final = maxlen
        #: Events refused because the queue was full (total since creation).
        self.dropped = 0
        self._items: deque[bytes] = deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def room(self) -> int:
        """How many more events fit right now (only grows until the next put)."""
        return self.maxlen - len(self._items)

    def put(self, data: bytes) -> bool:
        """Append one encoded event; False, counted in :attr:`dropped`, when full."""
        with self._lock:
            if len(self._items) >= self.maxlen:
                self.dropped += 1
                return False
            self._items.append(data)
            return True

    def count_dropped(self, n: int = 1) -> None:
        """Count ``n`` events the producer dropped without offering them to :meth:`put`."""
        with self._lock:
            self.dropped += n

    def drain(self, max_items: int) -> list[bytes]:
        """Remove and return up to ``max_items`` events, oldest first."""
        with self._lock:
            items = self._items
            if len(items) <= max_items:
                batch = list(items)
                items.clear()
                return batch
            popleft = items.popleft
            return [popleft() for _ in range(max_items)]


class EventEmitter:
    """Stamps, encodes and queues a worker's events; never blocks (see the module rules).

    Thread-safe: one lock covers numbering, encoding and queueing, so the queue holds
    events in ``seq`` order. Use one emitter per queue.
    """

    __slots__ = (
        "_clock",
        "_lock",
        "_pack",
        "_queue",
        "_seq",
        "_unreported",
        "worker_id",
    )

    def __init__(
        self, worker_id: int, queue: EventQueue, clock: Callable[[], float] = time.time
    ) -> None:
        self.worker_id: Final = worker_id
        self._queue = queue
        self._clock = clock
        self._pack = new_packer().pack
        self._lock = threading.Lock()
        self._seq = 0
        self._unreported = 0

    @property
    def next_seq(self) -> int:
        """The ``seq`` the next event will get."""
        return self._seq

    @property
    def unreported(self) -> int:
        """Events dropped that no gap event in the queue accounts for yet."""
        return self._unreported

    def emit(self, type: str, fields: Mapping[str, Any]) -> None:
        """Stamp ``fields`` as an event of ``type`` and queue it; drop (counted) if full.

        ``fields`` must not contain the common keys (``ValueError``) and must hold only
        msgpack-encodable values (``TypeError``); neither consumes a ``seq``.
        """
        with self._lock:
            queue = self._queue
            if self._unreported:
                if queue.room() < 2 or not self._put_gap_locked():
                    # Nothing may overtake the gap: this event is lost too.
                    self._seq += 1
                    self._unreported += 1
                    queue.count_dropped()
                    return
            elif len(queue) >= queue.maxlen:
                # Full: skip the encoding work, the put would fail anyway.
                self._seq += 1
                self._unreported += 1
                queue.count_dropped()
                return
            seq = self._seq
            event = {
                "type": type,
                "version": SCHEMA_VERSION,
                "ts": self._clock(),
                "worker": self.worker_id,
                "seq": seq,
                **fields,
            }
            if len(event) != _N_COMMON + len(fields):
                clash = sorted(_COMMON_KEYS & fields.keys())
                raise ValueError(f"{type} event fields may not set the common keys {clash}")
            data = self._pack(event)
            self._seq = seq + 1
            if not queue.put(data):
                self._unreported += 1

    def flush_gap(self) -> bool:
        """Queue the pending gap event now if there is room; True when nothing is pending.

        Workers call it when idle or before exiting, so that drops at the end of a burst
        are reported without waiting for the next event.
        """
        with self._lock:
            if not self._unreported:
                return True
            return self._queue.room() >= 1 and self._put_gap_locked()

    def _put_gap_locked(self) -> bool:
        """Queue a gap for the unreported drops; on failure the gap's own seq is lost too."""
        seq = self._seq
        gap = self._pack(
            {
                "type": GAP,
                "version": SCHEMA_VERSION,
                "ts": self._clock(),
                "worker": self.worker_id,
                "seq": seq,
                "dropped": self._unreported,
                "stage": STAGE_WORKER_QUEUE,
            }
        )
        self._seq = seq + 1
        if self._queue.put(gap):
            self._unreported = 0
            return True
        self._unreported += 1
        return False


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not part of the event schema")


class EventDecoder:
    """Streaming decoder: feed it bytes as they arrive, get back the complete events.

    Memory stays bounded by ``max_event_bytes`` plus :data:`FEED_CHUNK_BYTES`. After it
    raised :class:`EventDecodeError` the stream is unusable: discard the decoder.
    """

    __slots__ = ("_fed", "_max_event_bytes", "_unpacker")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max_event_bytes = max_event_bytes
        self._unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=True,
            timestamp=1,
            ext_hook=_reject_ext,
            max_buffer_size=max_event_bytes + FEED_CHUNK_BYTES,
            max_array_len=MAX_EVENT_CONTAINER_LEN,
            max_map_len=MAX_EVENT_CONTAINER_LEN,
        )
        self._fed = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete event waiting for more input."""
        return self._fed - self._unpacker.tell()

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[dict[str, Any]]:
        """Add ``data`` to the stream; iterate the result for the events it completes.

        The bytes are consumed as the iterator advances (that keeps memory bounded for
        any size of ``data``), so iterate it to the end. Events before a malformed part
        of the stream are yielded before :class:`EventDecodeError` is raised.
        """
        view = memoryview(data)
        for start in range(0, len(view), FEED_CHUNK_BYTES):
            piece = view[start : start + FEED_CHUNK_BYTES]
            try:
                self._unpacker.feed(piece)
                self._fed += len(piece)
                for obj in self._unpacker:
                    yield _check_event(obj)
            except _UNPACK_ERRORS as exc:
                raise EventDecodeError(
                    f"event stream is not valid msgpack ({type(exc).__name__}: {exc});"
                    " this is not a tlsgate event stream, or a corrupt one"
                ) from exc
            if self.pending_bytes > self._max_event_bytes:
                raise EventDecodeError(
                    f"event stream holds an event larger than {self._max_event_bytes} bytes;"
                    " this is not a tlsgate event stream, or a corrupt one"
                )

    def close(self) -> None:
        """Declare the end of the stream; raise if it stopped inside an event."""
        if self.pending_bytes:
            raise EventDecodeError(
                f"event stream ends inside an event ({self.pending_bytes} bytes of it);"
                " it was cut short (e.g. a recording being written or a crash)"
            )


def _check_event(obj: object) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise EventDecodeError(
            f"event stream holds a msgpack {type(obj).__name__} where an event map belongs;"
            " this is not a tlsgate event stream"
        )
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise EventDecodeError(
            "event stream holds a map without a string 'type'; this is not a tlsgate event stream"
        )
    return obj


def decode_events(data: bytes, max_event_bytes: int = MAX_EVENT_BYTES) -> Iterator[dict[str, Any]]:
    """Decode a complete event stream (e.g. a recording read whole); raise if it is cut."""
    decoder = EventDecoder(max_event_bytes)
    yield from decoder.feed(data)
    decoder.close()
