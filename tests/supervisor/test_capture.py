"""Opt-in decrypted-traffic export: tshark decodes the HTTP requests made through the gateway
from the pcap files it wrote, with the real client and server addresses."""

from __future__ import annotations

import os
import shutil
import subprocess
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
