"""End to end, explicit mode: real `tlsgate run`, real origin server, real clients (curl,
openssl s_client, Python ssl) on loopback."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from tests.gateway import Gateway, Origin

CURL_TIMEOUT = 20


@pytest.fixture(scope="module")
def upstream_ca(tmp_path_factory: pytest.TempPathFactory) -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory, upstream_ca: trustme.CA) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    leaf = upstream_ca.issue_cert("localhost", "server.test", "127.0.0.1")
    paths = {"ca": d / "ca.pem", "cert": d / "cert.pem", "key": d / "key.pem"}
    upstream_ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    with paths["cert"].open("wb") as fh:
        for blob in leaf.cert_chain_pems:
            fh.write(blob.bytes())
    other = trustme.CA().issue_cert("localhost", "127.0.0.1")
    paths["untrusted_cert"] = d / "untrusted.pem"
    paths["untrusted_key"] = d / "untrusted-key.pem"
    other.private_key_pem.write_to_path(str(paths["untrusted_key"]))
    with paths["untrusted_cert"].open("wb") as fh:
        for blob in other.cert_chain_pems:
            fh.write(blob.bytes())
    return paths


@pytest.fixture(scope="module")
def origin(pki: dict[str, Path]) -> Iterator[Origin]:
    with Origin(pki["cert"], pki["key"], alpn="http/1.1") as server:
        yield server


@pytest.fixture(scope="module")
def origin_without_alpn(pki: dict[str, Path]) -> Iterator[Origin]:
    with Origin(pki["cert"], pki["key"]) as server:
        yield server


@pytest.fixture(scope="module")
def untrusted_origin(pki: dict[str, Path]) -> Iterator[Origin]:
    with Origin(pki["untrusted_cert"], pki["untrusted_key"]) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]) -> Iterator[Gateway]:
    state = tmp_path_factory.mktemp("state")
    with Gateway(state, upstream_ca=pki["ca"], args=["--block", "blocked.test"]) as gw:
        yield gw


def curl(gw: Gateway, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "15", "--proxy", gw.proxy, "--cacert", str(gw.ca_cert),
         *extra, url],
        capture_output=True, text=True, timeout=CURL_TIMEOUT,
    )  # fmt: skip


def test_curl_through_the_proxy_gets_the_page_and_an_http_event_is_reported(
    gateway: Gateway, origin: Origin
) -> None:
    url = f"https://localhost:{origin.port}/first?q=1"
    result = curl(gateway, url, "--http1.1", "-H", "Authorization: Bearer s3cret")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from /first?q=1\n"
    events = [e for e in gateway.wait_events("http", 1) if e["path"] == "/first?q=1"]
    assert len(events) == 1
    http = events[0]
    assert http["method"] == "GET"
    assert http["host"] == f"localhost:{origin.port}"
    assert http["status"] == 200
    assert http["sni"] == "localhost"
    assert http["response_body_bytes"] == len(result.stdout)
    assert http["content_type"].startswith("text/plain")
    request_headers = dict(http["request_headers"])
    assert request_headers["authorization"] == "[redacted]"
    assert "s3cret" not in repr(gateway.events())
    assert dict(http["response_headers"])["set-cookie"] == "[redacted]"


def test_connection_events_carry_fingerprints_versions_and_the_upstream_verdict(
    gateway: Gateway, origin: Origin
) -> None:
    result = curl(gateway, f"https://localhost:{origin.port}/verdict", "--http1.1")
    assert result.returncode == 0, result.stderr
    http = gateway.wait_match("http", lambda e: e["path"] == "/verdict")
    conn = http[0]["conn"]
    close = gateway.wait_match("conn_close", lambda e: e["conn"] == conn)[0]
    opened = gateway.wait_match("conn_open", lambda e: e["conn"] == conn)[0]
    assert opened["decision"] == "intercept"
    assert opened["ja4"].startswith("t13d")
    assert len(opened["ja3_hash"]) == 32
    assert opened["connect_host"] == "localhost"
    assert close["upstream_verdict"] == "valid"
    assert close["client_tls_version"] == "TLSv1.3"
    assert close["upstream_tls_version"]
    assert len(close["upstream_fingerprint_sha256"].replace(":", "")) == 64
    assert close["bytes_from_server"] > 0 and close["bytes_from_client"] > 0
    for event in (opened, close):
        assert {"type", "version", "ts", "worker", "seq"} <= event.keys()


def test_an_untrusted_upstream_gets_502_with_the_reason_and_no_certificate_is_minted(
    gateway: Gateway, untrusted_origin: Origin
) -> None:
    result = curl(gateway, f"https://localhost:{untrusted_origin.port}/", "-v")
    assert result.returncode != 0
    assert "502" in result.stderr
    mine = lambda e: e["server_port"] == untrusted_origin.port  # noqa: E731
    refused = gateway.wait_match("upstream_refused", mine)
    assert refused and refused[0]["category"] in {"untrusted-root", "self-signed"}
    closes = gateway.wait_match("conn_close", mine)
    assert closes and closes[0]["client_tls_version"] is None
    assert closes[0]["upstream_verdict"] == "refused"


def test_the_502_body_names_the_reason_in_one_line(
    gateway: Gateway, untrusted_origin: Origin
) -> None:
    with socket.create_connection((gateway.host, gateway.port), timeout=10) as sock:
        sock.sendall(f"CONNECT localhost:{untrusted_origin.port} HTTP/1.1\r\n"
                     f"Host: localhost\r\n\r\n".encode())  # fmt: skip
        answer = sock.makefile("rb").read().decode()
    assert answer.startswith("HTTP/1.1 502 ")
    body = answer.split("\r\n\r\n", 1)[1]
    assert body.count("\n") <= 1 and "certificate" in body.lower()


def test_openssl_s_client_sees_a_leaf_minted_by_the_gateway_ca(
    gateway: Gateway, origin: Origin, tmp_path: Path
) -> None:
    result = subprocess.run(
        ["openssl", "s_client", "-proxy", f"{gateway.host}:{gateway.port}", "-connect",
         f"localhost:{origin.port}", "-servername", "localhost", "-CAfile", str(gateway.ca_cert),
         "-verify_return_error", "-alpn", "http/1.1", "-showcerts"],
        input="", capture_output=True, text=True, timeout=CURL_TIMEOUT,
    )  # fmt: skip
    assert "Verify return code: 0 (ok)" in result.stdout, result.stdout + result.stderr
    assert "ALPN protocol: http/1.1" in result.stdout
    pem = result.stdout[result.stdout.index("-----BEGIN CERTIFICATE-----") :]
    pem = pem[: pem.index("-----END CERTIFICATE-----") + 25]
    leaf = x509.load_pem_x509_certificate(pem.encode())
    ca = x509.load_pem_x509_certificate(gateway.ca_cert.read_bytes())
    assert leaf.issuer == ca.subject
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)


def test_keep_alive_requests_on_one_tunnel_each_produce_an_http_event(
    gateway: Gateway, origin: Origin
) -> None:
    ctx = ssl.create_default_context(cafile=str(gateway.ca_cert))
    conn = http.client.HTTPSConnection(gateway.host, gateway.port, context=ctx, timeout=10)
    conn.set_tunnel("localhost", origin.port)
    paths = [f"/keepalive/{i}" for i in range(5)]
    for path in paths:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.read() == f"hello from {path}\n".encode()
    conn.request("HEAD", "/keepalive/head")
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b""
    conn.request("POST", "/echo", body=b"z" * 5000)
    assert conn.getresponse().read() == b"z" * 5000
    conn.close()
    mine: list[dict[str, object]] = []
    for _ in range(200):
        events = gateway.wait_events("http", 1)
        mine = [e for e in events if e["path"].startswith("/keepalive/") or e["path"] == "/echo"]
        if len(mine) == len(paths) + 2:
            break
        time.sleep(0.05)
    assert len({e["conn"] for e in mine}) == 1
    assert [e["path"] for e in mine] == [*paths, "/keepalive/head", "/echo"]
    assert mine[-2]["method"] == "HEAD" and mine[-2]["response_body_bytes"] == 0
    assert mine[-1]["request_body_bytes"] == 5000 and mine[-1]["response_body_bytes"] == 5000


def test_the_client_is_answered_the_alpn_the_upstream_selected_and_none_when_it_chose_none(
    gateway: Gateway, origin: Origin, origin_without_alpn: Origin
) -> None:
    def negotiated(port: int) -> str:
        result = subprocess.run(
            ["openssl", "s_client", "-proxy", f"{gateway.host}:{gateway.port}", "-connect",
             f"localhost:{port}", "-servername", "localhost", "-CAfile", str(gateway.ca_cert),
             "-alpn", "h2,http/1.1"],
            input="", capture_output=True, text=True, timeout=CURL_TIMEOUT,
        )  # fmt: skip
        assert "Verify return code: 0 (ok)" in result.stdout, result.stdout + result.stderr
        return next(line for line in result.stdout.splitlines() if "ALPN" in line)

    assert negotiated(origin.port) == "ALPN protocol: http/1.1"
    assert negotiated(origin_without_alpn.port) == "No ALPN negotiated"


def test_a_blocked_name_gets_403_and_a_policy_event(gateway: Gateway, origin: Origin) -> None:
    result = curl(gateway, f"https://blocked.test:{origin.port}/", "-v")
    assert result.returncode != 0 and "403" in result.stderr
    policy = [e for e in gateway.wait_events("policy", 1) if e["name"] == "blocked.test"]
    assert policy and policy[0]["decision"] == "block"


def test_garbage_instead_of_a_client_hello_is_reported_and_the_gateway_keeps_serving(
    gateway: Gateway, origin: Origin
) -> None:
    with socket.create_connection((gateway.host, gateway.port), timeout=10) as sock:
        sock.sendall(f"CONNECT localhost:{origin.port} HTTP/1.1\r\n\r\n".encode())
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: plain\r\n\r\n")
        rest = sock.recv(1024)
        assert rest[:1] in (b"", b"\x15")  # closed, or a TLS alert record
    errors = [e for e in gateway.wait_events("protocol_error", 1) if e["stage"] == "client_hello"]
    assert errors and "TLS" in errors[-1]["error"]
    again = curl(gateway, f"https://localhost:{origin.port}/after-garbage", "--http1.1")
    assert again.returncode == 0, again.stderr


def test_a_request_that_is_not_connect_gets_405(gateway: Gateway) -> None:
    with socket.create_connection((gateway.host, gateway.port), timeout=10) as sock:
        sock.sendall(b"GET http://example.test/ HTTP/1.1\r\nHost: example.test\r\n\r\n")
        answer = sock.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.1 405 ")


def test_the_gateway_refuses_to_start_when_the_ca_key_is_readable_by_others(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    with Gateway(tmp_path, upstream_ca=pki["ca"]):
        pass
    key = tmp_path / "ca" / "key.pem"
    os.chmod(key, 0o644)
    result = subprocess.run(
        [*Gateway(tmp_path, upstream_ca=pki["ca"]).argv], capture_output=True, text=True,
        timeout=20,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "chmod 600" in lines[0]


def test_an_encrypted_ca_key_is_unlocked_from_a_file_descriptor_and_never_from_argv(
    tmp_path: Path, pki: dict[str, Path], origin: Origin
) -> None:
    secret = tmp_path / "pass"
    secret.write_bytes(b"correct horse battery staple\n")
    secret.chmod(0o600)
    state = tmp_path / "state"
    init = subprocess.run(
        [sys.executable, "-m", "tlsgate", "ca", "init", "--state-dir", str(state),
         "--passphrase-file", str(secret)],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    assert b"ENCRYPTED" in (state / "ca" / "key.pem").read_bytes()
    locked = subprocess.run(
        Gateway(state, upstream_ca=pki["ca"]).argv, capture_output=True, text=True, timeout=20
    )
    assert locked.returncode == 2
    assert len(locked.stderr.strip().splitlines()) == 1 and "passphrase" in locked.stderr

    read_end, write_end = os.pipe()
    os.write(write_end, b"correct horse battery staple\n")
    os.close(write_end)
    gateway = Gateway(state, upstream_ca=pki["ca"], args=["--ca-passphrase-fd", str(read_end)])
    gateway.pass_fds = (read_end,)
    with gateway:
        os.close(read_end)
        result = curl(gateway, f"https://localhost:{origin.port}/unlocked")
        assert result.returncode == 0, result.stderr


def test_a_client_that_only_speaks_tls_1_1_is_refused(gateway: Gateway, origin: Origin) -> None:
    result = subprocess.run(
        ["openssl", "s_client", "-proxy", f"{gateway.host}:{gateway.port}", "-connect",
         f"localhost:{origin.port}", "-servername", "localhost", "-tls1_1", "-cipher",
         "DEFAULT@SECLEVEL=0"],
        input="", capture_output=True, text=True, timeout=CURL_TIMEOUT,
    )  # fmt: skip
    assert result.returncode != 0
    assert "no peer certificate available" in result.stdout  # no minted leaf was sent
    assert "BEGIN CERTIFICATE" not in result.stdout


def test_curl_trusts_the_certificate_that_tlsgate_ca_export_prints(
    gateway: Gateway, origin: Origin, tmp_path: Path
) -> None:
    exported = subprocess.run(
        [sys.executable, "-m", "tlsgate", "ca", "export", "--state-dir", str(gateway.state_dir)],
        capture_output=True, timeout=20, check=True,
    ).stdout  # fmt: skip
    assert exported.startswith(b"-----BEGIN CERTIFICATE-----")
    ca_file = tmp_path / "exported.pem"
    ca_file.write_bytes(exported)
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "15", "--proxy", gateway.proxy, "--cacert", str(ca_file),
         f"https://localhost:{origin.port}/exported"],
        capture_output=True, text=True, timeout=CURL_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from /exported\n"


def hello_through_tunnel(
    gw: Gateway, connect_host: str, port: int, sni: str
) -> tuple[x509.Certificate | None, str]:
    """CONNECT to ``connect_host`` then a TLS handshake offering ``sni``: the leaf the
    gateway presented (or None) and the error text if the handshake failed."""
    ctx = ssl.create_default_context(cafile=str(gw.ca_cert))
    raw = socket.create_connection((gw.host, gw.port), timeout=10)
    raw.sendall(f"CONNECT {connect_host}:{port} HTTP/1.1\r\n\r\n".encode())
    head = raw.recv(1024)
    assert head.startswith(b"HTTP/1.1 200"), head
    try:
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der), ""
    except ssl.SSLError as exc:
        return None, str(exc)


def test_an_sni_other_than_the_connect_host_is_validated_itself_and_gets_its_own_leaf(
    gateway: Gateway, origin: Origin
) -> None:
    leaf, error = hello_through_tunnel(gateway, "127.0.0.1", origin.port, "server.test")
    assert error == "" and leaf is not None
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "server.test" in names.get_values_for_type(x509.DNSName)


def test_an_sni_the_upstream_certificate_does_not_cover_is_refused_after_the_tunnel_opened(
    gateway: Gateway, origin: Origin
) -> None:
    leaf, error = hello_through_tunnel(gateway, "localhost", origin.port, "bank.example")
    assert leaf is None and "alert" in error.lower()
    refused = gateway.wait_match("upstream_refused", lambda e: e["name"] == "bank.example")
    assert refused and refused[0]["category"] == "hostname-mismatch"
