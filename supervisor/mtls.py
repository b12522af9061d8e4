"""Mutual TLS for the management listeners (remote event subscribers, metrics): the server side.

Rules:

- TLS 1.3 only; the server presents its certificate from the events CA and *requires* a
  client certificate that chains to the configured trust anchor (the events CA, never the
  interception CA: :mod:`tlsgate.supervisor.events_ca` refuses that at start).
- On the leaf, :class:`ClientCheck` also requires the listener's role (the subject OU:
  ``events-subscriber`` or ``metrics-scraper``) and refuses serials on the deny list. All
  of it happens inside the handshake (OpenSSL's verify callback): a refused client never
  gets a byte of application data.
- No session resumption (no tickets, no session cache): every connection is verified
  against the current deny list.
- :func:`client_context` is the other side (``tlsgate events --remote``, the load test,
  scrapers written in Python): stdlib :mod:`ssl`, TLS 1.3, the server verified against
  the events CA with its address or name checked.
- :func:`refusal_reason` turns what a failed handshake left behind into a stable token
  for the counters: ``no-certificate``, ``untrusted-certificate``, ``expired-certificate``,
  ``revoked``, ``wrong-role``, ``handshake-failed`` (``timeout`` and ``limit`` are the
  caller's).
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from tlsgate.errors import OperatorError

logger = logging.getLogger(__name__)

#: OpenSSL verify errors that mean "valid, but not now".
_TIME_ERRORS: Final = frozenset({9, 10})  # X509_V_ERR_CERT_NOT_YET_VALID, _HAS_EXPIRED

NO_CERTIFICATE: Final = "no-certificate"
UNTRUSTED: Final = "untrusted-certificate"
EXPIRED: Final = "expired-certificate"
REVOKED: Final = "revoked"
WRONG_ROLE: Final = "wrong-role"
HANDSHAKE_FAILED: Final = "handshake-failed"
TIMEOUT: Final = "timeout"
LIMIT: Final = "limit"
#: Every refusal reason, in the order status and metrics list them.
REFUSAL_REASONS: Final = (
    NO_CERTIFICATE, UNTRUSTED, EXPIRED, REVOKED, WRONG_ROLE, HANDSHAKE_FAILED, TIMEOUT, LIMIT,
)  # fmt: skip


class PeerRecord:
    """What the verify callback learned about one connection's client certificate."""

    __slots__ = ("name", "reason", "serial", "verify_error")

    def __init__(self) -> None:
        self.verify_error: int | None = None
        self.reason: str | None = None
        self.name = ""
        self.serial: int | None = None


class ClientCheck:
    """The leaf checks of one listener: its role, and the deny list (replaceable on reload)."""

    def __init__(self, role: str, revoked: frozenset[int] = frozenset()) -> None:
        self.role: Final = role
        #: Serials refused on every new handshake (assigning a new set is atomic).
        self.revoked = revoked

    def verify(self, conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int,
               ok: int) -> bool:  # fmt: skip
        record = conn.get_app_data()
        if not isinstance(record, PeerRecord):
            record = PeerRecord()
            conn.set_app_data(record)
        if not ok:
            record.verify_error = errnum
            return False
        if depth:
            return True
        try:
            return self._check_leaf(cert.to_cryptography(), record)
        except Exception:  # a callback that raises would surface later, on another call
            logger.exception("checking a client certificate failed; refusing it")
            record.reason = HANDSHAKE_FAILED
            return False

    def _check_leaf(self, leaf: x509.Certificate, record: PeerRecord) -> bool:
        record.serial = leaf.serial_number
        record.name = _attribute(leaf.subject, NameOID.COMMON_NAME)
        if leaf.serial_number in self.revoked:
            record.reason = REVOKED
            return False
        if _attribute(leaf.subject, NameOID.ORGANIZATIONAL_UNIT_NAME) != self.role:
            record.reason = WRONG_ROLE
            return False
        return True


def _attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    values = name.get_attributes_for_oid(oid)
    value = values[0].value if values else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def server_context(
    ca_file: Path, cert_file: Path, key_file: Path, check: ClientCheck
) -> SSL.Context:
    """A server Context for a management listener (see the module rules)."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_options(SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    try:
        ctx.use_certificate_chain_file(str(cert_file))
        ctx.use_privatekey_file(str(key_file))
        ctx.check_privatekey()
        ctx.load_verify_locations(str(ca_file))
    except (SSL.Error, OSError, ValueError) as exc:
        raise OperatorError(
            f"cannot set up mutual TLS with certificate {cert_file}, key {key_file} and client"
            f" CA {ca_file}: {exc}; check that the files exist and belong together (`tlsgate"
            " events-ca issue-server` issues a new pair)"
        ) from exc
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, check.verify)
    ctx.set_verify_depth(2)
    return ctx


def new_server_connection(ctx: SSL.Context, sock: object) -> tuple[SSL.Connection, PeerRecord]:
    """A server-side Connection over ``sock`` with its :class:`PeerRecord`."""
    conn = SSL.Connection(ctx, sock)  # type: ignore[arg-type]
    record = PeerRecord()
    conn.set_app_data(record)
    conn.set_accept_state()
    return conn, record


def refusal_reason(record: PeerRecord, error: Exception) -> str:
    """The counter token for a handshake that failed with ``error`` (see the module rules)."""
    if record.reason is not None:
        return record.reason
    if record.verify_error is not None:
        return EXPIRED if record.verify_error in _TIME_ERRORS else UNTRUSTED
    text = str(error).lower()
    if "did not return a certificate" in text or "certificate required" in text:
        return NO_CERTIFICATE
    return HANDSHAKE_FAILED


def client_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A client context presenting ``cert_file``/``key_file`` and trusting only ``ca_file``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_verify_locations(cafile=str(ca_file))
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise OperatorError(
            f"cannot use the certificate {cert_file}, key {key_file} and CA {ca_file}:"
            f" {getattr(exc, 'strerror', None) or exc}; use the three files `tlsgate events-ca"
            " issue-subscriber NAME --out DIR` wrote (DIR/cert.pem, DIR/key.pem, DIR/ca.pem)"
        ) from exc
    return ctx
