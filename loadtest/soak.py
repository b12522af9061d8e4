"""A soak run: mixed load with faults through a gateway on loopback, watching its footprint.

    python -m tlsgate.loadtest soak [--minutes 10] [--workers 2] [--clients 4]

It builds what ``loadtest loopback`` builds (nginx origin with a test CA, ``tlsgate run``,
all on 127.0.0.1, torn down on exit), then runs client threads doing a mix of new
connections, keep-alive requests and faults (clients that reset mid-stream, CONNECTs to a
name that cannot resolve), and samples the descriptors and RSS of the supervisor and of
every worker every ``--interval`` seconds.

Criterion (per process and per measure: descriptors, RSS): the first quarter of the run
(or ``--warmup`` seconds) is warm-up and is not judged. Over the rest, the least-squares
slope, projected over that part, must stay below the tolerance (RSS: ``max(2 MiB, 5 %)`` of
the post-warm-up level; descriptors: 4 plus 3 per client, the connections in flight when a
sample is taken), and the final value must be within the same
tolerance of the first post-warm-up value (medians of three samples, against noise). A
process replaced during the run (new PID) fails it too: no fault of the mix should kill
one. The run fails (exit 1, one line per breach) otherwise, or when the load itself failed
(errors beyond the injected faults).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
WARMUP_SHARE = 0.25
RSS_TOLERANCE_BYTES = 2 * 1024 * 1024
RSS_TOLERANCE_SHARE = 0.05
FD_TOLERANCE = 4
#: Descriptors one client's connection in flight may hold in a worker (client, upstream,
#: and a spare): sampled under load, the count moves by this much per client.
FDS_PER_CLIENT = 3


@dataclass(frozen=True)
class ProcessSample:
    """One process's open descriptors and resident memory."""

    pid: int
    fds: int
    rss_bytes: int


def sample_process(pid: int) -> ProcessSample:
    """Read /proc/PID: descriptors in fd/, RSS from statm (pages)."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return ProcessSample(pid, fds, rss_pages * PAGE_SIZE)


@dataclass(frozen=True)
class Verdict:
    """The judgement of one measure of one process."""

    process: str
    measure: str
    baseline: float
    final: float
    projected_growth: float
    tolerance: float

    @property
    def flat(self) -> bool:
        return (
            self.projected_growth <= self.tolerance and self.final - self.baseline <= self.tolerance
        )

    def line(self) -> str:
        unit, scale = ("MiB", 1 / 2**20) if self.measure == "rss" else ("", 1.0)
        return (
            f"{self.process} {self.measure}: after warm-up {self.baseline * scale:.1f}{unit}, "
            f"final {self.final * scale:.1f}{unit}, trend {self.projected_growth * scale:+.1f}"
            f"{unit} over the judged part (tolerance {self.tolerance * scale:.1f}{unit}): "
            + ("flat" if self.flat else "GROWING")
        )


#: One sample of every process: (seconds since start, {name: ProcessSample}).
Sample = tuple[float, dict[str, ProcessSample]]


def _slope(ts: list[float], values: list[float]) -> float:
    """Least-squares slope of ``values`` over ``ts``."""
    mean_t, mean_v = statistics.fmean(ts), statistics.fmean(values)
    den = sum((t - mean_t) ** 2 for t in ts)
    if den == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in zip(ts, values, strict=True)) / den


def judge(
    samples: list[Sample], warmup: float, fd_tolerance: int = FD_TOLERANCE
) -> tuple[list[Verdict], list[str]]:
    """Apply the module's criterion to what was sampled after ``warmup`` seconds; return
    the verdicts and the breaches in words."""
    problems: list[str] = []
    judged = [s for s in samples if s[0] >= warmup]
    if len(judged) < 6:
        return [], [f"only {len(judged)} samples after warm-up: run longer or sample faster"]
    verdicts = []
    for name in judged[0][1]:
        series = [(t, procs[name]) for t, procs in judged if name in procs]
        pids = {p.pid for _, p in series}
        if len(pids) > 1 or len(series) < len(judged):
            problems.append(f"{name} was replaced during the run (pids {sorted(pids)})")
            continue
        ts = [t for t, _ in series]
        for measure in ("rss", "fds"):
            values = [float(p.rss_bytes if measure == "rss" else p.fds) for _, p in series]
            baseline = statistics.median(values[:3])
            final = statistics.median(values[-3:])
            if measure == "rss":
                tolerance = max(RSS_TOLERANCE_BYTES, RSS_TOLERANCE_SHARE * baseline)
            else:
                tolerance = fd_tolerance
            growth = _slope(ts, values) * (ts[-1] - ts[0])
            verdict = Verdict(name, measure, baseline, final, growth, tolerance)
            verdicts.append(verdict)
            if not verdict.flat:
                problems.append(verdict.line())
    return verdicts, problems


@dataclass
class LoadCounts:
    """What the client threads did (under ``lock``)."""

    requests: int = 0
    connections: int = 0
    faults: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, *, requests: int = 0, connections: int = 0, faults: int = 0) -> None:
        with self.lock:
            self.requests += requests
            self.connections += connections
            self.faults += faults

    def error(self, text: str) -> None:
        with self.lock:
            if len(self.errors) < 100:
                self.errors.append(text)


def _client(proxy: int, origin: int, cafile: str, end: float, seed: int, out: LoadCounts) -> None:
    """Until ``end``: 6 in 10 rounds a new connection, 3 a keep-alive burst, 1 a fault."""
    from tlsgate.loadtest.loopback import _read_response, _tunnel

    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    request = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    n = seed
    while time.monotonic() < end:
        n += 1
        kind = n % 10
        try:
            if kind < 6:
                with _tunnel(proxy, origin, ctx) as tls:
                    tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    _read_response(tls, bytearray())
                out.add(requests=1, connections=1)
            elif kind < 9:
                with _tunnel(proxy, origin, ctx) as tls:
                    buf = bytearray()
                    for _ in range(20):
                        tls.sendall(request)
                        _read_response(tls, buf)
                out.add(requests=20, connections=1)
            elif n % 20 == 9:
                # a client that vanishes mid-response: RST instead of FIN
                tls = _tunnel(proxy, origin, ctx)
                tls.sendall(request)
                tls.recv(100)
                tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                tls.close()
                out.add(faults=1)
            else:
                # a name that cannot resolve: a 502 and an upstream_refused event
                with socket.create_connection(("127.0.0.1", proxy), timeout=10) as sock:
                    sock.sendall(f"CONNECT soak{n}.tlsgate.invalid:443 HTTP/1.1\r\n\r\n".encode())
                    answer = sock.recv(100)
                if not answer.startswith((b"HTTP/1.1 502", b"HTTP/1.1 504")):
                    raise OSError(f"unresolvable name answered {answer[:40]!r}")
                out.add(faults=1)
        except (OSError, ssl.SSLError) as exc:
            out.error(f"{type(exc).__name__}: {exc}")


def _threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def _processes(gw_pid: int, state: Path) -> dict[str, int]:
    from tlsgate.paths import control_socket_path
    from tlsgate.supervisor.control import request

    status = request(control_socket_path(state), {"cmd": "status"}, timeout=5)["status"]
    found = {"supervisor": gw_pid}
    for w in status["workers"]:
        if w["pid"] is not None:
            found[f"worker {w['id']}"] = int(w["pid"])
    return found


def run(
    minutes: float, warmup: float | None, workers: int, clients: int, interval: float, keep: bool
) -> int:
    from tlsgate.loadtest.loopback import (
        NGINX_CONF,
        _gateway_ready,
        _listening,
        free_port,
        make_pki,
        running,
    )

    duration = minutes * 60
    warmup = duration * WARMUP_SHARE if warmup is None else warmup
    with ExitStack() as stack:
        d = Path(tempfile.mkdtemp(prefix="tlsgate-soak-"))
        if not keep:
            stack.callback(shutil.rmtree, d, True)
        (d / "www").mkdir()
        (d / "www" / "1k").write_bytes(b"x" * 1024)
        (d / "www" / "10m").write_bytes(b"y")
        make_pki(d)
        origin_port, proxy_port = free_port(), free_port()
        (d / "nginx.conf").write_text(NGINX_CONF.format(dir=d, port=origin_port))
        nginx = ["nginx", "-c", str(d / "nginx.conf"), "-e", str(d / "nginx-error.log")]
        stack.enter_context(running(nginx, _listening(origin_port), None))
        state = d / "state"
        gw_pid = stack.enter_context(running(
            [sys.executable, "-m", "tlsgate", "run", "--state-dir", str(state), "--listen",
             f"127.0.0.1:{proxy_port}", "--upstream-ca-bundle", str(d / "ca.pem"),
             "--workers", str(workers), "--events-file", str(d / "events.msgpack"),
             # the origin is on loopback, which a CONNECT may not reach by default
             "--allow-destination", "127.0.0.0/8"],
            _gateway_ready(proxy_port, state, workers), None))  # fmt: skip
        print(f"soak: {minutes:g} min, gateway pid {gw_pid} with {workers} workers, {clients} "
              f"client threads; warm-up {warmup:.0f} s is not judged",
              flush=True)  # fmt: skip
        counts = LoadCounts()
        start = time.monotonic()
        end = start + duration
        threads = [threading.Thread(target=_client, daemon=True, args=(
            proxy_port, origin_port, str(state / "ca" / "cert.pem"), end, i * 3, counts))
            for i in range(clients)]  # fmt: skip
        for t in threads:
            t.start()
        samples: list[Sample] = []
        next_print = 0.0
        while (now := time.monotonic()) < end:
            pids = _processes(gw_pid, state)
            try:
                sample = {name: sample_process(pid) for name, pid in pids.items()}
            except OSError:
                sample = {}  # a process just exited: the next sample shows the new one
            if sample:
                samples.append((now - start, sample))
                threads_now = {k: _threads(v.pid) for k, v in sample.items()}
            if now - start >= next_print:
                shown = "  ".join(f"{k}: {v.fds} fds {v.rss_bytes / 2**20:.1f} MiB"
                                  for k, v in sample.items())  # fmt: skip
                print(f"  {now - start:6.0f} s  {shown}  ({counts.requests} requests, "
                      f"{counts.faults} faults; threads {threads_now})", flush=True)  # fmt: skip
                next_print += max(interval, duration / 20)
            time.sleep(max(0.0, min(interval, end - time.monotonic())))
        for t in threads:
            t.join(30)
    verdicts, problems = judge(samples, warmup, FD_TOLERANCE + FDS_PER_CLIENT * clients)
    for verdict in verdicts:
        print(verdict.line())
    print(f"load: {counts.requests} requests on {counts.connections} connections, "
          f"{counts.faults} faults injected, {len(counts.errors)} unexpected errors")  # fmt: skip
    if counts.requests == 0:
        problems.append("no request succeeded: the load did not run")
    if counts.errors:
        problems.append(f"{len(counts.errors)} client errors beyond the injected faults, "
                        f"first: {counts.errors[0]}")  # fmt: skip
    for problem in problems:
        print(f"soak FAILED: {problem}", file=sys.stderr)
    if not problems:
        print("soak passed: descriptors and RSS flat after warm-up")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tlsgate.loadtest soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="run length (10)")
    parser.add_argument("--warmup", type=float, help="seconds not judged (a quarter of the run)")
    parser.add_argument("--workers", type=int, default=2, help="gateway workers (2)")
    parser.add_argument("--clients", type=int, default=4, help="client threads (4)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.interval <= 0:
        parser.error("--minutes and --interval must be positive")
    if args.warmup is not None and not 0 <= args.warmup < args.minutes * 60 * 0.8:
        parser.error("--warmup must leave at least a fifth of the run to judge")
    return run(args.minutes, args.warmup, args.workers, args.clients, args.interval, args.keep)
