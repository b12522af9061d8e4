"""One intercepted connection, from accept to close.

The order of work is the security design, so it is spelled out here:

1. *Explicit mode*: read the ``CONNECT host:port`` request (peeked, bounded). *Transparent
   mode*: the original destination from the accepted socket.
2. Decide policy on what we know (client address, CONNECT host or SNI): block, bypass
   (splice the raw bytes, no TLS work at all) or intercept.
3. Connect upstream and complete **its** handshake first, validating the server fully
   (:mod:`tlsgate.workers.upstream`). A server that fails validation never gets a minted
   certificate: explicit mode answers ``502`` with the reason before the tunnel exists,
   transparent mode (or a failure after the ``200``) sends a TLS alert. An event says why.
4. Read the client's ClientHello *before* any TLS work (peeked, so a bypass can still
   splice it). If the client's SNI or ALPN offer does not fit the upstream connection made
   for the CONNECT host, a new upstream connection is made and validated for them.
5. Obtain a leaf for the verified name (plus the upstream's DNS SANs), finish the client
   handshake answering the ALPN the upstream selected, then relay and inspect.

Every step is bounded by the handshake timeout; every ending emits ``conn_close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from OpenSSL import SSL

from tlsgate.errors import (
    ClientHelloError,
    ConnectLimitExceeded,
    ConnectRequestError,
    HttpLimitExceeded,
    RemoteProtocolError,
    UpstreamRefused,
)
from tlsgate.supervisor.signer import LeafRequest
from tlsgate.supervisor.signer_service import SignerUnavailable
from tlsgate.workers import events as ev
from tlsgate.workers.appinspect import (
    close_after_protocol_error,
    error_stage,
    event_of,
    new_inspector,
)
from tlsgate.workers.bypass import classify_close, classify_handshake_failure
from tlsgate.workers.certs import ClientSideState
from tlsgate.workers.clienthello import ClientHello, client_hello_end, parse_client_hello
from tlsgate.workers.connect import connect_established, connect_refusal, parse_connect
from tlsgate.workers.http1 import looks_like_http_request
from tlsgate.workers.keyshares import group_name
from tlsgate.workers.limits import set_socket_buffers
from tlsgate.workers.mail import MailDialogue, MailProtocolError, Protocol, new_dialogue
from tlsgate.workers.origdst import original_destination
from tlsgate.workers.pcap import FlowSynthesizer
from tlsgate.workers.policy import Decision
from tlsgate.workers.relay import EndpointError, Relay, TcpEndpoint, TlsEndpoint
from tlsgate.workers.starttls import ClearTextPhase, Next, Step, record_events, summary_fields
from tlsgate.workers.upstream import UpstreamInfo, session_reused
from tlsgate.workers.websocket import DEFAULT_PAYLOAD_CAP

if TYPE_CHECKING:
    from tlsgate.workers.worker import Worker

logger = logging.getLogger(__name__)

#: ALPN offered upstream while validating for a CONNECT, before the client's offer is known.
PREFLIGHT_ALPN = (b"h2", b"http/1.1")
MAX_PEEK = 65536
#: close reasons after which an upstream session may be resumed (no error on either leg)
CLEAN_ENDS = frozenset({"client-closed", "upstream-closed"})
#: Close reason of the clear-text relay when the server accepted STARTTLS (never reported:
#: the TLS phase follows on the same connection).
STARTTLS_SWITCH = "starttls"

# TLS alert descriptions (RFC 8446 §6)
ALERT_HANDSHAKE_FAILURE = 40
ALERT_ACCESS_DENIED = 49
ALERT_INTERNAL_ERROR = 80
ALERT_UNRECOGNIZED_NAME = 112

_VERSION_NAMES = {0x0304: "TLS 1.3", 0x0303: "TLS 1.2", 0x0302: "TLS 1.1", 0x0301: "TLS 1.0",
                  0x0300: "SSL 3.0"}  # fmt: skip


class ClientGone(Exception):
    """The client closed or reset before the tunnel was set up."""


class Refusal(Exception):
    """End this connection with a refusal already decided (policy block, upstream refused)."""

    def __init__(self, close_reason: str) -> None:
        super().__init__(close_reason)
        self.close_reason = close_reason


def alert_record(description: int) -> bytes:
    """A fatal TLS alert record, sent raw before any handshake took place."""
    return bytes((21, 3, 3, 0, 2, 2, description))


@dataclass(slots=True)
class Upstream:
    """An upstream connection that passed validation."""

    sock: socket.socket
    conn: SSL.Connection
    info: UpstreamInfo
    verified_name: str
    alpn_offer: tuple[bytes, ...]


@dataclass(eq=False)
class Interception:
    """State of one client connection; ``run()`` is its whole life."""

    worker: Worker
    sock: socket.socket
    client_addr: tuple[str, int]
    conn_id: str
    started: float = field(default_factory=time.monotonic)
    #: who the worker counted this connection for (workers/clientcounts.py: client_of)
    counted_as: str = ""
    server_addr: tuple[str, int] | None = None
    connect_host: str | None = None
    connect_port: int | None = None
    hello: ClientHello | None = None
    decision: Decision | None = None
    decision_reason: str = ""
    upstream: Upstream | None = None
    client_conn: SSL.Connection | None = None
    relay: Relay | None = None
    verdict: str = "not-checked"
    verdict_reason: str | None = None
    handshake_done: float | None = None
    requests: int = 0
    close_reason: str = "error"
    #: mail ports: the protocol, its clear-text phase and the clear relay's byte counts
    mail: Protocol | None = None
    clear: ClearTextPhase | None = None
    clear_bytes: tuple[int, int] = (0, 0)
    #: what the TLS phase carried: "http/1.1", "smtp", ..., "opaque"
    app_protocol: str | None = None
    #: mail ports: the server accepted STARTTLS and the client now speaks TLS
    _switched: bool = False
    _tunnel_open: bool = False
    _opened: bool = False
    _hello_len: int = 0
    #: (request head id, first seen) for the header timeout inside the tunnel
    _head: tuple[int, float] | None = None

    # -- entry point ------------------------------------------------------------------
    async def run(self) -> None:
        w = self.worker
        try:
            async with asyncio.timeout(w.config.limits.handshake_timeout):
                relay = await self._set_up()
            self.relay = relay
            self.close_reason = await relay.done
            if self.close_reason == STARTTLS_SWITCH:
                self.clear_bytes = (relay.up.bytes, relay.down.bytes)
                self.relay = None
                async with asyncio.timeout(w.config.limits.handshake_timeout):
                    relay = await self._after_starttls()
                self.relay = relay
                self.close_reason = await relay.done
        except TimeoutError:
            self.close_reason = "handshake-timeout"
            self._alert_if_possible(ALERT_INTERNAL_ERROR)
            self._answer_timeout()
        except Refusal as exc:
            self.close_reason = exc.close_reason
        except ClientGone:
            self.close_reason = "client-closed"
        except RemoteProtocolError as exc:
            self._protocol_error(exc)
        except EndpointError as exc:
            self.close_reason = exc.reason
        except SignerUnavailable:
            # no certificate can be minted (the supervisor restarts the signer): refuse
            self.close_reason = "signer-unavailable"
            self._alert_if_possible(ALERT_INTERNAL_ERROR)
        except OSError as exc:
            self.close_reason = f"error: {exc.strerror or exc}"
        except Exception:
            # a bug must cost one connection, never the worker: report it loudly
            logger.exception("connection %s: internal error", self.conn_id)
            self.close_reason = "error: internal (see the gateway's log)"
        finally:
            self._close()

    # -- set-up -------------------------------------------------------------------------
    async def _set_up(self) -> Relay:
        w = self.worker
        if w.config.mode == "explicit":
            req = await self._read_connect()
            self.connect_host = req.host
            self.connect_port = req.port
            decision, why = self._decide(req.host)
            self.decision, self.decision_reason = decision, why
            if decision is not Decision.INTERCEPT:
                return await self._apply_non_intercept(decision, why, req.host)
            upstream = await self._open_upstream(req.host, req.port, req.host, PREFLIGHT_ALPN)
            self.upstream = upstream
            await self._send_all(connect_established())
            self._tunnel_open = True
            hello = await self._read_client_hello()
            name = hello.sni or req.host
            if hello.sni and hello.sni != req.host:
                decision, why = self._decide(hello.sni)
                if decision is not Decision.INTERCEPT:
                    self._drop_upstream()
                    return await self._apply_non_intercept(decision, why, hello.sni)
            self._decided(Decision.INTERCEPT, why)
            if name != upstream.verified_name or not _alpn_fits(upstream.info.alpn, hello.alpn):
                # the client asked for another name or cannot speak what upstream chose:
                # validate a connection made with exactly its SNI and ALPN offer
                self._drop_upstream()
                self.upstream = await self._open_upstream(req.host, req.port, name, hello.alpn)
        else:
            self.server_addr = original_destination(self.sock)
            if self.server_addr == w.listen_addr:
                raise Refusal("loop-refused")
            self.mail = w.mail_ports.protocol(self.server_addr[1])
            if self.mail is not None:
                return await self._clear_text_phase(self.mail)
            hello = await self._read_client_hello()
            name = hello.sni or self.server_addr[0]
            decision, why = self._decide(hello.sni, name)
            if decision is not Decision.INTERCEPT:
                return await self._apply_non_intercept(decision, why, hello.sni)
            self._decided(Decision.INTERCEPT, why)
            self.upstream = await self._open_upstream(
                self.server_addr[0], self.server_addr[1], name, hello.alpn
            )
        return await self._intercept()

    async def _read_connect(self) -> Any:
        async with self._header_deadline():
            return await self._read_connect_request()

    async def _read_connect_request(self) -> Any:
        loop = self.worker.loop
        limits = self.worker.config.limits
        while True:
            data = await self._peek()
            try:
                req = parse_connect(data, max_bytes=limits.max_connect_header_bytes,
                                    max_request_line=limits.max_request_line,
                                    max_header_count=limits.max_header_count)  # fmt: skip
            except ConnectRequestError as exc:
                if isinstance(exc, ConnectLimitExceeded):
                    self.worker.limit_hit(exc.limit, self)
                await self._send_all(connect_refusal(exc.status, str(exc)), ignore_errors=True)
                raise
            if req is not None:
                await _recv_exactly(loop, self.sock, req.header_length)
                return req
            await self._wait_more(len(data) + 1)

    async def _read_client_hello(self) -> ClientHello:
        async with self._header_deadline():
            return await self._read_client_hello_bytes()

    @contextlib.asynccontextmanager
    async def _header_deadline(self) -> AsyncIterator[None]:
        """``limits.header_timeout`` for bytes the client must send before any TLS work."""
        try:
            async with asyncio.timeout(self.worker.config.limits.header_timeout):
                yield
        except TimeoutError:
            self.worker.limit_hit("header_timeout", self)
            self._alert_if_possible(ALERT_HANDSHAKE_FAILURE)
            raise Refusal("header-timeout") from None

    def request_head_overdue(self, now: float, timeout: float) -> bool:
        """Has the client been sending one HTTP request head for longer than ``timeout``?
        (Sampled by the worker's sweep; ``now`` is loop time.)"""
        inspector = getattr(self, "_inspector", None)
        head = getattr(inspector, "request_head_id", None)
        if head is None:
            self._head = None
            return False
        if self._head is None or self._head[0] != head:
            self._head = (head, now)
            return False
        return now - self._head[1] > timeout

    async def _read_client_hello_bytes(self) -> ClientHello:
        while True:
            data = await self._peek()
            end = client_hello_end(data)
            if end is not None:
                hello = parse_client_hello(data[:end])
                self.hello = hello
                self._hello_len = end
                return hello
            await self._wait_more(len(data) + 1)

    async def _peek(self) -> bytes:
        loop = self.worker.loop
        while True:
            try:
                data = self.sock.recv(MAX_PEEK, socket.MSG_PEEK)
            except BlockingIOError:
                await _wait_readable(loop, self.sock)
                continue
            except ConnectionError:
                raise ClientGone() from None
            if not data:
                raise ClientGone()
            return data

    async def _wait_more(self, want: int) -> None:
        """Wait until at least ``want`` bytes are queued (SO_RCVLOWAT: no busy loop).

        The peer's FIN also wakes us while the bytes it sent are still queued (and only
        peeked, so recv never shows the end of stream): that case is the client going away.
        """
        sock = self.sock
        want = min(want, MAX_PEEK)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
        try:
            while True:
                await _wait_readable(self.worker.loop, sock)
                try:
                    queued = len(sock.recv(MAX_PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT))
                except BlockingIOError:
                    queued = 0
                except ConnectionError:
                    raise ClientGone() from None
                if queued >= want:
                    return
                if _peer_closed(sock):
                    raise ClientGone()
        finally:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    def _decide(self, name: str | None, learned_name: str | None = None) -> tuple[Decision, str]:
        """The configured policy; then, for a connection it would intercept, the learned
        bypass list (``learned_name``: the name a rejection was recorded under)."""
        w = self.worker
        decision, why = w.policy.decide(self.client_addr[0], name)
        if decision is Decision.INTERCEPT:
            entry = w.learned_lookup(learned_name or name)
            if entry is not None:
                return Decision.BYPASS, f"learned bypass: {entry.kind} x{entry.rejections}"
        return decision, why

    def _decided(self, decision: Decision, why: str) -> None:
        """The decision is final: record it and report the connection as open."""
        self.decision = decision
        self.decision_reason = why
        if not self._opened:
            self._opened = True
            self._emit_open()

    async def _apply_non_intercept(
        self, decision: Decision, why: str, name: str | None, up_sock: socket.socket | None = None
    ) -> Relay:
        w = self.worker
        self._decided(decision, why)
        w.emit(
            ev.POLICY,
            {
                "conn": self.conn_id,
                "decision": decision.value,
                "reason": why,
                "name": name,
                "client_ip": self.client_addr[0],
            },
        )
        if decision is Decision.BLOCK:
            if w.config.mode == "explicit" and not self._tunnel_open:
                await self._send_all(
                    connect_refusal(403, f"blocked by policy ({why})"), ignore_errors=True
                )
            else:
                self._alert_if_possible(ALERT_ACCESS_DENIED)
            raise Refusal("blocked")
        # bypass: splice raw bytes; the peeked ClientHello is still in the socket
        if up_sock is not None:
            pass  # after STARTTLS: the upstream connection exists
        elif self.server_addr is not None:
            up_sock = await self._connect_tcp(*self.server_addr)
        else:
            assert self.connect_host is not None and self.connect_port is not None
            up_sock = await self._connect_tcp(self.connect_host, self.connect_port)
        if w.config.mode == "explicit" and not self._tunnel_open:
            await self._send_all(connect_established())
            self._tunnel_open = True
        relay = Relay(w.loop, TcpEndpoint("client", self.sock), TcpEndpoint("upstream", up_sock))
        self._bypass_sock = up_sock
        relay.start()
        self.handshake_done = time.monotonic()
        return relay

    # -- mail: the clear-text phase up to STARTTLS ------------------------------------------
    async def _clear_text_phase(self, protocol: Protocol) -> Relay:
        """Relay the mail dialogue in clear while watching it (``workers/starttls.py``)."""
        w = self.worker
        assert self.server_addr is not None
        decision, why = w.policy.decide(self.client_addr[0], None)
        if decision is not Decision.INTERCEPT:
            return await self._apply_non_intercept(decision, why, None)
        try:
            up_sock = await self._connect_tcp(*self.server_addr)
        except UpstreamRefused as exc:
            # the client expects a mail greeting, not a TLS alert: the close says it
            await self._refuse_upstream(exc, self.server_addr[0], self.server_addr[1],
                                        alert=False)  # fmt: skip
        self._clear_sock: socket.socket | None = up_sock
        clear = ClearTextPhase(
            new_dialogue(protocol, max_line=w.config.mail_max_line),
            required=w.mail_ports.required(self.server_addr[0]),
        )
        self.clear = clear
        self.app_protocol = protocol.value
        self._decided(Decision.INTERCEPT, f"{protocol.value}: clear-text phase until STARTTLS")
        relay = Relay(
            w.loop,
            TcpEndpoint("client", self.sock),
            TcpEndpoint("upstream", up_sock),
            inspect_client=lambda data: self._clear_step(clear.feed_client, data),
            inspect_upstream=lambda data: self._clear_step(clear.feed_server, data),
        )
        relay.start()
        self._deadline = w.loop.call_later(
            w.config.mail_negotiation_timeout, self._negotiation_deadline, relay
        )
        return relay

    def _negotiation_deadline(self, relay: Relay) -> None:
        """The clear-text phase must reach STARTTLS, or show it will not, in bounded time."""
        clear = self.clear
        if relay.done.done() or clear is None or clear.settled:
            return
        timeout = self.worker.config.mail_negotiation_timeout
        self._emit_mail("starttls", clear.starttls_event(
            "timeout", downgrade=False,
            detail=f"no STARTTLS outcome within {timeout:g} s (mail.negotiation_timeout)",
        ))  # fmt: skip
        relay.stop("starttls-timeout")

    def _clear_step(self, feed: Callable[[bytes], Step], data: bytes) -> None:
        """Feed the clear-text phase and act on its decision (inside a relay callback)."""
        try:
            step = feed(data)
        except MailProtocolError as exc:
            assert self.mail is not None
            self._protocol_error(exc, stage=self.mail.value)
            raise EndpointError("protocol-error") from None
        for type_, fields in step.events:
            self._emit_mail(type_, fields)
        if step.next is Next.SWITCH:
            # the acceptance is held: written to the client once the clear relay stopped
            self._starttls_reply = step.reply
            raise EndpointError(STARTTLS_SWITCH)
        if step.next is Next.REFUSE:
            raise EndpointError(step.reason)

    async def _after_starttls(self) -> Relay:
        """The server accepted STARTTLS: now intercept TLS on the same two connections."""
        clear = self.clear
        up_sock = self._clear_sock
        assert clear is not None and up_sock is not None and self.server_addr is not None
        self._switched = True
        await self._send_all(self._starttls_reply)
        hello = await self._read_client_hello()
        # the greeting/EHLO banner is the server's own unauthenticated claim: never a name
        # to validate against; the SNI or the destination IP address is
        name = hello.sni or self.server_addr[0]
        self._emit_mail("starttls", {**clear.upgraded(), "sni": hello.sni, "ja3": hello.ja3,
                                     "ja3_hash": hello.ja3_hash, "ja4": hello.ja4})  # fmt: skip
        decision, why = self._decide(hello.sni, name)
        self._clear_sock = None
        if decision is not Decision.INTERCEPT:
            return await self._apply_non_intercept(decision, why, hello.sni, up_sock=up_sock)
        self.decision_reason = why
        self.upstream = await self._validate_upstream(up_sock, name, hello.alpn,
                                                      self.server_addr[1])  # fmt: skip
        return await self._intercept()

    def _mail_inspector(self, dialogue: MailDialogue) -> tuple[Any, Any]:
        """Inside TLS: the same dialogue parser, reporting transactions and the session."""
        self._mail_dialogue = dialogue

        def report(records: list[Any]) -> None:
            for type_, fields in record_events(dialogue, records):
                self._emit_mail(type_, fields)

        def on_client(data: bytes) -> None:
            try:
                report(dialogue.feed_client(data))
            except MailProtocolError as exc:
                self._protocol_error(exc, stage=dialogue.protocol.value)
                raise EndpointError("protocol-error") from None

        def on_upstream(data: bytes) -> None:
            try:
                report(dialogue.feed_server(data))
            except MailProtocolError as exc:
                self._protocol_error(exc, stage=dialogue.protocol.value)
                raise EndpointError("protocol-error") from None

        return on_client, on_upstream

    def _emit_mail(self, type_: str, fields: dict[str, Any]) -> None:
        self.worker.emit(type_, {**self._addresses(), **fields})

    def _finish_mail(self) -> None:
        """The connection ends: report what the mail parsers still hold."""
        dialogue: MailDialogue | None = getattr(self, "_mail_dialogue", None)
        if dialogue is not None:
            events = record_events(dialogue, dialogue.finish())
            summary = summary_fields(dialogue)
            if summary is not None:
                events.append((dialogue.protocol.value, summary))
        elif self.clear is not None and not self._switched:
            events = self.clear.finish()
        else:
            return
        for type_, fields in events:
            self._emit_mail(type_, fields)

    # -- upstream -----------------------------------------------------------------------
    async def _connect_tcp(self, host: str, port: int) -> socket.socket:
        w = self.worker
        loop = w.loop
        try:
            infos = await w.resolver.resolve(host, port)
        except socket.gaierror as exc:
            raise UpstreamRefused("dns-failure", f"cannot resolve {host}: {exc.strerror}") from None
        if w.config.mode == "explicit":
            await self._check_destination(host, [str(info[4][0]) for info in infos])
        last: OSError | None = None
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_socket_buffers(sock, w.config.limits.socket_buffer)
            try:
                async with asyncio.timeout(w.config.limits.connect_timeout):
                    await loop.sock_connect(sock, addr)
            except (OSError, TimeoutError) as exc:
                sock.close()
                last = (
                    exc
                    if isinstance(exc, OSError)
                    else OSError(f"timed out connecting to {addr[0]}")
                )
                continue
            self.server_addr = (str(addr[0]), int(addr[1]))
            return sock
        text = (last.strerror or str(last)) if last else "no address"
        raise UpstreamRefused("connect-failed", f"cannot connect to {host}:{port}: {text}")

    async def _check_destination(self, host: str, addresses: list[str]) -> None:
        """A CONNECT may not reach the gateway itself, link-local or metadata addresses:
        if any address ``host`` resolved to is forbidden, refuse (403) with a policy event."""
        w = self.worker
        for ip in addresses:
            why = w.access.destination_refusal(ip)
            if why is None:
                continue
            reason = f"destination-forbidden: {host} is {ip} ({why})"
            w.stats.access_refused += 1
            self._decided(Decision.BLOCK, reason)
            w.emit(ev.POLICY, {"conn": self.conn_id, "decision": Decision.BLOCK.value,
                               "reason": reason, "name": host,
                               "client_ip": self.client_addr[0]})  # fmt: skip
            if not self._tunnel_open:
                await self._send_all(
                    connect_refusal(403, f"{reason}; allow it with [access] "
                                    "allow_destinations"), ignore_errors=True)  # fmt: skip
            else:
                self._alert_if_possible(ALERT_ACCESS_DENIED)
            raise Refusal("destination-forbidden")

    async def _open_upstream(
        self, host: str, port: int, name: str, alpn: tuple[bytes, ...]
    ) -> Upstream:
        """Connect and validate; on refusal tell the client and raise Refusal."""
        try:
            sock = await self._connect_tcp(host, port)
        except UpstreamRefused as exc:
            await self._refuse_upstream(exc, name, port)
        return await self._validate_upstream(sock, name, alpn, port)

    async def _validate_upstream(
        self, sock: socket.socket, name: str, alpn: tuple[bytes, ...], port: int
    ) -> Upstream:
        """The TLS handshake with full validation on a connected socket; on refusal tell
        the client and raise Refusal (the socket is closed either way)."""
        w = self.worker
        try:
            try:
                conn = w.validator.new_connection(
                    sock, server_name=None if _is_ip(name) else name, verify_host=name, alpn=alpn
                )
                await _handshake(w.loop, sock, conn, w.validator)
                info = w.validator.check_established(conn)
            except BaseException:
                sock.close()
                raise
        except UpstreamRefused as exc:
            await self._refuse_upstream(exc, name, port)
        self.verdict = "valid"
        self.verdict_reason = None
        return Upstream(sock, conn, info, name, alpn)

    async def _refuse_upstream(
        self, exc: UpstreamRefused, name: str, port: int, *, alert: bool = True
    ) -> NoReturn:
        w = self.worker
        self.verdict = "refused"
        self.verdict_reason = f"{exc.category}: {exc.reason}"
        w.stats.refused += 1
        w.emit(ev.UPSTREAM_REFUSED, {
            "conn": self.conn_id, "sni": self.hello.sni if self.hello else None,
            "name": name, "server_ip": self.server_addr[0] if self.server_addr else None,
            "server_port": port, "category": exc.category, "reason": exc.reason,
        })  # fmt: skip
        if w.config.mode == "explicit" and not self._tunnel_open:
            await self._send_all(
                connect_refusal(502, f"upstream {name} refused: {exc.reason}"),
                ignore_errors=True,
            )
        elif alert:
            self._alert_if_possible(ALERT_HANDSHAKE_FAILURE)
        raise Refusal("upstream-refused") from None

    def _drop_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.sock.close()
            self.upstream = None

    # -- client side ----------------------------------------------------------------------
    async def _intercept(self) -> Relay:
        w = self.worker
        up = self.upstream
        assert up is not None and self.hello is not None
        name = up.verified_name
        if _is_ip(name):
            request = LeafRequest(
                dns_names=up.info.dns_names, ip_addresses=(name,), not_after=up.info.not_after
            )
        else:
            dns = (name, *(n for n in up.info.dns_names if n != name))
            request = LeafRequest(dns_names=dns, ip_addresses=(), not_after=up.info.not_after)
        ctx = await w.client_contexts.context_for(request, up.info.fingerprint_sha256)
        conn = SSL.Connection(ctx, self.sock)
        conn.set_app_data(ClientSideState(alpn=up.info.alpn))
        conn.set_accept_state()
        self.client_conn = conn
        try:
            await _handshake(w.loop, self.sock, conn, None)
        except SSL.Error as exc:
            text = _ssl_text(exc)
            kind = classify_handshake_failure(text)
            if kind is not None and self.verdict == "valid":
                w.learn_rejection(name, kind, self.conn_id)
            raise EndpointError(f"client-rejected-handshake: {text}") from None
        self.handshake_done = time.monotonic()
        on_client, on_upstream = self._make_inspector(conn.get_alpn_proto_negotiated() or None)
        if w.capture is not None and self.server_addr is not None:
            on_client, on_upstream = self._capturing(w.capture, on_client, on_upstream)
        relay = Relay(
            w.loop,
            TlsEndpoint("client", self.sock, conn),
            TlsEndpoint("upstream", up.sock, up.conn),
            inspect_client=on_client,
            inspect_upstream=on_upstream,
        )
        relay.start()
        return relay

    def _capturing(self, capture: Any, on_client: Any, on_upstream: Any) -> tuple[Any, Any]:
        """Opt-in export: the plaintext also becomes pcap records of a synthesized TCP flow
        with the real addresses (capped per connection; the writer never blocks)."""
        assert self.server_addr is not None
        flow = FlowSynthesizer(self.client_addr, self.server_addr, ts=time.time,
                               cap=self.worker.config.capture_cap)  # fmt: skip
        self._flow = flow
        submit = capture.submit
        submit(flow.open())

        def client(data: bytes) -> None:
            submit(flow.client_data(data))
            if on_client is not None:
                on_client(data)

        def upstream(data: bytes) -> None:
            submit(flow.server_data(data))
            if on_upstream is not None:
                on_upstream(data)

        return client, upstream

    def _make_inspector(self, alpn: bytes | None) -> tuple[Any, Any]:
        """Mail ports: the mail dialogue (:mod:`tlsgate.workers.mail`). Otherwise the
        inspector of the negotiated protocol (:mod:`tlsgate.workers.appinspect`); opaque
        (byte counts in ``conn_close``, JA3/JA4 in ``conn_open``) for other protocols and
        for non-HTTP without ALPN."""
        if self.mail is not None:
            self.app_protocol = self.mail.value
            return self._mail_inspector(
                new_dialogue(self.mail, max_line=self.worker.config.mail_max_line, tls=True)
            )
        w = self.worker
        inspector = new_inspector(
            alpn, record_headers=w.config.record_headers, redact_headers=w.config.redact_headers,
            ws_payload_cap=DEFAULT_PAYLOAD_CAP if w.capture is not None else None,
            limits=w.config.limits,
        )  # fmt: skip
        if inspector is None:
            self.app_protocol = "opaque"
            return None, None
        if alpn is not None:
            self.app_protocol = alpn.decode("latin-1")
        self._inspector = inspector
        sniffed: list[bool] = []  # without ALPN: decide on the first client bytes

        def feed(method: Any, data: bytes) -> None:
            try:
                self._report(method(data))
            except RemoteProtocolError as exc:
                if isinstance(exc, HttpLimitExceeded):
                    self.worker.limit_hit(exc.limit, self)
                self._protocol_error(exc, stage=error_stage(exc))
                raise EndpointError("protocol-error") from None

        def on_client(data: bytes) -> None:
            if alpn is None and not sniffed:
                sniffed.append(looks_like_http_request(data))
                self.app_protocol = "http/1.1" if sniffed[0] else "opaque"
            if getattr(inspector, "opaque", False) or (sniffed and not sniffed[0]):
                return
            feed(inspector.feed_client, data)

        def on_upstream(data: bytes) -> None:
            if getattr(inspector, "opaque", False) or (
                alpn is None and (not sniffed or not sniffed[0])
            ):
                return
            feed(inspector.feed_server, data)

        return on_client, on_upstream

    def _report(self, reports: list[Any]) -> None:
        sni = self.hello.sni if self.hello else None
        for report in reports:
            kind, fields = event_of(report)
            if kind == ev.HTTP:
                self.requests += 1
            self.worker.emit(kind, {**self._addresses(), "sni": sni, **fields})

    # -- endings --------------------------------------------------------------------------
    def _protocol_error(self, exc: RemoteProtocolError, stage: str | None = None) -> None:
        if stage is None:
            if isinstance(exc, ConnectRequestError):
                stage = "connect"
            elif isinstance(exc, ClientHelloError):
                stage = "client_hello"
                self._alert_if_possible(ALERT_HANDSHAKE_FAILURE)
            else:
                stage = "tls"
        self.close_reason = "protocol-error"
        self.worker.stats.protocol_errors += 1
        self.worker.emit(
            ev.PROTOCOL_ERROR, {**self._addresses(), "stage": stage, "error": str(exc)}
        )

    def _learn_from_quick_close(self) -> None:
        """A client that closes right after our completed handshake, having sent nothing,
        rejected our certificate too (pinning checks that run after the handshake)."""
        relay, up = self.relay, self.upstream
        if relay is None or up is None or self.client_conn is None or self.handshake_done is None:
            return
        if self.verdict != "valid":
            return  # never learn from anything but a client refusing a valid upstream's leaf
        after = time.monotonic() - self.handshake_done
        kind = classify_close(relay.first_eof or self.close_reason, relay.up.bytes, after)
        if kind is not None:
            self.worker.learn_rejection(up.verified_name, kind, self.conn_id)

    def _alert_if_possible(self, description: int) -> None:
        """Refuse a client that expects a TLS handshake we never started."""
        if self.client_conn is not None:
            return
        if self.worker.config.mode == "explicit" and not self._tunnel_open:
            return
        if self.mail is not None and not self._switched:
            return  # a mail client in its clear-text phase: TLS bytes would be garbage to it
        try:
            if self._hello_len:
                self.sock.recv(self._hello_len)  # consume it, or close() would send RST
            self.sock.send(alert_record(description))
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the client is gone; nothing to tell it

    def _answer_timeout(self) -> None:
        """Explicit mode before the tunnel: answer 408 (the client's CONNECT was incomplete)
        or 504 (the upstream was too slow) instead of just closing."""
        if self.worker.config.mode != "explicit" or self._tunnel_open or self.relay is not None:
            return
        limit = self.worker.config.limits.handshake_timeout
        if self.connect_host is None:
            answer = connect_refusal(408, f"the CONNECT request was not complete within {limit} s")
        else:
            target = f"{self.connect_host}:{self.connect_port}"
            answer = connect_refusal(504, f"reaching and validating {target} took over {limit} s")
        try:
            self.sock.send(answer)
        except OSError:
            pass  # the client is gone or its window is full: the close tells it enough

    async def _send_all(self, data: bytes, ignore_errors: bool = False) -> None:
        try:
            await self.worker.loop.sock_sendall(self.sock, data)
        except OSError:
            if not ignore_errors:
                raise ClientGone() from None

    def _addresses(self) -> dict[str, Any]:
        # before the upstream connect in explicit mode only the CONNECT port is known
        server = self.server_addr or (None, self.connect_port)
        return {"conn": self.conn_id, "client_ip": self.client_addr[0],
                "client_port": self.client_addr[1], "server_ip": server[0],
                "server_port": server[1]}  # fmt: skip

    def _emit_open(self) -> None:
        h = self.hello
        self.worker.emit(ev.CONN_OPEN, {
            **self._addresses(), "mode": self.worker.config.mode,
            "connect_host": self.connect_host,
            "sni": h.sni if h else None,
            "client_alpn": [p.decode("latin-1") for p in h.alpn] if h else [],
            "client_versions": [_VERSION_NAMES.get(v, hex(v)) for v in h.versions] if h else [],
            "ja3": h.ja3 if h else None, "ja3_hash": h.ja3_hash if h else None,
            "ja4": h.ja4 if h else None,
            "decision": self.decision.value if self.decision else None,
            "decision_reason": self.decision_reason,
        })  # fmt: skip

    def _close(self) -> None:
        w = self.worker
        relay = self.relay
        if relay is not None and not relay.done.done():
            relay.stop(self.close_reason)
        deadline = getattr(self, "_deadline", None)
        if deadline is not None:
            deadline.cancel()
        self._finish_mail()
        self._learn_from_quick_close()
        inspector = getattr(self, "_inspector", None)
        if relay is not None and self.close_reason == "protocol-error":
            close_after_protocol_error(relay, inspector)
        if inspector is not None:
            try:
                self._report(inspector.finish())
            except RemoteProtocolError:
                pass  # a response cut short by the close: already counted as incomplete
        flow = getattr(self, "_flow", None)
        if flow is not None:
            w.capture.submit(flow.close())
        up = self.upstream
        if up is not None:
            if self.close_reason.split(":", 1)[0] in CLEAN_ENDS:
                w.validator.remember(up.conn)
            up.sock.close()
        for extra in (getattr(self, "_bypass_sock", None), getattr(self, "_clear_sock", None)):
            if extra is not None:
                extra.close()
        if self.client_conn is None and relay is None:
            _discard_unread(self.sock)
        self.sock.close()
        now = time.monotonic()
        cc = self.client_conn
        info = up.info if up else None
        w.emit(ev.CONN_CLOSE, {
            **self._addresses(),
            "sni": self.hello.sni if self.hello else None,
            "connect_host": self.connect_host,
            "decision": self.decision.value if self.decision else None,
            "client_tls_version": cc.get_protocol_version_name() if cc else None,
            "client_cipher": cc.get_cipher_name() if cc else None,
            "client_resumed": session_reused(cc) if cc and self.handshake_done else None,
            "client_group": group_name(cc) if cc and self.handshake_done else None,
            "upstream_tls_version": info.tls_version if info else None,
            "upstream_cipher": info.cipher if info else None,
            "upstream_group": info.group if info else None,
            "upstream_resumed": info.session_reused if info else None,
            "alpn": info.alpn.decode("latin-1") if info and info.alpn else None,
            "upstream_subject": info.subject if info else None,
            "upstream_issuer": info.issuer if info else None,
            "upstream_fingerprint_sha256": info.fingerprint_sha256 if info else None,
            "upstream_verdict": self.verdict,
            "upstream_verdict_reason": self.verdict_reason,
            "bytes_from_client": (relay.up.bytes if relay else 0) + self.clear_bytes[0],
            "bytes_from_server": (relay.down.bytes if relay else 0) + self.clear_bytes[1],
            "app_protocol": self.app_protocol,
            "duration": round(now - self.started, 6),
            "handshake_duration": round(self.handshake_done - self.started, 6)
            if self.handshake_done else None,
            "requests": self.requests,
            "captured_bytes": flow.captured_bytes if flow is not None else 0,
            "capture_truncated_bytes": flow.truncated_bytes if flow is not None else 0,
            "close_reason": self.close_reason,
        })  # fmt: skip
        w.connection_closed(self)


def _discard_unread(sock: socket.socket) -> None:
    """Read what the client sent and we did not consume (it was only peeked), so that
    closing sends FIN, not RST: an RST could destroy the refusal we just sent."""
    try:
        for _ in range(16):
            if not sock.recv(MAX_PEEK):
                break
    except OSError:
        pass  # nothing more queued (EAGAIN) or the client is gone: close either way


TCP_CLOSE_WAIT = 8  # include/net/tcp_states.h
TCP_CLOSE = 7


def _peer_closed(sock: socket.socket) -> bool:
    """Has the peer sent FIN (or reset)? ``tcpi_state`` is the first byte of TCP_INFO."""
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return True
    return state in (TCP_CLOSE_WAIT, TCP_CLOSE)


def _alpn_fits(selected: bytes | None, offered: tuple[bytes, ...]) -> bool:
    """Can the client use an upstream connection that negotiated ``selected``?"""
    if selected is None:
        return True
    return selected in offered


def _is_ip(name: str) -> bool:
    if ":" not in name and not name[-1:].isdigit():
        # neither IPv6 (always a colon) nor IPv4 (ends in a digit): the common case, a host
        # name, without ipaddress's two failed parses (~10 us, 1 % of a new connection)
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _ssl_text(exc: SSL.Error) -> str:
    try:
        return str(exc.args[0][0][2])
    except (IndexError, TypeError):
        return str(exc) or exc.__class__.__name__


async def _wait_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, _set_done, fut)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def _wait_writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _set_done, fut)
    try:
        await fut
    finally:
        loop.remove_writer(fd)


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> None:
    """Consume ``n`` bytes that were already peeked."""
    while n > 0:
        try:
            chunk = sock.recv(n)
        except BlockingIOError:
            await _wait_readable(loop, sock)
            continue
        if not chunk:
            raise ClientGone()
        n -= len(chunk)


async def _handshake(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, conn: SSL.Connection, validator: Any
) -> None:
    """Drive a non-blocking handshake; upstream failures become UpstreamRefused."""
    while True:
        try:
            conn.do_handshake()
            return
        except SSL.WantReadError:
            await _wait_readable(loop, sock)
        except SSL.WantWriteError:
            await _wait_writable(loop, sock)
        except SSL.Error as exc:
            if validator is None:
                raise
            raise validator.refusal(conn, exc) from None
