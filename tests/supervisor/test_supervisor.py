"""The supervisor with several workers: every worker serves, steering is counted exactly,
and killing or replacing workers under load loses no connection the client opened."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.gateway import Gateway, Origin
from tests.loadclient import run_load

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the supervisor runs as root")


def tlsgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tlsgate", *args], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def status(gw: Gateway) -> dict[str, Any]:
    result = tlsgate("status", "--json", "--state-dir", str(gw.state_dir))
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def wait_workers_ready(gw: Gateway, n: int, timeout: float = 30) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        st = status(gw)
        ready = [w for w in st["workers"] if w["alive"] and w["heartbeat_age"] < 5]
        if len(ready) == n or time.monotonic() > end:
            return st
        time.sleep(0.1)


@pytest.mark.parametrize("workers", [2, 4])
def test_every_worker_serves_and_steering_counts_match_what_workers_accepted(
    tmp_path: Path, pki: dict[str, Path], origin: Origin, workers: int
) -> None:
    with Gateway(tmp_path, upstream_ca=pki["ca"], args=["--workers", str(workers)]) as gw:
        wait_workers_ready(gw, workers)
        load = run_load((gw.host, gw.port), origin.port, str(gw.ca_cert), total=200,
                        concurrency=8)  # fmt: skip
        assert load.failures == []
        time.sleep(1.5)  # one heartbeat: workers publish their counters every second
        st = status(gw)
        accepted = [w["accepted"] for w in st["workers"]]
        assert all(a > 0 for a in accepted), accepted
        assert sum(accepted) == 200
        if st["steering"]["state"] == "ebpf":
            assert [w["steered"] for w in st["workers"]] == accepted


def test_killing_a_worker_and_reloading_all_under_load_loses_no_connection(
    tmp_path: Path, pki: dict[str, Path], origin: Origin
) -> None:
    with Gateway(tmp_path, upstream_ca=pki["ca"], args=["--workers", "2"]) as gw:
        st = wait_workers_ready(gw, 2)
        victim = st["workers"][0]["pid"]
        results: dict[str, Any] = {}
        loader = threading.Thread(
            target=lambda: results.setdefault(
                "load",
                run_load(
                    (gw.host, gw.port), origin.port, str(gw.ca_cert), total=2000, concurrency=16
                ),
            )
        )
        loader.start()
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        time.sleep(1.0)
        reloading = time.monotonic()
        reload = tlsgate("reload", "--state-dir", str(gw.state_dir))
        assert reload.returncode == 0, reload.stderr
        loader.join(300)
        load = results["load"]
        assert load.ok + len(load.failures) == 2000
        # Only connections the killed worker was serving at that instant may fail (at most
        # one per client thread); nothing queued, and nothing during or after the reload.
        assert len(load.failures) <= 16, load.failures
        assert all(killed <= t < reloading for t in load.failure_times), load.failures
        st = wait_workers_ready(gw, 2)
        assert victim not in [w["pid"] for w in st["workers"]]
        assert st["reloads"] == 1


def test_status_is_served_on_a_root_only_control_socket(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    with Gateway(tmp_path, upstream_ca=pki["ca"], args=["--workers", "2"]) as gw:
        st = wait_workers_ready(gw, 2)
        assert [w["id"] for w in st["workers"]] == [0, 1]
        assert all(isinstance(w["pid"], int) for w in st["workers"])
        sock = tmp_path / "run" / "control.sock"
        assert (sock.stat().st_mode & 0o777) == 0o600
        human = tlsgate("status", "--state-dir", str(gw.state_dir))
        assert human.returncode == 0 and "worker" in human.stdout


def test_a_worker_runs_unprivileged_and_cannot_open_the_ca_key(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    with Gateway(tmp_path, upstream_ca=pki["ca"], args=["--workers", "1"]) as gw:
        st = wait_workers_ready(gw, 1)
        pid = st["workers"][0]["pid"]
        uid_line = next(
            line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("Uid:")
        )  # fmt: skip
        uids = {int(u) for u in uid_line.split()[1:]}
        assert 0 not in uids  # real, effective, saved and filesystem uid all dropped
        uid = uids.pop()
        key = tmp_path / "ca" / "key.pem"
        probe = subprocess.run(
            [sys.executable, "-c", f"open({str(key)!r}, 'rb')"],
            user=uid, extra_groups=[], capture_output=True,
            text=True, timeout=30,
        )  # fmt: skip
        assert probe.returncode != 0 and "PermissionError" in probe.stderr
        # the worker's own view: its open files never include the key
        fds = [os.readlink(p) for p in Path(f"/proc/{pid}/fd").iterdir()]
        assert str(key) not in fds


def bpftool_prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         timeout=30, check=True).stdout  # fmt: skip
    return {int(p["id"]) for p in json.loads(out) if p.get("name") == "tlsgate_steer"}


@pytest.mark.skipif(not shutil.which("bpftool"), reason="needs bpftool")
def test_the_steering_program_is_loaded_while_running_and_gone_after_exit(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    gw = Gateway(tmp_path, upstream_ca=pki["ca"], args=["--workers", "2", "--steering", "ebpf"])
    with gw:
        st = wait_workers_ready(gw, 2)
        assert st["steering"]["state"] == "ebpf"
        prog_id = st["steering"]["prog_id"]
        assert prog_id in bpftool_prog_ids()
    assert gw.proc is not None and gw.proc.returncode == 0
    assert prog_id not in bpftool_prog_ids()


def test_without_ebpf_the_kernel_hash_steers_with_exactly_one_warning(
    tmp_path: Path, pki: dict[str, Path], origin: Origin
) -> None:
    no_headers = {"BCC_KERNEL_SOURCE": str(tmp_path / "no-headers")}
    gw = Gateway(tmp_path / "a", upstream_ca=pki["ca"], args=["--workers", "2"], env=no_headers)
    with gw:
        st = wait_workers_ready(gw, 2)
        assert st["steering"]["state"] == "kernel-hash"
        load = run_load((gw.host, gw.port), origin.port, str(gw.ca_cert), total=40)
        assert load.failures == []
    warnings = [line for line in gw.stderr_tail.splitlines() if "eBPF" in line]
    assert len(warnings) == 1 and "kernel's reuseport hash" in warnings[0]
    strict = Gateway(tmp_path / "b", upstream_ca=pki["ca"],
                     args=["--workers", "2", "--steering", "ebpf"], env=no_headers)  # fmt: skip
    result = subprocess.run(strict.argv, capture_output=True, text=True, timeout=60,
                            env={**os.environ, **no_headers})  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--steering ebpf" in result.stderr


def test_sighup_reloads_the_ca_and_replaces_every_worker(
    tmp_path: Path, pki: dict[str, Path], origin: Origin
) -> None:
    with Gateway(tmp_path, upstream_ca=pki["ca"], args=["--workers", "2"]) as gw:
        st = wait_workers_ready(gw, 2)
        old_pids = {w["pid"] for w in st["workers"]}
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            st = status(gw)
            if st["reloads"] == 1 and not old_pids & {w["pid"] for w in st["workers"]}:
                break
            time.sleep(0.1)
        assert st["reloads"] == 1
        assert not old_pids & {w["pid"] for w in st["workers"]}
        assert run_load((gw.host, gw.port), origin.port, str(gw.ca_cert), total=20).failures == []


def test_metrics_are_served_in_prometheus_text_format(tmp_path: Path, pki: dict[str, Path]) -> None:
    with Gateway(tmp_path, upstream_ca=pki["ca"], args=["--workers", "2"]) as gw:
        wait_workers_ready(gw, 2)
        result = tlsgate("metrics", "--state-dir", str(gw.state_dir))
        assert result.returncode == 0, result.stderr
        assert "# TYPE tlsgate_connections_accepted_total counter" in result.stdout
        assert 'tlsgate_connections_active{worker="1"}' in result.stdout
        # the shared per-client table: a row per worker, nothing counted while idle
        assert "tlsgate_client_table_rows_in_use 2\n" in result.stdout
        assert "tlsgate_client_table_connections 0\n" in result.stdout


def test_a_worker_that_cannot_boot_stops_the_supervisor_with_its_reason(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    garbage = tmp_path / "bundle.pem"
    garbage.write_text("this is not a certificate bundle\n")
    gw = Gateway(tmp_path / "state", upstream_ca=garbage, args=["--workers", "2"])
    result = subprocess.run(gw.argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tlsgate: error: worker") and "failed to start 5 times" in last
    assert "cannot start" in result.stderr  # the worker's own reason is shown above it


def test_a_hung_worker_is_killed_after_its_heartbeat_stops_and_replaced(
    tmp_path: Path, pki: dict[str, Path], origin: Origin
) -> None:
    with Gateway(tmp_path, upstream_ca=pki["ca"], args=["--workers", "2"]) as gw:
        st = wait_workers_ready(gw, 2)
        hung = st["workers"][1]["pid"]
        os.kill(hung, signal.SIGSTOP)
        try:
            end = time.monotonic() + 25
            while time.monotonic() < end:
                pids = [w["pid"] for w in status(gw)["workers"]]
                if hung not in pids and all(pids):
                    break
                time.sleep(0.2)
            assert hung not in pids
        finally:
            try:
                os.kill(hung, signal.SIGCONT)
            except ProcessLookupError:
                pass  # already killed by the supervisor, as it should be
        wait_workers_ready(gw, 2)
        assert run_load((gw.host, gw.port), origin.port, str(gw.ca_cert), total=20).failures == []


def test_sigterm_drains_in_flight_connections_before_exiting(
    tmp_path: Path, pki: dict[str, Path], origin: Origin
) -> None:
    import ssl

    gw = Gateway(tmp_path, upstream_ca=pki["ca"], args=["--workers", "2"])
    with gw:
        wait_workers_ready(gw, 2)
        ctx = ssl.create_default_context(cafile=str(gw.ca_cert))
        raw = socket.create_connection((gw.host, gw.port), timeout=10)
        raw.sendall(f"CONNECT localhost:{origin.port} HTTP/1.1\r\n\r\n".encode())
        assert raw.recv(1024).startswith(b"HTTP/1.1 200")
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # the gateway no longer accepts ...
        with pytest.raises(OSError):
            socket.create_connection((gw.host, gw.port), timeout=2).close()
        # ... but the tunnel that was open keeps working until the client ends it
        tls.sendall(b"GET /during-drain HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
        tls.close()
        assert b"hello from /during-drain" in answer
        assert gw.proc.wait(timeout=30) == 0


def test_drain_replaces_one_worker_and_the_old_one_exits(
    tmp_path: Path, pki: dict[str, Path], origin: Origin
) -> None:
    with Gateway(tmp_path, upstream_ca=pki["ca"], args=["--workers", "2"]) as gw:
        before = wait_workers_ready(gw, 2)["workers"]
        result = tlsgate("drain", "1", "--state-dir", str(gw.state_dir))
        assert result.returncode == 0, result.stderr
        after = wait_workers_ready(gw, 2)["workers"]
        assert after[0]["pid"] == before[0]["pid"]
        assert after[1]["pid"] != before[1]["pid"]
        old = before[1]["pid"]
        end = time.monotonic() + 30
        while Path(f"/proc/{old}").exists() and time.monotonic() < end:
            time.sleep(0.1)
        assert not Path(f"/proc/{old}").exists() or "zombie" in Path(
            f"/proc/{old}/status").read_text()  # fmt: skip
        assert run_load((gw.host, gw.port), origin.port, str(gw.ca_cert), total=20).failures == []
