"""What the suite shows: live progress, the summary table, ratios and PNG plots.

:func:`summarize` reduces rows to one entry per (proxy, scenario, workers): the median of
the rounds for every figure, errors and event losses summed (a loss in any round counts).
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tlsgate.loadtest.suite import Row

FIGURES = ("rate", "p50_ms", "p90_ms", "p99_ms", "cpu_per_1k", "cpu_per_gb")
#: ratios tlsgate/peer: higher is better for rate, lower for CPU and latency
RATIO_FIGURES = ("rate", "cpu_per_1k", "cpu_per_gb", "p99_ms")


class Progress:
    """A rich progress bar over every measurement, printing each row as it lands."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self.console = Console(stderr=True)
        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self._task = self._bar.add_task("starting", total=total)

    def __enter__(self) -> Progress:
        self._bar.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._bar.stop()

    def say(self, text: str) -> None:
        self._bar.console.print(text)

    def describe(self, text: str) -> None:
        self._bar.update(self._task, description=text)

    def advance(self, row: Row) -> None:
        self._bar.advance(self._task)
        self.say(line(row))


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def line(row: Row) -> str:
    head = f"{row.proxy:>9} ×{row.workers} {row.scenario:<18} r{row.round + 1}"
    if row.status != "ok":
        return f"{head}  {row.status}"
    ev = ""
    if row.events_produced is not None:
        ev = f"  events {row.events_received}+{row.events_gaps} gaps/{row.events_produced}"
    if row.closes:
        ev += (
            f"  resumed client {row.client_resumed}/{row.closes} upstream "
            f"{row.upstream_resumed}/{row.closes}"
        )
    return (
        f"{head}  {_fmt(row.rate)} {row.unit}/s  p50/90/99 {_fmt(row.p50_ms, 2)}/"
        f"{_fmt(row.p90_ms, 2)}/{_fmt(row.p99_ms, 2)} ms  errors {row.errors}  "
        f"CPU {_fmt(row.cpu_per_1k, 3)} s/1k {_fmt(row.cpu_per_gb, 2)} s/GB  RSS "
        f"{'/'.join(f'{r:.0f}' for r in row.rss_mib) or '–'} MiB{ev}"
    )


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(rows: Sequence[Row]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.proxy, row.scenario, row.workers), []).append(row)
    out = []
    for (proxy, scenario, workers), group in groups.items():
        ok = [r for r in group if r.status == "ok"]
        entry: dict[str, Any] = {
            "proxy": proxy,
            "scenario": scenario,
            "workers": workers,
            "unit": group[0].unit,
            "rounds": len(group),
        }
        if not ok:
            entry["status"] = group[0].status
            out.append(entry)
            continue
        entry["status"] = "ok"
        entry["note"] = next((r.note for r in ok if r.note), "")
        for fig in FIGURES:
            entry[fig] = _median([getattr(r, fig) for r in ok])
        rates = [r.rate for r in ok]
        entry["rate_min"], entry["rate_max"] = min(rates), max(rates)
        entry["errors"] = sum(r.errors for r in ok)
        entry["requests"] = sum(r.requests for r in ok)
        rss = [max(r.rss_mib) for r in ok if r.rss_mib]
        entry["rss_max_mib"] = max(rss) if rss else None
        produced = [r.events_produced for r in ok if r.events_produced is not None]
        if produced:
            entry["events_produced"] = sum(produced)
            entry["events_received"] = sum(r.events_received or 0 for r in ok)
            entry["events_gaps"] = sum(r.events_gaps or 0 for r in ok)
            entry["closes"] = sum(r.closes or 0 for r in ok)
            entry["client_resumed"] = sum(r.client_resumed or 0 for r in ok)
            entry["upstream_resumed"] = sum(r.upstream_resumed or 0 for r in ok)
        out.append(entry)
    return out


def ratios(summary: Sequence[dict[str, Any]], rows: Sequence[Row] = ()) -> list[dict[str, Any]]:
    """tlsgate's figure divided by each other proxy's, per scenario (same worker count).

    ``fig`` is the ratio of the medians. With ``rows``, ``fig_paired`` is the median of the
    per-round ratios: proxies are interleaved within a round, so a machine whose speed drifts
    between rounds (a shared host) moves both sides of a round's ratio alike.
    """
    by_key = {(e["proxy"], e["scenario"], e["workers"]): e for e in summary}
    by_round: dict[tuple[str, str, int, int], Row] = {
        (r.proxy, r.scenario, r.workers, r.round): r for r in rows if r.status == "ok"
    }
    rounds = sorted({r.round for r in rows})
    out = []
    for (proxy, scenario, workers), peer in by_key.items():
        if proxy == "tlsgate":
            continue
        ours = by_key.get(("tlsgate", scenario, workers))
        if ours is None or ours.get("status") != "ok" or peer.get("status") != "ok":
            continue
        entry: dict[str, Any] = {"scenario": scenario, "versus": proxy}
        for fig in RATIO_FIGURES:
            a, b = ours.get(fig), peer.get(fig)
            entry[fig] = a / b if a is not None and b else None
            paired = []
            for rnd in rounds:
                mine = by_round.get(("tlsgate", scenario, workers, rnd))
                theirs = by_round.get((proxy, scenario, workers, rnd))
                x = getattr(mine, fig) if mine else None
                y = getattr(theirs, fig) if theirs else None
                if x is not None and y:
                    paired.append(x / y)
            entry[f"{fig}_paired"] = statistics.median(paired) if paired else None
        out.append(entry)
    return out


def print_table(summary: Sequence[dict[str, Any]], ratio_rows: Sequence[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tlsgate load test (medians of the rounds)")
    for col in (
        "proxy",
        "×",
        "scenario",
        "rate",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "errors",
        "CPU s/1k",
        "CPU s/GB",
        "RSS MiB",
        "events rcvd+gaps/produced",
    ):
        table.add_column(col, justify="left" if col in ("proxy", "scenario") else "right")
    for e in summary:
        if e.get("status") != "ok":
            table.add_row(e["proxy"], str(e["workers"]), e["scenario"], e["status"][:40], *[""] * 8)
            continue
        events = "–"
        if "events_produced" in e:
            events = f"{e['events_received']}+{e['events_gaps']}/{e['events_produced']}"
        table.add_row(
            e["proxy"],
            str(e["workers"]),
            e["scenario"],
            f"{_fmt(e['rate'])} {e['unit']}/s",
            _fmt(e["p50_ms"], 2),
            _fmt(e["p90_ms"], 2),
            _fmt(e["p99_ms"], 2),
            str(e["errors"]),
            _fmt(e["cpu_per_1k"], 3),
            _fmt(e["cpu_per_gb"], 2),
            _fmt(e["rss_max_mib"], 0),
            events,
        )
    console = Console(width=None if Console().is_terminal else 170)
    console.print(table)
    if ratio_rows:
        rt = Table(title="tlsgate ÷ peer (rate: higher is better; CPU, p99: lower is better)")
        for col in ("scenario", "versus", *RATIO_FIGURES):
            rt.add_column(col)
        for r in ratio_rows:
            rt.add_row(r["scenario"], r["versus"], *[_fmt(r[f], 2) for f in RATIO_FIGURES])
        console.print(rt)


def plot(summary: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """throughput.png, latency.png (per scenario and proxy) and scaling.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [e for e in summary if e.get("status") == "ok" and "@" not in e["scenario"]]
    scenarios = list(dict.fromkeys(e["scenario"] for e in ok if e["scenario"] != "idle"))
    proxies = list(dict.fromkeys(e["proxy"] for e in ok))
    by = {
        (e["proxy"], e["scenario"]): e
        for e in ok
        if e["workers"] == min((x["workers"] for x in ok if x["proxy"] == e["proxy"]), default=1)
    }
    made = []
    width = 0.8 / max(1, len(proxies))
    fig, axes = plt.subplots(1, len(scenarios) or 1, figsize=(3 * max(1, len(scenarios)), 4))
    axes_list = list(axes) if len(scenarios) > 1 else [axes]
    for ax, scen in zip(axes_list, scenarios, strict=False):
        values = [by.get((p, scen), {}).get("rate") or 0 for p in proxies]
        ax.bar(range(len(proxies)), values, color=[f"C{i}" for i in range(len(proxies))])
        ax.set_xticks(range(len(proxies)), proxies, rotation=45, ha="right")
        unit = next((e["unit"] for e in ok if e["scenario"] == scen), "")
        ax.set_title(f"{scen} ({unit}/s)", fontsize=9)
    fig.tight_layout()
    made.append(out / "throughput.png")
    fig.savefig(made[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(scenarios) or 1, figsize=(3 * max(1, len(scenarios)), 4))
    axes_list = list(axes) if len(scenarios) > 1 else [axes]
    for ax, scen in zip(axes_list, scenarios, strict=False):
        for i, p in enumerate(proxies):
            e = by.get((p, scen), {})
            vals = [e.get("p50_ms") or 0, e.get("p90_ms") or 0, e.get("p99_ms") or 0]
            ax.bar([k + i * width for k in range(3)], vals, width, label=p, color=f"C{i}")
        ax.set_xticks([k + width * (len(proxies) - 1) / 2 for k in range(3)], ["p50", "p90", "p99"])
        ax.set_title(f"{scen} latency (ms)", fontsize=9)
    axes_list[0].legend(fontsize=7)
    fig.tight_layout()
    made.append(out / "latency.png")
    fig.savefig(made[-1], dpi=100)
    plt.close(fig)

    scaling = [
        e
        for e in summary
        if e.get("status") == "ok"
        and e["proxy"] == "tlsgate"
        and e["scenario"].split("@")[0] in ("newconn", "keepalive")
    ]
    if scaling:
        fig, axes = plt.subplots(1, 2, figsize=(8, 4))
        for ax, scen in zip(axes, ("newconn", "keepalive"), strict=True):
            pts = sorted(
                (e["workers"], e["rate"]) for e in scaling if e["scenario"].split("@")[0] == scen
            )
            ax.plot([w for w, _ in pts], [r for _, r in pts], marker="o")
            ax.set_xlabel("tlsgate workers")
            ax.set_title(f"{scen} ({'conn' if scen == 'newconn' else 'req'}/s)", fontsize=9)
            ax.set_xticks([w for w, _ in pts])
        fig.tight_layout()
        made.append(out / "scaling.png")
        fig.savefig(made[-1], dpi=100)
        plt.close(fig)
    return made


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def _spread(entry: dict[str, Any]) -> str:
    """`` (min–max)`` of the rounds' rates when they differ, for the Markdown table."""
    low, high = entry.get("rate_min"), entry.get("rate_max")
    if entry.get("rounds", 1) < 2 or low is None or low == high:
        return ""
    return f" ({_fmt(low)}–{_fmt(high)})"


def markdown(summary: Sequence[dict[str, Any]], ratio_rows: Sequence[dict[str, Any]]) -> str:
    """The summary and the ratios as Markdown tables (docs/benchmarks.md takes them as is)."""
    out = [
        "| proxy | workers | scenario | rate | p50 ms | p90 ms | p99 ms | errors | CPU s/1k "
        "| CPU s/GB | RSS MiB | events rcvd+gaps/produced | resumed client/upstream |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for e in summary:
        if e.get("status") != "ok":
            out.append(
                f"| {e['proxy']} | {e['workers']} | {e['scenario']} | {e['status']} "
                "| | | | | | | | | |"
            )
            continue
        events = resumed = "–"
        if "events_produced" in e:
            events = f"{e['events_received']}+{e['events_gaps']}/{e['events_produced']}"
            resumed = f"{e['client_resumed']}/{e['upstream_resumed']} of {e['closes']}"
        out.append(
            f"| {e['proxy']} | {e['workers']} | {e['scenario']} | {_fmt(e['rate'])} {e['unit']}/s"
            f"{_spread(e)} "
            f"| {_fmt(e['p50_ms'], 2)} | {_fmt(e['p90_ms'], 2)} | {_fmt(e['p99_ms'], 2)} "
            f"| {e['errors']} | {_fmt(e['cpu_per_1k'], 3)} | {_fmt(e['cpu_per_gb'], 2)} "
            f"| {_fmt(e['rss_max_mib'], 0)} | {events} | {resumed} |"
        )
    if ratio_rows:
        out += [
            "",
            "| scenario | tlsgate ÷ | rate | CPU s/1k | CPU s/GB | p99 "
            "| rate, paired by round | CPU s/1k, paired |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in ratio_rows:
            paired = (r.get("rate_paired"), r.get("cpu_per_1k_paired"))
            out.append(
                f"| {r['scenario']} | {r['versus']} | "
                + " | ".join(_fmt(r[f], 2) for f in RATIO_FIGURES)
                + " | "
                + " | ".join(_fmt(v, 2) for v in paired)
                + " |"
            )
    return "\n".join(out) + "\n"
