"""The example consumer in examples/ works against a real gateway's detection socket."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.gateway import Gateway, Origin

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "path_alert.py"


def load_example():  # type: ignore[no-untyped-def]
    import importlib.util

    spec = importlib.util.spec_from_file_location("path_alert", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rule_alerts_on_matching_paths_and_on_gaps_only() -> None:
    rule = load_example()
    events = [
        {"type": "http", "ts": 1.0, "path": "/index.html", "client_ip": "10.0.0.5"},
        {"type": "http", "ts": 2.0, "path": "/wp-admin/setup.php", "client_ip": "10.0.0.6",
         "client_port": 5555, "server_ip": "198.18.0.1", "server_port": 443, "sni": "a.test",
         "method": "GET", "host": "a.test", "conn": "0-7"},
        {"type": "conn_close", "ts": 3.0},
        {"type": "gap", "ts": 4.0, "dropped": 12, "stage": "subscriber"},
    ]  # fmt: skip
    out = list(rule.alerts(events, re.compile(r"/wp-admin")))
    assert [a["alert"] for a in out] == ["suspicious request path", "events lost"]
    assert out[0]["path"] == "/wp-admin/setup.php" and out[0]["client"] == "10.0.0.6:5555"
    assert out[1]["dropped"] == 12


@pytest.mark.skipif(os.geteuid() != 0, reason="the supervisor runs as root")
def test_the_example_raises_an_alert_for_a_request_made_through_a_real_gateway(
    tmp_path: Path, pki: dict[str, Path], origin: Origin
) -> None:
    with Gateway(tmp_path / "state", upstream_ca=pki["ca"], args=["--workers", "1"]) as gw:
        consumer = subprocess.Popen(
            [sys.executable, str(EXAMPLE), r"\.\./|/etc/passwd", "--state-dir",
             str(tmp_path / "state")], stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            time.sleep(0.5)  # subscribed before the requests
            for path in ("/fine", "/static/../../etc/passwd"):
                subprocess.run(
                    ["curl", "-sS", "--path-as-is", "--max-time", "15", "--proxy", gw.proxy,
                     "--cacert", str(gw.ca_cert), f"https://localhost:{origin.port}{path}"],
                    capture_output=True, timeout=30, check=True,
                )  # fmt: skip
            assert consumer.stdout is not None
            alert = json.loads(consumer.stdout.readline())
        finally:
            consumer.terminate()
            consumer.wait(timeout=10)
            if consumer.stdout is not None:
                consumer.stdout.close()
    assert alert["alert"] == "suspicious request path"
    assert alert["path"] == "/static/../../etc/passwd"
    assert alert["sni"] == "localhost"
