"""A bounded load of real HTTPS-through-CONNECT clients (Python ssl), for lifecycle tests.

``run_load(proxy, origin_port, cafile, total, concurrency)`` opens ``total`` connections,
each a full TLS handshake through the gateway and one GET, with ``concurrency`` threads, and
returns the failures (with their errors). Bounded in count and time; no sleeps.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    #: time.monotonic() at which each failure was seen, in the order of ``failures``
    failure_times: list[float] = field(default_factory=list)


def one_request(proxy: tuple[str, int], origin_port: int, ctx: ssl.SSLContext, path: str) -> None:
    with socket.create_connection(proxy, timeout=30) as sock:
        sock.sendall(
            f"CONNECT localhost:{origin_port} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise OSError("proxy closed before answering CONNECT")
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            raise OSError(head.split(b"\r\n", 1)[0].decode())
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(
                f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
            )
            answer = b""
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                answer += chunk
        if not answer.startswith(b"HTTP/1.1 200") or f"hello from {path}".encode() not in answer:
            raise OSError(f"bad answer: {answer[:80]!r}")


def run_load(
    proxy: tuple[str, int], origin_port: int, cafile: str, total: int, concurrency: int = 16
) -> LoadResult:
    ctx = ssl.create_default_context(cafile=cafile)
    result = LoadResult()
    lock = threading.Lock()
    counter = iter(range(total))

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                one_request(proxy, origin_port, ctx, f"/load/{i}")
            except (OSError, ssl.SSLError) as exc:
                with lock:
                    result.failures.append(f"{i}: {exc!r}")
                    result.failure_times.append(time.monotonic())
            else:
                with lock:
                    result.ok += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return result
