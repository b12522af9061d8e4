"""Load-generator argv and output parsing, from captured outputs (no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlsgate.loadtest.generators import h2load_argv, parse_h2load, parse_wrk, wrk_argv

WRK_OUT = (
    "Running 3s test @ https://bench.test/\n  1 threads and 32 connections\n"
    '{"wrk": 1, "requests": 1200, "bytes": 1500000, "duration_us": 3000000, "connect": 1, '
    '"read": 2, "write": 0, "status": 3, "timeout": 0, "p50_us": 1500, "p90_us": 2500, '
    '"p99_us": 9000}\n'
)

H2LOAD_OUT = """finished in 3.00s, 12567.00 req/s, 1.56MB/s
requests: 37701 total, 37711 started, 37701 done, 37700 succeeded, 1 failed, 0 errored, 0 timeout
traffic: 4.69MB (4917555) total, 109.53KB (112158) headers (space savings 95.19%)
"""


def test_a_wrk_report_line_gives_rate_inputs_latency_in_ms_and_every_error_kind() -> None:
    m = parse_wrk(WRK_OUT)
    assert (m.requests, m.bytes, m.seconds) == (1200, 1500000, 3.0)
    assert (m.p50_ms, m.p90_ms, m.p99_ms) == (1.5, 2.5, 9.0)
    assert m.errors == 6
    assert m.error_detail == {"connect": 1, "read": 2, "write": 0, "status": 3, "timeout": 0}


def test_wrk_output_without_the_report_line_is_an_error_not_zero_requests() -> None:
    with pytest.raises(ValueError, match="no report line"):
        parse_wrk("unable to connect to bench.test:https Connection refused\n")


def test_h2load_counts_failures_as_errors_and_takes_percentiles_from_its_log() -> None:
    log = "\n".join(f"{i} 200 {(i + 1) * 1000}" for i in range(100)) + "\n5 500 999999\n"
    m = parse_h2load(H2LOAD_OUT, log)
    assert m.requests == 37700 and m.errors == 1 and m.bytes == 4917555
    assert m.seconds == 3.0
    assert m.p50_ms == pytest.approx(50, abs=1) and m.p99_ms == pytest.approx(99, abs=1)


def test_h2load_without_a_summary_is_an_error() -> None:
    with pytest.raises(ValueError, match="no request summary"):
        parse_h2load("", "")


def test_new_connection_runs_ask_the_server_to_close_after_each_response() -> None:
    argv = wrk_argv(
        "https://bench.test/", connections=8, seconds=2.4, script=Path("r.lua"), close=True
    )
    assert argv[:4] == ["wrk", "-t1", "-c8", "-d2s"]
    assert argv[-3:] == ["-H", "Connection: close", "https://bench.test/"]
    assert "Connection: close" not in wrk_argv(
        "https://x/", connections=1, seconds=1, script=Path("r.lua"), close=False
    )


def test_h2load_runs_for_a_duration_with_streams_per_connection() -> None:
    argv = h2load_argv("https://b/", connections=4, streams=10, seconds=3, log_file=Path("l"))
    assert argv == ["h2load", "-c", "4", "-m", "10", "-D", "3", "--log-file", "l", "https://b/"]
