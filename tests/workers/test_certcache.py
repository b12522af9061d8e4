"""The shared certificate cache: one writer, reader processes, eviction, clearing, fork."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import multiprocess  # type: ignore[import-untyped]
import pytest

from tlsgate.errors import OperatorError
from tlsgate.workers.certcache import MAX_DER_BYTES, MIN_MAP_SIZE, SharedCertificateCache

PROCESS_TIMEOUT = 30.0
SPAWN = multiprocess.get_context("spawn")


def key(n: int) -> bytes:
    return hashlib.sha256(b"key %d" % n).digest()


def der(n: int, size: int = 600) -> bytes:
    return (b"der %d " % n).ljust(size, b".")


@pytest.fixture
def cache_path(tmp_path: Path) -> Path:
    return tmp_path / "certcache"


@pytest.fixture
def writer(cache_path: Path) -> Iterator[SharedCertificateCache]:
    with SharedCertificateCache(cache_path) as cache:
        yield cache


# -- reader processes (spawned, as the workers are) ------------------------------------


def _reader(path: Path, commands: Any, results: Any) -> None:
    """A reader process: opens the cache, then answers ("get", n) / ("len",) until None."""
    cache = SharedCertificateCache.open_reader(path)
    results.put("open")
    while (command := commands.get(timeout=PROCESS_TIMEOUT)) is not None:
        if command[0] == "get":
            results.put(cache.get(key(command[1])))
        elif command[0] == "len":
            results.put(len(cache))
        elif command[0] == "put":
            try:
                cache.put(key(command[1]), der(command[1]))
            except RuntimeError as exc:
                results.put(f"refused: {exc}")
            else:
                results.put("stored")
    cache.close()


class Reader:
    """A spawned reader process, driven command by command."""

    def __init__(self, path: Path) -> None:
        self.commands = SPAWN.Queue()
        self.results = SPAWN.Queue()
        self.process = SPAWN.Process(target=_reader, args=(path, self.commands, self.results))
        self.process.start()
        assert self.results.get(timeout=PROCESS_TIMEOUT) == "open"

    def ask(self, *command: Any) -> Any:
        self.commands.put(command)
        return self.results.get(timeout=PROCESS_TIMEOUT)

    def get(self, n: int) -> bytes | None:
        result = self.ask("get", n)
        assert result is None or isinstance(result, bytes)
        return result

    def stop(self) -> int:
        self.commands.put(None)
        self.process.join(PROCESS_TIMEOUT)
        return int(self.process.exitcode)

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(PROCESS_TIMEOUT)


# -- sharing between processes -------------------------------------------------------


def test_a_value_put_by_the_writer_is_seen_by_readers_opened_before_and_after(
    writer: SharedCertificateCache, cache_path: Path
) -> None:
    before = Reader(cache_path)
    assert before.get(1) is None
    writer.put(key(1), der(1))
    assert before.get(1) == der(1)
    after = Reader(cache_path)
    assert after.get(1) == der(1)
    assert before.stop() == 0
    assert after.stop() == 0


def test_entries_outlive_reader_processes_that_exit_or_are_killed(
    writer: SharedCertificateCache, cache_path: Path
) -> None:
    writer.put(key(1), der(1))
    first = Reader(cache_path)
    assert first.get(1) == der(1)
    assert first.stop() == 0
    crashed = Reader(cache_path)
    assert crashed.get(1) == der(1)
    crashed.kill()
    writer.put(key(2), der(2))
    restarted = Reader(cache_path)
    assert (restarted.get(1), restarted.get(2)) == (der(1), der(2))
    assert restarted.stop() == 0


def test_clear_empties_the_cache_for_readers_that_are_open(
    writer: SharedCertificateCache, cache_path: Path
) -> None:
    for n in range(3):
        writer.put(key(n), der(n))
    reader = Reader(cache_path)
    assert reader.ask("len") == 3
    writer.clear()
    assert reader.get(0) is None
    assert reader.ask("len") == 0
    assert reader.stop() == 0


def test_a_reader_cannot_store_anything(writer: SharedCertificateCache, cache_path: Path) -> None:
    reader = Reader(cache_path)
    answer = reader.ask("put", 1)
    assert answer.startswith("refused: put() on a reader")
    assert writer.get(key(1)) is None
    assert reader.stop() == 0


# -- the writer ---------------------------------------------------------------------------


def test_the_writer_evicts_the_oldest_entries_beyond_max_entries(cache_path: Path) -> None:
    with SharedCertificateCache(cache_path, max_entries=5) as cache:
        for n in range(8):
            cache.put(key(n), der(n))
        assert len(cache) == 5
        assert [cache.get(key(n)) for n in range(3)] == [None, None, None]
        assert [cache.get(key(n)) for n in range(3, 8)] == [der(n) for n in range(3, 8)]


def test_storing_a_key_again_replaces_its_value_and_makes_it_the_newest(cache_path: Path) -> None:
    with SharedCertificateCache(cache_path, max_entries=3) as cache:
        for n in range(3):
            cache.put(key(n), der(n))
        cache.put(key(0), der(100))
        cache.put(key(3), der(3))
        assert len(cache) == 3
        assert cache.get(key(1)) is None
        assert cache.get(key(0)) == der(100)
        assert cache.get(key(2)) == der(2)


def test_a_full_map_evicts_old_entries_instead_of_failing_a_put(cache_path: Path) -> None:
    big = 200 * 1024
    with SharedCertificateCache(cache_path, max_entries=1000, map_size=MIN_MAP_SIZE) as cache:
        for n in range(40):  # 8 MB of leaves in a 2 MB map
            cache.put(key(n), der(n, big))
            assert cache.get(key(n)) == der(n, big)
        assert 1 <= len(cache) < 40


def test_opening_the_writer_empties_a_cache_left_by_an_earlier_run(cache_path: Path) -> None:
    with SharedCertificateCache(cache_path) as earlier:
        earlier.put(key(1), der(1))
    with SharedCertificateCache(cache_path) as cache:
        assert cache.get(key(1)) is None
        assert len(cache) == 0


def test_keys_are_32_bytes_and_values_at_most_max_der_bytes(
    writer: SharedCertificateCache,
) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        writer.put(b"short", der(1))
    with pytest.raises(ValueError, match="32 bytes"):
        writer.get(b"short")
    with pytest.raises(ValueError, match="1 to"):
        writer.put(key(1), b"x" * (MAX_DER_BYTES + 1))
    with pytest.raises(ValueError, match="1 to"):
        writer.put(key(1), b"")


def test_stats_count_this_processs_hits_and_misses_and_the_shared_size(
    writer: SharedCertificateCache,
) -> None:
    writer.put(key(1), der(1))
    writer.get(key(1))
    writer.get(key(1))
    writer.get(key(2))
    assert writer.stats() == {"hits": 2, "misses": 1, "size": 1}


def test_the_cache_files_are_private_to_the_supervisor_by_default(
    writer: SharedCertificateCache, cache_path: Path
) -> None:
    assert stat.S_IMODE(os.stat(cache_path).st_mode) == 0o700
    for name in ("data.mdb", "lock.mdb"):
        assert stat.S_IMODE(os.stat(cache_path / name).st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's group needs root")
def test_reader_gid_gives_that_group_read_access_and_the_lock_table(tmp_path: Path) -> None:
    gid = 65534  # nogroup
    with SharedCertificateCache(tmp_path / "shared", reader_gid=gid):
        stats = {name: os.stat(tmp_path / "shared" / name) for name in ("", "data.mdb", "lock.mdb")}
    modes = {name: (st.st_gid, stat.S_IMODE(st.st_mode)) for name, st in stats.items()}
    assert modes == {"": (gid, 0o750), "data.mdb": (gid, 0o640), "lock.mdb": (gid, 0o660)}


# -- readers in this process ------------------------------------------------------------


def test_a_reader_adopts_the_map_size_the_writer_chose(cache_path: Path) -> None:
    with SharedCertificateCache(cache_path, map_size=3 * MIN_MAP_SIZE) as cache:
        cache.put(key(1), der(1))
    with SharedCertificateCache.open_reader(cache_path) as reader:
        assert reader.map_size == 3 * MIN_MAP_SIZE
        assert reader.get(key(1)) == der(1)
        with pytest.raises(RuntimeError, match="only the supervisor's signer service writes"):
            reader.clear()


def test_a_reader_of_a_cache_nobody_created_is_an_operator_error(tmp_path: Path) -> None:
    with pytest.raises(OperatorError, match="supervisor creates it before starting workers"):
        SharedCertificateCache.open_reader(tmp_path / "missing")


def test_a_closed_cache_says_so_when_used(cache_path: Path) -> None:
    cache = SharedCertificateCache(cache_path)
    cache.close()
    cache.close()
    with pytest.raises(RuntimeError, match="was closed"):
        cache.get(key(1))


# -- fork -----------------------------------------------------------------------------------


def test_a_forked_child_gets_no_usable_inherited_cache_and_the_parent_is_unharmed(
    writer: SharedCertificateCache, cache_path: Path
) -> None:
    writer.put(key(1), der(1))
    assert writer.get(key(1)) == der(1)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        lines = []
        try:
            os.close(read_end)
            try:
                writer.get(key(1))
            except RuntimeError as exc:
                lines.append("inherited refused" if "through fork" in str(exc) else repr(exc))
            with SharedCertificateCache.open_reader(cache_path) as own:
                lines.append("own reads" if own.get(key(1)) == der(1) else "own misses")
        except BaseException as exc:
            lines.append(repr(exc))
        finally:
            os.write(write_end, ";".join(lines).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read()
    assert os.waitpid(pid, 0)[1] == 0
    assert report == b"inherited refused;own reads"
    # The child's closing released none of the parent's reader slots.
    assert writer.get(key(1)) == der(1)
    writer.put(key(2), der(2))
    assert writer.get(key(2)) == der(2)
