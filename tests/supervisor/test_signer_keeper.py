"""The signer is a process of its own, kept alive by the supervisor's SignerKeeper: killed,
it is restarted on a new socket path and minting resumes; a request to the dead one fails
within the client's timeout; a CA that cannot be loaded stops a restart loop (with the
reason) or fails a reload while the old signer keeps serving.

Real processes (spawn), as the supervisor runs them; the gateway-level fault test is
tests/faults/test_signer_fault.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import multiprocess  # type: ignore[import-untyped]
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tlsgate.errors import OperatorError
from tlsgate.paths import ca_key_path
from tlsgate.supervisor.arbiter import BootFailure
from tlsgate.supervisor.ca import init_ca
from tlsgate.supervisor.signer import LeafRequest, generate_leaf_key
from tlsgate.supervisor.signer_keeper import SignerKeeper, SignerRestart
from tlsgate.supervisor.signer_service import SignerClient, SignerUnavailable
from tlsgate.workers.certcache import SharedCertificateCache
from tlsgate.workers.certs import cache_key

FINGERPRINT = "ab" * 32
TIMEOUT = 10.0
OLD_CLIENT_TIMEOUT = 1.0
RESTART_TIMEOUT = 60.0  # spawn + imports on a busy 2-core machine


@pytest.fixture
def keeper(tmp_path: Path) -> Iterator[SignerKeeper]:
    state = tmp_path / "state"
    init_ca(state, "ecdsa-p256")
    public = (
        generate_leaf_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    logs: list[str] = []
    k = SignerKeeper(multiprocess.get_context("spawn"), state, None, state / "run", public,
                     logs.append)  # fmt: skip
    k.logs = logs  # type: ignore[attr-defined]
    try:
        yield k
    finally:
        k.stop()


def request(name: str) -> tuple[LeafRequest, bytes]:
    not_after = datetime.now(UTC) + timedelta(days=30)
    req = LeafRequest(dns_names=(name,), ip_addresses=(), not_after=not_after)
    return req, cache_key(req, FINGERPRINT)


def mint(path: Path, name: str, timeout: float = TIMEOUT) -> bytes:
    client = SignerClient(path, timeout=timeout)
    try:
        return client.sign_blocking(*request(name))
    finally:
        client.close()


def tick_until_restarted(keeper: SignerKeeper) -> SignerRestart:
    deadline = time.monotonic() + RESTART_TIMEOUT
    while True:
        restart = keeper.tick()
        if restart is not None:
            return restart
        assert time.monotonic() < deadline, "the signer was not restarted"
        time.sleep(0.05)


def test_the_signer_runs_in_its_own_process_and_reports_its_ca_without_the_key(
    keeper: SignerKeeper,
) -> None:
    info = keeper.start(create_ca=True)
    assert keeper.pid == info.pid != os.getpid()
    assert not hasattr(info, "key")
    leaf = x509.load_der_x509_certificate(mint(keeper.socket_path, "one.example"))
    ca = x509.load_pem_x509_certificate(info.cert_path.read_bytes())
    assert leaf.issuer == ca.subject
    assert info.chain_pem == b""  # a self-signed root is not sent to clients
    assert keeper.tick() is None  # a running signer is left alone
    assert keeper.status()["alive"] and keeper.stats()["signed"] >= 0


def test_a_killed_signer_is_restarted_on_a_new_path_and_minting_resumes(
    keeper: SignerKeeper,
) -> None:
    keeper.start(create_ca=True)
    old_path, old_pid = keeper.socket_path, keeper.pid
    assert old_pid is not None
    first = mint(old_path, "before.example")

    async def pending_request_fails_in_time() -> float:
        client = SignerClient(old_path, timeout=OLD_CLIENT_TIMEOUT)
        try:
            await client.sign(*request("warm.example"))  # connected
            os.kill(old_pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(SignerUnavailable):
                await client.sign(*request("during.example"))
            return time.monotonic() - started
        finally:
            client.close()

    failed_after = asyncio.run(asyncio.wait_for(pending_request_fails_in_time(), 3 * TIMEOUT))
    assert failed_after < OLD_CLIENT_TIMEOUT + 1
    restart = tick_until_restarted(keeper)
    assert (restart.old_pid, restart.signal, restart.exit_code) == (old_pid, "SIGKILL", -9)
    assert restart.pid == keeper.pid != old_pid and restart.restarts == keeper.restarts == 1
    assert restart.event()["reason"] == "was killed by SIGKILL"
    assert keeper.socket_path != old_path and not old_path.exists()
    assert mint(keeper.socket_path, "after.example")
    # the restart did not empty the shared cache: what was minted is still served
    with SharedCertificateCache.open_reader(keeper.socket_path.parent / "certcache") as cache:
        assert cache.get(request("before.example")[1]) == first
    assert any("was killed by SIGKILL; restarting it" in line for line in keeper.logs)  # type: ignore[attr-defined]


def test_a_stopped_signer_is_found_by_its_heartbeat_killed_and_restarted(
    keeper: SignerKeeper,
) -> None:
    keeper.heartbeat_timeout = 2.0  # the gateway's is 10 s
    keeper.start(create_ca=True)
    old_pid = keeper.pid
    assert old_pid is not None
    time.sleep(3 * keeper.heartbeat_timeout / 2)
    assert keeper.tick() is None  # a serving signer beats: left alone
    assert 0 <= keeper.status()["heartbeat_age"] < keeper.heartbeat_timeout
    os.kill(old_pid, signal.SIGSTOP)  # alive, but answering nobody
    try:
        restart = tick_until_restarted(keeper)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old_pid, signal.SIGKILL)  # never leave a stopped process behind
    assert restart.old_pid == old_pid and restart.signal == "SIGKILL"
    assert restart.reason.startswith("was killed by SIGKILL: it stopped answering")
    assert restart.down_for >= keeper.heartbeat_timeout
    assert mint(keeper.socket_path, "after-stop.example")
    assert any("has not answered for" in line for line in keeper.logs)  # type: ignore[attr-defined]


@pytest.mark.timeout(240)
def test_a_restart_that_finds_another_ca_loops_with_backoff_then_stops_the_gateway(
    keeper: SignerKeeper,
) -> None:
    keeper.start(create_ca=True)
    init_ca(keeper._state_dir, "ecdsa-p256", force=True)  # rotated on disk, no reload yet
    assert keeper.pid is not None
    os.kill(keeper.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5 * RESTART_TIMEOUT
    with pytest.raises(BootFailure, match=r"failed to start 5 times.*tlsgate reload"):
        while time.monotonic() < deadline:
            assert keeper.tick() is None
            time.sleep(0.05)
    logs = keeper.logs  # type: ignore[attr-defined]
    assert any("restarting it in 0.2 s" in line for line in logs), logs
    assert any("restarting it in 1.6 s" in line for line in logs), logs


def test_a_reload_with_an_unusable_ca_fails_and_the_old_signer_keeps_serving(
    keeper: SignerKeeper,
) -> None:
    info = keeper.start(create_ca=True)
    ca_key_path(keeper._state_dir).chmod(0o644)
    with pytest.raises(OperatorError, match=r"cannot start with the CA on disk: .*chmod 600"):
        keeper.rotate()
    assert keeper.pid == info.pid and mint(keeper.socket_path, "still.example")
    ca_key_path(keeper._state_dir).chmod(0o600)
    new = init_ca(keeper._state_dir, "ecdsa-p256", force=True)
    rotated = keeper.rotate()
    assert rotated.fingerprint_sha256 == new.fingerprint_sha256 != info.fingerprint_sha256
    leaf = x509.load_der_x509_certificate(mint(keeper.socket_path, "new.example"))
    assert leaf.issuer == new.cert.subject
    assert keeper.pid == rotated.pid != info.pid
