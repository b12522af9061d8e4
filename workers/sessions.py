"""Upstream TLS session reuse: a per-worker bounded cache of validated sessions.

Rules (the policy-safety argument, also in docs/performance.md):

- Only a session whose *full* handshake passed every check (chain to a trusted root,
  hostname, OCSP staple and must-staple, version and cipher policy) is ever stored, together
  with the :class:`~tlsgate.workers.upstream.UpstreamInfo` that validation produced.
- The key is everything validation depended on: the name verified, the SNI sent, the
  server's address and port, and the ALPN offer. The cache belongs to one
  ``UpstreamValidator`` (one trust store and policy): new validation settings mean a new
  validator, so a new, empty cache.
- A resumed handshake proves the server holds the secret of that validated session; no
  other server can complete it. Version and cipher are still checked on every handshake.
- Entries live at most ``lifetime`` seconds (default 300, below the verdict cache's 10 min)
  and never past the leaf's notAfter; a revocation published meanwhile is seen at the next
  full handshake, as with the verdict cache.
- Bounded: at most ``max_entries`` per worker, least recently used evicted. An entry is
  taken out when offered (one use; the connection stores its own, newer session when it
  ends cleanly), so a session is never offered twice (TLS 1.3 tickets are single-use by
  advice of RFC 8446 §C.4).
"""

from __future__ import annotations

import datetime
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

DEFAULT_MAX_ENTRIES = 1024
DEFAULT_LIFETIME = 300.0

S = TypeVar("S")  # the session object (OpenSSL.SSL.Session)
I = TypeVar("I")  # what validation produced (UpstreamInfo)  # noqa: E741


@dataclass(frozen=True)
class SessionKey:
    """What a stored session was validated for."""

    verify_host: str
    sni: str | None
    server_ip: str
    server_port: int
    alpn: tuple[bytes, ...]


@dataclass(frozen=True)
class CachedSession(Generic[S, I]):
    session: S
    info: I
    expires: float  # on the cache's clock


class UpstreamSessionCache(Generic[S, I]):
    """``take`` a session to offer; ``store`` one after a clean end of a validated one."""

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        lifetime: float = DEFAULT_LIFETIME,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        if max_entries < 0 or lifetime < 0:
            raise ValueError("max_entries and lifetime must be ≥ 0 (0 turns reuse off)")
        self.max_entries = max_entries
        self.lifetime = lifetime
        self._clock = clock
        self._wall = wall
        self._entries: OrderedDict[SessionKey, CachedSession[S, I]] = OrderedDict()
        self.offered = 0
        self.stored = 0
        self.expired = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, key: SessionKey) -> CachedSession[S, I] | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            self.expired += 1
            return None
        self.offered += 1
        return entry

    def store(self, key: SessionKey, session: S, info: I, not_after: datetime.datetime) -> None:
        if self.max_entries == 0 or self.lifetime == 0:
            return
        now = self._clock()
        left = (not_after - self._wall()).total_seconds()
        if left <= 0:
            return
        self._entries[key] = CachedSession(session, info, now + min(self.lifetime, left))
        self._entries.move_to_end(key)
        self.stored += 1
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evicted += 1
