"""The suite's counting subscriber against a real Unix socket: what it counts as received
must add up with the hub's ``produced`` (every source's events, the supervisor's included)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import msgpack

from tlsgate.loadtest.subscriber import CountingSubscriber, Counts


def event(type_: str, worker: int, **fields: object) -> bytes:
    data: bytes = msgpack.packb({"type": type_, "worker": worker, "seq": 0, **fields})
    return data


def test_supervisor_events_count_as_received_and_http_events_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "events.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    sub = CountingSubscriber(path)
    try:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(
                event("hello", -1)  # the hub's own: not produced by a source
                + event("http", 0)
                + event("http", 1)
                + event("conn_close", 0, client_resumed=True, upstream_resumed=False)
                + event("signer_restart", -2)  # the supervisor is one of the hub's sources
                + event("gap", -1, dropped=3)
            )
            deadline = time.monotonic() + 10
            while sub.counts().received < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
        assert sub.counts() == Counts(
            received=4, gaps=3, closes=1, client_resumed=1, upstream_resumed=0, http=2,
            supervisor=1,
        )  # fmt: skip
        assert sub.supervisor_types() == {"signer_restart": 1}
    finally:
        sub.close()
        listener.close()
