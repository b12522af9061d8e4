"""``tlsgate events-ca init|issue-subscriber|issue-server|list|revoke``: management certificates.

Contract: each subcommand sets ``func`` and returns an exit code; every refusal is an
:class:`~tlsgate.errors.OperatorError` (printed as one line, exit 2). The certificate
rules are those of :mod:`tlsgate.supervisor.events_ca`.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from tlsgate.errors import ConfigError
from tlsgate.paths import resolve_state_dir
from tlsgate.supervisor.ca_commands import days_type
from tlsgate.supervisor.events_ca import (
    CLIENT_ROLES,
    DEFAULT_LEAF_DAYS,
    MAX_LEAF_DAYS,
    ROLE_SUBSCRIBER,
    check_name,
    init_events_ca,
    issue_client,
    issue_server,
    list_issued,
    revoke,
    write_client_bundle,
)


def add_events_ca_parser(subparsers: Any) -> None:
    """Register ``tlsgate events-ca`` and its subcommands."""
    parser = subparsers.add_parser(
        "events-ca",
        help="certificates for remote event subscribers and metrics scrapers (never the "
        "interception CA)",
        description="Manage the events CA: a CA of its own, under <state-dir>/events-ca, "
        "that issues the certificates of remote subscribers (mutual TLS) and of the gateway's "
        "management listeners.",
    )
    commands = parser.add_subparsers(dest="events_ca_command", required=True, metavar="COMMAND")

    init = commands.add_parser("init", help="create the events CA (key mode 0600)")
    init.add_argument("--force", action="store_true", help="replace an existing events CA")
    _state_dir(init)
    init.set_defaults(func=_cmd_init)

    sub = commands.add_parser(
        "issue-subscriber",
        help="a client certificate, key and CA bundle for an IDS host (or a scraper)",
    )
    sub.add_argument("name", metavar="NAME", help="the subscriber's name (e.g. ids-1)")
    sub.add_argument("--out", metavar="DIR", required=True,
                     help="write DIR/cert.pem, DIR/key.pem (0600) and DIR/ca.pem")  # fmt: skip
    sub.add_argument("--role", choices=CLIENT_ROLES, default=ROLE_SUBSCRIBER,
                     help="events-subscriber (default) reads the detection stream; "
                     "metrics-scraper reads /metrics")  # fmt: skip
    days_help = f"validity (default {DEFAULT_LEAF_DAYS}, at most {MAX_LEAF_DAYS})"
    sub.add_argument("--days", type=_days, default=DEFAULT_LEAF_DAYS, metavar="N",
                     help=days_help)  # fmt: skip
    sub.add_argument("--force", action="store_true", help="overwrite files in DIR")
    _state_dir(sub)
    sub.set_defaults(func=_cmd_issue_subscriber)

    server = commands.add_parser(
        "issue-server",
        help="(re)issue the gateway's server certificate (it is issued on start otherwise)",
    )
    server.add_argument("--san", action="append", required=True, metavar="IP_OR_NAME",
                        help="an address or name subscribers connect to (repeatable)")  # fmt: skip
    server.add_argument("--days", type=_days, default=DEFAULT_LEAF_DAYS, metavar="N",
                        help=days_help)  # fmt: skip
    _state_dir(server)
    server.set_defaults(func=_cmd_issue_server)

    lst = commands.add_parser("list", help="certificates issued, with revocation state")
    lst.add_argument("--json", action="store_true", help="one JSON object per certificate")
    _state_dir(lst)
    lst.set_defaults(func=_cmd_list)

    rev = commands.add_parser(
        "revoke", help="deny a certificate (by name or hex serial); effective on reload"
    )
    rev.add_argument("which", metavar="NAME_OR_SERIAL")
    _state_dir(rev)
    rev.set_defaults(func=_cmd_revoke)


def _state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", metavar="DIR", help="state directory of the gateway")


_days = days_type(MAX_LEAF_DAYS)


def _sd_flag(state_dir: Path) -> str:
    return (
        ""
        if state_dir == resolve_state_dir(None)
        else f" --state-dir {shlex.quote(str(state_dir))}"
    )


def _cmd_init(args: argparse.Namespace) -> int:
    state_dir = resolve_state_dir(args.state_dir)
    ca = init_events_ca(state_dir, force=args.force)
    print(f"tlsgate: created the events CA {ca.cert_path} (key {ca.directory / 'key.pem'}, 0600)")
    sd = _sd_flag(state_dir)
    print(f"issue a subscriber: tlsgate events-ca issue-subscriber NAME --out DIR{sd}")
    return 0


def _cmd_issue_subscriber(args: argparse.Namespace) -> int:
    state_dir = resolve_state_dir(args.state_dir)
    try:
        check_name(args.name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    cert, key, ca_cert = issue_client(state_dir, args.name, args.role, days=args.days)
    out = Path(args.out)
    cert_path, key_path, ca_path = write_client_bundle(out, cert, key, ca_cert, force=args.force)
    print(f"tlsgate: issued {args.role} certificate {args.name!r} (serial "
          f"{cert.serial_number:x}, valid to {cert.not_valid_after_utc:%Y-%m-%d})")  # fmt: skip
    print(f"  {cert_path}\n  {key_path} (0600: copy it to the subscriber host only)\n  {ca_path}")
    print(f"  subscribe: tlsgate events --remote HOST:PORT --cert {cert_path} --key {key_path}"
          f" --ca {ca_path}")  # fmt: skip
    return 0


def _cmd_issue_server(args: argparse.Namespace) -> int:
    state_dir = resolve_state_dir(args.state_dir)
    try:
        cert = issue_server(state_dir, tuple(args.san), days=args.days)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(f"tlsgate: issued the gateway's server certificate for {', '.join(args.san)} (serial"
          f" {cert.serial_number:x}); restart the gateway to use it")  # fmt: skip
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    issued = list_issued(resolve_state_dir(args.state_dir))
    for item in issued:
        state = "revoked" if item.revoked else "valid"
        if args.json:
            record = {"serial": f"{item.serial:x}", "name": item.name, "role": item.role,
                      "not_after": item.not_after.isoformat(), "state": state}  # fmt: skip
            print(json.dumps(record))
        else:
            print(f"{item.serial:040x}  {item.role:<17}  {item.not_after:%Y-%m-%d}  {state:<7}"
                  f"  {item.name}")  # fmt: skip
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    state_dir = resolve_state_dir(args.state_dir)
    for item in revoke(state_dir, args.which):
        print(f"tlsgate: revoked {item.role} certificate {item.name!r} (serial {item.serial:x})")
    print(f"effective when the gateway reloads: tlsgate reload{_sd_flag(state_dir)}")
    return 0
