"""Real gateway topologies in network namespaces made by the test (root only).

``Topology`` builds three namespaces joined by veth pairs, addresses in 198.18.0.0/15::

    client ns 198.18.<n>.2 ── 198.18.<n>.1  gateway ns  198.18.<n+1>.1 ── 198.18.<n+1>.2 server ns

The gateway namespace forwards between the two links; tests add their own nftables rules
there (``gateway_nft``) and run processes in any namespace with ``popen``/``run``. Everything
is removed on exit: processes (by PID, never by name), then the namespaces (which takes the
veths and nft tables with them).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import pytest

#: The test networks (198.18.0.0/15) are not private ranges, so a gateway's default
#: allow-list (loopback plus the private networks of its interfaces) refuses their clients:
#: tests whose clients connect from another namespace pass this, as an operator would.
ALLOW_TEST_CLIENTS = ("--allow-client", "198.18.0.0/15")


def netns_available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


requires_netns = pytest.mark.skipif(
    not netns_available(), reason="needs root and iproute2 to create network namespaces"
)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Topology:
    """client ns → gateway ns → server ns; use as a context manager."""

    def __init__(self, subnet: int | None = None) -> None:
        tag = secrets.token_hex(3)
        self.client = f"tgc-{tag}"
        self.gateway = f"tgg-{tag}"
        self.server = f"tgs-{tag}"
        n = subnet if subnet is not None else 2 * secrets.randbelow(100) + 10
        self.client_ip = f"198.18.{n}.2"
        self.gateway_client_ip = f"198.18.{n}.1"
        self.gateway_server_ip = f"198.18.{n + 1}.1"
        self.server_ip = f"198.18.{n + 1}.2"
        self._procs: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> Topology:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _build(self) -> None:
        for ns in (self.client, self.gateway, self.server):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", "c0", "netns", self.client, "type", "veth", "peer", "name", "g1",
            "netns", self.gateway)  # fmt: skip
        _ip("link", "add", "s0", "netns", self.server, "type", "veth", "peer", "name", "g2",
            "netns", self.gateway)  # fmt: skip
        _ip("-n", self.client, "addr", "add", f"{self.client_ip}/24", "dev", "c0")
        _ip("-n", self.gateway, "addr", "add", f"{self.gateway_client_ip}/24", "dev", "g1")
        _ip("-n", self.gateway, "addr", "add", f"{self.gateway_server_ip}/24", "dev", "g2")
        _ip("-n", self.server, "addr", "add", f"{self.server_ip}/24", "dev", "s0")
        for ns, dev in ((self.client, "c0"), (self.gateway, "g1"), (self.gateway, "g2"),
                        (self.server, "s0")):  # fmt: skip
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", self.client, "route", "add", "default", "via", self.gateway_client_ip)
        _ip("-n", self.server, "route", "add", "default", "via", self.gateway_server_ip)
        self.run(self.gateway, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])

    def run(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        timeout: float = 30,
        check: bool = True,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True,
                              timeout=timeout, check=check, input=input)  # fmt: skip

    def popen(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)
        self._procs.append(proc)
        return proc

    def gateway_nft(self, ruleset: str) -> None:
        self.run(self.gateway, ["nft", "-f", "-"], input=ruleset.encode())

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        for ns in (self.client, self.gateway, self.server):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
