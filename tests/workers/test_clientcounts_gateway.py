"""The per-client connection limit holds for the whole gateway: one client address spread
over several workers (eBPF least-loaded steering, or the kernel's hash) still gets at most
``max_connections_per_client`` open connections, gets them back when it closes some, and
gets back the connections a killed worker held."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.faulty import wait_status
from tests.gateway import Gateway, Origin
from tests.workers.test_worker_limits import closed_within, tunnel

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the supervisor runs as root")

LIMIT = 4
CONFIG = f"""
[limits]
max_connections_per_client = {LIMIT}
"""


@pytest.fixture
def gateway(tmp_path: Path, pki: dict[str, Path]) -> Iterator[Gateway]:
    config = tmp_path / "tlsgate.toml"
    config.write_text(CONFIG)
    args = ["--config", str(config), "--workers", "2"]
    with Gateway(tmp_path / "state", upstream_ca=pki["ca"], args=args) as gw:
        yield gw


def refused_at_accept(gw: Gateway) -> bool:
    """Is a new connection closed at once, before anything is read (the limit)?"""
    with socket.create_connection((gw.host, gw.port), timeout=10) as sock:
        return closed_within(sock, 5)


def open_tunnels(gw: Gateway, origin: Origin, n: int) -> list[ssl.SSLSocket]:
    return [tunnel(gw, origin) for _ in range(n)]


def close_all(tunnels: list[ssl.SSLSocket]) -> None:
    for tls in tunnels:
        tls.close()


def active(st: dict[str, Any]) -> list[int]:
    return [w["active"] for w in st["workers"]]


def test_one_client_cannot_exceed_the_limit_across_workers_and_can_reconnect_after_closing(
    gateway: Gateway, origin: Origin
) -> None:
    wait_status(gateway, lambda st: all(w["alive"] for w in st["workers"]))
    held = open_tunnels(gateway, origin, LIMIT)
    try:
        # eight attempts: under a per-worker count, any of them steered to a worker holding
        # fewer than LIMIT of this client's connections would be served
        for _ in range(8):
            assert refused_at_accept(gateway)
        st = wait_status(gateway, lambda st: sum(active(st)) == LIMIT)
        assert sum(active(st)) == LIMIT
        # status shows the shared table: one row per worker process, the client's LIMIT
        table = st["client_counts"]
        assert (table["rows_in_use"], table["counted"]) == (2, LIMIT), table
        assert table["max_connections_per_client"] == LIMIT
        hits = gateway.wait_match("limit", lambda e: e["limit"] == "max_connections_per_client")
        assert hits and hits[0]["value"] == LIMIT and hits[0]["conn"] is None
        assert hits[0]["sources"][0]["client_ip"] == "127.0.0.1"
        # the client's connections and refusals involved both workers: the limit is shared
        opened = {e["worker"] for e in gateway.wait_events("conn_open", LIMIT)}
        refusing = {e["worker"] for e in gateway.wait_match(
            "limit", lambda e: e["limit"] == "max_connections_per_client", count=2)}  # fmt: skip
        assert opened | refusing == {0, 1}, (opened, refusing)
        end = time.monotonic() + 10
        while sum(e["count"] for e in gateway.events("limit")) < 8 and time.monotonic() < end:
            time.sleep(0.1)  # one aggregated event per worker and second
        assert sum(e["count"] for e in gateway.events("limit")
                   if e["limit"] == "max_connections_per_client") == 8  # fmt: skip
    finally:
        close_all(held)
    gateway.wait_events("conn_close", LIMIT)
    st = wait_status(gateway, lambda st: st["client_counts"]["counted"] == 0)
    assert st["client_counts"]["counted"] == 0, st["client_counts"]
    # every slot is free again, on whichever worker the new connections land
    again = open_tunnels(gateway, origin, LIMIT)
    try:
        assert refused_at_accept(gateway)
    finally:
        close_all(again)


def test_the_connections_of_a_killed_worker_no_longer_count(
    gateway: Gateway, origin: Origin
) -> None:
    wait_status(gateway, lambda st: all(w["alive"] for w in st["workers"]))
    held = open_tunnels(gateway, origin, LIMIT)
    try:
        st = wait_status(gateway, lambda st: sum(active(st)) == LIMIT)
        victim = max(st["workers"], key=lambda w: w["active"])
        lost = victim["active"]
        assert lost > 0
        assert refused_at_accept(gateway)
        os.kill(victim["pid"], signal.SIGKILL)
        wait_status(gateway, lambda st: all(
            w["alive"] and w["heartbeat_age"] < 5 and w["pid"] != victim["pid"]
            for w in st["workers"]))  # fmt: skip
        # the killed worker's connections ended with it: exactly that many may open again
        more = open_tunnels(gateway, origin, lost)
        try:
            assert refused_at_accept(gateway)
        finally:
            close_all(more)
    finally:
        close_all(held)
