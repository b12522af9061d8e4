"""Client-facing certificates: the certificate cache and the per-name TLS contexts.

Rules:
- A minted leaf is keyed by the *name set* it covers and the SHA-256 fingerprint of the
  upstream certificate it stands for: a new upstream certificate means a new leaf.
- The cache holds DER bytes behind :class:`CertificateCache` (get/put). Here it is an
  in-process bounded LRU; the supervisor issue backs it with shared memory so all workers
  and restarts share one store.
- All leaves of one run share one leaf key (ECDSA P-256, generated at start, never written
  to disk), so a cache entry is just the certificate.
- Each worker also keeps a bounded LRU of ready :class:`OpenSSL.SSL.Context` objects
  (building one costs ~340 µs; switching to a cached one ~12 µs).
- The ALPN answered to the client is the protocol the upstream selected, read from the
  connection's app data (:class:`ClientSideState`); nothing else is ever offered.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from tlsgate.supervisor.signer import LeafRequest

#: TLS 1.2 suites offered to clients: ECDHE with AEAD only (TLS 1.3 suites are all AEAD).
CLIENT_TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:@SECLEVEL=2"
DEFAULT_CONTEXT_CACHE_SIZE = 1024
DEFAULT_CERT_CACHE_SIZE = 10000


class CertificateCache(Protocol):
    """Minted leaves by key; implementations must be safe to share across workers."""

    def get(self, key: bytes) -> bytes | None: ...

    def put(self, key: bytes, der: bytes) -> None: ...


class Signer(Protocol):
    """Whoever holds the CA key: mints a leaf for a request (in-process)."""

    def sign(self, request: LeafRequest) -> x509.Certificate: ...


class Minter(Protocol):
    """What a worker asks on a cache miss: DER of a leaf for ``request``, stored under
    ``key`` in the shared cache by whoever signs (in-process, or the supervisor's signer)."""

    async def mint(self, request: LeafRequest, key: bytes) -> bytes: ...


class LocalMinter:
    """Signs in this process (single-process gateway, tests) and fills the cache."""

    def __init__(self, signer: Signer, cache: CertificateCache) -> None:
        self._signer = signer
        self._cache = cache

    async def mint(self, request: LeafRequest, key: bytes) -> bytes:
        der = self._signer.sign(request).public_bytes(Encoding.DER)
        self._cache.put(key, der)
        return der


class LruCertificateCache:
    """A bounded in-process LRU of DER certificates (one worker's private cache)."""

    def __init__(self, capacity: int = DEFAULT_CERT_CACHE_SIZE) -> None:
        if capacity < 1:
            raise ValueError("certificate cache capacity must be at least 1")
        self.capacity = capacity
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> bytes | None:
        der = self._items.get(key)
        if der is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return der

    def put(self, key: bytes, der: bytes) -> None:
        self._items[key] = der
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def cache_key(request: LeafRequest, upstream_fingerprint: str) -> bytes:
    """The cache key of a leaf: its name set and the upstream certificate it stands for."""
    names = ",".join(sorted(set(request.dns_names))) + "|" + ",".join(sorted(request.ip_addresses))
    return hashlib.sha256(f"{names}|{upstream_fingerprint}".encode()).digest()


@dataclass(slots=True)
class ClientSideState:
    """App data of a client-facing Connection: what its callbacks need to know."""

    #: The protocol the upstream selected (``None``: no ALPN upstream → none to the client).
    alpn: bytes | None


def _select_alpn(conn: SSL.Connection, offered: list[bytes]) -> bytes | object:
    state: ClientSideState = conn.get_app_data()
    if state.alpn is not None and state.alpn in offered:
        return state.alpn
    return SSL.NO_OVERLAPPING_PROTOCOLS


class ClientContexts:
    """Ready server-side Contexts for intercepted names, minting leaves on a miss."""

    def __init__(
        self,
        minter: Minter,
        leaf_key: ec.EllipticCurvePrivateKey,
        chain: Sequence[x509.Certificate],
        cache: CertificateCache,
        *,
        context_cache_size: int = DEFAULT_CONTEXT_CACHE_SIZE,
    ) -> None:
        self._minter = minter
        self._leaf_key = leaf_key
        self._chain = list(chain)
        self._cache = cache
        self._contexts: OrderedDict[bytes, SSL.Context] = OrderedDict()
        self._context_cache_size = context_cache_size
        self._minting: dict[bytes, asyncio.Future[bytes]] = {}
        self.minted = 0
        #: leaf look-ups (one per intercepted connection); hit rate = 1 - minted / lookups
        self.lookups = 0

    async def context_for(self, request: LeafRequest, upstream_fingerprint: str) -> SSL.Context:
        """A Context presenting a leaf for ``request``: from this worker's contexts, else the
        shared cache, else minted (concurrent misses for one key in this worker wait for one
        mint; across workers the signer coalesces them)."""
        self.lookups += 1
        key = cache_key(request, upstream_fingerprint)
        ctx = self._contexts.get(key)
        if ctx is not None:
            self._contexts.move_to_end(key)
            return ctx
        der = self._cache.get(key)
        if der is None:
            pending = self._minting.get(key)
            if pending is not None:
                der = await asyncio.shield(pending)
            else:
                future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
                self._minting[key] = future
                try:
                    der = await self._minter.mint(request, key)
                    self.minted += 1
                    future.set_result(der)
                except BaseException as exc:
                    future.set_exception(exc)
                    future.exception()  # retrieved: waiters re-raise it, nobody leaks it
                    raise
                finally:
                    del self._minting[key]
        ctx = self._contexts.get(key) or self._build(x509.load_der_x509_certificate(der))
        self._contexts[key] = ctx
        self._contexts.move_to_end(key)
        while len(self._contexts) > self._context_cache_size:
            self._contexts.popitem(last=False)
        return ctx

    def _build(self, leaf: x509.Certificate) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_cipher_list(CLIENT_TLS12_CIPHERS)
        ctx.set_options(
            SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE
        )
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        ctx.use_certificate(leaf)
        ctx.use_privatekey(self._leaf_key)
        for cert in self._chain:
            ctx.add_extra_chain_cert(cert)
        ctx.set_alpn_select_callback(_select_alpn)  # type: ignore[arg-type]
        ctx.set_session_id(b"tlsgate")
        return ctx


def chain_to_send(
    ca_cert: x509.Certificate, ca_chain: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """Certificates sent after the leaf: nothing for our own self-signed root (clients hold
    it as their anchor); the CA and its chain up to the root for an imported intermediate."""
    if ca_cert.issuer == ca_cert.subject and not ca_chain:
        return []
    return [ca_cert, *ca_chain]
