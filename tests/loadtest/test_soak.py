"""The soak run's criterion (flat after warm-up, or fail) and a short real soak."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tlsgate.loadtest.soak import ProcessSample, Sample, judge, sample_process

MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def series(rss_mib: list[float], fds: list[int], pid: int = 100) -> list[Sample]:
    return [(float(t), {"worker 0": ProcessSample(pid, f, int(r * MIB))})
            for t, (r, f) in enumerate(zip(rss_mib, fds, strict=True))]  # fmt: skip


def test_growth_during_warm_up_then_flat_passes() -> None:
    rss = [40 + t for t in range(10)] + [50.0, 50.5, 49.8, 50.2] * 5
    verdicts, problems = judge(series(rss, [20] * 30), warmup=10)
    assert problems == []
    assert {v.measure for v in verdicts} == {"rss", "fds"} and all(v.flat for v in verdicts)


def test_a_steady_leak_after_warm_up_fails_with_the_process_and_measure_named() -> None:
    rss = [50 + 0.2 * t for t in range(40)]  # 200 KiB per sample: +6 MiB over the judged part
    _, problems = judge(series(rss, [20] * 40), warmup=10)
    assert len(problems) == 1 and problems[0].startswith("worker 0 rss:")
    assert "GROWING" in problems[0]


def test_one_descriptor_leaked_every_few_samples_fails() -> None:
    fds = [20 + t // 4 for t in range(40)]
    _, problems = judge(series([50.0] * 40, fds), warmup=10)
    assert len(problems) == 1 and problems[0].startswith("worker 0 fds:")


def test_a_process_replaced_during_the_run_fails() -> None:
    samples = series([50.0] * 20, [20] * 20) + series([50.0] * 20, [20] * 20, pid=101)
    samples = [(float(i), s[1]) for i, s in enumerate(samples)]
    _, problems = judge(samples, warmup=5)
    assert problems == ["worker 0 was replaced during the run (pids [100, 101])"]


def test_too_few_samples_after_warm_up_is_a_failure_not_a_pass() -> None:
    _, problems = judge(series([50.0] * 10, [20] * 10), warmup=8)
    assert problems and "only 2 samples" in problems[0]


def test_a_sample_of_this_process_counts_its_descriptors_and_rss() -> None:
    before = sample_process(os.getpid())
    with open(__file__, "rb"):
        during = sample_process(os.getpid())
    assert during.fds == before.fds + 1 and before.rss_bytes > 10 * MIB


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the gateway's supervisor runs as root")
@pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx (scripts/setup.sh test)")
@pytest.mark.timeout(180)
def test_a_one_minute_soak_with_faults_stays_flat() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tlsgate.loadtest", "soak", "--minutes", "1", "--warmup", "40",
         "--interval", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "soak passed" in result.stdout
    assert " 0 unexpected errors" in result.stdout and "faults injected" in result.stdout
