"""The signer service: the only user of the CA key, minting leaves for the workers.

Rules:

- :class:`SignerServer` runs in the signer process (:mod:`.signer_process`, a child of the
  supervisor) on its own thread (a selector loop) and answers workers over a Unix stream
  socket; if that thread dies the process exits and the supervisor starts a new one.
  Workers hold only the socket's path (and the run's leaf key): never the CA key, and
  they need no access to the state directory.
- Wire format, both directions: a 4-byte big-endian length, then one msgpack map.
  Request ``{"id": uint64, "dns_names": [str], "ip_addresses": [str], "not_after": int
  (unix seconds, UTC), "key": bin(32)}``; answer ``{"id", "der": bin}`` or
  ``{"id", "error": str}``. Answers may come in any order: clients match them by ``id``.
- A worker may be compromised, so every request is hostile input. A frame longer than
  :data:`MAX_REQUEST_BYTES`, or one that is not a msgpack map with an integer ``id``,
  closes the connection. Any other defect (missing or extra fields, wrong types, more
  than :data:`~tlsgate.supervisor.signer.MAX_LEAF_NAMES` names, over-long names, a bad
  ``not_after`` or key, names :class:`~tlsgate.supervisor.signer.LeafSigner` refuses) is
  answered with an ``error`` and the connection stays usable. Nothing a peer sends
  stops the service; the first defect per connection is logged with the peer's pid,
  the rest are counted.
- Single flight: requests are read from every ready connection, then answered per key:
  a key minted or found in the cache answers every request for it in that round, so
  concurrent misses for one name, from any number of workers, cost one signature. The
  leaf is stored in the shared cache *before* anyone is answered. Signing happens on the
  service thread, one leaf at a time (a signature is CPU-bound and holds the GIL; a pool
  would not add throughput).
- Bounded memory per connection: at most one incomplete request is buffered, at most
  :data:`MAX_OUTPUT_BYTES` of answers are queued (beyond that the connection is not read
  until its peer takes them), at most :data:`MAX_CONNECTIONS` connections.
- The socket is created with ``socket_mode`` (and ``owner_uid``/``owner_gid``, for
  workers of another user) already applied: bound inside a fresh private directory,
  chmod-ed and chown-ed, then hard-linked into place (which fails if the name is taken).
  A stale socket file (nobody listening) is replaced; a live one means another gateway
  is running (:class:`~tlsgate.errors.OperatorError`).
- CA rotation: :meth:`SignerServer.rotate` swaps the signer and empties the cache on the
  service thread between two rounds; connections stay up (workers that dropped root may
  not be able to reconnect by path).
- :class:`SignerClient` is the workers' side: one persistent connection (``sock``: one
  the supervisor connected for it; later ones by path), requests multiplexed by ``id``
  (``async`` :meth:`SignerClient.sign`, usable as the workers' ``Minter``), re-sent on a
  new connection when the signer restarted. A signer that cannot be reached or does not
  answer within ``timeout`` raises :class:`SignerUnavailable`; a request the signer
  refuses raises :class:`SignerRejected` (checked locally first when possible).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

import msgpack
from cryptography.hazmat.primitives.serialization import Encoding

from tlsgate.errors import TlsgateError
from tlsgate.supervisor.selectorservice import SelectorService
from tlsgate.supervisor.signer import MAX_DNS_NAME_CHARS, MAX_LEAF_NAMES, LeafRequest
from tlsgate.supervisor.unixsocket import create_unix_listener, peer_name
from tlsgate.workers.certs import Signer

logger = logging.getLogger(__name__)

#: Largest request frame: MAX_LEAF_NAMES names at their longest fit in about 260 KB.
MAX_REQUEST_BYTES: Final = 320 * 1024
#: Largest answer frame a client accepts (a leaf with MAX_LEAF_NAMES long names ~260 KB).
MAX_RESPONSE_BYTES: Final = 1024 * 1024
#: Answers queued for one connection before the service stops reading from it.
MAX_OUTPUT_BYTES: Final = 4 * 1024 * 1024
#: Requests taken from one connection per round, so that one peer cannot starve others.
MAX_REQUESTS_PER_ROUND: Final = 256
#: Connections served at once (each worker keeps one).
MAX_CONNECTIONS: Final = 256
#: Longest IP address text accepted (IPv6 with an embedded IPv4 address and a scope).
MAX_IP_CHARS: Final = 64
#: Latest notAfter accepted: 9999-12-31T23:59:59Z, the end of X.509 GeneralizedTime.
MAX_NOT_AFTER: Final = 253_402_300_799
#: Largest request id (msgpack uint64).
MAX_REQUEST_ID: Final = 2**64 - 1
#: Length of a cache key (SHA-256).
KEY_BYTES: Final = 32
#: Bytes read from a socket per call.
RECV_BYTES: Final = 64 * 1024
#: Buffers handed to one sendmsg() call.
MAX_SEND_BUFFERS: Final = 64
#: Seconds between two checks that the service thread is alive while rotate() waits.
ROTATE_CHECK_INTERVAL: Final = 0.5
#: Seconds a client waits for an answer (connecting included) before SignerUnavailable.
DEFAULT_SIGN_TIMEOUT: Final = 5.0
#: The service thread goes round at least this often (seconds), idle or not; the time of its
#: last round (:attr:`SignerService.last_round`) is the signer process's heartbeat.
HEARTBEAT_ROUND: Final = 1.0
#: Requests one client has on the wire at once; more wait for a free slot.
MAX_IN_FLIGHT: Final = 256
#: First and longest pause between two attempts to connect to a restarting signer.
CONNECT_RETRY_INITIAL: Final = 0.02
CONNECT_RETRY_MAX: Final = 0.5
#: Times a client re-sends a request whose connection was lost before the answer came.
MAX_RESENDS: Final = 2

_LENGTH: Final = struct.Struct(">I")
_REQUEST_FIELDS: Final = frozenset({"id", "dns_names", "ip_addresses", "not_after", "key"})


class SignerCache(Protocol):
    """What the service needs of the shared cache: its writer's get, put and clear."""

    def get(self, key: bytes) -> bytes | None: ...

    def put(self, key: bytes, der: bytes) -> None: ...

    def clear(self) -> None: ...


class SignerUnavailable(TlsgateError):
    """The signer service cannot be reached or did not answer in time."""


class SignerRejected(TlsgateError, ValueError):
    """The signer refused a request (a ValueError, as :meth:`LeafSigner.sign` raises)."""


# -- wire format (pure) ----------------------------------------------------------------


class _Unanswerable(Exception):
    """A frame without a usable id: the connection is closed."""


class _Invalid(Exception):
    """A request with a usable id and a defect: answered with an error."""

    def __init__(self, request_id: int, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id


def _frame(message: dict[str, Any]) -> bytes:
    """``message`` as one frame: length prefix and msgpack map."""
    body = msgpack.packb(message, use_bin_type=True)
    return _LENGTH.pack(len(body)) + body


def _encode_request(request_id: int, request: LeafRequest, key: bytes) -> bytes:
    """The frame asking for a leaf; SignerRejected if the signer would refuse its shape."""
    if len(key) != KEY_BYTES:
        raise SignerRejected(f"cache keys are {KEY_BYTES} bytes, not {len(key)}")
    if request.not_after.utcoffset() is None:
        raise SignerRejected(f"not_after must be timezone-aware, got {request.not_after!r}")
    data = _frame(
        {
            "id": request_id,
            "dns_names": list(request.dns_names),
            "ip_addresses": list(request.ip_addresses),
            "not_after": int(request.not_after.timestamp()),
            "key": key,
        }
    )
    if len(data) - _LENGTH.size > MAX_REQUEST_BYTES:
        raise SignerRejected(
            f"a leaf request is at most {MAX_REQUEST_BYTES} bytes; this one has"
            f" {len(request.dns_names) + len(request.ip_addresses)} names in {len(data)} bytes"
        )
    return data


def _decode_request(body: bytes) -> tuple[int, LeafRequest, bytes]:
    """``(id, request, key)`` from a request body; raises _Unanswerable or _Invalid."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise _Unanswerable(f"not msgpack: {exc}") from None
    if not isinstance(message, dict):
        raise _Unanswerable(f"a request is a map, not {type(message).__name__}")
    request_id = message.get("id")
    if type(request_id) is not int or not 0 <= request_id <= MAX_REQUEST_ID:
        raise _Unanswerable("a request needs an unsigned integer id")
    if message.keys() != _REQUEST_FIELDS:
        wrong = sorted(message.keys() ^ _REQUEST_FIELDS)
        raise _Invalid(request_id, f"a request has exactly the fields {sorted(_REQUEST_FIELDS)};"
                       f" this one differs in {wrong}")  # fmt: skip
    dns_names = _strings(request_id, message["dns_names"], "dns_names", MAX_DNS_NAME_CHARS)
    ip_addresses = _strings(request_id, message["ip_addresses"], "ip_addresses", MAX_IP_CHARS)
    count = len(dns_names) + len(ip_addresses)
    if not 1 <= count <= MAX_LEAF_NAMES:
        raise _Invalid(request_id, f"a leaf covers 1 to {MAX_LEAF_NAMES} names, not {count}")
    not_after = message["not_after"]
    if type(not_after) is not int or not 0 < not_after <= MAX_NOT_AFTER:
        raise _Invalid(request_id, "not_after must be unix seconds between 1970 and 9999")
    key = message["key"]
    if type(key) is not bytes or len(key) != KEY_BYTES:
        raise _Invalid(request_id, f"key must be {KEY_BYTES} bytes")
    request = LeafRequest(dns_names, ip_addresses, datetime.fromtimestamp(not_after, UTC))
    return request_id, request, key


def _strings(request_id: int, value: object, field: str, max_chars: int) -> tuple[str, ...]:
    if type(value) is not list or len(value) > MAX_LEAF_NAMES:
        raise _Invalid(request_id, f"{field} must be a list of at most {MAX_LEAF_NAMES} strings")
    for item in value:
        if type(item) is not str or len(item) > max_chars:
            raise _Invalid(request_id, f"{field} holds strings of at most {max_chars} characters")
    return tuple(value)


def _decode_response(body: bytes) -> tuple[int, bytes | None, str | None]:
    """``(id, der, error)`` from an answer body (one of der/error is set); ValueError if bad."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"the signer's answer is not msgpack: {exc}") from None
    if not isinstance(message, dict) or type(message.get("id")) is not int:
        raise ValueError("the signer's answer is not a map with an integer id")
    der, error = message.get("der"), message.get("error")
    if type(der) is bytes and der and error is None:
        return message["id"], der, None
    if type(error) is str and der is None:
        return message["id"], None, error
    raise ValueError("the signer's answer carries neither a certificate nor an error")


# -- the service -------------------------------------------------------------------------


class _Request:
    __slots__ = ("conn", "key", "request", "request_id")

    def __init__(
        self, conn: _Connection, request_id: int, request: LeafRequest, key: bytes
    ) -> None:
        self.conn = conn
        self.request_id = request_id
        self.request = request
        self.key = key


class _Rotation:
    """A rotate() call waiting for the service thread."""

    __slots__ = ("done", "error", "signer")

    def __init__(self, signer: Signer) -> None:
        self.signer = signer
        self.done = threading.Event()
        self.error: Exception | None = None


class _Connection:
    """One worker's connection: its unparsed bytes and its queued answers."""

    __slots__ = ("closed", "fd", "inbuf", "interest", "logged", "on_ready", "out", "out_bytes",
                 "out_offset", "peer", "sock")  # fmt: skip

    def __init__(
        self, sock: socket.socket, peer: str, handler: Callable[[_Connection, int], None]
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.on_ready: Callable[[int], None] = lambda mask: handler(self, mask)
        self.inbuf = bytearray()
        self.out: deque[bytes] = deque()
        #: Bytes of ``out[0]`` already sent.
        self.out_offset = 0
        #: Bytes in ``out`` not yet sent.
        self.out_bytes = 0
        #: The selector events registered for this connection.
        self.interest = selectors.EVENT_READ
        #: A defect of this peer was logged already (later ones are only counted).
        self.logged = False
        self.closed = False

    def has_request(self) -> bool:
        """A whole frame (or an oversized length) is buffered."""
        buf = self.inbuf
        if len(buf) < _LENGTH.size:
            return False
        (length,) = _LENGTH.unpack_from(buf)
        return length > MAX_REQUEST_BYTES or len(buf) >= _LENGTH.size + length


class SignerServer(SelectorService):
    """Answers leaf requests from the workers over a Unix socket, on its own thread.

    ``SignerServer(...)``, :meth:`start`, ..., :meth:`stop`. ``signer`` is the only object
    holding the CA key; ``cache`` is the shared cache's writer.
    """

    thread_name = "tlsgate-signer"
    failure_consequence = "workers can no longer mint certificates"

    def __init__(
        self,
        signer: Signer,
        cache: SignerCache,
        socket_path: Path,
        *,
        socket_mode: int = 0o600,
        owner_uid: int | None = None,
        owner_gid: int | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        super().__init__()
        #: Who signs (changed only by :meth:`rotate`, between two rounds).
        self.signer = signer
        self.cache: Final = cache
        self.socket_path: Final = socket_path
        self.socket_mode: Final = socket_mode
        self.owner_uid: Final = owner_uid
        self.owner_gid: Final = owner_gid
        self._max_connections = max_connections
        #: monotonic time of the service thread's last round (its heartbeat)
        self.last_round = time.monotonic()
        #: Requests decoded (well-formed or not, as long as they had an id).
        self.requests = 0
        #: Leaves signed by this service.
        self.signed = 0
        #: Requests answered without a signature of their own (cache, or same round).
        self.coalesced = 0
        #: Requests answered with an error.
        self.rejected = 0
        #: Connections closed for a protocol violation.
        self.dropped = 0
        self._connections: dict[int, _Connection] = {}
        self._ready: dict[int, _Connection] = {}
        self._packer = msgpack.Packer(use_bin_type=True)
        self._rotations: deque[_Rotation] = deque()
        self._cache_failing = False

    # -- control (any thread) ----------------------------------------------------------

    def start(self) -> None:
        """Create the socket and start the service thread; OperatorError on failure."""

        def set_up() -> None:
            listener = create_unix_listener(
                self.socket_path, "signer", self.socket_mode,
                uid=self.owner_uid, gid=self.owner_gid,
            )  # fmt: skip
            self._listen(listener.sock, "signer socket", self._on_accepted, listener.close)

        self._start_service(set_up)

    def rotate(self, signer: Signer) -> None:
        """Sign with ``signer`` (a new CA) from now on, and empty the cache.

        Both happen on the service thread between two rounds, so no leaf of the old CA
        is answered or cached afterwards; workers keep their connections. Returns when
        done.
        """
        if not self.running:
            self._rotate(signer)
            return
        rotation = _Rotation(signer)
        self._rotations.append(rotation)
        self._wake()
        while not rotation.done.wait(ROTATE_CHECK_INTERVAL):
            if not self.running:  # the thread died (logged): nobody else signs any more
                self._rotate(signer)
                return
        if rotation.error is not None:
            raise rotation.error

    def _rotate(self, signer: Signer) -> None:
        self.signer = signer
        self.cache.clear()

    def stats(self) -> dict[str, int]:
        """Counters: requests, signed, coalesced, rejected, dropped, connections."""
        return {
            "requests": self.requests,
            "signed": self.signed,
            "coalesced": self.coalesced,
            "rejected": self.rejected,
            "dropped": self.dropped,
            "connections": len(self._connections),
        }

    # -- the service thread ------------------------------------------------------------

    def _select_timeout(self) -> float | None:
        # at least one round a second, idle or not: last_round is the signer's heartbeat
        return 0 if self._ready else HEARTBEAT_ROUND

    def _tick(self) -> None:
        self.last_round = time.monotonic()
        while self._rotations:
            rotation = self._rotations.popleft()
            try:
                self._rotate(rotation.signer)
            except Exception as exc:
                rotation.error = exc  # raised to the caller of rotate()
            finally:
                rotation.done.set()
        if self._ready and not self._stopping:
            self._serve_round()

    def _on_accepted(self, sock: socket.socket, address: object) -> None:
        if len(self._connections) >= self._max_connections:
            logger.warning(
                "the signer refused a connection: %d are open already", len(self._connections)
            )
            sock.close()
            return
        conn = _Connection(sock, peer_name(sock), self._on_connection)
        self._connections[conn.fd] = conn
        assert self._selector is not None
        self._selector.register(sock, selectors.EVENT_READ, conn.on_ready)

    def _on_connection(self, conn: _Connection, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if conn.closed or not mask & selectors.EVENT_READ:
            return
        try:
            data = conn.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            logger.info("signer connection from %s failed: %s", conn.peer, exc)
            self._close(conn)
            return
        if not data:
            self._close(conn)  # the worker went away; answers are of no use to anyone
            return
        conn.inbuf += data
        if conn.has_request():
            self._ready[conn.fd] = conn
        self._update_interest(conn)

    def _serve_round(self) -> None:
        """Decode what the ready connections sent, then answer it key by key."""
        batch: list[_Request] = []
        ready, self._ready = self._ready, {}
        for conn in ready.values():
            if not conn.closed:
                self._take_requests(conn, batch)
        minted: dict[bytes, bytes] = {}
        for item in batch:
            if item.conn.closed:
                continue
            der = minted.get(item.key)
            if der is not None:
                self.coalesced += 1
            else:
                der = self._cached(item.key)
                if der is not None:
                    self.coalesced += 1
                else:
                    der = self._mint(item)
                    if der is None:
                        continue
                minted[item.key] = der
            self._answer(item.conn, {"id": item.request_id, "der": der})
        for conn in ready.values():
            if not conn.closed:
                self._flush(conn)
                if conn.has_request() and conn.out_bytes < MAX_OUTPUT_BYTES:
                    self._ready[conn.fd] = conn

    def _take_requests(self, conn: _Connection, batch: list[_Request]) -> None:
        buf = conn.inbuf
        offset = 0
        taken = 0
        try:
            while taken < MAX_REQUESTS_PER_ROUND and conn.out_bytes < MAX_OUTPUT_BYTES:
                if len(buf) - offset < _LENGTH.size:
                    break
                (length,) = _LENGTH.unpack_from(buf, offset)
                if length > MAX_REQUEST_BYTES:
                    raise _Unanswerable(
                        f"a frame of {length} bytes (at most {MAX_REQUEST_BYTES} are allowed)"
                    )
                end = offset + _LENGTH.size + length
                if len(buf) < end:
                    break
                body = bytes(buf[offset + _LENGTH.size : end])
                offset = end
                taken += 1
                try:
                    request_id, request, key = _decode_request(body)
                except _Invalid as exc:
                    self.requests += 1
                    self._reject(conn, exc.request_id, f"invalid request: {exc}")
                    continue
                self.requests += 1
                batch.append(_Request(conn, request_id, request, key))
        except _Unanswerable as exc:
            self.dropped += 1
            logger.warning("closing the signer connection from %s: it sent %s", conn.peer, exc)
            self._close(conn)
            return
        finally:
            del buf[:offset]
        self._update_interest(conn)

    def _cached(self, key: bytes) -> bytes | None:
        try:
            der = self.cache.get(key)
        except Exception:
            self._cache_failed("read")
            return None
        return der

    def _mint(self, item: _Request) -> bytes | None:
        try:
            der = self.signer.sign(item.request).public_bytes(Encoding.DER)
        except ValueError as exc:
            self._reject(item.conn, item.request_id, f"cannot sign: {exc}")
            return None
        except Exception as exc:
            logger.exception("signing a leaf for %s failed", item.request.dns_names[:1])
            self._reject(item.conn, item.request_id, f"signing failed: {exc}")
            return None
        self.signed += 1
        try:
            self.cache.put(item.key, der)
        except Exception:
            self._cache_failed("write")
        else:
            if self._cache_failing:
                self._cache_failing = False
                logger.warning("the shared certificate cache works again")
        return der

    def _cache_failed(self, what: str) -> None:
        if not self._cache_failing:
            self._cache_failing = True
            logger.exception(
                "cannot %s the shared certificate cache; leaves are minted without it"
                " (workers re-request them) until it works again",
                what,
            )

    def _reject(self, conn: _Connection, request_id: int, message: str) -> None:
        self.rejected += 1
        if not conn.logged:
            conn.logged = True
            logger.warning(
                "signer request from %s refused (%s); further refusals on this"
                " connection are only counted",
                conn.peer,
                message,
            )
        self._answer(conn, {"id": request_id, "error": message})

    def _answer(self, conn: _Connection, message: dict[str, Any]) -> None:
        body = self._packer.pack(message)
        conn.out.append(_LENGTH.pack(len(body)) + body)
        conn.out_bytes += _LENGTH.size + len(body)

    def _flush(self, conn: _Connection) -> None:
        out = conn.out
        while out:
            head: bytes | memoryview = out[0]
            if conn.out_offset:
                head = memoryview(head)[conn.out_offset :]
            try:
                sent = conn.sock.sendmsg([head, *itertools.islice(out, 1, MAX_SEND_BUFFERS)])
            except BlockingIOError:
                break
            except OSError as exc:
                logger.info("signer connection from %s failed: %s", conn.peer, exc)
                self._close(conn)
                return
            conn.out_bytes -= sent
            sent += conn.out_offset
            while out and sent >= len(out[0]):
                sent -= len(out.popleft())
            conn.out_offset = sent
            if sent:
                break  # partly taken: the socket buffer is full
        self._update_interest(conn)
        if conn.out_bytes < MAX_OUTPUT_BYTES and conn.has_request():
            self._ready[conn.fd] = conn

    def _update_interest(self, conn: _Connection) -> None:
        if conn.closed:
            return
        events = 0
        if conn.out_bytes < MAX_OUTPUT_BYTES and len(conn.inbuf) < _LENGTH.size + MAX_REQUEST_BYTES:
            events |= selectors.EVENT_READ
        if conn.out:
            events |= selectors.EVENT_WRITE
        if events == conn.interest:
            return
        assert self._selector is not None
        if conn.interest and events:
            self._selector.modify(conn.sock, events, conn.on_ready)
        elif events:
            self._selector.register(conn.sock, events, conn.on_ready)
        else:
            self._selector.unregister(conn.sock)
        conn.interest = events

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._connections.pop(conn.fd, None)
        self._ready.pop(conn.fd, None)
        if conn.interest:
            self._unregister(conn.sock)
        conn.interest = 0
        conn.sock.close()

    def _close_connections(self) -> None:
        for conn in list(self._connections.values()):
            self._close(conn)


# -- the client ----------------------------------------------------------------------------


class _ConnectionLost(Exception):
    """The connection closed before the answer came (the request may be re-sent)."""


class _ClientProtocol(asyncio.Protocol):
    """One connection to the signer: writes requests, resolves the futures of answers."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.lost = False
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        offset = 0
        try:
            while len(buf) - offset >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(buf, offset)
                if length > MAX_RESPONSE_BYTES:
                    raise ValueError(f"the signer sent a frame of {length} bytes")
                end = offset + _LENGTH.size + length
                if len(buf) < end:
                    break
                request_id, der, error = _decode_response(bytes(buf[offset + _LENGTH.size : end]))
                offset = end
                future = self.pending.pop(request_id, None)
                if future is None or future.done():
                    continue  # its caller gave up (timeout)
                if der is not None:
                    future.set_result(der)
                else:
                    future.set_exception(SignerRejected(f"the signer refused: {error}"))
        except ValueError as exc:
            logger.error("dropping the connection to the signer: %s", exc)
            assert self.transport is not None
            self.transport.abort()
        finally:
            del buf[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(_ConnectionLost(str(exc or "closed by the signer")))


class SignerClient:
    """A worker's connection to the signer service (asyncio; one per event loop).

    :meth:`sign` (alias :meth:`mint`, so that it is a ``Minter``) returns the DER of a
    leaf for ``request`` that the signer also stored under ``key`` in the shared cache.
    """

    def __init__(
        self,
        socket_path: Path,
        *,
        sock: socket.socket | None = None,
        timeout: float = DEFAULT_SIGN_TIMEOUT,
    ) -> None:
        self.socket_path: Final = socket_path
        self.timeout: Final = timeout
        #: A connection made for us (by the supervisor, before we dropped root), used first.
        self._handed = sock
        self._ids = itertools.count(1)
        self._protocol: _ClientProtocol | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._slots: asyncio.Semaphore | None = None
        self._last_error = "no answer yet"
        self._blocking: socket.socket | None = None
        self._blocking_lock = threading.Lock()
        self._closed = False

    async def sign(self, request: LeafRequest, key: bytes) -> bytes:
        """DER of a leaf for ``request``; SignerUnavailable, SignerRejected."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        assert self._slots is not None and self._connect_lock is not None
        request_id = next(self._ids)
        data = _encode_request(request_id, request, key)  # refused here, before any I/O
        try:
            async with asyncio.timeout(self.timeout), self._slots:
                for _ in range(MAX_RESENDS + 1):
                    protocol = await self._connected()
                    future: asyncio.Future[bytes] = loop.create_future()
                    protocol.pending[request_id] = future
                    assert protocol.transport is not None
                    protocol.transport.write(data)
                    try:
                        return await future
                    except _ConnectionLost as exc:
                        self._last_error = f"connection lost: {exc}"
                    finally:
                        protocol.pending.pop(request_id, None)
        except TimeoutError:
            raise SignerUnavailable(
                f"the signer service at {self.socket_path} did not answer within"
                f" {self.timeout:g} s ({self._last_error}); is the supervisor running?"
            ) from None
        raise SignerUnavailable(
            f"the signer service at {self.socket_path} closed the connection"
            f" {MAX_RESENDS + 1} times before answering ({self._last_error})"
        )

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not None:
            raise RuntimeError(
                "a SignerClient belongs to the event loop it first signed on; make one per loop"
            )
        self._loop = loop
        self._connect_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def mint(self, request: LeafRequest, key: bytes) -> bytes:
        """The workers' ``Minter`` interface: same as :meth:`sign`."""
        return await self.sign(request, key)

    async def _connected(self) -> _ClientProtocol:
        protocol = self._protocol
        if protocol is not None and not protocol.lost:
            return protocol
        if self._closed:
            raise SignerUnavailable("this signer client was closed")
        assert self._connect_lock is not None
        async with self._connect_lock:
            protocol = self._protocol
            if protocol is not None and not protocol.lost:
                return protocol  # another caller connected while this one waited
            loop = asyncio.get_running_loop()
            handed, self._handed = self._handed, None
            if handed is not None:
                _, protocol = await loop.create_unix_connection(_ClientProtocol, sock=handed)
                self._protocol = protocol
                return protocol
            delay = CONNECT_RETRY_INITIAL
            while True:
                try:
                    _, protocol = await loop.create_unix_connection(
                        _ClientProtocol, str(self.socket_path)
                    )
                except PermissionError as exc:
                    raise SignerUnavailable(
                        f"no permission to connect to the signer socket {self.socket_path}"
                        f" ({exc.strerror}): the supervisor sets its owner and mode"
                    ) from exc
                except OSError as exc:
                    # Not there or not listening: the signer is (re)starting. Try again
                    # until the caller's timeout.
                    self._last_error = f"cannot connect: {exc.strerror or exc}"
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, CONNECT_RETRY_MAX)
                    continue
                self._protocol = protocol
                return protocol

    def close(self) -> None:
        """Close the connections for good (pending :meth:`sign` calls raise SignerUnavailable)."""
        self._closed = True
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
        if self._handed is not None:
            self._handed.close()
            self._handed = None
        with self._blocking_lock:
            if self._blocking is not None:
                self._blocking.close()
                self._blocking = None

    # -- blocking (tests, tools) -------------------------------------------------------

    def sign_blocking(self, request: LeafRequest, key: bytes) -> bytes:
        """:meth:`sign` for code without an event loop (one request at a time)."""
        with self._blocking_lock:
            for attempt in range(MAX_RESENDS + 1):
                request_id = next(self._ids)
                data = _encode_request(request_id, request, key)
                try:
                    sock = self._blocking_socket()
                    sock.sendall(data)
                    while True:
                        answer_id, der, error = _decode_response(_recv_frame(sock))
                        if answer_id == request_id:
                            break
                except (OSError, EOFError) as exc:
                    self._drop_blocking()
                    if isinstance(exc, TimeoutError) or attempt == MAX_RESENDS:
                        raise SignerUnavailable(
                            f"the signer service at {self.socket_path} is unavailable: {exc}"
                        ) from exc
                    continue
                except ValueError as exc:
                    self._drop_blocking()
                    raise SignerUnavailable(f"the signer service misbehaved: {exc}") from exc
                if der is not None:
                    return der
                raise SignerRejected(f"the signer refused: {error}")
        raise AssertionError("unreachable")

    def _blocking_socket(self) -> socket.socket:
        if self._closed:
            raise SignerUnavailable("this signer client was closed")
        if self._blocking is None:
            sock, self._handed = self._handed, None
            if sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(self.timeout)
                    sock.connect(str(self.socket_path))
                except OSError:
                    sock.close()
                    raise
            sock.settimeout(self.timeout)
            self._blocking = sock
        return self._blocking

    def _drop_blocking(self) -> None:
        if self._blocking is not None:
            self._blocking.close()
            self._blocking = None


def _recv_frame(sock: socket.socket) -> bytes:
    (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
    if length > MAX_RESPONSE_BYTES:
        raise ValueError(f"the signer sent a frame of {length} bytes")
    return _recv_exactly(sock, length)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise EOFError("the signer closed the connection")
        buf += chunk
    return bytes(buf)
