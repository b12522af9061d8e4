#!/usr/bin/env python3
"""A tiny IDS rule on tlsgate's detection stream: alert when a request path matches a pattern.

    python examples/path_alert.py --state-dir /var/lib/tlsgate '(?i)/wp-admin|\\.\\./|/etc/passwd'

It subscribes to the detection socket of the gateway started with that state directory (or
reads a recorded stream with ``--file``), and for every ``http`` event whose ``path`` matches
the regular expression prints one alert line (JSON) with the client, server, SNI, method, host
and path. It also checks the stream's own guarantees: a ``gap`` event (events lost to a slow
reader) is reported as an alert too, so the rule never misses traffic silently.

Only the standard library and msgpack are needed; the rule logic (``alerts``) has no I/O.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgpack


def alerts(events: Iterable[dict[str, Any]], pattern: re.Pattern[str]) -> Iterator[dict[str, Any]]:
    """The rule: alert records for matching ``http`` events and for every ``gap``."""
    for event in events:
        kind = event.get("type")
        if kind == "http" and pattern.search(event.get("path") or ""):
            yield {
                "alert": "suspicious request path",
                "pattern": pattern.pattern,
                "ts": event["ts"],
                "client": f"{event.get('client_ip')}:{event.get('client_port')}",
                "server": f"{event.get('server_ip')}:{event.get('server_port')}",
                "sni": event.get("sni"),
                "method": event.get("method"),
                "host": event.get("host"),
                "path": event.get("path"),
                "conn": event.get("conn"),
            }
        elif kind == "gap":
            yield {"alert": "events lost", "dropped": event["dropped"], "stage": event["stage"],
                   "ts": event["ts"]}  # fmt: skip


def stream(source: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=16 * 1024 * 1024)
    for chunk in source:
        unpacker.feed(chunk)
        yield from unpacker


def read_socket(path: Path) -> Iterator[bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        while chunk := sock.recv(1 << 16):
            yield chunk


def read_file(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 16):
            yield chunk


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pattern", help="regular expression searched in request paths")
    parser.add_argument("--state-dir", default="/var/lib/tlsgate")
    parser.add_argument("--socket", help="detection socket (default: from --state-dir)")
    parser.add_argument("--file", help="read a recorded msgpack stream instead")
    args = parser.parse_args(argv)
    pattern = re.compile(args.pattern)
    if args.file:
        source = read_file(Path(args.file))
    else:
        state = Path(args.state_dir)
        default = Path("/run/tlsgate/events.sock") if state == Path("/var/lib/tlsgate") else (
            state / "run" / "events.sock")  # fmt: skip
        source = read_socket(Path(args.socket) if args.socket else default)
    for alert in alerts(stream(source), pattern):
        print(json.dumps(alert), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
