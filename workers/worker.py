"""A worker: one event loop that accepts on its listening socket and runs interceptions.

Rules:
- The worker never assumes it is alone: its listening socket may be one of several
  ``SO_REUSEPORT`` sockets steered by the supervisor's eBPF program; its certificate cache
  and signer are interfaces the supervisor can back with shared ones; its events carry
  its worker id and a per-worker sequence number.
- This loop is the one place that touches sockets. Parsers and inspectors are sans-I/O.
- Access first: a client outside the allow-list is closed right after ``accept()``, before
  a byte is read; refusals are counted per source and reported once per sweep
  (``access_refused``), never one event per connection.
- Bounded: at most ``limits.max_connections`` open interceptions in this worker, and
  ``limits.max_connections_per_client`` per client (an IPv4 address, an IPv6 /64) in the
  whole gateway (counted in the table all workers share,
  :mod:`tlsgate.workers.clientcounts`; further clients are
  closed at accept, counted, and reported per sweep in ``limit`` events); idle relays and
  HTTP request heads that trickle in slower than ``limits.header_timeout`` are ended by a
  once-a-second sweep rather than a timer per read.
- Nothing here blocks: events go to a bounded queue; DNS runs in the loop's executor.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from tlsgate.supervisor.config import Config
from tlsgate.workers import events as ev
from tlsgate.workers.access import SourceTally
from tlsgate.workers.bypass import Entry, LearnedBypass
from tlsgate.workers.certs import ClientContexts
from tlsgate.workers.clientcounts import ClientCounts, client_of
from tlsgate.workers.intercept import Interception
from tlsgate.workers.limits import set_socket_buffers
from tlsgate.workers.policy import Policy
from tlsgate.workers.resolver import Resolver
from tlsgate.workers.starttls import MailPorts
from tlsgate.workers.upstream import UpstreamValidator

ACCEPT_BATCH = 64
SWEEP_INTERVAL = 1.0


@dataclass
class WorkerStats:
    """Counters published in status and events."""

    accepted: int = 0
    active: int = 0
    closed: int = 0
    over_limit: int = 0
    #: clients refused by the allow-list at accept
    access_refused: int = 0
    #: every limit hit (connection limits, timeouts, header sizes)
    limit_hits: int = 0
    refused: int = 0
    protocol_errors: int = 0
    started: float = field(default_factory=time.time)


class Worker:
    """Serves one listening socket until ``stop()``."""

    def __init__(
        self,
        worker_id: int,
        config: Config,
        listener: socket.socket,
        *,
        validator: UpstreamValidator,
        client_contexts: ClientContexts,
        emitter: ev.EventEmitter,
        policy: Policy | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.config = config
        self.listener = listener
        self.listen_addr: tuple[str, int] = listener.getsockname()[:2]
        self.validator = validator
        self.client_contexts = client_contexts
        self.emitter = emitter
        self.policy = policy if policy is not None else config.policy()
        self.access = config.access()
        self.refused_sources = SourceTally()
        #: accept-time limit hits since the last sweep, per limit name
        self.limit_sources: dict[str, SourceTally] = {}
        #: open connections per client address, gateway-wide (the supervisor hands a worker
        #: its row of the shared table; alone, a worker counts in a private one)
        self.client_counts = ClientCounts.private()
        self.stats = WorkerStats()
        self.resolver = Resolver()
        self.mail_ports = MailPorts.build(config.smtp_ports, config.imap_ports,
                                          config.pop3_ports, config.starttls_required)  # fmt: skip
        #: publishes the active-connection count for least-loaded eBPF steering (or None)
        self.load_publisher: Any = None
        #: opt-in pcap export (a PcapFileWriter) or None
        self.capture: Any = None
        #: the learned bypass list shared by all workers (workers/bypass.py) or None
        self.learned: LearnedBypass | None = None
        self._capture_dropped = 0
        self.active: set[Interception] = set()
        self._next_conn = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]

    def emit(self, type_: str, fields: dict[str, Any]) -> None:
        self.emitter.emit(type_, fields)

    async def serve(self) -> None:
        """Accept and intercept until :meth:`stop`; then drain (see ``stop``)."""
        self.loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self.listener.setblocking(False)
        self.loop.add_reader(self.listener.fileno(), self._on_accept)
        sweeper = self.loop.create_task(self._sweep())
        try:
            await self._stopping.wait()
        finally:
            self.loop.remove_reader(self.listener.fileno())
            sweeper.cancel()

    def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def drain(self, deadline: float) -> int:
        """Wait for in-flight connections to end, up to ``deadline`` seconds; then end them.
        Returns how many had to be cut."""
        end = time.monotonic() + deadline
        while self.active and time.monotonic() < end:
            await asyncio.sleep(0.05)
        cut = 0
        for interception in list(self.active):
            if interception.relay is not None:
                interception.relay.stop("shutdown")
                cut += 1
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.emitter.flush_gap()
        return cut

    def _on_accept(self) -> None:
        limits = self.config.limits
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # EMFILE/ENFILE/ECONNABORTED: the listener stays; the client retries
                return
            client = (_unmap(addr[0]), addr[1])
            ip = client[0]
            if not self.access.client_allowed(ip):
                # before any read or TLS work: the client learns nothing but a closed socket
                self.stats.access_refused += 1
                self.refused_sources.add(ip)
                sock.close()
                continue
            if self.stats.active >= limits.max_connections:
                self.stats.over_limit += 1
                self._accept_limit_hit("max_connections", ip)
                sock.close()
                continue
            who = client_of(ip, limits.client_ipv6_prefix)
            if self.client_counts.count(who) >= limits.max_connections_per_client:
                self._accept_limit_hit("max_connections_per_client", ip)
                sock.close()
                continue
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                set_socket_buffers(sock, limits.socket_buffer)
            except OSError:
                sock.close()  # reset between accept and here: nothing to serve
                continue
            self.stats.accepted += 1
            self.stats.active += 1
            self.client_counts.add(who)
            if self.load_publisher is not None:
                self.load_publisher.publish(self.stats.active)
            conn_id = f"{self.worker_id}-{self._next_conn}"
            self._next_conn += 1
            interception = Interception(self, sock, client, conn_id, counted_as=who)
            self.active.add(interception)
            task = self.loop.create_task(interception.run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _accept_limit_hit(self, limit: str, ip: str) -> None:
        self.stats.limit_hits += 1
        self.limit_sources.setdefault(limit, SourceTally()).add(ip)

    def limit_hit(self, limit: str, interception: Interception) -> None:
        """A connection ran into ``limit`` (a timeout or size): count it, report it now (one
        event per connection, which was accepted and is ended by this hit)."""
        self.stats.limit_hits += 1
        self.emit(ev.LIMIT, {
            "limit": limit, "value": getattr(self.config.limits, limit),
            "client_ip": interception.client_addr[0], "conn": interception.conn_id,
            "count": 1, "sources": [],
        })  # fmt: skip

    def _report_refusals(self) -> None:
        """Refusals at accept, aggregated per source since the last sweep."""
        report = self.refused_sources.take()
        if report is not None:
            self.emit(ev.ACCESS_REFUSED, report)
        for limit, tally in self.limit_sources.items():
            hits = tally.take()
            if hits is None:
                continue
            sources: Any = hits["sources"]
            self.emit(ev.LIMIT, {
                "limit": limit, "value": getattr(self.config.limits, limit),
                "client_ip": sources[0]["client_ip"] if sources else None, "conn": None,
                "count": hits["refused"], "sources": sources,
            })  # fmt: skip

    def connection_closed(self, interception: Interception) -> None:
        if interception in self.active:
            self.active.discard(interception)
            self.client_counts.remove(interception.counted_as)
            self.stats.active -= 1
            self.stats.closed += 1
            if self.load_publisher is not None:
                self.load_publisher.publish(self.stats.active)

    async def _sweep(self) -> None:
        idle = self.config.limits.idle_timeout
        header_timeout = self.config.limits.header_timeout
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            # drops at the end of a burst are reported now, not at the next event
            self.emitter.flush_gap()
            self._report_capture_drops()
            self._report_refusals()
            self._expire_learned()
            now = self.loop.time()
            for interception in list(self.active):
                relay = interception.relay
                if relay is None:
                    continue
                if now - relay.last_activity > idle:
                    relay.stop("idle-timeout")
                elif interception.request_head_overdue(now, header_timeout):
                    self.limit_hit("header_timeout", interception)
                    relay.stop("header-timeout")

    def learned_lookup(self, name: str | None) -> Entry | None:
        """A live learned-bypass entry for ``name`` (expiry reported by whoever sees it)."""
        if self.learned is None or not name or not self.config.learned_bypass.enabled:
            return None
        live, expired = self.learned.lookup(name, time.time())
        if expired is not None:
            self._bypass_expired(expired, "ttl")
        return live

    def learn_rejection(self, name: str, kind: str, conn_id: str) -> None:
        """A client rejected our certificate for ``name`` (upstream was valid)."""
        if self.learned is None or not self.config.learned_bypass.enabled:
            return
        now = time.time()
        learned = self.learned.record_rejection(name, kind, now)
        if learned is None:
            return
        if learned.evicted is not None:
            self._bypass_expired(learned.evicted, "evicted")
        s = self.config.learned_bypass
        self.emit(ev.BYPASS_LEARNED, {**learned.entry.fields(now), "conn": conn_id,
                                      "threshold": s.threshold, "window": s.window,
                                      "ttl": s.ttl})  # fmt: skip

    def _bypass_expired(self, entry: Entry, reason: str) -> None:
        self.emit(ev.BYPASS_EXPIRED, {**entry.fields(time.time()), "reason": reason})

    def _expire_learned(self) -> None:
        if self.learned is None:
            return
        for entry in self.learned.expire(time.time()):
            self._bypass_expired(entry, "ttl")

    def _report_capture_drops(self) -> None:
        """pcap records the writer could not keep up with (or the disk refused) are counted
        and reported, never silently lost."""
        if self.capture is None:
            return
        dropped = self.capture.dropped
        if dropped > self._capture_dropped:
            self.emit(ev.CAPTURE_DROP, {"dropped_submissions": dropped - self._capture_dropped,
                                        "stage": "pcap-file"})  # fmt: skip
            self._capture_dropped = dropped


def _unmap(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") and "." in host else host
