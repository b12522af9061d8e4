"""Load generators as argv builders and output parsers (no processes started here).

wrk (HTTP/1.1) reports through ``report.lua``: one JSON line at the end. h2load (HTTP/2)
prints a summary and, with ``--log-file``, one line per request (start, status, latency µs).
Both parse into :class:`Measured`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path


@dataclass
class Measured:
    """What a load generator saw in one run."""

    requests: int
    bytes: int
    seconds: float
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    error_detail: dict[str, int] = field(default_factory=dict)


def lua_script(directory: Path) -> Path:
    path = directory / "report.lua"
    path.write_bytes(resources.files("tlsgate.loadtest").joinpath("report.lua").read_bytes())
    return path


def wrk_argv(
    url: str, *, connections: int, seconds: float, script: Path, close: bool, threads: int = 1
) -> list[str]:
    """wrk with ``connections`` connections for ``seconds``; ``close`` asks the server to
    close after each response, so every request opens a new TLS connection."""
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{max(connections, threads)}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
    ]
    if close:
        argv += ["-H", "Connection: close"]
    return [*argv, url]


def parse_wrk(stdout: str) -> Measured:
    """The JSON line of ``report.lua``; raises ValueError if wrk printed none."""
    for line in reversed(stdout.splitlines()):
        if line.startswith('{"wrk"'):
            r = json.loads(line)
            detail = {k: int(r[k]) for k in ("connect", "read", "write", "status", "timeout")}
            return Measured(
                requests=int(r["requests"]),
                bytes=int(r["bytes"]),
                seconds=r["duration_us"] / 1e6,
                errors=sum(detail.values()),
                p50_ms=r["p50_us"] / 1000,
                p90_ms=r["p90_us"] / 1000,
                p99_ms=r["p99_us"] / 1000,
                error_detail=detail,
            )
    raise ValueError(f"wrk printed no report line; its output was: {stdout[-500:]!r}")


def h2load_argv(
    url: str, *, connections: int, streams: int, seconds: float, log_file: Path
) -> list[str]:
    return [
        "h2load",
        "-c",
        str(connections),
        "-m",
        str(streams),
        "-D",
        str(max(1, round(seconds))),
        "--log-file",
        str(log_file),
        url,
    ]


_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_FINISHED = re.compile(r"finished in ([\d.]+)(m?s)")
_TRAFFIC = re.compile(r"traffic: [\d.]+\w* \((\d+)\) total")


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def parse_h2load(stdout: str, log_text: str) -> Measured:
    """h2load's summary and its per-request log (``start_us status latency_us``)."""
    m = _REQUESTS.search(stdout)
    if m is None:
        raise ValueError(f"h2load printed no request summary; its output was: {stdout[-500:]!r}")
    _total, _started, _done, ok, failed, errored, timeout = (int(g) for g in m.groups())
    fin = _FINISHED.search(stdout)
    seconds = float(fin.group(1)) / (1000 if fin.group(2) == "ms" else 1) if fin else 0.0
    traffic = _TRAFFIC.search(stdout)
    latencies = sorted(
        int(parts[2]) / 1000
        for parts in (line.split() for line in log_text.splitlines())
        if len(parts) >= 3 and parts[1].isdigit() and parts[1].startswith("2")
    )
    detail = {"failed": failed, "errored": errored, "timeout": timeout}
    return Measured(
        requests=ok,
        bytes=int(traffic.group(1)) if traffic else 0,
        seconds=seconds,
        errors=failed + errored + timeout,
        p50_ms=_percentile(latencies, 50),
        p90_ms=_percentile(latencies, 90),
        p99_ms=_percentile(latencies, 99),
        error_detail=detail,
    )
