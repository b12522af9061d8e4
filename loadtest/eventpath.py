"""How many events per second the detection path sustains.

    python -m tlsgate.loadtest events [--subscribers 1] [--seconds 5] [--producers 2] [--remote]

The real path, in real processes: ``--producers`` worker-like processes emit 25-field
``http``-shaped events as fast as they can through their :class:`EventEmitter` → bounded queue
→ :class:`PipeForwarder` → socketpair → the hub process's :class:`PipeSource` →
:class:`EventHub` → the detection socket → ``--subscribers`` subscriber processes that decode
everything with msgpack. With ``--remote`` the subscribers connect over TCP with mutual TLS
instead (loopback, certificates of a throw-away events CA), as remote IDS hosts do. It reports
events produced, delivered to each subscriber, and lost (with where), per second, and the hub
process's CPU time.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import multiprocess  # type: ignore[import-untyped]

FIELDS: dict[str, Any] = {
    "conn": "0-123456", "client_ip": "198.18.0.10", "client_port": 51234,
    "server_ip": "198.18.1.20", "server_port": 443, "sni": "www.example.com",
    "method": "GET", "host": "www.example.com", "path": "/index.html?q=1",
    "http_version": "1.1", "status": 200,
    "request_headers": [["host", "www.example.com"], ["user-agent", "curl/7.88.1"]],
    "response_headers": [["content-type", "text/html"], ["set-cookie", "[redacted]"]],
    "request_body_bytes": 0, "response_body_bytes": 1024, "content_type": "text/html",
    "request_content_type": None, "user_agent": "curl/7.88.1", "complete": True,
    "upgrade": None,
}  # fmt: skip


def _producer(worker_id: int, sock: socket.socket, seconds: float, out: Any) -> None:
    from tlsgate.workers.eventpipe import PipeForwarder
    from tlsgate.workers.events import HTTP, EventEmitter, EventQueue

    queue = EventQueue()
    emitter = EventEmitter(worker_id, queue)
    forwarder = PipeForwarder(queue, sock)
    forwarder.start()
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        for _ in range(256):
            emitter.emit(HTTP, FIELDS)
        n += 256
    emitter.flush_gap()
    forwarder.stop(timeout=10)
    out.put((worker_id, n, queue.dropped))


def _subscriber(path: str, seconds: float, out: Any, remote: Any = None) -> None:
    if remote is None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
    else:
        from tlsgate.supervisor.mtls import client_context

        address, (cert, key, ca) = remote
        context = client_context(Path(ca), Path(cert), Path(key))
        sock = context.wrap_socket(socket.create_connection(address), server_hostname=address[0])
    sock.settimeout(1.0)
    unpacker = msgpack.Unpacker(raw=False)
    received = dropped = 0
    end = time.monotonic() + seconds + 60  # reads until the hub closes the stream
    while time.monotonic() < end:
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            continue
        if not data:
            break
        unpacker.feed(data)
        for event in unpacker:
            if event["type"] == "gap":
                dropped += event["dropped"]
            elif event["worker"] >= 0:
                received += 1
    out.put((received, dropped))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tlsgate loadtest events",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--subscribers", type=int, default=1)
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--remote", action="store_true",
                        help="subscribers over TCP with mutual TLS (loopback)")  # fmt: skip
    args = parser.parse_args(argv)

    from tlsgate.supervisor.eventhub import EventHub
    from tlsgate.workers.eventpipe import PipeSource

    mp = multiprocess.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="tlsgate-events-") as tmp:
        path = Path(tmp) / "events.sock"
        remote_listener, bundles = _remote_setup(Path(tmp), args.subscribers) if args.remote \
            else (None, [])  # fmt: skip
        hub = EventHub(path, gateway_id="loadtest", remote=remote_listener)
        hub.start()
        cpu_start = time.process_time()
        results = mp.Queue()
        remotes: list[Any] = [(hub.remote_address, b) for b in bundles]
        remotes = remotes or [None] * args.subscribers
        subs = [mp.Process(target=_subscriber, args=(str(path), args.seconds, results, remote))
                for remote in remotes]  # fmt: skip
        for p in subs:
            p.start()
        _wait(lambda: hub.stats()["subscribers"] == len(subs), 30)  # before the first event
        producers = []
        produced_q = mp.Queue()
        for k in range(args.producers):
            mine, theirs = socket.socketpair()
            source = PipeSource(mine)
            source.start()
            hub.add_source(source)
            p = mp.Process(target=_producer, args=(k, theirs, args.seconds, produced_q))
            p.start()
            theirs.close()
            producers.append(p)
        produced = [produced_q.get(timeout=args.seconds + 30) for _ in producers]
        for p in producers:
            p.join()
        # what is buffered for the subscribers is theirs to take before the hub stops
        total_produced = sum(n for _, n, _ in produced)
        _wait(lambda: hub.stats()["produced"] >= total_produced
              and not any(s["buffered_bytes"] for s in hub.stats()["per_subscriber"]),
              30)  # fmt: skip
        cpu = time.process_time() - cpu_start
        hub.stop()
        delivered = [results.get(timeout=args.seconds + 70) for _ in subs]
        for p in subs:
            p.join(10)
    total = sum(n for _, n, _ in produced)
    worker_drops = sum(d for _, _, d in produced)
    secs = args.seconds
    kind = "remote (mutual TLS)" if args.remote else "local"
    print(f"{args.producers} producers, {args.subscribers} {kind} subscriber(s), {secs:.0f} s;"
          f" hub process CPU {cpu:.1f} s")  # fmt: skip
    print(f"produced {total} events ({total / secs:,.0f}/s); dropped in worker queues "
          f"{worker_drops} (reported as gap events)")  # fmt: skip
    for i, (received, dropped) in enumerate(delivered):
        print(f"subscriber {i}: received {received} ({received / secs:,.0f}/s), "
              f"missed {dropped} (gap events)")  # fmt: skip
    return 0


def _wait(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def _remote_setup(tmp: Path, subscribers: int) -> tuple[Any, list[tuple[str, str, str]]]:
    """A throw-away events CA, a server certificate and one subscriber bundle each."""
    from tlsgate.supervisor import mtls
    from tlsgate.supervisor.eventhub import RemoteListener
    from tlsgate.supervisor.events_ca import (
        ROLE_SUBSCRIBER,
        ensure_server_certificate,
        init_events_ca,
        issue_client,
        write_client_bundle,
    )

    state = tmp / "state"
    ca = init_events_ca(state)
    cert, key, _ = ensure_server_certificate(state, "127.0.0.1")
    check = mtls.ClientCheck(ROLE_SUBSCRIBER)
    listener = RemoteListener(("127.0.0.1", 0), mtls.server_context(ca.cert_path, cert, key,
                                                                     check), check)  # fmt: skip
    bundles = []
    for k in range(subscribers):
        c, k_, ca_cert = issue_client(state, f"loadtest-{k}")
        paths = write_client_bundle(tmp / f"sub{k}", c, k_, ca_cert)
        bundles.append((str(paths[0]), str(paths[1]), str(paths[2])))
    return listener, bundles


if __name__ == "__main__":
    sys.exit(main())
