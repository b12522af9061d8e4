"""Upstream validation refuses every server a browser would refuse, against real TLS servers.

Each refusal test serves a defective chain or configuration from a real pyOpenSSL server on
127.0.0.1 and drives the worker's flow (``new_connection`` / non-blocking ``do_handshake`` /
``refusal`` / ``check_established``). It asserts the category *and* the stage that refused
(``handshake``: OpenSSL's own verification or callbacks; ``established``: our checks after
it), so weakening either layer fails a test. Unit tests cover the checks that back up
OpenSSL (``chain_policy_problem``, ``negotiated_problem``, ``verify_independently``,
``check_staple``). The flow runs on non-blocking sockets, as in the worker's event loop.
"""

from __future__ import annotations

import datetime
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from OpenSSL import SSL
from OpenSSL._util import lib as _lib

from tests import pki
from tests.pki import Issued
from tests.tlsserver import TLSServer, write_dh_params
from tlsgate.errors import ConfigError, OperatorError, UpstreamRefused
from tlsgate.workers import ocsp as ocsp_checks
from tlsgate.workers import upstream
from tlsgate.workers.keyshares import GROUP_NAMES, KeyShareHints, default_groups
from tlsgate.workers.upstream import (
    DEFAULT_CA_BUNDLE,
    VERDICT_TTL,
    UpstreamInfo,
    UpstreamValidator,
    chain_policy_problem,
    load_trust_anchors,
    negotiated_problem,
)

HOST = pki.DEFAULT_HOST
IO_TIMEOUT = 10.0
TLS12 = SSL.TLS1_2_VERSION
TLS13 = SSL.TLS1_3_VERSION
BOTH_VERSIONS = pytest.mark.parametrize("max_version", [TLS12, TLS13], ids=["tls1.2", "tls1.3"])
_DEFAULT: Any = object()
#: The only TLS 1.2 suites we may offer: ECDHE key exchange, AEAD encryption.
ECDHE_AEAD = re.compile(r"ECDHE-(ECDSA|RSA)-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)")


# --- the worker's flow, driven on a non-blocking socket ------------------------------------


@dataclass
class Attempt:
    """How one connection ended: ``accepted`` (with ``info``), or refused at ``handshake``
    (``refusal()``) or at ``established`` (``check_established()``)."""

    stage: str
    info: UpstreamInfo | None = None
    refused: UpstreamRefused | None = None

    @property
    def category(self) -> str | None:
        return self.refused.category if self.refused else None

    @property
    def reason(self) -> str:
        return self.refused.reason if self.refused else ""

    @property
    def outcome(self) -> tuple[str, str | None]:
        return (self.stage, self.category)


def _wait(sock: socket.socket, events: int, deadline: float) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, events)
        if not sel.select(max(0.0, deadline - time.monotonic())):
            raise TimeoutError("the TLS handshake did not progress")


def _refused(stage: str, refusal: UpstreamRefused) -> Attempt:
    """Every refusal has a documented category and a one-line reason."""
    assert refusal.category in upstream.CATEGORIES, refusal
    assert refusal.reason and "\n" not in refusal.reason, refusal
    return Attempt(stage, refused=refusal)


class Listening(Protocol):
    """Anything with an ``address`` to connect to (a TLSServer, a proxy)."""

    @property
    def address(self) -> tuple[str, int]: ...


def attempt(
    validator: UpstreamValidator,
    server: Listening,
    host: str = HOST,
    *,
    server_name: str | None = _DEFAULT,
    alpn: Sequence[bytes] = (),
    after: Callable[[SSL.Connection, socket.socket], None] | None = None,
) -> Attempt:
    """Connect to ``server`` the way the worker does; ``after`` runs on an accepted conn."""
    sni = host if server_name is _DEFAULT else server_name
    with socket.create_connection(server.address, timeout=IO_TIMEOUT) as sock:
        sock.setblocking(False)
        conn = validator.new_connection(sock, server_name=sni, verify_host=host, alpn=alpn)
        deadline = time.monotonic() + IO_TIMEOUT
        while True:
            try:
                conn.do_handshake()
                break
            except SSL.WantReadError:
                _wait(sock, selectors.EVENT_READ, deadline)
            except SSL.WantWriteError:
                _wait(sock, selectors.EVENT_WRITE, deadline)
            except SSL.Error as exc:
                return _refused("handshake", validator.refusal(conn, exc))
        try:
            info = validator.check_established(conn)
        except UpstreamRefused as exc:
            return _refused("established", exc)
        if after is not None:
            after(conn, sock)
        return Attempt("accepted", info=info)


def serve(
    validator: UpstreamValidator,
    chain: Sequence[x509.Certificate],
    key: pki.PrivateKey,
    host: str = HOST,
    *,
    server_name: str | None = _DEFAULT,
    offer_alpn: Sequence[bytes] = (),
    **server_options: Any,
) -> Attempt:
    """Serve ``chain`` from a fresh real TLS server (``server_options`` go to
    :class:`TLSServer`) and connect to it once, offering ``offer_alpn``."""
    with TLSServer(chain, key, **server_options) as server:
        return attempt(validator, server, host, server_name=server_name, alpn=offer_alpn)


def served(leaf: Issued) -> tuple[x509.Certificate, x509.Certificate]:
    """What a correct server sends for ``leaf``: the leaf and the certificate that issued it."""
    assert leaf.issuer is not None
    return (leaf.cert, leaf.issuer.cert)


def serve_leaf(validator: UpstreamValidator, leaf: Issued, **options: Any) -> Attempt:
    """Serve ``leaf`` with the certificate that issued it."""
    return serve(validator, served(leaf), leaf.key, **options)


def days(n: float) -> datetime.timedelta:
    return datetime.timedelta(days=n)


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root() -> Issued:
    return pki.make_root()


@pytest.fixture(scope="module")
def inter(root: Issued) -> Issued:
    return pki.make_intermediate(root)


@pytest.fixture(scope="module")
def good_leaf(inter: Issued) -> Issued:
    return pki.make_leaf(inter)


@pytest.fixture(scope="module")
def rsa_root() -> Issued:
    """An RSA hierarchy (SHA-1/MD5 signatures need RSA signers)."""
    return pki.make_root("tlsgate rsa root", key=pki.rsa_key(2048, slot=0))


@pytest.fixture(scope="module")
def rsa_inter(rsa_root: Issued) -> Issued:
    return pki.make_intermediate(rsa_root, "tlsgate rsa intermediate", key=pki.rsa_key(2048, 1))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, root: Issued, rsa_root: Issued) -> Path:
    path = tmp_path_factory.mktemp("trust") / "roots.pem"
    return pki.write_pem(path, root.cert, rsa_root.cert)


@pytest.fixture
def validator(bundle: Path) -> UpstreamValidator:
    return UpstreamValidator(bundle)


# --- accepted servers ----------------------------------------------------------------------


@BOTH_VERSIONS
def test_a_good_chain_served_with_its_intermediate_is_accepted(
    validator: UpstreamValidator, good_leaf: Issued, max_version: int
) -> None:
    result = serve_leaf(validator, good_leaf, max_version=max_version)
    assert result.outcome == ("accepted", None)
    assert result.info is not None
    assert result.info.tls_version == ("TLSv1.2" if max_version == TLS12 else "TLSv1.3")


def test_tls12_negotiates_ecdhe_with_an_aead_cipher(
    validator: UpstreamValidator, good_leaf: Issued
) -> None:
    result = serve_leaf(validator, good_leaf, max_version=TLS12)
    assert result.info is not None
    assert result.info.cipher.startswith("ECDHE-")
    assert "GCM" in result.info.cipher or "CHACHA20" in result.info.cipher


def test_the_info_describes_the_verified_chain_leaf_first(
    validator: UpstreamValidator, root: Issued, inter: Issued, good_leaf: Issued
) -> None:
    info = serve_leaf(validator, good_leaf).info
    assert info is not None
    assert info.leaf == good_leaf.cert
    assert info.chain == (good_leaf.cert, inter.cert, root.cert)
    assert info.subject == good_leaf.cert.subject.rfc4514_string()
    assert info.issuer == inter.cert.subject.rfc4514_string()
    assert info.fingerprint_sha256 == good_leaf.cert.fingerprint(hashes.SHA256()).hex()
    assert info.dns_names == (HOST,)
    assert info.ip_addresses == ()
    assert info.not_after == good_leaf.cert.not_valid_after_utc
    assert info.not_after.tzinfo is not None
    assert info.ocsp == "none"
    assert info.session_reused is False


def test_an_accepted_connection_carries_application_data(
    validator: UpstreamValidator, good_leaf: Issued
) -> None:
    received = bytearray()

    def exchange(conn: SSL.Connection, sock: socket.socket) -> None:
        conn.sendall(b"GET / HTTP/1.1\r\nhost: www.example.com\r\n\r\n")
        deadline = time.monotonic() + IO_TIMEOUT
        while b"ok\n" not in received:
            try:
                received.extend(conn.recv(4096))
            except SSL.WantReadError:
                _wait(sock, selectors.EVENT_READ, deadline)
            except SSL.ZeroReturnError:
                break

    with TLSServer(served(good_leaf), good_leaf.key) as server:
        assert attempt(validator, server, after=exchange).stage == "accepted"
    assert received.startswith(b"HTTP/1.1 200 OK")


def test_sni_carries_the_server_name_without_a_trailing_dot(
    validator: UpstreamValidator, good_leaf: Issued
) -> None:
    with TLSServer(served(good_leaf), good_leaf.key) as server:
        assert attempt(validator, server, "www.example.com.").stage == "accepted"
    assert server.server_names == [b"www.example.com"]


def test_an_ip_literal_is_never_sent_as_sni(validator: UpstreamValidator, inter: Issued) -> None:
    leaf = pki.make_leaf(inter, (), common_name="ip", ip_addresses=("127.0.0.1",))
    with TLSServer((leaf.cert, inter.cert), leaf.key) as server:
        result = attempt(validator, server, "127.0.0.1", server_name="127.0.0.1")
    assert result.stage == "accepted"
    assert server.server_names == [None]


@pytest.mark.parametrize("address", ["127.0.0.1", "2001:db8::5", "[2001:db8::5]"])
def test_an_ip_address_san_is_accepted_for_that_ip(
    validator: UpstreamValidator, inter: Issued, address: str
) -> None:
    bare = address.strip("[]")
    leaf = pki.make_leaf(inter, (), common_name=None, ip_addresses=(bare,))
    result = serve_leaf(validator, leaf, host=address, server_name=None)
    assert result.outcome == ("accepted", None)
    assert result.info is not None
    assert result.info.ip_addresses == (bare,)


def test_a_wildcard_matches_exactly_one_left_most_label(
    validator: UpstreamValidator, inter: Issued
) -> None:
    leaf = pki.make_leaf(inter, ("*.example.com",))
    assert serve_leaf(validator, leaf, host="a.example.com").outcome == ("accepted", None)


def test_alpn_reports_the_protocol_the_server_selected(
    validator: UpstreamValidator, good_leaf: Issued
) -> None:
    result = serve_leaf(validator, good_leaf, offer_alpn=(b"h2", b"http/1.1"), alpn=[b"http/1.1"])
    assert result.info is not None
    assert result.info.alpn == b"http/1.1"


def test_alpn_is_none_when_nothing_was_negotiated(
    validator: UpstreamValidator, good_leaf: Issued
) -> None:
    info = serve_leaf(validator, good_leaf, offer_alpn=(b"h2",)).info
    assert info is not None
    assert info.alpn is None


@BOTH_VERSIONS
def test_a_good_ocsp_staple_is_accepted_and_reported(
    validator: UpstreamValidator, inter: Issued, good_leaf: Issued, max_version: int
) -> None:
    staple = pki.ocsp_response(good_leaf.cert, inter)
    result = serve_leaf(validator, good_leaf, ocsp_staple=staple, max_version=max_version)
    assert result.outcome == ("accepted", None)
    assert result.info is not None
    assert result.info.ocsp == "good"


def test_a_staple_signed_by_a_delegated_responder_is_accepted(
    validator: UpstreamValidator, inter: Issued, good_leaf: Issued
) -> None:
    staple = pki.ocsp_response(good_leaf.cert, inter, signer=pki.ocsp_responder(inter))
    info = serve_leaf(validator, good_leaf, ocsp_staple=staple).info
    assert info is not None
    assert info.ocsp == "good"


def test_a_must_staple_leaf_with_a_good_staple_is_accepted(
    validator: UpstreamValidator, inter: Issued
) -> None:
    leaf = pki.make_leaf(inter, must_staple=True)
    staple = pki.ocsp_response(leaf.cert, inter)
    assert serve_leaf(validator, leaf, ocsp_staple=staple).outcome == ("accepted", None)


def test_the_sha1_self_signature_of_a_trust_anchor_does_not_matter(tmp_path: Path) -> None:
    legacy_root = pki.make_root("legacy sha1 root", key=pki.rsa_key(2048, 2), hash_name="sha1")
    chain = pki.good_chain(root=legacy_root)
    validator = UpstreamValidator(pki.write_pem(tmp_path / "roots.pem", legacy_root.cert))
    assert serve(validator, chain.served(), chain.leaf.key).outcome == ("accepted", None)


def test_a_trust_anchor_without_key_usage_is_accepted(tmp_path: Path) -> None:
    old_root = pki.issue(None, common_name="old root without keyUsage", ca=True, key_usage=None)
    chain = pki.good_chain(root=old_root)
    validator = UpstreamValidator(pki.write_pem(tmp_path / "roots.pem", old_root.cert))
    assert serve(validator, chain.served(), chain.leaf.key).outcome == ("accepted", None)


def test_a_trust_anchor_with_non_critical_basic_constraints_is_accepted(tmp_path: Path) -> None:
    old_root = pki.issue(
        None, common_name="old root", ca=True, ca_critical=False, key_usage=pki.CA_KEY_USAGE
    )
    chain = pki.good_chain(root=old_root)
    validator = UpstreamValidator(pki.write_pem(tmp_path / "roots.pem", old_root.cert))
    assert serve(validator, chain.served(), chain.leaf.key).outcome == ("accepted", None)


def test_a_critical_san_or_eku_beside_a_subject_is_accepted_as_browsers_do(
    validator: UpstreamValidator, inter: Issued
) -> None:
    # RFC 5280 allows both; the CA/B profile does not, but private CAs (trustme, too)
    # issue such leaves and browsers accept them.
    leaf = pki.issue(
        inter,
        common_name=HOST,
        ca=False,
        key_usage=pki.LEAF_KEY_USAGE,
        eku=(pki.SERVER_AUTH,),
        eku_critical=True,
        dns_names=(HOST,),
        san_critical=True,
    )
    assert serve_leaf(validator, leaf).outcome == ("accepted", None)


def test_an_empty_subject_with_a_critical_san_is_accepted(
    validator: UpstreamValidator, inter: Issued
) -> None:
    leaf = pki.issue(
        inter,
        common_name=None,
        subject=x509.Name([]),
        ca=False,
        key_usage=pki.LEAF_KEY_USAGE,
        eku=(pki.SERVER_AUTH,),
        dns_names=(HOST,),
        san_critical=True,
    )
    assert serve_leaf(validator, leaf).outcome == ("accepted", None)


def test_rsa_2048_keys_are_strong_enough(validator: UpstreamValidator, rsa_inter: Issued) -> None:
    leaf = pki.make_leaf(rsa_inter, key=pki.rsa_key(2048, slot=3))
    assert serve_leaf(validator, leaf).outcome == ("accepted", None)


# --- the verdict cache ---------------------------------------------------------------------


def test_the_verdict_cache_hits_on_the_second_connection(
    validator: UpstreamValidator, good_leaf: Issued
) -> None:
    with TLSServer(served(good_leaf), good_leaf.key) as server:
        first = attempt(validator, server)
        second = attempt(validator, server)
    assert (first.stage, second.stage) == ("accepted", "accepted")
    assert (validator.cache_misses, validator.cache_hits) == (1, 1)
    assert second.info is not None and first.info is not None
    assert second.info.fingerprint_sha256 == first.info.fingerprint_sha256


def test_the_verdict_cache_is_keyed_by_host(validator: UpstreamValidator, inter: Issued) -> None:
    leaf = pki.make_leaf(inter, ("a.example.com", "b.example.com"))
    with TLSServer((leaf.cert, inter.cert), leaf.key) as server:
        assert attempt(validator, server, "a.example.com").stage == "accepted"
        assert attempt(validator, server, "b.example.com").stage == "accepted"
    assert (validator.cache_misses, validator.cache_hits) == (2, 0)


def test_the_verdict_cache_forgets_the_least_recently_used_chain(
    bundle: Path, inter: Issued
) -> None:
    validator = UpstreamValidator(bundle, cache_size=1)
    leaf = pki.make_leaf(inter, ("a.example.com", "b.example.com"))
    with TLSServer((leaf.cert, inter.cert), leaf.key) as server:
        for host in ("a.example.com", "b.example.com", "a.example.com"):
            assert attempt(validator, server, host).stage == "accepted"
    assert (validator.cache_misses, validator.cache_hits) == (3, 0)


def test_a_cached_verdict_expires_after_the_ttl(bundle: Path, good_leaf: Issued) -> None:
    now = [time.time()]
    validator = UpstreamValidator(bundle, clock=lambda: now[0])
    with TLSServer(served(good_leaf), good_leaf.key) as server:
        assert attempt(validator, server).stage == "accepted"
        now[0] += VERDICT_TTL + 1
        assert attempt(validator, server).stage == "accepted"
    assert (validator.cache_misses, validator.cache_hits) == (2, 0)


def test_a_cached_verdict_is_not_used_past_the_earliest_not_after(
    bundle: Path, inter: Issued
) -> None:
    start = time.time()
    now = [start]
    validator = UpstreamValidator(bundle, clock=lambda: now[0])
    leaf = pki.make_leaf(
        inter, not_after=datetime.datetime.fromtimestamp(start + 120, datetime.UTC)
    )
    with TLSServer((leaf.cert, inter.cert), leaf.key) as server:
        assert attempt(validator, server).stage == "accepted"
        now[0] = start + 180  # past notAfter, well within the TTL
        # OpenSSL (real clock) still accepts; the stale verdict must not: the independent
        # verifier runs again at the (later) validation time and refuses.
        late = attempt(validator, server)
    assert late.outcome == ("established", "expired")
    assert (validator.cache_misses, validator.cache_hits) == (2, 0)


# --- refused: validity period --------------------------------------------------------------


def test_an_expired_leaf_is_refused(validator: UpstreamValidator, inter: Issued) -> None:
    leaf = pki.make_leaf(inter, not_before=pki.now() - days(10), not_after=pki.now() - days(1))
    result = serve_leaf(validator, leaf)
    assert result.outcome == ("handshake", "expired")
    assert result.reason.startswith("certificate has expired (depth 0, CN=www.example.com")
    assert "notAfter" in result.reason


def test_an_expired_intermediate_is_refused(validator: UpstreamValidator, root: Issued) -> None:
    old = pki.make_intermediate(
        root, "expired intermediate", not_before=pki.now() - days(10), not_after=pki.now() - days(1)
    )
    result = serve_leaf(validator, pki.make_leaf(old))
    assert result.outcome == ("handshake", "expired")
    assert "(depth 1, CN=expired intermediate" in result.reason


def test_a_not_yet_valid_leaf_is_refused(validator: UpstreamValidator, inter: Issued) -> None:
    leaf = pki.make_leaf(inter, not_before=pki.now() + days(1), not_after=pki.now() + days(30))
    result = serve_leaf(validator, leaf)
    assert result.outcome == ("handshake", "not-yet-valid")
    assert "depth 0" in result.reason


def test_a_not_yet_valid_intermediate_is_refused(
    validator: UpstreamValidator, root: Issued
) -> None:
    future = pki.make_intermediate(
        root, "future intermediate", not_before=pki.now() + days(1), not_after=pki.now() + days(9)
    )
    result = serve_leaf(validator, pki.make_leaf(future))
    assert result.outcome == ("handshake", "not-yet-valid")


# --- refused: host name (RFC 6125) ---------------------------------------------------------


def test_a_certificate_for_another_host_is_refused(
    validator: UpstreamValidator, good_leaf: Issued
) -> None:
    result = serve_leaf(validator, good_leaf, host="www.example.org")
    assert result.outcome == ("handshake", "hostname-mismatch")
    assert "wanted www.example.org" in result.reason
    assert "DNS:www.example.com" in result.reason


def test_a_matching_cn_does_not_help_when_the_san_does_not_match(
    validator: UpstreamValidator, inter: Issued
) -> None:
    leaf = pki.make_leaf(inter, ("other.example.com",), common_name=HOST)
    assert serve_leaf(validator, leaf).outcome == ("handshake", "hostname-mismatch")


def test_a_certificate_without_san_is_refused_even_if_the_cn_matches(
    validator: UpstreamValidator, inter: Issued
) -> None:
    leaf = pki.make_leaf(inter, (), common_name=HOST)
    result = serve_leaf(validator, leaf)
    assert result.outcome == ("handshake", "hostname-mismatch")
    assert "no subjectAltName" in result.reason


@pytest.mark.parametrize(
    ("pattern", "host"),
    [
        ("*.example.com", "a.b.example.com"),
        ("*.example.com", "example.com"),
        ("f*.example.com", "foo.example.com"),
        ("*oo.example.com", "foo.example.com"),
        ("www.*.com", "www.example.com"),
    ],
)
def test_a_wildcard_outside_the_whole_left_most_label_never_matches(
    validator: UpstreamValidator, inter: Issued, pattern: str, host: str
) -> None:
    leaf = pki.make_leaf(inter, (pattern,))
    assert serve_leaf(validator, leaf, host=host).outcome == ("handshake", "hostname-mismatch")


def test_an_ip_is_not_matched_by_a_dns_name_san(
    validator: UpstreamValidator, inter: Issued
) -> None:
    leaf = pki.make_leaf(inter, ("127.0.0.1",))
    result = serve_leaf(validator, leaf, host="127.0.0.1", server_name=None)
    assert result.outcome == ("handshake", "hostname-mismatch")


def test_an_ip_san_for_another_address_is_refused(
    validator: UpstreamValidator, inter: Issued
) -> None:
    leaf = pki.make_leaf(inter, (), common_name=None, ip_addresses=("10.0.0.1",))
    result = serve_leaf(validator, leaf, host="10.0.0.2", server_name=None)
    assert result.outcome == ("handshake", "hostname-mismatch")
    assert "IP:10.0.0.1" in result.reason


@pytest.mark.parametrize("host", ["foo_bar.example.com", "exa mple.com", "", "-a.example.com"])
def test_a_host_no_certificate_can_match_is_refused_before_connecting(
    validator: UpstreamValidator, host: str
) -> None:
    with pytest.raises(UpstreamRefused) as refused:
        validator.new_connection(None, server_name=None, verify_host=host)
    assert refused.value.category == "hostname-mismatch"


# --- refused: trust ------------------------------------------------------------------------


def test_a_self_signed_leaf_is_refused(validator: UpstreamValidator) -> None:
    leaf = pki.issue(
        None,
        common_name=HOST,
        ca=False,
        key_usage=pki.LEAF_KEY_USAGE,
        eku=(pki.SERVER_AUTH,),
        dns_names=(HOST,),
    )
    result = serve(validator, (leaf.cert,), leaf.key)
    assert result.outcome == ("handshake", "self-signed")


def test_a_chain_to_an_unknown_root_is_refused(validator: UpstreamValidator) -> None:
    stranger = pki.good_chain()
    result = serve(validator, stranger.served(), stranger.leaf.key)
    assert result.outcome == ("handshake", "untrusted-root")
    assert "depth 1" in result.reason


def test_a_chain_that_includes_its_unknown_root_is_refused(validator: UpstreamValidator) -> None:
    stranger = pki.good_chain()
    chain = (*stranger.served(), stranger.root.cert)
    assert serve(validator, chain, stranger.leaf.key).outcome == ("handshake", "untrusted-root")


def test_a_server_that_omits_the_intermediate_is_refused(
    validator: UpstreamValidator, good_leaf: Issued
) -> None:
    result = serve(validator, (good_leaf.cert,), good_leaf.key)
    assert result.outcome == ("handshake", "incomplete-chain")
    assert "depth 0" in result.reason
    assert pki.CA_ISSUERS_URL in result.reason


def test_a_leaf_from_an_unknown_ca_that_names_no_issuer_url_is_an_untrusted_root(
    validator: UpstreamValidator,
) -> None:
    private_root = pki.make_root("some private root")
    leaf = pki.make_leaf(private_root, ca_issuers_url=None)
    result = serve(validator, (leaf.cert,), leaf.key)
    assert result.outcome == ("handshake", "untrusted-root")
    assert "some private root" in result.reason


def test_a_leaf_signed_with_another_key_is_refused(
    validator: UpstreamValidator, inter: Issued
) -> None:
    forged = pki.make_leaf(inter, sign_with=pki.ec_key())
    assert serve_leaf(validator, forged).outcome == ("handshake", "bad-signature")


def test_an_intermediate_signed_with_another_key_is_refused(
    validator: UpstreamValidator, root: Issued
) -> None:
    forged = pki.make_intermediate(root, "forged intermediate", sign_with=pki.ec_key())
    result = serve_leaf(validator, pki.make_leaf(forged))
    assert result.outcome == ("handshake", "bad-signature")


@pytest.mark.parametrize(
    "defect",
    [
        {"ca": False},
        {"ca": None},
        {"key_usage": pki.NO_CERT_SIGN_KEY_USAGE},
    ],
    ids=["ca-false", "no-basic-constraints", "no-keycertsign"],
)
def test_an_issuer_that_is_not_a_ca_is_refused(
    validator: UpstreamValidator, root: Issued, defect: dict[str, Any]
) -> None:
    not_ca = pki.make_intermediate(root, "not a CA", **defect)
    result = serve_leaf(validator, pki.make_leaf(not_ca))
    assert result.outcome == ("handshake", "issuer-not-ca")


def test_an_intermediate_without_key_usage_is_refused(
    validator: UpstreamValidator, root: Issued
) -> None:
    # OpenSSL treats a missing keyUsage as "any usage"; the WebPKI profile does not.
    bare = pki.make_intermediate(root, "intermediate without keyUsage", key_usage=None)
    result = serve_leaf(validator, pki.make_leaf(bare))
    assert result.outcome == ("established", "issuer-not-ca")
    assert "no keyUsage" in result.reason


def test_an_intermediate_with_non_critical_basic_constraints_is_refused(
    validator: UpstreamValidator, root: Issued
) -> None:
    lax = pki.issue(
        root, common_name="lax intermediate", ca=True, ca_critical=False, key_usage=pki.CA_KEY_USAGE
    )
    result = serve_leaf(validator, pki.make_leaf(lax))
    assert result.outcome == ("established", "issuer-not-ca")


def test_a_path_length_violation_is_refused(tmp_path: Path) -> None:
    constrained = pki.make_root("pathlen 0 root", path_length=0)
    chain = pki.good_chain(root=constrained)
    validator = UpstreamValidator(pki.write_pem(tmp_path / "roots.pem", constrained.cert))
    result = serve(validator, chain.served(), chain.leaf.key)
    assert result.outcome == ("handshake", "path-length")


def test_a_chain_deeper_than_eight_cas_is_refused(
    validator: UpstreamValidator, root: Issued
) -> None:
    cas = [root]
    for n in range(9):
        cas.append(pki.make_intermediate(cas[-1], f"intermediate {n}"))
    leaf = pki.make_leaf(cas[-1])
    chain = (leaf.cert, *(ca.cert for ca in reversed(cas[1:])))
    assert serve(validator, chain, leaf.key).outcome == ("handshake", "path-length")


@pytest.mark.parametrize(
    "constraint",
    [{"permitted_dns": ["example.org"]}, {"excluded_dns": ["example.com"]}],
    ids=["not-permitted", "excluded"],
)
def test_a_name_constraints_violation_is_refused(
    validator: UpstreamValidator, root: Issued, constraint: dict[str, Any]
) -> None:
    constrained = pki.make_intermediate(root, "constrained intermediate", **constraint)
    result = serve_leaf(validator, pki.make_leaf(constrained))
    assert result.outcome == ("handshake", "name-constraints")


def test_a_name_inside_the_permitted_subtree_is_accepted(
    validator: UpstreamValidator, root: Issued
) -> None:
    constrained = pki.make_intermediate(root, "constrained", permitted_dns=["example.com"])
    assert serve_leaf(validator, pki.make_leaf(constrained)).outcome == ("accepted", None)


# --- refused: certificate contents ---------------------------------------------------------


def test_a_leaf_whose_eku_lacks_server_auth_is_refused(
    validator: UpstreamValidator, inter: Issued
) -> None:
    leaf = pki.make_leaf(inter, eku=(pki.CLIENT_AUTH,))
    assert serve_leaf(validator, leaf).outcome == ("handshake", "no-server-auth")


def test_a_leaf_without_an_eku_extension_is_refused(
    validator: UpstreamValidator, inter: Issued
) -> None:
    # OpenSSL (and RFC 5280) read an absent EKU as "any purpose"; we require serverAuth.
    leaf = pki.make_leaf(inter, eku=None)
    result = serve_leaf(validator, leaf)
    assert result.outcome == ("established", "no-server-auth")


def test_an_unknown_critical_extension_in_the_leaf_is_refused(
    validator: UpstreamValidator, inter: Issued
) -> None:
    leaf = pki.make_leaf(inter, unknown_critical_extension=True)
    assert serve_leaf(validator, leaf).outcome == ("handshake", "critical-extension")


def test_an_unknown_critical_extension_in_the_intermediate_is_refused(
    validator: UpstreamValidator, root: Issued
) -> None:
    odd = pki.issue(
        root,
        common_name="odd intermediate",
        ca=True,
        key_usage=pki.CA_KEY_USAGE,
        unknown_critical_extension=True,
    )
    result = serve_leaf(validator, pki.make_leaf(odd))
    assert result.outcome == ("handshake", "critical-extension")


def test_a_leaf_that_claims_to_be_a_ca_is_refused_by_the_independent_verifier(
    validator: UpstreamValidator, inter: Issued
) -> None:
    # OpenSSL accepts a CA:TRUE server certificate; the WebPKI profile does not.
    leaf = pki.make_leaf(inter, ca=True)
    result = serve_leaf(validator, leaf)
    assert result.outcome == ("established", "verify-failed")
    assert "independent verifier" in result.reason


def test_an_empty_subject_with_a_non_critical_san_is_refused(
    validator: UpstreamValidator, inter: Issued
) -> None:
    leaf = pki.issue(
        inter,
        common_name=None,
        subject=x509.Name([]),
        ca=False,
        key_usage=pki.LEAF_KEY_USAGE,
        eku=(pki.SERVER_AUTH,),
        dns_names=(HOST,),
    )
    result = serve_leaf(validator, leaf)
    assert result.outcome == ("established", "verify-failed")
    assert "empty subject" in result.reason


def test_an_rsa_1024_leaf_is_refused(validator: UpstreamValidator, rsa_inter: Issued) -> None:
    leaf = pki.make_leaf(rsa_inter, key=pki.rsa_key(1024))
    result = serve_leaf(validator, leaf)
    assert result.outcome == ("handshake", "weak-key")
    assert "depth 0" in result.reason


def test_an_rsa_1024_intermediate_is_refused(validator: UpstreamValidator, root: Issued) -> None:
    weak = pki.make_intermediate(root, "weak intermediate", key=pki.rsa_key(1024))
    result = serve_leaf(validator, pki.make_leaf(weak))
    assert result.outcome == ("handshake", "weak-key")
    assert "depth 1" in result.reason


def test_a_sha1_signed_leaf_is_refused(validator: UpstreamValidator, rsa_inter: Issued) -> None:
    leaf = pki.make_leaf(rsa_inter, hash_name="sha1")
    assert serve_leaf(validator, leaf).outcome == ("handshake", "weak-signature")


@pytest.mark.parametrize("hash_name", ["sha1", "md5"])
def test_a_weakly_signed_intermediate_is_refused(
    validator: UpstreamValidator, rsa_root: Issued, hash_name: str
) -> None:
    weak = pki.make_intermediate(
        rsa_root, f"{hash_name} intermediate", key=pki.rsa_key(2048, 1), hash_name=hash_name
    )
    result = serve_leaf(validator, pki.make_leaf(weak))
    assert result.outcome == ("handshake", "weak-signature")
    assert "depth 1" in result.reason


# --- refused: protocol and ciphers ---------------------------------------------------------


@pytest.mark.parametrize("version", [SSL.TLS1_VERSION, SSL.TLS1_1_VERSION], ids=["1.0", "1.1"])
def test_a_server_that_only_speaks_old_tls_is_refused(
    validator: UpstreamValidator, good_leaf: Issued, version: int
) -> None:
    result = serve_leaf(validator, good_leaf, min_version=version, max_version=version)
    assert result.outcome == ("handshake", "protocol-version")


def test_a_dhe_only_server_with_a_1024_bit_group_cannot_connect(
    validator: UpstreamValidator, rsa_inter: Issued, tmp_path: Path
) -> None:
    leaf = pki.make_leaf(rsa_inter, key=pki.rsa_key(2048, slot=3))
    result = serve_leaf(
        validator,
        leaf,
        max_version=TLS12,
        cipher_list=b"DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-SHA",
        dh_params=write_dh_params(tmp_path / "dh1024.pem"),
    )
    assert result.outcome == ("handshake", "handshake-failed")
    assert "handshake failure" in result.reason


@pytest.mark.parametrize(
    "ciphers",
    [
        b"NULL-SHA256:NULL-SHA",
        b"ADH-AES128-GCM-SHA256:AECDH-AES128-SHA",
        b"AES128-GCM-SHA256:AES256-SHA",
        b"ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA384",
    ],
    ids=["null", "anonymous", "rsa-key-exchange", "cbc"],
)
def test_a_server_offering_only_ciphers_we_never_offer_cannot_connect(
    validator: UpstreamValidator, rsa_inter: Issued, ciphers: bytes
) -> None:
    leaf = pki.make_leaf(rsa_inter, key=pki.rsa_key(2048, slot=3))
    result = serve_leaf(validator, leaf, max_version=TLS12, cipher_list=ciphers)
    assert result.outcome == ("handshake", "handshake-failed")


def test_we_offer_only_ecdhe_aead_suites_for_tls12_and_tls13_suites(
    validator: UpstreamValidator,
) -> None:
    offered = validator.new_connection(None, server_name=HOST, verify_host=HOST).get_cipher_list()
    tls12 = [c for c in offered if not c.startswith("TLS_")]
    assert tls12
    for cipher in tls12:
        assert ECDHE_AEAD.fullmatch(cipher), cipher


def test_connections_use_the_hardened_context_settings(validator: UpstreamValidator) -> None:
    conn = validator.new_connection(None, server_name=HOST, verify_host=HOST)
    options = conn.set_options(0)
    assert options & SSL.OP_NO_COMPRESSION
    assert options & SSL.OP_NO_RENEGOTIATION
    assert conn.get_verify_mode() & SSL.VERIFY_PEER
    assert _lib.SSL_set_mode(conn._ssl, 0) & SSL.MODE_RELEASE_BUFFERS
    assert validator.context.get_session_cache_mode() == (
        SSL.SESS_CACHE_CLIENT | SSL.SESS_CACHE_NO_INTERNAL_STORE
    )


# --- refused: OCSP and must-staple ---------------------------------------------------------


@BOTH_VERSIONS
def test_a_staple_that_says_revoked_is_refused(
    validator: UpstreamValidator, inter: Issued, good_leaf: Issued, max_version: int
) -> None:
    staple = pki.ocsp_response(good_leaf.cert, inter, status="revoked")
    result = serve_leaf(validator, good_leaf, ocsp_staple=staple, max_version=max_version)
    assert result.outcome == ("handshake", "revoked")
    assert "revoked" in result.reason


@pytest.mark.parametrize(
    "make_staple",
    [
        lambda leaf, inter: pki.ocsp_response(leaf, pki.make_intermediate(pki.make_root())),
        lambda leaf, inter: pki.ocsp_response(leaf, inter, status="unknown"),
        lambda leaf, inter: pki.ocsp_response(
            leaf, inter, this_update=pki.now() - days(3), next_update=pki.now() - days(1)
        ),
        lambda leaf, inter: pki.ocsp_unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER),
        lambda leaf, inter: b"\x30\x03\x0a\x01\x00",
    ],
    ids=["wrong-issuer", "unknown", "expired", "try-later", "no-body"],
)
def test_an_invalid_staple_is_refused(
    validator: UpstreamValidator,
    inter: Issued,
    good_leaf: Issued,
    make_staple: Callable[[x509.Certificate, Issued], bytes],
) -> None:
    staple = make_staple(good_leaf.cert, inter)
    result = serve_leaf(validator, good_leaf, ocsp_staple=staple)
    assert result.outcome == ("handshake", "ocsp-invalid")


class StapleCorruptingProxy:
    """Relays one TLS 1.2 connection to ``target`` and flips the first byte of the OCSP
    response inside the server's (plaintext) CertificateStatus message.

    OpenSSL >= 3.6 servers refuse to staple bytes that do not parse, so a broken staple
    has to be made on the wire.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.corrupted = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self._listener.getsockname()
        self._thread = threading.Thread(target=self._relay, daemon=True)

    def __enter__(self) -> StapleCorruptingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()
        self._thread.join(IO_TIMEOUT)
        assert not self._thread.is_alive()

    def _relay(self) -> None:
        self._listener.settimeout(IO_TIMEOUT)
        client, _ = self._listener.accept()
        server = socket.create_connection(self.target, timeout=IO_TIMEOUT)
        pending = bytearray()
        tampering = True
        with client, server, selectors.DefaultSelector() as sel:
            sel.register(client, selectors.EVENT_READ)
            sel.register(server, selectors.EVENT_READ)
            while ready := sel.select(IO_TIMEOUT):
                for key, _ in ready:
                    try:
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    except OSError:
                        return
                    if not data:
                        return
                    if key.fileobj is client:
                        server.sendall(data)
                    elif not tampering:
                        client.sendall(data)
                    else:
                        pending += data
                        out, tampering = self._tamper(pending)
                        client.sendall(out)

    def _tamper(self, pending: bytearray) -> tuple[bytes, bool]:
        """Pass on every complete record, corrupting a CertificateStatus; stop tampering
        (and flush everything) at ChangeCipherSpec, after which records are encrypted."""
        out = bytearray()
        while len(pending) >= 5:
            length = int.from_bytes(pending[3:5], "big")
            if len(pending) < 5 + length:
                break
            record = pending[: 5 + length]
            del pending[: 5 + length]
            if record[0] == 20:  # change_cipher_spec
                out += record + pending
                pending.clear()
                return bytes(out), False
            offset = 5
            while record[0] == 22 and offset + 4 <= len(record):  # handshake messages
                body = int.from_bytes(record[offset + 1 : offset + 4], "big")
                if record[offset] == 22:  # certificate_status: type(1) len(3) OCSP DER
                    record[offset + 8] ^= 0x01
                    self.corrupted = True
                offset += 4 + body
            out += record
        return bytes(out), True


def test_a_tls12_staple_that_does_not_parse_is_refused(
    validator: UpstreamValidator, inter: Issued, good_leaf: Issued
) -> None:
    staple = pki.ocsp_response(good_leaf.cert, inter)
    with (
        TLSServer(served(good_leaf), good_leaf.key, ocsp_staple=staple, max_version=TLS12) as srv,
        StapleCorruptingProxy(srv.address) as proxy,
    ):
        result = attempt(validator, proxy)
    assert proxy.corrupted
    assert result.outcome == ("handshake", "ocsp-invalid")


@BOTH_VERSIONS
def test_a_must_staple_leaf_without_a_staple_is_refused(
    validator: UpstreamValidator, inter: Issued, max_version: int
) -> None:
    leaf = pki.make_leaf(inter, must_staple=True)
    result = serve_leaf(validator, leaf, max_version=max_version)
    assert result.outcome == ("established", "must-staple")


# --- refused: client certificates ----------------------------------------------------------


@BOTH_VERSIONS
@pytest.mark.parametrize("required", [True, False], ids=["required", "optional"])
def test_a_server_that_requests_a_client_certificate_is_refused_during_the_handshake(
    validator: UpstreamValidator, good_leaf: Issued, max_version: int, required: bool
) -> None:
    # Refused as soon as the CertificateRequest is processed, even when the server would
    # accept no certificate, and in TLS 1.3 before our Finished is sent.
    result = serve_leaf(
        validator,
        good_leaf,
        request_client_cert=True,
        require_client_cert=required,
        max_version=max_version,
    )
    assert result.outcome == ("handshake", "client-certificate-required")


# --- refusal() edge cases ------------------------------------------------------------------


def test_a_server_that_hangs_up_during_the_handshake_is_refused(
    validator: UpstreamValidator,
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=IO_TIMEOUT)
        peer, _ = listener.accept()
        peer.close()
        with client:
            conn = validator.new_connection(client, server_name=HOST, verify_host=HOST)
            with pytest.raises(SSL.Error) as failure:
                conn.do_handshake()
    refused = validator.refusal(conn, failure.value)
    assert refused.category == "handshake-failed"


def test_refusal_rejects_retryable_errors(validator: UpstreamValidator) -> None:
    conn = validator.new_connection(None, server_name=HOST, verify_host=HOST)
    with pytest.raises(TypeError):
        validator.refusal(conn, SSL.WantReadError())


def test_check_established_refuses_a_connection_that_did_not_handshake(
    validator: UpstreamValidator,
) -> None:
    conn = validator.new_connection(None, server_name=HOST, verify_host=HOST)
    with pytest.raises(UpstreamRefused) as refused:
        validator.check_established(conn)
    assert refused.value.category == "handshake-failed"


# --- the explicit checks, unit by unit -----------------------------------------------------


def _chain(leaf: Issued) -> list[x509.Certificate]:
    certs = [leaf.cert]
    issuer = leaf.issuer
    while issuer is not None:
        certs.append(issuer.cert)
        issuer = issuer.issuer
    return certs


def test_chain_policy_accepts_a_good_chain(good_leaf: Issued) -> None:
    assert chain_policy_problem(_chain(good_leaf)) is None


@pytest.mark.parametrize("eku", [None, (pki.CLIENT_AUTH,)], ids=["absent", "client-only"])
def test_chain_policy_requires_server_auth_in_the_leaf_eku(
    inter: Issued, eku: Sequence[x509.ObjectIdentifier] | None
) -> None:
    problem = chain_policy_problem(_chain(pki.make_leaf(inter, eku=eku)))
    assert problem is not None and problem[0] == "no-server-auth"


def test_chain_policy_refuses_small_rsa_keys_anywhere(rsa_inter: Issued, root: Issued) -> None:
    leaf_problem = chain_policy_problem(_chain(pki.make_leaf(rsa_inter, key=pki.rsa_key(1024))))
    weak_ca = pki.make_intermediate(root, "weak", key=pki.rsa_key(1024))
    ca_problem = chain_policy_problem(_chain(pki.make_leaf(weak_ca)))
    assert leaf_problem is not None and leaf_problem[0] == "weak-key"
    assert ca_problem is not None and ca_problem[0] == "weak-key"
    assert "depth 1" in ca_problem[1]


def test_chain_policy_refuses_small_ec_keys(inter: Issued) -> None:
    leaf = pki.make_leaf(inter, key=ec.generate_private_key(ec.SECP224R1()))
    problem = chain_policy_problem(_chain(leaf))
    assert problem is not None and problem[0] == "weak-key"


@pytest.mark.parametrize("hash_name", ["sha1", "md5"])
def test_chain_policy_refuses_weak_signatures_below_the_anchor(
    rsa_root: Issued, hash_name: str
) -> None:
    weak = pki.make_intermediate(rsa_root, "weak", key=pki.rsa_key(2048, 1), hash_name=hash_name)
    problem = chain_policy_problem(_chain(pki.make_leaf(weak)))
    assert problem is not None and problem[0] == "weak-signature"
    assert hash_name.upper() in problem[1]


def test_chain_policy_ignores_the_anchors_own_signature() -> None:
    legacy_root = pki.make_root("legacy", key=pki.rsa_key(2048, 2), hash_name="sha1")
    assert chain_policy_problem(_chain(pki.good_chain(root=legacy_root).leaf)) is None


def test_the_independent_verifier_matches_the_host_itself(
    validator: UpstreamValidator, good_leaf: Issued
) -> None:
    chain = _chain(good_leaf)
    validator.verify_independently(chain, HOST)
    with pytest.raises(UpstreamRefused) as refused:
        validator.verify_independently(chain, "www.example.org")
    assert refused.value.category == "hostname-mismatch"


@pytest.mark.parametrize("eku", [None, (pki.CLIENT_AUTH,)], ids=["absent", "client-only"])
def test_the_independent_verifier_requires_server_auth_too(
    validator: UpstreamValidator, inter: Issued, eku: Sequence[x509.ObjectIdentifier] | None
) -> None:
    with pytest.raises(UpstreamRefused) as refused:
        validator.verify_independently(_chain(pki.make_leaf(inter, eku=eku)), HOST)
    assert refused.value.category == "no-server-auth"


def test_the_independent_verifier_refuses_a_chain_to_an_unknown_root(
    validator: UpstreamValidator,
) -> None:
    stranger = pki.good_chain()
    with pytest.raises(UpstreamRefused) as refused:
        validator.verify_independently(_chain(stranger.leaf), HOST)
    assert refused.value.category == "verify-failed"


def test_negotiated_problem_requires_tls12_or_tls13_and_an_offered_cipher() -> None:
    offered = frozenset({"TLS_AES_128_GCM_SHA256", "ECDHE-RSA-AES128-GCM-SHA256"})
    assert negotiated_problem("TLSv1.3", "TLS_AES_128_GCM_SHA256", offered) is None
    assert negotiated_problem("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256", offered) is None
    old = negotiated_problem("TLSv1.1", "ECDHE-RSA-AES128-GCM-SHA256", offered)
    assert old is not None and old[0] == "protocol-version"
    weak = negotiated_problem("TLSv1.2", "DES-CBC3-SHA", offered)
    assert weak is not None and weak[0] == "weak-cipher"
    unfinished = negotiated_problem("TLSv1.3", None, offered)
    assert unfinished is not None and unfinished[0] == "handshake-failed"


# --- OCSP staple checks, unit by unit ------------------------------------------------------


def _staple_verdict(der: bytes, leaf: Issued, issuer: Issued) -> str:
    return ocsp_checks.check_staple(der, leaf.cert, issuer.cert, pki.now()).status


def test_a_good_response_from_the_issuer_is_good(inter: Issued, good_leaf: Issued) -> None:
    assert _staple_verdict(pki.ocsp_response(good_leaf.cert, inter), good_leaf, inter) == "good"


def test_the_cert_id_may_use_sha256(inter: Issued, good_leaf: Issued) -> None:
    der = pki.ocsp_response(good_leaf.cert, inter, cert_id_hash=hashes.SHA256())
    assert _staple_verdict(der, good_leaf, inter) == "good"


def test_a_revoked_response_is_revoked(inter: Issued, good_leaf: Issued) -> None:
    der = pki.ocsp_response(good_leaf.cert, inter, status="revoked")
    assert _staple_verdict(der, good_leaf, inter) == "revoked"


@pytest.mark.parametrize(
    "make",
    [
        lambda leaf, inter: pki.ocsp_response(leaf.cert, inter, status="unknown"),
        lambda leaf, inter: pki.ocsp_response(leaf.cert, pki.make_intermediate(pki.make_root())),
        lambda leaf, inter: pki.ocsp_response(
            leaf.cert, inter, cert_id_issuer=pki.make_intermediate(pki.make_root()).cert
        ),
        lambda leaf, inter: pki.ocsp_response(pki.make_leaf(inter).cert, inter),
        lambda leaf, inter: pki.ocsp_response(
            leaf.cert, inter, signer=pki.ocsp_responder(inter, eku=False)
        ),
        lambda leaf, inter: pki.ocsp_response(
            leaf.cert, inter, signer=pki.ocsp_responder(pki.make_intermediate(pki.make_root()))
        ),
        lambda leaf, inter: pki.ocsp_response(
            leaf.cert, inter, signer=pki.ocsp_responder(inter), include_signer=False
        ),
        lambda leaf, inter: pki.ocsp_response(leaf.cert, inter, this_update=pki.now() + days(1)),
        lambda leaf, inter: pki.ocsp_response(
            leaf.cert, inter, this_update=pki.now() - days(2), next_update=pki.now() - days(1)
        ),
        lambda leaf, inter: pki.ocsp_response(
            leaf.cert, inter, this_update=pki.now() - days(2), next_update=None
        ),
        lambda leaf, inter: pki.ocsp_response(leaf.cert, inter, next_update=pki.now() + days(30)),
        lambda leaf, inter: pki.ocsp_unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER),
        lambda leaf, inter: b"not DER at all",
        lambda leaf, inter: _tamper(pki.ocsp_response(leaf.cert, inter)),
    ],
    ids=[
        "status-unknown",
        "signed-by-another-ca",
        "cert-id-for-another-issuer",
        "about-another-certificate",
        "responder-without-ocsp-signing-eku",
        "responder-issued-by-another-ca",
        "responder-certificate-missing",
        "this-update-in-the-future",
        "next-update-passed",
        "no-next-update-and-old",
        "validity-beyond-ten-days",
        "try-later",
        "garbage",
        "tampered-signature",
    ],
)
def test_an_invalid_response_is_invalid(
    inter: Issued, good_leaf: Issued, make: Callable[[Issued, Issued], bytes]
) -> None:
    assert _staple_verdict(make(good_leaf, inter), good_leaf, inter) == "invalid"


def _tamper(der: bytes) -> bytes:
    """Flip the last byte (inside the signature) of a DER response."""
    return der[:-1] + bytes([der[-1] ^ 0x01])


def test_a_response_signed_with_sha1_is_invalid(rsa_inter: Issued) -> None:
    leaf = pki.make_leaf(rsa_inter)
    der = pki.ocsp_response(leaf.cert, rsa_inter, hash_name="sha1")
    verdict = ocsp_checks.check_staple(der, leaf.cert, rsa_inter.cert, pki.now())
    assert verdict.status == "invalid"
    assert "SHA1" in verdict.reason
    sha256 = pki.ocsp_response(leaf.cert, rsa_inter)
    assert ocsp_checks.check_staple(sha256, leaf.cert, rsa_inter.cert, pki.now()).status == "good"


def test_small_clock_skew_is_tolerated(inter: Issued, good_leaf: Issued) -> None:
    skewed = pki.now() + datetime.timedelta(minutes=2)
    der = pki.ocsp_response(good_leaf.cert, inter, this_update=skewed)
    assert _staple_verdict(der, good_leaf, inter) == "good"


def test_a_fresh_response_without_next_update_is_good(inter: Issued, good_leaf: Issued) -> None:
    der = pki.ocsp_response(good_leaf.cert, inter, next_update=None)
    assert _staple_verdict(der, good_leaf, inter) == "good"


def test_an_expired_delegated_responder_is_invalid(inter: Issued, good_leaf: Issued) -> None:
    old = pki.issue(
        inter,
        common_name="old responder",
        ca=False,
        key_usage=pki.LEAF_KEY_USAGE,
        eku=(pki.OCSP_SIGNING,),
        not_before=pki.now() - days(10),
        not_after=pki.now() - days(1),
    )
    der = pki.ocsp_response(good_leaf.cert, inter, signer=old)
    assert _staple_verdict(der, good_leaf, inter) == "invalid"


def test_must_staple_is_read_from_the_tls_feature_extension(inter: Issued) -> None:
    assert ocsp_checks.requires_staple(pki.make_leaf(inter, must_staple=True).cert)
    assert not ocsp_checks.requires_staple(pki.make_leaf(inter).cert)


# --- trust store and startup -------------------------------------------------------------


@pytest.mark.skipif(not DEFAULT_CA_BUNDLE.exists(), reason="no system CA bundle")
def test_the_system_bundle_is_the_default_trust_store() -> None:
    validator = UpstreamValidator()
    assert validator.trust_anchor_count > 10


def test_a_missing_bundle_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the CA bundle"):
        UpstreamValidator(tmp_path / "absent.pem")


def test_a_bundle_without_certificates_is_a_configuration_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("nothing here\n")
    with pytest.raises(ConfigError, match="no usable PEM certificate"):
        UpstreamValidator(empty)


def test_unparsable_bundle_entries_are_skipped_and_counted(tmp_path: Path, root: Issued) -> None:
    mixed = tmp_path / "mixed.pem"
    broken = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    mixed.write_bytes(root.cert_pem + broken)
    anchors, skipped = load_trust_anchors(mixed)
    assert (anchors, skipped) == ([root.cert], 1)


def test_the_startup_self_check_names_missing_pyopenssl_internals(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream, "_REQUIRED_LIB_NAMES", ("SSL_no_such_function",))
    with pytest.raises(OperatorError, match="SSL_no_such_function"):
        upstream.check_private_api()


def test_the_startup_self_check_notices_renumbered_verify_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(upstream._VERIFY_ERRORS, 10, ("expired", "certificate is fine"))
    with pytest.raises(OperatorError, match="renumbered"):
        upstream.check_private_api()


# --- key shares: what the server chose last time ---------------------------------------------

X25519MLKEM768, X25519, SECP384R1 = 0x11EC, 0x001D, 0x0018


def accepted(validator: UpstreamValidator, server: TLSServer, n: int = 1) -> list[str | None]:
    """Connect ``n`` times, each accepted; the key-exchange group of each, as reported."""
    results = [attempt(validator, server) for _ in range(n)]
    assert [r.stage for r in results] == ["accepted"] * n, results
    return [r.info.group if r.info else None for r in results]


def test_a_first_handshake_sends_openssls_two_default_key_shares(
    validator: UpstreamValidator, good_leaf: Issued
) -> None:
    with TLSServer(served(good_leaf), good_leaf.key) as server:
        assert accepted(validator, server, 2) == ["X25519MLKEM768"] * 2
    shares = [hello.key_share_groups for hello in server.client_hellos]
    # the server took the hybrid share, which the default already sends: nothing to learn
    assert shares == [(X25519MLKEM768, X25519)] * 2
    assert len(validator.key_shares) == 0


def test_a_server_that_chose_x25519_gets_only_that_share_and_the_same_groups_next_time(
    validator: UpstreamValidator, good_leaf: Issued
) -> None:
    with TLSServer(served(good_leaf), good_leaf.key, groups=b"X25519:secp256r1") as server:
        assert accepted(validator, server, 3) == ["X25519"] * 3
    first, *later = server.client_hellos
    assert first.key_share_groups == (X25519MLKEM768, X25519)
    assert [hello.key_share_groups for hello in later] == [(X25519,)] * 2
    # never a group added or dropped: the offer is the default one, in its order
    assert all(hello.supported_groups == first.supported_groups for hello in later)


def test_a_server_that_needed_a_retry_gets_its_group_first_time_next_time(
    validator: UpstreamValidator, good_leaf: Issued
) -> None:
    with TLSServer(served(good_leaf), good_leaf.key, groups=b"secp384r1") as server:
        assert accepted(validator, server, 2) == ["secp384r1"] * 2
    # the first ClientHello's shares did not suit (HelloRetryRequest); the next one's do
    assert [hello.key_share_groups for hello in server.client_hellos] == [
        (X25519MLKEM768, X25519),
        (SECP384R1,),
    ]


def test_a_server_that_gained_a_preferred_group_asks_for_it_and_is_relearned(
    validator: UpstreamValidator, good_leaf: Issued
) -> None:
    with TLSServer(served(good_leaf), good_leaf.key, groups=b"X25519") as server:
        assert accepted(validator, server) == ["X25519"]
        # upgraded, and (as OpenSSL's default) prefers the hybrid group even at a retry's cost
        server.set_groups(b"X25519MLKEM768 / X25519")
        assert accepted(validator, server, 2) == ["X25519MLKEM768"] * 2
    assert [hello.key_share_groups for hello in server.client_hellos] == [
        (X25519MLKEM768, X25519),
        (X25519,),  # the hint; the server asks for the hybrid group by HelloRetryRequest
        (X25519MLKEM768, X25519),  # relearned: the default offer again
    ]


def test_a_server_that_gained_a_group_without_asking_sees_the_full_offer_within_a_lifetime(
    bundle: Path, good_leaf: Issued
) -> None:
    now = [0.0]
    validator = UpstreamValidator(bundle)
    validator.key_shares = KeyShareHints(validator.context, lifetime=60, clock=lambda: now[0])
    with TLSServer(served(good_leaf), good_leaf.key, groups=b"X25519") as server:
        assert accepted(validator, server) == ["X25519"]
        server.set_groups(b"X25519:X25519MLKEM768")  # takes X25519 when that share is there
        got = []
        for now[0] in (30.0, 59.0, 61.0, 70.0):
            got += accepted(validator, server)
    # using the hint at 30 and 59 did not renew it: at 61 the full offer goes out again
    assert got == ["X25519", "X25519", "X25519MLKEM768", "X25519MLKEM768"]
    assert [hello.key_share_groups for hello in server.client_hellos] == [
        (X25519MLKEM768, X25519),
        (X25519,),
        (X25519,),
        (X25519MLKEM768, X25519),
        (X25519MLKEM768, X25519),
    ]


def test_a_refused_server_teaches_nothing(validator: UpstreamValidator, inter: Issued) -> None:
    leaf = pki.make_leaf(inter, ("other.example.com",))
    with TLSServer((leaf.cert, inter.cert), leaf.key, groups=b"X25519") as server:
        assert attempt(validator, server).category == "hostname-mismatch"
        assert attempt(validator, server).category == "hostname-mismatch"
    assert [hello.key_share_groups for hello in server.client_hellos] == [
        (X25519MLKEM768, X25519)
    ] * 2
    assert len(validator.key_shares) == 0


def test_a_hint_is_for_one_name_address_and_port(
    validator: UpstreamValidator, inter: Issued
) -> None:
    leaf = pki.make_leaf(inter, ("a.example.com", "b.example.com"))
    with TLSServer((leaf.cert, inter.cert), leaf.key, groups=b"X25519") as one:
        assert attempt(validator, one, "a.example.com").stage == "accepted"
        assert attempt(validator, one, "b.example.com").stage == "accepted"
        with TLSServer((leaf.cert, inter.cert), leaf.key, groups=b"X25519") as other:
            assert attempt(validator, other, "a.example.com").stage == "accepted"
    assert [h.key_share_groups for h in one.client_hellos + other.client_hellos] == [
        (X25519MLKEM768, X25519)
    ] * 3


def test_hints_expire(bundle: Path, good_leaf: Issued) -> None:
    now = [0.0]
    validator = UpstreamValidator(bundle)
    validator.key_shares = KeyShareHints(validator.context, lifetime=60, clock=lambda: now[0])
    with TLSServer(served(good_leaf), good_leaf.key, groups=b"X25519") as server:
        assert attempt(validator, server).stage == "accepted"
        now[0] = 59.0
        assert attempt(validator, server).stage == "accepted"
        now[0] = 200.0
        assert attempt(validator, server).stage == "accepted"
    assert [hello.key_share_groups for hello in server.client_hellos] == [
        (X25519MLKEM768, X25519),
        (X25519,),
        (X25519MLKEM768, X25519),
    ]


def test_hints_are_bounded_least_recently_used_first(bundle: Path, inter: Issued) -> None:
    validator = UpstreamValidator(bundle)
    validator.key_shares = KeyShareHints(validator.context, max_entries=2)
    leaf = pki.make_leaf(inter, ("a.example.com", "b.example.com", "c.example.com"))
    with TLSServer((leaf.cert, inter.cert), leaf.key, groups=b"X25519") as server:
        for host in ("a.example.com", "b.example.com", "c.example.com"):
            assert attempt(validator, server, host).stage == "accepted"
        assert len(validator.key_shares) == 2
        assert attempt(validator, server, "a.example.com").stage == "accepted"  # forgotten
        assert attempt(validator, server, "c.example.com").stage == "accepted"  # kept
    assert [h.key_share_groups for h in server.client_hellos[3:]] == [
        (X25519MLKEM768, X25519),
        (X25519,),
    ]


def test_every_default_group_has_a_name_so_hints_are_on() -> None:
    # a future OpenSSL default with a group this table lacks turns hints off (tested next)
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    assert set(default_groups(ctx)) <= set(GROUP_NAMES)
    assert KeyShareHints(ctx).enabled


def test_an_unnamed_default_group_turns_hints_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(GROUP_NAMES, X25519)
    hints = KeyShareHints(SSL.Context(SSL.TLS_CLIENT_METHOD))
    assert not hints.enabled
    assert hints.group_list("X25519") is None
