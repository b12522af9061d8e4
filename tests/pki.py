"""A small test PKI: roots, intermediates and leaves with any defect a validator must catch.

Rules of this module (other test files rely on them):

- Everything is built with ``cryptography``; nothing touches the network or the disk unless
  asked (:func:`write_pem`).
- Defaults describe a *good* WebPKI chain: CA certificates carry a critical
  ``basicConstraints CA:TRUE``, a critical ``keyUsage keyCertSign|cRLSign``, SKI and (below
  the root) AKI; leaves carry ``CA:FALSE``, ``keyUsage digitalSignature``, EKU ``serverAuth``,
  a SAN with ``www.example.com``, SKI, AKI and an AIA caIssuers URL, and are valid from
  one hour ago for 30 days.
  Every keyword argument turns one property into a defect, so a test states exactly the
  one thing that is wrong.
- Keys are ECDSA P-256 (fast) unless ``key=rsa_key(bits)`` is given. RSA keys are cached per
  ``(bits, slot)`` because generating them costs tens of milliseconds; use a different
  ``slot`` when two certificates must not share a key.
- ``cryptography`` refuses to sign with SHA-1 or MD5, so ``hash_name="sha1"|"md5"`` signs the
  to-be-signed bytes by hand (RSA issuers only).

API:

- ``ec_key() -> ec.EllipticCurvePrivateKey``; ``rsa_key(bits=2048, slot=0) -> rsa.RSAPrivateKey``
- ``issue(issuer, *, common_name, key, ...) -> Issued`` (every knob; ``issuer=None`` is
  self-signed): validity, ``ca``/``ca_critical``/``path_length``, ``key_usage``, ``eku``
  (+ ``eku_critical``), ``dns_names``/``ip_addresses`` (+ ``san_critical``), name
  constraints, ``must_staple``, ``unknown_critical_extension``, ``hash_name``,
  ``sign_with`` (forgery), ``aki``, ``subject`` (e.g. empty), ``ca_issuers_url``.
  ``make_root(...)``, ``make_intermediate(issuer, ...)``, ``make_leaf(issuer, ...)`` are
  ``issue`` with the defaults above.
- ``Issued``: ``cert``, ``key``, ``issuer`` (``Issued | None``), ``cert_pem``, ``key_pem``.
- ``Chain``: ``root``, ``intermediate``, ``leaf``; ``good_chain(...)`` builds one;
  ``chain.served()`` is what a correct server sends (leaf, intermediate).
- ``ocsp_responder(issuer, *, eku=True) -> Issued`` (a delegated OCSP signing certificate);
  ``ocsp_response(cert, issuer, *, status="good"|"revoked"|"unknown", signer=None,
  include_signer=None, this_update=None, next_update=..., cert_id_issuer=None,
  cert_id_hash=None, hash_name="sha256") -> bytes`` (DER); ``ocsp_unsuccessful(status)
  -> bytes``.
- ``write_pem(path, *certs) -> Path`` writes a PEM bundle.
- OIDs: ``UNKNOWN_CRITICAL_OID``; ``SERVER_AUTH``, ``CLIENT_AUTH``, ``OCSP_SIGNING``.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
OCSP_SIGNING = ExtendedKeyUsageOID.OCSP_SIGNING
#: A private-arc OID no verifier knows: marking it critical must make the certificate unusable.
UNKNOWN_CRITICAL_OID = x509.ObjectIdentifier("1.3.6.1.4.1.99999.42.1")

DEFAULT_HOST = "www.example.com"
#: The AIA caIssuers URL leaves carry by default (never fetched: tests have no network).
CA_ISSUERS_URL = "http://ca.example.test/intermediate.der"
DEFAULT_LIFETIME = datetime.timedelta(days=30)
BACKDATE = datetime.timedelta(hours=1)

# DER of the AlgorithmIdentifier OIDs (same length, so the to-be-signed bytes keep their size).
_SHA256_RSA_OID_DER = bytes.fromhex("06092a864886f70d01010b")
_LEGACY_RSA_OID_DER = {
    "sha1": bytes.fromhex("06092a864886f70d010105"),
    "md5": bytes.fromhex("06092a864886f70d010104"),
}
_LEGACY_HASHES: dict[str, hashes.HashAlgorithm] = {"sha1": hashes.SHA1(), "md5": hashes.MD5()}


def ec_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key (about 0.1 ms)."""
    return ec.generate_private_key(ec.SECP256R1())


@functools.cache
def rsa_key(bits: int = 2048, slot: int = 0) -> rsa.RSAPrivateKey:
    """An RSA key of ``bits``, the same object for the same ``(bits, slot)``."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str | None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tlsgate tests")]
    if common_name is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


@dataclass(frozen=True)
class Issued:
    """A certificate, its private key, and the ``Issued`` that signed it (``None``: self)."""

    cert: x509.Certificate
    key: PrivateKey
    issuer: Issued | None = None

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


CA_KEY_USAGE = x509.KeyUsage(
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
#: A CA-looking keyUsage without keyCertSign (the "issuer is not a CA" defect).
NO_CERT_SIGN_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
LEAF_KEY_USAGE = x509.KeyUsage(
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
#: Leaf keyUsage for RSA keys (TLS 1.2 RSA key exchange is never offered, but it is typical).
RSA_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)

_UNSET: object = object()


def issue(
    issuer: Issued | None,
    *,
    common_name: str | None,
    key: PrivateKey | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    ca: bool | None = None,
    ca_critical: bool = True,
    path_length: int | None = None,
    key_usage: x509.KeyUsage | None = None,
    eku: Sequence[x509.ObjectIdentifier] | None = None,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    permitted_dns: Sequence[str] | None = None,
    excluded_dns: Sequence[str] | None = None,
    must_staple: bool = False,
    unknown_critical_extension: bool = False,
    hash_name: str = "sha256",
    sign_with: PrivateKey | None = None,
    aki: bool = True,
    subject: x509.Name | None = None,
    san_critical: bool = False,
    eku_critical: bool = False,
    ca_issuers_url: str | None = None,
) -> Issued:
    """Build one certificate with exactly the properties asked for.

    ``ca=None`` omits basicConstraints; ``key_usage=None`` omits keyUsage; ``eku=None`` omits
    the EKU extension; no names omits the SAN. ``sign_with`` signs with another key while
    keeping the issuer's name and AKI (a forged signature). ``hash_name`` is ``sha256``,
    ``sha1`` or ``md5`` (the last two need an RSA signing key). ``subject`` replaces the
    name built from ``common_name`` (``x509.Name([])`` is an empty subject).
    """
    key = key if key is not None else ec_key()
    start = not_before if not_before is not None else now() - BACKDATE
    end = not_after if not_after is not None else start + DEFAULT_LIFETIME
    subject = subject if subject is not None else _name(common_name)
    issuer_name = issuer.cert.subject if issuer is not None else subject
    signing_key = sign_with if sign_with is not None else (issuer.key if issuer else key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if issuer is not None and aki:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
        )
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), ca_critical
        )
    if key_usage is not None:
        builder = builder.add_extension(key_usage, True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), eku_critical)
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), san_critical)
    if permitted_dns is not None or excluded_dns is not None:
        builder = builder.add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.DNSName(n) for n in permitted_dns]
                if permitted_dns is not None
                else None,
                excluded_subtrees=[x509.DNSName(n) for n in excluded_dns]
                if excluded_dns is not None
                else None,
            ),
            True,
        )
    if ca_issuers_url is not None:
        builder = builder.add_extension(
            x509.AuthorityInformationAccess(
                [
                    x509.AccessDescription(
                        AuthorityInformationAccessOID.CA_ISSUERS,
                        x509.UniformResourceIdentifier(ca_issuers_url),
                    )
                ]
            ),
            False,
        )
    if must_staple:
        builder = builder.add_extension(
            x509.TLSFeature([x509.TLSFeatureType.status_request]), False
        )
    if unknown_critical_extension:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(UNKNOWN_CRITICAL_OID, b"\x05\x00"), True
        )
    cert = builder.sign(signing_key, hashes.SHA256())
    if hash_name != "sha256":
        cert = _resign_legacy(cert, signing_key, hash_name)
    return Issued(cert=cert, key=key, issuer=issuer)


def make_root(
    common_name: str = "tlsgate test root",
    *,
    key: PrivateKey | None = None,
    path_length: int | None = None,
    hash_name: str = "sha256",
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    permitted_dns: Sequence[str] | None = None,
) -> Issued:
    """A self-signed trust anchor."""
    return issue(
        None,
        common_name=common_name,
        key=key,
        ca=True,
        path_length=path_length,
        key_usage=CA_KEY_USAGE,
        hash_name=hash_name,
        not_before=not_before,
        not_after=not_after if not_after is not None else now() + datetime.timedelta(days=365),
        permitted_dns=permitted_dns,
    )


def make_intermediate(
    issuer: Issued,
    common_name: str = "tlsgate test intermediate",
    *,
    key: PrivateKey | None = None,
    ca: bool | None = True,
    key_usage: x509.KeyUsage | object | None = _UNSET,
    path_length: int | None = None,
    permitted_dns: Sequence[str] | None = None,
    excluded_dns: Sequence[str] | None = None,
    hash_name: str = "sha256",
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    sign_with: PrivateKey | None = None,
) -> Issued:
    """A CA certificate issued by ``issuer`` (``ca=False``/``None`` and ``key_usage`` make
    it a non-CA)."""
    return issue(
        issuer,
        common_name=common_name,
        key=key,
        ca=ca,
        path_length=path_length,
        key_usage=CA_KEY_USAGE if key_usage is _UNSET else key_usage,  # type: ignore[arg-type]
        permitted_dns=permitted_dns,
        excluded_dns=excluded_dns,
        hash_name=hash_name,
        not_before=not_before,
        not_after=not_after if not_after is not None else now() + datetime.timedelta(days=180),
        sign_with=sign_with,
    )


def make_leaf(
    issuer: Issued,
    dns_names: Sequence[str] = (DEFAULT_HOST,),
    *,
    common_name: str | object | None = _UNSET,
    ip_addresses: Sequence[str] = (),
    key: PrivateKey | None = None,
    eku: Sequence[x509.ObjectIdentifier] | None = (SERVER_AUTH,),
    ca: bool | None = False,
    key_usage: x509.KeyUsage | object | None = _UNSET,
    must_staple: bool = False,
    unknown_critical_extension: bool = False,
    hash_name: str = "sha256",
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    sign_with: PrivateKey | None = None,
    ca_issuers_url: str | None = CA_ISSUERS_URL,
) -> Issued:
    """A server certificate issued by ``issuer``; CN defaults to the first DNS name; like
    publicly trusted leaves it names where to fetch its issuer (AIA caIssuers)."""
    cn = (dns_names[0] if dns_names else None) if common_name is _UNSET else common_name
    if key_usage is _UNSET:
        key_usage = RSA_LEAF_KEY_USAGE if isinstance(key, rsa.RSAPrivateKey) else LEAF_KEY_USAGE
    return issue(
        issuer,
        common_name=cn,  # type: ignore[arg-type]
        key=key,
        ca=ca,
        key_usage=key_usage,  # type: ignore[arg-type]
        eku=eku,
        dns_names=dns_names,
        ip_addresses=ip_addresses,
        must_staple=must_staple,
        unknown_critical_extension=unknown_critical_extension,
        hash_name=hash_name,
        not_before=not_before,
        not_after=not_after,
        sign_with=sign_with,
        ca_issuers_url=ca_issuers_url,
    )


@dataclass(frozen=True)
class Chain:
    """A root, an intermediate it signed, and a leaf the intermediate signed."""

    root: Issued
    intermediate: Issued
    leaf: Issued

    def served(self) -> tuple[x509.Certificate, ...]:
        """What a correctly configured server sends: the leaf, then the intermediate."""
        return (self.leaf.cert, self.intermediate.cert)


def good_chain(
    dns_names: Sequence[str] = (DEFAULT_HOST,),
    *,
    ip_addresses: Sequence[str] = (),
    root: Issued | None = None,
) -> Chain:
    """A valid root -> intermediate -> leaf chain for ``dns_names``/``ip_addresses``."""
    root = root if root is not None else make_root()
    inter = make_intermediate(root)
    return Chain(root, inter, make_leaf(inter, dns_names, ip_addresses=ip_addresses))


def ocsp_responder(issuer: Issued, *, eku: bool = True) -> Issued:
    """A delegated OCSP responder certificate issued by ``issuer`` (``eku=False``: without
    the id-kp-OCSPSigning EKU, so it must not be trusted to sign responses)."""
    return issue(
        issuer,
        common_name="tlsgate test OCSP responder",
        ca=False,
        key_usage=LEAF_KEY_USAGE,
        eku=(OCSP_SIGNING,) if eku else (SERVER_AUTH,),
    )


def ocsp_response(
    cert: x509.Certificate,
    issuer: Issued,
    *,
    status: str = "good",
    signer: Issued | None = None,
    include_signer: bool | None = None,
    this_update: datetime.datetime | None = None,
    next_update: datetime.datetime | object | None = _UNSET,
    cert_id_issuer: x509.Certificate | None = None,
    cert_id_hash: hashes.HashAlgorithm | None = None,
    hash_name: str = "sha256",
) -> bytes:
    """A DER OCSP response about ``cert`` (issued by ``issuer``).

    ``signer`` defaults to the issuer itself; a delegated responder is included in the
    response's certificates unless ``include_signer=False``. ``cert_id_issuer`` computes
    the CertID against another certificate (a response about someone else's certificate).
    ``hash_name="sha1"|"md5"`` re-signs the response by hand (RSA signers only).
    """
    signer = signer if signer is not None else issuer
    produced = now()
    this = this_update if this_update is not None else produced - datetime.timedelta(minutes=1)
    nxt = produced + datetime.timedelta(days=3) if next_update is _UNSET else next_update
    cert_status = {
        "good": ocsp.OCSPCertStatus.GOOD,
        "revoked": ocsp.OCSPCertStatus.REVOKED,
        "unknown": ocsp.OCSPCertStatus.UNKNOWN,
    }[status]
    revoked = status == "revoked"
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=cert,
        issuer=cert_id_issuer if cert_id_issuer is not None else issuer.cert,
        algorithm=cert_id_hash if cert_id_hash is not None else hashes.SHA1(),
        cert_status=cert_status,
        this_update=this,
        next_update=nxt,  # type: ignore[arg-type]
        revocation_time=this - datetime.timedelta(days=1) if revoked else None,
        revocation_reason=x509.ReasonFlags.key_compromise if revoked else None,
    )
    builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, signer.cert)
    if include_signer if include_signer is not None else signer is not issuer:
        builder = builder.certificates([signer.cert])
    response = builder.sign(signer.key, hashes.SHA256())
    der = response.public_bytes(serialization.Encoding.DER)
    if hash_name == "sha256":
        return der
    if not isinstance(signer.key, rsa.RSAPrivateKey):
        raise ValueError(f"{hash_name} OCSP signatures need an RSA signer key (use rsa_key())")
    if der.count(_SHA256_RSA_OID_DER) != 1 or der.count(response.signature) != 1:
        raise ValueError("cannot locate the signature algorithm and value to replace")
    legacy = signer.key.sign(
        response.tbs_response_bytes, padding.PKCS1v15(), _LEGACY_HASHES[hash_name]
    )
    return der.replace(_SHA256_RSA_OID_DER, _LEGACY_RSA_OID_DER[hash_name]).replace(
        response.signature, legacy
    )


def ocsp_unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    """A DER OCSP response with an error status (e.g. ``TRY_LATER``) and no body."""
    response = ocsp.OCSPResponseBuilder.build_unsuccessful(status)
    return response.public_bytes(serialization.Encoding.DER)


def write_pem(path: Path, *certs: x509.Certificate | Iterable[x509.Certificate]) -> Path:
    """Write ``certs`` (certificates or iterables of them) as one PEM bundle at ``path``."""
    flat: list[x509.Certificate] = []
    for item in certs:
        if isinstance(item, x509.Certificate):
            flat.append(item)
        else:
            flat.extend(item)
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in flat))
    return path


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(body)) + body


def _resign_legacy(cert: x509.Certificate, key: PrivateKey, hash_name: str) -> x509.Certificate:
    """Re-sign ``cert`` (signed with sha256WithRSAEncryption) with SHA-1 or MD5."""
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{hash_name} signatures need an RSA issuer key (use rsa_key())")
    tbs = cert.tbs_certificate_bytes
    if tbs.count(_SHA256_RSA_OID_DER) != 1:
        raise ValueError("expected exactly one sha256WithRSAEncryption OID in the TBS")
    oid = _LEGACY_RSA_OID_DER[hash_name]
    tbs = tbs.replace(_SHA256_RSA_OID_DER, oid)
    signature = key.sign(tbs, padding.PKCS1v15(), _LEGACY_HASHES[hash_name])
    algorithm = _der(0x30, oid + b"\x05\x00")
    der = _der(0x30, tbs + algorithm + _der(0x03, b"\x00" + signature))
    return x509.load_der_x509_certificate(der)
