"""The signer process: the only process of the gateway that holds the CA private key.

Rules:

- The supervisor starts it with the ``multiprocess`` *spawn* method (like the workers): it
  inherits nothing but its :class:`SignerSpec` (paths, the CA passphrase if any, the leaf
  *public* key, a pipe to report on, a shared array for its counters).
- It reads the CA itself (:func:`~tlsgate.supervisor.ca.ensure_ca` on the gateway's first
  start, which may create it; :func:`~tlsgate.supervisor.ca.load_ca` otherwise), opens the
  shared certificate cache as a writer *without* emptying it, and runs the
  :class:`~tlsgate.supervisor.signer_service.SignerServer` (same Unix-socket protocol as
  before) on its own socket path. Then it reports ``{"ok": True, ...}`` on its pipe with
  what the supervisor needs to know about the CA — certificate path, fingerprint, the
  chain the workers send — and never the key. A failure to start is reported as
  ``{"ok": False, "error": ...}`` and the process exits with :data:`EXIT_BOOT_FAILURE`.
- A restart (``expect_fingerprint`` set) must find the CA the gateway serves: a CA
  changed on disk is a boot failure that says to run ``tlsgate reload``, so that workers
  never present one CA's chain with another CA's leaves.
- It stays root: the key file is root-only, and becoming the workers' user would let a
  compromised worker (same uid) read its memory. It ignores SIGINT (the supervisor stops
  it in order), stops on SIGTERM or when the supervisor is gone (killed), and exits with
  :data:`EXIT_SERVICE_FAILED` if its service thread dies, so that the supervisor restarts
  it.
- Every :data:`STATS_INTERVAL` it publishes its counters (:data:`STATS_FIELDS`) to the
  shared array; the supervisor shows them in ``tlsgate status``. ``beat`` is the time of
  the service thread's last round (at least one a second): a signer that is alive but no
  longer serving (stopped, or its thread stuck) stops beating, and the supervisor kills and
  restarts it (:data:`tlsgate.supervisor.signer_keeper.HEARTBEAT_TIMEOUT`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

EXIT_BOOT_FAILURE: Final = 3
EXIT_SERVICE_FAILED: Final = 4
#: Seconds between two publications of the counters (and checks of the service thread).
STATS_INTERVAL: Final = 0.5
STATS_FIELDS: Final = ("beat", "requests", "signed", "coalesced", "rejected", "dropped",
                       "connections")  # fmt: skip


@dataclass
class SignerSpec:
    """Everything the signer process needs, picklable for the spawn start method."""

    state_dir: Path
    passphrase: bytes | None
    #: First start of the gateway: create the CA if there is none yet.
    create_ca: bool
    #: A restart: the CA on disk must still be this one (SHA-256 fingerprint).
    expect_fingerprint: str | None
    socket_path: Path
    cache_path: Path
    leaf_public_pem: bytes
    report: Any  # multiprocess Connection, the child's (write) end
    stats: Any  # multiprocess shared array of doubles, STATS_FIELDS


def signer_main(spec: SignerSpec) -> None:
    """Entry point of the signer process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        server, info = _boot(spec)
    except Exception as exc:  # any failure to start: report it, exit distinctly
        from tlsgate.errors import TlsgateError

        reason = str(exc) if isinstance(exc, TlsgateError) else f"{type(exc).__name__}: {exc}"
        if not _report(spec, {"ok": False, "error": reason}):  # else the supervisor says it
            print(f"tlsgate signer: cannot start: {reason}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BOOT_FAILURE)
    _report(spec, {"ok": True, **info})
    parent = os.getppid()
    try:
        while not stop.wait(STATS_INTERVAL):
            _publish(spec, server.stats(), server.last_round)
            if os.getppid() != parent:  # the supervisor died (SIGKILL): nobody to sign for
                return
            if not server.running:  # the failure was logged by the service thread
                sys.exit(EXIT_SERVICE_FAILED)
    finally:
        server.stop()


def _report(spec: SignerSpec, message: dict[str, Any]) -> bool:
    """Send ``message`` to the supervisor; False if it went away (it waits for nothing)."""
    try:
        spec.report.send(message)
    except OSError:
        return False
    finally:
        spec.report.close()
    return True


def _publish(spec: SignerSpec, stats: dict[str, int], beat: float) -> None:
    values = (beat, *(float(stats[name]) for name in STATS_FIELDS[1:]))
    for i, value in enumerate(values):
        spec.stats[i] = value


def _boot(spec: SignerSpec) -> tuple[Any, dict[str, Any]]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from tlsgate.errors import OperatorError
    from tlsgate.supervisor.ca import ensure_ca, load_ca
    from tlsgate.supervisor.signer import LeafSigner
    from tlsgate.supervisor.signer_service import SignerServer
    from tlsgate.workers.certcache import SharedCertificateCache
    from tlsgate.workers.certs import chain_to_send

    if spec.create_ca:
        ca, created = ensure_ca(spec.state_dir, spec.passphrase)
    else:
        ca, created = load_ca(spec.state_dir, spec.passphrase), False
    if spec.expect_fingerprint is not None and ca.fingerprint_sha256 != spec.expect_fingerprint:
        raise OperatorError(
            f"the CA in {spec.state_dir} changed (now {ca.fingerprint_sha256}) since the"
            f" gateway loaded {spec.expect_fingerprint}; a restarted signer must sign with the"
            " CA the workers present: run `tlsgate reload` to switch to the new CA"
        )
    leaf_public = serialization.load_pem_public_key(spec.leaf_public_pem)
    assert isinstance(leaf_public, ec.EllipticCurvePublicKey)
    spec.socket_path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    cache = SharedCertificateCache(spec.cache_path, clear=False)
    server = SignerServer(LeafSigner(ca, leaf_public), cache, spec.socket_path)
    server.start()
    pem = serialization.Encoding.PEM
    info = {
        "pid": os.getpid(),
        "cert_path": str(ca.cert_path),
        "fingerprint_sha256": ca.fingerprint_sha256,
        "chain_pem": b"".join(c.public_bytes(pem) for c in chain_to_send(ca.cert, ca.chain)),
        "created": created,
    }
    return server, info
