"""A worker process: what runs in each of the N children the supervisor starts.

Rules:
- It is started with the ``multiprocess`` *spawn* method: it inherits nothing but what the
  supervisor hands it (its own listening socket, its event pipe, the steering load fd), so
  it cannot keep another worker's listener alive in the reuseport group (the fd trap of
  fork, shared/notes/ebpf-on-this-machine.md) and no supervisor thread's lock.
- It never sees the CA key. It holds the one leaf key of this run and asks the supervisor's
  signer for certificates on a shared-cache miss.
- After receiving its sockets it drops root to the configured user (``worker_user``).
- Exit codes: 0 after a drain, :data:`EXIT_BOOT_FAILURE` when it cannot start at all
  (the supervisor then stops instead of respawning it forever).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

EXIT_BOOT_FAILURE = 3
HEARTBEAT_INTERVAL = 1.0


@dataclass
class WorkerSpec:
    """Everything a worker process needs, picklable for the spawn start method."""

    worker_id: int
    config: object  # tlsgate.supervisor.config.Config (kept loose to avoid import at spawn)
    listener: socket.socket
    events: socket.socket
    signer_socket: Path
    signer: socket.socket  # connected to the signer by the supervisor (path is root-only)
    cache_path: Path
    learned_path: Path
    leaf_key_pem: bytes
    chain_pem: bytes
    stats: object  # multiprocess shared array of doubles, arbiter.STATS_FIELDS
    worker_user: str | None = None
    load_fd: object | None = None  # multiprocess.reduction.DupFd of the steering load map
    #: the shared per-client connection table (multiprocess shared array of uint32, see
    #: workers/clientcounts.py), its row count, this worker's row (-1: none free) and key
    client_counts: object | None = None
    client_rows: int = 0
    client_row: int = -1
    client_key: bytes = b""


def drop_privileges(user: str | None) -> None:
    """Become ``user`` (and its group) if we are root; a no-op otherwise."""
    if user is None or os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if os.geteuid() == 0:
        raise OSError("could not drop root")


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of the child process."""
    try:
        runner = _boot(spec)
    except Exception as exc:  # a boot failure of any kind: report it and exit distinctly
        print(f"tlsgate worker {spec.worker_id}: cannot start: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BOOT_FAILURE)
    sys.exit(runner())


def _boot(spec: WorkerSpec):  # type: ignore[no-untyped-def]
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from tlsgate.supervisor.config import Config
    from tlsgate.supervisor.signer_service import SignerClient
    from tlsgate.workers.bypass import LearnedBypass
    from tlsgate.workers.certcache import SharedCertificateCache
    from tlsgate.workers.certs import ClientContexts
    from tlsgate.workers.clientcounts import ClientCounts
    from tlsgate.workers.eventpipe import PipeForwarder
    from tlsgate.workers.events import EventEmitter, EventQueue
    from tlsgate.workers.upstream import UpstreamValidator
    from tlsgate.workers.worker import Worker

    config = spec.config
    assert isinstance(config, Config)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; Ctrl-C goes to it
    key = serialization.load_pem_private_key(spec.leaf_key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    chain = x509.load_pem_x509_certificates(spec.chain_pem) if spec.chain_pem else []
    # Everything that needs a path under the root-only state directory is opened now, as
    # root: the cache file, the trust store, the signer connection (handed over by the
    # supervisor). Then root is dropped for good.
    cache = SharedCertificateCache.open_reader(spec.cache_path)
    learned = LearnedBypass.open(spec.learned_path, config.learned_bypass)
    validator = UpstreamValidator(
        ca_bundle=str(config.upstream_ca_bundle) if config.upstream_ca_bundle else None,
        session_cache_size=config.limits.upstream_sessions,
    )
    signer = SignerClient(spec.signer_socket, sock=spec.signer)
    load_fd = spec.load_fd.detach() if spec.load_fd is not None else None  # type: ignore[attr-defined]
    from tlsgate.bpf.steering import LoadPublisher  # imported as root, like everything above

    capture = None
    if config.pcap_dir is not None or config.pcap_over_ip is not None:
        from tlsgate.workers.pcap import PcapFileWriter, PcapOverIpServer, TeeSink

        sinks: list[PcapFileWriter | PcapOverIpServer] = []
        if config.pcap_dir is not None:
            sinks.append(
                PcapFileWriter(
                    config.pcap_dir,
                    prefix=f"tlsgate-w{spec.worker_id}",
                    rotate_bytes=config.pcap_rotate_bytes,
                    keep=config.pcap_keep,
                )
            )
        if config.pcap_over_ip is not None:
            host, port = config.pcap_over_ip
            sinks.append(PcapOverIpServer(host, port + spec.worker_id))  # bound while root
        capture = TeeSink(*sinks)
    drop_privileges(spec.worker_user or None)
    contexts = ClientContexts(signer, key, chain, cache)
    queue = EventQueue()
    emitter = EventEmitter(spec.worker_id, queue)
    forwarder = PipeForwarder(queue, spec.events)
    worker = Worker(spec.worker_id, config, spec.listener, validator=validator,
                    client_contexts=contexts, emitter=emitter)  # fmt: skip
    worker.learned = learned
    if spec.client_counts is not None and spec.client_row >= 0:
        worker.client_counts = ClientCounts(spec.client_counts, spec.client_rows,
                                            spec.client_row, spec.client_key)  # fmt: skip
    if capture is not None:
        capture.start()
        worker.capture = capture
    if load_fd is not None:
        # a DupFd: the BPF map fd is close-on-exec, so spawn hands it over explicitly
        worker.load_publisher = LoadPublisher(load_fd, spec.worker_id)

    def run() -> int:
        forwarder.start()
        try:
            asyncio.run(_serve(worker, spec))
        finally:
            if capture is not None:
                capture.close()
            forwarder.stop()
        return 0

    return run


async def _serve(worker: object, spec: WorkerSpec) -> None:
    from tlsgate.workers.worker import Worker

    assert isinstance(worker, Worker)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, worker.stop)
    beat = loop.create_task(_heartbeat(spec, worker))
    try:
        await worker.serve()
        worker.listener.close()  # queued connections migrate to the other workers
        await worker.drain(worker.config.limits.drain_timeout)
    finally:
        beat.cancel()


async def _heartbeat(spec: WorkerSpec, worker: object) -> None:
    """Publish liveness and counters for the supervisor (plain shared-memory writes)."""
    from tlsgate.workers.worker import Worker

    assert isinstance(worker, Worker)
    out = spec.stats
    while True:
        st = worker.stats
        values = (time.monotonic(), st.accepted, st.active, st.closed, st.refused,
                  st.protocol_errors, st.over_limit, worker.client_contexts.minted,
                  worker.client_contexts.lookups, st.access_refused,
                  st.limit_hits)  # fmt: skip
        for i, v in enumerate(values):
            out[i] = float(v)  # type: ignore[index]
        await asyncio.sleep(HEARTBEAT_INTERVAL)
