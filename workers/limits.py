"""What one connection may cost, and the socket option that bounds the kernel's share.

Memory of one intercepted connection, by construction (``[limits]`` in the config):

- before TLS: one peek of at most ``MAX_PEEK`` (64 KiB) for the CONNECT request (refused
  beyond ``max_connect_header_bytes``) or the ClientHello
  (:mod:`tlsgate.workers.intercept`), within ``header_timeout``;
- relaying: at most one pending read (16 KiB of TLS plaintext, 64 KiB spliced) per
  direction, since a pipe stops reading while its destination is blocked
  (:mod:`tlsgate.workers.relay`), plus
  OpenSSL's record buffers (released when idle: ``MODE_RELEASE_BUFFERS``);
- inspecting HTTP/1.x and HTTP/2: no body bytes at all (counted as they stream), and at
  most ``max_header_bytes`` of one header section per direction
  (:class:`~tlsgate.workers.http1.Http1Inspector`, :mod:`tlsgate.workers.http2`), of which
  only the recorded header values are kept (checked end to end by
  ``tests/workers/test_limits_memory.py``: 50 MB each way leave a worker's peak RSS flat);
- in the kernel: the receive and send buffers of the client and upstream sockets, bounded
  by ``socket_buffer`` when set (else by ``net.ipv4.tcp_rmem``/``tcp_wmem``' maxima).

With ``max_connections`` per worker (and ``max_connections_per_client`` per client address
across all workers, :mod:`tlsgate.workers.clientcounts`) this bounds a worker's memory
whatever its peers send.
"""

from __future__ import annotations

import socket


def set_socket_buffers(sock: socket.socket, size: int) -> None:
    """Bound a socket's kernel buffers (``limits.socket_buffer``; 0 leaves autotuning on)."""
    if size:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
