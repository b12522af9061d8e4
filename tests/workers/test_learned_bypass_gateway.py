"""The learned bypass in a real gateway (explicit mode, loopback): a client that pins the
origin's CA teaches it, is spliced while it lasts, and is intercepted again once it expired.
The namespace tests (test_mail_transparent.py) cover transparent mode and `tlsgate status`."""

from __future__ import annotations

import http.client
import ssl
import time
from pathlib import Path

from tests.gateway import Gateway, Origin


def pinned_get(gw: Gateway, origin: Origin, ca: Path) -> str:
    """GET through the proxy trusting only the origin's CA (what a pinned app does)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection(gw.host, gw.port, context=ctx, timeout=15)
    conn.set_tunnel("localhost", origin.port)
    try:
        conn.request("GET", "/pinned")
        return conn.getresponse().read().decode()
    except ssl.SSLCertVerificationError as exc:
        return f"rejected: {exc.verify_message}"
    finally:
        conn.close()


def test_learned_names_are_spliced_until_they_expire_then_intercepted_again(
    tmp_path: Path, pki: dict[str, Path], origin: Origin
) -> None:
    config = tmp_path / "tlsgate.toml"
    config.write_text("[learned_bypass]\nthreshold = 2\nwindow = 30.0\nttl = 2.0\n")
    with Gateway(tmp_path / "gw", upstream_ca=pki["ca"], args=[
        "--workers", "1", "--config", str(config), "--learn-bypass",
    ]) as gw:  # fmt: skip
        assert pinned_get(gw, origin, pki["ca"]).startswith("rejected")
        assert gw.events("bypass_learned") == []  # one rejection is below the threshold
        assert pinned_get(gw, origin, pki["ca"]).startswith("rejected")
        (learned,) = gw.wait_events("bypass_learned")
        assert learned["name"] == "localhost" and learned["kind"] == "unknown_ca"
        assert pinned_get(gw, origin, pki["ca"]) == "hello from /pinned\n"  # spliced
        (expired,) = gw.wait_events("bypass_expired", timeout=10)
        assert expired["name"] == "localhost" and expired["reason"] == "ttl"
        assert expired["spliced"] == 1
        time.sleep(0.2)
        assert pinned_get(gw, origin, pki["ca"]).startswith("rejected")  # intercepted again
        decisions = [e["decision"] for e in gw.wait_events("conn_close", 4)]
        assert decisions == ["intercept", "intercept", "bypass", "intercept"]


def test_a_client_that_hangs_up_right_after_the_handshake_teaches_it_too(
    tmp_path: Path, pki: dict[str, Path], origin: Origin
) -> None:
    # pinning libraries that check the certificate after the handshake (OkHttp's
    # CertificatePinner, for one) complete it and then close without sending a byte
    import socket

    config = tmp_path / "tlsgate.toml"
    config.write_text("[learned_bypass]\nenabled = true\nthreshold = 2\n")
    with Gateway(tmp_path / "gw", upstream_ca=pki["ca"],
                 args=["--workers", "1", "--config", str(config)]) as gw:  # fmt: skip
        ctx = ssl.create_default_context(cafile=str(gw.ca_cert))
        for _ in range(2):
            with socket.create_connection((gw.host, gw.port), timeout=15) as raw:
                raw.sendall(f"CONNECT localhost:{origin.port} HTTP/1.1\r\n\r\n".encode())
                assert raw.recv(4096).startswith(b"HTTP/1.1 200")
                with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    assert tls.version() is not None  # the handshake completed
        (learned,) = gw.wait_events("bypass_learned")
        assert learned["kind"] == "closed-after-handshake" and learned["name"] == "localhost"


def test_without_opting_in_nothing_is_learned(
    tmp_path: Path, pki: dict[str, Path], origin: Origin
) -> None:
    with Gateway(tmp_path / "gw", upstream_ca=pki["ca"], args=["--workers", "1"]) as gw:
        for _ in range(4):
            assert pinned_get(gw, origin, pki["ca"]).startswith("rejected")
        assert len(gw.wait_events("conn_close", 4)) == 4
        assert gw.events("bypass_learned") == []
