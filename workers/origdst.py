"""Where a transparently intercepted client was really going.

- nftables/iptables TPROXY keeps the original destination as the accepted socket's local
  address (``getsockname()``); listeners need ``IP_TRANSPARENT``.
- REDIRECT/DNAT rewrites it; conntrack remembers it (``SO_ORIGINAL_DST``).
``original_destination`` asks conntrack first and falls back to the local address, so one
worker serves either kind of rule.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
SOL_IPV6 = 41


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """The (address, port) the client connected to before our rules redirected it."""
    if sock.family == socket.AF_INET:
        try:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOPROTOOPT):
                raise
        else:
            port, packed = struct.unpack_from("!2xH4s", raw)
            return socket.inet_ntop(socket.AF_INET, packed), port
    elif sock.family == socket.AF_INET6:
        try:
            raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOPROTOOPT):
                raise
        else:
            port, packed = struct.unpack_from("!2xH4x16s", raw)
            return socket.inet_ntop(socket.AF_INET6, packed), port
    host, port = sock.getsockname()[:2]
    return _unmap(host), port


def _unmap(host: str) -> str:
    addr = ipaddress.ip_address(host)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return host
