"""The load-test suite: tlsgate (and peers) in network namespaces under wrk and h2load.

    tlsgate loadtest [--quick] [--seconds S] [--rounds R] [--workers N]
                     [--against sslsplit|mitmproxy|squid] [--out DIR]

What it builds (root only), all torn down on exit, Ctrl-C, SIGTERM and errors:
- a client, a gateway and a server network namespace joined by veth pairs, addresses in
  198.18.0.0/15 (:mod:`tlsgate.loadtest.topology`);
- the origin: Debian's nginx in the server namespace, with a generated config and a leaf for
  ``bench.test`` and ``*.bench.test`` from a test CA made for the run;
- the proxy under test in the gateway namespace, pinned to ``--gateway-cpus``: tlsgate in
  transparent mode (``--intercept-ports 443``, trusting the test CA upstream), or a peer;
  "none" is the ceiling (routed, not intercepted);
- wrk (HTTP/1.1) and h2load (HTTP/2) in the client namespace, pinned with nginx to
  ``--client-cpus``. New-connection scenarios run with the no-resumption shim
  (:mod:`tlsgate.loadtest.shim`: every connection a full handshake) and again with
  resumption as the client does it.

Scenarios: ``newconn`` (a fresh TLS connection per request), ``newconn-resumed``,
``keepalive`` (1 KiB), ``bulk`` (10 MiB), ``names`` (a distinct-name storm), ``h2``
(multiplexed), ``mixed`` (keepalive, newconn and bulk at once), ``idle`` (RSS per worker with
``--idle`` connections open), and ``scaling`` (newconn and keepalive at 1..N workers).
Rounds interleave the proxies. Each row: throughput, latency p50/p90/p99, errors, the
proxy's CPU seconds per 1000 units and per GB (its process tree, from /proc), RSS per
worker, events produced vs received by a subscriber of the detection socket (tlsgate).
Output: live progress, a table, ``results.json`` and PNG plots in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from tlsgate.loadtest import generators, origin, report
from tlsgate.loadtest.procstat import rss_mib, tree_cpu_seconds
from tlsgate.loadtest.proxies import PROXIES, NoProxy, Proxy, ProxyError, Tlsgate
from tlsgate.loadtest.shim import build_shim, shim_env
from tlsgate.loadtest.subscriber import CountingSubscriber, Counts
from tlsgate.loadtest.topology import Topology, netns_available

SCENARIOS = ("newconn", "newconn-resumed", "keepalive", "bulk", "names", "h2", "mixed", "idle")
#: what one unit of each scenario's throughput is
UNITS = {
    "newconn": "conn",
    "newconn-resumed": "conn",
    "names": "conn",
    "keepalive": "req",
    "h2": "req",
    "mixed": "req",
    "bulk": "MB",
    "idle": "conn",
}
URL = f"https://{origin.NAME}"
#: scenario suffix: tlsgate runs with upstream session reuse off ([limits] upstream_sessions)
NO_UPSTREAM_REUSE = "@no-upstream-reuse"


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C so every teardown runs."""


@dataclass
class Row:
    """One scenario measured once on one proxy."""

    proxy: str
    scenario: str
    workers: int
    round: int
    requests: int = 0
    bytes: int = 0
    seconds: float = 0.0
    errors: int = 0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_s: float | None = None
    rss_mib: list[float] = field(default_factory=list)
    events_produced: int | None = None
    events_received: int | None = None
    events_gaps: int | None = None
    #: conn_close events, and how many resumed a session with the client / the server
    closes: int | None = None
    client_resumed: int | None = None
    upstream_resumed: int | None = None
    http_events: int | None = None
    status: str = "ok"  # or "n/a: <why>"
    note: str = ""
    error_detail: dict[str, int] = field(default_factory=dict)

    @property
    def unit(self) -> str:
        return UNITS.get(self.scenario.split("@")[0], "req")

    @property
    def rate(self) -> float:
        if not self.seconds:
            return 0.0
        if self.unit == "MB":
            return self.bytes / self.seconds / 1e6
        return self.requests / self.seconds

    @property
    def cpu_per_1k(self) -> float | None:
        if self.cpu_s is None or not self.requests:
            return None
        return self.cpu_s / self.requests * 1000

    @property
    def cpu_per_gb(self) -> float | None:
        if self.cpu_s is None or not self.bytes:
            return None
        return self.cpu_s / (self.bytes / 1e9)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            unit=self.unit, rate=self.rate, cpu_per_1k=self.cpu_per_1k, cpu_per_gb=self.cpu_per_gb
        )
        return out


@dataclass
class Settings:
    seconds: float
    rounds: int
    workers: int
    scaling: list[int]
    scenarios: list[str]
    proxies: list[str]
    connections: int
    names: int
    idle: int
    gateway_cpus: set[int]
    client_cpus: set[int]
    out: Path
    plots: bool = True
    ceiling: bool = True


class Bench:
    """One run of the suite: the topology, the origin, and the measurements."""

    def __init__(
        self, settings: Settings, topo: Topology, workdir: Path, say: Callable[[str], None]
    ):
        self.s = settings
        self.topo = topo
        self.workdir = workdir
        self.say = say
        self.shim = build_shim(workdir)
        self.lua = generators.lua_script(workdir)
        self.ca = origin.make_pki(workdir)

    # -- load generators ----------------------------------------------------------------
    def _client(
        self, argv: list[str], env: dict[str, str] | None, timeout: float
    ) -> subprocess.CompletedProcess[bytes]:
        full_env = {**os.environ, **(env or {})}
        return self.topo.run(
            self.topo.client,
            argv,
            timeout=timeout,
            check=False,
            cpus=self.s.client_cpus,
            env=full_env,
        )

    def wrk(
        self, path: str, *, connections: int, close: bool, env: dict[str, str] | None
    ) -> subprocess.Popen[bytes]:
        argv = generators.wrk_argv(
            f"{URL}{path}",
            connections=connections,
            seconds=self.s.seconds,
            script=self.lua,
            close=close,
        )
        return self.topo.popen(
            self.topo.client,
            argv,
            cpus=self.s.client_cpus,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def _wrk_result(self, proc: subprocess.Popen[bytes]) -> generators.Measured:
        out, err = proc.communicate(timeout=self.s.seconds + 60)
        self.topo.stop(proc)
        text = out.decode(errors="replace")
        try:
            return generators.parse_wrk(text)
        except ValueError as exc:
            raise RuntimeError(f"{exc}; stderr: {err.decode(errors='replace')[-300:]}") from exc

    def measure(self, proxy: Proxy, scenario: str, round_: int) -> Row:
        row = Row(proxy.name, scenario, proxy.workers, round_)
        full = shim_env(self.shim, resume=False)
        resumed = shim_env(self.shim, resume=True)
        sub = None
        events_sock = proxy.events_socket()
        if events_sock is not None:
            sub = CountingSubscriber(events_sock)
        try:
            produced0 = self._produced(proxy)
            base = sub.counts() if sub else None
            cpu0 = tree_cpu_seconds(proxy.pid) if proxy.pid else None
            base_name = scenario.split("@")[0]
            if base_name == "h2":
                measured: list[generators.Measured] = [self._h2(row)]
            elif base_name == "idle":
                measured = [self._idle(proxy, row)]
            else:
                measured = self._wrk_scenario(base_name, full, resumed)
            if cpu0 is not None and proxy.pid:
                row.cpu_s = tree_cpu_seconds(proxy.pid) - cpu0
            if row.status == "ok":
                row.requests = sum(m.requests for m in measured)
                row.bytes = sum(m.bytes for m in measured)
                row.seconds = max(m.seconds for m in measured)
                row.errors = sum(m.errors for m in measured)
                row.p50_ms, row.p90_ms, row.p99_ms = (
                    measured[0].p50_ms,
                    measured[0].p90_ms,
                    measured[0].p99_ms,
                )
                for m in measured:
                    for k, v in m.error_detail.items():
                        row.error_detail[k] = row.error_detail.get(k, 0) + v
                    if m.requests == 0:
                        # nothing completed (e.g. every response slower than the run): an
                        # error, never a silent zero
                        row.errors += 1
                        row.error_detail["nothing-completed"] = (
                            row.error_detail.get("nothing-completed", 0) + 1
                        )
            if not row.rss_mib:
                row.rss_mib = [round(rss_mib(p), 1) for p in proxy.worker_pids()]
            if sub is not None and base is not None and produced0 is not None:
                self._settle_events(proxy, sub, base, produced0, row)
        finally:
            if sub is not None:
                sub.close()
        return row

    def _wrk_scenario(
        self, name: str, full: dict[str, str], resumed: dict[str, str]
    ) -> list[generators.Measured]:
        c = self.s.connections
        if name == "newconn":
            procs = [self.wrk("/", connections=c, close=True, env=full)]
        elif name == "newconn-resumed":
            procs = [self.wrk("/", connections=c, close=True, env=resumed)]
        elif name == "keepalive":
            procs = [self.wrk("/", connections=c, close=False, env=full)]
        elif name == "bulk":
            procs = [self.wrk("/bulk", connections=max(1, c // 4), close=False, env=full)]
        elif name == "names":
            env = shim_env(self.shim, resume=False, names=self.s.names)
            procs = [self.wrk("/", connections=c, close=True, env=env)]
        elif name == "mixed":
            # latency percentiles of the row are the keep-alive part's
            procs = [
                self.wrk("/", connections=max(1, c // 2), close=False, env=full),
                self.wrk("/", connections=max(1, c // 4), close=True, env=full),
                self.wrk("/bulk", connections=1, close=False, env=full),
            ]
        else:
            raise ValueError(f"unknown scenario {name!r}; pick from {', '.join(SCENARIOS)}")
        return [self._wrk_result(p) for p in procs]

    def _h2(self, row: Row) -> generators.Measured:
        log = self.workdir / f"h2load-{row.proxy}-{row.round}.log"
        argv = generators.h2load_argv(
            f"{URL}/",
            connections=max(1, self.s.connections // 4),
            streams=10,
            seconds=self.s.seconds,
            log_file=log,
        )
        done = self._client(argv, shim_env(self.shim, resume=False), self.s.seconds + 60)
        text = done.stdout.decode(errors="replace")
        m = generators.parse_h2load(text, log.read_text() if log.exists() else "")
        if m.requests == 0 or "h2" not in text:
            # the proxy did not offer or carry HTTP/2: not applicable, never a pass
            row.status = "n/a: no HTTP/2 through this proxy"
            row.note = (text.strip().splitlines() or ["(no output)"])[-1][:160]
        return m

    def _idle(self, proxy: Proxy, row: Row) -> generators.Measured:
        argv = [sys.executable, "-m", "tlsgate.loadtest.idle", origin.NAME, "443", str(self.s.idle)]
        proc = self.topo.popen(
            self.topo.client,
            argv,
            cpus=self.s.client_cpus,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        t0 = time.monotonic()
        try:
            assert proc.stdout is not None and proc.stdin is not None
            line = proc.stdout.readline().decode().split()
            opened, errors = (int(line[1]), int(line[2])) if len(line) == 3 else (0, self.s.idle)
            time.sleep(1.0)  # let the workers settle with every connection open
            row.rss_mib = [round(rss_mib(p), 1) for p in proxy.worker_pids()]
            proc.stdin.close()
            proc.wait(timeout=60)
        finally:
            self.topo.stop(proc)
        row.note = f"RSS with {opened} connections open"
        return generators.Measured(opened, 0, time.monotonic() - t0, errors, 0, 0, 0)

    # -- events ---------------------------------------------------------------------------
    def _produced(self, proxy: Proxy) -> int | None:
        if not isinstance(proxy, Tlsgate):
            return None
        ev = proxy.status()["events"]
        return int(ev["produced"]) + int(ev["dropped"]["worker-queue"])

    def _settle_events(
        self, proxy: Proxy, sub: CountingSubscriber, base: Counts, produced0: int, row: Row
    ) -> None:
        """Wait (bounded) until the subscriber has seen or been told of every event."""
        deadline = time.monotonic() + 10
        while True:
            time.sleep(0.3)
            produced = (self._produced(proxy) or 0) - produced0
            got = sub.counts() - base
            if got.received + got.gaps >= produced or time.monotonic() > deadline:
                break
        row.events_produced, row.events_received, row.events_gaps = (produced, got.received,
                                                                     got.gaps)  # fmt: skip
        row.closes, row.client_resumed, row.upstream_resumed = (
            got.closes,
            got.client_resumed,
            got.upstream_resumed,
        )
        row.http_events = got.http
        if row.scenario == "h2" and row.status == "ok" and not got.http and row.requests:
            row.note = "relayed without inspection: no http events for HTTP/2 in this build"
        if got.supervisor:
            # a worker or the signer ended during the scenario: say so next to its figures
            kinds = ", ".join(f"{k} x{n}" for k, n in sorted(sub.supervisor_types().items()))
            row.note = "; ".join(filter(None, (row.note, f"supervisor events so far: {kinds}")))

    # -- the run --------------------------------------------------------------------------
    def start_origin(self) -> None:
        conf = origin.write_site(self.workdir, [(self.topo.server_ip, 443)])
        proc = self.topo.popen(
            self.topo.server,
            origin.nginx_argv(conf),
            cpus=self.s.client_cpus,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            out = self.topo.run(self.topo.server, ["ss", "-Hltn", "sport = :443"], check=False)
            if out.stdout.strip():
                return
            time.sleep(0.1)
        log = self.workdir / "nginx-error.log"
        raise RuntimeError(f"nginx did not start: {log.read_text() if log.exists() else ''}")

    def proxy(self, name: str) -> Proxy:
        cls = NoProxy if name == "none" else PROXIES[name]
        return cls(self.topo, self.workdir, self.ca, self.s.gateway_cpus)


@contextmanager
def _signals_unwind() -> Iterator[None]:
    """SIGINT and SIGTERM raise in the main thread, so every teardown runs (SIGINT is set
    explicitly: a shell starts background jobs with it ignored)."""

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise Terminated(f"signal {signum}")

    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, terminate),
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def plan(s: Settings) -> list[tuple[int, str, int, list[str]]]:
    """(round, proxy, workers, scenarios) in run order: proxies interleave within a round."""
    steps: list[tuple[int, str, int, list[str]]] = []
    for r in range(s.rounds):
        for p in ["none", *s.proxies] if s.ceiling else s.proxies:
            scen = [x for x in s.scenarios if p != "none" or x not in ("idle", "names")]
            steps.append((r, p, s.workers, scen))
            if p == "tlsgate" and "newconn" in s.scenarios:
                # what upstream session reuse saves: the same load with it off
                steps.append((r, p, s.workers, [f"newconn{NO_UPSTREAM_REUSE}"]))
            if p == "tlsgate":
                for w in s.scaling:
                    if w != s.workers:
                        steps.append((r, p, w, ["newconn@scaling", "keepalive@scaling"]))
    return steps


def run(s: Settings) -> list[Row]:
    if not netns_available():
        raise SystemExit("tlsgate loadtest needs root and iproute2 (it builds network namespaces)")
    for tool, pkg in (
        ("nginx", "nginx-light"),
        ("wrk", "wrk"),
        ("h2load", "nghttp2-client"),
        ("nft", "nftables"),
    ):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: apt-get install {pkg}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    rows: list[Row] = []
    steps = plan(s)
    with ExitStack() as stack, _signals_unwind():
        workdir = Path(tempfile.mkdtemp(prefix="tlsgate-loadtest-"))
        stack.callback(shutil.rmtree, workdir, True)
        progress = stack.enter_context(report.Progress(sum(len(x[3]) for x in steps)))
        topo = stack.enter_context(Topology())
        # the client and the proxies resolve the origin's name without DNS
        topo.hosts(topo.client, {origin.NAME: topo.server_ip})
        topo.hosts(topo.gateway, {origin.NAME: topo.server_ip})
        bench = Bench(s, topo, workdir, progress.say)
        bench.start_origin()
        progress.say(
            f"topology {topo.client} → {topo.gateway} → {topo.server} in {workdir}; proxies on CPU "
            f"{sorted(s.gateway_cpus)}, clients and nginx on CPU {sorted(s.client_cpus)}"
        )
        for round_, name, workers, scenarios in steps:
            proxy = bench.proxy(name)
            try:
                if any(x.endswith(NO_UPSTREAM_REUSE) for x in scenarios):
                    proxy.limits["upstream_sessions"] = 0
                proxy.start(workers)
            except ProxyError as exc:
                for scen in scenarios:
                    rows.append(Row(name, scen, workers, round_, status=f"n/a: {exc}"))
                    progress.advance(rows[-1])
                continue
            try:
                for scen in scenarios:
                    progress.describe(f"round {round_ + 1}/{s.rounds} {name} ×{workers}: {scen}")
                    row = bench.measure(proxy, scen, round_)
                    rows.append(row)
                    progress.advance(row)
            finally:
                # load first: a proxy that drains on SIGTERM would wait for its clients
                topo.stop_all(topo.client)
                proxy.stop()
    return rows


def parse_cpus(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def settings_from_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="tlsgate loadtest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short runs (3 s, 1 round, 1000 names, 200 idle): under 2 minutes",
    )
    parser.add_argument("--seconds", type=float, help="seconds per scenario (10)")
    parser.add_argument("--rounds", type=int, help="rounds, proxies interleaved (3)")
    parser.add_argument("--workers", type=int, default=1, help="tlsgate workers (1)")
    parser.add_argument(
        "--scaling",
        metavar="N",
        type=int,
        help="also measure newconn and keepalive at 1..N workers",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run only these scenarios (repeatable; default all)",
    )
    parser.add_argument(
        "--against",
        action="append",
        choices=[p for p in PROXIES if p != "tlsgate"],
        default=[],
        help="also measure this peer, interleaved (repeatable): sslsplit and squid "
        "(squid-openssl, ssl-bump) are Debian's packages, installed on first use; mitmproxy "
        "goes into a virtualenv under ~/.cache/tlsgate",
    )
    parser.add_argument("--connections", type=int, default=32, help="client connections (32)")
    parser.add_argument("--names", type=int, help="distinct SNI names in the storm (10000)")
    parser.add_argument("--idle", type=int, help="open connections in the idle scenario (1000)")
    ncpu = os.cpu_count() or 1
    parser.add_argument("--gateway-cpus", default="0", help="CPUs the proxy is pinned to (0)")
    parser.add_argument(
        "--client-cpus",
        default=f"1-{ncpu - 1}" if ncpu > 1 else "0",
        help="CPUs of the load generators and nginx (the others)",
    )
    parser.add_argument("--out", default="loadtest-results", help="output directory")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--no-ceiling", action="store_true", help="skip the no-interception (routed) rows"
    )
    a = parser.parse_args(argv)
    quick = a.quick
    return Settings(
        seconds=a.seconds or (3.0 if quick else 10.0),
        rounds=a.rounds or (1 if quick else 3),
        workers=a.workers,
        scaling=list(range(1, a.scaling + 1)) if a.scaling else ([1, 2] if quick else []),
        scenarios=a.scenario or list(SCENARIOS),
        proxies=["tlsgate", *a.against],
        connections=a.connections,
        names=a.names or (1000 if quick else 10000),
        idle=a.idle or (200 if quick else 1000),
        gateway_cpus=parse_cpus(a.gateway_cpus),
        client_cpus=parse_cpus(a.client_cpus),
        out=Path(a.out),
        plots=not a.no_plots,
        ceiling=not a.no_ceiling,
    )


def main(argv: list[str] | None = None) -> int:
    s = settings_from_args(argv)
    started = time.time()
    try:
        rows = run(s)
    except (KeyboardInterrupt, Terminated):
        print("interrupted: everything torn down", file=sys.stderr)
        return 130
    s.out.mkdir(parents=True, exist_ok=True)
    summary = report.summarize(rows)
    ratio_rows = report.ratios(summary, rows)
    doc: dict[str, Any] = {
        "started": started,
        "seconds": s.seconds,
        "rounds": s.rounds,
        "gateway_cpus": sorted(s.gateway_cpus),
        "client_cpus": sorted(s.client_cpus),
        "machine": report.machine(),
        "argv": sys.argv,
        "rows": [r.as_json() for r in rows],
        "summary": summary,
        "ratios": ratio_rows,
    }
    (s.out / "results.json").write_text(json.dumps(doc, indent=1))
    (s.out / "results.md").write_text(report.markdown(summary, ratio_rows))
    report.print_table(summary, ratio_rows)
    if s.plots:
        for png in report.plot(summary, s.out):
            print(f"plot: {png}")
    print(f"results: {s.out / 'results.json'}")
    failed = [r for r in rows if r.status == "ok" and (r.errors or (r.events_gaps or 0))]
    return 1 if failed else 0


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
