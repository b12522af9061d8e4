"""Summaries and ratios of the suite's rows (medians of rounds; losses never averaged)."""

from __future__ import annotations

from pathlib import Path

from tlsgate.loadtest.report import markdown, plot, ratios, summarize
from tlsgate.loadtest.suite import Row, Settings, plan


def _row(proxy: str, scenario: str, r: int, requests: int, cpu: float | None, **kw: object) -> Row:
    return Row(
        proxy,
        scenario,
        1,
        r,
        requests=requests,
        bytes=requests * 1000,
        seconds=1.0,
        cpu_s=cpu,
        p50_ms=1.0,
        p90_ms=2.0,
        p99_ms=3.0 + r,
        **kw,  # type: ignore[arg-type]
    )


def test_the_summary_takes_the_median_of_rounds_and_sums_errors_and_gaps() -> None:
    rows = [
        _row(
            "tlsgate",
            "newconn",
            0,
            100,
            0.3,
            errors=1,
            events_produced=10,
            events_received=9,
            events_gaps=1,
        ),
        _row(
            "tlsgate", "newconn", 1, 300, 0.6, events_produced=10, events_received=10, events_gaps=0
        ),
        _row(
            "tlsgate", "newconn", 2, 200, 0.2, events_produced=5, events_received=5, events_gaps=0
        ),
    ]
    (entry,) = summarize(rows)
    assert entry["rate"] == 200 and entry["p99_ms"] == 4.0
    assert entry["cpu_per_1k"] == 2.0  # per-round 3.0, 2.0, 1.0
    assert entry["errors"] == 1
    assert (entry["events_produced"], entry["events_received"], entry["events_gaps"]) == (25, 24, 1)


def test_a_scenario_that_does_not_apply_is_reported_as_such_not_as_a_result() -> None:
    rows = [Row("sslsplit", "h2", 1, 0, status="n/a: no HTTP/2 through this proxy")]
    (entry,) = summarize(rows)
    assert entry["status"].startswith("n/a") and "rate" not in entry


def test_ratios_are_tlsgate_over_each_peer_per_scenario() -> None:
    rows = [
        _row("tlsgate", "newconn", 0, 400, 1.0),
        _row("sslsplit", "newconn", 0, 200, 1.0),
        _row("none", "newconn", 0, 800, None),
    ]
    by_peer = {r["versus"]: r for r in ratios(summarize(rows))}
    assert by_peer["sslsplit"]["rate"] == 2.0 and by_peer["sslsplit"]["cpu_per_1k"] == 0.5
    assert by_peer["none"]["rate"] == 0.5 and by_peer["none"]["cpu_per_1k"] is None


def test_paired_ratios_take_each_rounds_ratio_so_machine_drift_cancels() -> None:
    # the machine slows down 4x in round 1 and speeds up 2x in round 2, for both proxies
    rows = [
        _row("tlsgate", "newconn", 0, 400, 0.4),
        _row("sslsplit", "newconn", 0, 200, 0.4),
        _row("tlsgate", "newconn", 1, 100, 0.4),
        _row("sslsplit", "newconn", 1, 50, 0.4),
        _row("tlsgate", "newconn", 2, 800, 0.4),
        _row("sslsplit", "newconn", 2, 700, 0.4),
    ]
    summary = summarize(rows)
    (ratio,) = ratios(summary, rows)
    assert ratio["rate"] == 400 / 200  # medians of each side: from different rounds
    assert ratio["rate_paired"] == 2.0  # per round 2.0, 2.0, 1.14
    assert ratio["cpu_per_1k_paired"] == 0.5
    ours = next(e for e in summary if e["proxy"] == "tlsgate")
    assert (ours["rate_min"], ours["rate_max"]) == (100, 800)
    assert "| 400.0 conn/s (100.0–800.0) |" in markdown(summary, [ratio])


def test_rounds_interleave_the_proxies_and_the_ceiling_and_scaling_runs_only_for_tlsgate() -> None:
    s = Settings(
        seconds=1,
        rounds=2,
        workers=1,
        scaling=[1, 2],
        scenarios=["newconn", "idle"],
        proxies=["tlsgate", "sslsplit"],
        connections=1,
        names=1,
        idle=1,
        gateway_cpus={0},
        client_cpus={1},
        out=Path("."),
    )
    steps = [(r, p, w) for r, p, w, _ in plan(s)]
    assert steps == [
        (0, "none", 1),
        (0, "tlsgate", 1),
        (0, "tlsgate", 1),
        (0, "tlsgate", 2),
        (0, "sslsplit", 1),
        (1, "none", 1),
        (1, "tlsgate", 1),
        (1, "tlsgate", 1),
        (1, "tlsgate", 2),
        (1, "sslsplit", 1),
    ]
    assert plan(s)[0][3] == ["newconn"]  # nothing to hold open or mint without a proxy
    # what upstream session reuse saves is measured on a gateway started without it
    assert plan(s)[2][3] == ["newconn@no-upstream-reuse"]


def test_plots_are_written_for_throughput_latency_and_scaling(tmp_path: Path) -> None:
    rows = [
        _row("tlsgate", "newconn", 0, 400, 1.0),
        _row("none", "newconn", 0, 800, None),
        Row("tlsgate", "newconn@scaling", 2, 0, requests=700, seconds=1.0),
    ]
    made = plot(summarize(rows), tmp_path)
    assert [p.name for p in made] == ["throughput.png", "latency.png", "scaling.png"]
    assert all(p.stat().st_size > 1000 for p in made)
