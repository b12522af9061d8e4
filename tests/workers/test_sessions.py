"""Upstream session reuse: only validated sessions, for exactly what they were validated
for, bounded in number and time; and end to end, what the events say about both legs."""

from __future__ import annotations

import datetime
import socket
import ssl
from pathlib import Path

import pytest

from tests.gateway import Gateway, Origin
from tlsgate.workers.sessions import SessionKey, UpstreamSessionCache

UTC = datetime.UTC
NOW = datetime.datetime(2026, 11, 28, 4, 0, tzinfo=UTC)
KEY = SessionKey("example.com", "example.com", "198.18.0.10", 443, (b"http/1.1",))
LATER = NOW + datetime.timedelta(days=30)


def cache(max_entries: int = 4, lifetime: float = 300.0) -> tuple[UpstreamSessionCache[str, str],
                                                                  list[float]]:  # fmt: skip
    now = [0.0]
    return UpstreamSessionCache(max_entries, lifetime, clock=lambda: now[0], wall=lambda: NOW), now


def test_a_stored_session_is_offered_once_for_the_same_key_with_its_validation_result() -> None:
    c, _ = cache()
    c.store(KEY, "session", "validated-info", LATER)
    entry = c.take(KEY)
    assert entry is not None and (entry.session, entry.info) == ("session", "validated-info")
    assert c.take(KEY) is None  # one use: the connection stores its own newer session


@pytest.mark.parametrize(
    "other",
    [
        SessionKey("other.example", "example.com", "198.18.0.10", 443, (b"http/1.1",)),
        SessionKey("example.com", None, "198.18.0.10", 443, (b"http/1.1",)),
        SessionKey("example.com", "example.com", "198.18.0.11", 443, (b"http/1.1",)),
        SessionKey("example.com", "example.com", "198.18.0.10", 8443, (b"http/1.1",)),
        SessionKey("example.com", "example.com", "198.18.0.10", 443, (b"h2", b"http/1.1")),
    ],
)
def test_a_session_is_never_offered_for_another_name_sni_address_port_or_alpn_offer(
    other: SessionKey,
) -> None:
    c, _ = cache()
    c.store(KEY, "session", "info", LATER)
    assert c.take(other) is None


def test_concurrent_connections_to_one_server_each_get_their_own_session() -> None:
    c, _ = cache(max_entries=8)
    for i in range(3):
        c.store(KEY, f"session-{i}", "info", LATER)
    taken = [c.take(KEY) for _ in range(4)]
    assert [t.session if t else None for t in taken] == ["session-2", "session-1", "session-0",
                                                         None]  # fmt: skip


def test_one_server_cannot_hold_more_than_its_share_of_sessions() -> None:
    c = UpstreamSessionCache[str, str](max_entries=100, per_key=2, wall=lambda: NOW)
    for i in range(5):
        c.store(KEY, f"session-{i}", "info", LATER)
    assert len(c) == 2 and c.evicted == 3


def test_sessions_expire_after_their_lifetime() -> None:
    c, now = cache(lifetime=300)
    c.store(KEY, "session", "info", LATER)
    now[0] = 300.0
    assert c.take(KEY) is None and c.expired == 1


def test_a_session_never_outlives_the_leaf_it_was_validated_with() -> None:
    c, now = cache(lifetime=300)
    c.store(KEY, "session", "info", NOW + datetime.timedelta(seconds=10))
    now[0] = 10.0
    assert c.take(KEY) is None
    c.store(KEY, "session", "info", NOW - datetime.timedelta(seconds=1))
    assert len(c) == 0


def test_the_cache_is_bounded_least_recently_stored_first() -> None:
    c, _ = cache(max_entries=2)
    keys = [SessionKey(f"n{i}.example", None, "198.18.0.10", 443, ()) for i in range(3)]
    for k in keys:
        c.store(k, k.verify_host, "info", LATER)
    assert len(c) == 2 and c.evicted == 1
    assert c.take(keys[0]) is None and c.take(keys[2]) is not None


def test_zero_entries_or_zero_lifetime_turns_reuse_off() -> None:
    for c in (cache(max_entries=0)[0], cache(lifetime=0)[0]):
        c.store(KEY, "session", "info", LATER)
        assert c.take(KEY) is None


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="≥ 0"):
        UpstreamSessionCache(-1)


# -- end to end ---------------------------------------------------------------------------


def _get_on_new_connections(
    gw: Gateway, port: int, paths: list[str], *, resume_client: bool = True
) -> None:
    """One CONNECT tunnel and TLS connection per path (Python's ssl, as a browser would:
    resuming its previous session with the gateway when ``resume_client``)."""
    ctx = ssl.create_default_context(cafile=str(gw.ca_cert))
    session = None
    for path in paths:
        sock = socket.create_connection((gw.host, gw.port), timeout=10)
        sock.sendall(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, "the gateway closed the tunnel"
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
        with ctx.wrap_socket(sock, server_hostname="localhost", session=session) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                        .encode())  # fmt: skip
            body = b""
            while chunk := tls.recv(65536):
                body += chunk
            assert body.endswith(f"hello from {path}\n".encode()), body
            if resume_client:
                session = tls.session


def test_the_second_connection_resumes_on_both_legs_and_is_still_inspected(
    tmp_path: Path, pki: dict[str, Path], origin: Origin
) -> None:
    with Gateway(tmp_path, upstream_ca=pki["ca"], args=["--workers", "1"]) as gw:
        _get_on_new_connections(gw, origin.port, ["/first", "/second", "/third"])
        closes = gw.wait_events("conn_close", 3)
        http = gw.wait_events("http", 3)
    assert sorted(e["path"] for e in http) == ["/first", "/second", "/third"]
    by_path = {h["path"]: next(c for c in closes if c["conn"] == h["conn"]) for h in http}
    first, second, third = (by_path[p] for p in ("/first", "/second", "/third"))
    assert first["upstream_resumed"] is False and first["client_resumed"] is False
    assert second["upstream_resumed"] is True and third["upstream_resumed"] is True
    # the client resumes its session with the gateway, as a browser does
    assert second["client_resumed"] is True and third["client_resumed"] is True
    # key exchange on both legs is reported (OpenSSL 3.0 on both ends here: no ML-KEM)
    assert [c["client_group"] for c in (first, second, third)] == ["X25519"] * 3
    assert [c["upstream_group"] for c in (first, second, third)] == ["X25519"] * 3
    for c in (second, third):
        # what validation established travels with the session
        assert c["upstream_verdict"] == "valid"
        assert c["upstream_fingerprint_sha256"] == first["upstream_fingerprint_sha256"]
        assert c["upstream_subject"] == first["upstream_subject"]


def test_a_session_with_one_origin_is_not_resumed_with_another_port(
    tmp_path: Path, pki: dict[str, Path], origin: Origin
) -> None:
    with (
        Origin(pki["cert"], pki["key"]) as other,
        Gateway(tmp_path, upstream_ca=pki["ca"], args=["--workers", "1"]) as gw,
    ):
        _get_on_new_connections(gw, origin.port, ["/a"])
        _get_on_new_connections(gw, other.port, ["/b"])
        closes = gw.wait_events("conn_close", 2)
    assert [c["upstream_resumed"] for c in sorted(closes, key=lambda c: c["seq"])] == [False, False]
