"""`tlsgate status | reload | drain WORKER | metrics` — clients of the control socket."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from tlsgate.errors import OperatorError
from tlsgate.paths import control_socket_path, resolve_state_dir
from tlsgate.supervisor.control import request


def _path(args: argparse.Namespace) -> Any:
    return control_socket_path(resolve_state_dir(args.state_dir))


def _checked(answer: Any) -> dict[str, Any]:
    if not isinstance(answer, dict) or not answer.get("ok"):
        error = answer.get("error") if isinstance(answer, dict) else answer
        raise OperatorError(f"the gateway refused: {error}")
    return answer


def run_status(args: argparse.Namespace) -> int:
    status = _checked(request(_path(args), {"cmd": "status"}))["status"]
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    up = time.time() - status["started"]
    print(f"tlsgate {status['version']}  {status['mode']} on {status['listen']}  "
          f"up {up:.0f} s  steering: {status['steering']['state']} "
          f"({status['steering']['policy']})")  # fmt: skip
    if status["steering"].get("reason"):
        print(f"  {status['steering']['reason']}")
    print(f"{'worker':>6} {'pid':>8} {'active':>7} {'accepted':>9} {'steered':>8} "
          f"{'restarts':>8} {'minted':>7}")  # fmt: skip
    for w in status["workers"]:
        steered = "-" if w.get("steered") is None else w["steered"]
        print(f"{w['id']:>6} {w['pid'] or '-':>8} {w['active']:>7} {w['accepted']:>9} "
              f"{steered:>8} {w['restarts']:>8} {w['minted']:>7}")  # fmt: skip
    signer = status.get("signer")
    if signer is not None:
        state = "serving" if signer["alive"] else "restarting"
        print(f"signer: pid {signer['pid'] or '-'} ({state}), {signer['restarts']} restarts, "
              f"{signer['signed']} signed")  # fmt: skip
    cache = status["cache"]
    print(f"certificate cache: {cache.get('size', 0)} entries, hit rate "
          f"{cache.get('hit_rate', 0):.1%}   events: {status['events']}")  # fmt: skip
    learned = status.get("learned_bypass") or {}
    entries = learned.get("entries", [])
    state = "on" if learned.get("enabled") else "off"
    print(f"learned bypass: {state}, {len(entries)} names")
    for e in entries:
        print(f"  {e['name']}  ({e['kind']} x{e['rejections']}, spliced {e['spliced']}, "
              f"expires in {e['expires_in']:.0f} s)")  # fmt: skip
    return 0


def run_reload(args: argparse.Namespace) -> int:
    answer = _checked(request(_path(args), {"cmd": "reload"}))
    print(f"reloaded (reload #{answer.get('reloads')})", file=sys.stderr)
    return 0


def run_drain(args: argparse.Namespace) -> int:
    _checked(request(_path(args), {"cmd": "drain", "worker": args.worker}))
    print(f"worker {args.worker} replaced; the old one drains", file=sys.stderr)
    return 0


def run_metrics(args: argparse.Namespace) -> int:
    sys.stdout.write(_checked(request(_path(args), {"cmd": "metrics"}))["text"])
    return 0


def add_control_parsers(subparsers: Any) -> None:
    for name, func, help_ in (
        ("status", run_status, "show workers, steering, cache and events"),
        ("reload", run_reload, "reload configuration and CA; replace workers one at a time"),
        ("drain", run_drain, "replace one worker; the old one finishes its connections"),
        ("metrics", run_metrics, "print metrics in Prometheus text format"),
    ):
        p = subparsers.add_parser(name, help=help_)
        p.add_argument("--state-dir", metavar="DIR", help="state dir the gateway was started with")
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "drain":
            p.add_argument("worker", type=int, help="worker id")
        p.set_defaults(func=func)
