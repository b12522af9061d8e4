"""The squid peer without a network: its configuration (squid itself parses it when
installed) and its on-demand install, which never lets apt start squid's system service."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tlsgate.loadtest import proxies
from tlsgate.loadtest.proxies import PEER_PORT, ProxyError, install_squid, squid_config
from tlsgate.loadtest.suite import settings_from_args


def _conf_lines(rundir: Path) -> list[str]:
    text = squid_config(rundir, port=PEER_PORT, client_net="198.18.10.2/32")
    # a line that ends in a backslash goes on in the next one (squid's continuation)
    return [line for line in text.replace("\\\n", "").splitlines() if not line.startswith("#")]


def test_squid_intercepts_on_the_peer_port_and_mints_with_the_ca_of_its_run_dir(
    tmp_path: Path,
) -> None:
    lines = _conf_lines(tmp_path)
    (https_port,) = [x for x in lines if x.startswith("https_port ")]
    words = https_port.split()
    assert words[1] == f"0.0.0.0:{PEER_PORT}"
    assert {"intercept", "ssl-bump", "generate-host-certificates=on"} <= set(words)
    assert f"tls-cert={tmp_path}/ca.pem" in words and f"tls-key={tmp_path}/ca-key.pem" in words
    assert f"sslcrtd_program {proxies.SQUID_CERTGEN} -s {tmp_path}/ssl_db -M 16MB" in lines
    # peek at the ClientHello (SNI), then bump: the same interception the others do
    assert lines.index("ssl_bump peek step1") < lines.index("ssl_bump bump all")
    assert "acl step1 at_step SslBump1" in lines


def test_squid_validates_upstream_with_the_test_ca_and_serves_only_the_client_net(
    tmp_path: Path,
) -> None:
    lines = _conf_lines(tmp_path)
    assert f"tls_outgoing_options cafile={tmp_path}/upstream-ca.pem" in lines
    assert "acl loadclients src 198.18.10.2/32" in lines
    access = [x for x in lines if x.startswith("http_access ")]
    assert access == ["http_access allow loadclients", "http_access deny all"]


def test_squid_runs_as_one_uncached_process_with_its_files_in_the_run_dir(tmp_path: Path) -> None:
    lines = _conf_lines(tmp_path)
    assert "workers 1" in lines
    assert "cache deny all" in lines and not any(x.startswith("cache_dir") for x in lines)
    assert "access_log none" in lines
    for key in ("cache_log", "pid_filename", "hosts_file", "coredump_dir"):
        (line,) = [x for x in lines if x.startswith(key + " ")]
        assert line.split()[1].startswith(str(tmp_path)), line
    # a stop does not wait 30 s for clients (the suite stops the load first)
    assert "shutdown_lifetime 1 seconds" in lines


@pytest.mark.skipif(
    not proxies.SQUID_CERTGEN.exists(), reason="squid-openssl is not installed (it is on demand)"
)
def test_squid_itself_accepts_the_configuration(tmp_path: Path) -> None:
    from tlsgate.loadtest.proxies import _peer_ca

    ca = _peer_ca(tmp_path)
    (tmp_path / "ca.pem").write_bytes((ca / "cert.pem").read_bytes())
    (tmp_path / "ca-key.pem").write_bytes((ca / "key.pem").read_bytes())
    (tmp_path / "upstream-ca.pem").write_bytes((ca / "cert.pem").read_bytes())
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    conf = tmp_path / "squid.conf"
    conf.write_text(squid_config(tmp_path, port=PEER_PORT, client_net="198.18.10.2/32"))
    done = subprocess.run(
        [str(proxies.SQUID), "-k", "parse", "-f", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "FATAL" not in done.stderr and "ERROR" not in done.stderr, done.stderr[-2000:]


@pytest.fixture
def fake_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """squid, its certgen and policy-rc.d at paths of the test; no apt, no real processes."""
    monkeypatch.setattr(proxies, "SQUID", tmp_path / "squid")
    monkeypatch.setattr(proxies, "SQUID_CERTGEN", tmp_path / "security_file_certgen")
    monkeypatch.setattr(proxies, "POLICY_RC_D", tmp_path / "policy-rc.d")
    monkeypatch.setattr(proxies, "squid_pids", lambda: [])
    monkeypatch.setattr(proxies.shutil, "which", lambda tool: None)
    return tmp_path


def test_apt_installs_squid_openssl_with_service_starts_forbidden_then_the_policy_is_gone(
    fake_system: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, int]] = []

    def apt(package: str) -> None:
        policy = fake_system / "policy-rc.d"
        rc = subprocess.run([str(policy), "squid", "start"], check=False).returncode
        seen.append((package, rc))
        (fake_system / "squid").touch()
        (fake_system / "security_file_certgen").touch()

    monkeypatch.setattr(proxies, "_apt_get_install", apt)
    install_squid()
    # 101: invoke-rc.d's "action forbidden", so the package's service does not start
    assert seen == [("squid-openssl", 101)]
    assert not (fake_system / "policy-rc.d").exists()


def test_an_existing_policy_rc_d_is_left_as_it_is(
    fake_system: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = fake_system / "policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n# the machine's own\n")

    def apt(package: str) -> None:
        (fake_system / "squid").touch()
        (fake_system / "security_file_certgen").touch()

    monkeypatch.setattr(proxies, "_apt_get_install", apt)
    install_squid()
    assert policy.read_text().endswith("# the machine's own\n")


def test_a_squid_process_that_the_install_started_is_stopped_by_pid(
    fake_system: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = [7]
    killed: list[int] = []

    def apt(package: str) -> None:
        running.append(4242)  # e.g. a service started despite the policy
        (fake_system / "squid").touch()
        (fake_system / "security_file_certgen").touch()

    monkeypatch.setattr(proxies, "_apt_get_install", apt)
    monkeypatch.setattr(proxies, "squid_pids", lambda: list(running))
    monkeypatch.setattr(proxies, "_kill", killed.append)
    install_squid()
    assert killed == [4242]  # the one that was there before is not ours to stop


def test_a_failed_install_removes_the_policy_and_says_what_to_do(
    fake_system: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def apt(package: str) -> None:
        raise ProxyError(f"installing {package} failed; run apt-get update")

    monkeypatch.setattr(proxies, "_apt_get_install", apt)
    with pytest.raises(ProxyError, match="apt-get update"):
        install_squid()
    assert not (fake_system / "policy-rc.d").exists()


def test_squid_without_ssl_bump_is_refused_not_replaced(
    fake_system: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (fake_system / "squid").touch()  # Debian's plain squid: no certificate generator

    def apt(package: str) -> None:
        raise AssertionError("must not install over the operator's squid")

    monkeypatch.setattr(proxies, "_apt_get_install", apt)
    with pytest.raises(ProxyError, match="squid-openssl"):
        install_squid()


def test_against_squid_adds_it_as_a_peer() -> None:
    s = settings_from_args(["--against", "squid", "--against", "sslsplit"])
    assert s.proxies == ["tlsgate", "squid", "sslsplit"]
