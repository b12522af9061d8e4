"""The interception proxies under test, each started in the topology's gateway namespace.

A :class:`Proxy` intercepts the client's TCP port 443 in the gateway namespace and relays to
the origin; ``pid`` is the process whose tree's CPU time and memory the suite reads.

- :class:`NoProxy`: nothing runs; traffic is routed (the "no interception" ceiling).
- :class:`Tlsgate`: ``tlsgate run --mode transparent --intercept-ports 443`` (its own
  nftables TPROXY table), trusting the run's test CA upstream.
- :class:`Sslsplit`: Debian's sslsplit behind an nftables REDIRECT (it reads
  ``SO_ORIGINAL_DST``). It does not validate upstream certificates.
- :class:`Mitmproxy`: ``mitmdump --mode transparent`` from a virtualenv under the cache
  directory (installed on demand with pip), trusting the run's test CA upstream.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tlsgate.loadtest.procstat import process_tree
from tlsgate.loadtest.topology import Topology

PEER_PORT = 8443
REDIRECT_RULES = """
table ip tlsgate_bench_peer {{
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "g1" tcp dport 443 redirect to :{port}
  }}
}}
"""


class ProxyError(RuntimeError):
    """A proxy could not be installed or started; the message says what to do."""


class Proxy:
    name = "none"
    intercepts = False

    def __init__(self, topo: Topology, workdir: Path, upstream_ca: Path, cpus: set[int]) -> None:
        self.topo = topo
        self.workdir = workdir
        self.upstream_ca = upstream_ca
        self.cpus = cpus
        self.proc: subprocess.Popen[Any] | None = None
        self.workers = 1
        #: ``[limits]`` settings for this start (tlsgate only)
        self.limits: dict[str, int] = {}

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, workers: int) -> None:
        self.workers = workers

    def stop(self) -> None:
        """Stop the proxy, then wait (bounded) for every process of its tree to be gone,
        killing a straggler by PID."""
        if self.proc is None:
            return
        tree = [p for p in process_tree(self.proc.pid) if p != self.proc.pid]
        self.topo.stop(self.proc, timeout=20)
        self.proc = None
        deadline = time.monotonic() + 10
        while tree and time.monotonic() < deadline:
            tree = [p for p in tree if _alive(p)]
            time.sleep(0.05)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def worker_pids(self) -> list[int]:
        """Processes that carry connections (for RSS per worker)."""
        return [self.pid] if self.pid is not None else []

    def events_socket(self) -> Path | None:
        return None

    def _spawn(self, argv: list[str], log: str) -> None:
        with (self.workdir / log).open("ab") as out:
            self.proc = self.topo.popen(
                self.topo.gateway, argv, cpus=self.cpus, stdout=out, stderr=subprocess.STDOUT
            )

    def _wait_listening(self, port: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            out = self.topo.run(
                self.topo.gateway, ["ss", "-Hltn", f"sport = :{port}"], check=False
            ).stdout
            if out.strip():
                return
            time.sleep(0.1)
        raise ProxyError(
            f"{self.name} did not start listening on port {port}; see its log "
            f"{self.workdir / (self.name + '.log')}"
        )


class NoProxy(Proxy):
    """Routed, not intercepted: the ceiling."""


class Tlsgate(Proxy):
    name = "tlsgate"
    intercepts = True

    @property
    def state(self) -> Path:
        return self.workdir / "tlsgate-state"

    def start(self, workers: int) -> None:
        super().start(workers)
        argv = [
            sys.executable,
            "-m",
            "tlsgate",
            "run",
            "--state-dir",
            str(self.state),
            "--listen",
            f"0.0.0.0:{PEER_PORT}",
            "--mode",
            "transparent",
            "--intercept-ports",
            "443",
            "--intercept-from",
            f"{self.topo.client_ip}/32",
            "--upstream-ca-bundle",
            str(self.upstream_ca),
            "--workers",
            str(workers),
        ]
        # All the load comes from one client address (like a NAT-ed network would): the
        # per-address limit (256 per worker by default) would cut the idle scenario's 1000.
        limits = {"max_connections_per_client": 1_000_000, **self.limits}
        config = self.workdir / "tlsgate.toml"
        config.write_text("[limits]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items()))
        argv += ["--config", str(config)]
        self._spawn(argv, "tlsgate.log")
        self._wait_ready(workers)

    def status(self) -> dict[str, Any]:
        from tlsgate.paths import control_socket_path
        from tlsgate.supervisor.control import request

        reply: dict[str, Any] = request(
            control_socket_path(self.state), {"cmd": "status"}, timeout=5
        )["status"]
        return reply

    def _wait_ready(self, workers: int, timeout: float = 40) -> None:
        from tlsgate.errors import OperatorError

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                break
            try:
                status = self.status()
            except (OperatorError, OSError, KeyError):
                time.sleep(0.1)
                continue
            ready = [w for w in status["workers"] if w["alive"] and w["heartbeat_age"] < 2]
            if len(ready) == workers:
                return
            time.sleep(0.1)
        raise ProxyError(
            f"tlsgate did not get {workers} worker(s) ready; see its log "
            f"{self.workdir / 'tlsgate.log'}"
        )

    def worker_pids(self) -> list[int]:
        try:
            return [int(w["pid"]) for w in self.status()["workers"] if w["pid"]]
        except Exception:
            return []

    def events_socket(self) -> Path:
        from tlsgate.paths import events_socket_path

        return events_socket_path(self.state)


class Sslsplit(Proxy):
    name = "sslsplit"
    intercepts = True

    def start(self, workers: int) -> None:
        super().start(workers)
        _apt_install("sslsplit", "sslsplit")
        ca = _peer_ca(self.workdir)
        self.topo.gateway_nft(REDIRECT_RULES.format(port=PEER_PORT))
        # -u root: its CA files are in our temp dir; -e netfilter: REDIRECT's SO_ORIGINAL_DST
        argv = [
            "sslsplit",
            "-k",
            str(ca / "key.pem"),
            "-c",
            str(ca / "cert.pem"),
            "-u",
            "root",
            "-e",
            "netfilter",
            "ssl",
            "0.0.0.0",
            str(PEER_PORT),
        ]
        self._spawn(argv, "sslsplit.log")
        self._wait_listening(PEER_PORT)

    def stop(self) -> None:
        super().stop()
        self.topo.run(
            self.topo.gateway, ["nft", "delete", "table", "ip", "tlsgate_bench_peer"], check=False
        )


class Mitmproxy(Proxy):
    name = "mitmproxy"
    intercepts = True

    def start(self, workers: int) -> None:
        super().start(workers)
        mitmdump = install_mitmproxy()
        ca = _peer_ca(self.workdir)
        conf = self.workdir / "mitmproxy-conf"
        conf.mkdir(exist_ok=True)
        (conf / "mitmproxy-ca.pem").write_bytes(
            (ca / "key.pem").read_bytes() + (ca / "cert.pem").read_bytes()
        )
        self.topo.gateway_nft(REDIRECT_RULES.format(port=PEER_PORT))
        argv = [
            str(mitmdump),
            "--mode",
            "transparent",
            "--listen-host",
            "0.0.0.0",
            "--listen-port",
            str(PEER_PORT),
            "--set",
            f"confdir={conf}",
            "--set",
            f"ssl_verify_upstream_trusted_ca={self.upstream_ca}",
            "-q",
        ]
        self._spawn(argv, "mitmproxy.log")
        self._wait_listening(PEER_PORT, timeout=60)

    def stop(self) -> None:
        super().stop()
        self.topo.run(
            self.topo.gateway, ["nft", "delete", "table", "ip", "tlsgate_bench_peer"], check=False
        )


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _peer_ca(workdir: Path) -> Path:
    """A CA for a peer proxy (tlsgate's CA code, unencrypted key), made once per run."""
    from tlsgate.supervisor.ca import init_ca

    base = workdir / "peer-ca"
    if not (base / "ca" / "cert.pem").exists():
        init_ca(base)
    return base / "ca"


def _apt_install(tool: str, package: str) -> None:
    """Debian's package for a peer, installed on first use (waits for the dpkg lock)."""
    if shutil.which(tool) is not None:
        return
    try:
        subprocess.run(
            [
                "apt-get",
                "-o",
                "DPkg::Lock::Timeout=600",
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                package,
            ],
            check=True,
            capture_output=True,
            timeout=900,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise ProxyError(
            f"installing {package} failed ({exc}); run apt-get update, then "
            f"apt-get install {package}"
        ) from exc
    if shutil.which(tool) is None:
        raise ProxyError(f"{package} installed but {tool} is not on PATH")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tlsgate"


def install_mitmproxy() -> Path:
    """mitmdump from a virtualenv under the cache directory, created with pip on first use."""
    venv = cache_dir() / "peers" / "mitmproxy"
    mitmdump = venv / "bin" / "mitmdump"
    if mitmdump.exists():
        return mitmdump
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "mitmproxy",
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise ProxyError(
            f"installing mitmproxy into {venv} failed ({exc}); remove that "
            "directory and retry, or leave --against mitmproxy out"
        ) from exc
    return mitmdump


PROXIES: dict[str, type[Proxy]] = {"tlsgate": Tlsgate, "sslsplit": Sslsplit, "mitmproxy": Mitmproxy}
