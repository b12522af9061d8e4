"""Real TLS test servers on 127.0.0.1, each in its own thread (pyOpenSSL, so anything goes).

Rules of this module (other test files rely on them):

- ``with TLSServer(chain, key, ...) as server:`` listens on ``127.0.0.1:0`` and serves until
  the block ends; ``server.address`` is ``(host, port)``. On exit it stops accepting, wakes
  every connection thread, and joins them all (nothing outlives the ``with``).
- Every connection: TLS handshake, then read one HTTP request head (at most
  ``MAX_REQUEST_BYTES``; EOF is fine), write ``response``, send close_notify, close. No
  fixed sleeps: threads block in ``select`` on the socket and a wake-up socket, and give up
  after ``CONNECTION_DEADLINE`` seconds.
- Server-side failures never raise in the test thread. Handshake failures are recorded as
  strings in ``server.errors`` (expected whenever the client refuses the server); a client
  hanging up after its handshake is not an error.
- Knobs (each makes the server do one possibly-bad thing):
  ``chain`` (certificates to send, leaf first; send fewer to omit the intermediate),
  ``key`` (the leaf's private key), ``min_version``/``max_version`` (``SSL.TLS1_VERSION``...),
  ``cipher_list`` (TLS <= 1.2 ciphers; ``@SECLEVEL=0`` is added so weak ones load),
  ``dh_params`` (PEM path, for DHE ciphers; see :func:`write_dh_params`),
  ``ocsp_staple`` (DER bytes to staple, ``None``: no stapling),
  ``request_client_cert`` / ``require_client_cert`` (send a CertificateRequest; fail the
  handshake without a certificate), ``alpn`` (protocols the server accepts, in its order of
  preference), ``groups`` (the key-exchange groups the server accepts, an OpenSSL group
  list such as ``b"secp256r1"``), ``response`` (bytes written after the request head).
- Observations: ``handshakes`` (completed server handshakes), ``errors``,
  ``staple_requests`` (times the client asked for a staple), ``negotiated_alpn``
  (last selected ALPN protocol or ``None``), ``server_names`` (the SNI of each
  ClientHello, ``None`` when absent), ``client_hellos`` (each connection's first ClientHello,
  parsed, peeked before the handshake), ``groups_chosen`` (the group each completed
  handshake used, OpenSSL's name).
- :func:`write_dh_params` writes a hard-coded 1024-bit group (RFC 2409 Oakley group 2):
  generating DH parameters would take seconds.
"""

from __future__ import annotations

import base64
import functools
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from tlsgate.workers.clienthello import (
    ClientHello,
    ClientHelloError,
    client_hello_end,
    parse_client_hello,
)

_T = TypeVar("_T")

MAX_REQUEST_BYTES = 64 * 1024
CONNECTION_DEADLINE = 10.0
JOIN_TIMEOUT = 10.0
DEFAULT_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n"
    b"connection: close\r\n\r\nok\n"
)

# RFC 2409 section 6.2, the 1024-bit MODP group ("Oakley group 2"), generator 2.
_OAKLEY_GROUP_2 = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A0879"
    "8E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0"
    "BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE65381FFFFFFFFFFFFFFFF",
    16,
)


def _der_integer(value: int) -> bytes:
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")  # leading 0: stays positive
    return b"\x02" + _der_length(len(body)) + body


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def write_dh_params(path: Path) -> Path:
    """Write the 1024-bit Oakley group 2 as PEM DH parameters (PKCS #3) to ``path``.

    Encoded by hand: ``cryptography`` deprecates finite-field DH, and warnings are errors.
    """
    body = _der_integer(_OAKLEY_GROUP_2) + _der_integer(2)
    der = b"\x30" + _der_length(len(body)) + body
    b64 = base64.encodebytes(der).decode("ascii")
    path.write_text(f"-----BEGIN DH PARAMETERS-----\n{b64}-----END DH PARAMETERS-----\n")
    return path


class _Stopped(Exception):
    """The server is shutting down; the connection thread must return."""


class TLSServer:
    """A threaded TLS server for one certificate chain; see the module docstring."""

    def __init__(
        self,
        chain: Sequence[x509.Certificate],
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
        *,
        min_version: int | None = None,
        max_version: int | None = None,
        cipher_list: bytes | None = None,
        dh_params: Path | None = None,
        ocsp_staple: bytes | None = None,
        request_client_cert: bool = False,
        require_client_cert: bool = False,
        alpn: Sequence[bytes] | None = None,
        groups: bytes | None = None,
        response: bytes = DEFAULT_RESPONSE,
    ) -> None:
        self.response = response
        self.client_hellos: list[ClientHello] = []
        self.groups_chosen: list[str] = []
        self.handshakes = 0
        self.staple_requests = 0
        self.negotiated_alpn: bytes | None = None
        self.server_names: list[bytes | None] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._ctx = self._context(
            chain,
            key,
            min_version=min_version,
            max_version=max_version,
            cipher_list=cipher_list,
            dh_params=dh_params,
            ocsp_staple=ocsp_staple,
            request_client_cert=request_client_cert or require_client_cert,
            require_client_cert=require_client_cert,
            alpn=alpn,
        )
        if groups is not None:
            self.set_groups(groups)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.setblocking(False)
        self.address: tuple[str, int] = self._listener.getsockname()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)

    def _context(
        self,
        chain: Sequence[x509.Certificate],
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
        *,
        min_version: int | None,
        max_version: int | None,
        cipher_list: bytes | None,
        dh_params: Path | None,
        ocsp_staple: bytes | None,
        request_client_cert: bool,
        require_client_cert: bool,
        alpn: Sequence[bytes] | None,
    ) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        # Security level 0 first: the server must be willing to do everything the client
        # under test has to refuse (1024-bit keys, SHA-1 chains, TLS 1.0, NULL ciphers).
        ctx.set_cipher_list((cipher_list or b"DEFAULT") + b":@SECLEVEL=0")
        if min_version is not None:
            ctx.set_min_proto_version(min_version)
        if max_version is not None:
            ctx.set_max_proto_version(max_version)
        ctx.use_certificate(chain[0])
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(key)
        ctx.check_privatekey()

        def on_server_name(conn: SSL.Connection) -> None:
            with self._lock:
                self.server_names.append(conn.get_servername())

        ctx.set_tlsext_servername_callback(on_server_name)
        if dh_params is not None:
            ctx.load_tmp_dh(str(dh_params).encode())
        if ocsp_staple is not None:
            staple = ocsp_staple

            def staple_cb(conn: SSL.Connection, data: object) -> bytes:
                with self._lock:
                    self.staple_requests += 1
                return staple

            ctx.set_ocsp_server_callback(staple_cb)
        if request_client_cert:
            mode = SSL.VERIFY_PEER
            if require_client_cert:
                mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
            ctx.set_verify(mode, lambda conn, cert, errno, depth, ok: bool(ok))
        if alpn is not None:
            accepted = list(alpn)

            def select(conn: SSL.Connection, offered: list[bytes]) -> bytes:
                for proto in accepted:
                    if proto in offered:
                        with self._lock:
                            self.negotiated_alpn = proto
                        return proto
                return SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]

            ctx.set_alpn_select_callback(select)
        return ctx

    def set_groups(self, groups: bytes) -> None:
        """Change the groups the server accepts (for connections from now on)."""
        if _lib.SSL_CTX_set1_curves_list(self._ctx._context, groups) != 1:
            raise ValueError(f"OpenSSL does not know the groups {groups!r}")

    def __enter__(self) -> TLSServer:
        self._acceptor.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        return self.address[1]

    def stop(self) -> None:
        """Stop accepting, wake and join every thread, close the sockets."""
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            return  # stopped before: the wake socket is closed and every thread joined
        if self._acceptor.is_alive():
            self._acceptor.join(JOIN_TIMEOUT)
        for thread in list(self._threads):
            thread.join(JOIN_TIMEOUT)
        alive = [t for t in self._threads if t.is_alive()] + (
            [self._acceptor] if self._acceptor.is_alive() else []
        )
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        if alive:
            raise RuntimeError(f"TLSServer: {len(alive)} thread(s) did not stop")

    def _record(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        return
                    try:
                        sock, _addr = self._listener.accept()
                    except BlockingIOError:
                        continue
                    thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
                    self._threads.append(thread)
                    thread.start()

    def _wait(self, sock: socket.socket, write: bool, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("connection deadline passed")
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_WRITE if write else selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            for key, _ in sel.select(remaining):
                if key.fileobj is self._wake_r:
                    raise _Stopped
            if self._stopping:
                raise _Stopped

    def _serve(self, sock: socket.socket) -> None:
        deadline = time.monotonic() + CONNECTION_DEADLINE
        sock.setblocking(False)
        conn = SSL.Connection(self._ctx, sock)
        conn.set_accept_state()
        stage = "handshake"
        try:
            self._peek_client_hello(sock, deadline)
            self._drive(conn, sock, conn.do_handshake, deadline)
            name = _lib.SSL_get0_group_name(conn._ssl)
            with self._lock:
                self.handshakes += 1
                if name != _ffi.NULL:
                    self.groups_chosen.append(_ffi.string(name).decode())
            stage = "request"
            request = b""
            while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST_BYTES:
                want = MAX_REQUEST_BYTES - len(request)
                try:
                    chunk = self._drive(conn, sock, functools.partial(conn.recv, want), deadline)
                except (SSL.ZeroReturnError, SSL.SysCallError):
                    break
                if not chunk:
                    break
                request += chunk
            stage = "response"
            view = memoryview(self.response)
            while view:
                sent = self._drive(conn, sock, functools.partial(conn.send, view), deadline)
                view = view[sent:]
            stage = "shutdown"
            conn.shutdown()
        except _Stopped:
            pass  # stop() woke us: the test is over
        except (SSL.Error, OSError) as exc:
            # Clients under test routinely hang up right after their handshake (a refusal,
            # or an accepted check with no request); only handshake failures are news.
            if stage == "handshake":
                self._record(f"handshake: {exc!r}")
        finally:
            sock.close()

    def _peek_client_hello(self, sock: socket.socket, deadline: float) -> None:
        """Record the first ClientHello without consuming it."""
        while True:
            try:
                data = sock.recv(MAX_REQUEST_BYTES, socket.MSG_PEEK)
            except BlockingIOError:
                data = None
            if data == b"":
                return  # the client hung up: the handshake will say so
            if data is not None:
                try:
                    if client_hello_end(data) is not None:
                        break
                except ClientHelloError:
                    return  # not a ClientHello: the handshake fails and says why
            self._wait(sock, False, deadline)
        try:
            hello = parse_client_hello(data)
        except ClientHelloError:
            return
        with self._lock:
            self.client_hellos.append(hello)

    def _drive(
        self, conn: SSL.Connection, sock: socket.socket, op: Callable[[], _T], deadline: float
    ) -> _T:
        while True:
            try:
                return op()
            except SSL.WantReadError:
                self._wait(sock, False, deadline)
            except SSL.WantWriteError:
                self._wait(sock, True, deadline)
