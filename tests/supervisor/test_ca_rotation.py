"""CA rotation without downtime: a new CA stored while the gateway runs is loaded on reload,
the certificate cache is emptied, tunnels already open keep working, and both CA
certificates can be exported for clients in transition."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path

from cryptography import x509

from tests.gateway import Gateway, Origin
from tlsgate.supervisor.ca import init_ca, sha256_fingerprint


def tlsgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tlsgate", *args], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def curl(gw: Gateway, origin: Origin, cafile: Path, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--proxy", gw.proxy, "--cacert", str(cafile),
         f"https://localhost:{origin.port}{path}"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip


def get(tls: ssl.SSLSocket, path: str) -> bytes:
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    answer = b""
    want = f"hello from {path}\n".encode()
    while not answer.endswith(want):
        chunk = tls.recv(4096)
        assert chunk, answer
        answer += chunk
    return answer


def test_reload_loads_a_new_ca_clients_trusting_only_it_succeed_and_open_tunnels_continue(
    tmp_path: Path, pki: dict[str, Path], origin: Origin
) -> None:
    state = tmp_path / "state"
    with Gateway(state, upstream_ca=pki["ca"], args=["--workers", "2"]) as gw:
        old_ca = tmp_path / "old-ca.pem"
        old_ca.write_bytes(gw.ca_cert.read_bytes())
        assert curl(gw, origin, old_ca, "/before").returncode == 0
        # a tunnel opened under the old CA, kept open across the rotation
        raw = socket.create_connection((gw.host, gw.port), timeout=10)
        raw.sendall(f"CONNECT localhost:{origin.port} HTTP/1.1\r\n\r\n".encode())
        assert raw.recv(1024).startswith(b"HTTP/1.1 200")
        ctx = ssl.create_default_context(cafile=str(old_ca))
        with ctx.wrap_socket(raw, server_hostname="localhost") as in_flight:
            get(in_flight, "/in-flight-1")

            new = init_ca(state, force=True)  # what `tlsgate ca init --force` does
            new_ca = tmp_path / "new-ca.pem"
            exported = tlsgate("ca", "export", "--state-dir", str(state))
            new_ca.write_text(exported.stdout)
            reload = tlsgate("reload", "--state-dir", str(state))
            assert reload.returncode == 0, reload.stderr

            only_new = curl(gw, origin, new_ca, "/after")
            assert only_new.returncode == 0, only_new.stderr
            assert only_new.stdout == "hello from /after\n"
            only_old = curl(gw, origin, old_ca, "/after-old")
            assert only_old.returncode == 60, only_old.stderr  # curl: certificate not trusted

            get(in_flight, "/in-flight-2")  # the tunnel from before the reload is unaffected

        status = json.loads(tlsgate("status", "--json", "--state-dir", str(state)).stdout)
        assert status["ca"]["fingerprint_sha256"] == new.fingerprint_sha256
        assert status["reloads"] == 1

        bundle = tlsgate("ca", "export", "--all", "--state-dir", str(state)).stdout
        both = x509.load_pem_x509_certificates(bundle.encode())
        old_cert = x509.load_pem_x509_certificate(old_ca.read_bytes())
        assert [sha256_fingerprint(c) for c in both] == [
            new.fingerprint_sha256, sha256_fingerprint(old_cert)
        ]  # fmt: skip
        transition = tmp_path / "both.pem"
        transition.write_text(bundle)
        assert curl(gw, origin, transition, "/bundle").returncode == 0


def test_export_all_without_a_previous_ca_is_the_current_one(tmp_path: Path) -> None:
    init_ca(tmp_path / "state")
    one = tlsgate("ca", "export", "--state-dir", str(tmp_path / "state"))
    every = tlsgate("ca", "export", "--all", "--state-dir", str(tmp_path / "state"))
    assert every.returncode == 0 and every.stdout == one.stdout
    assert len(x509.load_pem_x509_certificates(every.stdout.encode())) == 1
    der = tlsgate("ca", "export", "--all", "--der", "--state-dir", str(tmp_path / "state"))
    assert der.returncode == 2 and "--all" in der.stderr


def test_replacing_a_ca_keeps_the_old_certificate_as_previous(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = init_ca(state)
    init_ca(state, force=True)
    previous = x509.load_pem_x509_certificate((state / "ca" / "previous.pem").read_bytes())
    assert sha256_fingerprint(previous) == first.fingerprint_sha256
    assert (state / "ca" / "previous.pem").stat().st_mode & 0o777 == 0o644
