"""Management over TCP on a real gateway: remote subscribers and the metrics endpoint.

A real `tlsgate run` with 2 workers, real HTTPS requests through it, real TLS on loopback.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.faults.faulty import wait_status
from tests.gateway import Gateway, Origin
from tests.loadclient import run_load
from tests.supervisor.test_detection_stream import Subscriber, worker_events
from tlsgate.paths import control_socket_path
from tlsgate.supervisor.control import request
from tlsgate.supervisor.events_ca import (
    ROLE_SCRAPER,
    init_events_ca,
    issue_client,
    write_client_bundle,
)
from tlsgate.supervisor.mtls import client_context

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the supervisor runs as root")

TIMEOUT = 60.0


@dataclass
class Bundle:
    cert: Path
    key: Path
    ca: Path


def issue(state_dir: Path, name: str, out: Path, role: str = "events-subscriber") -> Bundle:
    cert, key, ca = issue_client(state_dir, name, role)
    paths = write_client_bundle(out / name, cert, key, ca)
    return Bundle(*paths)


def status(state_dir: Path) -> dict[str, Any]:
    answer = request(control_socket_path(state_dir), {"cmd": "status"})
    assert answer["ok"]
    result: dict[str, Any] = answer["status"]
    return result


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class RemoteReader(Subscriber):
    """The detection-stream reader of test_detection_stream, over mutual TLS."""

    def __init__(self, address: tuple[str, int], bundle: Bundle) -> None:
        ctx = client_context(bundle.ca, bundle.cert, bundle.key)
        raw = socket.create_connection(address, timeout=TIMEOUT)
        raw.settimeout(None)
        self.sock = ctx.wrap_socket(raw, server_hostname=address[0])
        self.events = []
        self._unpacker = msgpack.Unpacker(raw=False)
        self._thread = None
        self.start()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    init_events_ca(state)
    return state


def test_a_remote_subscriber_receives_the_same_events_as_a_local_one_with_contiguous_seq(
    tmp_path: Path, state_dir: Path, pki: dict[str, Path], origin: Origin
) -> None:
    bundle = issue(state_dir, "ids-1", tmp_path)
    args = ["--workers", "2", "--events-remote-listen", "127.0.0.1:0"]
    with Gateway(state_dir, upstream_ca=pki["ca"], args=args) as gw:
        remote_listen = status(state_dir)["events"]["remote"]["listen"]
        remote = RemoteReader(host_port(remote_listen), bundle)
        local = Subscriber(state_dir / "run" / "events.sock")
        for sub in (remote, local):
            sub.wait(lambda ev: any(e["type"] == "hello" for e in ev))
        load = run_load((gw.host, gw.port), origin.port, str(gw.ca_cert), total=300)
        assert load.failures == []
        for sub in (remote, local):
            sub.wait(lambda ev: sum(e["type"] == "conn_close" for e in ev) >= 300)
        per_subscriber = status(state_dir)["events"]["per_subscriber"]
        remote.close()
        local.close()
    assert f"remote events: mutual TLS on {remote_listen}" in gw.stderr_tail
    assert remote.events[0]["type"] == "hello"
    remote_worker = [e for e in remote.events if e["worker"] >= 0]
    local_worker = [e for e in local.events if e["worker"] >= 0]
    assert remote_worker == local_worker  # the very same events, in the same order
    assert len([e for e in remote_worker if e["type"] == "http"]) == 300
    assert not [e for e in remote.events if e["type"] == "gap"]
    seqs = worker_events(remote.events)
    assert set(seqs) == {0, 1}
    for worker, worker_seqs in seqs.items():
        assert worker_seqs == list(range(len(worker_seqs))), f"worker {worker} has holes"
    transports = sorted(s["transport"] for s in per_subscriber)
    assert transports == ["tls", "unix"]
    assert any(s["name"].startswith("tls:ids-1@127.0.0.1:") for s in per_subscriber)


def test_tlsgate_events_remote_prints_the_stream_and_refused_clients_are_counted(
    tmp_path: Path, state_dir: Path, pki: dict[str, Path], origin: Origin
) -> None:
    bundle = issue(state_dir, "ids-cli", tmp_path)
    scraper = issue(state_dir, "prom", tmp_path, ROLE_SCRAPER)
    args = ["--workers", "2", "--events-remote-listen", "127.0.0.1:0"]
    with Gateway(state_dir, upstream_ca=pki["ca"], args=args) as gw:
        remote_listen = status(state_dir)["events"]["remote"]["listen"]
        cli = subprocess.Popen(
            [sys.executable, "-m", "tlsgate", "events", "--remote", remote_listen, "--cert",
             str(bundle.cert), "--key", str(bundle.key), "--ca", str(bundle.ca), "--filter",
             "http", "--count", "5"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + TIMEOUT
            while status(state_dir)["events"]["subscribers"] < 1:
                assert time.monotonic() < deadline and cli.poll() is None, cli.stderr
                time.sleep(0.05)
            load = run_load((gw.host, gw.port), origin.port, str(gw.ca_cert), total=5)
            out, err = cli.communicate(timeout=TIMEOUT)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
        assert load.failures == []
        assert cli.returncode == 0, err
        lines = [json.loads(line) for line in out.decode().splitlines()]
        assert [e["type"] for e in lines] == ["http"] * 5
        # a scraper certificate cannot subscribe: refused by the gateway, told by the CLI
        refused = subprocess.run(
            [sys.executable, "-m", "tlsgate", "events", "--remote", remote_listen, "--cert",
             str(scraper.cert), "--key", str(scraper.key), "--ca", str(scraper.ca)],
            capture_output=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert refused.returncode == 2
        assert b"refused this subscriber" in refused.stderr
        assert status(state_dir)["events"]["remote"]["refused"]["wrong-role"] == 1


def test_a_certificate_revoked_then_reloaded_is_disconnected_and_refused_afterwards(
    tmp_path: Path, state_dir: Path, pki: dict[str, Path]
) -> None:
    bundle = issue(state_dir, "ids-gone", tmp_path)
    keeper = issue(state_dir, "ids-kept", tmp_path)
    args = ["--workers", "1", "--events-remote-listen", "127.0.0.1:0"]
    with Gateway(state_dir, upstream_ca=pki["ca"], args=args):
        address = host_port(status(state_dir)["events"]["remote"]["listen"])
        gone, kept = RemoteReader(address, bundle), RemoteReader(address, keeper)
        for sub in (gone, kept):
            sub.wait(lambda ev: any(e["type"] == "hello" for e in ev))
        tlsgate = [sys.executable, "-m", "tlsgate"]
        sd = ["--state-dir", str(state_dir)]
        subprocess.run([*tlsgate, "events-ca", "revoke", "ids-gone", *sd], check=True,
                       capture_output=True, timeout=TIMEOUT)  # fmt: skip
        assert status(state_dir)["events"]["subscribers"] == 2  # effective on reload only
        subprocess.run([*tlsgate, "reload", *sd], check=True, capture_output=True,
                       timeout=TIMEOUT)  # fmt: skip
        deadline = time.monotonic() + TIMEOUT
        while status(state_dir)["events"]["subscribers"] != 1:
            assert time.monotonic() < deadline, "the revoked subscriber is still connected"
            time.sleep(0.05)
        names = [s["name"] for s in status(state_dir)["events"]["per_subscriber"]]
        again = RemoteReader(address, bundle)
        again._thread.join(TIMEOUT)  # type: ignore[union-attr]  # refused: the reader ends
        assert status(state_dir)["events"]["remote"]["refused"]["revoked"] == 1
        for sub in (gone, kept, again):
            sub.close()
    assert [n.split("@")[0] for n in names] == ["tls:ids-kept"]
    assert again.events == []


def test_the_gateway_refuses_to_start_remote_events_without_an_events_ca(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    gw = Gateway(tmp_path / "bare", upstream_ca=pki["ca"],
                 args=["--events-remote-listen", "127.0.0.1:0"])  # fmt: skip
    with pytest.raises(RuntimeError, match=r"there is no events CA .* `tlsgate events-ca init"):
        gw.__enter__()


def test_the_gateway_refuses_an_events_ca_whose_key_others_can_read(
    tmp_path: Path, state_dir: Path, pki: dict[str, Path]
) -> None:
    os.chmod(state_dir / "events-ca" / "key.pem", 0o644)
    gw = Gateway(state_dir, upstream_ca=pki["ca"], args=["--events-remote-listen", "127.0.0.1:0"])
    with pytest.raises(RuntimeError, match=r"key\.pem is accessible by group or other"):
        gw.__enter__()


def test_the_gateway_refuses_the_interception_ca_as_the_subscribers_ca(
    tmp_path: Path, state_dir: Path, pki: dict[str, Path]
) -> None:
    with Gateway(state_dir, upstream_ca=pki["ca"]):
        pass  # creates the interception CA in state_dir/ca
    config = tmp_path / "tlsgate.toml"
    config.write_text(f'[events]\nremote_listen = "127.0.0.1:0"\n'
                      f'remote_ca = "{state_dir / "ca" / "cert.pem"}"\n')  # fmt: skip
    gw = Gateway(state_dir, upstream_ca=pki["ca"], args=["--config", str(config)])
    with pytest.raises(RuntimeError, match="is the interception CA's"):
        gw.__enter__()


# -- the metrics endpoint ---------------------------------------------------------------


def test_the_metrics_endpoint_on_loopback_serves_the_control_sockets_text(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    state = tmp_path / "state"
    with Gateway(state, upstream_ca=pki["ca"], args=["--metrics-listen", "127.0.0.1:0"]) as gw:
        # every worker up (gauges such as the client table's rows in use stop moving), so
        # that the two expositions below can be compared
        st = wait_status(gw, lambda st: all(w["alive"] for w in st["workers"])
                         and st["client_counts"]["rows_in_use"] == len(st["workers"]))  # fmt: skip
        assert st["client_counts"]["rows_in_use"] == len(st["workers"]), st
        listen = st["metrics_endpoint"]["listen"]
        with urllib.request.urlopen(f"http://{listen}/metrics", timeout=TIMEOUT) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            body = response.read().decode()
        control = request(control_socket_path(state), {"cmd": "metrics"})["text"]
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://{listen}/other", timeout=TIMEOUT)
        assert missing.value.code == 404
        missing.value.close()
    assert "tlsgate_connections_active" in body
    # the same exposition (the request counter moved by one in between)
    strip = [line for line in body.splitlines() if "metrics_requests_total" not in line]
    assert strip == [line for line in control.splitlines() if "metrics_requests_total" not in line]


def test_a_metrics_endpoint_on_a_network_address_without_mtls_is_refused_at_start(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    gw = Gateway(tmp_path / "s", upstream_ca=pki["ca"], args=["--metrics-listen", "198.18.0.1:0"])
    with pytest.raises(RuntimeError, match="must use mutual TLS: set \\[metrics\\] mtls = true"):
        gw.__enter__()


@pytest.fixture
def mtls_metrics(tmp_path: Path, state_dir: Path, pki: dict[str, Path]) -> Iterator[str]:
    config = tmp_path / "tlsgate.toml"
    config.write_text('[metrics]\nlisten = "127.0.0.1:0"\nmtls = true\n')
    with Gateway(state_dir, upstream_ca=pki["ca"], args=["--config", str(config)]):
        yield status(state_dir)["metrics_endpoint"]["listen"]


def scrape(listen: str, bundle: Bundle | None, state_dir: Path) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(state_dir / "events-ca" / "cert.pem"))
    if bundle is not None:
        ctx.load_cert_chain(str(bundle.cert), str(bundle.key))
    host, port = host_port(listen)
    with socket.create_connection((host, port), timeout=TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    return data


def test_metrics_over_mtls_need_a_scraper_certificate_of_the_events_ca(
    tmp_path: Path, state_dir: Path, mtls_metrics: str
) -> None:
    scraper = issue(state_dir, "prom-1", tmp_path, ROLE_SCRAPER)
    subscriber = issue(state_dir, "ids-1", tmp_path)
    answer = scrape(mtls_metrics, scraper, state_dir)
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"tlsgate_event_subscribers" in answer
    for bundle in (None, subscriber):
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            scrape(mtls_metrics, bundle, state_dir)
    refused = status(state_dir)["metrics_endpoint"]["refused"]
    assert (refused["no-certificate"], refused["wrong-role"]) == (1, 1)
