"""Run one fuzz target with atheris::

    python -m tests.fuzz --list
    python -m tests.fuzz TARGET [--seconds 600] [--runs N] [--corpus-out DIR]
    python -m tests.fuzz TARGET --replay FILE...      # re-run saved inputs (e.g. a crash)

New interesting inputs go to ``--corpus-out`` (a temporary folder by default, so a run never
changes the repository); the seed corpus in ``tests/fuzz/corpus/TARGET/`` is read only. A
contract breach stops the run with the traceback, writes the input as
``crash-<sha1>`` into ``--artifacts`` (default: the current directory) and exits non-zero.
To keep it: copy the file into ``tests/fuzz/corpus/TARGET/`` and fix the code.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tests.fuzz import INPUT_TIMEOUT_S, RSS_LIMIT_MB, corpus_files, load_target, target_names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", nargs="?", help="a file name in tests/fuzz/targets/")
    parser.add_argument("--list", action="store_true", help="print the targets and exit")
    parser.add_argument("--seconds", type=int, default=60, help="stop after this long")
    parser.add_argument("--runs", type=int, default=-1, help="stop after this many inputs")
    parser.add_argument("--corpus-out", type=Path, help="where new inputs are written")
    parser.add_argument("--artifacts", type=Path, default=Path("."), help="crash files here")
    parser.add_argument("--replay", type=Path, nargs="+", help="run these inputs and exit")
    args = parser.parse_args(argv)
    if args.list or args.target is None:
        print("\n".join(target_names()))
        return 0
    if args.replay:
        target = load_target(args.target)
        for path in args.replay:
            target.check(path.read_bytes())
            print(f"{path}: ok")
        return 0

    import atheris

    with atheris.instrument_imports(include=["tlsgate"]):
        target = load_target(args.target)
    out = args.corpus_out or Path(tempfile.mkdtemp(prefix=f"tlsgate-fuzz-{target.name}-"))
    out.mkdir(parents=True, exist_ok=True)
    seeds = [str(target.corpus)] if corpus_files(target.name) else []
    libfuzzer = [
        sys.argv[0],
        f"-max_total_time={args.seconds}",
        f"-runs={args.runs}",
        f"-max_len={target.max_len}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-timeout={INPUT_TIMEOUT_S}",
        f"-artifact_prefix={args.artifacts.resolve()!s}/",
        "-print_final_stats=1",
        str(out),
        *seeds,
    ]
    atheris.Setup(libfuzzer, target.check)
    atheris.Fuzz()  # exits the process: 0 when done, non-zero on a breach
    return 0


if __name__ == "__main__":
    sys.exit(main())
