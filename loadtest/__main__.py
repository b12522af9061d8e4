"""`python -m tlsgate.loadtest SCENARIO-SET ...`"""

from __future__ import annotations

import sys

from tlsgate.loadtest import eventpath, loopback, soak

COMMANDS = {"loopback": loopback.main, "events": eventpath.main, "soak": soak.main}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in COMMANDS:
        print(
            f"usage: python -m tlsgate.loadtest {{{','.join(COMMANDS)}}} [options]", file=sys.stderr
        )
        return 2
    return COMMANDS[args[0]](args[1:])


if __name__ == "__main__":
    sys.exit(main())
