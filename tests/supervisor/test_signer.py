"""Leaf minting: browser-grade acceptance, the validity window, names, and the profile."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from tests.supervisor.test_ca import build_cert, build_chain, ec_key, key_pem, pem
from tlsgate.supervisor.ca import KEY_TYPES, LoadedCA, import_ca, init_ca, sha256_fingerprint
from tlsgate.supervisor.signer import (
    LEAF_BACKDATE,
    MAX_LEAF_NAMES,
    MAX_LEAF_VALIDITY,
    LeafRequest,
    LeafSigner,
    generate_leaf_key,
)

HANDSHAKE_TIMEOUT = 10.0


def in_days(days: float) -> datetime:
    return datetime.now(UTC) + timedelta(days=days)


def request(
    *names: str, ips: tuple[str, ...] = (), not_after: datetime | None = None
) -> LeafRequest:
    return LeafRequest(names, ips, not_after or in_days(90))


def loaded(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> LoadedCA:
    return LoadedCA(cert, key, (), Path("/nonexistent"), sha256_fingerprint(cert))


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedCA]:
    """One stored CA of every key type ``tlsgate ca init`` offers."""
    return {kind: init_ca(tmp_path_factory.mktemp(kind) / "state", kind) for kind in KEY_TYPES}


@pytest.fixture(params=KEY_TYPES)
def any_ca(request: pytest.FixtureRequest, cas: dict[str, LoadedCA]) -> LoadedCA:
    return cas[request.param]


@pytest.fixture
def ca(cas: dict[str, LoadedCA]) -> LoadedCA:
    return cas["ecdsa-p256"]


@pytest.fixture
def signer(ca: LoadedCA) -> LeafSigner:
    return LeafSigner(ca, generate_leaf_key())


def verify(
    ca_cert: x509.Certificate, leaf: x509.Certificate, name: x509.DNSName | x509.IPAddress
) -> int:
    """Verify like a browser (WebPKI policy); the length of the chain built."""
    store = Store([ca_cert])
    verifier = PolicyBuilder().store(store).build_server_verifier(name)
    return len(verifier.verify(leaf, []))


def san(leaf: x509.Certificate) -> list[x509.GeneralName]:
    return list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def common_name(leaf: x509.Certificate) -> str:
    [attribute] = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attribute.value)


# --- accepted like a browser would ---------------------------------------------------------


def test_a_leaf_verifies_under_the_ca_with_the_webpki_policy(any_ca: LoadedCA) -> None:
    leaf = LeafSigner(any_ca, generate_leaf_key()).sign(request("www.example.com"))
    assert verify(any_ca.cert, leaf, x509.DNSName("www.example.com")) == 2


def test_every_name_of_the_leaf_verifies(signer: LeafSigner, ca: LoadedCA) -> None:
    leaf = signer.sign(request("example.com", "www.example.com", "*.cdn.example.com"))
    for name in ("example.com", "www.example.com", "img.cdn.example.com"):
        assert verify(ca.cert, leaf, x509.DNSName(name)) == 2


def test_a_name_the_leaf_does_not_cover_does_not_verify(signer: LeafSigner, ca: LoadedCA) -> None:
    leaf = signer.sign(request("www.example.com"))
    with pytest.raises(VerificationError):
        verify(ca.cert, leaf, x509.DNSName("evil.example.net"))


def test_an_ip_address_san_verifies_as_an_ip(signer: LeafSigner, ca: LoadedCA) -> None:
    leaf = signer.sign(request(ips=("192.0.2.7", "2001:db8::1")))
    for text in ("192.0.2.7", "2001:db8::1"):
        assert verify(ca.cert, leaf, x509.IPAddress(ipaddress.ip_address(text))) == 2


def test_a_leaf_from_an_imported_intermediate_verifies_up_to_the_root(tmp_path: Path) -> None:
    inter, key, root = build_chain()
    ca = import_ca(tmp_path / "state", pem(inter, root), key_pem(key))
    leaf = LeafSigner(ca, generate_leaf_key()).sign(request("www.example.com"))
    verifier = (
        PolicyBuilder().store(Store([root])).build_server_verifier(x509.DNSName("www.example.com"))
    )
    assert verifier.verify(leaf, list(ca.chain_for_clients())) == [leaf, inter, root]


# --- names ---------------------------------------------------------------------------------


def test_the_subject_is_the_primary_name(signer: LeafSigner) -> None:
    leaf = signer.sign(request("www.example.com", "example.com"))
    assert leaf.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example.com")])


def test_a_long_primary_name_is_cut_to_64_characters_in_the_subject_only(
    signer: LeafSigner,
) -> None:
    long_name = "a" * 60 + ".example.com"
    leaf = signer.sign(request(long_name))
    assert common_name(leaf) == long_name[:64]
    assert san(leaf) == [x509.DNSName(long_name)]


def test_without_dns_names_the_subject_is_the_first_ip(signer: LeafSigner) -> None:
    leaf = signer.sign(request(ips=("2001:db8::1", "192.0.2.1")))
    assert common_name(leaf) == "2001:db8::1"


def test_the_san_holds_every_name_and_ip_once_in_request_order(signer: LeafSigner) -> None:
    leaf = signer.sign(
        request(
            "b.example",
            "a.example",
            "B.Example",
            "b.example",
            ips=("192.0.2.1", "2001:db8::1", "2001:DB8:0::1", "192.0.2.1"),
        )
    )
    assert san(leaf) == [
        x509.DNSName("b.example"),
        x509.DNSName("a.example"),
        x509.IPAddress(ipaddress.ip_address("192.0.2.1")),
        x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
    ]


def test_an_empty_name_set_is_refused(signer: LeafSigner) -> None:
    with pytest.raises(ValueError, match="at least one DNS name or IP address"):
        signer.sign(request())


@pytest.mark.parametrize(
    "name", ["", "bad name.example", "münchen.example", "a\x00.example", "a" * 254, "x/y"]
)
def test_a_name_that_is_not_an_ascii_dns_name_is_refused(signer: LeafSigner, name: str) -> None:
    with pytest.raises(ValueError, match="is not an ASCII DNS name"):
        signer.sign(request("ok.example", name))


def test_a_malformed_ip_address_is_refused(signer: LeafSigner) -> None:
    with pytest.raises(ValueError, match=r"192\.0\.2\.300"):
        signer.sign(request("ok.example", ips=("192.0.2.300",)))


def test_more_names_than_the_bound_are_refused(signer: LeafSigner) -> None:
    names = tuple(f"n{i}.example" for i in range(MAX_LEAF_NAMES + 1))
    with pytest.raises(ValueError, match=f"at most {MAX_LEAF_NAMES} names"):
        signer.sign(request(*names))
    assert len(san(signer.sign(request(*names[:MAX_LEAF_NAMES])))) == MAX_LEAF_NAMES


# --- the validity window ---------------------------------------------------------------------


def test_not_before_is_an_hour_ago_for_clock_skew(signer: LeafSigner) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    leaf = signer.sign(request("www.example.com"))
    after = datetime.now(UTC)
    assert before - LEAF_BACKDATE <= leaf.not_valid_before_utc <= after - LEAF_BACKDATE


def test_not_before_is_never_before_the_cas() -> None:
    key = ec_key()
    ca_cert = build_cert("young CA", key, not_before=datetime.now(UTC) - timedelta(minutes=5))
    leaf = LeafSigner(loaded(ca_cert, key), generate_leaf_key()).sign(request("a.example"))
    assert leaf.not_valid_before_utc == ca_cert.not_valid_before_utc


def test_not_after_is_the_upstreams_when_that_is_soonest(signer: LeafSigner) -> None:
    upstream_end = in_days(30).replace(microsecond=0)
    leaf = signer.sign(request("www.example.com", not_after=upstream_end))
    assert leaf.not_valid_after_utc == upstream_end


def test_not_after_in_another_timezone_is_honoured(signer: LeafSigner) -> None:
    upstream_end = in_days(30).replace(microsecond=0)
    plus_two = upstream_end.astimezone(timezone(timedelta(hours=2)))
    leaf = signer.sign(request("www.example.com", not_after=plus_two))
    assert leaf.not_valid_after_utc == upstream_end


def test_not_after_never_exceeds_397_days(signer: LeafSigner) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    leaf = signer.sign(request("www.example.com", not_after=in_days(5 * 365)))
    after = datetime.now(UTC)
    assert before + MAX_LEAF_VALIDITY <= leaf.not_valid_after_utc <= after + MAX_LEAF_VALIDITY


def test_not_after_never_exceeds_the_cas() -> None:
    key = ec_key()
    ca_cert = build_cert("short CA", key, not_after=in_days(10))
    leaf = LeafSigner(loaded(ca_cert, key), generate_leaf_key()).sign(
        request("a.example", not_after=in_days(90))
    )
    assert leaf.not_valid_after_utc == ca_cert.not_valid_after_utc


def test_a_leaf_whose_window_would_be_empty_is_refused(signer: LeafSigner) -> None:
    with pytest.raises(ValueError, match="expires too soon"):
        signer.sign(request("www.example.com", not_after=datetime.now(UTC) - timedelta(hours=2)))


def test_a_naive_not_after_is_refused(signer: LeafSigner) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        signer.sign(request("www.example.com", not_after=datetime(2030, 1, 1)))


# --- the profile -----------------------------------------------------------------------------


def test_a_leaf_is_not_a_ca_and_may_only_serve_tls(signer: LeafSigner) -> None:
    extensions = signer.sign(request("www.example.com")).extensions
    basic = extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert basic.value == x509.BasicConstraints(ca=False, path_length=None)
    usage = extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not (usage.value.key_cert_sign or usage.value.crl_sign or usage.value.key_encipherment)
    eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_the_leaf_key_ids_name_the_leaf_key_and_the_cas(ca: LoadedCA) -> None:
    leaf_key = generate_leaf_key()
    leaf = LeafSigner(ca, leaf_key).sign(request("www.example.com"))
    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key())
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest


def test_a_ca_without_ski_is_named_by_its_key_hash() -> None:
    key = ec_key()
    ca_cert = build_cert("no ski", key, ski=False)
    leaf = LeafSigner(loaded(ca_cert, key), generate_leaf_key()).sign(request("a.example"))
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki == x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())


def test_serials_are_random_and_159_bits_at_most(signer: LeafSigner) -> None:
    serials = {signer.sign(request("www.example.com")).serial_number for _ in range(20)}
    assert len(serials) == 20
    assert all(0 < serial < 2**159 for serial in serials)


def test_an_ecdsa_p256_ca_signs_with_sha256(signer: LeafSigner, ca: LoadedCA) -> None:
    leaf = signer.sign(request("www.example.com"))
    assert leaf.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256
    leaf.verify_directly_issued_by(ca.cert)


def test_an_rsa_ca_signs_with_pkcs1v15_sha256(cas: dict[str, LoadedCA]) -> None:
    rsa_ca = cas["rsa-3072"]
    assert isinstance(rsa_ca.key, rsa.RSAPrivateKey)
    leaf = LeafSigner(rsa_ca, generate_leaf_key()).sign(request("www.example.com"))
    assert leaf.signature_algorithm_oid == SignatureAlgorithmOID.RSA_WITH_SHA256
    public = rsa_ca.key.public_key()
    public.verify(leaf.signature, leaf.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA256())


def test_a_p384_ca_signs_with_sha384(cas: dict[str, LoadedCA]) -> None:
    leaf = LeafSigner(cas["ecdsa-p384"], generate_leaf_key()).sign(request("www.example.com"))
    assert leaf.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA384


def test_a_p521_ca_signs_with_sha512_and_its_leaves_verify() -> None:
    key = ec.generate_private_key(ec.SECP521R1())
    ca_cert = build_cert("P-521 root", key)
    leaf = LeafSigner(loaded(ca_cert, key), generate_leaf_key()).sign(request("a.example"))
    assert leaf.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA512
    assert verify(ca_cert, leaf, x509.DNSName("a.example")) == 2


def test_every_leaf_carries_the_runs_leaf_key(ca: LoadedCA) -> None:
    leaf_key = generate_leaf_key()
    signer = LeafSigner(ca, leaf_key)
    for name in ("a.example", "b.example"):
        assert signer.sign(request(name)).public_key() == leaf_key.public_key()


def test_signatures_are_counted(signer: LeafSigner) -> None:
    assert signer.signatures == 0
    signer.sign(request("a.example"))
    signer.sign(request("b.example"))
    with pytest.raises(ValueError):
        signer.sign(request())
    assert signer.signatures == 2


def test_leaf_keys_are_fresh_p256_keys() -> None:
    first, second = generate_leaf_key(), generate_leaf_key()
    assert first.curve.name == "secp256r1"
    assert first.public_key() != second.public_key()


# --- a real TLS client -----------------------------------------------------------------------


def handshake(
    tmp_path: Path,
    leaf: x509.Certificate,
    leaf_key: ec.EllipticCurvePrivateKey,
    sent_chain: tuple[x509.Certificate, ...],
    trusted: x509.Certificate,
    server_hostname: str,
) -> Mapping[str, object]:
    """Serve ``leaf`` + ``sent_chain`` on 127.0.0.1; a strict python ``ssl`` client that
    trusts only ``trusted`` connects. Returns the peer certificate the client validated."""
    chain_file, key_file = tmp_path / "chain.pem", tmp_path / "key.pem"
    chain_file.write_bytes(pem(leaf, *sent_chain))
    key_file.write_bytes(key_pem(leaf_key))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(chain_file, key_file)
    client_ctx = ssl.create_default_context(cadata=pem(trusted).decode())
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT

    errors: list[BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(HANDSHAKE_TIMEOUT)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(HANDSHAKE_TIMEOUT)
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError) as err:
                errors.append(err)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        port = listener.getsockname()[1]
        with (
            socket.create_connection(("127.0.0.1", port), timeout=HANDSHAKE_TIMEOUT) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            peer = tls.getpeercert()
            tls.sendall(b"x")
        thread.join(HANDSHAKE_TIMEOUT)
    assert not errors
    assert peer is not None
    return peer


@pytest.mark.parametrize("server_name", ["www.example.test", "127.0.0.1"])
def test_a_python_ssl_client_trusting_the_ca_accepts_the_leaf(
    tmp_path: Path, ca: LoadedCA, server_name: str
) -> None:
    leaf_key = generate_leaf_key()
    leaf = LeafSigner(ca, leaf_key).sign(
        request("www.example.test", ips=("127.0.0.1",), not_after=in_days(30))
    )
    peer = handshake(tmp_path, leaf, leaf_key, ca.chain_for_clients(), ca.cert, server_name)
    assert peer["subject"] == ((("commonName", "www.example.test"),),)


def test_a_python_ssl_client_rejects_a_leaf_for_another_name(tmp_path: Path, ca: LoadedCA) -> None:
    leaf_key = generate_leaf_key()
    leaf = LeafSigner(ca, leaf_key).sign(request("www.example.test"))
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(tmp_path, leaf, leaf_key, ca.chain_for_clients(), ca.cert, "other.test")


def test_a_client_trusting_only_the_root_accepts_a_leaf_of_an_imported_intermediate(
    tmp_path: Path,
) -> None:
    inter, key, root = build_chain()
    ca = import_ca(tmp_path / "state", pem(inter, root), key_pem(key))
    leaf_key = generate_leaf_key()
    leaf = LeafSigner(ca, leaf_key).sign(request("www.example.test"))
    peer = handshake(tmp_path, leaf, leaf_key, ca.chain_for_clients(), root, "www.example.test")
    assert peer["issuer"] == ((("commonName", "Corp Interception CA"),),)
