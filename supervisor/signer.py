"""Minting the leaf certificates the gateway presents to its clients.

Contract:

- One :class:`LeafSigner` per run, built from the loaded CA and one leaf key (ECDSA P-256
  from :func:`generate_leaf_key`; it lives in memory only and is never written to disk).
  Every leaf carries that same public key, so a leaf costs one CA signature and no key
  generation.
- A leaf (:meth:`LeafSigner.sign`) has: subject CN = the primary name (the first DNS name,
  cut to 64 characters, or else the first IP address); subjectAltName = every DNS name and
  IP address of the request, deduplicated (DNS names case-insensitively), in request order;
  notBefore = now - :data:`LEAF_BACKDATE` (clock skew) but never before the CA's notBefore;
  notAfter = the earliest of the request's notAfter (the upstream leaf's), the CA's
  notAfter and now + :data:`MAX_LEAF_VALIDITY`; basicConstraints CA:FALSE and keyUsage
  digitalSignature (both critical); extendedKeyUsage serverAuth; SKI; AKI = the CA's SKI;
  a random 159-bit serial; signed with SHA-256 (PKCS#1 v1.5 for RSA CAs; SHA-384 or
  SHA-512 for imported P-384 or P-521 CAs, as browsers require).
- ``sign`` raises ``ValueError`` (a caller bug, not a peer's doing: names reach the signer
  only after the upstream was validated for them) for an empty name set, more than
  :data:`MAX_LEAF_NAMES` names, a DNS name that is not an ASCII host name or wildcard, an
  invalid IP address, a naive ``not_after``, or a validity window that would be empty.
- ``signatures`` counts the leaves signed. Pure computation: no I/O, no locks.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tlsgate.supervisor.ca import LoadedCA, signature_hash

#: Leaves start this far in the past, for clients whose clock is behind.
LEAF_BACKDATE: Final = timedelta(hours=1)
#: Browsers refuse leaves valid longer than 398 days; stay a day below.
MAX_LEAF_VALIDITY: Final = timedelta(days=397)
#: X.520 upper bound of a commonName.
MAX_COMMON_NAME_CHARS: Final = 64
#: Bound on subjectAltName entries (DNS names plus IP addresses) in one leaf.
MAX_LEAF_NAMES: Final = 1000
MAX_DNS_NAME_CHARS: Final = 253

#: An A-label host name or wildcard: what may go into a dNSName.
_DNS_NAME: Final = re.compile(r"[A-Za-z0-9_*.-]+")


def _ext(value: x509.ExtensionType, critical: bool) -> x509.Extension[x509.ExtensionType]:
    return x509.Extension(value.oid, critical, value)


_LEAF_BASIC_CONSTRAINTS: Final = _ext(x509.BasicConstraints(ca=False, path_length=None), True)
_LEAF_KEY_USAGE: Final = _ext(
    x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    ),
    True,
)
_LEAF_EXTENDED_KEY_USAGE: Final = _ext(
    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False
)


@dataclass(frozen=True, slots=True)
class LeafRequest:
    """What a leaf must cover: names (the first is the primary, e.g. the SNI) and an end.

    ``not_after`` is the upstream leaf's notAfter, timezone-aware (UTC).
    """

    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_after: datetime


def generate_leaf_key() -> ec.EllipticCurvePrivateKey:
    """The run's leaf key: ECDSA P-256, kept in memory only."""
    return ec.generate_private_key(ec.SECP256R1())


class LeafSigner:
    """Signs leaves with one CA and one leaf key; everything per-CA is precomputed."""

    __slots__ = (
        "_ca_key",
        "_ca_not_after",
        "_ca_not_before",
        "_hash",
        "_issuer",
        "_leaf_public_key",
        "_static_extensions",
        "signatures",
    )

    def __init__(
        self,
        ca: LoadedCA,
        leaf_key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey,
    ) -> None:
        self._ca_key = ca.key
        self._hash = signature_hash(ca.key)
        self._issuer = ca.cert.subject
        self._ca_not_before = ca.cert.not_valid_before_utc
        self._ca_not_after = ca.cert.not_valid_after_utc
        # the signer process gets only the public half: leaves carry it, nothing signs with it
        self._leaf_public_key = (
            leaf_key.public_key() if isinstance(leaf_key, ec.EllipticCurvePrivateKey) else leaf_key
        )
        try:
            ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key())
        else:
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
        self._static_extensions: tuple[x509.Extension[x509.ExtensionType], ...] = (
            _LEAF_BASIC_CONSTRAINTS,
            _LEAF_KEY_USAGE,
            _LEAF_EXTENDED_KEY_USAGE,
            _ext(x509.SubjectKeyIdentifier.from_public_key(self._leaf_public_key), False),
            _ext(aki, False),
        )
        #: Leaves signed so far.
        self.signatures = 0

    def sign(self, req: LeafRequest) -> x509.Certificate:
        """A leaf for ``req`` (profile in the module docstring); ``ValueError`` if impossible."""
        names = _subject_alt_names(req)
        primary = names[0].value
        common_name = primary[:MAX_COMMON_NAME_CHARS] if isinstance(primary, str) else str(primary)

        if req.not_after.utcoffset() is None:
            raise ValueError(f"not_after must be timezone-aware, got {req.not_after!r}")
        now = datetime.now(UTC).replace(microsecond=0)
        not_before = max(now - LEAF_BACKDATE, self._ca_not_before)
        not_after = min(
            req.not_after.astimezone(UTC).replace(microsecond=0),
            self._ca_not_after,
            now + MAX_LEAF_VALIDITY,
        )
        if not_after <= not_before:
            raise ValueError(
                f"leaf for {common_name} would be valid from {not_before} to {not_after}: "
                "the upstream certificate or the CA expires too soon"
            )

        # The constructor, not the fluent setters (each copies the builder): ~15% less time
        # per leaf, and every value was checked above.
        builder = x509.CertificateBuilder(
            issuer_name=self._issuer,
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]),
            public_key=self._leaf_public_key,
            serial_number=x509.random_serial_number(),
            not_valid_before=not_before,
            not_valid_after=not_after,
            extensions=[
                *self._static_extensions,
                _ext(x509.SubjectAlternativeName(names), False),
            ],
        )
        cert = builder.sign(self._ca_key, self._hash)  # RSA: PKCS#1 v1.5, the default
        self.signatures += 1
        return cert


def _subject_alt_names(req: LeafRequest) -> list[x509.GeneralName]:
    """The request's names as SAN entries: DNS names then IPs, deduplicated, order kept."""
    if len(req.dns_names) + len(req.ip_addresses) > MAX_LEAF_NAMES:
        raise ValueError(f"a leaf covers at most {MAX_LEAF_NAMES} names")
    names: list[x509.GeneralName] = []
    seen_dns: set[str] = set()
    for name in req.dns_names:
        folded = name.lower()
        if folded in seen_dns:
            continue
        if len(name) > MAX_DNS_NAME_CHARS or not _DNS_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not an ASCII DNS name")
        seen_dns.add(folded)
        names.append(x509.DNSName(name))
    seen_ips: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for text in req.ip_addresses:
        address = ipaddress.ip_address(text)  # ValueError names the bad address
        if address not in seen_ips:
            seen_ips.add(address)
            names.append(x509.IPAddress(address))
    if not names:
        raise ValueError("a leaf needs at least one DNS name or IP address")
    return names
