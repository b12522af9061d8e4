"""docs/security.md stays true to the code: every [limits] setting is in its table with its
real default, every `tlsgate` command it tells an operator to run exists, and the
capabilities it lists are the unit's."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from tlsgate.cli import build_parser
from tlsgate.supervisor.config import Limits

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "security.md").read_text()


def test_every_limit_is_documented_with_its_default() -> None:
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| ([^|]+) \|", DOC, re.M)}
    for f in dataclasses.fields(Limits):
        if f.name == "drain_timeout":
            continue  # an operational setting, documented in the README
        if f.name in ("connect_timeout", "idle_timeout"):
            assert "`connect_timeout` / `idle_timeout` | 10 s / 300 s" in DOC
            continue
        assert f.name in rows, f"{f.name} missing from docs/security.md"
        shown = rows[f.name].split()[0].replace("s", "")
        assert float(shown) == float(f.default), (f.name, rows[f.name], f.default)  # type: ignore[arg-type]


def test_every_tlsgate_command_the_doc_names_exists() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    commands = set(sub.choices)  # type: ignore[arg-type]
    code = re.findall(r"```sh\n(.*?)```", DOC, re.S) + re.findall(r"`([^`\n]+)`", DOC)
    named = {m for text in code for m in re.findall(r"(?:^|[\s(|])tlsgate ([a-z]+)", text)}
    assert {"doctor", "ca", "events", "metrics", "status", "reload"} <= named
    assert named <= commands, named - commands


def test_the_documented_capabilities_are_exactly_the_units() -> None:
    unit = (ROOT / "packaging" / "tlsgate.service").read_text()
    bounding = set(re.search(r"^CapabilityBoundingSet=(.*)$", unit, re.M).group(1).split())  # type: ignore[union-attr]
    documented = set(re.findall(r"^\| `(CAP_\w+)`(?:, `(CAP_\w+)`)? \|", DOC, re.M))
    flat = {c for pair in documented for c in pair if c}
    assert flat == bounding
