"""The events CA: a CA of its own for management over TCP, never the interception CA."""

from __future__ import annotations

import argparse
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tlsgate.errors import CAError
from tlsgate.supervisor.ca import init_ca
from tlsgate.supervisor.events_ca import (
    ROLE_SCRAPER,
    ROLE_SUBSCRIBER,
    check_trust_anchor,
    ensure_server_certificate,
    init_events_ca,
    issue_client,
    list_issued,
    listener_files,
    load_events_ca,
    read_revoked,
    revoke,
    write_client_bundle,
)
from tlsgate.supervisor.events_ca_commands import add_events_ca_parser


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_init_creates_a_ca_of_its_own_with_a_private_key(tmp_path: Path) -> None:
    interception = init_ca(tmp_path)
    ca = init_events_ca(tmp_path)
    assert ca.cert.public_key() != interception.cert.public_key()
    assert mode(tmp_path / "events-ca") == 0o700
    assert mode(tmp_path / "events-ca" / "key.pem") == 0o600
    constraints = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca


def test_init_refuses_to_replace_an_events_ca_without_force(tmp_path: Path) -> None:
    first = init_events_ca(tmp_path)
    with pytest.raises(CAError, match=r"already exists .* pass --force"):
        init_events_ca(tmp_path)
    assert init_events_ca(tmp_path, force=True).cert != first.cert


def test_a_subscriber_certificate_is_a_client_certificate_in_its_role(tmp_path: Path) -> None:
    init_events_ca(tmp_path)
    cert, key, ca_cert = issue_client(tmp_path, "ids-1")
    cert.verify_directly_issued_by(ca_cert)
    assert cert.public_key() == key.public_key()
    subject = cert.subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ids-1"
    assert subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == (
        ROLE_SUBSCRIBER
    )
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 65, "ids/1", "é"])
def test_names_that_would_confuse_logs_or_labels_are_refused(tmp_path: Path, name: str) -> None:
    init_events_ca(tmp_path)
    with pytest.raises(ValueError, match="not a usable name"):
        issue_client(tmp_path, name)


def test_the_bundle_holds_cert_key_0600_and_ca_and_is_not_overwritten(tmp_path: Path) -> None:
    init_events_ca(tmp_path)
    cert, key, ca_cert = issue_client(tmp_path, "ids-1")
    cert_path, key_path, ca_path = write_client_bundle(tmp_path / "out", cert, key, ca_cert)
    assert mode(key_path) == 0o600
    assert x509.load_pem_x509_certificate(ca_path.read_bytes()) == ca_cert
    assert x509.load_pem_x509_certificate(cert_path.read_bytes()) == cert
    with pytest.raises(CAError, match="already holds"):
        write_client_bundle(tmp_path / "out", cert, key, ca_cert)


def test_the_server_certificate_is_issued_on_first_start_for_the_listen_address(
    tmp_path: Path,
) -> None:
    init_events_ca(tmp_path)
    cert_path, key_path, issued = ensure_server_certificate(tmp_path, "198.18.0.1")
    assert issued and mode(key_path) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("198.18.0.1") in san.get_values_for_type(x509.IPAddress)
    assert ensure_server_certificate(tmp_path, "198.18.0.1")[2] is False  # reused
    # another address: re-issued, keeping the names it had
    ensure_server_certificate(tmp_path, "198.18.0.2")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {
        "198.18.0.1",
        "198.18.0.2",
    }


def test_a_missing_events_ca_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(CAError, match="tlsgate events-ca init --state-dir"):
        load_events_ca(tmp_path, need_key=False)


def test_an_events_ca_key_others_can_read_is_refused(tmp_path: Path) -> None:
    init_events_ca(tmp_path)
    os.chmod(tmp_path / "events-ca" / "key.pem", 0o604)
    with pytest.raises(CAError, match=r"accessible by group or other .* chmod 600"):
        load_events_ca(tmp_path, need_key=False)


def test_an_unreadable_events_ca_certificate_is_refused(tmp_path: Path) -> None:
    init_events_ca(tmp_path)
    (tmp_path / "events-ca" / "cert.pem").write_text("not a certificate")
    with pytest.raises(CAError, match="no readable PEM certificate"):
        load_events_ca(tmp_path, need_key=False)


def test_the_interception_ca_copied_in_as_the_events_ca_is_refused(tmp_path: Path) -> None:
    init_ca(tmp_path)
    init_events_ca(tmp_path)
    for name in ("cert.pem", "key.pem"):
        (tmp_path / "events-ca" / name).write_bytes((tmp_path / "ca" / name).read_bytes())
    with pytest.raises(CAError, match="is the interception CA's"):
        load_events_ca(tmp_path, need_key=True)


def test_the_interception_ca_as_the_client_trust_anchor_is_refused(tmp_path: Path) -> None:
    init_ca(tmp_path)
    init_events_ca(tmp_path)
    with pytest.raises(CAError, match="is the interception CA's"):
        check_trust_anchor(tmp_path, tmp_path / "ca" / "cert.pem", "events.remote_ca")
    with pytest.raises(CAError, match="is the interception CA's"):
        listener_files(tmp_path, "127.0.0.1", "x", ca_file=tmp_path / "ca" / "cert.pem")


def test_revoking_by_name_lists_the_certificate_as_revoked_and_denies_its_serial(
    tmp_path: Path,
) -> None:
    init_events_ca(tmp_path)
    cert, _, _ = issue_client(tmp_path, "ids-1")
    other, _, _ = issue_client(tmp_path, "prom-1", ROLE_SCRAPER)
    assert read_revoked(tmp_path) == frozenset()
    assert [item.serial for item in revoke(tmp_path, "ids-1")] == [cert.serial_number]
    assert read_revoked(tmp_path) == {cert.serial_number}
    states = {item.name: item.revoked for item in list_issued(tmp_path)}
    assert states == {"ids-1": True, "prom-1": False}
    revoke(tmp_path, f"{other.serial_number:x}")  # by serial too
    revoke(tmp_path, "ids-1")  # again: no duplicate line
    assert read_revoked(tmp_path) == {cert.serial_number, other.serial_number}
    assert len((tmp_path / "events-ca" / "revoked").read_text().splitlines()) == 2


def test_revoking_an_unknown_name_is_refused(tmp_path: Path) -> None:
    init_events_ca(tmp_path)
    with pytest.raises(CAError, match="issued no certificate named"):
        revoke(tmp_path, "nobody")


def test_a_damaged_deny_list_is_refused_rather_than_ignored(tmp_path: Path) -> None:
    init_events_ca(tmp_path)
    (tmp_path / "events-ca" / "revoked").write_text("abc\nnot-hex\n")
    with pytest.raises(CAError, match="line 2 of the deny list"):
        read_revoked(tmp_path)


def test_the_commands_issue_list_and_revoke(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="tlsgate")
    add_events_ca_parser(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> int:
        args = parser.parse_args(["events-ca", *argv, "--state-dir", str(tmp_path)])
        result: int = args.func(args)
        return result

    assert run("init") == 0
    assert run("issue-subscriber", "ids-1", "--out", str(tmp_path / "ids-1")) == 0
    assert (tmp_path / "ids-1" / "key.pem").exists()
    assert run("revoke", "ids-1") == 0
    capsys.readouterr()
    assert run("list") == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.split()[1:] == ["events-subscriber", line.split()[2], "revoked", "ids-1"]
