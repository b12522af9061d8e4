"""`python -m tlsgate.loadtest [options]` (the suite, as `tlsgate loadtest`), or
`python -m tlsgate.loadtest loopback|events [options]` (the older single-purpose benchmarks)."""

from __future__ import annotations

import sys

from tlsgate.loadtest import eventpath, loopback, suite

COMMANDS = {"loopback": loopback.main, "events": eventpath.main}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in COMMANDS:
        return COMMANDS[args[0]](args[1:])
    # the network-namespace suite (tlsgate loadtest): everything else
    return suite.main(args)


if __name__ == "__main__":
    sys.exit(main())
