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
- :class:`Squid`: Debian's squid-openssl (installed on demand, its system service kept from
  starting) with an ``https_port ... intercept ssl-bump`` behind the same REDIRECT, minting
  with the peer CA through ``security_file_certgen`` helpers (children of squid, so in its
  process tree), trusting the run's test CA upstream (``tls_outgoing_options cafile=``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tlsgate.loadtest.procstat import process_tree
from tlsgate.loadtest.topology import NETNS_ETC, Topology

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


SQUID = Path("/usr/sbin/squid")
SQUID_CERTGEN = Path("/usr/lib/squid/security_file_certgen")
SQUID_PACKAGE = "squid-openssl"
#: squid's effective user (Debian's build drops to it); the files it reads and writes are its
SQUID_USER = "proxy"
#: every run directory of a squid peer starts so (how a squid process of ours is told apart)
SQUID_RUNDIR_PREFIX = "tlsgate-squid-"
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
#: invoke-rc.d's answer "action forbidden": the package's service is not started by apt
POLICY_RC_D_DENY = (
    "#!/bin/sh\n# tlsgate loadtest: installing squid-openssl, no service starts\nexit 101\n"
)

SQUID_CONF = """\
# tlsgate loadtest: squid ssl-bump as a transparent interception peer (generated per start)
workers 1
# squid wants a forward-proxy port even when only the intercepting one is used
http_port 127.0.0.1:{http_port}
https_port 0.0.0.0:{port} intercept ssl-bump tls-cert={dir}/ca.pem tls-key={dir}/ca-key.pem \\
  generate-host-certificates=on dynamic_cert_mem_cache_size=16MB
sslcrtd_program {certgen} -s {dir}/ssl_db -M 16MB
sslcrtd_children 8 startup=1 idle=1
acl step1 at_step SslBump1
ssl_bump peek step1
ssl_bump bump all
tls_outgoing_options cafile={dir}/upstream-ca.pem
acl loadclients src {client_net}
http_access allow loadclients
http_access deny all
# no cache at all: a relay, like the other proxies
cache deny all
cache_mem 0 MB
# the gateway's names plus the client's address: squid looks the client up on every
# connection, and without an answer there it would ask the machine's DNS server each time
hosts_file {dir}/hosts
access_log none
cache_store_log none
cache_log {dir}/cache.log
pid_filename {dir}/squid.pid
coredump_dir {dir}
netdb_filename none
pinger_enable off
logfile_rotate 0
shutdown_lifetime 1 seconds
"""


def squid_config(rundir: Path, *, port: int, client_net: str, http_port: int = 3128) -> str:
    """Squid's configuration for one start: every path in ``rundir`` (CA, key, test CA,
    certificate db, log, pid file), interception on ``port``, only ``client_net`` served."""
    return SQUID_CONF.format(
        dir=rundir, port=port, http_port=http_port, certgen=SQUID_CERTGEN, client_net=client_net
    )


class Squid(Proxy):
    """Squid ssl-bump in intercept mode, one process in the foreground (``-N``) whose
    ``security_file_certgen`` helpers mint the certificates; ``workers`` is not used (like
    sslsplit, one process)."""

    name = "squid"
    intercepts = True

    def __init__(self, topo: Topology, workdir: Path, upstream_ca: Path, cpus: set[int]) -> None:
        super().__init__(topo, workdir, upstream_ca, cpus)
        self.rundir: Path | None = None

    def start(self, workers: int) -> None:
        super().start(workers)
        install_squid()
        ca = _peer_ca(self.workdir)
        # The suite's workdir is private to root; squid drops to its user, so it gets a
        # directory of its own with copies of what it reads (removed by stop()).
        rundir = self.rundir = Path(tempfile.mkdtemp(prefix=SQUID_RUNDIR_PREFIX))
        try:
            conf = self._prepare(rundir, ca)
            self.topo.gateway_nft(REDIRECT_RULES.format(port=PEER_PORT))
            self._spawn([str(SQUID), "-N", "-f", str(conf)], "squid.log")
            self._wait_listening(PEER_PORT)
        except ProxyError as exc:
            # squid says why on stderr or in its cache.log (stop() removes the run directory)
            logs = _tail(self.workdir / "squid.log") + _tail(rundir / "cache.log")
            fatal = [x for x in logs if "FATAL" in x or "ERROR" in x]
            self.stop()
            raise ProxyError(
                f"{exc}; squid: {' | '.join(fatal[-3:]) or 'no error logged'}"
            ) from exc
        except BaseException:
            self.stop()
            raise

    def _prepare(self, rundir: Path, ca: Path) -> Path:
        """Fill ``rundir`` (configuration, CA, test CA, hosts, certificate db), all owned by
        squid's user; returns the configuration's path."""
        user = pwd.getpwnam(SQUID_USER)
        (rundir / "ca.pem").write_bytes((ca / "cert.pem").read_bytes())
        key = os.open(rundir / "ca-key.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(key, "wb") as out:
            out.write((ca / "key.pem").read_bytes())
        (rundir / "upstream-ca.pem").write_bytes(self.upstream_ca.read_bytes())
        gateway_hosts = NETNS_ETC / self.topo.gateway / "hosts"
        names = gateway_hosts.read_text() if gateway_hosts.exists() else "127.0.0.1 localhost\n"
        (rundir / "hosts").write_text(f"{names}{self.topo.client_ip} loadtest-client\n")
        conf = rundir / "squid.conf"
        conf.write_text(
            squid_config(rundir, port=PEER_PORT, client_net=f"{self.topo.client_ip}/32")
        )
        try:
            subprocess.run(
                [str(SQUID_CERTGEN), "-c", "-s", str(rundir / "ssl_db"), "-M", "16MB"],
                check=True,
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise ProxyError(
                f"initialising squid's certificate db in {rundir} failed: {exc}"
            ) from exc
        for path in [rundir, *rundir.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)
        return conf

    def stop(self) -> None:
        super().stop()
        self.topo.run(
            self.topo.gateway, ["nft", "delete", "table", "ip", "tlsgate_bench_peer"], check=False
        )
        if self.rundir is not None:
            log = self.rundir / "cache.log"
            if log.exists():
                # keep squid's own log with the run's others
                shutil.copyfile(log, self.workdir / "squid-cache.log")
            shutil.rmtree(self.rundir, ignore_errors=True)
            self.rundir = None


def _tail(path: Path, lines: int = 50) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


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
    _apt_get_install(package)
    if shutil.which(tool) is None:
        raise ProxyError(f"{package} installed but {tool} is not on PATH")


def _apt_get_install(package: str) -> None:
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


def install_squid() -> None:
    """Debian's squid-openssl on first use, without leaving its system service behind.

    apt would start (and enable) the package's ``squid`` service: a policy-rc.d that forbids
    it is in place during the install (an existing one is left as it is), the service is
    disabled afterwards, and a squid process that appeared during the install and is not
    one of ours is stopped by PID. The plain ``squid`` package (no ssl-bump) is refused:
    installing squid-openssl would replace it, which is the operator's call.
    """
    if SQUID.exists() and SQUID_CERTGEN.exists():
        return
    if SQUID.exists():
        raise ProxyError(
            f"{SQUID} has no ssl-bump ({SQUID_CERTGEN} is missing: Debian's package squid); "
            f"apt-get install {SQUID_PACKAGE} replaces it, or leave --against squid out"
        )
    before = set(squid_pids())
    made_policy = False
    if not POLICY_RC_D.exists():
        POLICY_RC_D.write_text(POLICY_RC_D_DENY)
        POLICY_RC_D.chmod(0o755)
        made_policy = True
    try:
        _apt_get_install(SQUID_PACKAGE)
    finally:
        if made_policy:
            POLICY_RC_D.unlink(missing_ok=True)
    for argv in (["systemctl", "disable", "squid.service"], ["update-rc.d", "squid", "disable"]):
        if shutil.which(argv[0]) is not None:
            subprocess.run(argv, capture_output=True, timeout=60, check=False)
    for pid in set(squid_pids()) - before:
        _kill(pid)
    if not (SQUID.exists() and SQUID_CERTGEN.exists()):
        raise ProxyError(f"{SQUID_PACKAGE} installed but {SQUID} or {SQUID_CERTGEN} is missing")


def squid_pids() -> list[int]:
    """Running squid processes that are not a peer of ours (none run from a run directory
    of :class:`Squid`): e.g. the system service."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            exe = os.readlink(entry / "exe")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if exe == str(SQUID) and SQUID_RUNDIR_PREFIX.encode() not in cmdline:
            out.append(int(entry.name))
    return out


def _kill(pid: int, timeout: float = 10) -> None:
    """SIGTERM ``pid``, SIGKILL it if still there after ``timeout`` seconds."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


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


PROXIES: dict[str, type[Proxy]] = {
    "tlsgate": Tlsgate,
    "sslsplit": Sslsplit,
    "mitmproxy": Mitmproxy,
    "squid": Squid,
}
