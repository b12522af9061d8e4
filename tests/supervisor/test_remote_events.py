"""Remote subscribers: the detection stream over TCP with mutual TLS (real TLS on loopback)."""

from __future__ import annotations

import functools
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from tlsgate.supervisor import eventhub, mtls
from tlsgate.supervisor.ca import init_ca
from tlsgate.supervisor.eventhub import EventHub, RemoteListener
from tlsgate.supervisor.events_ca import (
    ROLE_SCRAPER,
    ROLE_SUBSCRIBER,
    ensure_server_certificate,
    init_events_ca,
    issue_client,
    read_revoked,
    revoke,
    write_client_bundle,
)
from tlsgate.workers.events import HTTP, EventDecoder, EventEmitter, EventQueue

TIMEOUT = 10.0


@dataclass
class Pki:
    state_dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    clients: Path

    def client(self, name: str, role: str = ROLE_SUBSCRIBER) -> Path:
        out = self.clients / name
        cert, key, ca_cert = issue_client(self.state_dir, name, role)
        write_client_bundle(out, cert, key, ca_cert)
        return out


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    root = Path(tempfile.mkdtemp(prefix="mtls", dir="/tmp"))
    state_dir = root / "state"
    init_ca(state_dir)  # the interception CA, which must never be accepted here
    ca = init_events_ca(state_dir)
    cert, key, _ = ensure_server_certificate(state_dir, "127.0.0.1")
    try:
        yield Pki(state_dir, ca.cert_path, cert, key, root / "clients")
    finally:
        shutil.rmtree(root)


class RemoteSubscriber:
    """A subscriber over TLS with a client certificate bundle (or none)."""

    def __init__(self, address: tuple[str, int], bundle: Path | None, pki: Pki,
                 rcvbuf: int | None = None) -> None:  # fmt: skip
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(pki.ca))
        if bundle is not None:
            ctx.load_cert_chain(str(bundle / "cert.pem"), str(bundle / "key.pem"))
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connecting: the window is negotiated then
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(TIMEOUT)
        raw.connect(address)
        self.sock = ctx.wrap_socket(raw, server_hostname=address[0])
        self.decoder = EventDecoder()
        self.events: list[dict[str, Any]] = []

    def read_until(self, done: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
        deadline = time.monotonic() + TIMEOUT
        while not done(self.events):
            assert time.monotonic() < deadline, f"gave up after {len(self.events)} events"
            chunk = self.sock.recv(256 * 1024)
            if not chunk:
                break
            self.events.extend(self.decoder.feed(chunk))
        return self.events

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def hub(pki: Pki) -> Iterator[tuple[EventHub, EventEmitter, Path]]:
    sock_dir = Path(tempfile.mkdtemp(prefix="hub", dir="/tmp"))
    check = mtls.ClientCheck(ROLE_SUBSCRIBER, read_revoked(pki.state_dir))
    ctx = mtls.server_context(pki.ca, pki.server_cert, pki.server_key, check)
    queue = EventQueue()
    hub = EventHub(
        sock_dir / "events.sock",
        gateway_id="test-gw",
        subscriber_buffer_bytes=65536,
        remote=RemoteListener(("127.0.0.1", 0), ctx, check),
    )
    hub.add_source(queue)
    hub.start()
    try:
        yield hub, EventEmitter(0, queue), sock_dir / "events.sock"
    finally:
        hub.stop()
        assert hub.failure is None
        shutil.rmtree(sock_dir)


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def refused_with(hub: EventHub, reason: str, bundle: Path | None, pki: Pki) -> None:
    """A client with ``bundle`` gets no event (handshake or first read fails), counted."""
    address = hub.remote_address
    assert address is not None
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        sub = RemoteSubscriber(address, bundle, pki)
        try:
            sub.read_until(lambda events: len(events) >= 1)  # TLS 1.3: the alert comes here
        finally:
            sub.close()
    wait_for(lambda: hub.stats()["remote"]["refused"][reason] == 1)
    assert hub.stats()["subscribers"] == 0


def test_a_remote_subscriber_gets_the_same_stream_as_a_local_one_hello_first(
    pki: Pki, hub: tuple[EventHub, EventEmitter, Path]
) -> None:
    from tests.supervisor.test_eventhub import Subscriber

    server, emitter, path = hub
    address = server.remote_address
    assert address is not None and address[1] != 0
    remote = RemoteSubscriber(address, pki.client("ids-1"), pki)
    local = Subscriber(path)
    try:
        wait_for(lambda: server.stats()["subscribers"] == 2)
        for n in range(500):
            emitter.emit(HTTP, {"n": n, "path": f"/{n}"})
        remote_events = remote.read_until(lambda events: len(events) >= 501)
        local_events = local.read_until(lambda events: len(events) >= 501)
    finally:
        remote.close()
        local.close()
    assert remote_events[0]["type"] == "hello" and remote_events[0]["gateway"] == "test-gw"
    strip = [{k: v for k, v in e.items() if k != "ts"} for e in remote_events[1:]]
    assert strip == [{k: v for k, v in e.items() if k != "ts"} for e in local_events[1:]]
    assert [e["seq"] for e in remote_events[1:]] == list(range(500))


def test_remote_subscribers_are_listed_by_certificate_name_with_their_counters(
    pki: Pki, hub: tuple[EventHub, EventEmitter, Path]
) -> None:
    server, emitter, _ = hub
    address = server.remote_address
    assert address is not None
    remote = RemoteSubscriber(address, pki.client("ids-listed"), pki)
    try:
        wait_for(lambda: server.stats()["subscribers"] == 1)
        for n in range(10):
            emitter.emit(HTTP, {"n": n})
        remote.read_until(lambda events: len(events) >= 11)
        wait_for(lambda: server.stats()["per_subscriber"][0]["delivered"] == 11)
        (entry,) = server.stats()["per_subscriber"]
    finally:
        remote.close()
    assert entry["transport"] == "tls"
    assert entry["name"].startswith("tls:ids-listed@127.0.0.1:")
    assert entry["dropped"] == 0


def test_a_client_without_a_certificate_is_refused_in_the_handshake_and_counted(
    pki: Pki, hub: tuple[EventHub, EventEmitter, Path]
) -> None:
    refused_with(hub[0], mtls.NO_CERTIFICATE, None, pki)


def test_a_certificate_from_another_ca_is_refused(
    pki: Pki, hub: tuple[EventHub, EventEmitter, Path], tmp_path: Path
) -> None:
    other = trustme.CA().issue_cert("ids.example.net")
    other.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    other.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    refused_with(hub[0], mtls.UNTRUSTED, tmp_path, pki)


def test_a_certificate_signed_by_the_interception_ca_is_refused(
    pki: Pki, hub: tuple[EventHub, EventEmitter, Path], tmp_path: Path
) -> None:
    from tlsgate.supervisor.ca import load_ca
    from tlsgate.supervisor.events_ca import EventsCA, _issue

    interception = load_ca(pki.state_dir)
    fake = EventsCA(pki.state_dir / "ca", interception.cert, interception.key)
    cert, key = _issue(fake, "ids-evil", ROLE_SUBSCRIBER, 30, sans=())
    write_client_bundle(tmp_path, cert, key, interception.cert)
    refused_with(hub[0], mtls.UNTRUSTED, tmp_path, pki)


def test_a_scraper_certificate_cannot_subscribe(
    pki: Pki, hub: tuple[EventHub, EventEmitter, Path]
) -> None:
    refused_with(hub[0], mtls.WRONG_ROLE, pki.client("prom-1", ROLE_SCRAPER), pki)


def test_revoking_a_certificate_disconnects_its_subscriber_and_refuses_it_afterwards(
    pki: Pki, hub: tuple[EventHub, EventEmitter, Path]
) -> None:
    server, _, _ = hub
    address = server.remote_address
    assert address is not None
    bundle = pki.client("ids-revoked")
    sub = RemoteSubscriber(address, bundle, pki)
    sub.read_until(lambda events: len(events) >= 1)
    revoke(pki.state_dir, "ids-revoked")
    server.set_revoked(read_revoked(pki.state_dir))
    sub.read_until(lambda events: False)  # ends: the hub closed the connection
    sub.close()
    wait_for(lambda: server.stats()["subscribers"] == 0)
    refused_with(server, mtls.REVOKED, bundle, pki)


def test_a_client_that_never_completes_the_handshake_is_dropped_and_counted(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eventhub, "HANDSHAKE_TIMEOUT", 0.3)
    check = mtls.ClientCheck(ROLE_SUBSCRIBER)
    ctx = mtls.server_context(pki.ca, pki.server_cert, pki.server_key, check)
    hub = EventHub(None, gateway_id="t", remote=RemoteListener(("127.0.0.1", 0), ctx, check))
    hub.start()
    try:
        address = hub.remote_address
        assert address is not None
        silent = socket.create_connection(address, timeout=TIMEOUT)
        assert silent.recv(1) == b""  # closed by the hub, never served
        silent.close()
        assert hub.stats()["remote"]["refused"][mtls.TIMEOUT] == 1
    finally:
        hub.stop()
    assert hub.failure is None


def test_a_slow_remote_subscriber_gets_gaps_that_add_up_and_a_fast_one_loses_nothing(
    pki: Pki, hub: tuple[EventHub, EventEmitter, Path]
) -> None:
    server, emitter, _ = hub
    address = server.remote_address
    assert address is not None
    fast = RemoteSubscriber(address, pki.client("ids-fast"), pki)
    slow = RemoteSubscriber(address, pki.client("ids-slow"), pki, rcvbuf=4096)
    fast.read_until(lambda events: len(events) >= 1)
    slow.read_until(lambda events: len(events) >= 1)
    total = 10000
    reader = threading.Thread(target=fast.read_until, args=(lambda ev: len(ev) >= total + 1,))
    reader.start()
    for n in range(total):
        emitter.emit(HTTP, {"n": n, "pad": "x" * 600})
        if n % 20 == 19:  # the producer waits for the fast reader, never for the slow one
            wait_for(functools.partial(lambda want: len(fast.events) >= want, n + 2))
    reader.join(TIMEOUT)
    wait_for(lambda: server.stats()["dropped"]["subscriber"] > 0)
    slow.read_until(
        lambda events: (
            sum(e["worker"] == 0 for e in events)
            + sum(e["dropped"] for e in events if e["type"] == "gap")
            >= total
        )
    )
    fast.close()
    slow.close()
    gaps = [e for e in slow.events if e["type"] == "gap"]
    received = [e["seq"] for e in slow.events if e["worker"] == 0]
    assert gaps and all(g["stage"] == "subscriber" and g["worker"] == -1 for g in gaps)
    assert len(received) + sum(g["dropped"] for g in gaps) == total
    assert received == sorted(received)
    assert not [e for e in fast.events if e["type"] == "gap"]
    assert [e["seq"] for e in fast.events if e["worker"] == 0] == list(range(total))


class _BrokenCertificate:
    def to_cryptography(self) -> Any:
        raise RuntimeError("cannot convert")


def test_a_failure_inside_the_certificate_check_refuses_the_client_instead_of_raising() -> None:
    from OpenSSL import SSL

    conn = SSL.Connection(SSL.Context(SSL.TLS_SERVER_METHOD), None)
    check = mtls.ClientCheck(ROLE_SUBSCRIBER)
    assert check.verify(conn, _BrokenCertificate(), 0, 0, 1) is False  # type: ignore[arg-type]
    record = conn.get_app_data()
    assert isinstance(record, mtls.PeerRecord) and record.reason == mtls.HANDSHAKE_FAILED


@pytest.mark.parametrize(
    ("verify_error", "reason", "message", "expected"),
    [
        (None, None, "peer did not return a certificate", mtls.NO_CERTIFICATE),
        (None, None, "tlsv13 alert certificate required", mtls.NO_CERTIFICATE),
        (20, None, "certificate verify failed", mtls.UNTRUSTED),
        (10, None, "certificate verify failed", mtls.EXPIRED),
        (None, mtls.REVOKED, "certificate verify failed", mtls.REVOKED),
        (None, None, "unsupported protocol", mtls.HANDSHAKE_FAILED),
    ],
)
def test_refusals_are_named_by_what_the_handshake_left_behind(
    verify_error: int | None, reason: str | None, message: str, expected: str
) -> None:
    record = mtls.PeerRecord()
    record.verify_error, record.reason = verify_error, reason
    assert mtls.refusal_reason(record, Exception(message)) == expected
