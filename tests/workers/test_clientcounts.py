"""The shared per-client table without processes: rows sum, the two hash arrays keep a
collision in one of them from counting, a row is cleared whole, rows are handed out once."""

from __future__ import annotations

import multiprocess  # type: ignore[import-untyped]
import pytest

from tlsgate.workers.clientcounts import BUCKETS, ClientCounts, RowPool, client_of, table_words

KEY = bytes(range(16))


def shared(rows: int) -> object:
    return multiprocess.get_context("spawn").Array("I", table_words(rows), lock=False)


def test_every_workers_row_counts_towards_the_gateway_wide_total() -> None:
    table = shared(3)
    w0, w1 = ClientCounts(table, 3, 0, KEY), ClientCounts(table, 3, 1, KEY)
    w0.add("10.0.0.1")
    w1.add("10.0.0.1")
    w1.add("10.0.0.1")
    w1.add("10.0.0.2")
    reader = ClientCounts(table, 3, -1, KEY)
    assert reader.count("10.0.0.1") == 3
    assert reader.count("10.0.0.2") == 1
    w1.remove("10.0.0.1")
    assert w0.count("10.0.0.1") == 2
    assert reader.row_total(1) == 2


def test_closing_more_than_was_opened_never_wraps_below_zero() -> None:
    counts = ClientCounts.private()
    counts.remove("10.0.0.1")
    counts.add("10.0.0.1")
    assert counts.count("10.0.0.1") == 1


def test_an_address_sharing_only_one_bucket_with_a_busy_one_is_not_counted() -> None:
    counts = ClientCounts.private()
    busy = "10.0.0.1"
    first, second = counts._buckets(busy)
    candidates = (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(2, 1 << 20))
    other = next(ip for ip in candidates if counts._buckets(ip)[0] == first
                 and counts._buckets(ip)[1] != second)  # fmt: skip
    for _ in range(100):
        counts.add(busy)
    assert counts.count(other) == 0
    assert counts.count(busy) == 100


def test_the_hash_depends_on_the_key() -> None:
    a = ClientCounts.private()
    b = ClientCounts(bytearray(4 * table_words(1)), 1, 0, bytes(16))
    addresses = [f"192.168.{i // 256}.{i % 256}" for i in range(64)]
    assert [a._buckets(ip) for ip in addresses] != [b._buckets(ip) for ip in addresses]
    assert all(0 <= x < BUCKETS <= y < 2 * BUCKETS for x, y in map(a._buckets, addresses))


def test_a_dead_processs_row_is_zeroed_and_reused_and_rows_run_out_visibly() -> None:
    table = shared(2)
    pool = RowPool(ClientCounts(table, 2, -1, KEY))
    r0, r1 = pool.take(), pool.take()
    assert (r0, r1) == (0, 1) and pool.take() == -1
    pool.assign(100, r0)
    pool.assign(101, r1)
    worker = ClientCounts(table, 2, r0, KEY)
    for _ in range(5):
        worker.add("10.0.0.1")
    pool.release(100)
    assert pool.table.count("10.0.0.1") == 0
    assert pool.take() == r0
    pool.release(999)  # unknown process: nothing happens


@pytest.mark.parametrize(
    ("ip", "prefix", "client"),
    [
        ("198.18.0.7", 64, "198.18.0.7"),  # IPv4: the address
        ("2001:db8:0:1:a:b:c:d", 64, "2001:db8:0:1::/64"),
        ("2001:db8:0:1::ffff", 64, "2001:db8:0:1::/64"),  # same /64: same client
        ("2001:db8:0:2::1", 64, "2001:db8:0:2::/64"),
        ("2001:db8:0:1:a:b:c:d", 56, "2001:db8::/56"),
        ("2001:db8:0:1:a:b:c:d", 128, "2001:db8:0:1:a:b:c:d"),
        ("::1", 64, "::/64"),
        ("not-an-address:x", 64, "not-an-address:x"),
    ],
)
def test_a_client_is_an_ipv4_address_or_an_ipv6_network(ip: str, prefix: int, client: str) -> None:
    assert client_of(ip, prefix) == client


def test_fresh_ipv6_addresses_in_one_slash_64_add_up_to_one_client() -> None:
    # a host may use a new temporary address (RFC 8981) for every connection
    table = ClientCounts(bytearray(4 * table_words(1)), 1, 0, KEY)
    for i in range(1, 11):
        table.add(client_of(f"2001:db8:0:1::{i:x}"))
    assert table.count(client_of("2001:db8:0:1::ffff")) == 10
    assert table.count(client_of("2001:db8:0:2::1")) == 0
