"""Open connections per client address, counted across all workers without locks.

Why: ``SO_REUSEPORT`` with eBPF steering (least-loaded or flow hash) spreads one client's
connections over every worker, so a count kept inside each worker lets one address hold
``workers × max_connections_per_client`` connections. The limit must be gateway-wide, yet
the accept path may not wait for the supervisor or take a lock another process could hold.

Design:

- One table of 32-bit counters in shared memory, created (zeroed) by the supervisor before
  any worker starts and handed to each worker at spawn. It has :attr:`ClientCounts.rows`
  rows; every worker *process* owns one row and is the only process that writes it, so an
  update is a plain store, never a read-modify-write that races another process.
- A row is a count-min sketch: :data:`HASHES` arrays of :data:`BUCKETS` counters. A client
  address is hashed with BLAKE2b, keyed by a secret drawn once per gateway run (a client
  cannot pick addresses — easy within an IPv6 /64 — that collide with a victim's), to one
  bucket per array. Accepting a connection adds 1 to the worker's bucket in each array;
  closing it subtracts 1.
- The gateway-wide count of an address: for each array, the sum over all rows of its bucket;
  the estimate is the smaller of the two sums. It is never below the true count. It is
  above it only when other addresses share the client's bucket in *both* arrays, and then
  only by their connections: with the default 4096 buckets a client is refused wrongly
  only if, in each array independently, the connections of the addresses sharing its
  bucket make up the rest of the limit — rare unless thousands of busy clients are near
  the limit at once.
- Readers do not synchronize with other workers' writes: two workers that accept the same
  client in the same instant may both see one below the limit, so the limit can be passed
  by at most one connection per worker, for as long as those connections last.
- What one client is: an IPv4 address, or an IPv6 address's network of
  ``client_ipv6_prefix`` bits (default /64, :func:`client_of`): a host usually holds a whole
  /64 and may use a fresh source address per connection, so per-address counting would let
  it open the limit once per address.
- A worker that dies cannot subtract what it added. The supervisor zeroes a process's row
  once the process has been reaped (its connections died with it) and before the row is
  given to another process (:meth:`ClientCounts.clear_row`).
"""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Any, Final

#: Counter arrays per row (count-min sketch depth).
HASHES: Final = 2
#: Counters per array (sketch width); a power of two.
BUCKETS: Final = 4096
#: Rows per worker slot: the current process, and processes still draining after a reload
#: or drain replaced them (each needs its own row until it exits).
ROWS_PER_SLOT: Final = 4
KEY_BYTES: Final = 16
_ROW_WORDS: Final = HASHES * BUCKETS
_ZERO_ROW: Final = memoryview(bytes(4 * _ROW_WORDS)).cast("I")


def client_of(ip: str, ipv6_prefix: int = 64) -> str:
    """The client ``ip`` is counted as: itself (IPv4), or its IPv6 network of
    ``ipv6_prefix`` bits as ``"2001:db8:0:1::/64"`` (IPv4-mapped addresses must be unmapped
    by the caller). Text that is not an IPv6 address is returned as it is."""
    if ":" not in ip or ipv6_prefix >= 128:
        return ip
    try:
        packed = int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big")
    except OSError:
        return ip
    network = packed >> (128 - ipv6_prefix) << (128 - ipv6_prefix)
    text = socket.inet_ntop(socket.AF_INET6, network.to_bytes(16, "big"))
    return f"{text}/{ipv6_prefix}"


def table_words(rows: int) -> int:
    """Counters in a table of ``rows`` rows (the size of the shared array to create)."""
    return rows * _ROW_WORDS


def new_key() -> bytes:
    """A fresh hash key: one per gateway run, shared by every worker."""
    return os.urandom(KEY_BYTES)


class ClientCounts:
    """A view of the shared table; ``row`` is the one this process writes (-1: none)."""

    __slots__ = ("_counters", "_key", "row", "rows")

    def __init__(self, buffer: Any, rows: int, row: int, key: bytes) -> None:
        counters = memoryview(buffer).cast("B").cast("I")
        if len(counters) != table_words(rows):
            raise ValueError(f"client count table holds {len(counters)} counters, "
                             f"expected {table_words(rows)} for {rows} rows")  # fmt: skip
        if not -1 <= row < rows:
            raise ValueError(f"row {row} is outside the table's {rows} rows")
        self._counters = counters
        self._key = key
        self.rows = rows
        self.row = row

    @classmethod
    def private(cls) -> ClientCounts:
        """A table of one row for a worker that runs alone (tests, a single process)."""
        return cls(bytearray(4 * table_words(1)), 1, 0, new_key())

    def _buckets(self, ip: str) -> tuple[int, int]:
        digest = hashlib.blake2b(ip.encode(), key=self._key, digest_size=8).digest()
        return (int.from_bytes(digest[:4], "little") % BUCKETS,
                BUCKETS + int.from_bytes(digest[4:], "little") % BUCKETS)  # fmt: skip

    def count(self, ip: str) -> int:
        """Open connections of ``ip`` in all workers (an estimate that never under-counts)."""
        c = self._counters
        first, second = self._buckets(ip)
        return min(sum(c[first::_ROW_WORDS]), sum(c[second::_ROW_WORDS]))

    def add(self, ip: str) -> None:
        """This worker opened a connection for ``ip``."""
        if self.row < 0:
            raise ValueError("this view has no row of its own to count in")
        c = self._counters
        base = self.row * _ROW_WORDS
        for bucket in self._buckets(ip):
            c[base + bucket] += 1

    def remove(self, ip: str) -> None:
        """This worker closed a connection of ``ip`` (one it counted with :meth:`add`)."""
        if self.row < 0:
            raise ValueError("this view has no row of its own to count in")
        c = self._counters
        base = self.row * _ROW_WORDS
        for bucket in self._buckets(ip):
            if c[base + bucket]:
                c[base + bucket] -= 1

    def clear_row(self, row: int) -> None:
        """Forget everything ``row`` counted (its process is gone; supervisor only)."""
        start = row * _ROW_WORDS
        self._counters[start : start + _ROW_WORDS] = _ZERO_ROW

    def row_total(self, row: int) -> int:
        """Connections counted in ``row`` (for status and tests)."""
        start = row * _ROW_WORDS
        return sum(self._counters[start : start + BUCKETS])


class RowPool:
    """Which row each worker process writes (the supervisor's bookkeeping)."""

    def __init__(self, table: ClientCounts) -> None:
        self.table = table
        self.free = list(range(table.rows))
        self.owner: dict[int, int] = {}  # pid -> row

    def take(self) -> int:
        """A zeroed row for a new process, or -1 when every row is in use."""
        if not self.free:
            return -1
        row = self.free.pop(0)
        self.table.clear_row(row)
        return row

    def give_back(self, row: int) -> None:
        """A row taken for a process that never started."""
        if row >= 0:
            self.free.append(row)

    def assign(self, pid: int, row: int) -> None:
        if row >= 0:
            self.owner[pid] = row

    def release(self, pid: int) -> None:
        """The process ``pid`` has exited: its connections are gone, so are its counts."""
        row = self.owner.pop(pid, None)
        if row is not None:
            self.table.clear_row(row)
            self.free.append(row)
