"""Stopping workers the supervisor may not signal: without CAP_KILL a root supervisor
cannot signal workers that dropped to another user (EPERM). The stop must not end in a
traceback that leaves the other workers running: it says which pid could not be
signalled and why, stops every worker it can, and returns.

Real, not patched: a Python supervisor-side script runs under ``setpriv --bounding-set
-kill`` (root without CAP_KILL, as a unit without it would be), with one "worker" running
as ``nobody`` and one as root; the kernel really refuses the first signal. The test then
kills the leftover by its pid (it still has CAP_KILL)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root (to drop CAP_KILL and run a process as nobody) and setpriv",
)

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, socket, subprocess, sys
from tlsgate.supervisor.arbiter import Arbiter

class Proc:
    # what the arbiter uses of a multiprocess.Process, around a real process
    def __init__(self, user):
        self.popen = subprocess.Popen(["sleep", "120"], user=user, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.popen.pid
    def is_alive(self):
        return self.popen.poll() is None
    def join(self, timeout=None):
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

logs = []
arbiter = Arbiter(2, 0.0, lambda k: socket.socket(), lambda slot: None, lambda slot: None,
                  logs.append)
arbiter.slots[0].process = Proc("nobody")
arbiter.slots[1].process = Proc(None)
arbiter.stop_all()
print(json.dumps({"logs": logs, "nobody": arbiter.slots[0].process.pid,
                  "root": arbiter.slots[1].process.pid,
                  "root_alive": arbiter.slots[1].process.is_alive()}))
"""


def test_stop_all_without_cap_kill_reports_the_unsignalable_worker_and_stops_the_rest() -> None:
    result = subprocess.run(
        ["setpriv", "--bounding-set", "-kill", "--inh-caps", "-kill",
         sys.executable, "-c", SCRIPT],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    out = json.loads(result.stdout) if result.stdout else {}
    leftover = out.get("nobody")
    try:
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        assert not out["root_alive"], "the worker it could signal was not stopped"
        logs = "\n".join(out["logs"])
        assert f"cannot stop a worker (pid {leftover}, SIGTERM): permission denied" in logs
        assert "CAP_KILL" in logs and f"kill -TERM {leftover}" in logs
        assert f"workers still running after the stop: pids {leftover}" in logs
        # it really could not be signalled: still running
        assert Path(f"/proc/{leftover}").exists()
    finally:
        if leftover:
            try:
                os.kill(leftover, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while Path(f"/proc/{leftover}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)  # reparented: init reaps it
