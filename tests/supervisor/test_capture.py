"""Opt-in decrypted-traffic export: tshark decodes the HTTP requests made through the gateway
from the pcap files it wrote, with the real client and server addresses."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.gateway import Gateway, Origin

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the supervisor runs as root"),
    pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark"),
]


def test_tshark_decodes_the_requests_made_through_the_gateway_from_its_pcap_files(
    tmp_path: Path, pki: dict[str, Path], origin: Origin
) -> None:
    pcap_dir = tmp_path / "pcap"
    gw = Gateway(tmp_path / "state", upstream_ca=pki["ca"],
                 args=["--workers", "1", "--pcap-dir", str(pcap_dir)])  # fmt: skip
    with gw:
        for path in ("/captured/one?x=1", "/captured/two"):
            result = subprocess.run(
                ["curl", "-sS", "--http1.1", "--max-time", "15", "--proxy", gw.proxy, "--cacert",
                 str(gw.ca_cert), f"https://localhost:{origin.port}{path}"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
        closes = gw.wait_events("conn_close", 2)
    assert all(c["captured_bytes"] > 0 for c in closes)
    files = sorted(pcap_dir.glob("*.pcap"))
    assert files, list(pcap_dir.iterdir())
    rows = []
    for f in files:
        out = subprocess.run(
            ["tshark", "-r", str(f), "-Y", "http.request", "-T", "fields", "-e", "ip.src",
             "-e", "tcp.srcport", "-e", "ip.dst", "-e", "tcp.dstport", "-e",
             "http.request.method", "-e", "http.host", "-e", "http.request.uri"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        rows += [line.split("\t") for line in out.splitlines() if line]
    client_ports = {c["client_port"] for c in closes}
    assert sorted(r[6] for r in rows) == ["/captured/one?x=1", "/captured/two"]
    for src, sport, dst, dport, method, host, _uri in rows:
        assert (src, dst, method) == ("127.0.0.1", "127.0.0.1", "GET")
        assert int(sport) in client_ports and int(dport) == origin.port
        assert host == f"localhost:{origin.port}"


def test_a_pcap_over_ip_client_receives_a_stream_tshark_decodes(
    tmp_path: Path, pki: dict[str, Path], origin: Origin
) -> None:
    import socket
    import threading

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gw = Gateway(tmp_path / "state", upstream_ca=pki["ca"],
                 args=["--workers", "1", "--pcap-over-ip", f"127.0.0.1:{port}"])  # fmt: skip
    received = bytearray()
    with gw:
        deadline = time.monotonic() + 20
        while True:  # the worker binds it when it boots, after the banner
            try:
                client = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "no PCAP-over-IP listener"
                time.sleep(0.05)

        def read() -> None:
            try:
                while chunk := client.recv(65536):
                    received.extend(chunk)
            except OSError:
                return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        result = subprocess.run(
            ["curl", "-sS", "--http1.1", "--max-time", "15", "--proxy", gw.proxy, "--cacert",
             str(gw.ca_cert), f"https://localhost:{origin.port}/streamed?over=ip"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        gw.wait_events("conn_close", 1)
    reader.join(10)  # the gateway's exit ends the stream
    client.close()
    stream = tmp_path / "stream.pcap"
    stream.write_bytes(bytes(received))
    out = subprocess.run(
        ["tshark", "-r", str(stream), "-Y", "http.request", "-T", "fields", "-e",
         "http.request.method", "-e", "http.request.uri"],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    assert out.split() == ["GET", "/streamed?over=ip"]
