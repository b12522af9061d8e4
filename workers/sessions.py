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
- Bounded: at most ``max_entries`` sessions per worker and ``per_key`` per key (concurrent
  connections to one server each need their own), the least recently used key's oldest
  session evicted first. A session is taken out when offered (one use; the connection
  stores its own, newer session when it ends cleanly), so a session is never offered twice
  (TLS 1.3 tickets are single-use by advice of RFC 8446 §C.4).
"""

from __future__ import annotations

import datetime
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

DEFAULT_MAX_ENTRIES = 1024
DEFAULT_PER_KEY = 32
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
        per_key: int = DEFAULT_PER_KEY,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        if max_entries < 0 or lifetime < 0:
            raise ValueError("max_entries and lifetime must be ≥ 0 (0 turns reuse off)")
        self.max_entries = max_entries
        self.lifetime = lifetime
        self.per_key = max(1, per_key)
        self._clock = clock
        self._wall = wall
        self._entries: OrderedDict[SessionKey, list[CachedSession[S, I]]] = OrderedDict()
        self._count = 0
        self.offered = 0
        self.stored = 0
        self.expired = 0
        self.evicted = 0

    def __len__(self) -> int:
        return self._count

    def take(self, key: SessionKey) -> CachedSession[S, I] | None:
        """The newest unexpired session for ``key``, removed from the cache."""
        pool = self._entries.get(key)
        now = self._clock()
        while pool:
            entry = pool.pop()
            self._count -= 1
            if entry.expires > now:
                if not pool:
                    del self._entries[key]
                self.offered += 1
                return entry
            self.expired += 1
        self._entries.pop(key, None)
        return None

    def store(self, key: SessionKey, session: S, info: I, not_after: datetime.datetime) -> None:
        if self.max_entries == 0 or self.lifetime == 0:
            return
        now = self._clock()
        left = (not_after - self._wall()).total_seconds()
        if left <= 0:
            return
        pool = self._entries.setdefault(key, [])
        pool.append(CachedSession(session, info, now + min(self.lifetime, left)))
        self._entries.move_to_end(key)
        self._count += 1
        self.stored += 1
        if len(pool) > self.per_key:
            del pool[0]
            self._count -= 1
            self.evicted += 1
        while self._count > self.max_entries:
            oldest_key, oldest = next(iter(self._entries.items()))
            del oldest[0]
            self._count -= 1
            self.evicted += 1
            if not oldest:
                del self._entries[oldest_key]
