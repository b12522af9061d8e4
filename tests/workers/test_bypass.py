"""The learned bypass list: classification and counting (pure), and the shared LMDB store
used by two instances at once, as two workers do (separate processes in the gateway; here
two environments opened on the same files, which LMDB treats the same way)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from tlsgate.supervisor.config import LearnedBypassSettings
from tlsgate.workers.bypass import (
    Count,
    Entry,
    LearnedBypass,
    classify_close,
    classify_handshake_failure,
    counted,
    lru_victim,
)

SETTINGS = LearnedBypassSettings(enabled=True, threshold=3, window=60.0, ttl=100.0,
                                 max_entries=2)  # fmt: skip


@pytest.mark.parametrize(("text", "kind"), [
    ("tlsv1 alert unknown ca", "unknown_ca"),
    ("sslv3 alert bad certificate", "bad_certificate"),
    ("sslv3 alert certificate unknown", "certificate_unknown"),
    ("(-1, 'Unexpected EOF')", "closed-in-handshake"),
    ("(104, 'ECONNRESET')", "closed-in-handshake"),
    ("no shared cipher", None),
    ("tlsv1 alert protocol version", None),
])  # fmt: skip
def test_which_client_handshake_failures_are_rejections(text: str, kind: str | None) -> None:
    assert classify_handshake_failure(text) == kind


def test_a_quick_silent_close_after_the_handshake_is_a_rejection() -> None:
    assert classify_close("client-closed", 0, 0.05) == "closed-after-handshake"
    assert classify_close("client-closed", 10, 0.05) is None  # it sent a request
    assert classify_close("client-closed", 0, 5.0) is None  # it stayed a while
    assert classify_close("upstream-closed", 0, 0.05) is None


def test_counting_starts_over_when_the_window_has_passed() -> None:
    first = counted(None, "unknown_ca", 100.0, 60.0)
    second = counted(first, "unknown_ca", 150.0, 60.0)
    assert second == Count(2, 100.0, "unknown_ca")
    assert counted(second, "bad_certificate", 161.0, 60.0) == Count(1, 161.0, "bad_certificate")


def test_the_lru_victim_is_the_least_recently_used() -> None:
    a = Entry("a", "unknown_ca", 3, 1.0, 101.0, 50.0, 4)
    b = Entry("b", "unknown_ca", 3, 2.0, 102.0, 20.0, 1)
    assert lru_victim([a, b]) is b


@pytest.fixture
def store(tmp_path: Path) -> LearnedBypass:
    return LearnedBypass.create(tmp_path / "learned", SETTINGS)


def test_threshold_rejections_within_the_window_learn_the_name(store: LearnedBypass) -> None:
    assert store.record_rejection("pinned.test", "unknown_ca", 10.0) is None
    assert store.record_rejection("pinned.test", "unknown_ca", 11.0) is None
    learned = store.record_rejection("pinned.test", "unknown_ca", 12.0)
    assert learned is not None and learned.evicted is None
    assert learned.entry.expires_at == 112.0 and learned.entry.rejections == 3
    live, expired = store.lookup("pinned.test", 13.0)
    assert live is not None and live.spliced == 1 and expired is None
    assert [e["name"] for e in store.entries(13.0)] == ["pinned.test"]


def test_rejections_spread_beyond_the_window_never_learn(store: LearnedBypass) -> None:
    for t in (0.0, 61.0, 122.0, 183.0):
        assert store.record_rejection("slow.test", "unknown_ca", t) is None
    assert store.lookup("slow.test", 184.0) == (None, None)


def _in_child(path: str, action: str, now: float, out: multiprocessing.Queue) -> None:
    other = LearnedBypass.open(Path(path), SETTINGS)
    if action == "reject":
        out.put(other.record_rejection("x.test", "unknown_ca", now) is not None)
    else:
        out.put([e.name for e in other.expire(now)])
    other.close()


def _run_child(store: LearnedBypass, action: str, now: float) -> object:
    ctx = multiprocessing.get_context("spawn")  # as the workers are started
    out = ctx.Queue()
    child = ctx.Process(target=_in_child, args=(str(store.env.path()), action, now, out))
    child.start()
    result = out.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    return result


def test_counts_add_up_across_processes_and_expiry_is_reported_once(store: LearnedBypass) -> None:
    store.record_rejection("x.test", "unknown_ca", 0.0)
    assert _run_child(store, "reject", 1.0) is False  # the other worker's rejection counts
    assert store.record_rejection("x.test", "unknown_ca", 2.0) is not None
    assert _run_child(store, "expire", 200.0) == ["x.test"]
    assert store.expire(200.0) == []  # removed once, reported once
    assert store.lookup("x.test", 201.0) == (None, None)


def test_an_expired_entry_found_by_a_lookup_is_removed_and_returned(store: LearnedBypass) -> None:
    for t in (0.0, 1.0, 2.0):
        store.record_rejection("x.test", "unknown_ca", t)
    live, expired = store.lookup("x.test", 500.0)
    assert live is None and expired is not None and expired.name == "x.test"
    assert store.lookup("x.test", 501.0) == (None, None)


def test_the_list_is_bounded_and_evicts_the_least_recently_used(store: LearnedBypass) -> None:
    def learn(name: str, t: float) -> object:
        out = None
        for i in range(3):
            out = store.record_rejection(name, "unknown_ca", t + i)
        return out

    learn("a.test", 0.0)
    learn("b.test", 10.0)
    store.lookup("a.test", 20.0)  # a is now more recently used than b
    learned = learn("c.test", 30.0)
    assert learned is not None and learned.evicted is not None  # type: ignore[attr-defined]
    assert learned.evicted.name == "b.test"  # type: ignore[attr-defined]
    assert sorted(e["name"] for e in store.entries(40.0)) == ["a.test", "c.test"]


def test_rejection_counts_are_bounded_too(store: LearnedBypass) -> None:
    for i in range(4 * SETTINGS.max_entries + 5):
        store.record_rejection(f"n{i}.test", "unknown_ca", float(i))
    with store.env.begin() as txn:
        assert txn.stat(store.counts_db)["entries"] <= 4 * SETTINGS.max_entries
