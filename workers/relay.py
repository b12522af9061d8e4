"""Moving bytes both ways between a client and its upstream, with backpressure.

Rules:
- Two :class:`Pipe` objects per connection: client→upstream and upstream→client. A pipe
  reads from its source only while it has nothing pending for its destination: a slow
  reader on one side stops us reading the other side (at most one TLS record, 16 KiB, is
  ever held per direction — no buffer a peer can grow).
- Endpoints hide whether a side is TLS (socket-backed pyOpenSSL ``Connection``) or a
  plain TCP socket (spliced connections). Socket-backed pyOpenSSL was chosen over memory
  BIOs by measurement: 1.7 vs 2.2–3.0 CPU-s/GB (shared/notes/python-tls-performance.md).
- End of stream in one direction is forwarded (TLS close_notify, or TCP FIN) once what
  is pending has been written; the other direction keeps flowing (half-close). The relay
  is finished when both directions are finished, or at the first error.
- Every decrypted chunk is handed, uncopied, to the direction's ``inspect`` callback
  before it is written on; an inspector that raises ends the connection (fail closed).
- This module registers callbacks on the event loop; it never blocks and never sleeps.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

#: TLS read size: OpenSSL returns at most one record (16 KiB of plaintext) per SSL_read.
READ_SIZE = 16384
#: Plain TCP read size (spliced connections).
TCP_READ_SIZE = 65536
#: A read that returns a full record suggests more is buffered: keep reading up to this much
#: per readiness event before yielding to other connections.
READ_BUDGET = 256 * 1024
FULL_RECORD = 16384

log = logging.getLogger(__name__)

_SSL_read = _lib.SSL_read
_SSL_write = _lib.SSL_write
_SSL_pending = _lib.SSL_pending
_SSL_get_error = _lib.SSL_get_error
_WANT_READ = _lib.SSL_ERROR_WANT_READ
_WANT_WRITE = _lib.SSL_ERROR_WANT_WRITE
#: One read buffer for every connection of the worker: the event loop runs one call at a
#: time and each read is copied out (into the bytes handed on) before the next.
_READ_BUFFER = _ffi.new("char[]", READ_SIZE)


class EndpointError(Exception):
    """A side of the relay failed; ``reason`` is a short token for the close event."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WouldBlock(Exception):
    """Internal: the endpoint cannot make progress until its socket is readable/writable."""

    def __init__(self, want_read: bool) -> None:
        self.want_read = want_read


class TlsEndpoint:
    """A side spoken to through a socket-backed pyOpenSSL Connection.

    The data path calls ``SSL_read``/``SSL_write`` through pyOpenSSL's own cffi bindings
    (its private ``_ssl``, as the upstream validator does) instead of ``Connection.recv``
    and ``send``: those allocate a 64 KiB buffer per read, and check three callback helpers
    and call ``SSL_get_error`` after every call, successful or not — about a quarter of a
    keep-alive request's TLS-call cost (docs/performance.md). Only success and
    WANT_READ/WANT_WRITE take the short path; every other outcome goes through pyOpenSSL's
    ``_raise_ssl_error``, so errors are classified exactly as before.
    """

    __slots__ = ("_ssl", "conn", "fd", "name", "sock")

    def __init__(self, name: str, sock: socket.socket, conn: SSL.Connection) -> None:
        self.name = name
        self.sock = sock
        self.conn = conn
        self.fd = sock.fileno()
        self._ssl = conn._ssl  # private pyOpenSSL internals, see upstream.check_private_api

    def recv(self) -> bytes:
        """Plaintext, ``b""`` at end of stream; raises WouldBlock or EndpointError."""
        ssl = self._ssl
        n = _SSL_read(ssl, _READ_BUFFER, READ_SIZE)
        if n > 0:
            return _ffi.buffer(_READ_BUFFER, n)[:]
        code = _SSL_get_error(ssl, n)
        if code == _WANT_READ:
            raise WouldBlock(True)
        if code == _WANT_WRITE:
            raise WouldBlock(False)
        try:
            self.conn._raise_ssl_error(ssl, n)  # pyOpenSSL's classification (not WANT_*)
        except SSL.ZeroReturnError:
            return b""
        except SSL.SysCallError as exc:
            if exc.args and exc.args[0] == -1:  # EOF without close_notify
                return b""
            raise EndpointError(f"{self.name}-reset") from None
        except SSL.Error as exc:
            raise EndpointError(f"{self.name}-tls-error: {_ssl_error_text(exc)}") from None
        raise EndpointError(f"{self.name}-tls-error: SSL_read returned {n} without an error")

    def send(self, data: bytes | memoryview) -> int:
        ssl = self._ssl
        n = _SSL_write(ssl, _ffi.from_buffer(data), len(data))
        if n > 0:
            return n
        code = _SSL_get_error(ssl, n)
        if code == _WANT_WRITE:
            raise WouldBlock(False)
        if code == _WANT_READ:
            raise WouldBlock(True)
        try:
            self.conn._raise_ssl_error(ssl, n)  # pyOpenSSL's classification (not WANT_*)
        except SSL.SysCallError:
            raise EndpointError(f"{self.name}-reset") from None
        except SSL.Error as exc:
            raise EndpointError(f"{self.name}-tls-error: {_ssl_error_text(exc)}") from None
        raise EndpointError(f"{self.name}-tls-error: SSL_write returned {n} without an error")

    def close_write(self) -> None:
        """Send close_notify; the peer learns we will send no more."""
        try:
            self.conn.shutdown()
        except (SSL.Error, OSError):
            pass  # the peer is gone or the buffer is full; the TCP close follows anyway

    def pending(self) -> int:
        return _SSL_pending(self._ssl)

    def close(self) -> None:
        self.sock.close()


class TcpEndpoint:
    """A side spoken to in plain TCP (spliced connections)."""

    __slots__ = ("fd", "name", "sock")

    def __init__(self, name: str, sock: socket.socket) -> None:
        self.name = name
        self.sock = sock
        self.fd = sock.fileno()

    def recv(self) -> bytes:
        try:
            return self.sock.recv(TCP_READ_SIZE)
        except BlockingIOError:
            raise WouldBlock(True) from None
        except OSError as exc:
            raise EndpointError(f"{self.name}-{_os_reason(exc)}") from None

    def send(self, data: bytes | memoryview) -> int:
        try:
            return self.sock.send(data)
        except BlockingIOError:
            raise WouldBlock(False) from None
        except OSError as exc:
            raise EndpointError(f"{self.name}-{_os_reason(exc)}") from None

    def close_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already disconnected: nothing left to tell the peer

    def pending(self) -> int:
        return 0

    def close(self) -> None:
        self.sock.close()


Endpoint = TlsEndpoint | TcpEndpoint


def _ssl_error_text(exc: SSL.Error) -> str:
    try:
        return str(exc.args[0][0][2])
    except (IndexError, TypeError):
        return str(exc)


def _os_reason(exc: OSError) -> str:
    if exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return "reset"
    return f"error: {exc.strerror or exc}"


class Pipe:
    """One direction: read from ``src``, inspect, write to ``dst``."""

    __slots__ = ("bytes", "dst", "eof", "finished", "inspect", "pending", "relay", "src")

    def __init__(
        self,
        relay: Relay,
        src: Endpoint,
        dst: Endpoint,
        inspect: Callable[[bytes], None] | None,
    ) -> None:
        self.relay = relay
        self.src = src
        self.dst = dst
        self.inspect = inspect
        self.pending: memoryview | None = None
        self.bytes = 0
        self.eof = False
        self.finished = False


class Relay:
    """Both directions of one connection, driven by event-loop callbacks.

    ``done`` resolves with the close reason (``"client-closed"``, ``"upstream-reset"``,
    ``"idle-timeout"``, ...). ``last_activity`` (loop time) is what the worker's idle sweep
    reads.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: Endpoint,
        upstream: Endpoint,
        *,
        inspect_client: Callable[[bytes], None] | None = None,
        inspect_upstream: Callable[[bytes], None] | None = None,
    ) -> None:
        self.loop = loop
        self.client = client
        self.upstream = upstream
        self.up = Pipe(self, client, upstream, inspect_client)
        self.down = Pipe(self, upstream, client, inspect_upstream)
        self.done: asyncio.Future[str] = loop.create_future()
        self.first_eof: str | None = None
        self.last_activity = loop.time()
        # fd -> what is registered, so that we never double-register or leak a callback
        self._readers: set[int] = set()
        self._writers: set[int] = set()

    # -- lifecycle -------------------------------------------------------------------
    def start(self, initial_client_data: bytes = b"") -> None:
        if initial_client_data:
            self._deliver(self.up, initial_client_data)
        for pipe in (self.up, self.down):
            if pipe.pending is None and not self.done.done():
                self._want_read(pipe)
        # Data OpenSSL already decrypted during the handshake is not visible to epoll.
        for pipe in (self.up, self.down):
            if pipe.src.pending() and not self.done.done():
                self.loop.call_soon(self._on_readable, pipe)

    def stop(self, reason: str) -> None:
        """End the relay now (idle timeout, shutdown, error)."""
        if self.done.done():
            return
        for fd in self._readers:
            self.loop.remove_reader(fd)
        for fd in self._writers:
            self.loop.remove_writer(fd)
        self._readers.clear()
        self._writers.clear()
        self.done.set_result(reason)

    # -- registration ------------------------------------------------------------------
    def _want_read(self, pipe: Pipe) -> None:
        fd = pipe.src.fd
        if fd in self._readers:
            # the other pipe reads the same endpoint only when src is dst of the other, which
            # never happens: each endpoint is src of exactly one pipe
            return
        self._readers.add(fd)
        self.loop.add_reader(fd, self._on_readable, pipe)

    def _unwant_read(self, pipe: Pipe) -> None:
        fd = pipe.src.fd
        if fd in self._readers:
            self._readers.discard(fd)
            self.loop.remove_reader(fd)

    def _want_write(self, pipe: Pipe, on_dst_read: bool) -> None:
        # A TLS write that wants a read (renegotiation, never offered) is retried when the
        # destination socket becomes readable through the other pipe's reader.
        fd = pipe.dst.fd
        if on_dst_read:
            return
        if fd not in self._writers:
            self._writers.add(fd)
            self.loop.add_writer(fd, self._on_writable, pipe)

    def _unwant_write(self, pipe: Pipe) -> None:
        fd = pipe.dst.fd
        if fd in self._writers:
            self._writers.discard(fd)
            self.loop.remove_writer(fd)

    # -- data path -----------------------------------------------------------------------
    def _on_readable(self, pipe: Pipe) -> None:
        if self.done.done() or pipe.pending is not None or pipe.eof:
            return
        src = pipe.src
        budget = READ_BUDGET
        try:
            while budget > 0:
                try:
                    data = src.recv()
                except WouldBlock as wb:
                    if not wb.want_read:
                        # TLS read needs to write (KeyUpdate answer) and the socket is full
                        self._unwant_read(pipe)
                        self.loop.call_later(0.001, self._resume_read, pipe)
                    break
                if not data:
                    self._on_eof(pipe)
                    return
                self.last_activity = self.loop.time()
                if not self._deliver(pipe, data):
                    return
                budget -= len(data)
                if len(data) < FULL_RECORD and not src.pending():
                    break
            else:
                # budget used up: give other connections a turn, continue soon
                self._unwant_read(pipe)
                self.loop.call_soon(self._resume_read, pipe)
        except EndpointError as exc:
            self.stop(exc.reason)
        # a blocked write in the other direction that needed this endpoint's reads
        other = self.down if pipe is self.up else self.up
        if other.pending is not None and other.dst is src:
            self._flush(other)

    def _resume_read(self, pipe: Pipe) -> None:
        if self.done.done() or pipe.pending is not None or pipe.eof:
            return
        self._want_read(pipe)
        self._on_readable(pipe)

    def _deliver(self, pipe: Pipe, data: bytes) -> bool:
        """Inspect and write ``data``; False when the pipe is now blocked or the relay over."""
        pipe.bytes += len(data)
        if pipe.inspect is not None:
            try:
                pipe.inspect(data)
            except EndpointError as exc:
                self.stop(exc.reason)
                return False
            except Exception:
                # A bug in an inspector costs this connection (closed, never passed through
                # uninspected), not the worker; the traceback is for whoever fixes it.
                log.exception("inspector failed on %d bytes; closing the connection", len(data))
                self.stop("inspector-error")
                return False
        try:
            sent = pipe.dst.send(data)
        except WouldBlock as wb:
            pipe.pending = memoryview(data)
            self._unwant_read(pipe)
            self._want_write(pipe, wb.want_read)
            return False
        except EndpointError as exc:
            self.stop(exc.reason)
            return False
        if sent < len(data):
            pipe.pending = memoryview(data)[sent:]
            self._unwant_read(pipe)
            self._want_write(pipe, False)
            return False
        return True

    def _on_writable(self, pipe: Pipe) -> None:
        if self.done.done():
            return
        self._flush(pipe)

    def _flush(self, pipe: Pipe) -> None:
        pending = pipe.pending
        if pending is None:
            self._unwant_write(pipe)
            return
        try:
            while pending:
                sent = pipe.dst.send(pending)
                pending = pending[sent:]
        except WouldBlock as wb:
            pipe.pending = pending
            if wb.want_read:
                self._unwant_write(pipe)
            else:
                self._want_write(pipe, False)
            return
        except EndpointError as exc:
            self.stop(exc.reason)
            return
        pipe.pending = None
        self._unwant_write(pipe)
        self.last_activity = self.loop.time()
        if pipe.eof:
            self._finish(pipe)
        else:
            self._want_read(pipe)
            if pipe.src.pending():
                self.loop.call_soon(self._on_readable, pipe)

    def _on_eof(self, pipe: Pipe) -> None:
        pipe.eof = True
        self._unwant_read(pipe)
        if self.first_eof is None:
            self.first_eof = "client-closed" if pipe is self.up else "upstream-closed"
        if pipe.pending is None:
            self._finish(pipe)

    def _finish(self, pipe: Pipe) -> None:
        pipe.finished = True
        pipe.dst.close_write()
        if self.up.finished and self.down.finished:
            self.stop(self.first_eof or "closed")
