"""The suite end to end, tiny (correctness, not speed): every scenario produces its row
with zero errors and zero event losses, and everything it built is gone afterwards, also
after SIGINT and SIGTERM."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.netns import requires_netns

pytestmark = [
    requires_netns,
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("nginx", "wrk", "h2load", "cc", "nft")),
        reason="needs nginx, wrk, h2load, nft and a C compiler (scripts/setup.sh test)",
    ),
]

TOPOLOGY_RE = re.compile(r"topology (tgc-\w+) → (tgg-\w+) → (tgs-\w+) in (\S+);")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for PID 1, which may not reap it in a
    container: it holds nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _loadtest(*args: str) -> list[str]:
    return [sys.executable, "-m", "tlsgate", "loadtest", *args]


def _run_suite(out: Path, *args: str, timeout: float) -> tuple[dict[str, Any], str]:
    """``tlsgate loadtest ARGS --out OUT`` to the end (exit 0): results.json, and stdout."""
    done = subprocess.run(
        _loadtest(*args, "--out", str(out)), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc: dict[str, Any] = json.loads((out / "results.json").read_text())
    return doc, done.stdout


@pytest.mark.timeout(240)
def test_a_tiny_run_reports_every_scenario_with_zero_errors_and_no_lost_events(
    tmp_path: Path,
) -> None:
    doc, stdout = _run_suite(
        tmp_path,
        "--seconds",
        "1",
        "--rounds",
        "1",
        "--scaling",
        "2",
        "--names",
        "50",
        "--idle",
        "20",
        "--connections",
        "4",
        timeout=220,
    )
    rows = {(r["proxy"], r["scenario"], r["workers"]): r for r in doc["rows"]}
    expected = {
        ("tlsgate", s, 1)
        for s in ("newconn", "newconn-resumed", "keepalive", "bulk", "names", "h2", "mixed", "idle")
    }
    expected |= {("none", s, 1) for s in ("newconn", "keepalive", "bulk", "h2", "mixed")}
    expected |= {("tlsgate", "newconn@scaling", 2), ("tlsgate", "keepalive@scaling", 2),
                 ("tlsgate", "newconn@no-upstream-reuse", 1)}  # fmt: skip
    assert expected <= set(rows)
    for key in expected:
        row = rows[key]
        if row["status"] != "ok":
            # only HTTP/2 may be not applicable, and then it says so
            assert key[1] == "h2" and row["status"].startswith("n/a"), row
            continue
        assert row["errors"] == 0, row
        assert row["requests"] > 0, row
        if key[0] == "tlsgate":
            assert row["cpu_s"] > 0 and row["rss_mib"], row
            assert row["events_gaps"] == 0, row
            assert row["events_received"] == row["events_produced"] > 0, row
    assert rows[("tlsgate", "idle", 1)]["requests"] == 20
    # every new connection a full handshake with the client (the shim), seen by the gateway
    newconn = rows[("tlsgate", "newconn", 1)]
    assert newconn["closes"] >= newconn["requests"] and newconn["client_resumed"] == 0
    assert rows[("tlsgate", "newconn-resumed", 1)]["client_resumed"] > 0
    assert newconn["upstream_resumed"] > 0
    assert rows[("tlsgate", "newconn@no-upstream-reuse", 1)]["upstream_resumed"] == 0
    assert rows[("tlsgate", "bulk", 1)]["bytes"] >= 10 * 1024 * 1024
    for png in ("throughput.png", "latency.png", "scaling.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert "tlsgate load test" in stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_tears_down_namespaces_processes_and_files(
    tmp_path: Path, sig: signal.Signals
) -> None:
    proc = subprocess.Popen(
        _loadtest(
            "--seconds", "30", "--scenario", "keepalive", "--no-ceiling", "--out", str(tmp_path)
        ),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        match = None
        while match is None and time.monotonic() < deadline:
            text = proc.stderr.readline()
            assert text or proc.poll() is None, "the suite exited before building its topology"
            match = TOPOLOGY_RE.search(text)
        assert match is not None
        ours = set(match.groups()[:3])
        workdir = Path(match.group(4))
        assert workdir.is_dir()
        assert ours <= _namespaces()
        # let the load start in the client namespace (the gateway is up by then)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pids = subprocess.run(
                ["ip", "netns", "pids", match.group(1)], capture_output=True, text=True, check=False
            ).stdout.split()
            if pids:
                break
            time.sleep(0.1)
        assert pids, "no load generator started"
        gateway_pids = subprocess.run(
            ["ip", "netns", "pids", match.group(2)], capture_output=True, text=True
        ).stdout.split()
        assert len(gateway_pids) >= 2  # the supervisor and its worker
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    assert not ours & _namespaces()
    assert not Path(f"/etc/netns/{match.group(1)}").exists()
    for pid in gateway_pids:
        assert not _running(int(pid)), f"process {pid} outlived the run"
    assert not workdir.exists()


def _squid_leftovers() -> tuple[set[Path], set[int]]:
    """Run directories of squid peers, and squid processes started from one."""
    from tlsgate.loadtest.proxies import SQUID_RUNDIR_PREFIX

    dirs = set(Path(tempfile.gettempdir()).glob(SQUID_RUNDIR_PREFIX + "*"))
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        if SQUID_RUNDIR_PREFIX.encode() in cmdline and _running(int(entry.name)):
            pids.add(int(entry.name))
    return dirs, pids


@pytest.mark.timeout(300)
def test_a_tiny_run_against_squid_gives_its_rows_and_ratios_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    from tlsgate.loadtest.proxies import ProxyError, install_squid

    try:
        install_squid()
    except ProxyError as exc:
        pytest.skip(f"squid-openssl cannot be installed here: {exc}")
    dirs_before, pids_before = _squid_leftovers()
    doc, _ = _run_suite(
        tmp_path,
        "--seconds",
        "1",
        "--rounds",
        "1",
        "--connections",
        "4",
        "--no-ceiling",
        "--no-plots",
        "--scenario",
        "newconn",
        "--scenario",
        "keepalive",
        "--scenario",
        "h2",
        "--against",
        "squid",
        timeout=240,
    )
    rows = {(r["proxy"], r["scenario"]): r for r in doc["rows"]}
    for scenario in ("newconn", "keepalive"):
        row = rows[("squid", scenario)]
        assert row["status"] == "ok" and row["errors"] == 0 and row["requests"] > 0, row
        # the squid process and its certificate helpers, measured like the others
        assert row["cpu_s"] > 0 and row["rss_mib"] and row["rss_mib"][0] > 0, row
    # squid 5 does not offer HTTP/2 to a bumped client: not applicable, never a pass
    assert rows[("squid", "h2")]["status"].startswith("n/a"), rows[("squid", "h2")]
    versus = {(r["scenario"], r["versus"]) for r in doc["ratios"]}
    assert {("newconn", "squid"), ("keepalive", "squid")} <= versus
    dirs_after, pids_after = _squid_leftovers()
    assert dirs_after <= dirs_before and pids_after <= pids_before
