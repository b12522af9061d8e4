"""Learned bypass: names whose clients keep rejecting our certificate are spliced for a while.

Pinned applications and client-certificate servers cannot work through interception: the
client refuses any certificate but the real one (TLS alert ``unknown_ca``,
``bad_certificate``, ``certificate_unknown``, or a close right after our handshake). With
``[learned_bypass] enabled`` (off by default), ``threshold`` such rejections of one name
within ``window`` seconds put the name on a learned bypass list for ``ttl`` seconds: its
next connections are spliced (TCP relay, no TLS work, reported as ``bypass``) instead of
broken.

Rules:

- Only a *client* rejecting a certificate minted for an upstream that passed validation
  counts (the caller records rejections only after a valid upstream handshake). An upstream
  validation failure never teaches anything: it stays fail-closed.
- Shared by every worker: the list lives in one LMDB environment on tmpfs in the runtime
  directory (like the certificate cache), created empty by the supervisor at start and
  opened by each worker before it drops root. Why workers write it rather than the
  supervisor: a rejection must count the same whichever worker saw it, and a learned name
  must apply to the next connection on any worker, without a round trip to the supervisor
  on the hot path; LMDB serializes writers across processes and a transaction makes
  "count, maybe learn, maybe evict" atomic. The supervisor only reads it (``tlsgate
  status``). The risk accepted: a compromised worker could add names and so blind
  inspection of them on the other workers (it can already do so for its own connections);
  it cannot weaken upstream validation, which splicing never touches.
- Bounded: at most ``max_entries`` learned names (the least recently used is evicted, with
  a ``bypass_expired`` event, ``reason: "evicted"``), and at most ``4 × max_entries``
  names with rejection counts (the stalest counts are dropped).
- Time-limited: an entry past its ``ttl`` is removed by the first worker that sees it (a
  look-up, or the once-a-second sweep); that worker emits ``bypass_expired``, exactly once,
  because the removal is a transaction.
- The decisions (what a rejection is, counting in a window, choosing the LRU victim) are
  plain functions of their inputs, testable without LMDB.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import lmdb
import msgpack

#: OpenSSL's words for the client's alerts (RFC 8446 §6.2) that mean "not your certificate".
REJECTION_ALERTS: Final = (
    ("unknown ca", "unknown_ca"),
    ("bad certificate", "bad_certificate"),
    ("certificate unknown", "certificate_unknown"),
)
#: A client that closes this soon after our handshake, having sent nothing, rejected it.
QUICK_CLOSE_SECONDS: Final = 1.0
MAP_SIZE: Final = 16 * 1024 * 1024
_LEARNED: Final = b"learned"
_COUNTS: Final = b"rejections"


def classify_handshake_failure(text: str) -> str | None:
    """The rejection kind of a failed client handshake (OpenSSL's error text), or None."""
    low = text.lower()
    for needle, kind in REJECTION_ALERTS:
        if needle in low:
            return kind
    if "unexpected eof" in low or "-1," in low or "reset" in low:
        return "closed-in-handshake"
    return None


def classify_close(close_reason: str, bytes_from_client: int, after_handshake: float) -> str | None:
    """A close right after our completed handshake, before any client byte, or None."""
    if bytes_from_client or after_handshake >= QUICK_CLOSE_SECONDS:
        return None
    if close_reason in ("client-closed", "client-reset"):
        return "closed-after-handshake"
    return None


@dataclass(frozen=True, slots=True)
class Count:
    """Rejections of one name inside the current window."""

    count: int
    first: float
    kind: str


def counted(previous: Count | None, kind: str, now: float, window: float) -> Count:
    """Add one rejection; a window that has passed starts over."""
    if previous is None or now - previous.first > window:
        return Count(1, now, kind)
    return Count(previous.count + 1, previous.first, kind)


@dataclass(frozen=True, slots=True)
class Entry:
    """A learned name."""

    name: str
    kind: str
    rejections: int
    learned_at: float
    expires_at: float
    last_used: float
    spliced: int

    def fields(self, now: float) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "rejections": self.rejections,
                "learned_at": self.learned_at, "expires_at": self.expires_at,
                "expires_in": round(max(0.0, self.expires_at - now), 3),
                "spliced": self.spliced}  # fmt: skip

    def pack(self) -> bytes:
        return msgpack.packb([self.kind, self.rejections, self.learned_at, self.expires_at,
                              self.last_used, self.spliced])  # fmt: skip

    @classmethod
    def unpack(cls, name: bytes, raw: bytes) -> Entry:
        kind, rejections, learned_at, expires_at, last_used, spliced = msgpack.unpackb(raw)
        return cls(name.decode(), kind, rejections, learned_at, expires_at, last_used, spliced)


def lru_victim(entries: list[Entry]) -> Entry:
    """The least recently used entry (oldest ``last_used``; then the oldest learned)."""
    return min(entries, key=lambda e: (e.last_used, e.learned_at, e.name))


@dataclass(frozen=True, slots=True)
class Learned:
    """A rejection made a name learned (``evicted``: what made room for it)."""

    entry: Entry
    evicted: Entry | None


class LearnedBypass:
    """The shared list; one instance per process (LMDB's rule)."""

    def __init__(self, env: lmdb.Environment, threshold: int, window: float, ttl: float,
                 max_entries: int) -> None:  # fmt: skip
        self.env = env
        self.threshold = threshold
        self.window = window
        self.ttl = ttl
        self.max_entries = max_entries
        self.learned_db = env.open_db(_LEARNED)
        self.counts_db = env.open_db(_COUNTS)

    @classmethod
    def create(cls, path: Path, settings: Any) -> LearnedBypass:
        """The supervisor: a fresh, empty list for this run."""
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(mode=0o700, parents=True)
        return cls.open(path, settings)

    @classmethod
    def open(cls, path: Path, settings: Any) -> LearnedBypass:
        env = lmdb.open(str(path), map_size=MAP_SIZE, max_dbs=2, subdir=True,
                        max_spare_txns=0, metasync=False, sync=False)  # fmt: skip
        return cls(env, settings.threshold, settings.window, settings.ttl, settings.max_entries)

    def close(self) -> None:
        self.env.close()

    # -- the hot path --------------------------------------------------------------------
    def lookup(self, name: str, now: float) -> tuple[Entry | None, Entry | None]:
        """(live entry, entry that expired just now) for ``name``; a live hit is counted."""
        key = name.encode()
        with self.env.begin(db=self.learned_db) as txn:
            raw = txn.get(key)
        if raw is None:
            return None, None
        with self.env.begin(db=self.learned_db, write=True) as txn:
            raw = txn.get(key)
            if raw is None:
                return None, None  # another worker removed it meanwhile
            entry = Entry.unpack(key, raw)
            if entry.expires_at <= now:
                txn.delete(key)
                return None, entry
            used = Entry(entry.name, entry.kind, entry.rejections, entry.learned_at,
                         entry.expires_at, now, entry.spliced + 1)  # fmt: skip
            txn.put(key, used.pack())
            return used, None

    def record_rejection(self, name: str, kind: str, now: float) -> Learned | None:
        """Count one rejection; returns what was learned when the threshold is reached."""
        key = name.encode()
        with self.env.begin(write=True) as txn:
            if txn.get(key, db=self.learned_db) is not None:
                return None  # already learned (a connection that was set up before)
            raw = txn.get(key, db=self.counts_db)
            previous = Count(*msgpack.unpackb(raw)) if raw is not None else None
            count = counted(previous, kind, now, self.window)
            if count.count < self.threshold:
                self._bound_counts(txn, key)
                txn.put(key, msgpack.packb([count.count, count.first, count.kind]),
                        db=self.counts_db)  # fmt: skip
                return None
            txn.delete(key, db=self.counts_db)
            evicted = None
            stat = txn.stat(self.learned_db)
            if stat["entries"] >= self.max_entries:
                entries = [Entry.unpack(k, v) for k, v in txn.cursor(db=self.learned_db)]
                evicted = lru_victim(entries)
                txn.delete(evicted.name.encode(), db=self.learned_db)
            entry = Entry(name, kind, count.count, now, now + self.ttl, now, 0)
            txn.put(key, entry.pack(), db=self.learned_db)
            return Learned(entry, evicted)

    def _bound_counts(self, txn: lmdb.Transaction, key: bytes) -> None:
        if txn.get(key, db=self.counts_db) is not None:
            return
        if txn.stat(self.counts_db)["entries"] < 4 * self.max_entries:
            return
        stalest = min(((msgpack.unpackb(v)[1], k) for k, v in txn.cursor(db=self.counts_db)))
        txn.delete(stalest[1], db=self.counts_db)

    def expire(self, now: float) -> list[Entry]:
        """Remove every entry past its ttl; returns the ones this call removed."""
        with self.env.begin(db=self.learned_db) as txn:
            due = [k for k, v in txn.cursor() if Entry.unpack(k, v).expires_at <= now]
        removed: list[Entry] = []
        if not due:
            return removed
        with self.env.begin(db=self.learned_db, write=True) as txn:
            for key in due:
                raw = txn.get(key)
                if raw is not None and Entry.unpack(key, raw).expires_at <= now:
                    txn.delete(key)
                    removed.append(Entry.unpack(key, raw))
        return removed

    def entries(self, now: float) -> list[dict[str, Any]]:
        """Live entries, soonest to expire first (for status)."""
        with self.env.begin(db=self.learned_db) as txn:
            entries = [Entry.unpack(k, v) for k, v in txn.cursor()]
        live = [e for e in entries if e.expires_at > now]
        return [e.fields(now) for e in sorted(live, key=lambda e: e.expires_at)]
