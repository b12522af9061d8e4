"""The interception CA: its profile, how it is stored, and every refusal of ``load_ca``.

The certificate builders at the top are shared with ``test_signer`` and
``test_ca_commands`` (chains, broken CAs, keys of every kind).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from tlsgate.errors import CAError
from tlsgate.paths import ca_cert_path, ca_key_path
from tlsgate.supervisor.ca import (
    MAX_BUNDLE_CERTS,
    MAX_CA_FILE_BYTES,
    MAX_PASSPHRASE_BYTES,
    CAPrivateKey,
    LoadedCA,
    create_ca,
    describe_ca,
    ensure_ca,
    import_ca,
    init_ca,
    load_ca,
    read_ca_certificates,
    sha256_fingerprint,
)

# --- builders shared by the CA, signer and CLI tests ----------------------------------------

CA_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
SIGN_ONLY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
SHA256 = hashes.SHA256()


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def build_cert(
    subject: str,
    key: CertificateIssuerPrivateKeyTypes,
    issuer: tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes] | None = None,
    *,
    ca: bool | None = True,
    path_length: int | None = None,
    key_usage: x509.KeyUsage | None = CA_USAGE,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    algorithm: hashes.SHA224 | hashes.SHA256 = SHA256,
    pss: bool = False,
    ski: bool = True,
) -> x509.Certificate:
    """A certificate for ``key``, self-signed unless ``issuer`` is given.

    ``ca=None`` leaves out basicConstraints, ``key_usage=None`` keyUsage, ``ski=False`` the
    subjectKeyIdentifier; Ed25519 issuers sign without a hash, ``pss`` makes an RSA issuer
    sign with RSASSA-PSS.
    """
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (name, key)
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(days=1))
        .not_valid_after(not_after or now + timedelta(days=365))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
            critical=False,
        )
    )
    if ski:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public), critical=False
        )
    if ca is not None:
        constraints = x509.BasicConstraints(ca=ca, path_length=path_length if ca else None)
        builder = builder.add_extension(constraints, critical=True)
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    if isinstance(signing_key, ed25519.Ed25519PrivateKey):
        return builder.sign(signing_key, None)
    rsa_padding = (
        padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.DIGEST_LENGTH)
        if pss
        else None
    )
    return builder.sign(signing_key, algorithm, rsa_padding=rsa_padding)


def build_chain() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """An intermediate CA (pathlen 0) issued by a root: ``(intermediate, its key, root)``."""
    root_key, inter_key = ec_key(), ec_key()
    root = build_cert("Corp Root CA", root_key)
    inter = build_cert("Corp Interception CA", inter_key, (root, root_key), path_length=0)
    return inter, inter_key, root


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def key_pem(key: CertificateIssuerPrivateKeyTypes, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def write_raw_ca(state_dir: Path, cert_data: bytes, key_data: bytes) -> None:
    """Store files as-is (no checks), with the modes ``init`` would use."""
    ca_dir = ca_cert_path(state_dir).parent
    ca_dir.mkdir(parents=True, mode=0o700)
    os.chmod(state_dir, 0o700)
    os.chmod(ca_dir, 0o700)
    ca_key_path(state_dir).write_bytes(key_data)
    os.chmod(ca_key_path(state_dir), 0o600)
    ca_cert_path(state_dir).write_bytes(cert_data)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture(scope="module")
def rsa_ca() -> tuple[x509.Certificate, CAPrivateKey]:
    return create_ca("rsa-3072")


@pytest.fixture(params=[0o000, 0o022, 0o277], ids=lambda umask: f"umask-{umask:03o}")
def any_umask(request: pytest.FixtureRequest) -> Iterator[None]:
    old = os.umask(request.param)
    try:
        yield
    finally:
        os.umask(old)


def refusal(state_dir: Path, passphrase: bytes | None = None) -> str:
    """The message ``load_ca`` refuses with; it is always one line."""
    with pytest.raises(CAError) as caught:
        load_ca(state_dir, passphrase)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- create_ca: the profile of a new CA ----------------------------------------------------


def test_a_new_ca_is_an_ecdsa_p256_root_signed_with_sha256_by_default() -> None:
    cert, key = create_ca()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert cert.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)


def test_a_new_ca_may_be_rsa_3072_signed_with_sha256(
    rsa_ca: tuple[x509.Certificate, CAPrivateKey],
) -> None:
    cert, key = rsa_ca
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 3072
    assert cert.signature_algorithm_oid == SignatureAlgorithmOID.RSA_WITH_SHA256


def test_a_p384_ca_signs_with_sha384() -> None:
    cert, key = create_ca("ecdsa-p384")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp384r1"
    assert cert.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA384


def test_a_new_ca_is_valid_for_the_requested_days_starting_an_hour_ago() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    cert, _ = create_ca(days=30)
    after = datetime.now(UTC)
    assert before - timedelta(hours=1) <= cert.not_valid_before_utc <= after - timedelta(hours=1)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=30)


@pytest.mark.parametrize("days", [0, -1, 3651])
def test_ca_validity_is_one_day_to_ten_years(days: int) -> None:
    with pytest.raises(ValueError, match="1 to 3650 days"):
        create_ca(days=days)


def test_ten_years_is_allowed() -> None:
    cert, _ = create_ca(days=3650)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=3650)


def test_an_unknown_key_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown CA key type 'dsa'"):
        create_ca("dsa")


def test_a_new_ca_has_critical_basic_constraints_ca_true_pathlen_zero() -> None:
    cert, _ = create_ca()
    ext = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ext.critical
    assert ext.value == x509.BasicConstraints(ca=True, path_length=0)


def test_a_new_ca_may_only_sign_certificates_and_crls() -> None:
    cert, _ = create_ca()
    ext = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ext.critical
    assert ext.value == CA_USAGE


def test_a_new_ca_identifies_its_key_by_ski() -> None:
    cert, key = create_ca()
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def test_each_new_ca_has_its_own_subject_and_a_random_159_bit_serial() -> None:
    (first, _), (second, _) = create_ca(), create_ca()
    assert first.subject != second.subject
    assert first.serial_number != second.serial_number
    for cert in (first, second):
        assert 0 < cert.serial_number < 2**159
        [org] = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        [cn] = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        assert org.value == "tlsgate"
        assert str(cn.value).startswith("tlsgate interception CA ")


def test_the_common_name_can_be_chosen() -> None:
    cert, _ = create_ca(common_name="Example Corp inspection")
    [cn] = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert cn.value == "Example Corp inspection"


# --- init_ca: how a CA is stored -----------------------------------------------------------


@pytest.mark.usefixtures("any_umask")
def test_init_writes_key_0600_and_cert_0644_in_0700_directories(state_dir: Path) -> None:
    init_ca(state_dir)
    assert mode_of(state_dir) == 0o700
    assert mode_of(state_dir / "ca") == 0o700
    assert mode_of(ca_key_path(state_dir)) == 0o600
    assert mode_of(ca_cert_path(state_dir)) == 0o644


def test_init_stores_an_unencrypted_pkcs8_key_without_a_passphrase(state_dir: Path) -> None:
    ca = init_ca(state_dir)
    data = ca_key_path(state_dir).read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----")
    stored = serialization.load_pem_private_key(data, None)
    assert stored.public_key() == ca.cert.public_key()


def test_init_with_a_passphrase_stores_an_encrypted_pkcs8_key(state_dir: Path) -> None:
    ca = init_ca(state_dir, passphrase=b"correct horse")
    data = ca_key_path(state_dir).read_bytes()
    assert data.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    stored = serialization.load_pem_private_key(data, b"correct horse")
    assert stored.public_key() == ca.cert.public_key()


@pytest.mark.parametrize("passphrase", [b"", b"x" * (MAX_PASSPHRASE_BYTES + 1)])
def test_init_refuses_an_empty_or_overlong_passphrase(state_dir: Path, passphrase: bytes) -> None:
    with pytest.raises(CAError, match=f"must be 1 to {MAX_PASSPHRASE_BYTES} bytes"):
        init_ca(state_dir, passphrase=passphrase)
    assert not state_dir.exists()


def test_import_refuses_an_empty_passphrase_for_the_stored_key(state_dir: Path) -> None:
    inter, key, root = build_chain()
    with pytest.raises(CAError, match=f"must be 1 to {MAX_PASSPHRASE_BYTES} bytes, not 0"):
        import_ca(state_dir, pem(inter, root), key_pem(key), store_passphrase=b"")
    assert not state_dir.exists()


def test_init_returns_the_ca_as_load_ca_reads_it(state_dir: Path) -> None:
    created = init_ca(state_dir, "ecdsa-p384", 100)
    loaded = load_ca(state_dir)
    assert loaded.cert == created.cert
    assert loaded.fingerprint_sha256 == created.fingerprint_sha256
    assert loaded.cert_path == ca_cert_path(state_dir)


def test_init_refuses_to_replace_an_existing_ca_without_force(state_dir: Path) -> None:
    init_ca(state_dir)
    before = ca_cert_path(state_dir).read_bytes(), ca_key_path(state_dir).read_bytes()
    with pytest.raises(CAError, match=r"a CA already exists .*pass --force"):
        init_ca(state_dir)
    assert (ca_cert_path(state_dir).read_bytes(), ca_key_path(state_dir).read_bytes()) == before


def test_init_refuses_to_complete_half_a_ca(state_dir: Path) -> None:
    init_ca(state_dir)
    ca_cert_path(state_dir).unlink()
    key_before = ca_key_path(state_dir).read_bytes()
    with pytest.raises(CAError, match=r"\(key\.pem\); pass --force"):
        init_ca(state_dir)
    assert ca_key_path(state_dir).read_bytes() == key_before


def test_init_with_force_replaces_the_ca(state_dir: Path) -> None:
    old = init_ca(state_dir)
    new = init_ca(state_dir, force=True)
    assert new.fingerprint_sha256 != old.fingerprint_sha256
    assert load_ca(state_dir).fingerprint_sha256 == new.fingerprint_sha256


def test_init_refuses_a_state_dir_that_is_a_file(state_dir: Path) -> None:
    state_dir.write_bytes(b"")
    with pytest.raises(CAError, match=f"state directory {state_dir} is not a directory"):
        init_ca(state_dir)


def test_init_says_when_the_state_dir_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    state_dir = tmp_path / "file" / "state"
    with pytest.raises(CAError, match=f"cannot create state directory {state_dir}"):
        init_ca(state_dir)


def test_init_refuses_bad_parameters_before_touching_the_disk(state_dir: Path) -> None:
    with pytest.raises(ValueError):
        init_ca(state_dir, days=4000)
    with pytest.raises(ValueError):
        init_ca(state_dir, key_type="rsa-1024")
    assert not state_dir.exists()


@pytest.mark.parametrize("loose", ["state", "ca"])
def test_init_refuses_directories_group_or_other_can_enter(state_dir: Path, loose: str) -> None:
    directory = state_dir if loose == "state" else state_dir / "ca"
    directory.mkdir(parents=True)
    os.chmod(state_dir, 0o700)
    os.chmod(directory, 0o755)
    with pytest.raises(CAError, match=rf"is accessible by group or other .*chmod 700 {directory}"):
        init_ca(state_dir)
    assert not ca_key_path(state_dir).exists()


def test_files_have_their_final_mode_and_content_before_they_are_renamed_into_place(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, tuple[int, bytes]] = {}
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        seen[Path(dst).name] = (mode_of(Path(src)), Path(src).read_bytes())
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    init_ca(state_dir)
    assert seen["key.pem"] == (0o600, ca_key_path(state_dir).read_bytes())
    assert seen["cert.pem"] == (0o644, ca_cert_path(state_dir).read_bytes())


def test_a_failed_write_leaves_the_old_ca_and_no_temporary_files(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = init_ca(state_dir)

    def fail(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(CAError, match="No space left on device"):
        init_ca(state_dir, force=True)
    monkeypatch.undo()
    assert sorted(p.name for p in (state_dir / "ca").iterdir()) == ["cert.pem", "key.pem"]
    assert load_ca(state_dir).fingerprint_sha256 == old.fingerprint_sha256


# --- load_ca: what it returns ----------------------------------------------------------------


def test_a_loaded_root_has_no_chain_and_sends_only_itself(state_dir: Path) -> None:
    ca = init_ca(state_dir)
    assert ca.chain == ()
    assert ca.chain_for_clients() == (ca.cert,)


def test_the_fingerprint_is_sha256_of_the_der_in_colon_hex(state_dir: Path) -> None:
    ca = init_ca(state_dir)
    digest = hashlib.sha256(ca.cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert ca.fingerprint_sha256 == ":".join(digest[i : i + 2].upper() for i in range(0, 64, 2))
    assert sha256_fingerprint(ca.cert) == ca.fingerprint_sha256


def test_an_encrypted_key_loads_with_its_passphrase(state_dir: Path) -> None:
    created = init_ca(state_dir, passphrase=b"s3cret")
    assert load_ca(state_dir, b"s3cret").cert == created.cert


def test_a_passphrase_for_an_unencrypted_key_is_ignored(state_dir: Path) -> None:
    created = init_ca(state_dir)
    assert load_ca(state_dir, b"unneeded").cert == created.cert


def test_a_ca_without_key_usage_is_accepted(state_dir: Path) -> None:
    key = ec_key()
    cert = build_cert("no key usage", key, key_usage=None)
    write_raw_ca(state_dir, pem(cert), key_pem(key))
    assert load_ca(state_dir).cert == cert


def test_a_pss_signed_intermediate_is_accepted(state_dir: Path) -> None:
    root_key = rsa.generate_private_key(65537, 2048)
    root = build_cert("pss root", root_key)
    key = ec_key()
    inter = build_cert("pss inter", key, (root, root_key), path_length=0, pss=True)
    assert inter.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS
    write_raw_ca(state_dir, pem(inter, root), key_pem(key))
    assert load_ca(state_dir).chain == (root,)


# --- load_ca: every refusal, one line each, saying what to do ------------------------------


def test_no_ca_at_all_says_to_run_init_or_import(state_dir: Path) -> None:
    message = refusal(state_dir)
    assert f"tlsgate ca init --state-dir {state_dir}" in message
    assert "tlsgate ca import" in message


@pytest.mark.parametrize("missing", ["key.pem", "cert.pem"])
def test_half_a_ca_is_refused_and_left_alone(state_dir: Path, missing: str) -> None:
    init_ca(state_dir)
    (state_dir / "ca" / missing).unlink()
    message = refusal(state_dir)
    assert f"incomplete: {missing} is missing" in message
    assert "--force" in message
    assert not (state_dir / "ca" / missing).exists()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644])
def test_a_key_group_or_other_can_access_is_refused(state_dir: Path, mode: int) -> None:
    init_ca(state_dir)
    os.chmod(ca_key_path(state_dir), mode)
    message = refusal(state_dir)
    assert f"mode {mode:04o}" in message
    assert message.endswith(f"run chmod 600 {ca_key_path(state_dir)}")


@pytest.mark.parametrize(("which", "mode"), [("state", 0o750), ("state", 0o701), ("ca", 0o705)])
def test_directories_group_or_other_can_enter_are_refused(
    state_dir: Path, which: str, mode: int
) -> None:
    init_ca(state_dir)
    directory = state_dir if which == "state" else state_dir / "ca"
    os.chmod(directory, mode)
    message = refusal(state_dir)
    assert message.endswith(f"run chmod 700 {directory}")


def test_an_encrypted_key_without_a_passphrase_says_how_to_give_it(state_dir: Path) -> None:
    init_ca(state_dir, passphrase=b"s3cret")
    message = refusal(state_dir)
    assert "is encrypted" in message
    assert "--ca-passphrase-file" in message


def test_a_wrong_passphrase_is_refused(state_dir: Path) -> None:
    init_ca(state_dir, passphrase=b"s3cret")
    assert "wrong passphrase" in refusal(state_dir, b"guess")


def test_a_key_that_does_not_match_the_certificate_is_refused(state_dir: Path) -> None:
    init_ca(state_dir)
    ca_key_path(state_dir).write_bytes(key_pem(ec_key()))
    assert "does not match" in refusal(state_dir)


def test_an_expired_ca_is_refused(state_dir: Path) -> None:
    key = ec_key()
    now = datetime.now(UTC)
    cert = build_cert("old", key, not_before=now - timedelta(days=30), not_after=now)
    write_raw_ca(state_dir, pem(cert), key_pem(key))
    message = refusal(state_dir)
    assert "expired on" in message
    assert "tlsgate ca init --force" in message


def test_a_ca_that_is_not_yet_valid_is_refused(state_dir: Path) -> None:
    key = ec_key()
    now = datetime.now(UTC)
    cert = build_cert("future", key, not_before=now + timedelta(days=1))
    write_raw_ca(state_dir, pem(cert), key_pem(key))
    message = refusal(state_dir)
    assert "is not yet valid" in message
    assert "system clock" in message


@pytest.mark.parametrize("ca", [False, None], ids=["ca-false", "no-basic-constraints"])
def test_a_certificate_that_is_not_a_ca_is_refused(state_dir: Path, ca: bool | None) -> None:
    key = ec_key()
    cert = build_cert("leafy", key, ca=ca)
    write_raw_ca(state_dir, pem(cert), key_pem(key))
    assert "is not a CA certificate (it lacks basicConstraints CA:TRUE)" in refusal(state_dir)


def test_a_ca_whose_key_usage_lacks_key_cert_sign_is_refused(state_dir: Path) -> None:
    key = ec_key()
    cert = build_cert("no cert sign", key, key_usage=SIGN_ONLY_USAGE)
    write_raw_ca(state_dir, pem(cert), key_pem(key))
    assert "keyUsage lacks keyCertSign" in refusal(state_dir)


def test_a_root_whose_path_length_forbids_the_intermediate_is_refused(state_dir: Path) -> None:
    root_key, key = ec_key(), ec_key()
    root = build_cert("strict root", root_key, path_length=0)
    inter = build_cert("inter", key, (root, root_key), path_length=0)
    write_raw_ca(state_dir, pem(inter, root), key_pem(key))
    message = refusal(state_dir)
    assert "certificate 2 in" in message
    assert "has pathLenConstraint 0, which forbids the 1 CA certificate(s) below it" in message


def test_a_path_length_that_leaves_room_is_accepted(state_dir: Path) -> None:
    root_key, key = ec_key(), ec_key()
    root = build_cert("root", root_key, path_length=1)
    inter = build_cert("inter", key, (root, root_key), path_length=0)
    write_raw_ca(state_dir, pem(inter, root), key_pem(key))
    assert load_ca(state_dir).chain == (root,)


def test_a_chain_out_of_order_is_refused(state_dir: Path) -> None:
    root_key, key = ec_key(), ec_key()
    root = build_cert("root", root_key)
    inter = build_cert("inter", key, (root, root_key), path_length=0)
    other_root = build_cert("other root", ec_key())
    write_raw_ca(state_dir, pem(inter, other_root), key_pem(key))
    message = refusal(state_dir)
    assert "did not issue the certificate before it" in message
    assert "CA certificate first" in message


def test_an_expired_certificate_in_the_chain_is_refused(state_dir: Path) -> None:
    now = datetime.now(UTC)
    root_key, key = ec_key(), ec_key()
    root = build_cert("root", root_key, not_before=now - timedelta(days=9), not_after=now)
    inter = build_cert("inter", key, (root, root_key), path_length=0)
    write_raw_ca(state_dir, pem(inter, root), key_pem(key))
    message = refusal(state_dir)
    assert "certificate 2 in" in message
    assert "expired on" in message


def test_a_non_ca_certificate_in_the_chain_is_refused(state_dir: Path) -> None:
    root_key, key = ec_key(), ec_key()
    root = build_cert("not a root", root_key, ca=False, key_usage=None)
    inter = build_cert("inter", key, (root, root_key), path_length=0)
    write_raw_ca(state_dir, pem(inter, root), key_pem(key))
    message = refusal(state_dir)
    assert "certificate 2 in" in message
    assert "is not a CA certificate" in message


@pytest.mark.parametrize(
    ("signer", "oid"),
    [
        ("ecdsa-sha224", SignatureAlgorithmOID.ECDSA_WITH_SHA224),
        ("ed25519", SignatureAlgorithmOID.ED25519),
        ("rsa-pss-sha224", SignatureAlgorithmOID.RSASSA_PSS),
    ],
)
def test_an_intermediate_signed_with_an_algorithm_browsers_reject_is_refused(
    state_dir: Path, signer: str, oid: x509.ObjectIdentifier
) -> None:
    root_key: CertificateIssuerPrivateKeyTypes
    if signer == "ecdsa-sha224":
        root_key = ec_key()
    elif signer == "ed25519":
        root_key = ed25519.Ed25519PrivateKey.generate()
    else:
        root_key = rsa.generate_private_key(65537, 2048)
    root = build_cert("root", root_key)
    key = ec_key()
    inter = build_cert(
        "inter",
        key,
        (root, root_key),
        path_length=0,
        algorithm=hashes.SHA224(),
        pss=signer.startswith("rsa-pss"),
    )
    assert inter.signature_algorithm_oid == oid
    write_raw_ca(state_dir, pem(inter, root), key_pem(key))
    assert f"is signed with the algorithm {oid.dotted_string}, which browsers reject" in (
        refusal(state_dir)
    )


def test_a_self_signed_root_may_have_any_signature(state_dir: Path) -> None:
    key = ec_key()
    cert = build_cert("sha224 root", key, algorithm=hashes.SHA224())
    write_raw_ca(state_dir, pem(cert), key_pem(key))
    assert load_ca(state_dir).cert == cert


@pytest.mark.parametrize("kind", ["rsa-1024", "ed25519", "p224"])
def test_a_key_type_browsers_do_not_accept_is_refused(state_dir: Path, kind: str) -> None:
    key: CertificateIssuerPrivateKeyTypes
    if kind == "rsa-1024":
        key, expected = rsa.generate_private_key(65537, 1024), "is a 1024-bit RSA key"
    elif kind == "ed25519":
        key, expected = ed25519.Ed25519PrivateKey.generate(), "holds a key of type Ed25519"
    else:
        key, expected = ec.generate_private_key(ec.SECP224R1()), "uses the curve secp224r1"
    write_raw_ca(state_dir, pem(build_cert("odd key", key)), key_pem(key))
    assert expected in refusal(state_dir)


def test_a_certificate_file_without_a_certificate_is_refused(state_dir: Path) -> None:
    key = ec_key()
    write_raw_ca(state_dir, b"not a certificate\n", key_pem(key))
    assert "holds no readable PEM certificate" in refusal(state_dir)


def test_a_key_file_without_a_key_is_refused(state_dir: Path) -> None:
    init_ca(state_dir)
    ca_key_path(state_dir).write_bytes(
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    )
    assert "is not a readable PEM private key" in refusal(state_dir)


def test_an_oversized_certificate_file_is_refused(state_dir: Path) -> None:
    init_ca(state_dir)
    with open(ca_cert_path(state_dir), "ab") as out:
        out.write(b"\n" * MAX_CA_FILE_BYTES)
    assert f"is larger than {MAX_CA_FILE_BYTES} bytes" in refusal(state_dir)


def test_a_bundle_longer_than_any_real_chain_is_refused(state_dir: Path) -> None:
    ca = init_ca(state_dir)
    ca_cert_path(state_dir).write_bytes(pem(*[ca.cert] * (MAX_BUNDLE_CERTS + 1)))
    assert f"more than {MAX_BUNDLE_CERTS}" in refusal(state_dir)


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_key_path_that_is_not_a_regular_file_is_refused(state_dir: Path, kind: str) -> None:
    init_ca(state_dir)
    ca_key_path(state_dir).unlink()
    if kind == "directory":
        ca_key_path(state_dir).mkdir(mode=0o700)
    else:
        os.mkfifo(ca_key_path(state_dir), 0o600)
    assert f"CA key {ca_key_path(state_dir)} is not a regular file" in refusal(state_dir)


def test_a_ca_path_that_cannot_be_examined_is_refused(state_dir: Path) -> None:
    init_ca(state_dir)
    ca_cert_path(state_dir).unlink()
    ca_cert_path(state_dir).symlink_to(ca_cert_path(state_dir))  # ELOOP on every access
    message = refusal(state_dir)
    assert f"cannot access {ca_cert_path(state_dir)}" in message
    assert "run tlsgate as the user that owns the state directory" in message


def test_a_key_the_user_may_not_read_is_refused(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    init_ca(state_dir)
    real_open = os.open

    def deny_key(path: str | os.PathLike[str], flags: int, *args: int) -> int:
        if Path(path) == ca_key_path(state_dir):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", deny_key)
    message = refusal(state_dir)
    assert f"cannot read CA key {ca_key_path(state_dir)}: Permission denied" in message


def test_a_p521_ca_is_accepted(state_dir: Path) -> None:
    key = ec.generate_private_key(ec.SECP521R1())
    cert = build_cert("P-521 root", key)
    write_raw_ca(state_dir, pem(cert), key_pem(key))
    assert load_ca(state_dir).key.key_size == 521


# --- import_ca ---------------------------------------------------------------------------------


def test_import_stores_the_intermediate_then_its_chain(state_dir: Path) -> None:
    inter, key, root = build_chain()
    ca = import_ca(state_dir, pem(inter, root), key_pem(key))
    assert ca.cert == inter
    assert ca.chain == (root,)
    assert ca.chain_for_clients() == (inter, root)
    assert x509.load_pem_x509_certificates(ca_cert_path(state_dir).read_bytes()) == [inter, root]
    assert mode_of(ca_key_path(state_dir)) == 0o600
    assert load_ca(state_dir).chain_for_clients() == (inter, root)


def test_import_decrypts_with_one_passphrase_and_stores_with_another(state_dir: Path) -> None:
    inter, key, root = build_chain()
    import_ca(state_dir, pem(inter, root), key_pem(key, b"old"), b"old", b"new")
    assert ca_key_path(state_dir).read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY")
    assert load_ca(state_dir, b"new").cert == inter
    assert "wrong passphrase" in refusal(state_dir, b"old")


def test_import_rewrites_a_traditional_key_as_unencrypted_pkcs8(state_dir: Path) -> None:
    inter, key, root = build_chain()
    sec1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert sec1.startswith(b"-----BEGIN EC PRIVATE KEY-----")
    import_ca(state_dir, pem(inter, root), sec1)
    assert ca_key_path(state_dir).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_import_recognises_a_traditionally_encrypted_key(state_dir: Path) -> None:
    inter, key, root = build_chain()
    legacy = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(b"pw"),
    )
    assert b"Proc-Type: 4,ENCRYPTED" in legacy
    with pytest.raises(CAError, match="is encrypted: give its passphrase"):
        import_ca(state_dir, pem(inter, root), legacy)
    assert import_ca(state_dir, pem(inter, root), legacy, b"pw").cert == inter


def test_import_of_an_encrypted_key_without_its_passphrase_is_refused(state_dir: Path) -> None:
    inter, key, root = build_chain()
    with pytest.raises(CAError, match="is encrypted: give its passphrase with --key-passphrase"):
        import_ca(state_dir, pem(inter, root), key_pem(key, b"pw"))
    with pytest.raises(CAError, match="wrong passphrase"):
        import_ca(state_dir, pem(inter, root), key_pem(key, b"pw"), b"nope")
    assert not state_dir.exists()


def test_import_checks_everything_before_writing(state_dir: Path) -> None:
    inter, key, root = build_chain()
    with pytest.raises(CAError, match=r"does not match .* the CA certificate must come first"):
        import_ca(state_dir, pem(root, inter), key_pem(key))
    leaf_key = ec_key()
    leaf = build_cert("www.example.com", leaf_key, (inter, key), ca=False, key_usage=None)
    with pytest.raises(CAError, match="is not a CA certificate"):
        import_ca(state_dir, pem(leaf, inter, root), key_pem(leaf_key))
    with pytest.raises(CAError, match="holds no readable PEM certificate"):
        import_ca(state_dir, key_pem(key), key_pem(key))
    assert not state_dir.exists()


def test_import_refuses_to_replace_an_existing_ca_without_force(state_dir: Path) -> None:
    old = init_ca(state_dir)
    inter, key, root = build_chain()
    with pytest.raises(CAError, match="pass --force"):
        import_ca(state_dir, pem(inter, root), key_pem(key))
    assert load_ca(state_dir).cert == old.cert
    assert import_ca(state_dir, pem(inter, root), key_pem(key), force=True).cert == inter


# --- ensure_ca: first run creates, later runs load -------------------------------------------


def test_ensure_creates_a_ca_on_first_run_and_loads_it_afterwards(state_dir: Path) -> None:
    first, created = ensure_ca(state_dir)
    assert created
    second, created_again = ensure_ca(state_dir)
    assert not created_again
    assert second.fingerprint_sha256 == first.fingerprint_sha256


def test_ensure_creates_an_encrypted_key_when_given_a_passphrase(state_dir: Path) -> None:
    ensure_ca(state_dir, b"pw")
    assert "is encrypted" in refusal(state_dir)
    assert ensure_ca(state_dir, b"pw")[1] is False


def test_ensure_never_replaces_half_a_ca(state_dir: Path) -> None:
    init_ca(state_dir)
    ca_cert_path(state_dir).unlink()
    key_before = ca_key_path(state_dir).read_bytes()
    with pytest.raises(CAError, match=r"incomplete: cert\.pem is missing"):
        ensure_ca(state_dir)
    assert ca_key_path(state_dir).read_bytes() == key_before
    assert not ca_cert_path(state_dir).exists()


def test_ensure_applies_every_load_check(state_dir: Path) -> None:
    init_ca(state_dir)
    os.chmod(ca_key_path(state_dir), 0o644)
    with pytest.raises(CAError, match="chmod 600"):
        ensure_ca(state_dir)


# --- describe_ca / read_ca_certificates ------------------------------------------------------


def test_describe_reports_the_facts_without_the_passphrase(state_dir: Path) -> None:
    ca = init_ca(state_dir, "ecdsa-p384", 30, b"pw")
    info = describe_ca(state_dir)
    assert info.fingerprint_sha256 == ca.fingerprint_sha256
    assert info.subject == ca.cert.subject.rfc4514_string()
    assert (info.key_type, info.key_size) == ("ECDSA P-384", 384)
    assert (info.not_before, info.not_after) == (
        ca.cert.not_valid_before_utc,
        ca.cert.not_valid_after_utc,
    )
    assert info.chain_length == 1
    assert info.self_signed
    assert info.key_mode == 0o600
    assert info.key_encrypted


def test_describe_an_imported_intermediate(state_dir: Path) -> None:
    inter, key, root = build_chain()
    import_ca(state_dir, pem(inter, root), key_pem(key))
    info = describe_ca(state_dir)
    assert info.chain_length == 2
    assert not info.self_signed
    assert not info.key_encrypted
    assert info.issuer == root.subject.rfc4514_string()


def test_describe_rsa(state_dir: Path, rsa_ca: tuple[x509.Certificate, CAPrivateKey]) -> None:
    cert, key = rsa_ca
    write_raw_ca(state_dir, pem(cert), key_pem(key))
    info = describe_ca(state_dir)
    assert (info.key_type, info.key_size) == ("RSA", 3072)


def test_reading_the_certificates_of_a_missing_ca_says_to_run_init(state_dir: Path) -> None:
    with pytest.raises(CAError, match="tlsgate ca init --state-dir"):
        read_ca_certificates(state_dir)
    with pytest.raises(CAError, match="tlsgate ca init --state-dir"):
        describe_ca(state_dir)


def test_a_loaded_ca_is_immutable(state_dir: Path) -> None:
    ca = init_ca(state_dir)
    assert isinstance(ca, LoadedCA)
    with pytest.raises(AttributeError):
        ca.cert = ca.cert  # type: ignore[misc]
