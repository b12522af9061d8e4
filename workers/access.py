"""Who may use the gateway and where a CONNECT may lead: sans-I/O access decisions.

Rules:
- A client is served only if its address lies in the allow-list (CIDRs). The worker asks
  :meth:`AccessPolicy.client_allowed` right after ``accept()``, before a byte is read or any
  TLS work is done; a refused client is closed at once and counted.
- The default allow-list (:func:`default_client_networks`) is loopback plus those private
  networks (RFC 1918, RFC 6598 shared space 100.64.0.0/10, ULA fc00::/7) that the host's own
  interfaces are on: a gateway whose interfaces are 10.1.2.3/24 and 192.0.2.7/24 (public)
  serves 127.0.0.0/8, ::1 and 10.1.2.0/24, and refuses the Internet.
- Refusals are never reported one event per connection (a scan would flood the detection
  stream): :class:`SourceTally` counts per source address, bounded, and the worker reports
  the tally once per sweep.
- Explicit mode: a CONNECT whose resolved address is the gateway itself (loopback, any of
  its own addresses), link-local (169.254.0.0/16 with the cloud metadata services,
  fe80::/10), unspecified, multicast or broadcast is refused with 403
  (:meth:`AccessPolicy.destination_refusal`) unless the operator allowed that destination
  network explicitly (``allow_destinations``). IPv4-mapped IPv6 addresses are judged as the
  IPv4 address they carry.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from tlsgate.errors import ConfigError

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

LOOPBACK_NETWORKS: Final = ("127.0.0.0/8", "::1/128")
#: Private ranges a host may sit on; the default allow-list keeps those of the host's own.
PRIVATE_NETWORKS: Final = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)
#: Destinations a CONNECT may never reach unless allowed (with the reason reported).
FORBIDDEN_DESTINATIONS: Final = tuple(
    (ipaddress.ip_network(n), why)
    for n, why in (
        ("127.0.0.0/8", "loopback"),
        ("::1/128", "loopback"),
        ("0.0.0.0/8", "unspecified"),
        ("::/128", "unspecified"),
        ("169.254.0.0/16", "link-local (cloud metadata)"),
        ("fe80::/10", "link-local"),
        ("fd00:ec2::254/128", "cloud metadata"),
        ("224.0.0.0/4", "multicast"),
        ("ff00::/8", "multicast"),
        ("255.255.255.255/32", "broadcast"),
    )
)
#: Distinct refused sources remembered between two reports; more are counted together.
MAX_TRACKED_SOURCES: Final = 4096
#: Sources named in one report (the most frequent); the rest are summed.
MAX_REPORTED_SOURCES: Final = 32


def parse_networks(values: Iterable[str], setting: str) -> tuple[Network, ...]:
    """CIDRs (or bare addresses) → networks; a bad one is a ConfigError naming ``setting``."""
    out: list[Network] = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ConfigError(
                f"{setting}: {value!r} is not a network; use CIDR notation such as "
                "10.0.0.0/8 or fd00::/8"
            ) from None
    return tuple(out)


def _address(text: str) -> Address:
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def default_client_networks(interface_networks: Iterable[str]) -> tuple[str, ...]:
    """Loopback plus the private networks among the host's interface networks
    (``"10.1.2.3/24"`` style, as ``ip addr`` shows them)."""
    chosen: list[str] = list(LOOPBACK_NETWORKS)
    for text in interface_networks:
        net = ipaddress.ip_interface(text.split("%", 1)[0]).network
        if net.is_loopback:
            continue
        if any(net.version == p.version and net.subnet_of(p) for p in PRIVATE_NETWORKS):  # type: ignore[arg-type]
            if str(net) not in chosen:
                chosen.append(str(net))
    return tuple(chosen)


@dataclass(frozen=True)
class AccessPolicy:
    """The compiled allow-lists of one configuration."""

    clients: tuple[Network, ...]
    allowed_destinations: tuple[Network, ...] = ()
    #: The gateway's own addresses: a CONNECT to them would reach its local services.
    own_addresses: frozenset[Address] = field(default_factory=frozenset)

    @classmethod
    def build(
        cls,
        clients: Iterable[str],
        allowed_destinations: Iterable[str] = (),
        own_addresses: Iterable[str] = (),
    ) -> AccessPolicy:
        return cls(
            clients=parse_networks(clients, "access.allow_clients"),
            allowed_destinations=parse_networks(allowed_destinations, "access.allow_destinations"),
            own_addresses=frozenset(_address(a) for a in own_addresses),
        )

    def client_allowed(self, ip: str) -> bool:
        try:
            address = _address(ip)
        except ValueError:
            return False  # not an IP address (e.g. a Unix peer): fail closed
        return any(address in net for net in self.clients)

    def destination_refusal(self, ip: str) -> str | None:
        """Why a CONNECT may not reach ``ip`` (None: it may)."""
        try:
            address = _address(ip)
        except ValueError:
            return "not an IP address"
        if any(address in net for net in self.allowed_destinations):
            return None
        for net, why in FORBIDDEN_DESTINATIONS:
            if address in net:
                return why
        if address in self.own_addresses:
            return "the gateway's own address"
        return None


@dataclass
class SourceTally:
    """Refusals per source address since the last :meth:`take`, with bounded memory."""

    counts: dict[str, int] = field(default_factory=dict)
    #: Refusals from sources beyond :data:`MAX_TRACKED_SOURCES`.
    untracked: int = 0
    total: int = 0

    def add(self, ip: str) -> None:
        self.total += 1
        counts = self.counts
        if ip in counts:
            counts[ip] += 1
        elif len(counts) < MAX_TRACKED_SOURCES:
            counts[ip] = 1
        else:
            self.untracked += 1

    def take(self) -> dict[str, object] | None:
        """The report since the last call (None if nothing was refused), then reset."""
        if not self.total:
            return None
        ranked = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        top = ranked[:MAX_REPORTED_SOURCES]
        report: dict[str, object] = {
            "refused": self.total,
            "sources": [{"client_ip": ip, "count": n} for ip, n in top],
            "distinct_sources": len(self.counts),
            #: refusals from sources not named in ``sources`` (beyond the top ones or untracked)
            "other_sources_count": self.total - sum(n for _, n in top),
        }
        self.counts = {}
        self.untracked = 0
        self.total = 0
        return report
