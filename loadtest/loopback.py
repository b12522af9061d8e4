"""A loopback benchmark of one gateway worker in explicit mode.

    python -m tlsgate.loadtest loopback [--seconds 10] [--clients 4] [--scenario all]

What it builds, all on 127.0.0.1 and torn down on exit (also on Ctrl-C and errors):
- an origin: Debian's nginx with a generated config and a certificate from a test CA
  (``/`` answers 1 KiB, ``/bulk`` 10 MiB);
- the gateway: ``tlsgate run --workers 1`` trusting that test CA, pinned to CPU 0 when the
  machine has more than one, so that its CPU time is its own;
- clients: ``--clients`` processes (pinned to the other CPUs) that speak CONNECT and TLS
  through the gateway with Python's ssl, every new-connection request a *full* handshake
  (no session reuse), keep-alive on one tunnel per client, bulk GETs of 10 MiB.

For each scenario it reports the rate the clients saw and the gateway's own CPU seconds
(from /proc) per 1000 connections, per 1000 requests or per GB, with the errors. Clients
in Python are expensive: on a 2-core machine the rates are client-bound, the gateway's CPU
per unit of work is the figure to compare between builds. The network-namespace suite with
wrk and h2load (the load-test issue) measures peak rates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import multiprocess  # type: ignore[import-untyped]

from tlsgate.loadtest.procstat import process_tree, rss_mib, tree_cpu_seconds

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {dir}/origin.pem;
    ssl_certificate_key {dir}/origin-key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_tickets off;
    ssl_session_cache off;
    root {dir}/www;
    location = / {{ try_files /1k =404; }}
    location = /bulk {{ try_files /10m =404; }}
  }}
}}
"""

BULK_BYTES = 10 * 1024 * 1024


@dataclass
class Result:
    scenario: str
    units: int
    unit: str
    seconds: float
    errors: int
    gateway_cpu: float
    bytes: int = 0

    def line(self) -> str:
        rate = self.units / self.seconds
        if self.unit == "bytes":
            per = self.gateway_cpu / (self.units / 1e9) if self.units else float("nan")
            return (f"{self.scenario:10s} {rate / 1e6:8.1f} MB/s   gateway CPU {per:6.2f} s/GB"
                    f"   errors {self.errors}")  # fmt: skip
        per = self.gateway_cpu / (self.units / 1000) if self.units else float("nan")
        return (f"{self.scenario:10s} {rate:8.0f} {self.unit}/s   gateway CPU {per:6.3f} "
                f"s/1k {self.unit}   errors {self.errors}")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pin(cpus: set[int]) -> None:
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:
        pass  # best effort: figures are still per CPU-second


def make_pki(d: Path) -> None:
    """A test CA (tlsgate's own CA code) and an origin certificate for ``localhost``."""
    from cryptography.hazmat.primitives import serialization

    from tlsgate.supervisor.ca import init_ca
    from tlsgate.supervisor.signer import LeafRequest, LeafSigner, generate_leaf_key

    ca = init_ca(d / "origin-ca")
    key = generate_leaf_key()
    leaf = LeafSigner(ca, key).sign(
        LeafRequest(
            dns_names=("localhost", "*.bench.test"),
            ip_addresses=("127.0.0.1",),
            not_after=ca.cert.not_valid_after_utc,
        )
    )
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.cert.public_bytes(pem))
    (d / "origin.pem").write_bytes(leaf.public_bytes(pem))
    (d / "origin-key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@contextmanager
def running(argv: list[str], ready: Callable[[], bool], cpus: set[int] | None) -> Iterator[int]:
    def preexec() -> None:
        if cpus:
            _pin(cpus)

    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=preexec)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"{argv[0]} did not start: {err}")
            time.sleep(0.05)
        yield proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()


def _listening(port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return False
        return True

    return check


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    return found


def _gateway_ready(port: int, state: Path, workers: int) -> Callable[[], bool]:
    """Listening, and every worker up (the supervisor listens before workers exist)."""
    from tlsgate.errors import OperatorError
    from tlsgate.paths import control_socket_path
    from tlsgate.supervisor.control import request

    listening = _listening(port)

    def check() -> bool:
        if not listening():
            return False
        try:
            status = request(control_socket_path(state), {"cmd": "status"}, timeout=2)["status"]
        except (OperatorError, OSError, KeyError):
            return False
        ready = [w for w in status["workers"] if w["alive"] and w["heartbeat_age"] < 2]
        return len(ready) == workers

    return check


def _drain_stalled(sock: socket.socket) -> None:
    import msgpack

    sock.settimeout(2.0)
    unpacker = msgpack.Unpacker(raw=False)
    received = missed = 0
    try:
        while chunk := sock.recv(1 << 20):
            unpacker.feed(chunk)
            for event in unpacker:
                if event["type"] == "gap":
                    missed += event["dropped"]
                elif event["worker"] >= 0:
                    received += 1
    except TimeoutError:
        pass
    print(f"stalled subscriber: then received {received} events and gap events for {missed} "
          f"more", flush=True)  # fmt: skip


def _names(
    pool: object, clients: int, proxy: int, origin: int, d: Path, gw_pid: int, names: int
) -> Result:
    """Two passes over ``names`` distinct server names; prints the cache figures."""
    from tlsgate.paths import control_socket_path
    from tlsgate.supervisor.control import request

    gateway_ca = str(d / "state" / "ca" / "cert.pem")
    per = -(-names // clients)
    total_units = total_errors = 0
    elapsed = cpu = 0.0
    for label in ("first pass (all new)", "second pass (same names)"):
        jobs = [(f"names:{i * per}-{min(per, names - i * per)}", proxy, origin, gateway_ca, 0.0,
                 -1) for i in range(clients) if names - i * per > 0]  # fmt: skip
        cpu0, t0 = tree_cpu_seconds(gw_pid), time.monotonic()
        out = pool.map(_client, jobs)  # type: ignore[attr-defined]
        dt, dcpu = time.monotonic() - t0, tree_cpu_seconds(gw_pid) - cpu0
        units, errors = sum(o[0] for o in out), sum(o[1] for o in out)
        total_units += units
        total_errors += errors
        elapsed += dt
        cpu += dcpu
        time.sleep(1.2)  # workers publish their counters once a second
        cache = request(control_socket_path(d / "state"), {"cmd": "status"})["status"]["cache"]
        print(f"names      {label}: {units} conn in {dt:.1f} s, gateway CPU "
              f"{dcpu / max(units, 1) * 1000:.2f} s/1k, errors {errors}; cache so far: "
              f"{cache['lookups']} look-ups, {cache['signatures']} signatures, hit rate "
              f"{cache['hit_rate']:.1%}, {cache['size']} entries", flush=True)  # fmt: skip
    return Result("names", total_units, "conn", elapsed, total_errors, cpu)


# -- clients (run in worker processes) ---------------------------------------------------
def _tunnel(proxy: int, origin: int, ctx: ssl.SSLContext, name: str = "localhost") -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", proxy), timeout=10)
    sock.sendall(f"CONNECT localhost:{origin} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise OSError("proxy closed")
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise OSError(head.split(b"\r\n", 1)[0].decode())
    return ctx.wrap_socket(sock, server_hostname=name)


def _read_response(tls: ssl.SSLSocket, buf: bytearray) -> int:
    """Read one response with Content-Length; returns the body size."""
    while b"\r\n\r\n" not in buf:
        chunk = tls.recv(65536)
        if not chunk:
            raise OSError("closed mid-response")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    got = len(rest)
    while got < length:
        chunk = tls.recv(262144)
        if not chunk:
            raise OSError("closed mid-body")
        got += len(chunk)
    buf.clear()
    if got > length:
        buf += rest[length:] if len(rest) > length else b""
    return length


def _client(args: tuple[str, int, int, str, float, int]) -> tuple[int, int, int]:
    scenario, proxy, origin, cafile, seconds, cpu = args
    if cpu >= 0:
        _pin({cpu})
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    units = errors = nbytes = 0
    end = time.monotonic() + seconds
    request = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    if scenario.startswith("names:"):
        # distinct SNI names (CONNECT to localhost, TLS to n<i>.bench.test): each first use
        # is a certificate cache miss and a signature; the second pass must hit
        first, count = (int(x) for x in scenario.split(":")[1].split("-"))
        for i in range(first, first + count):
            name = f"n{i}.bench.test"
            try:
                with _tunnel(proxy, origin, ctx, name) as tls:
                    tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
                                .encode())  # fmt: skip
                    nbytes += _read_response(tls, bytearray())
                units += 1
            except OSError:
                errors += 1
        return units, errors, nbytes
    if scenario == "newconn":
        while time.monotonic() < end:
            try:
                with _tunnel(proxy, origin, ctx) as tls:
                    tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    nbytes += _read_response(tls, bytearray())
                units += 1
            except OSError:
                errors += 1
        return units, errors, nbytes
    path = b"/bulk" if scenario == "bulk" else b"/"
    request = b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"
    while time.monotonic() < end:
        try:
            with _tunnel(proxy, origin, ctx) as tls:
                buf = bytearray()
                while time.monotonic() < end:
                    tls.sendall(request)
                    nbytes += _read_response(tls, buf)
                    units += 1
        except OSError:
            errors += 1
    return units, errors, nbytes


def hottest(collapsed: Path, top: int = 5) -> list[tuple[str, float]]:
    """Functions by share of samples in which they were the innermost frame (self time),
    from py-spy's raw (collapsed-stack) output."""
    self_samples: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        name = leaf.split(" (", 1)[0] + " (" + leaf.split(" (", 1)[-1].split(":", 1)[0] + ")"
        self_samples[name] = self_samples.get(name, 0) + int(count)
        total += int(count)
    ranked = sorted(self_samples.items(), key=lambda kv: kv[1], reverse=True)[:top]
    return [(name, n / total) for name, n in ranked] if total else []


def run(
    seconds: float,
    clients: int,
    scenarios: list[str],
    keep: bool,
    profile: bool = False,
    workers: int = 1,
    names: int = 1000,
    stalled_subscriber: bool = False,
) -> list[Result]:
    if shutil.which("nginx") is None:
        raise SystemExit("nginx is not installed: apt-get install nginx-light")
    ncpu = os.cpu_count() or 1
    gw_cpus = {0} if ncpu > 1 else None
    client_cpus = list(range(1, ncpu)) or [-1]
    results: list[Result] = []
    with ExitStack() as stack:
        d = Path(tempfile.mkdtemp(prefix="tlsgate-bench-"))
        if not keep:
            stack.callback(shutil.rmtree, d, True)
        (d / "www").mkdir()
        (d / "www" / "1k").write_bytes(b"x" * 1024)
        (d / "www" / "10m").write_bytes(b"y" * BULK_BYTES)
        make_pki(d)
        origin_port, proxy_port = free_port(), free_port()
        (d / "nginx.conf").write_text(NGINX_CONF.format(dir=d, port=origin_port))
        stack.enter_context(running(["nginx", "-c", str(d / "nginx.conf"), "-e",
                                     str(d / "nginx-error.log")],
                                    _listening(origin_port), set(client_cpus) - {-1}))  # fmt: skip
        gw_pid = stack.enter_context(running(
            [sys.executable, "-m", "tlsgate", "run", "--state-dir", str(d / "state"), "--listen",
             f"127.0.0.1:{proxy_port}", "--upstream-ca-bundle", str(d / "ca.pem"),
             "--workers", str(workers),
             # the origin is on loopback, which a CONNECT may not reach by default
             "--allow-destination", "127.0.0.0/8"],
            _gateway_ready(proxy_port, d / "state", workers), gw_cpus))  # fmt: skip
        stalled = None
        if stalled_subscriber:
            # an IDS that stops reading: it must not slow the gateway, and must later learn
            # exactly what it missed from gap events
            stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.connect(str(d / "state" / "run" / "events.sock"))
            stack.callback(stalled.close)
        print(f"gateway pid {gw_pid} on CPU {gw_cpus or 'any'}; {clients} client processes; "
              f"{seconds:.0f} s per scenario", flush=True)  # fmt: skip
        with multiprocess.Pool(clients) as pool:
            for scenario in scenarios:
                if scenario == "names":
                    results.append(_names(pool, clients, proxy_port, origin_port, d, gw_pid,
                                          names))  # fmt: skip
                    continue
                gateway_ca = str(d / "state" / "ca" / "cert.pem")
                jobs = [(scenario, proxy_port, origin_port, gateway_ca, seconds,
                         client_cpus[i % len(client_cpus)]) for i in range(clients)]  # fmt: skip
                spy = None
                if profile:
                    spy = subprocess.Popen(
                        [_py_spy(), "record", "--pid", str(gw_pid), "--subprocesses",
                         "--rate", "250",
                         "--duration", str(max(1, int(seconds) - 1)), "--format", "raw",
                         "--output", str(d / f"profile-{scenario}.txt"), "--nonblocking"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                cpu0 = tree_cpu_seconds(gw_pid)
                t0 = time.monotonic()
                out = pool.map(_client, jobs)
                elapsed = time.monotonic() - t0
                cpu = tree_cpu_seconds(gw_pid) - cpu0
                if spy is not None:
                    spy.wait(timeout=30)
                units = sum(o[0] for o in out)
                errors = sum(o[1] for o in out)
                nbytes = sum(o[2] for o in out)
                if scenario == "bulk":
                    result = Result(scenario, nbytes, "bytes", elapsed, errors, cpu, nbytes)
                else:
                    unit = "conn" if scenario == "newconn" else "req"
                    result = Result(scenario, units, unit, elapsed, errors, cpu, nbytes)
                results.append(result)
                print(result.line(), flush=True)
                if spy is not None and (d / f"profile-{scenario}.txt").exists():
                    for name, share in hottest(d / f"profile-{scenario}.txt"):
                        print(f"    {share:6.1%}  {name}", flush=True)
        if stalled is not None:
            _drain_stalled(stalled)
        tree = process_tree(gw_pid)
        print(f"RSS: supervisor {rss_mib(gw_pid):.0f} MiB; its children (workers, and "
              "multiprocess's resource tracker) "
              + ", ".join(f"{rss_mib(p):.0f} MiB" for p in tree[1:]), flush=True)  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tlsgate loadtest loopback",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument(
        "--scenario", choices=("all", "newconn", "keepalive", "bulk", "names"), default="all"
    )
    parser.add_argument(
        "--names", type=int, default=1000, help="distinct server names in the names scenario (1000)"
    )
    parser.add_argument("--workers", type=int, default=1, help="gateway workers (1)")
    parser.add_argument(
        "--stalled-subscriber",
        action="store_true",
        help="keep a detection-socket subscriber that reads nothing during the run",
    )
    parser.add_argument("--json", action="store_true", help="print results as JSON too")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the gateway with py-spy and print its 5 hottest functions",
    )
    args = parser.parse_args(argv)
    scenarios = ["newconn", "keepalive", "bulk"] if args.scenario == "all" else [args.scenario]
    results = run(args.seconds, args.clients, scenarios, args.keep, args.profile, args.workers,
                  args.names, args.stalled_subscriber)  # fmt: skip
    if args.json:
        print(json.dumps([r.__dict__ for r in results]))
    return 1 if any(r.errors for r in results) else 0
