"""Which key share an upstream ClientHello carries: the group the server chose last time.

OpenSSL 4.0's client sends two key shares by default, X25519MLKEM768 and X25519, and
generating the hybrid one costs ~110 us of CPU per handshake (shared/notes). A server
without ML-KEM picks X25519 and the hybrid share was made for nothing; a server with neither
answers HelloRetryRequest and costs a round trip as well. Browsers avoid both by remembering
what a server chose. Rules:

- A hint is learned only from a handshake :meth:`UpstreamValidator.check_established`
  accepted. The group the server chose is covered by its CertificateVerify over the whole
  transcript (our full offer included), so nobody but the validated server can make us
  learn "this server does not do ML-KEM".
- The offer keeps OpenSSL's default ``supported_groups`` exactly (same groups, same order);
  only which group carries a key share changes. A server that has since gained a group it
  prefers can still ask for it with HelloRetryRequest, and the next accepted handshake
  teaches the new choice. Hints never add a group, never drop one.
- Keyed by what the server is: (verified host, address, port). Bounded (LRU,
  ``max_entries``). A hint is aged out ``lifetime`` seconds after it was learned from a
  default offer, however often it is used meanwhile: at least once per lifetime every server
  sees the full default offer (with the hybrid share) again, so a server that gained a group
  it prefers gets it back even if it would not ask by HelloRetryRequest. A hint equal to
  OpenSSL's own first key share is not stored (the default already does the right thing).
- If the default group list cannot be read back as names (a future OpenSSL with a group
  this table does not know), hints are off: the default offer is sent, nothing breaks.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from tlsgate.workers.clienthello import ClientHelloError, parse_client_hello

DEFAULT_MAX_ENTRIES = 4096
DEFAULT_LIFETIME = 3600.0
#: Both calls this module needs are in cryptography's bindings (SSL_set1_curves_list is the
#: old name of SSL_set1_groups_list); without them hints are off and groups are not reported.
_BOUND: Final = hasattr(_lib, "SSL_set1_curves_list") and hasattr(_lib, "SSL_get0_group_name")

#: OpenSSL's names for the TLS groups it may offer (RFC 8446 registry code points).
GROUP_NAMES: Final[dict[int, str]] = {
    0x0017: "secp256r1", 0x0018: "secp384r1", 0x0019: "secp521r1",
    0x001D: "X25519", 0x001E: "X448",
    0x001F: "brainpoolP256r1tls13", 0x0020: "brainpoolP384r1tls13",
    0x0021: "brainpoolP512r1tls13", 0x0029: "curveSM2",
    0x0100: "ffdhe2048", 0x0101: "ffdhe3072", 0x0102: "ffdhe4096",
    0x0103: "ffdhe6144", 0x0104: "ffdhe8192",
    0x11EB: "SecP256r1MLKEM768", 0x11EC: "X25519MLKEM768",
    0x11ED: "SecP384r1MLKEM1024", 0x11EE: "curveSM2MLKEM768",
}  # fmt: skip


def default_groups(context: SSL.Context) -> tuple[int, ...]:
    """The ``supported_groups`` a connection of ``context`` offers unchanged (read back
    from a ClientHello it writes into a memory BIO; nothing is sent anywhere)."""
    conn = SSL.Connection(context, None)
    conn.set_connect_state()
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    try:
        return parse_client_hello(conn.bio_read(65536)).supported_groups
    except ClientHelloError:
        return ()


class KeyShareHints:
    """Per server, the group to send a key share for (see the module rules)."""

    def __init__(
        self,
        context: SSL.Context,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        lifetime: float = DEFAULT_LIFETIME,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self._lifetime = lifetime
        self._clock = clock
        #: server -> (group whose share to send, when the hint expires)
        self._hints: OrderedDict[tuple[str, str, int], tuple[str, float]] = OrderedDict()
        ids = default_groups(context) if _BOUND else ()
        names = [GROUP_NAMES.get(i) for i in ids]
        #: OpenSSL's default list by name; empty when it cannot be named (hints off)
        self._names: tuple[str, ...] = tuple(n for n in names if n) if all(names) else ()
        #: group -> the default list with a share for that group only
        self._lists = {
            group: ":".join(f"*{n}" if n == group else n for n in self._names).encode()
            for group in self._names
        }

    @property
    def enabled(self) -> bool:
        return bool(self._names) and self.max_entries > 0

    def group_list(self, group: str) -> bytes | None:
        """The default group list with a key share for ``group`` only (``None``: unknown)."""
        return self._lists.get(group)

    def apply(self, conn: SSL.Connection, key: tuple[str, str, int]) -> str | None:
        """Before the handshake: send the remembered group's share; returns it, if any."""
        entry = self._hints.get(key)
        if entry is None:
            return None
        group, expires = entry
        if self._clock() >= expires:
            del self._hints[key]
            return None
        self._hints.move_to_end(key)
        if _lib.SSL_set1_curves_list(_ssl(conn), self._lists[group]) != 1:
            return None  # the default offer goes out: nothing is lost but the saving
        return group

    def learn(self, key: tuple[str, str, int], group: str | None, hinted: str | None) -> None:
        """After :meth:`check_established` accepted a connection to ``key`` that used
        ``group`` (:func:`group_name`), sent with the share of ``hinted`` (``None``: the
        default offer): remember the group."""
        if not self.enabled:
            return
        if group not in self._lists or group == self._names[0]:
            # nothing to remember: no (EC)DHE group, or OpenSSL's first share (the default
            # offer already sends it)
            self._hints.pop(key, None)
            return
        if group == hinted and key in self._hints:
            # The hint held. Its age is not renewed: once per lifetime the server sees the
            # full default offer again, so a group it gained and would not ask for by
            # HelloRetryRequest is found within one lifetime.
            self._hints.move_to_end(key)
            return
        self._hints[key] = (group, self._clock() + self._lifetime)
        self._hints.move_to_end(key)
        while len(self._hints) > self.max_entries:
            self._hints.popitem(last=False)

    def __len__(self) -> int:
        return len(self._hints)


def negotiated_group(conn: SSL.Connection) -> str:
    """OpenSSL's name of the key-exchange group of the finished handshake (``""``: none,
    e.g. TLS 1.2 with a non-EC suite, or bindings without ``SSL_get0_group_name``)."""
    if not _BOUND:
        return ""
    name = _lib.SSL_get0_group_name(_ssl(conn))
    return _ffi.string(name).decode("ascii", "replace") if name != _ffi.NULL else ""


def group_name(conn: SSL.Connection) -> str | None:
    """The negotiated group in the spelling of :data:`GROUP_NAMES` (OpenSSL's own varies
    in case); None when the handshake used none."""
    name = negotiated_group(conn)
    if not name:
        return None
    return _CANONICAL.get(name.lower(), name)


_CANONICAL: Final = {name.lower(): name for name in GROUP_NAMES.values()}


def _ssl(conn: SSL.Connection) -> Any:
    return conn._ssl  # private pyOpenSSL internals, checked by upstream.check_private_api
