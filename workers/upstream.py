"""Upstream TLS: connect to the real server and validate it at least as strictly as a browser.

Contract (fail closed: anything unexpected refuses the upstream, never accepts it):

- One :class:`UpstreamValidator` per worker (not thread-safe; one event loop uses it),
  built once: it loads the trust bundle (the system bundle ``DEFAULT_CA_BUNDLE`` unless
  ``ca_bundle`` is given) into OpenSSL and into ``cryptography``'s verifier, and holds the
  client ``SSL.Context``: TLS 1.2 minimum; TLS 1.2 ciphers ``ECDHE+AESGCM:ECDHE+CHACHA20``
  at ``@SECLEVEL=2`` (so no RSA key exchange, DHE, CBC, 3DES, RC4, NULL, anonymous or
  export suite is ever offered, and RSA keys < 2048 bits and SHA-1/MD5 signatures fail
  OpenSSL's own verification); TLS 1.3 suites default; no compression, no renegotiation;
  ``VERIFY_PEER`` with at most ``MAX_CHAIN_DEPTH`` CAs; released idle buffers; client
  session caching without OpenSSL's internal store (up to 20480 sessions a worker that
  clients never consult). Sessions are resumed from the validator's own bounded cache
  (:mod:`tlsgate.workers.sessions`): only sessions whose full handshake was accepted, keyed
  by name, SNI, address, port and ALPN offer, carrying that validation's result;
  :meth:`~UpstreamValidator.check_established` refuses a resumed handshake of any session
  it did not offer (it has no verified chain).
- Per connection, :meth:`UpstreamValidator.new_connection` sets SNI (DNS names only,
  RFC 6066), the host or IP that OpenSSL must match (RFC 6125: subjectAltName only, never
  the CN; a wildcard only as the whole left-most label), asks for an OCSP staple and
  offers ALPN. It never blocks: the caller drives ``do_handshake`` on its non-blocking
  socket and waits for readability/writability itself.
- During the handshake, callbacks record what they see on the
  :class:`UpstreamConnection` (a ``SSL.Connection`` subclass, so concurrent connections
  cannot mix): OpenSSL's first verify failure with its depth; the OCSP staple, checked by
  :func:`tlsgate.workers.ocsp.check_staple` (revoked or invalid aborts the handshake);
  and any CertificateRequest, which aborts the handshake at once (TLS 1.2 and 1.3: we can
  never present the client's certificate, and an optional request is refused too).
- When ``do_handshake`` raises :class:`OpenSSL.SSL.Error`, :meth:`UpstreamValidator.refusal`
  explains it as :class:`~tlsgate.errors.UpstreamRefused` (``category`` from
  :data:`CATEGORIES`; ``reason`` one line with OpenSSL's verify error in words and the
  depth and subject of the failing certificate). Priority: the certificate verification
  error, then the refusal a callback recorded, then the TLS error itself.
- After the handshake, :meth:`UpstreamValidator.check_established` must be called before
  any byte is relayed; it raises ``UpstreamRefused`` or returns :class:`UpstreamInfo`. It
  re-checks what OpenSSL decided (verify result, TLS 1.2/1.3, a cipher we offered), then
  applies the checks OpenSSL does not make or that we want twice
  (:func:`chain_policy_problem`: leaf EKU must contain serverAuth, absent is refused,
  stricter than OpenSSL; RSA >= 2048 and EC >= 256 bits on every certificate; no SHA-1
  or MD5 signature below the trust anchor), must-staple (RFC 7633), and
  ``cryptography``'s independent WebPKI verifier over the path OpenSSL built
  (:meth:`~UpstreamValidator.verify_independently`). Its profile is cryptography's WebPKI
  default with three changes that match what browsers accept and RFC 5280 allows: a trust
  anchor may lack keyUsage or mark basicConstraints non-critical (anchors' extensions are
  not processed; several system roots predate the rule), and a leaf's subjectAltName or
  EKU may be critical (private CAs such as trustme issue those). Intermediates keep the
  strict rules, and the leaf EKU must be present with serverAuth.
- Verdicts of the expensive part (~550 us: explicit checks + independent verifier) are
  cached per (SHA-256 of every certificate in the verified chain, host) in an LRU of
  ``VERDICT_CACHE_SIZE`` entries, each expiring after ``VERDICT_TTL`` seconds or at the
  earliest notAfter in the chain, whichever comes first. Only acceptances are cached.
  OpenSSL still verifies every handshake (time, host, signatures) and staples are checked
  per connection; a cache hit costs ~30 us.
- Why raw cffi callbacks (all in the section marked "private pyOpenSSL internals", checked
  by :func:`check_private_api`, which raises :class:`~tlsgate.errors.OperatorError` when
  something is missing): ``SSL_get_verify_result`` alone lacks the depth, and the depth is
  what an operator needs ("which certificate?") and what tells an incomplete chain (depth
  0: the server did not send its leaf's issuer) from an untrusted root (depth > 0).
  pyOpenSSL's ``set_verify`` builds Python objects on every call (~30 us a handshake);
  the observer here returns at once when ``ok`` is 1 and only works on the one failing
  call; it returns OpenSSL's ``ok`` unchanged (0 if it ever raised), so it only observes.
  For CertificateRequest, an info callback (~30 us a handshake, and TLS 1.3 would only be
  caught after the handshake) is replaced by OpenSSL's certificate callback, which a
  client runs only when a CertificateRequest arrived, so it costs nothing otherwise.
  Host/IP matching and ``SSL_session_reused`` have no pyOpenSSL API at all.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import ipaddress
import os
import re
import socket
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)
from OpenSSL import SSL, crypto

# pyOpenSSL's cffi bindings: only the "private pyOpenSSL internals" section below uses them.
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from tlsgate.errors import ConfigError, OperatorError, UpstreamRefused
from tlsgate.workers.keyshares import KeyShareHints, group_name
from tlsgate.workers.ocsp import GOOD, REVOKED, check_staple, requires_staple
from tlsgate.workers.sessions import (
    DEFAULT_LIFETIME,
    DEFAULT_MAX_ENTRIES,
    CachedSession,
    SessionKey,
    UpstreamSessionCache,
)

DEFAULT_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:@SECLEVEL=2"
ALLOWED_VERSIONS = frozenset({"TLSv1.2", "TLSv1.3"})
MAX_CHAIN_DEPTH = 8
VERDICT_CACHE_SIZE = 4096
VERDICT_TTL = 600.0
MIN_RSA_BITS = 2048
MIN_EC_BITS = 256
MAX_DNS_NAME = 253
#: How many certificate names a hostname-mismatch reason lists.
MAX_REASON_NAMES = 6

CATEGORIES: Final = frozenset(
    {
        "expired",
        "not-yet-valid",
        "hostname-mismatch",
        "self-signed",
        "untrusted-root",
        "incomplete-chain",
        "bad-signature",
        "issuer-not-ca",
        "path-length",
        "name-constraints",
        "no-server-auth",
        "critical-extension",
        "weak-key",
        "weak-signature",
        "protocol-version",
        "weak-cipher",
        "revoked",
        "ocsp-invalid",
        "must-staple",
        "client-certificate-required",
        "handshake-failed",
        "verify-failed",
    }
)

# OpenSSL verify error codes (include/openssl/x509_vfy.h; stable since OpenSSL 3.0).
# check_private_api() compares every one with X509_verify_cert_error_string at startup.
X509_V_OK = 0
_VERIFY_ERRORS: Final[dict[int, tuple[str, str]]] = {
    # code: (category, the start of OpenSSL's text for it)
    2: ("incomplete-chain", "unable to get issuer certificate"),
    4: ("bad-signature", "unable to decrypt certificate's signature"),
    6: ("bad-signature", "unable to decode issuer public key"),
    7: ("bad-signature", "certificate signature failure"),
    9: ("not-yet-valid", "certificate is not yet valid"),
    10: ("expired", "certificate has expired"),
    18: ("self-signed", "self-signed certificate"),
    19: ("untrusted-root", "self-signed certificate in certificate chain"),
    20: ("incomplete-chain", "unable to get local issuer certificate"),
    21: ("incomplete-chain", "unable to verify the first certificate"),
    22: ("path-length", "certificate chain too long"),
    23: ("revoked", "certificate revoked"),
    24: ("bad-signature", "issuer certificate doesn't have a public key"),
    25: ("path-length", "path length constraint exceeded"),
    26: ("no-server-auth", "unsuitable certificate purpose"),
    27: ("untrusted-root", "certificate not trusted"),
    28: ("untrusted-root", "certificate rejected"),
    32: ("issuer-not-ca", "key usage does not include certificate signing"),
    34: ("critical-extension", "unhandled critical extension"),
    38: ("path-length", "proxy path length constraint exceeded"),
    47: ("name-constraints", "permitted subtree violation"),
    48: ("name-constraints", "excluded subtree violation"),
    49: ("name-constraints", "name constraints minimum and maximum not supported"),
    51: ("name-constraints", "unsupported name constraint type"),
    52: ("name-constraints", "unsupported or invalid name constraint syntax"),
    53: ("name-constraints", "unsupported or invalid name syntax"),
    62: ("hostname-mismatch", "hostname mismatch"),
    64: ("hostname-mismatch", "IP address mismatch"),
    66: ("weak-key", "EE certificate key too weak"),
    67: ("weak-key", "CA certificate key too weak"),
    68: ("weak-signature", "CA signature digest algorithm too weak"),
    72: ("name-constraints", "proxy subject name violation"),
    76: ("bad-signature", "Cannot find certificate signature algorithm"),
    77: ("bad-signature", "subject signature algorithm and issuer public key algorithm mismatch"),
    78: ("bad-signature", "cert info signature and signature algorithm mismatch"),
    79: ("issuer-not-ca", "invalid CA certificate"),
}
#: Codes meaning "no issuer found": an incomplete chain or an unknown root (_missing_issuer).
_MISSING_ISSUER: Final = frozenset({2, 20, 21})

# TLS error reasons (lower case, as OpenSSL prints them) -> (category, what it means).
_HANDSHAKE_ERRORS: Final[tuple[tuple[str, str, str], ...]] = (
    (
        "protocol version",
        "protocol-version",
        "the server does not speak TLS 1.2 or 1.3",
    ),
    (
        "unsupported protocol",
        "protocol-version",
        "the server does not speak TLS 1.2 or 1.3",
    ),
    (
        "wrong ssl version",
        "protocol-version",
        "the server answered with a TLS version we did not offer",
    ),
    (
        "wrong cipher returned",
        "weak-cipher",
        "the server picked a cipher suite we did not offer",
    ),
    (
        "unknown cipher returned",
        "weak-cipher",
        "the server picked a cipher suite we did not offer",
    ),
    ("dh key too small", "weak-cipher", "the server's Diffie-Hellman group is too small"),
    (
        "handshake failure",
        "handshake-failed",
        "the server aborted the handshake: it shares no cipher suite or key exchange with us "
        "(we offer only ECDHE with AES-GCM or ChaCha20-Poly1305 for TLS 1.2, and TLS 1.3), "
        "or it wanted something we do not send",
    ),
    (
        "bad certificate status response",
        "ocsp-invalid",
        "the server stapled an OCSP response that does not parse",
    ),
    (
        "certificate required",
        "client-certificate-required",
        "the server requires a client certificate",
    ),
    (
        "certificate verify failed",
        "verify-failed",
        "OpenSSL refused the certificate chain",
    ),
)

_sha256 = hashlib.sha256
_UTC = datetime.UTC
_SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
_WEAK_SIGNATURE_HASHES = (hashes.SHA1, hashes.MD5)
_DNS_NAME = re.compile(r"(?:(?!-)[a-z0-9-]{1,63}(?<!-)\.)*(?!-)[a-z0-9-]{1,63}(?<!-)")
_DIGITS_AND_DOTS = re.compile(r"[0-9.]+")
_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


# --- private pyOpenSSL internals -------------------------------------------------------
# pyOpenSSL has no API to set the host/IP OpenSSL's verifier must match, to read the
# verify result, to observe verification or CertificateRequests cheaply, or to ask whether
# a session was resumed. Only this section uses its cffi bindings (_ffi, _lib),
# Connection._ssl, Context._context and Connection._reverse_mapping; nothing else in
# tlsgate may. check_private_api() proves they exist before a validator is built.

_REQUIRED_LIB_NAMES: Final = (
    "SSL_get0_param",
    "X509_VERIFY_PARAM_set_hostflags",
    "X509_VERIFY_PARAM_set1_host",
    "X509_VERIFY_PARAM_set1_ip",
    "X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS",
    "X509_CHECK_FLAG_NEVER_CHECK_SUBJECT",
    "SSL_get_verify_result",
    "X509_verify_cert_error_string",
    "SSL_CTX_set_verify",
    "SSL_VERIFY_PEER",
    "X509_STORE_CTX_get_error",
    "X509_STORE_CTX_get_error_depth",
    "X509_STORE_CTX_get_ex_data",
    "SSL_get_ex_data_X509_STORE_CTX_idx",
    "SSL_session_reused",
    "SSL_CTX_set_cert_cb",
)


def check_private_api() -> None:
    """Raise :class:`OperatorError` unless every pyOpenSSL internal used here exists and
    OpenSSL's verify error codes still mean what :data:`_VERIFY_ERRORS` says."""
    missing = [name for name in _REQUIRED_LIB_NAMES if not hasattr(_lib, name)]
    if not hasattr(SSL.Connection, "_reverse_mapping"):
        missing.append("Connection._reverse_mapping")
    probe_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if not hasattr(probe_context, "_context"):
        missing.append("Context._context")
    if not hasattr(SSL.Connection(probe_context, None), "_ssl"):
        missing.append("Connection._ssl")
    if missing:
        raise OperatorError(
            "the installed pyOpenSSL lacks internals tlsgate needs to validate upstream "
            f"servers ({', '.join(missing)}); install a pyOpenSSL version listed in "
            "pyproject.toml"
        )
    for code, (_category, text) in _VERIFY_ERRORS.items():
        actual = _verify_error_string(code)
        if not actual.startswith(text):
            raise OperatorError(
                f"OpenSSL verify error {code} now reads {actual!r}, expected {text!r}: this "
                "OpenSSL renumbered its verify errors; tlsgate must be updated before it can "
                "classify upstream refusals"
            )


def _verify_error_string(code: int) -> str:
    return str(_ffi.string(_lib.X509_verify_cert_error_string(code)).decode("ascii", "replace"))


def _verify_result(conn: SSL.Connection) -> int:
    return int(_lib.SSL_get_verify_result(conn._ssl))


def _session_reused(conn: SSL.Connection) -> bool:
    return bool(_lib.SSL_session_reused(conn._ssl))


def session_reused(conn: SSL.Connection) -> bool:
    """Whether ``conn``'s handshake resumed a session (either side; no public API)."""
    return _session_reused(conn)


def _set_verify_host(conn: SSL.Connection, dns_name: bytes | None, ip: bytes | None) -> bool:
    """Make OpenSSL's chain verification match ``dns_name`` or the packed ``ip`` (RFC 6125:
    SAN only, no partial wildcards). False if OpenSSL refused the value."""
    param = _lib.SSL_get0_param(conn._ssl)
    _lib.X509_VERIFY_PARAM_set_hostflags(
        param,
        _lib.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS | _lib.X509_CHECK_FLAG_NEVER_CHECK_SUBJECT,
    )
    if ip is not None:
        return bool(_lib.X509_VERIFY_PARAM_set1_ip(param, ip, len(ip)) == 1)
    assert dns_name is not None
    return bool(_lib.X509_VERIFY_PARAM_set1_host(param, dns_name, len(dns_name)) == 1)


def _observe_verify(ok: int, store_ctx: Any) -> int:
    """OpenSSL verify callback: record the first failure on the connection, change nothing."""
    if ok:
        return 1
    ssl = _lib.X509_STORE_CTX_get_ex_data(store_ctx, _lib.SSL_get_ex_data_X509_STORE_CTX_idx())
    conn = SSL.Connection._reverse_mapping.get(ssl)
    if isinstance(conn, UpstreamConnection) and conn.verify_error is None:
        conn.verify_error = (
            int(_lib.X509_STORE_CTX_get_error(store_ctx)),
            int(_lib.X509_STORE_CTX_get_error_depth(store_ctx)),
        )
    return 0


def _install_verify_observer(ctx: SSL.Context) -> object:
    """Set VERIFY_PEER with the observer on ``ctx``; the returned handle must stay alive as
    long as ``ctx`` (keep it on the owner)."""
    callback = _ffi.callback("int (*)(int, X509_STORE_CTX *)", _observe_verify, error=0)
    _lib.SSL_CTX_set_verify(ctx._context, _lib.SSL_VERIFY_PEER, callback)
    return callback


def _refuse_cert_request(ssl: Any, arg: Any) -> int:
    """OpenSSL certificate callback. On a client it runs only when the server sent a
    CertificateRequest (TLS 1.2 and 1.3); returning 0 aborts the handshake right there."""
    conn = SSL.Connection._reverse_mapping.get(ssl)
    if isinstance(conn, UpstreamConnection):
        conn.client_cert_requested = True
        conn.refuse(
            "client-certificate-required",
            "the server asked for a client certificate (CertificateRequest); an "
            "intercepted connection cannot present the client's certificate",
        )
    return 0


def _install_cert_request_refusal(ctx: SSL.Context) -> object:
    """Make every CertificateRequest abort the handshake; keep the handle with ``ctx``."""
    callback = _ffi.callback("int (*)(SSL *, void *)", _refuse_cert_request, error=0)
    _lib.SSL_CTX_set_cert_cb(ctx._context, callback, _ffi.NULL)
    return callback


# --- end of private pyOpenSSL internals ------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpstreamInfo:
    """What was negotiated with, and verified about, an accepted upstream server."""

    tls_version: str
    cipher: str
    alpn: bytes | None
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    subject: str
    issuer: str
    fingerprint_sha256: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_after: datetime.datetime
    ocsp: str
    session_reused: bool
    #: the key-exchange group of this handshake (e.g. ``"X25519MLKEM768"``); None without one
    group: str | None = None


class UpstreamConnection(SSL.Connection):
    """A client ``SSL.Connection`` that carries its own validation state.

    Attributes (written by the validator's callbacks, read by ``refusal`` and
    ``check_established``): ``verify_host`` (normalised host or IP text), ``verify_error``
    (first OpenSSL verify failure as ``(code, depth)``), ``refused`` (first ``(category,
    reason)`` recorded by a callback), ``client_cert_requested``, ``ocsp_status``
    (``None`` until the OCSP callback ran, then ``good``/``none``/``revoked``/``invalid``).
    """

    def __init__(self, context: SSL.Context, sock: socket.socket | None, verify_host: str) -> None:
        super().__init__(context, sock)
        self.verify_host = verify_host
        self.verify_error: tuple[int, int] | None = None
        self.refused: tuple[str, str] | None = None
        self.client_cert_requested = False
        self.ocsp_status: str | None = None
        #: set by new_connection when a validated session is offered for resumption
        self.session_key: SessionKey | None = None
        self.offered: CachedSession[SSL.Session, UpstreamInfo] | None = None
        #: set by check_established once the server is accepted
        self.accepted: UpstreamInfo | None = None
        #: the server's identity for key-share hints (tlsgate.workers.keyshares)
        self.server_key: tuple[str, str, int] | None = None
        #: the group whose key share a hint put alone in the ClientHello, if any
        self.hinted_group: str | None = None

    def refuse(self, category: str, reason: str) -> None:
        """Record a refusal unless one is already recorded (the first one explains)."""
        if self.refused is None:
            self.refused = (category, reason)


@dataclass(frozen=True, slots=True)
class _Verdict:
    """A cached acceptance of one chain for one host, with the leaf facts derived once."""

    expires: float
    must_staple: bool
    subject: str
    issuer: str
    fingerprint_sha256: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_after: datetime.datetime


def load_trust_anchors(path: Path) -> tuple[list[x509.Certificate], int]:
    """Parse every PEM certificate in ``path`` for ``cryptography``'s verifier.

    Returns (certificates, how many blocks ``cryptography`` could not parse and skipped).
    Raises :class:`ConfigError` if the file cannot be read or yields no certificate.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the CA bundle {path} ({exc.strerror}); install the ca-certificates "
            "package or pass an existing PEM bundle as ca_bundle"
        ) from exc
    anchors: list[x509.Certificate] = []
    skipped = 0
    # Some roots in distribution bundles have non-positive serial numbers; cryptography
    # warns about them but still parses them, and they remain roots the OS trusts.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        for block in _PEM_CERT.findall(data):
            try:
                anchors.append(x509.load_pem_x509_certificate(block))
            except ValueError:
                skipped += 1
    if not anchors:
        raise ConfigError(
            f"the CA bundle {path} contains no usable PEM certificate; point ca_bundle at a "
            "PEM file of trusted root certificates"
        )
    return anchors, skipped


def chain_policy_problem(chain: Sequence[x509.Certificate]) -> tuple[str, str] | None:
    """Our explicit checks over a verified chain (leaf first, trust anchor last).

    Returns ``(category, reason)`` for the first problem, or ``None``: the leaf must carry
    an EKU extension that contains serverAuth; every key must be RSA >= ``MIN_RSA_BITS`` or
    EC >= ``MIN_EC_BITS`` when RSA/EC; no certificate below the anchor may be signed with
    SHA-1, MD5 or an algorithm ``cryptography`` does not know.
    """
    leaf = chain[0]
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return (
            "no-server-auth",
            f"the leaf {_name(leaf)} has no extended key usage extension; serverAuth is required",
        )
    except ValueError as exc:
        return ("verify-failed", f"the leaf {_name(leaf)} has malformed extensions ({exc})")
    if _SERVER_AUTH not in eku:
        return ("no-server-auth", f"the leaf {_name(leaf)} is not valid for serverAuth")
    last = len(chain) - 1
    for depth, cert in enumerate(chain):
        try:
            key = cert.public_key()
        except (UnsupportedAlgorithm, ValueError):
            return (
                "weak-key",
                f"unsupported public key algorithm (depth {depth}, {_name(cert)})",
            )
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
            return (
                "weak-key",
                f"RSA key of {key.key_size} bits, {MIN_RSA_BITS} required (depth {depth}, "
                f"{_name(cert)})",
            )
        if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size < MIN_EC_BITS:
            return (
                "weak-key",
                f"EC key on {key.curve.name}, at least {MIN_EC_BITS} bits required "
                f"(depth {depth}, {_name(cert)})",
            )
        if depth == last and depth > 0:
            continue  # the trust anchor's self-signature is not relied upon
        try:
            algorithm = cert.signature_hash_algorithm
        except UnsupportedAlgorithm:
            return (
                "weak-signature",
                f"unsupported signature algorithm {cert.signature_algorithm_oid.dotted_string}"
                f" (depth {depth}, {_name(cert)})",
            )
        if isinstance(algorithm, _WEAK_SIGNATURE_HASHES):
            return (
                "weak-signature",
                f"signed with {algorithm.name.upper()} (depth {depth}, {_name(cert)})",
            )
    return None


def negotiated_problem(
    tls_version: str | None, cipher: str | None, offered: frozenset[str]
) -> tuple[str, str] | None:
    """Re-check what OpenSSL negotiated: TLS 1.2/1.3 and a cipher suite we offered."""
    if cipher is None:
        return ("handshake-failed", "no cipher suite was negotiated: the handshake is not done")
    if tls_version not in ALLOWED_VERSIONS:
        return ("protocol-version", f"negotiated {tls_version}, TLS 1.2 or 1.3 required")
    if cipher not in offered:
        return ("weak-cipher", f"negotiated cipher suite {cipher}, which we never offer")
    return None


def _dump_der(cert: crypto.X509) -> bytes:
    return crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "<empty subject>"


def _san(cert: x509.Certificate) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(DNS names, IP addresses) of ``cert``'s subjectAltName, empty if it has none."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return (), ()
    dns = tuple(san.get_values_for_type(x509.DNSName))
    ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    return dns, ips


def _parse_host(verify_host: str) -> tuple[str, bytes | None]:
    """(normalised host, packed IP or None); refuses what no certificate can match."""
    text = verify_host
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text or text[-1:].isdigit():  # only these can be IP literals
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            pass
        else:
            return str(ip), ip.packed
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    if len(name) > MAX_DNS_NAME or not _DNS_NAME.fullmatch(name):
        raise UpstreamRefused(
            "hostname-mismatch",
            f"upstream host {verify_host!r} is neither an IP address nor a valid DNS name, so "
            "no certificate can be checked against it",
        )
    return name, None


class UpstreamValidator:
    """Builds upstream TLS connections and decides whether each server may be used.

    ``ca_bundle``: PEM file of trusted roots (default: the system bundle). ``cache_size``
    and ``cache_ttl`` bound the verdict cache; ``clock`` (seconds since the epoch) is the
    time used for verdict expiry, OCSP and the independent verifier.

    Public counters: ``cache_hits``, ``cache_misses``; ``trust_anchor_count`` and
    ``skipped_anchor_count`` (bundle blocks ``cryptography`` could not parse).
    """

    def __init__(
        self,
        ca_bundle: str | os.PathLike[str] | None = None,
        *,
        cache_size: int = VERDICT_CACHE_SIZE,
        cache_ttl: float = VERDICT_TTL,
        clock: Callable[[], float] = time.time,
        session_cache_size: int = DEFAULT_MAX_ENTRIES,
        session_lifetime: float = DEFAULT_LIFETIME,
    ) -> None:
        check_private_api()
        if cache_size < 1 or cache_ttl <= 0:
            raise ConfigError("the upstream verdict cache needs cache_size >= 1 and ttl > 0")
        path = Path(ca_bundle) if ca_bundle is not None else DEFAULT_CA_BUNDLE
        anchors, self.skipped_anchor_count = load_trust_anchors(path)
        self.trust_anchor_count = len(anchors)
        self._anchors = frozenset(anchors)
        self._store = Store(anchors)
        self._cache_size = cache_size
        self._cache_ttl = cache_ttl
        self._clock = clock
        self._cache: OrderedDict[tuple[tuple[bytes, ...], str], _Verdict] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0
        #: validated upstream sessions to resume (see tlsgate.workers.sessions)
        self.sessions: UpstreamSessionCache[SSL.Session, UpstreamInfo] = UpstreamSessionCache(
            session_cache_size, min(session_lifetime, cache_ttl)
        )
        self._policy_failure: tuple[str, str] | None = None
        self._ca_policy = (
            ExtensionPolicy.webpki_defaults_ca()
            .require_present(x509.BasicConstraints, Criticality.AGNOSTIC, self._ca_constraints)
            .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, self._ca_key_usage)
        )
        self._ee_policy = (
            ExtensionPolicy.webpki_defaults_ee()
            .require_present(
                x509.SubjectAlternativeName, Criticality.AGNOSTIC, self._ee_subject_alt_name
            )
            .may_be_present(
                x509.ExtendedKeyUsage, Criticality.AGNOSTIC, self._ee_extended_key_usage
            )
        )
        self._ctx = self._build_context(path)
        self._offered_ciphers = frozenset(SSL.Connection(self._ctx).get_cipher_list())
        #: which key share to send each server (learned from accepted handshakes)
        self.key_shares = KeyShareHints(self._ctx)

    def _build_context(self, path: Path) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_cipher_list(TLS12_CIPHERS)
        # IGNORE_UNEXPECTED_EOF: a server's EOF without close_notify ends the stream as the
        # relay already treats it (a clean end), instead of a fatal error that also marks the
        # session non-resumable (many servers close without close_notify).
        ctx.set_options(
            SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_IGNORE_UNEXPECTED_EOF
        )
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        # Client sessions are kept for a future resumption cache keyed by host; OpenSSL's
        # internal store would hold up to 20480 of them per worker and is never consulted
        # by clients, so it stays off.
        ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT | SSL.SESS_CACHE_NO_INTERNAL_STORE)
        ctx.set_verify_depth(MAX_CHAIN_DEPTH)
        try:
            ctx.load_verify_locations(str(path).encode())
        except SSL.Error as exc:
            raise ConfigError(
                f"OpenSSL cannot load the CA bundle {path} ({exc}); point ca_bundle at a "
                "PEM file of trusted root certificates"
            ) from exc
        self._verify_observer = _install_verify_observer(ctx)
        self._cert_request_refusal = _install_cert_request_refusal(ctx)
        ctx.set_ocsp_client_callback(self._on_ocsp)
        return ctx

    @property
    def context(self) -> SSL.Context:
        """The client context every upstream connection uses (read-only use only)."""
        return self._ctx

    # -- per connection ------------------------------------------------------------------

    def new_connection(
        self,
        sock: socket.socket | None,
        *,
        server_name: str | None,
        verify_host: str,
        alpn: Sequence[bytes] = (),
    ) -> UpstreamConnection:
        """A client connection on ``sock`` (connected, preferably non-blocking; ``None``
        gives memory BIOs) that will only complete if the server proves ``verify_host``.

        ``server_name`` goes into SNI unless it is an IP literal or not a valid DNS name.
        Raises ``UpstreamRefused("hostname-mismatch")`` if ``verify_host`` is neither an IP
        address nor a valid DNS name (the caller still owns and must close ``sock``).
        """
        host, ip = _parse_host(verify_host)
        conn = UpstreamConnection(self._ctx, sock, host)
        conn.set_connect_state()
        if server_name is not None:
            sni = server_name.lower().removesuffix(".")
            if (
                len(sni) <= MAX_DNS_NAME
                and _DNS_NAME.fullmatch(sni)
                and not _DIGITS_AND_DOTS.fullmatch(sni)  # an IPv4 literal, never SNI
            ):
                conn.set_tlsext_host_name(sni.encode("ascii"))
        if not _set_verify_host(conn, None if ip else host.encode("ascii"), ip):
            raise UpstreamRefused(
                "hostname-mismatch", f"OpenSSL cannot check certificates against {host!r}"
            )
        conn.request_ocsp()
        if alpn:
            conn.set_alpn_protos(list(alpn))
        if sock is not None and (self.sessions.max_entries or self.key_shares.enabled):
            try:
                peer = sock.getpeername()
            except OSError:
                peer = None
            if peer is not None and self.key_shares.enabled:
                conn.server_key = (host, str(peer[0]), int(peer[1]))
                conn.hinted_group = self.key_shares.apply(conn, conn.server_key)
            if peer is not None and self.sessions.max_entries:
                sent = conn.get_servername()
                conn.session_key = SessionKey(
                    host, sent.decode("ascii") if sent else None, str(peer[0]), int(peer[1]),
                    tuple(alpn),
                )  # fmt: skip
                conn.offered = self.sessions.take(conn.session_key)
                if conn.offered is not None:
                    conn.set_session(conn.offered.session)
        return conn

    def remember(self, conn: SSL.Connection) -> bool:
        """After a connection accepted by :meth:`check_established` ended *cleanly*: keep its
        session for the next connection with the same key (see tlsgate.workers.sessions).
        The connection is marked as shut down, which OpenSSL requires to keep the session
        resumable. Returns whether a session was stored."""
        if not isinstance(conn, UpstreamConnection) or conn.accepted is None:
            return False
        if conn.session_key is None:
            return False
        session = conn.get_session()
        if session is None:
            return False
        conn.set_shutdown(conn.get_shutdown() | SSL.SENT_SHUTDOWN)
        self.sessions.store(conn.session_key, session, conn.accepted, conn.accepted.not_after)
        return True

    def refusal(self, conn: SSL.Connection, exc: Exception) -> UpstreamRefused:
        """Explain why ``do_handshake`` on ``conn`` raised ``exc`` (an ``SSL.Error`` other
        than ``WantReadError``/``WantWriteError``, or an ``OSError``)."""
        if isinstance(exc, SSL.WantReadError | SSL.WantWriteError):
            raise TypeError(f"{type(exc).__name__} is not a failure: retry the handshake")
        if isinstance(conn, UpstreamConnection):
            failure = conn.verify_error
            if failure is None:
                code = _verify_result(conn)
                failure = (code, -1) if code != X509_V_OK else None
            if failure is not None:
                return self._verify_refusal(conn, *failure)
            if conn.refused is not None:
                return UpstreamRefused(*conn.refused)
        return _handshake_refusal(exc)

    def check_established(self, conn: SSL.Connection) -> UpstreamInfo:
        """Accept or refuse the server after ``do_handshake`` returned; see the module
        docstring for what is checked. Raises :class:`UpstreamRefused`."""
        if not isinstance(conn, UpstreamConnection):
            raise TypeError("check_established needs a connection from new_connection()")
        info = self._accept(conn)
        if conn.server_key is not None:
            self.key_shares.learn(conn.server_key, info.group, conn.hinted_group)
        return info

    def _accept(self, conn: UpstreamConnection) -> UpstreamInfo:
        code = _verify_result(conn)
        if conn.verify_error is not None or code != X509_V_OK:
            raise self._verify_refusal(conn, *(conn.verify_error or (code, -1)))
        if conn.refused is not None:
            raise UpstreamRefused(*conn.refused)
        tls_version = conn.get_protocol_version_name()
        cipher = conn.get_cipher_name()
        problem = negotiated_problem(tls_version, cipher, self._offered_ciphers)
        if problem is not None:
            raise UpstreamRefused(*problem)
        if _session_reused(conn):
            if conn.offered is None:
                raise UpstreamRefused(
                    "verify-failed",
                    "the server resumed a session tlsgate did not offer (no verified "
                    "certificate chain); refusing",
                )
            # the session's full handshake passed every check below; only this
            # handshake's own parameters are new
            assert cipher is not None
            alpn = conn.get_alpn_proto_negotiated()
            conn.accepted = dataclasses.replace(
                conn.offered.info, tls_version=tls_version, cipher=cipher, alpn=alpn or None,
                session_reused=True, group=group_name(conn),
            )  # fmt: skip
            return conn.accepted
        verified = conn.get_verified_chain()
        if not verified:
            raise UpstreamRefused(
                "verify-failed",
                "the handshake finished without a verified certificate chain (a resumed "
                "session or a handshake that is not complete); refusing",
            )
        ders = [_dump_der(cert) for cert in verified]
        digests = tuple(_sha256(der).digest() for der in ders)
        chain = tuple(map(x509.load_der_x509_certificate, ders))
        verdict = self._verdict(chain, digests, conn.verify_host)
        ocsp_status = conn.ocsp_status or "none"
        if verdict.must_staple and ocsp_status != GOOD:
            raise UpstreamRefused(
                "must-staple",
                f"the leaf {verdict.subject} requires a stapled OCSP response (TLS Feature "
                "status_request) and the server stapled none",
            )
        assert cipher is not None
        alpn = conn.get_alpn_proto_negotiated()
        conn.accepted = UpstreamInfo(
            tls_version=tls_version,
            cipher=cipher,
            alpn=alpn or None,
            leaf=chain[0],
            chain=chain,
            subject=verdict.subject,
            issuer=verdict.issuer,
            fingerprint_sha256=verdict.fingerprint_sha256,
            dns_names=verdict.dns_names,
            ip_addresses=verdict.ip_addresses,
            not_after=verdict.not_after,
            ocsp=ocsp_status,
            session_reused=False,
            group=group_name(conn),
        )
        return conn.accepted

    # -- OpenSSL callbacks (run inside do_handshake; they must never raise) ----------------

    def _on_ocsp(self, conn: SSL.Connection, der: bytes, data: object) -> bool:
        """OCSP status callback: True lets the handshake go on, False aborts it."""
        if not isinstance(conn, UpstreamConnection):
            return False
        try:
            return self._check_ocsp(conn, der)
        except Exception as exc:
            # An exception escaping here would be stored by pyOpenSSL on the *context* and
            # re-raised on whichever connection fails next; refuse this one instead.
            conn.refuse("ocsp-invalid", f"checking the stapled OCSP response failed: {exc!r}")
            return False

    def _check_ocsp(self, conn: UpstreamConnection, der: bytes) -> bool:
        if not der:
            conn.ocsp_status = "none"  # must-staple is enforced by check_established
            return True
        chain = conn.get_verified_chain(as_cryptography=True)
        if not chain:
            conn.ocsp_status = "invalid"
            conn.refuse("verify-failed", "an OCSP staple arrived before a verified chain")
            return False
        issuer = chain[1] if len(chain) > 1 else chain[0]
        now = datetime.datetime.fromtimestamp(self._clock(), _UTC)
        verdict = check_staple(der, chain[0], issuer, now)
        conn.ocsp_status = verdict.status
        if verdict.status == GOOD:
            return True
        conn.refuse("revoked" if verdict.status == REVOKED else "ocsp-invalid", verdict.reason)
        return False

    # -- verdicts --------------------------------------------------------------------------

    def _verdict(
        self, chain: Sequence[x509.Certificate], digests: tuple[bytes, ...], host: str
    ) -> _Verdict:
        """The cached acceptance of ``chain`` (SHA-256 ``digests`` of its DER) for ``host``,
        or a fresh one after the explicit checks and the independent verifier."""
        now = self._clock()
        key = (digests, host)
        cached = self._cache.get(key)
        if cached is not None:
            if cached.expires > now:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return cached
            del self._cache[key]
        self.cache_misses += 1
        problem = chain_policy_problem(chain)
        if problem is not None:
            raise UpstreamRefused(*problem)
        self.verify_independently(chain, host, now)
        leaf = chain[0]
        dns_names, ip_addresses = _san(leaf)
        not_after = leaf.not_valid_after_utc
        verdict = _Verdict(
            expires=min(now + self._cache_ttl, *(c.not_valid_after_utc.timestamp() for c in chain)),
            must_staple=requires_staple(leaf),
            subject=_name(leaf),
            issuer=leaf.issuer.rfc4514_string(),
            fingerprint_sha256=digests[0].hex(),
            dns_names=dns_names,
            ip_addresses=ip_addresses,
            not_after=not_after,
        )
        self._cache[key] = verdict
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return verdict

    def verify_independently(
        self, chain: Sequence[x509.Certificate], host: str, now: float | None = None
    ) -> None:
        """Second opinion: ``cryptography``'s WebPKI verifier (with the CA/leaf profile
        described in the module docstring) over ``chain`` (leaf first, then the path to a
        trust anchor) for ``host`` at ``now`` (default: the validator's clock). Raises
        :class:`UpstreamRefused`; uncached (``check_established`` caches acceptances)."""
        host, ip_packed = _parse_host(host)
        if now is None:
            now = self._clock()
        subject: x509.DNSName | x509.IPAddress
        if ip_packed is not None:
            subject = x509.IPAddress(ipaddress.ip_address(host))
        else:
            subject = x509.DNSName(host)
        self._policy_failure = None
        try:
            verifier = (
                PolicyBuilder()
                .store(self._store)
                .time(datetime.datetime.fromtimestamp(now, _UTC))
                .max_chain_depth(MAX_CHAIN_DEPTH)
                .extension_policies(ca_policy=self._ca_policy, ee_policy=self._ee_policy)
                .build_server_verifier(subject)
            )
        except ValueError as exc:
            raise UpstreamRefused(
                "hostname-mismatch", f"the independent verifier cannot check {host!r} ({exc})"
            ) from None
        try:
            verifier.verify(chain[0], list(chain[1:-1]))
        except VerificationError as exc:
            if self._policy_failure is not None:
                raise UpstreamRefused(*self._policy_failure) from None
            if "no matching subjectAltName" in str(exc):
                raise UpstreamRefused(
                    "hostname-mismatch",
                    f"the independent verifier found no subjectAltName matching {host}",
                ) from None
            when = datetime.datetime.fromtimestamp(now, _UTC)
            for depth, cert in enumerate(chain):
                if cert.not_valid_after_utc < when:
                    raise UpstreamRefused(
                        "expired",
                        f"certificate has expired (depth {depth}, {_name(cert)}): notAfter "
                        f"{cert.not_valid_after_utc.isoformat()}",
                    ) from None
                if cert.not_valid_before_utc > when:
                    raise UpstreamRefused(
                        "not-yet-valid",
                        f"certificate is not yet valid (depth {depth}, {_name(cert)}): "
                        f"notBefore {cert.not_valid_before_utc.isoformat()}",
                    ) from None
            raise UpstreamRefused(
                "verify-failed",
                f"the independent verifier (cryptography) refused the chain OpenSSL accepted: "
                f"{exc}",
            ) from None

    def _policy_fail(self, category: str, reason: str) -> None:
        self._policy_failure = (category, reason)
        raise ValueError(reason)

    def _ca_constraints(
        self, policy: Policy, cert: x509.Certificate, bc: x509.BasicConstraints
    ) -> None:
        """CA basicConstraints: cA asserted, critical except on trust anchors (RFC 5280
        does not process a trust anchor's extensions; some system roots predate this)."""
        if not bc.ca:
            self._policy_fail("issuer-not-ca", f"{_name(cert)} is not a CA (cA is false)")
        if cert not in self._anchors:
            if not cert.extensions.get_extension_for_class(x509.BasicConstraints).critical:
                self._policy_fail(
                    "issuer-not-ca",
                    f"the CA certificate {_name(cert)} has a non-critical basicConstraints",
                )

    def _ee_subject_alt_name(
        self, policy: Policy, cert: x509.Certificate, san: x509.SubjectAlternativeName
    ) -> None:
        """Leaf subjectAltName: critical when the subject is empty (RFC 5280 4.2.1.6). The
        verifier still matches it against the host itself. Unlike cryptography's WebPKI
        default, a critical SAN beside a non-empty subject is accepted, as browsers do."""
        if len(cert.subject) == 0:
            if not cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical:
                self._policy_fail(
                    "verify-failed",
                    "the leaf has an empty subject and a non-critical subjectAltName",
                )

    def _ee_extended_key_usage(
        self, policy: Policy, cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None
    ) -> None:
        """Leaf EKU: present (stricter than RFC 5280) and listing serverAuth; either
        criticality, as browsers accept."""
        if eku is None or _SERVER_AUTH not in eku:
            self._policy_fail("no-server-auth", f"the leaf {_name(cert)} lacks serverAuth")

    def _ca_key_usage(
        self, policy: Policy, cert: x509.Certificate, ku: x509.KeyUsage | None
    ) -> None:
        """CA keyUsage: present with keyCertSign, except absent on a trust anchor."""
        if ku is None:
            if cert not in self._anchors:
                self._policy_fail(
                    "issuer-not-ca", f"the CA certificate {_name(cert)} has no keyUsage"
                )
        elif not ku.key_cert_sign:
            self._policy_fail(
                "issuer-not-ca", f"the keyUsage of {_name(cert)} does not allow keyCertSign"
            )

    # -- refusals ---------------------------------------------------------------------------

    def _verify_refusal(self, conn: UpstreamConnection, code: int, depth: int) -> UpstreamRefused:
        category = _VERIFY_ERRORS.get(code, ("verify-failed", ""))[0]
        text = _verify_error_string(code)
        chain = conn.get_verified_chain(as_cryptography=True) or conn.get_peer_cert_chain(
            as_cryptography=True
        )
        cert = chain[depth] if chain and 0 <= depth < len(chain) else None
        where = f"depth {depth}" if depth >= 0 else "depth unknown"
        if cert is not None:
            where += f", {_name(cert)}"
        detail = ""
        if code in _MISSING_ISSUER:
            if cert is None and depth < 0 and chain:
                cert = chain[-1]  # where the chain OpenSSL could build stopped
            category, detail = _missing_issuer(cert, depth)
        elif cert is not None and category == "expired":
            detail = f": notAfter {cert.not_valid_after_utc.isoformat()}"
        elif cert is not None and category == "not-yet-valid":
            detail = f": notBefore {cert.not_valid_before_utc.isoformat()}"
        elif cert is not None and category == "hostname-mismatch":
            dns, ips = _san(cert)
            names = [f"DNS:{n}" for n in dns] + [f"IP:{a}" for a in ips]
            listed = ", ".join(names[:MAX_REASON_NAMES]) or "no subjectAltName"
            extra = len(names) - MAX_REASON_NAMES
            more = f" and {extra} more" if extra > 0 else ""
            detail = f": wanted {conn.verify_host}, certificate has {listed}{more}"
        return UpstreamRefused(category, f"{text} ({where}){detail}")


def _missing_issuer(cert: x509.Certificate | None, depth: int) -> tuple[str, str]:
    """Category and detail when no issuer was found for ``cert`` at ``depth``.

    A server that omits its intermediate and a CA nobody trusts look alike. A leaf that
    names where to fetch its issuer (AIA caIssuers, as every publicly trusted leaf does) is
    an incomplete chain that browsers repair by fetching or caching intermediates; tlsgate
    does not. Anything else is treated as an untrusted root."""
    if cert is None:
        return "untrusted-root", ": no issuer of the chain is trusted"
    issuer = cert.issuer.rfc4514_string() or "<empty issuer>"
    if depth <= 0 and _ca_issuers_url(cert) is not None:
        return (
            "incomplete-chain",
            f": the server did not send the intermediate {issuer} that issued its leaf "
            f"(browsers may fetch it from {_ca_issuers_url(cert)}; tlsgate does not)",
        )
    return "untrusted-root", f": its issuer {issuer} is neither sent nor a trusted root"


def _ca_issuers_url(cert: x509.Certificate) -> str | None:
    """The first AIA caIssuers URI of ``cert``, if any."""
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    for description in aia:
        if description.access_method == AuthorityInformationAccessOID.CA_ISSUERS and isinstance(
            description.access_location, x509.UniformResourceIdentifier
        ):
            return str(description.access_location.value)
    return None


def _handshake_refusal(exc: Exception) -> UpstreamRefused:
    if isinstance(exc, SSL.SysCallError):
        errno, message = (*exc.args, None, None)[:2]
        return UpstreamRefused(
            "handshake-failed",
            f"the connection failed during the TLS handshake ({message or errno})",
        )
    if isinstance(exc, SSL.ZeroReturnError):
        return UpstreamRefused(
            "handshake-failed", "the server closed the connection during the TLS handshake"
        )
    text = _openssl_reasons(exc)
    lowered = text.lower()
    for needle, category, meaning in _HANDSHAKE_ERRORS:
        if needle in lowered:
            return UpstreamRefused(category, f"{meaning} ({text})")
    return UpstreamRefused("handshake-failed", f"TLS handshake failed ({text})")


def _openssl_reasons(exc: Exception) -> str:
    """The reason strings of an ``SSL.Error`` (a list of (lib, func, reason) tuples)."""
    if exc.args and isinstance(exc.args[0], list):
        reasons = [str(item[2]) for item in exc.args[0] if isinstance(item, tuple) and item]
        if reasons:
            return "; ".join(reasons)
    return str(exc) or type(exc).__name__
