"""Transparent mode's own firewall rules: an nftables table of ours, and its policy route.

``tlsgate run --mode transparent --intercept-ports 443[,...] [--intercept-from CIDR ...]``
installs, in the gateway's network namespace:

- table ``inet tlsgate``: forwarded TCP to the intercepted ports (optionally only from the
  given client networks) is TPROXY-ed to the workers' port and marked;
- ``ip rule fwmark MARK lookup TABLE`` + ``ip route local 0.0.0.0/0 dev lo table TABLE``, so
  marked packets are delivered locally (to the ``IP_TRANSPARENT`` listeners).

It refuses to start when the table already exists (another gateway, or a crash left it:
the message says how to remove it), and removes everything on every exit path. Traffic the
gateway itself originates (its upstream connections) never passes PREROUTING, so it is not
intercepted again. IPv4 only for now.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Sequence

from tlsgate.errors import ConfigError, OperatorError

TABLE = "tlsgate"
FWMARK = 0x7467  # "tg"
ROUTE_TABLE = 7467


def ruleset(listen_port: int, ports: Sequence[int], sources: Sequence[str]) -> str:
    """The nftables ruleset text (pure; tested without nft)."""
    if not ports:
        raise ConfigError("--intercept-ports needs at least one port, e.g. --intercept-ports 443")
    port_set = ", ".join(str(p) for p in sorted(set(ports)))
    match = f"tcp dport {{ {port_set} }}"
    if sources:
        nets = ", ".join(str(ipaddress.ip_network(s, strict=False)) for s in sources)
        match = f"ip saddr {{ {nets} }} " + match
    return (
        f"table inet {TABLE} {{\n"
        "  chain prerouting {\n"
        "    type filter hook prerouting priority mangle; policy accept;\n"
        "    fib daddr type local return\n"
        f"    meta nfproto ipv4 {match} tproxy ip to :{listen_port} "
        f"meta mark set {FWMARK:#x} accept\n"
        "  }\n"
        "}\n"
    )


def parse_ports(text: str) -> tuple[int, ...]:
    ports = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or not 0 < int(part) < 65536:
            raise ConfigError(f"--intercept-ports {text!r}: {part!r} is not a port (1-65535)")
        ports.append(int(part))
    return tuple(ports)


def _run(argv: list[str], what: str, stdin: str | None = None) -> None:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise OperatorError(f"{what}: {result.stderr.strip() or 'failed'}")


class TransparentRules:
    """Install on enter (or ``install()``), remove on exit (``remove()`` is idempotent)."""

    def __init__(self, listen_port: int, ports: Sequence[int], sources: Sequence[str]) -> None:
        self.text = ruleset(listen_port, ports, sources)
        self.installed: list[str] = []

    def install(self) -> None:
        if shutil.which("nft") is None:
            raise OperatorError("--intercept-ports needs nftables: apt-get install nftables")
        exists = subprocess.run(["nft", "list", "table", "inet", TABLE], capture_output=True,
                                timeout=30)  # fmt: skip
        if exists.returncode == 0:
            raise OperatorError(
                f"the nftables table inet {TABLE} already exists (another tlsgate is running, "
                f"or one was killed); if none is running remove it: nft delete table inet {TABLE}"
            )
        try:
            _run(["nft", "-f", "-"], f"install nftables table inet {TABLE}", self.text)
            self.installed.append("table")
            _run(["ip", "rule", "add", "fwmark", str(FWMARK), "lookup", str(ROUTE_TABLE)],
                 "add the policy-routing rule for intercepted traffic")  # fmt: skip
            self.installed.append("rule")
            _run(["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table",
                  str(ROUTE_TABLE)], "add the local route for intercepted traffic")  # fmt: skip
            self.installed.append("route")
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for item in reversed(self.installed):
            argv = {
                "route": ["ip", "route", "del", "local", "0.0.0.0/0", "dev", "lo", "table",
                          str(ROUTE_TABLE)],
                "rule": ["ip", "rule", "del", "fwmark", str(FWMARK), "lookup", str(ROUTE_TABLE)],
                "table": ["nft", "delete", "table", "inet", TABLE],
            }[item]  # fmt: skip
            subprocess.run(argv, capture_output=True, timeout=30)
        self.installed.clear()
