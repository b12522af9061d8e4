"""The `tlsgate` command line.

Every subcommand returns an exit code. An :class:`~tlsgate.errors.OperatorError` anywhere
is printed as one line, ``tlsgate: error: <what to do>``, with exit code 2 — never a
traceback for something the operator can fix.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tlsgate import __version__
from tlsgate.errors import OperatorError


def _run(args: argparse.Namespace) -> int:
    from tlsgate.supervisor.ca_commands import passphrase_from_args, read_passphrase_file
    from tlsgate.supervisor.config import Config, load_config
    from tlsgate.supervisor.nftables import parse_ports

    overrides = {
        "listen": args.listen,
        "mode": args.mode,
        "workers": args.workers,
        "state_dir": args.state_dir,
        "upstream_ca_bundle": args.upstream_ca_bundle,
        "ca_passphrase_file": args.ca_passphrase_file,
        "events.file": args.events_file,
        "events.remote_listen": args.events_remote_listen,
        "metrics.listen": args.metrics_listen,
        "capture.pcap_dir": args.pcap_dir,
        "capture.pcap_over_ip": args.pcap_over_ip,
        "worker_user": args.worker_user,
        "steering": args.steering,
        "intercept_ports": list(parse_ports(args.intercept_ports))
        if args.intercept_ports
        else None,
        "intercept_from": args.intercept_from,
        "steering_policy": args.steering_policy,
    }
    if args.learn_bypass:
        overrides["learned_bypass.enabled"] = True
    if args.bypass:
        overrides["policy.bypass_domains"] = args.bypass
    if args.block:
        overrides["policy.block_domains"] = args.block
    if args.allow_client:
        overrides["access.allow_clients"] = args.allow_client
    if args.allow_destination:
        overrides["access.allow_destinations"] = args.allow_destination
    config_path = Path(args.config) if args.config else None
    config = load_config(config_path, overrides)
    passphrase = passphrase_from_args(args, "ca-passphrase")
    if passphrase is None and config.ca_passphrase_file is not None:
        passphrase = read_passphrase_file(config.ca_passphrase_file, "ca_passphrase_file")
    from tlsgate.supervisor.supervisor import run_supervisor

    def reload() -> Config:
        # SIGHUP / `tlsgate reload`: the file again, with the same flags on top
        return load_config(config_path, overrides)

    return run_supervisor(config, passphrase, reload)


def build_parser() -> argparse.ArgumentParser:
    from tlsgate.supervisor.ca_commands import add_ca_parser, add_passphrase_options
    from tlsgate.supervisor.control_commands import add_control_parsers
    from tlsgate.supervisor.doctor import add_doctor_parser
    from tlsgate.supervisor.events_ca_commands import add_events_ca_parser
    from tlsgate.supervisor.events_commands import add_events_parser

    parser = argparse.ArgumentParser(
        prog="tlsgate",
        description="TLS interception gateway: validates upstreams strictly, mints "
        "certificates from its own CA, and reports inspection events to an IDS.",
    )
    parser.add_argument("--version", action="version", version=f"tlsgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("--config", metavar="FILE", help="TOML configuration file")
    run.add_argument("--listen", metavar="ADDR:PORT", help="listen address (127.0.0.1:8080)")
    run.add_argument("--mode", choices=("explicit", "transparent"), help="capture mode")
    run.add_argument("--workers", type=int, metavar="N", help="worker processes")
    run.add_argument("--state-dir", metavar="DIR", help="CA and state directory")
    run.add_argument(
        "--upstream-ca-bundle",
        metavar="FILE",
        help="trust these CAs for upstream servers instead of the system store",
    )
    run.add_argument(
        "--events-file", metavar="FILE", help="also append every event (msgpack stream) to FILE"
    )
    run.add_argument(
        "--events-remote-listen",
        metavar="ADDR:PORT",
        help="also serve the detection stream over TCP with mutual TLS (client certificates "
        "from `tlsgate events-ca issue-subscriber`; never the interception CA)",
    )
    run.add_argument(
        "--metrics-listen",
        metavar="ADDR:PORT",
        help="serve Prometheus metrics over HTTP at /metrics (loopback only, unless "
        "[metrics] mtls = true)",
    )
    run.add_argument(
        "--pcap-dir",
        metavar="DIR",
        help="opt in to decrypted-traffic export: rotated pcap files per worker in DIR "
        "(plaintext capped per connection, see [capture] in the config)",
    )
    run.add_argument(
        "--pcap-over-ip",
        metavar="ADDR:PORT",
        help="opt in to PCAP-over-IP: worker k streams decrypted traffic on PORT+k "
        "(unauthenticated: keep it on loopback or a management network)",
    )
    run.add_argument(
        "--intercept-ports",
        metavar="PORTS",
        help="transparent mode: install tlsgate's own nftables TPROXY rules for these ports "
        "(e.g. 443,8443); removed on exit",
    )
    run.add_argument(
        "--intercept-from",
        action="append",
        metavar="CIDR",
        help="only intercept clients from these networks (repeatable)",
    )
    run.add_argument(
        "--steering",
        choices=("auto", "ebpf", "kernel"),
        help="eBPF steering: auto (default; kernel hash fallback), ebpf (required), kernel (never)",
    )
    run.add_argument(
        "--steering-policy",
        choices=("least-loaded", "hash"),
        help="how the eBPF program picks a worker (least-loaded)",
    )
    run.add_argument(
        "--worker-user",
        metavar="USER",
        help="user the workers run as (default: nobody when started as root)",
    )
    run.add_argument(
        "--bypass",
        action="append",
        metavar="GLOB",
        help="splice these names without interception (repeatable)",
    )
    run.add_argument(
        "--block", action="append", metavar="GLOB", help="refuse these names (repeatable)"
    )
    run.add_argument(
        "--learn-bypass",
        action="store_true",
        default=None,
        help="splice names whose clients keep rejecting our certificate (pinning, client "
        "certificates) for a while; see [learned_bypass] in the config",
    )
    run.add_argument(
        "--allow-client",
        action="append",
        metavar="CIDR",
        help="serve only clients from these networks (repeatable; default: loopback plus the "
        "private networks of this host's interfaces); others are refused at accept",
    )
    run.add_argument(
        "--allow-destination",
        action="append",
        metavar="CIDR",
        help="let CONNECT reach these networks although they are loopback, link-local "
        "(cloud metadata) or this host's own addresses (repeatable; refused by default)",
    )
    add_passphrase_options(run, "ca-passphrase", "passphrase of an encrypted CA key")
    run.set_defaults(func=_run)

    loadtest = sub.add_parser(
        "loadtest",
        help="load-test tlsgate (and peers) in network namespaces with wrk and h2load",
        add_help=False,
    )
    loadtest.add_argument("options", nargs=argparse.REMAINDER, help="see tlsgate loadtest -h")

    add_ca_parser(sub)
    add_events_parser(sub)
    add_events_ca_parser(sub)
    add_control_parsers(sub)
    add_doctor_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["loadtest"]:
        # its options are its own (argparse's REMAINDER cannot start with an option)
        from tlsgate.loadtest.__main__ import main as loadtest_main

        return loadtest_main(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        return int(args.func(args))
    except OperatorError as exc:
        print(f"tlsgate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
