"""``tlsgate events``: print the inspection events of a running gateway or of a recording.

Rules:

- Source: the detection socket of the gateway that uses ``--state-dir`` (default state
  dir if absent), or ``--socket PATH``, or a recorded msgpack stream ``--file PATH``
  (read to its end), or a gateway's remote listener ``--remote HOST:PORT`` over mutual
  TLS with ``--cert``, ``--key`` and ``--ca`` (the files ``tlsgate events-ca
  issue-subscriber`` wrote; the server is verified against ``--ca`` and ``HOST``). A
  missing or dead socket is an :class:`~tlsgate.errors.OperatorError` that says how to
  start a gateway; so is a stream that is not tlsgate events, and a refused certificate.
- ``--format json`` (default) prints one JSON object per line, keys in the order they were
  encoded, bytes values as text (UTF-8, invalid bytes replaced), ASCII only.
  ``--format msgpack`` writes the events, re-encoded one by one, to binary stdout.
  ``--format eve`` prints Suricata EVE-JSON records, one per line (``supervisor/eve.py``):
  the renderer sees every event (it needs the ``hello`` and the ``conn_open`` events),
  ``--filter`` picks the tlsgate types whose records are printed, and ``--count``
  counts records. An event without a usable ``ts`` is an OperatorError.
- ``--filter TYPE ...`` keeps only those event types (``hello`` and ``gap`` included: to
  see gaps while filtering, name ``gap``). ``--count N`` stops after N printed events.
- Output is flushed after every batch received, so pipes see events as they come.
- Exit codes: 0 when the stream ended or ``--count`` was reached, 1 when the stream ends
  inside an event (the complete events before it are printed), 2 for an OperatorError.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import ssl
import sys
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, Final, TextIO

from tlsgate.errors import OperatorError
from tlsgate.paths import events_socket_path, resolve_state_dir
from tlsgate.supervisor.eve import EveRenderer, EveRenderError
from tlsgate.workers.events import (
    EVENT_TYPES,
    EventDecodeError,
    EventDecoder,
    new_packer,
)

#: Bytes read from the socket or file at a time.
READ_CHUNK_BYTES: Final = 256 * 1024

_JSON_SEPARATORS: Final = (",", ":")


def add_events_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``events`` on ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "events",
        help="print the inspection events of a running gateway (or of a recording)",
        description="Subscribe to a running gateway's detection socket, or read a recorded "
        "event file, and print the events: one JSON object per line, raw msgpack, or "
        "Suricata EVE-JSON.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--state-dir", metavar="DIR", help="state dir of the gateway to subscribe to"
    )
    source.add_argument("--socket", metavar="PATH", help="detection socket to subscribe to")
    source.add_argument("--file", metavar="PATH", help="recorded event file to read instead")
    source.add_argument(
        "--remote",
        metavar="HOST:PORT",
        help="subscribe to a gateway's remote listener (mutual TLS; needs --cert, --key, --ca)",
    )
    parser.add_argument("--cert", metavar="FILE", help="--remote: this subscriber's certificate")
    parser.add_argument("--key", metavar="FILE", help="--remote: its private key")
    parser.add_argument("--ca", metavar="FILE", help="--remote: the gateway's events CA")
    parser.add_argument(
        "--format",
        choices=("json", "msgpack", "eve"),
        default="json",
        help="json: one object per line (default); msgpack: the raw event stream; "
        "eve: Suricata EVE-JSON records (tls, http, anomaly), one per line",
    )
    parser.add_argument(
        "--filter",
        nargs="+",
        action="extend",
        choices=EVENT_TYPES,
        metavar="TYPE",
        help=f"only these event types (repeatable; one of: {', '.join(EVENT_TYPES)})",
    )
    parser.add_argument(
        "--count", type=_positive_int, metavar="N", help="stop after printing N events"
    )
    parser.set_defaults(func=run_events)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def run_events(args: argparse.Namespace) -> int:
    """Run ``tlsgate events`` with parsed ``args``; return the exit code."""
    out = sys.stdout
    types = args.filter
    if args.format == "eve":
        write = _eve_writer(out, types)
        types = None  # the renderer must see every event; it applies the filter itself
    elif args.format == "json":
        write = _json_writer(out)
    else:
        write = _msgpack_writer(out)
    if args.file:
        batches = _read_file(Path(args.file))
    elif args.remote:
        batches = _read_stream(*_connect_remote(args.remote, args.cert, args.key, args.ca))
    else:
        sock, path = _connect(args.socket, args.state_dir)
        batches = _read_stream(sock, f"the events socket {path}")
    try:
        _print_events(batches, write, out.flush, types, args.count)
    except _TruncatedStreamError as exc:
        out.flush()
        print(f"tlsgate: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, and keep the interpreter
        # from failing again when it flushes stdout at exit.
        _silence_stdout()
    finally:
        batches.close()
    return 0


def _print_events(
    batches: Iterator[Iterator[dict[str, Any]]],
    write: Callable[[dict[str, Any]], int],
    flush: Callable[[], None],
    types: list[str] | None,
    count: int | None,
) -> None:
    wanted = frozenset(types) if types else None
    remaining = count
    for batch in batches:
        for event in batch:
            if wanted is not None and event["type"] not in wanted:
                continue
            written = write(event)
            if remaining is not None and written:
                remaining -= written
                if remaining <= 0:
                    flush()
                    return
        flush()


class _TruncatedStreamError(Exception):
    """The stream ended inside an event; the complete events before it were printed."""


def _read_file(path: Path) -> Generator[Iterator[dict[str, Any]], None, None]:
    try:
        stream = path.open("rb")
    except OSError as exc:
        raise OperatorError(
            f"cannot read the event file {path}: {exc.strerror or exc};"
            " check the path (it is the [events] file of the gateway's configuration)"
        ) from exc
    decoder = EventDecoder()
    with stream:
        while chunk := stream.read(READ_CHUNK_BYTES):
            yield _decode(decoder, chunk, f"the file {path}")
    try:
        decoder.close()
    except EventDecodeError as exc:
        raise _TruncatedStreamError(f"{path}: {exc}") from None


def _read_stream(
    sock: socket.socket, where: str
) -> Generator[Iterator[dict[str, Any]], None, None]:
    decoder = EventDecoder()
    with sock:
        while True:
            try:
                chunk = sock.recv(READ_CHUNK_BYTES)
            except ssl.SSLError as exc:
                raise OperatorError(
                    f"{where} refused this subscriber ({exc.reason or exc}): its certificate"
                    " must come from that gateway's events CA (`tlsgate events-ca"
                    " issue-subscriber`), in the subscriber role, and not be revoked"
                ) from exc
            except OSError as exc:
                raise OperatorError(f"lost {where}: {exc.strerror or exc}") from exc
            if not chunk:
                break
            yield _decode(decoder, chunk, where)
    # The gateway stopped. It closes subscribers between events, unless a subscriber
    # was too slow to take its buffer while the gateway shut down.
    try:
        decoder.close()
    except EventDecodeError as exc:
        raise _TruncatedStreamError(f"{where} closed: {exc}") from None


def _connect(socket_arg: str | None, state_dir_arg: str | None) -> tuple[socket.socket, Path]:
    if socket_arg:
        path = Path(socket_arg)
        hint = f"check the path, or start a gateway whose events socket is {path}"
        missing = f"no gateway is running with events socket {path} (no such socket); {hint}"
    else:
        state_dir = resolve_state_dir(state_dir_arg)
        path = events_socket_path(state_dir)
        hint = f"start one with `tlsgate run --state-dir {state_dir}`"
        missing = f"no gateway is running with state dir {state_dir} (no socket at {path}); {hint}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except FileNotFoundError:
        sock.close()
        raise OperatorError(missing) from None
    except ConnectionRefusedError:
        sock.close()
        raise OperatorError(
            f"no gateway is listening on {path} (a socket left by a gateway that exited); {hint}"
        ) from None
    except PermissionError:
        sock.close()
        raise OperatorError(
            f"permission denied connecting to {path}; run as root or as a member of the"
            " socket's group"
        ) from None
    except OSError as exc:
        sock.close()
        raise OperatorError(f"cannot connect to {path}: {exc.strerror or exc}") from None
    return sock, path


def _connect_remote(
    remote: str, cert: str | None, key: str | None, ca: str | None
) -> tuple[socket.socket, str]:
    from tlsgate.supervisor.mtls import client_context

    if not (cert and key and ca):
        raise OperatorError(
            "--remote needs --cert FILE --key FILE --ca FILE: the files `tlsgate events-ca"
            " issue-subscriber NAME --out DIR` wrote (DIR/cert.pem, DIR/key.pem, DIR/ca.pem)"
        )
    host, _, port_text = remote.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise OperatorError(f"--remote {remote!r} is not HOST:PORT (e.g. 198.18.0.1:57100)")
    port = int(port_text)
    context = client_context(Path(ca), Path(cert), Path(key))
    where = f"the gateway at {remote}"
    try:
        raw = socket.create_connection((host, port), timeout=30)
    except OSError as exc:
        raise OperatorError(
            f"cannot connect to {where}: {exc.strerror or exc}; is it started with"
            " --events-remote-listen, and is the port reachable from here?"
        ) from None
    try:
        sock = context.wrap_socket(raw, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        raw.close()
        raise OperatorError(
            f"{where} is not the gateway of this events CA: {exc.verify_message}; check"
            " --ca (the ca.pem given with the subscriber certificate) and the address"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raw.close()
        raise OperatorError(f"TLS with {where} failed: {exc}") from None
    sock.settimeout(None)
    return sock, where


def _decode(decoder: EventDecoder, chunk: bytes, where: str) -> Iterator[dict[str, Any]]:
    try:
        yield from decoder.feed(chunk)
    except EventDecodeError as exc:
        raise OperatorError(f"{where} does not carry tlsgate events: {exc}") from None


def _json_writer(out: TextIO) -> Callable[[dict[str, Any]], int]:
    write = out.write

    def write_json(event: dict[str, Any]) -> int:
        try:
            line = json.dumps(
                event, separators=_JSON_SEPARATORS, allow_nan=False, default=_json_default
            )
        except (TypeError, ValueError):
            # Bytes map keys or non-finite floats: only in foreign or damaged streams.
            line = json.dumps(_jsonable(event), separators=_JSON_SEPARATORS)
        write(line + "\n")
        return 1

    return write_json


def _eve_writer(out: TextIO, types: list[str] | None) -> Callable[[dict[str, Any]], int]:
    write = out.write
    renderer = EveRenderer()
    wanted = frozenset(types) if types else None

    def write_eve(event: dict[str, Any]) -> int:
        if wanted is not None and event["type"] not in wanted:
            renderer.skip(event)
            return 0
        try:
            records = renderer.render(event)
        except EveRenderError as exc:
            raise OperatorError(
                f"event {event.get('seq')!r} of worker {event.get('worker')!r} cannot be"
                f" written as EVE-JSON: {exc}; this is not a tlsgate event stream, or a"
                " corrupt one"
            ) from None
        for record in records:
            write(json.dumps(record, separators=_JSON_SEPARATORS) + "\n")
        return len(records)

    return write_eve


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _jsonable(value: object) -> object:
    """``value`` with bytes (keys too) as text and non-finite floats as null."""
    if isinstance(value, dict):
        return {_text(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _text(key: object) -> str:
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)


def _msgpack_writer(out: TextIO) -> Callable[[dict[str, Any]], int]:
    write = out.buffer.write
    pack = new_packer().pack

    def write_msgpack(event: dict[str, Any]) -> int:
        write(pack(event))
        return 1

    return write_msgpack


def _silence_stdout() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
