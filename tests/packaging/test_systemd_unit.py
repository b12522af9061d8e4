"""packaging/tlsgate.service: systemd accepts every line of it, it carries the hardening we
promise, and the capability bounding set it names is enough for the supervisor to start
with eBPF steering, intercept, reload (signalling workers that dropped root) and stop —
and the set without CAP_BPF is not. systemd is not PID 1 here, so the bounding set and
NoNewPrivileges are applied with setpriv, exactly as the unit lists them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gateway import Gateway, Origin

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "tlsgate.service"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root (capabilities are dropped from root's) and setpriv",
)


def unit_settings() -> dict[str, str]:
    settings: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def bounding_set() -> list[str]:
    return unit_settings()["CapabilityBoundingSet"].split()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_verify_accepts_the_unit_without_a_warning(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at this tree's tlsgate
    tlsgate = Path(sys.executable).parent / "tlsgate"
    unit = tmp_path / "tlsgate.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/tlsgate", str(tlsgate)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""


def test_the_unit_carries_the_promised_hardening() -> None:
    s = unit_settings()
    assert s["NoNewPrivileges"] == "yes"
    assert s["ProtectSystem"] == "strict" and s["ProtectHome"] == "yes"
    assert s["PrivateTmp"] == "yes"
    assert s["StateDirectory"] == "tlsgate" and s["StateDirectoryMode"] == "0700"
    assert s["RuntimeDirectory"] == "tlsgate" and s["RuntimeDirectoryMode"] == "0750"
    assert s["Restart"] == "on-failure"
    assert s["ExecReload"].split()[1] == "reload"
    assert "CAP_SYS_ADMIN" not in bounding_set()


def setpriv(caps: list[str]) -> list[str]:
    spec = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps)])
    return ["setpriv", "--no-new-privs", "--bounding-set", spec, "--"]


def tlsgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tlsgate", *args], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_the_units_capabilities_suffice_to_start_with_ebpf_intercept_reload_and_stop(
    tmp_path: Path, pki: dict[str, Path], origin: Origin
) -> None:
    gw = Gateway(tmp_path / "state", upstream_ca=pki["ca"],
                 args=["--steering", "ebpf", "--workers", "2"])  # fmt: skip
    gw.argv = [*setpriv(bounding_set()), *gw.argv]
    with gw:
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "10", "--proxy", gw.proxy, "--cacert",
             str(gw.ca_cert), f"https://localhost:{origin.port}/capped"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout == "hello from /capped\n"
        assert gw.proc is not None
        status = Path(f"/proc/{gw.proc.pid}/status").read_text()
        bnd = next(line for line in status.splitlines() if line.startswith("CapBnd:"))
        assert int(bnd.split()[1], 16) == caps_mask(bounding_set())
        reload = tlsgate("reload", "--state-dir", str(gw.state_dir))
        assert reload.returncode == 0, reload.stderr  # old workers (nobody) were signalled
        again = subprocess.run(
            ["curl", "-sS", "--max-time", "10", "--proxy", gw.proxy, "--cacert",
             str(gw.ca_cert), f"https://localhost:{origin.port}/after-reload"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert again.returncode == 0, again.stderr
    assert gw.proc is not None and gw.proc.returncode == 0, gw.stderr_tail


def test_without_cap_bpf_required_ebpf_steering_refuses_to_start(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    caps = [c for c in bounding_set() if c != "CAP_BPF"]
    argv = [*setpriv(caps), sys.executable, "-m", "tlsgate", "run", "--state-dir",
            str(tmp_path / "state"), "--listen", "127.0.0.1:0", "--steering", "ebpf"]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "eBPF steering is unavailable" in result.stderr


def caps_mask(names: list[str]) -> int:
    numbers = {"CAP_CHOWN": 0, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7,
               "CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12, "CAP_BPF": 39}  # fmt: skip
    return sum(1 << numbers[n] for n in names)
