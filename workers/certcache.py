"""The shared certificate cache: minted leaves in LMDB on tmpfs, read by every worker.

Rules:

- One directory (``data.mdb`` + ``lock.mdb``) in the runtime directory, which lives on
  tmpfs (``/run/tlsgate/certcache`` or ``<state-dir>/run/certcache``): nothing reaches a
  disk, and the entries outlive any worker process but not a reboot.
- One *writer* role: the signer process stores what it mints and evicts; the supervisor
  opens a writer too, to empty the cache at start and at CA rotation (LMDB serializes
  writers of different processes). Workers open *readers*
  (:meth:`SharedCertificateCache.open_reader`) whose memory map is read-only: a worker
  cannot change a certificate other workers serve.
- Opening the writer empties the cache (unless ``clear=False``: the signer process
  re-opening it after a restart, same run): every run has a fresh leaf key, so entries
  of an earlier run carry the wrong public key. The supervisor also calls :meth:`clear` at CA
  rotation; readers see the empty cache at their next :meth:`get`.
- Keys are the 32-byte :func:`~tlsgate.workers.certs.cache_key`; values are DER, at most
  :data:`MAX_DER_BYTES`. Each value is stored behind its 8-byte insertion number, and a
  second table maps insertion numbers to keys, so the writer evicts the oldest insertion
  (FIFO; re-storing a key makes it the newest) whenever more than ``max_entries`` are
  held. Readers never write, so reads cannot refresh an entry (no LRU).
- The map is ``map_size`` bytes and never grows. If it fills up anyway (large leaves, or
  a crashed reader pinning old pages), the writer clears dead readers' slots, evicts the
  oldest quarter and retries, and as a last resort empties the cache: a put never fails
  for lack of room.
- Readers adopt the writer's map size from the file (opened with size 0) and re-adopt it
  if the writer ever reopened with another size (``MapResizedError``).
- An instance belongs to the process that opened it (LMDB's rule). In a forked child every
  inherited instance is closed (its methods raise ``RuntimeError``) and the child opens
  its own. No read transaction is cached between lookups (``max_spare_txns=0``): py-lmdb
  aborts a cached one when a forked child exits, which frees the *parent's* reader slot
  (``MDB_BAD_RSLOT`` in the parent). A fork while another thread of this process is
  inside a cache call is still unsafe; the workers are spawned, never forked.
- ``hits`` and ``misses`` count this process's lookups; ``len()`` is the shared size.
- Readers need write access to ``lock.mdb`` (LMDB's table of live readers): with
  ``reader_gid`` the writer gives that group read access to the data and read-write
  access to the lock file. A hostile reader can thus disturb the lock table (stall the
  writer), but never alter a stored certificate.
- A read costs ~2 µs (one short read transaction, one copy of the DER); a put ~20-40 µs.
"""

from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path
from typing import Final, cast

import lmdb

from tlsgate.errors import OperatorError

logger = logging.getLogger(__name__)

#: Entries held before the oldest is evicted.
DEFAULT_MAX_ENTRIES: Final = 10_000
#: Size of the memory map (the most the file can grow to), fixed by the writer.
DEFAULT_MAP_SIZE: Final = 256 * 1024 * 1024
#: Largest DER stored: a leaf with every one of MAX_LEAF_NAMES names at full length is ~260 KB.
MAX_DER_BYTES: Final = 512 * 1024
#: Smallest map accepted: room for a few of the largest leaves.
MIN_MAP_SIZE: Final = 4 * MAX_DER_BYTES
#: Length of a cache key (a SHA-256 digest).
KEY_BYTES: Final = 32
#: Slots in LMDB's reader table: one per process (per thread) reading at the same time.
MAX_READERS: Final = 512
#: Puts between two sweeps of reader slots left by processes that died mid-read.
READER_CHECK_INTERVAL: Final = 1024
#: Bytes of the big-endian insertion number in front of each stored DER.
SEQ_BYTES: Final = 8

_CERTS_DB: Final = b"certs"
_ORDER_DB: Final = b"order"
_DIR_MODE: Final = 0o700
_SHARED_DIR_MODE: Final = 0o750
_DATA_MODE: Final = 0o600
_SHARED_DATA_MODE: Final = 0o640
_SHARED_LOCK_MODE: Final = 0o660
_DATA_FILE: Final = "data.mdb"
_LOCK_FILE: Final = "lock.mdb"

#: Instances open in this process, closed in a forked child (see module rules).
_open_caches: weakref.WeakSet[SharedCertificateCache] = weakref.WeakSet()


class SharedCertificateCache:
    """Minted leaves (DER) by cache key, shared by all processes through an LMDB file.

    ``SharedCertificateCache(path)`` opens the writer (and empties the cache);
    :meth:`open_reader` opens a reader of the cache a writer created.
    """

    __slots__ = (
        "__weakref__",
        "_certs",
        "_env",
        "_order",
        "_puts",
        "hits",
        "map_size",
        "max_entries",
        "misses",
        "path",
        "readonly",
    )

    def __init__(
        self,
        path: Path,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        map_size: int = DEFAULT_MAP_SIZE,
        readonly: bool = False,
        reader_gid: int | None = None,
        clear: bool = True,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        # A reader's max_entries and map_size are unused: the writer evicts, the file sizes.
        if not readonly and map_size < MIN_MAP_SIZE:
            raise ValueError(f"map_size must be at least {MIN_MAP_SIZE} bytes, not {map_size}")
        self.path: Final = path
        self.readonly: Final = readonly
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._puts = 0
        if readonly:
            self._env = _open_reader_env(path)
        else:
            self._env = _open_writer_env(path, map_size, reader_gid)
        try:
            self._certs = self._env.open_db(_CERTS_DB, create=not readonly)
            self._order = self._env.open_db(_ORDER_DB, create=not readonly)
        except lmdb.NotFoundError as exc:
            self._env.close()
            raise OperatorError(
                f"the shared certificate cache {path} has no certificate table; it was not"
                " made by this version's supervisor: restart the gateway, which recreates it"
            ) from exc
        self.map_size = self._env.info()["map_size"]
        _open_caches.add(self)
        if not readonly and clear:
            self.clear()

    @classmethod
    def open_reader(cls, path: Path) -> SharedCertificateCache:
        """A read-only view of the cache the supervisor's writer created at ``path``."""
        return cls(path, readonly=True)

    # -- reading (any process) -------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        """The DER stored under ``key``, or ``None``."""
        if len(key) != KEY_BYTES:
            raise ValueError(f"cache keys are {KEY_BYTES} bytes, not {len(key)}")
        try:
            with self._env.begin(db=self._certs) as txn:
                value = txn.get(key)
        except lmdb.MapResizedError:
            # The writer reopened with a larger map: adopt its size and read again.
            self._env.set_mapsize(0)
            self.map_size = self._env.info()["map_size"]
            with self._env.begin(db=self._certs) as txn:
                value = txn.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        return value[SEQ_BYTES:]

    def __len__(self) -> int:
        with self._env.begin() as txn:
            return txn.stat(self._certs)["entries"]

    def stats(self) -> dict[str, int]:
        """``hits`` and ``misses`` of this process's lookups, ``size`` of the shared cache."""
        return {"hits": self.hits, "misses": self.misses, "size": len(self)}

    # -- writing (the writer only) ---------------------------------------------------

    def put(self, key: bytes, der: bytes) -> None:
        """Store ``der`` under ``key`` as the newest entry; evict beyond ``max_entries``."""
        self._require_writer("put")
        if len(key) != KEY_BYTES:
            raise ValueError(f"cache keys are {KEY_BYTES} bytes, not {len(key)}")
        if not der or len(der) > MAX_DER_BYTES:
            raise ValueError(f"a cached certificate is 1 to {MAX_DER_BYTES} bytes, not {len(der)}")
        self._puts += 1
        if self._puts % READER_CHECK_INTERVAL == 0:
            self._env.reader_check()
        try:
            self._put(key, der)
            return
        except lmdb.MapFullError:
            pass
        cleared = self._env.reader_check()
        evicted = self._evict_oldest(max(1, len(self) // 4))
        logger.warning(
            "the shared certificate cache %s is full (%d bytes); evicted the %d oldest entries"
            " and %d dead readers: raise its map size or lower max_entries",
            self.path,
            self.map_size,
            evicted,
            cleared,
        )
        try:
            self._put(key, der)
            return
        except lmdb.MapFullError:
            pass
        logger.warning("the shared certificate cache %s is still full; emptying it", self.path)
        self.clear()
        self._put(key, der)

    def clear(self) -> None:
        """Remove every entry (at start and at CA rotation); readers see it at once."""
        self._require_writer("clear")
        with self._env.begin(write=True) as txn:
            txn.drop(self._certs, delete=False)
            txn.drop(self._order, delete=False)

    def _put(self, key: bytes, der: bytes) -> None:
        certs, order = self._certs, self._order
        with self._env.begin(write=True) as txn:
            cursor = txn.cursor(order)
            seq = int.from_bytes(cursor.key()) + 1 if cursor.last() else 0
            seq_bytes = seq.to_bytes(SEQ_BYTES)
            old = txn.replace(key, seq_bytes + der, db=certs)
            if old is not None:
                txn.delete(old[:SEQ_BYTES], db=order)
            txn.put(seq_bytes, key, db=order, append=True)
            excess = txn.stat(certs)["entries"] - self.max_entries
            while excess > 0 and cursor.first():
                txn.delete(cursor.value(), db=certs)
                cursor.delete()
                excess -= 1

    def _evict_oldest(self, count: int) -> int:
        evicted = 0
        with self._env.begin(write=True) as txn:
            cursor = txn.cursor(self._order)
            while evicted < count and cursor.first():
                txn.delete(cursor.value(), db=self._certs)
                cursor.delete()
                evicted += 1
        return evicted

    def _require_writer(self, what: str) -> None:
        if self.readonly:
            raise RuntimeError(
                f"{what}() on a reader of the shared certificate cache {self.path}:"
                " only the supervisor's signer service writes it"
            )

    # -- life cycle ------------------------------------------------------------------

    def close(self) -> None:
        """Close this process's view (idempotent); the files stay."""
        env = self._detach("closed")
        if env is not None:
            env.close()

    def __enter__(self) -> SharedCertificateCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _detach(self, why: str) -> lmdb.Environment | None:
        """Make every further use raise; the environment it had (``None``: detached already)."""
        _open_caches.discard(self)
        env = self._env
        if isinstance(env, _Detached):
            return None
        self._env = cast(lmdb.Environment, _Detached(self.path, why))
        return env


class _Detached:
    """Stands in for a closed environment: any use raises a RuntimeError that says why."""

    __slots__ = ("_message",)

    def __init__(self, path: Path, why: str) -> None:
        self._message = (
            f"the shared certificate cache {path} was {why}; each process opens its own"
            " (workers are spawned, not forked, and open it themselves)"
        )

    def __getattr__(self, name: str) -> object:
        raise RuntimeError(self._message)


def _close_inherited() -> None:
    for cache in list(_open_caches):
        env = cache._detach("inherited through fork")
        if env is not None:
            # Safe: without cached read transactions (max_spare_txns=0) closing releases
            # only reader slots of this (child) process, never the parent's.
            env.close()


os.register_at_fork(after_in_child=_close_inherited)


def _open_writer_env(path: Path, map_size: int, reader_gid: int | None) -> lmdb.Environment:
    shared = reader_gid is not None
    try:
        path.mkdir(mode=_SHARED_DIR_MODE if shared else _DIR_MODE, exist_ok=True)
        if reader_gid is not None:
            os.chown(path, -1, reader_gid)
            os.chmod(path, _SHARED_DIR_MODE)
    except OSError as exc:
        raise OperatorError(
            f"cannot create the shared certificate cache directory {path}:"
            f" {exc.strerror or exc}; check that the runtime directory exists and is writable"
        ) from exc
    try:
        try:
            env = _lmdb_open_writer(path, map_size)
        except (lmdb.InvalidError, lmdb.VersionMismatchError, lmdb.CorruptedError) as exc:
            # A cache is disposable: a damaged file, or one of another LMDB version, is remade.
            logger.warning("removing the unusable shared certificate cache %s (%s)", path, exc)
            for name in (_DATA_FILE, _LOCK_FILE):
                try:
                    os.unlink(path / name)
                except FileNotFoundError:
                    pass
            env = _lmdb_open_writer(path, map_size)
    except (lmdb.Error, OSError) as exc:
        raise OperatorError(
            f"cannot open the shared certificate cache {path}: {exc}; check the runtime"
            " directory's permissions and the free memory of its file system"
        ) from exc
    if reader_gid is not None:
        try:
            for name, mode in ((_DATA_FILE, _SHARED_DATA_MODE), (_LOCK_FILE, _SHARED_LOCK_MODE)):
                os.chown(path / name, -1, reader_gid)
                os.chmod(path / name, mode)
        except OSError as exc:
            env.close()
            raise OperatorError(
                f"cannot give group {reader_gid} access to the shared certificate cache"
                f" {path}: {exc.strerror or exc}; only a supervisor running as root can share"
                " it with workers of another user"
            ) from exc
    return env


def _lmdb_open_writer(path: Path, map_size: int) -> lmdb.Environment:
    return lmdb.open(
        str(path),
        map_size=map_size,
        max_dbs=2,
        max_readers=MAX_READERS,
        mode=_DATA_MODE,
        # tmpfs: flushing to "disk" buys nothing, and a crash loses only a cache.
        sync=False,
        metasync=False,
        max_spare_txns=0,  # see the module rules (fork)
    )


def _open_reader_env(path: Path) -> lmdb.Environment:
    try:
        # map_size 0: adopt the size the writer chose (a smaller one fails once data grows).
        return lmdb.open(
            str(path),
            map_size=0,
            max_dbs=2,
            readonly=True,
            create=False,
            max_spare_txns=0,  # see the module rules (fork)
        )
    except lmdb.Error as exc:
        raise OperatorError(
            f"cannot open the shared certificate cache {path}: {exc}; the supervisor creates"
            " it before starting workers, and a worker of another user needs the cache's"
            " group (reader_gid) to open it"
        ) from exc
