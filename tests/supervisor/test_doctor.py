"""`tlsgate doctor`: versions judged against support dates, eBPF readiness, CA and state
permissions and CA expiry; exit 1 when something is unsafe, human and JSON output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tlsgate.supervisor import doctor
from tlsgate.supervisor.ca import init_ca
from tlsgate.supervisor.doctor import FAIL, OK, WARN

TODAY = date(2026, 11, 28)


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("OpenSSL 1.1.1w  11 Sep 2023", FAIL),  # older than 3.0
        ("OpenSSL 1.0.2u  20 Dec 2019", FAIL),
        ("OpenSSL 3.0.19 27 Jan 2026", FAIL),  # 3.0 ended 2026-09-07
        ("OpenSSL 3.6.0 1 Oct 2025", FAIL),  # 3.6 ended 2026-11-01
        ("OpenSSL 3.5.4 30 Sep 2025", OK),  # LTS until 2030
        ("OpenSSL 4.0.3 29 Sep 2026", OK),
        ("OpenSSL 9.9.0", WARN),  # unknown line: look it up
        ("LibreSSL", WARN),  # cannot tell
    ],
)
def test_openssl_on_the_traffic_path_fails_when_older_than_3_or_past_end_of_life(
    text: str, status: str
) -> None:
    assert doctor.judge_openssl("openssl", text, TODAY, on_traffic_path=True).status == status


def test_openssl_close_to_end_of_life_warns_and_off_the_traffic_path_only_warns() -> None:
    near = doctor.judge_openssl("o", "OpenSSL 3.0.19", date(2026, 7, 1), on_traffic_path=True)
    assert near.status == WARN and "2026-09-07" in near.detail
    stdlib = doctor.judge_openssl("o", "OpenSSL 1.1.1w", TODAY, on_traffic_path=False)
    assert stdlib.status == WARN


def test_libraries_older_than_tlsgate_needs_fail_and_old_kernels_warn() -> None:
    assert doctor.judge_minimum("pyOpenSSL", "25.3.0", (26, 0)).status == FAIL
    assert doctor.judge_minimum("pyOpenSSL", "26.4.0", (26, 0)).status == OK
    assert doctor.judge_kernel("5.10.0-28-amd64").status == WARN
    assert doctor.judge_kernel("6.1.0-18-amd64").status == OK


def test_ca_expiry_warns_within_90_days_and_fails_once_expired() -> None:
    now = datetime(2026, 11, 28, tzinfo=UTC)
    start = now - timedelta(days=365)
    assert doctor.judge_ca_expiry(start, now + timedelta(days=400), now).status == OK
    assert doctor.judge_ca_expiry(start, now + timedelta(days=30), now).status == WARN
    assert doctor.judge_ca_expiry(start, now - timedelta(days=1), now).status == FAIL
    assert doctor.judge_ca_expiry(now + timedelta(days=1), now + timedelta(days=9), now).status == (
        FAIL
    )


def run_doctor(state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tlsgate", "doctor", "--state-dir", str(state), *extra],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_doctor_on_a_healthy_state_dir_reports_versions_and_exits_0(tmp_path: Path) -> None:
    state = tmp_path / "state"
    init_ca(state)
    result = run_doctor(state, "--json")
    assert result.returncode == 0, result.stdout
    report = json.loads(result.stdout)
    assert report["ok"] is True
    from OpenSSL import SSL

    linked = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    assert report["versions"]["openssl (pyOpenSSL)"] == linked
    assert {"pyOpenSSL", "cryptography", "bcc", "kernel"} <= set(report["versions"])
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["ca key"]["status"] == OK and by_name["ca expiry"]["status"] == OK
    if os.geteuid() == 0:  # CI runs as root with bcc and headers: the program must load
        assert by_name["ebpf steering"] == {
            "name": "ebpf steering", "status": OK, "detail": "the steering program loads",
        }  # fmt: skip
    human = run_doctor(state, "--no-load")
    assert human.returncode == 0
    assert "[  OK] ca key:" in human.stdout and "openssl (pyOpenSSL)" in human.stdout


def test_a_ca_key_readable_by_others_makes_doctor_fail_with_the_fix(tmp_path: Path) -> None:
    state = tmp_path / "state"
    init_ca(state)
    key = state / "ca" / "key.pem"
    os.chmod(key, 0o644)
    result = run_doctor(state, "--no-load")
    assert result.returncode == 1
    assert f"[FAIL] ca key: {key} has mode 0644; run chmod 600 {key}" in result.stdout
    assert "UNSAFE" in result.stdout


def test_an_open_state_dir_makes_doctor_fail(tmp_path: Path) -> None:
    state = tmp_path / "state"
    init_ca(state)
    os.chmod(state, 0o755)
    report = json.loads(run_doctor(state, "--no-load", "--json").stdout)
    assert report["ok"] is False
    assert [c["status"] for c in report["checks"] if c["name"] == "state dir"] == [FAIL]


def test_an_expired_ca_certificate_makes_doctor_fail(tmp_path: Path) -> None:
    state = tmp_path / "state"
    init_ca(state)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired tlsgate CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=30)).not_valid_after(now - timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (state / "ca" / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    result = run_doctor(state, "--no-load")
    assert result.returncode == 1
    assert "[FAIL] ca expiry: the CA certificate expired on" in result.stdout
