"""Memory per connection is bounded by construction (workers/limits.py): the relay holds at
most one read per direction, inspectors keep header sections only, bodies are counted and
never buffered. Checked from outside: 50 MB up and 50 MB down through a real gateway, over
HTTP/1.1 and HTTP/2, while the worker's resident memory (peak, from /proc) barely moves. An
inspector that buffered a body would add at least 50 MB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gateway import Gateway, Origin
from tests.h2_server import H2Origin

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the supervisor runs as root")

BODY = 50 * 1024 * 1024
#: Growth of the worker's peak RSS allowed during the transfers (allocator noise, TLS
#: record buffers, event queues): far below one body.
ALLOWED_GROWTH = 8 * 1024 * 1024


@pytest.fixture
def gateway(tmp_path: Path, pki: dict[str, Path]) -> Iterator[Gateway]:
    args = ["--workers", "1"]
    with Gateway(tmp_path / "state", upstream_ca=pki["ca"], args=args) as gw:
        yield gw


def worker_pid(gw: Gateway) -> int:
    end = time.monotonic() + 30
    while True:
        result = subprocess.run(
            [sys.executable, "-m", "tlsgate", "status", "--json", "--state-dir",
             str(gw.state_dir)], capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        [worker] = json.loads(result.stdout)["workers"]
        if worker["alive"] and worker["pid"]:
            return int(worker["pid"])
        assert time.monotonic() < end, worker
        time.sleep(0.2)


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class PeakRss:
    """Samples VmRSS every 20 ms while running, and resets the kernel's peak (VmHWM) at the
    start so that the peak after the run is the peak during it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.start = memory_kib(self.pid, "VmRSS") * 1024
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.peak = max([memory_kib(self.pid, "VmHWM"), *self.samples]) * 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.samples.append(memory_kib(self.pid, "VmRSS"))


def curl(gw: Gateway, port: int, path: str, *extra: str) -> str:
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "180", "--proxy", gw.proxy, "--cacert", str(gw.ca_cert),
         "-o", "/dev/null", "-w", "%{http_version} %{size_upload} %{size_download}", *extra,
         f"https://localhost:{port}{path}"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def upload_args(body: Path) -> list[str]:
    # -T streams the file (curl does not hold it); no Expect: 100-continue round trip
    return ["-X", "POST", "-T", str(body), "-H", "Expect:",
            "-H", "Content-Type: application/octet-stream"]  # fmt: skip


@pytest.fixture(scope="module")
def body(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("body") / "upload.bin"
    path.write_bytes(os.urandom(1024 * 1024) * (BODY // (1024 * 1024)))
    return path


def assert_bounded(meter: PeakRss, what: str) -> None:
    growth = meter.peak - meter.start
    assert growth < ALLOWED_GROWTH, (
        f"{what}: the worker's peak RSS grew by {growth / 2**20:.1f} MiB "
        f"({meter.start / 2**20:.1f} -> {meter.peak / 2**20:.1f} MiB): something buffers"
    )


def test_50_mb_up_and_down_over_http1_leave_the_workers_memory_flat(
    gateway: Gateway, origin: Origin, body: Path
) -> None:
    pid = worker_pid(gateway)
    curl(gateway, origin.port, "/warm-up")
    with PeakRss(pid) as meter:
        # the origin echoes the body: 50 MB up, then 50 MB down, on one connection
        out = curl(gateway, origin.port, "/echo", *upload_args(body))
    assert out == f"1.1 {BODY} {BODY}", out
    assert_bounded(meter, "HTTP/1.1 upload and download")
    [http] = gateway.wait_match("http", lambda e: e.get("path") == "/echo")
    assert http["request_body_bytes"] == BODY and http["response_body_bytes"] == BODY


def test_50_mb_up_and_down_over_http2_leave_the_workers_memory_flat(
    gateway: Gateway, pki: dict[str, Path], body: Path
) -> None:
    pid = worker_pid(gateway)
    with H2Origin(pki["cert"], pki["key"]) as h2:
        curl(gateway, h2.port, "/warm-up", "--http2")
        with PeakRss(pid) as meter:
            up = curl(gateway, h2.port, "/echo", "--http2", *upload_args(body))
            down = curl(gateway, h2.port, f"/size/{BODY}", "--http2")
    assert up.startswith(f"2 {BODY} ") and down == f"2 0 {BODY}", (up, down)
    assert_bounded(meter, "HTTP/2 upload and download")
    exchanges: Any = gateway.wait_match("http", lambda e: e.get("path") in ("/echo",
                                        f"/size/{BODY}"), count=2)  # fmt: skip
    assert sorted(e["request_body_bytes"] + e["response_body_bytes"] for e in exchanges) == [
        BODY, BODY + len(f"{BODY}\n")]  # fmt: skip
