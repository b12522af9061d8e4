"""`python -m tlsgate.loadtest [options]` (the suite, as `tlsgate loadtest`), or
`python -m tlsgate.loadtest loopback|events [options]` (the older single-purpose benchmarks),
or `python -m tlsgate.loadtest soak [--minutes N]` (resource use over time, docs/faults.md)."""

from __future__ import annotations

import sys

from tlsgate.loadtest import eventpath, loopback, soak, suite

COMMANDS = {"loopback": loopback.main, "events": eventpath.main, "soak": soak.main}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in COMMANDS:
        return COMMANDS[args[0]](args[1:])
    # the network-namespace suite (tlsgate loadtest): everything else
    return suite.main(args)


if __name__ == "__main__":
    sys.exit(main())
