"""h2load and nghttp (nghttp2's own clients, which cannot use a proxy) through a
transparent gateway: client ns → gateway ns (nftables REDIRECT) → server ns with hypercorn."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.gateway import Gateway
from tests.h2_server import H2Origin
from tests.netns import ALLOW_TEST_CLIENTS, Topology, requires_netns
from tests.workers.test_transparent import REDIRECT_RULES

pytestmark = [
    requires_netns,
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nftables (nft)"),
    pytest.mark.skipif(shutil.which("h2load") is None, reason="needs h2load (nghttp2-client)"),
]


@pytest.fixture
def topology() -> Iterator[Topology]:
    with Topology() as topo:
        yield topo


def test_h2load_multiplexed_streams_and_nghttp_server_push_through_a_transparent_gateway(
    topology: Topology, tmp_path: Path
) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert(topology.server_ip)  # h2load and nghttp connect by address (no SNI)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    (tmp_path / "cert.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    topology.gateway_nft(REDIRECT_RULES.format(port=8443))
    with (
        H2Origin(tmp_path / "cert.pem", tmp_path / "key.pem", host=topology.server_ip, port=443,
                 netns=topology.server),
        Gateway(tmp_path / "state", upstream_ca=tmp_path / "ca.pem",
                listen=f"{topology.gateway_client_ip}:8443", netns=topology.gateway,
                args=["--mode", "transparent", "--workers", "1", *ALLOW_TEST_CLIENTS]) as gw,
    ):  # fmt: skip
        url = f"https://{topology.server_ip}"
        h2load = ["h2load", "-n", "40", "-c", "2", "-m", "10", f"{url}/size/1000"]
        load = topology.run(topology.client, h2load, check=False, timeout=60)
        out = load.stdout.decode()
        assert load.returncode == 0, out + load.stderr.decode()
        assert "40 succeeded" in out and "Application protocol: h2" in out
        http = gw.wait_events("http", 40, timeout=20)
        assert len(http) == 40
        conns = {e["conn"] for e in http}
        assert len(conns) == 2
        for conn in conns:
            ids = sorted(e["stream_id"] for e in http if e["conn"] == conn)
            assert ids == list(range(1, 41, 2)), "20 streams per connection, odd ids"
        for e in http:
            assert e["http_version"] == "2" and e["status"] == 200 and e["complete"]
            assert e["response_body_bytes"] == 1000 and e["path"] == "/size/1000"
            assert e["user_agent"].startswith("h2load")
        push = topology.run(topology.client, ["nghttp", "-n", f"{url}/push"], check=False,
                            timeout=30)  # fmt: skip
        assert push.returncode == 0, push.stderr
        pushed = gw.wait_match("http", lambda e: e["pushed"], timeout=20)
        assert [e["path"] for e in pushed] == ["/pushed.css"]
        assert pushed[0]["status"] == 200 and pushed[0]["stream_id"] % 2 == 0
        assert not gw.events("protocol_error")
