"""A signer service whose thread died is replaced: minting resumes on the same socket path,
and a worker's request to the dead one fails at once instead of hanging."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tlsgate.supervisor.ca import LoadedCA, init_ca
from tlsgate.supervisor.signer import LeafRequest, LeafSigner, generate_leaf_key
from tlsgate.supervisor.signer_keeper import revive
from tlsgate.supervisor.signer_service import SignerClient, SignerServer, SignerUnavailable
from tlsgate.workers.certcache import SharedCertificateCache
from tlsgate.workers.certs import cache_key

FINGERPRINT = "ab" * 32
TIMEOUT = 10.0
OLD_CLIENT_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LoadedCA:
    return init_ca(tmp_path_factory.mktemp("ca") / "state", "ecdsa-p256")


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[SharedCertificateCache]:
    with SharedCertificateCache(tmp_path / "certcache") as cache:
        yield cache


def request(name: str) -> tuple[LeafRequest, bytes]:
    not_after = datetime.now(UTC) + timedelta(days=30)
    req = LeafRequest(dns_names=(name,), ip_addresses=(), not_after=not_after)
    return req, cache_key(req, FINGERPRINT)


def crash(server: SignerServer) -> None:
    """Break the service thread's event loop under it (its selector closed): the thread
    fails the way an unexpected error in it would."""
    assert server._selector is not None
    server._selector.close()
    deadline = time.monotonic() + TIMEOUT
    while server.running:
        assert time.monotonic() < deadline, "the signer thread survived"
        server._wake()
        time.sleep(0.01)


def test_a_running_signer_is_left_alone(
    ca: LoadedCA, cache: SharedCertificateCache, tmp_path: Path
) -> None:
    server = SignerServer(LeafSigner(ca, generate_leaf_key()), cache, tmp_path / "s.sock")
    server.start()
    try:
        assert revive(server) is None and server.running
    finally:
        server.stop()


def test_a_dead_signer_is_replaced_and_minting_resumes_while_old_clients_fail_in_time(
    ca: LoadedCA, cache: SharedCertificateCache, tmp_path: Path
) -> None:
    path = tmp_path / "signer.sock"
    server = SignerServer(LeafSigner(ca, generate_leaf_key()), cache, path, socket_mode=0o600)
    server.start()

    async def before_and_after() -> tuple[bytes, float, bytes]:
        old = SignerClient(path, timeout=OLD_CLIENT_TIMEOUT)
        first = await old.sign(*request("before.example"))
        crash(server)
        started = time.monotonic()
        with pytest.raises(SignerUnavailable):
            # the old connection is gone and no service listens yet: refused within the
            # client's timeout (a worker that dropped root cannot even retry by path, and
            # fails at once with a permission error)
            await old.sign(*request("during.example"))
        failed_after = time.monotonic() - started
        old.close()
        result = revive(server)
        assert result is not None
        new_server, reason = result
        try:
            assert new_server.running and reason.startswith(("ValueError", "OSError"))
            fresh = SignerClient(path, timeout=TIMEOUT)
            try:
                after = await fresh.sign(*request("after.example"))
            finally:
                fresh.close()
        finally:
            new_server.stop()
        assert new_server.failure is None
        return first, failed_after, after

    first, failed_after, after = asyncio.run(asyncio.wait_for(before_and_after(), 3 * TIMEOUT))
    assert first and after
    assert failed_after < OLD_CLIENT_TIMEOUT + 1
    assert server.failure is not None
