"""Access end to end: who may connect (refused at accept, counted, reported per source) and
where a CONNECT may lead (never the gateway itself or link-local/metadata: 403 and an event)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.gateway import Gateway, Origin
from tests.netns import Topology, requires_netns

SCAN_CONNECTIONS = 50
#: A port scan's worth of connections, each sending a CONNECT; every one must be closed
#: without an answer (run with the test's Python in the client namespace).
SCAN = """
import socket
closed = 0
for _ in range({n}):
    with socket.create_connection(("{host}", {port}), timeout=5) as s:
        try:
            s.sendall(b"CONNECT example.com:443 HTTP/1.1\\r\\n\\r\\n")
            closed += s.recv(100) == b""
        except (ConnectionResetError, BrokenPipeError):
            closed += 1
print("closed", closed)
"""


def gateway_status(gw: Gateway) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "tlsgate", "status", "--json", "--state-dir", str(gw.state_dir)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    status: dict[str, object] = json.loads(out.stdout)
    return status


def connect_reply(gw: Gateway, target: str) -> bytes:
    with socket.create_connection((gw.host, gw.port), timeout=10) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        reply = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return reply
            reply += chunk


@requires_netns
@pytest.mark.netns
def test_a_client_outside_the_default_allow_list_is_refused_at_accept_counted_and_reported(
    pki: dict[str, Path], tmp_path: Path
) -> None:
    """The test networks (198.18.0.0/15) are not private ranges: by default a gateway on
    them serves loopback only, and a client from the next namespace gets a closed socket."""
    with Topology() as topo:
        with (
            Origin(pki["cert"], pki["key"], netns=topo.gateway) as origin,
            Gateway(tmp_path, upstream_ca=pki["ca"], listen="0.0.0.0:8443",
                    netns=topo.gateway, args=["--workers", "1"]) as gw,
        ):  # fmt: skip
            refused = topo.run(topo.client, [
                "curl", "-sS", "--max-time", "10", "--proxy", f"http://{topo.gateway_client_ip}:8443",
                "--cacert", str(gw.ca_cert), f"https://localhost:{origin.port}/",
            ], check=False)  # fmt: skip
            assert refused.returncode != 0
            assert b"200" not in refused.stdout
            scan = SCAN.format(host=topo.gateway_client_ip, port=8443, n=SCAN_CONNECTIONS)
            scanned = topo.run(topo.client, [sys.executable, "-c", scan])
            assert scanned.stdout == b"closed %d\n" % SCAN_CONNECTIONS
            served = topo.run(topo.gateway, [
                "curl", "-sS", "--max-time", "10", "--proxy", "http://127.0.0.1:8443",
                "--cacert", str(gw.ca_cert), f"https://localhost:{origin.port}/local",
            ], check=False)  # fmt: skip
            assert served.returncode == 0, served.stderr
            assert served.stdout == b"hello from /local\n"
            reports = gw.wait_match(
                "access_refused", lambda e: True, count=1, timeout=5
            )  # one aggregated report per sweep, not one event per connection
            total = sum(e["refused"] for e in gw.events("access_refused"))
            deadline = time.monotonic() + 5
            while total < 1 + SCAN_CONNECTIONS and time.monotonic() < deadline:
                time.sleep(0.1)
                total = sum(e["refused"] for e in gw.events("access_refused"))
            assert total == 1 + SCAN_CONNECTIONS
            # aggregated: a handful of reports (one per worker and second), not one per scan hit
            assert len(gw.events("access_refused")) <= 4
            assert reports[0]["sources"][0]["client_ip"] == topo.client_ip
            # the refused connections never became interceptions
            opened = gw.events("conn_open")
            assert [e["client_ip"] for e in opened] == ["127.0.0.1"]
            time.sleep(1.2)  # counters are published every second
            workers: Any = gateway_status(gw)["workers"]
            assert workers[0]["access_refused"] == 1 + SCAN_CONNECTIONS
            metrics = subprocess.run(
                [sys.executable, "-m", "tlsgate", "metrics", "--state-dir", str(gw.state_dir)],
                capture_output=True, text=True, timeout=60, check=True,
            ).stdout  # fmt: skip
            counter = f'tlsgate_access_refused_total{{worker="0"}} {1 + SCAN_CONNECTIONS}'
            assert counter in metrics.splitlines()
        assert "clients allowed: 127.0.0.0/8, ::1/128 " in gw.stderr_tail


@requires_netns
@pytest.mark.netns
def test_allow_client_lets_those_networks_in(pki: dict[str, Path], tmp_path: Path) -> None:
    with Topology() as topo:
        with (
            Origin(pki["cert"], pki["key"], netns=topo.gateway) as origin,
            Gateway(tmp_path, upstream_ca=pki["ca"], listen=f"{topo.gateway_client_ip}:8443",
                    netns=topo.gateway,
                    args=["--workers", "1", "--allow-client", f"{topo.client_ip}/32"]) as gw,
        ):  # fmt: skip
            served = topo.run(topo.client, [
                "curl", "-sS", "--max-time", "10", "--proxy", f"http://{gw.host}:{gw.port}",
                "--cacert", str(gw.ca_cert), f"https://localhost:{origin.port}/remote",
            ], check=False)  # fmt: skip
            assert served.returncode == 0, served.stderr
            assert served.stdout == b"hello from /remote\n"


def test_connect_to_the_gateways_loopback_or_metadata_is_refused_with_403_and_an_event(
    pki: dict[str, Path], origin: Origin, tmp_path: Path
) -> None:
    with Gateway(tmp_path, upstream_ca=pki["ca"], loopback_origins=False) as gw:
        for target in (f"127.0.0.1:{origin.port}", f"localhost:{origin.port}",
                       "169.254.169.254:80", "[::1]:22"):  # fmt: skip
            reply = connect_reply(gw, target)
            assert reply.startswith(b"HTTP/1.1 403 "), (target, reply)
            assert b"destination-forbidden" in reply
        blocks = gw.wait_match("policy", lambda e: e["decision"] == "block", count=4)
        reasons = [e["reason"] for e in blocks]
        assert any("169.254.169.254 (link-local (cloud metadata))" in r for r in reasons)
        assert any(r.startswith("destination-forbidden: localhost is 127.0.0.1") for r in reasons)
        closes = gw.wait_events("conn_close", 4)
        assert {e["close_reason"] for e in closes} == {"destination-forbidden"}
        assert {e["upstream_verdict"] for e in closes} == {"not-checked"}  # never connected


def test_allow_destination_lets_a_connect_reach_loopback(
    pki: dict[str, Path], origin: Origin, tmp_path: Path
) -> None:
    args = ["--allow-destination", "127.0.0.0/8"]
    with Gateway(tmp_path, upstream_ca=pki["ca"], loopback_origins=False, args=args) as gw:
        assert connect_reply_head(gw, f"localhost:{origin.port}").startswith(b"HTTP/1.1 200")


def connect_reply_head(gw: Gateway, target: str) -> bytes:
    with socket.create_connection((gw.host, gw.port), timeout=10) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
        return sock.recv(4096)
