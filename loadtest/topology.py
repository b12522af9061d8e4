"""Client, gateway and server network namespaces joined by veth pairs (root only).

The one place that builds this topology: the load-test suite and the tests use it::

    client ns 198.18.<n>.2 ── 198.18.<n>.1  gateway ns  198.18.<n+1>.1 ── 198.18.<n+1>.2 server ns

The gateway namespace forwards between the two links (so traffic that nothing intercepts is
routed, the "no interception" path); callers add nftables rules there (``gateway_nft``) and
run processes in any namespace with ``popen``/``run``, optionally pinned to CPUs. Names the
a namespace resolves can be set (``hosts``): ``ip netns exec`` bind-mounts
``/etc/netns/<ns>/hosts`` over ``/etc/hosts``.

Everything is removed by :meth:`Topology.close` (a context manager calls it on exit, also on
errors and ``KeyboardInterrupt``): processes started with ``popen`` by PID (never by name),
then the namespaces (which takes the veths, nft tables and routes with them), then the
``/etc/netns`` files.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

NETNS_ETC = Path("/etc/netns")


def netns_available() -> bool:
    """Root and iproute2: what building a topology needs."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, timeout=10, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"ip {' '.join(args)} failed: {done.stderr.decode(errors='replace').strip()} "
            "(network namespaces need root and iproute2)"
        )


def pinned(cpus: Iterable[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins the child (and what it execs) to ``cpus``."""
    wanted = set(cpus) if cpus is not None else set()
    if not wanted:
        return None

    def preexec() -> None:
        os.sched_setaffinity(0, wanted)

    return preexec


class Topology:
    """client ns → gateway ns → server ns; use as a context manager."""

    def __init__(self, subnet: int | None = None) -> None:
        tag = secrets.token_hex(3)
        self.client = f"tgc-{tag}"
        self.gateway = f"tgg-{tag}"
        self.server = f"tgs-{tag}"
        n = subnet if subnet is not None else 2 * secrets.randbelow(100) + 10
        if not 0 <= n <= 254:
            raise ValueError(f"subnet {n}: pick an even number 0..254 (198.18.n.0/24 and n+1)")
        self.client_ip = f"198.18.{n}.2"
        self.gateway_client_ip = f"198.18.{n}.1"
        self.gateway_server_ip = f"198.18.{n + 1}.1"
        self.server_ip = f"198.18.{n + 1}.2"
        self._procs: list[tuple[str, subprocess.Popen[Any]]] = []
        self._made: list[str] = []

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return (self.client, self.gateway, self.server)

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
        for ns in self.namespaces:
            _ip("netns", "add", ns)
            self._made.append(ns)
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

    def hosts(self, ns: str, hosts: Mapping[str, str]) -> None:
        """Names namespace ``ns`` resolves (``/etc/netns/<ns>/hosts``)."""
        etc = NETNS_ETC / ns
        etc.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost"] + [f"{ip} {name}" for name, ip in hosts.items()]
        (etc / "hosts").write_text("\n".join(lines) + "\n")

    def command(self, ns: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run in namespace ``ns`` (``ip netns exec`` execs it: same PID)."""
        return ["ip", "netns", "exec", ns, *argv]

    def run(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        timeout: float = 30,
        check: bool = True,
        input: bytes | None = None,
        cpus: Iterable[int] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.command(ns, argv), capture_output=True, timeout=timeout,
                              check=check, input=input, preexec_fn=pinned(cpus),
                              env=dict(env) if env is not None else None)  # fmt: skip

    def popen(
        self, ns: str, argv: Sequence[str], *, cpus: Iterable[int] | None = None, **kw: Any
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``ns``; :meth:`close` stops it by PID if it is still running."""
        proc = subprocess.Popen(self.command(ns, argv), preexec_fn=pinned(cpus), **kw)
        self._procs.append((ns, proc))
        return proc

    def gateway_nft(self, ruleset: str) -> None:
        self.run(self.gateway, ["nft", "-f", "-"], input=ruleset.encode())

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 10) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns the exit code."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._procs = [(ns, p) for ns, p in self._procs if p is not proc]
        return proc.returncode

    def stop_all(self, ns: str | None = None) -> None:
        """Stop the processes started in ``ns`` (all if None), the latest first."""
        for where, proc in reversed(list(self._procs)):
            if ns is None or where == ns:
                self.stop(proc)

    def close(self) -> None:
        # clients before the proxy before the server: a draining proxy waits for its clients
        for ns in (self.client, self.gateway, self.server):
            self.stop_all(ns)
        self.stop_all()
        for ns in self._made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10,
                           check=False)  # fmt: skip
        self._made.clear()
        for ns in self.namespaces:
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
