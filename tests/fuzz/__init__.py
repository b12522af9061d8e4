"""Coverage-guided fuzzing of tlsgate's parsers with atheris (libFuzzer for CPython).

A *target* is one small module in ``tests/fuzz/targets/`` (its file name is the target's
name) with a seed corpus in ``tests/fuzz/corpus/<name>/`` (real inputs, see
``capture_corpus.py``). The module defines:

- ``ERRORS``: the exception types the code under test documents for bad input (usually its
  one :class:`~tlsgate.errors.RemoteProtocolError` subclass). Anything else escaping is a
  contract breach, i.e. a crash.
- ``MAX_LEN``: the largest input worth generating.
- ``one_input(data: bytes) -> None``: feeds ``data`` to the code under test and asserts its
  invariants (memory bounds included); it may let an ``ERRORS`` exception escape.

Contract checked for every target, by the runner (``python -m tests.fuzz``) and by the
replay of every corpus file in ``tests/fuzz/test_fuzz.py``: ``one_input`` returns or raises
one of ``ERRORS``, never anything else; libFuzzer's ``-rss_limit_mb`` catches unbounded memory
and ``-timeout`` an input that hangs. A crash found becomes a corpus file (so every later run
and the test suite replay it) plus a named regression test next to the module's own tests.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
CORPUS_ROOT = HERE / "corpus"
TARGETS_PACKAGE = "tests.fuzz.targets"

#: Limits for every run (libFuzzer flags): a target that needs more memory than this or
#: more than this many seconds for one input breaks the module's boundedness rule.
RSS_LIMIT_MB = 1024
INPUT_TIMEOUT_S = 10


@dataclass(frozen=True)
class Target:
    """A loaded fuzz target."""

    name: str
    errors: tuple[type[BaseException], ...]
    max_len: int
    one_input: Callable[[bytes], None]

    @property
    def corpus(self) -> Path:
        return CORPUS_ROOT / self.name

    def check(self, data: bytes) -> None:
        """Run one input; only a contract breach (any other exception) escapes."""
        try:
            self.one_input(data)
        except self.errors:
            pass


def target_names() -> list[str]:
    """Every target module in ``tests/fuzz/targets/``, sorted."""
    folder = HERE / "targets"
    return sorted(m.name for m in pkgutil.iter_modules([str(folder)]) if not m.ispkg)


def load_target(name: str) -> Target:
    """Import ``tests/fuzz/targets/<name>.py`` (under atheris instrumentation if active)."""
    if name not in target_names():
        raise SystemExit(f"no fuzz target {name!r}; targets: {', '.join(target_names())}")
    module: ModuleType = importlib.import_module(f"{TARGETS_PACKAGE}.{name}")
    return Target(
        name=name,
        errors=tuple(module.ERRORS),
        max_len=int(module.MAX_LEN),
        one_input=module.one_input,
    )


def corpus_files(name: str) -> list[Path]:
    folder = CORPUS_ROOT / name
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
