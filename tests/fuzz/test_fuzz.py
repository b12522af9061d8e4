"""Every fuzz target keeps its module's contract on its whole seed corpus (real inputs plus
the crashes found so far), and survives a short coverage-guided atheris run.

Longer runs: ``python -m tests.fuzz TARGET --seconds 600`` (see docs/faults.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz import Target, corpus_files, load_target, target_names

ROOT = Path(__file__).resolve().parents[2]
SHORT_RUN_SECONDS = 4
SHORT_RUN_INPUTS = 20000


def test_the_targets_cover_every_parser_of_hostile_bytes() -> None:
    assert {"clienthello", "connect", "http1", "http2", "events", "eventframe"} <= set(
        target_names()
    )


@pytest.mark.parametrize("name", target_names())
def test_every_target_has_a_seed_corpus_of_real_inputs(name: str) -> None:
    seeds = [p for p in corpus_files(name) if p.name.startswith("real-")]
    assert seeds, f"run python -m tests.fuzz.capture_corpus to record real {name} inputs"


@pytest.mark.parametrize("name", target_names())
def test_every_corpus_input_meets_the_module_contract(name: str) -> None:
    target = load_target(name)
    for path in corpus_files(name):
        target.check(path.read_bytes())  # anything but the declared error fails the test


def test_an_exception_the_module_does_not_declare_breaks_the_contract() -> None:
    def one_input(data: bytes) -> None:
        if data:
            raise KeyError(data)
        raise ValueError("declared")

    target = Target("demo", (ValueError,), 10, one_input)
    target.check(b"")
    with pytest.raises(KeyError):
        target.check(b"x")


@pytest.mark.parametrize("name", target_names())
def test_a_short_atheris_run_finds_no_contract_breach(name: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.fuzz", name, "--seconds", str(SHORT_RUN_SECONDS),
         "--runs", str(SHORT_RUN_INPUTS), "--corpus-out", str(tmp_path / "corpus"),
         "--artifacts", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done" in result.stderr
    assert not list(tmp_path.glob("crash-*")), result.stderr[-3000:]
