"""The signer killed (SIGKILL, by the pid `tlsgate status` reports) under a real gateway
while clients keep opening intercepted connections: the gateway keeps serving names it
minted before, reports a ``signer_restart`` event, mints again once the signer is back,
never hands out a certificate its CA did not sign, and keeps its descriptors and memory
over repeated kills.

Clients CONNECT to the origin's address and send SNI names under ``*.signer.test`` (the
origin's certificate covers them), so every new name needs a signature: a name no
certificate was minted for during the outage is refused (a TLS alert) and nothing else."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.faults.faulty import (
    FD_TOLERANCE,
    RSS_TOLERANCE_BYTES,
    Footprint,
    status,
    wait_settled,
    wait_status,
)
from tests.gateway import Gateway, Origin
from tlsgate.loadtest.soak import sample_process
from tlsgate.supervisor.arbiter import BOOT_WINDOW, MAX_BOOT_FAILURES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the supervisor runs as root"),
]

WORKERS = 2
KILLS = 5
STABLE = [f"stable{i}.signer.test" for i in range(4)]
TIMEOUT = 10.0
RESTART_TIMEOUT = 90.0  # spawn, CA load, then both workers replaced, on a busy 2-core host
MAX_CLIENT_ROUNDS = 2000  # bound on each client loop (it normally stops on its flag)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Origin, Path]]:
    d = tmp_path_factory.mktemp("signer-pki")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1", "*.signer.test")  # CONNECT by address
    ca_pem, cert, key = d / "ca.pem", d / "cert.pem", d / "key.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    leaf.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    with Origin(cert, key) as origin:
        yield origin, ca_pem


def fetch(gw: Gateway, origin: Origin, name: str, path: str) -> bytes:
    """GET ``path`` from the origin through the gateway with SNI ``name``, trusting only
    the gateway's CA (so a certificate it did not sign fails verification)."""
    sock = socket.create_connection((gw.host, gw.port), timeout=TIMEOUT)
    try:
        sock.sendall(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"proxy closed after {head!r}")
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(f"proxy refused: {head[:60]!r}")
        ctx = ssl.create_default_context(cafile=str(gw.ca_cert))
        ctx.set_alpn_protocols(["http/1.1"])
        with ctx.wrap_socket(sock, server_hostname=name) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
                        .encode())  # fmt: skip
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
        return data.split(b"\r\n\r\n", 1)[1]
    finally:
        sock.close()


class Clients:
    """Two client threads until stopped: one on names minted before (must always work),
    one on a new name each time (may be refused while the signer is down, never with a
    certificate the gateway's CA did not sign)."""

    def __init__(self, gw: Gateway, origin: Origin, round_: int) -> None:
        self.gw, self.origin, self.round = gw, origin, round_
        self.stop = threading.Event()
        self.stable_ok = 0
        self.stable_failures: list[str] = []
        self.new_ok = 0
        self.new_refused: list[str] = []
        self.forged: list[str] = []
        self.threads = [threading.Thread(target=self._stable), threading.Thread(target=self._new)]

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
            assert not t.is_alive(), "a client thread hung"

    def _stable(self) -> None:
        for i in range(MAX_CLIENT_ROUNDS):
            if self.stop.is_set():
                return
            name = STABLE[i % len(STABLE)]
            try:
                body = fetch(self.gw, self.origin, name, f"/stable/{self.round}/{i}")
                assert body == f"hello from /stable/{self.round}/{i}\n".encode()
                self.stable_ok += 1
            except ssl.SSLCertVerificationError as exc:
                self.forged.append(f"{name}: {exc}")
            except (OSError, AssertionError) as exc:
                self.stable_failures.append(f"{name}: {exc!r}")

    def _new(self) -> None:
        for i in range(MAX_CLIENT_ROUNDS):
            if self.stop.is_set():
                return
            name = f"n{self.round}-{i}.signer.test"
            try:
                fetch(self.gw, self.origin, name, "/new")
                self.new_ok += 1
            except ssl.SSLCertVerificationError as exc:
                self.forged.append(f"{name}: {exc}")
            except OSError as exc:  # refused: TLS alert or closed (fail closed)
                self.new_refused.append(f"{name}: {exc!r}")


def wait_signer_back(gw: Gateway, old_pid: int, old_workers: set[int]) -> None:
    """The restart reported, the new signer serving, and every worker replaced (they
    were connected to the dead one) and heartbeating; clients keep running meanwhile."""
    deadline = time.monotonic() + RESTART_TIMEOUT
    while True:
        events = gw.events("signer_restart")
        if any(e["old_pid"] == old_pid for e in events):
            st = status(gw)
            ws = st["workers"]
            if (st["signer"]["alive"] and st["signer"]["pid"] != old_pid
                    and all(w["alive"] and w["heartbeat_age"] < 3 for w in ws)
                    and not {w["pid"] for w in ws} & old_workers):  # fmt: skip
                return
        assert time.monotonic() < deadline, (
            f"signer {old_pid} not replaced and workers not back: {events}; gateway log: "
            f"{gw.stderr_so_far[-4000:]}"
        )
        time.sleep(0.2)


def wait_signer_up_for(gw: Gateway, seconds: float) -> dict[str, Any]:
    """A signer killed sooner than BOOT_WINDOW after it came up counts as a failed boot,
    and MAX_BOOT_FAILURES of those in a row stop the gateway (a crash loop, tested in
    test_faults): this test is about a serving signer dying, so it lets each one settle."""
    st = wait_status(
        gw, lambda st: st["signer"]["alive"] and st["signer"]["uptime"] >= seconds,
        timeout=RESTART_TIMEOUT,
    )  # fmt: skip
    assert st["signer"]["alive"] and st["signer"]["uptime"] >= seconds, st["signer"]
    return st


@pytest.mark.timeout(900)
def test_a_killed_signer_is_restarted_reported_and_costs_only_new_names_meanwhile(
    tmp_path: Path, upstream: tuple[Origin, Path]
) -> None:
    origin, upstream_ca = upstream
    with Gateway(tmp_path, upstream_ca=upstream_ca, args=["--workers", str(WORKERS)]) as gw:
        assert gw.proc is not None
        for name in STABLE:  # minted before any kill
            assert fetch(gw, origin, name, "/warm") == b"hello from /warm\n"
        st = wait_settled(gw, WORKERS)
        victims: list[int] = []
        baseline: Footprint | None = None
        signer_baseline = None
        totals = {"stable_ok": 0, "new_ok": 0, "new_refused": 0}
        # as many kills as would stop the gateway if they were failed boots: deaths of a
        # signer that served are restarts, however many
        assert KILLS >= MAX_BOOT_FAILURES
        for round_ in range(KILLS):
            victim = st["signer"]["pid"]
            assert victim and victim not in (gw.proc.pid, *(w["pid"] for w in st["workers"]))
            victims.append(victim)
            with Clients(gw, origin, round_) as clients:
                time.sleep(0.5)  # both clients are running
                assert wait_signer_up_for(gw, BOOT_WINDOW + 0.5)["signer"]["pid"] == victim
                os.kill(victim, signal.SIGKILL)
                wait_signer_back(gw, victim, {w["pid"] for w in st["workers"]})
                # minting works again: a name never seen before, after the restart
                assert fetch(gw, origin, f"after{round_}.signer.test", "/after") == (
                    b"hello from /after\n"
                )
            assert not clients.forged, clients.forged
            assert not clients.stable_failures, clients.stable_failures
            assert clients.stable_ok > 0
            totals["stable_ok"] += clients.stable_ok
            totals["new_ok"] += clients.new_ok
            totals["new_refused"] += len(clients.new_refused)
            st = wait_settled(gw, WORKERS)
            assert not Path(f"/proc/{victim}").exists(), "the killed signer was not reaped"
            if round_ == 0:  # the first restart may allocate once; judge the ones after it
                baseline = Footprint.of(gw, st)
                signer_baseline = sample_process(st["signer"]["pid"])
        assert baseline is not None and signer_baseline is not None
        Footprint.of(gw, st).assert_no_leak_since(baseline, KILLS - 1)
        signer_now = sample_process(st["signer"]["pid"])
        assert signer_now.fds - signer_baseline.fds <= FD_TOLERANCE, (signer_baseline, signer_now)
        assert signer_now.rss_bytes - signer_baseline.rss_bytes <= RSS_TOLERANCE_BYTES

        restarts = gw.wait_match("signer_restart", lambda e: True, count=KILLS)
        assert [(e["old_pid"], e["signal"], e["exit_code"]) for e in restarts] == [
            (pid, "SIGKILL", -9) for pid in victims
        ]
        assert [e["restarts"] for e in restarts] == list(range(1, KILLS + 1))
        assert all(e["worker"] == -2 and e["reason"] == "was killed by SIGKILL" for e in restarts)
        # each restart's new signer is the next round's victim
        assert [e["pid"] for e in restarts] == [*victims[1:], st["signer"]["pid"]]
        assert all(0 <= e["down_for"] < RESTART_TIMEOUT for e in restarts)
        assert st["signer"]["restarts"] == KILLS
        # refused new names were refused by the gateway as such, with an event
        refused = gw.events("conn_close")
        unavailable = [e for e in refused if e["close_reason"] == "signer-unavailable"]
        assert len(unavailable) <= totals["new_refused"] + KILLS
        print(f"signer kills: {KILLS}; {totals}; signer-unavailable closes: {len(unavailable)}")
