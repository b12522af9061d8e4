"""Faults against a real gateway (tests/gateway.py) with real servers and clients on loopback.

Every test repeats its fault after a warm-up and shows three things: the gateway keeps
serving other connections (good requests made while the fault happens succeed), each fault
is reported in an event with the fields that name it, and the supervisor and workers keep
their file descriptors and RSS (see faulty.Footprint for the tolerance)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.faults.faulty import (
    FD_TOLERANCE,
    HANG,
    RESET_IN_HANDSHAKE,
    RESET_MID_STREAM,
    RSS_TOLERANCE_BYTES,
    SILENT_AFTER_HANDSHAKE,
    FaultyUpstream,
    Footprint,
    connect_through,
    good_request,
    read_response,
    reset,
    status,
    tunnel,
    wait_settled,
)
from tests.gateway import Gateway, Origin
from tlsgate.loadtest.soak import ProcessSample, sample_process
from tlsgate.supervisor.arbiter import BOOT_WINDOW
from tlsgate.workers.pcap import DEFAULT_QUEUE_BYTES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the supervisor runs as root"),
]

WORKERS = 2
WARMUP = 5
REPETITIONS = 30
FULL_DISK_WARMUP = 30
BIG_BYTES = 16_000_000
BIG = f"/bytes/{BIG_BYTES}"
HANDSHAKE_TIMEOUT = 4.0
IDLE_TIMEOUT = 2.0
CONFIG = f"""
[limits]
handshake_timeout = {HANDSHAKE_TIMEOUT}
idle_timeout = {IDLE_TIMEOUT}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]) -> Iterator[Gateway]:
    state = tmp_path_factory.mktemp("state")
    config = tmp_path_factory.mktemp("config") / "tlsgate.toml"
    config.write_text(CONFIG)
    with Gateway(state, upstream_ca=pki["ca"],
                 args=["--workers", str(WORKERS), "--config", str(config)]) as gw:  # fmt: skip
        wait_settled(gw, WORKERS)
        yield gw


def exercise(
    gw: Gateway,
    origin: Origin,
    fault: Callable[[int], None],
    *,
    parallel: int = 8,
    warmup: int = WARMUP,
    rss_allowance: int = 0,
) -> None:
    """Warm up, then repeat ``fault`` while good requests run; no leak, nothing blocked."""
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(fault, range(warmup)))
    good_request(gw, origin.port, "/warm")
    before = Footprint.of(gw, wait_settled(gw, WORKERS))
    good: list[bytes] = []
    with ThreadPoolExecutor(parallel) as pool:
        faults = [pool.submit(fault, warmup + i) for i in range(REPETITIONS)]
        for i in range(5):  # other connections are served while the faults happen
            good.append(good_request(gw, origin.port, f"/during/{i}"))
        for f in faults:
            f.result()
    assert good == [f"hello from /during/{i}\n".encode() for i in range(5)]
    after = Footprint.of(gw, wait_settled(gw, WORKERS))
    after.assert_no_leak_since(before, REPETITIONS, rss_allowance)


def closes(gw: Gateway, match: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    return gw.wait_match("conn_close", match, count=WARMUP + REPETITIONS, timeout=20)


def test_an_upstream_that_resets_in_the_handshake_is_refused_with_an_event(
    gateway: Gateway, origin: Origin, pki: dict[str, Path]
) -> None:
    with FaultyUpstream(RESET_IN_HANDSHAKE, pki["cert"], pki["key"]) as bad:

        def fault(i: int) -> None:
            sock, head = connect_through(gateway, "localhost", bad.port)
            sock.close()
            assert head.startswith(b"HTTP/1.1 502 "), head

        exercise(gateway, origin, fault)
        mine = lambda e: e["server_port"] == bad.port  # noqa: E731
        refused = gateway.wait_match("upstream_refused", mine, count=WARMUP + REPETITIONS)
        assert len(refused) == WARMUP + REPETITIONS
        assert {e["name"] for e in refused} == {"localhost"}
        assert all(e["category"] and e["reason"] for e in refused)
        ended = closes(gateway, mine)
        assert {e["close_reason"] for e in ended} == {"upstream-refused"}
        assert {e["upstream_verdict"] for e in ended} == {"refused"}


def test_an_upstream_that_resets_mid_stream_ends_that_connection_only(
    gateway: Gateway, origin: Origin, pki: dict[str, Path]
) -> None:
    with FaultyUpstream(RESET_MID_STREAM, pki["cert"], pki["key"]) as bad:

        def fault(i: int) -> None:
            with tunnel(gateway, bad.port) as tls:
                tls.sendall(b"GET /cut HTTP/1.1\r\nHost: localhost\r\n\r\n")
                got = b""
                try:
                    while chunk := tls.recv(65536):
                        got += chunk
                except (OSError, ssl.SSLError):
                    pass  # the gateway ends the client side when upstream reset
                assert got.startswith(b"HTTP/1.1 200 OK") and len(got) < 100000

        exercise(gateway, origin, fault)
        ended = closes(gateway, lambda e: e["server_port"] == bad.port)
        assert {e["close_reason"] for e in ended} == {"upstream-reset"}
        assert all(e["bytes_from_server"] > 0 and e["upstream_verdict"] == "valid"
                   for e in ended)  # fmt: skip
        cut = gateway.wait_match("http", lambda e: e["path"] == "/cut",
                                 count=WARMUP + REPETITIONS)  # fmt: skip
        assert {(e["status"], e["complete"]) for e in cut} == {(200, False)}


def test_an_upstream_that_accepts_then_hangs_hits_the_handshake_timeout(
    gateway: Gateway, origin: Origin, pki: dict[str, Path]
) -> None:
    with FaultyUpstream(HANG, pki["cert"], pki["key"]) as bad:

        def fault(i: int) -> None:
            sock, head = connect_through(gateway, "localhost", bad.port)
            sock.close()
            assert head.startswith(b"HTTP/1.1 504 "), head  # explicit mode, no tunnel yet

        exercise(gateway, origin, fault, parallel=16)
        ended = closes(gateway, lambda e: e["server_port"] == bad.port)
        assert {e["close_reason"] for e in ended} == {"handshake-timeout"}
        assert all(HANDSHAKE_TIMEOUT <= e["duration"] < HANDSHAKE_TIMEOUT + 2 for e in ended)


def test_an_upstream_that_goes_silent_after_the_handshake_hits_the_idle_timeout(
    gateway: Gateway, origin: Origin, pki: dict[str, Path]
) -> None:
    with FaultyUpstream(SILENT_AFTER_HANDSHAKE, pki["cert"], pki["key"]) as bad:

        def fault(i: int) -> None:
            with tunnel(gateway, bad.port) as tls:
                tls.sendall(b"GET /silence HTTP/1.1\r\nHost: localhost\r\n\r\n")
                try:
                    assert tls.recv(65536) == b""  # the gateway closes the idle tunnel
                except (OSError, ssl.SSLError):
                    pass

        exercise(gateway, origin, fault, parallel=16)
        ended = closes(gateway, lambda e: e["server_port"] == bad.port)
        assert {e["close_reason"] for e in ended} == {"idle-timeout"}
        assert all(e["duration"] >= IDLE_TIMEOUT for e in ended)
        unanswered = gateway.wait_match("http", lambda e: e["path"] == "/silence",
                                        count=WARMUP + REPETITIONS)  # fmt: skip
        assert {(e["status"], e["complete"]) for e in unanswered} == {(None, False)}


@pytest.fixture(scope="module")
def patient_gateway(
    tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]
) -> Iterator[Gateway]:
    """Default timeouts: a resolver that retries (5 s) still answers within them."""
    state = tmp_path_factory.mktemp("state")
    with Gateway(state, upstream_ca=pki["ca"], args=["--workers", str(WORKERS)]) as gw:
        wait_settled(gw, WORKERS)
        yield gw


def test_a_name_that_cannot_resolve_gets_502_and_a_dns_failure_event(
    patient_gateway: Gateway, origin: Origin
) -> None:
    gateway = patient_gateway

    def fault(i: int) -> None:
        sock, head = connect_through(gateway, f"n{i}.tlsgate-test.invalid", 443)
        sock.close()
        assert head.startswith(b"HTTP/1.1 502 ") and b"cannot resolve" in head, head

    exercise(gateway, origin, fault)
    mine = lambda e: str(e.get("name", "")).endswith(".tlsgate-test.invalid")  # noqa: E731
    refused = gateway.wait_match("upstream_refused", mine, count=WARMUP + REPETITIONS)
    assert len(refused) == WARMUP + REPETITIONS
    assert {e["category"] for e in refused} == {"dns-failure"}
    assert all(e["server_ip"] is None and e["server_port"] == 443 for e in refused)
    ended = closes(gateway, lambda e: str(e["connect_host"]).endswith(".tlsgate-test.invalid"))
    assert {e["close_reason"] for e in ended} == {"upstream-refused"}


def _client_hello() -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, bytes]:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return obj, incoming, outgoing, outgoing.read()


def test_a_client_that_aborts_mid_handshake_is_reported_and_costs_nothing(
    gateway: Gateway, origin: Origin
) -> None:
    def fault(i: int) -> None:
        sock, head = connect_through(gateway, "localhost", origin.port)
        assert head.startswith(b"HTTP/1.1 200"), head
        *_, hello = _client_hello()
        sock.sendall(hello)
        assert sock.recv(5)[:1] == b"\x16"  # the gateway's ServerHello is on its way
        reset(sock)

    exercise(gateway, origin, fault)
    ended = closes(gateway, lambda e: e["server_port"] == origin.port
                   and e["handshake_duration"] is None
                   and e["decision"] == "intercept")  # fmt: skip
    # a reset in our handshake is how a pinned app refuses a certificate too: it is reported
    # as a rejection (and, with [learned_bypass] on, counted as one)
    assert {e["close_reason"] for e in ended} <= {
        "client-rejected-handshake: (104, 'ECONNRESET')",
        "client-rejected-handshake: (-1, 'Unexpected EOF')",
    }


def test_a_client_that_aborts_mid_stream_is_reported_and_costs_nothing(
    gateway: Gateway, origin: Origin
) -> None:
    def fault(i: int) -> None:
        # a small window: the response cannot be all relayed before the reset
        tls = tunnel(gateway, origin.port, rcvbuf=4096)
        tls.sendall(f"GET {BIG} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        assert tls.recv(4096)
        reset(tls)

    exercise(gateway, origin, fault)
    cut = gateway.wait_match("http", lambda e: e["path"] == BIG,
                             count=WARMUP + REPETITIONS)  # fmt: skip
    assert {(e["status"], e["complete"]) for e in cut} == {(200, False)}
    conns = {e["conn"] for e in cut}
    ended = closes(gateway, lambda e: e["conn"] in conns)
    assert {e["close_reason"] for e in ended} == {"client-reset"}
    assert all(0 < e["bytes_from_server"] < BIG_BYTES for e in ended)


def test_an_ids_subscriber_that_vanishes_mid_stream_is_dropped_and_slows_nobody(
    gateway: Gateway, origin: Origin
) -> None:
    path = gateway.state_dir / "run" / "events.sock"

    def fault(i: int) -> None:
        sub = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sub.settimeout(10)
        sub.connect(str(path))
        assert sub.recv(16)  # the hello: the stream is flowing
        good_request(gateway, origin.port, f"/watched/{i}")
        reset(sub)  # gone without reading the rest

    exercise(gateway, origin, fault, parallel=4)
    watched = gateway.wait_match("http", lambda e: e["path"].startswith("/watched/"),
                                 count=WARMUP + REPETITIONS)  # fmt: skip
    assert len(watched) == WARMUP + REPETITIONS
    lost = gateway.wait_match("subscriber_closed", lambda e: True, count=WARMUP + REPETITIONS)
    assert len(lost) >= WARMUP + REPETITIONS
    assert all(e["worker"] == -2 and e["undelivered_events"] >= 0 for e in lost)


def test_a_killed_worker_is_reported_restarted_and_its_queued_connections_are_served(
    tmp_path: Path, pki: dict[str, Path], origin: Origin
) -> None:
    kills = 4
    with Gateway(tmp_path, upstream_ca=pki["ca"], args=["--workers", str(WORKERS)]) as gw:
        st = wait_settled(gw, WORKERS)
        assert gw.proc is not None
        supervisor_before: ProcessSample | None = None
        keep = tunnel(gw, origin.port)
        keep.sendall(b"GET /keep/0 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_response(keep) == b"hello from /keep/0\n"
        serving = gw.wait_match("http", lambda e: e["path"] == "/keep/0")[0]["worker"]
        victim_slot = 1 - serving
        victims = []
        for round_ in range(kills):
            time.sleep(BOOT_WINDOW)  # a worker dying younger than this counts as a boot failure
            victim = next(w["pid"] for w in st["workers"] if w["id"] == victim_slot)
            victims.append(victim)
            # connections accepted by the kernel into the victim's queue while it is stopped
            os.kill(victim, signal.SIGSTOP)
            with ThreadPoolExecutor(8) as pool:
                queued = [pool.submit(good_request, gw, origin.port, f"/queued/{round_}/{i}")
                          for i in range(8)]  # fmt: skip
                time.sleep(0.5)
                os.kill(victim, signal.SIGKILL)
                bodies = [f.result(timeout=30) for f in queued]
            assert bodies == [f"hello from /queued/{round_}/{i}\n".encode() for i in range(8)]
            # the other worker's tunnel never noticed
            keep.sendall(f"GET /keep/{round_ + 1} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            assert read_response(keep) == f"hello from /keep/{round_ + 1}\n".encode()
            st = wait_settled_except(gw, keep_open=1)
            if round_ == 0:
                supervisor_before = sample_process(gw.proc.pid)
        keep.close()
        exits = gw.wait_match("worker_exit", lambda e: True, count=kills)
        assert [(e["worker_id"], e["pid"], e["signal"]) for e in exits] == [
            (victim_slot, pid, "SIGKILL") for pid in victims
        ]
        assert all(e["worker"] == -2 and e["restart_in"] == 0 for e in exits)
        assert [e["seq"] for e in exits] == list(range(kills))
        assert [e["restarts"] for e in exits] == list(range(1, kills + 1))
        st = wait_settled(gw, WORKERS)
        slot = next(w for w in st["workers"] if w["id"] == victim_slot)
        assert slot["restarts"] == kills and slot["pid"] not in victims
        assert st["events"]["sources"] == WORKERS + 1  # dead workers' pipes are forgotten
        assert supervisor_before is not None
        after = sample_process(gw.proc.pid)
        # kills - 1 restarts since the first sample: a descriptor per restart would show
        assert after.fds - supervisor_before.fds <= FD_TOLERANCE, (supervisor_before, after)
        assert after.rss_bytes - supervisor_before.rss_bytes <= RSS_TOLERANCE_BYTES


def wait_settled_except(gw: Gateway, keep_open: int, timeout: float = 20.0) -> dict[str, Any]:
    """Every worker up and heartbeating, with ``keep_open`` connections still open."""
    end = time.monotonic() + timeout
    while True:
        st = status(gw)
        ws = st["workers"]
        if (all(w["alive"] and w["heartbeat_age"] < 3 for w in ws) and len(ws) == WORKERS
                and sum(w["active"] for w in ws) == keep_open):  # fmt: skip
            return st
        assert time.monotonic() < end, f"the gateway did not settle: {ws}"
        time.sleep(0.2)


def test_a_full_disk_stops_capture_with_a_counted_event_and_interception_continues(
    tmp_path: Path, pki: dict[str, Path], origin: Origin
) -> None:
    pcap_dir = tmp_path / "pcap"
    pcap_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0750", "tlsgate-test-full",
                    str(pcap_dir)], check=True, timeout=30)  # fmt: skip
    try:
        args = ["--workers", str(WORKERS), "--pcap-dir", str(pcap_dir)]
        with Gateway(tmp_path / "state", upstream_ca=pki["ca"], args=args) as gw:
            wait_settled(gw, WORKERS)

            def fault(i: int) -> None:  # 1 MB of plaintext each: the disk fills at once
                assert len(good_request(gw, origin.port, "/bytes/1000000")) == 1000000

            # While the writer waits to retry a failed write (5 s) its queue fills, up to
            # 16 MiB per worker, and empties at the retry: RSS may differ by that much
            # between two samples. Descriptors are compared exactly as in the other tests.
            exercise(gw, origin, fault, parallel=4, warmup=FULL_DISK_WARMUP,
                     rss_allowance=DEFAULT_QUEUE_BYTES)  # fmt: skip
            drops = gw.wait_match("capture_drop", lambda e: True, count=1)
            assert drops and all(e["stage"] == "pcap-file" and e["dropped_submissions"] > 0
                                 for e in drops)  # fmt: skip
            total = FULL_DISK_WARMUP + REPETITIONS
            served = gw.wait_match("conn_close", lambda e: e["bytes_from_server"] > 1000000,
                                   count=total)  # fmt: skip
            assert len(served) == total
            assert shutil.disk_usage(pcap_dir).free < 64 * 1024  # the disk really was full
    finally:
        subprocess.run(["umount", "-l", str(pcap_dir)], check=False, timeout=30)
