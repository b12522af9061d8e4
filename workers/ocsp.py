"""Checks of stapled OCSP responses: pure functions over ``cryptography`` objects.

Contract (RFC 6960 as browsers apply it to a stapled response; fail closed):

- A staple is *good* only if all of these hold, else it is *invalid*:
  the response parses and its status is ``successful``; exactly the single response whose
  CertID names the leaf (serial number, issuer name hash and issuer key hash, computed with
  the CertID's own hash algorithm) is used; the response is signed by the leaf's issuer, or
  by a delegated responder certificate that the issuer signed, that carries the
  id-kp-OCSPSigning EKU and is valid now; the signature hash is not MD5 or SHA-1;
  ``thisUpdate`` is not more than ``CLOCK_SKEW`` in the future; ``nextUpdate`` has not
  passed (a response without ``nextUpdate`` lives ``MAX_AGE_WITHOUT_NEXT_UPDATE`` after
  ``thisUpdate``) and does not extend more than ``MAX_VALIDITY`` beyond ``thisUpdate``
  (CA/Browser Forum limit); the certificate status is ``good``.
- A staple whose signed, current, matching single response says ``revoked`` is *revoked*;
  ``unknown`` is *invalid* (the responder does not vouch for the certificate).
- :func:`requires_staple` says whether a certificate carries the TLS Feature extension
  with ``status_request`` (RFC 7633, "must-staple").
- No I/O, no clock: the caller passes ``now``. Nothing here raises for bad input; every
  problem becomes a :class:`StapleVerdict` with one operator-readable ``reason``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

#: Verdict statuses.
GOOD: Final = "good"
REVOKED: Final = "revoked"
INVALID: Final = "invalid"

CLOCK_SKEW = datetime.timedelta(minutes=5)
MAX_AGE_WITHOUT_NEXT_UPDATE = datetime.timedelta(days=1)
MAX_VALIDITY = datetime.timedelta(days=10)
#: At most this many single responses / embedded certificates are looked at.
MAX_SINGLE_RESPONSES = 32
MAX_RESPONDER_CERTS = 8

_WEAK_HASHES = (hashes.SHA1, hashes.MD5)
_CERT_ID_HASHES: dict[str, hashes.HashAlgorithm] = {
    h.name: h
    for h in (hashes.SHA1(), hashes.SHA224(), hashes.SHA256(), hashes.SHA384(), hashes.SHA512())
}


@dataclass(frozen=True, slots=True)
class StapleVerdict:
    """The outcome of checking one stapled response: ``status`` is ``good``, ``revoked``
    or ``invalid``; ``reason`` says why in one line."""

    status: str
    reason: str


class _Invalid(Exception):
    """Internal: the staple is invalid for the reason in ``args[0]``."""


def requires_staple(cert: x509.Certificate) -> bool:
    """True if ``cert`` has a TLS Feature extension listing ``status_request``."""
    try:
        feature = cert.extensions.get_extension_for_class(x509.TLSFeature).value
    except x509.ExtensionNotFound:
        return False
    return x509.TLSFeatureType.status_request in feature


def check_staple(
    der: bytes,
    leaf: x509.Certificate,
    issuer: x509.Certificate,
    now: datetime.datetime,
) -> StapleVerdict:
    """Check the DER OCSP response ``der`` stapled for ``leaf`` (issued by ``issuer``).

    ``now`` must be timezone-aware (UTC).
    """
    try:
        return _check(der, leaf, issuer, now)
    except _Invalid as exc:
        return StapleVerdict(INVALID, str(exc))


def _check(
    der: bytes, leaf: x509.Certificate, issuer: x509.Certificate, now: datetime.datetime
) -> StapleVerdict:
    try:
        response = ocsp.load_der_ocsp_response(der)
    except ValueError as exc:
        raise _Invalid(f"stapled OCSP response does not parse ({exc})") from None
    if response.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise _Invalid(
            f"stapled OCSP response has status {response.response_status.name}, not SUCCESSFUL"
        )
    single = _matching_single_response(response, leaf, issuer)
    _check_signature(response, issuer, now)
    _check_times(single, now)
    status = single.certificate_status
    if status is ocsp.OCSPCertStatus.GOOD:
        return StapleVerdict(GOOD, "stapled OCSP response says good")
    if status is ocsp.OCSPCertStatus.REVOKED:
        when = single.revocation_time_utc
        why = single.revocation_reason
        return StapleVerdict(
            REVOKED,
            f"stapled OCSP response says the certificate (serial {leaf.serial_number:x}) was "
            f"revoked{f' on {when.isoformat()}' if when else ''}"
            f"{f' ({why.name})' if why is not None else ''}",
        )
    raise _Invalid("stapled OCSP response says the certificate status is unknown")


def _matching_single_response(
    response: ocsp.OCSPResponse, leaf: x509.Certificate, issuer: x509.Certificate
) -> ocsp.OCSPSingleResponse:
    expected: dict[str, tuple[bytes, bytes]] = {}
    for index, single in enumerate(response.responses):
        if index >= MAX_SINGLE_RESPONSES:
            break
        if single.serial_number != leaf.serial_number:
            continue
        try:
            algorithm = single.hash_algorithm
        except UnsupportedAlgorithm:
            continue
        hashes_ = expected.get(algorithm.name)
        if hashes_ is None:
            hashes_ = _cert_id_hashes(leaf, issuer, algorithm)
            expected[algorithm.name] = hashes_
        if (single.issuer_name_hash, single.issuer_key_hash) == hashes_:
            return single
    raise _Invalid(
        f"stapled OCSP response is not about this certificate (serial {leaf.serial_number:x} "
        f"issued by {issuer.subject.rfc4514_string()})"
    )


def _cert_id_hashes(
    leaf: x509.Certificate, issuer: x509.Certificate, algorithm: hashes.HashAlgorithm
) -> tuple[bytes, bytes]:
    """(issuerNameHash, issuerKeyHash) of the CertID for ``leaf`` with ``algorithm``."""
    known = _CERT_ID_HASHES.get(algorithm.name)
    if known is None:
        raise _Invalid(f"stapled OCSP response uses CertID hash {algorithm.name}")
    request = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, known).build()
    return request.issuer_name_hash, request.issuer_key_hash


def _check_signature(
    response: ocsp.OCSPResponse, issuer: x509.Certificate, now: datetime.datetime
) -> None:
    try:
        algorithm = response.signature_hash_algorithm
    except UnsupportedAlgorithm:
        raise _Invalid("stapled OCSP response uses an unsupported signature algorithm") from None
    if algorithm is not None and isinstance(algorithm, _WEAK_HASHES):
        raise _Invalid(f"stapled OCSP response is signed with {algorithm.name.upper()}")
    signer = _authorised_signer(response, issuer, now)
    try:
        _verify(signer.public_key(), response.signature, response.tbs_response_bytes, algorithm)
    except InvalidSignature:
        raise _Invalid(
            f"stapled OCSP response signature does not verify with the key of "
            f"{signer.subject.rfc4514_string()}"
        ) from None


def _names_responder(response: ocsp.OCSPResponse, cert: x509.Certificate) -> bool:
    """True if the response's ResponderID identifies ``cert``."""
    name = response.responder_name
    if name is not None:
        return name == cert.subject
    key_hash = response.responder_key_hash
    return key_hash == x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


def _authorised_signer(
    response: ocsp.OCSPResponse, issuer: x509.Certificate, now: datetime.datetime
) -> x509.Certificate:
    if _names_responder(response, issuer):
        return issuer
    for index, candidate in enumerate(response.certificates):
        if index >= MAX_RESPONDER_CERTS:
            break
        if not _names_responder(response, candidate):
            continue
        try:
            candidate.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            raise _Invalid(
                f"stapled OCSP response is signed by {candidate.subject.rfc4514_string()}, "
                f"which {issuer.subject.rfc4514_string()} did not issue"
            ) from None
        try:
            eku = candidate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = x509.ExtendedKeyUsage([])
        if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
            raise _Invalid(
                f"stapled OCSP response is signed by {candidate.subject.rfc4514_string()}, "
                "which lacks the OCSPSigning extended key usage"
            )
        if not candidate.not_valid_before_utc <= now <= candidate.not_valid_after_utc:
            raise _Invalid(
                f"the OCSP responder certificate {candidate.subject.rfc4514_string()} is "
                "not valid now"
            )
        return candidate
    raise _Invalid(
        "stapled OCSP response is signed by neither the issuer "
        f"{issuer.subject.rfc4514_string()} nor a responder it delegated to"
    )


def _verify(
    key: object, signature: bytes, data: bytes, algorithm: hashes.HashAlgorithm | None
) -> None:
    if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
        key.verify(signature, data, padding.PKCS1v15(), algorithm)
    elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
        key.verify(signature, data, ec.ECDSA(algorithm))
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        key.verify(signature, data)
    else:
        raise _Invalid(
            f"stapled OCSP response signer key {type(key).__name__} cannot verify "
            f"this signature algorithm"
        )


def _check_times(single: ocsp.OCSPSingleResponse, now: datetime.datetime) -> None:
    this_update = single.this_update_utc
    if this_update > now + CLOCK_SKEW:
        raise _Invalid(
            f"stapled OCSP response is not yet valid (thisUpdate {this_update.isoformat()})"
        )
    next_update = single.next_update_utc
    if next_update is None:
        expires = this_update + MAX_AGE_WITHOUT_NEXT_UPDATE
    else:
        if next_update - this_update > MAX_VALIDITY:
            raise _Invalid(
                "stapled OCSP response claims validity beyond "
                f"{MAX_VALIDITY.days} days (nextUpdate {next_update.isoformat()})"
            )
        expires = next_update
    if expires < now:
        raise _Invalid(f"stapled OCSP response has expired ({expires.isoformat()})")
