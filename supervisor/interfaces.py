"""The host's own addresses, read at startup: the default client allow-list and the
destinations a CONNECT may not reach come from them (:mod:`tlsgate.workers.access`)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace

from tlsgate.errors import OperatorError
from tlsgate.supervisor.config import Config
from tlsgate.workers.access import default_client_networks

IP_COMMAND_TIMEOUT = 10.0


def interface_networks() -> tuple[str, ...]:
    """Every address of every interface of this network namespace, as ``ADDR/PREFIX``."""
    try:
        result = subprocess.run(
            ["ip", "-j", "addr", "show"], capture_output=True, check=True,
            timeout=IP_COMMAND_TIMEOUT,
        )  # fmt: skip
        links = json.loads(result.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise OperatorError(
            f"cannot list this host's addresses with `ip -j addr show` ({exc}); install "
            "iproute2, or set [access] allow_clients explicitly"
        ) from None
    out: list[str] = []
    for link in links:
        for info in link.get("addr_info", []):
            if "local" in info and "prefixlen" in info:
                out.append(f"{info['local']}/{info['prefixlen']}")
    return tuple(out)


def resolve_access(config: Config, networks: tuple[str, ...] | None = None) -> Config:
    """``config`` with its own addresses and, if none was configured, the default allow-list:
    explicit mode, loopback plus the private networks of the host's interfaces; transparent
    mode, ``intercept_from`` when given (the clients whose traffic is steered here), else the
    same default."""
    if networks is None:
        networks = interface_networks()
    own = tuple(n.split("/", 1)[0] for n in networks)
    allow = config.allow_clients
    if allow is None:
        if config.mode == "transparent" and config.intercept_from:
            allow = ("127.0.0.0/8", "::1/128", *config.intercept_from)
        else:
            allow = default_client_networks(networks)
    return replace(config, allow_clients=allow, own_addresses=own)


def access_summary(config: Config) -> str:
    """One startup line: who may connect, and a warning for a listener on every address."""
    host = config.listen[0]
    where = ""
    if host in ("0.0.0.0", "::"):
        where = (
            f" warning: listening on every address ({host}); prefer an internal address "
            "with --listen ADDR:PORT."
        )
    allowed = ", ".join(config.allow_clients or ())
    return f"clients allowed: {allowed} (others are refused at accept and counted).{where}"
