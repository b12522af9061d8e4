"""``tlsgate ca init|import|export|info``: the operator's handle on the interception CA.

Contract:

- :func:`add_ca_parser` registers ``ca`` and its subcommands on the top-level parser; each
  subcommand sets ``func``, so the caller runs ``return args.func(args)`` and gets an exit
  code. :class:`~tlsgate.errors.OperatorError` (``CAError``, ``ConfigError``) propagates
  to ``tlsgate.cli.main``, which prints it as one line and exits 2.
- Passphrases never come from argv: ``--passphrase-file FILE`` (refused if group or
  other can access it) or ``--passphrase-fd N`` (an inherited descriptor, read until EOF
  or just past the size bound, then closed unless it is 0-2). One trailing newline
  (``\\n`` or ``\\r\\n``) is stripped; an empty passphrase, or one over
  :data:`~tlsgate.supervisor.ca.MAX_PASSPHRASE_BYTES` (OpenSSL's limit), is refused.
- ``init`` and ``import`` print what was stored and how clients come to trust it;
  ``export`` writes the CA certificate (PEM, or DER with ``--der``) to stdout or, written
  atomically with mode 0644, to ``--out FILE``; DER is never written to a terminal.
  ``info`` prints facts (``--json``: one JSON object) without needing the passphrase.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import stat
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization

from tlsgate.errors import ConfigError, OperatorError
from tlsgate.paths import resolve_state_dir
from tlsgate.supervisor.ca import (
    CERT_MODE,
    DEFAULT_CA_DAYS,
    DEFAULT_KEY_TYPE,
    KEY_TYPES,
    MAX_CA_DAYS,
    MAX_CA_FILE_BYTES,
    MAX_PASSPHRASE_BYTES,
    CAInfo,
    describe_ca,
    import_ca,
    init_ca,
    read_ca_certificates,
    read_previous_ca_certificate,
    write_file_atomically,
)

_READ_CHUNK: Final = 4096
_STD_FDS: Final = frozenset((0, 1, 2))


def add_ca_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``tlsgate ca`` and its subcommands (each sets ``func``)."""
    ca = subparsers.add_parser(
        "ca",
        help="create, import, export or inspect the interception CA",
        description="Manage the CA whose certificates the gateway presents to clients.",
    )
    commands = ca.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")

    init = commands.add_parser(
        "init",
        help="create a new CA",
        description="Create a new self-signed CA in <state-dir>/ca (refuses to replace one "
        "unless --force).",
    )
    init.add_argument(
        "--key-type",
        choices=KEY_TYPES,
        default=DEFAULT_KEY_TYPE,
        help=f"CA key type (default {DEFAULT_KEY_TYPE})",
    )
    init.add_argument(
        "--days",
        type=_days,
        default=DEFAULT_CA_DAYS,
        metavar="N",
        help=f"validity in days, 1 to {MAX_CA_DAYS} (default {DEFAULT_CA_DAYS})",
    )
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    add_passphrase_options(init, "passphrase", "encrypt the stored key with the passphrase")
    _add_state_dir(init)
    init.set_defaults(func=_cmd_init)

    imp = commands.add_parser(
        "import",
        help="adopt an existing CA (e.g. an intermediate issued for interception)",
        description="Store CERT (the CA certificate, then its chain up to the root, PEM) and "
        "KEY (its PEM private key) as the gateway's CA, after checking them.",
    )
    imp.add_argument("cert", metavar="CERT", help="PEM file: the CA certificate, then its chain")
    imp.add_argument("key", metavar="KEY", help="PEM file: the CA private key")
    add_passphrase_options(imp, "key-passphrase", "the passphrase that decrypts KEY")
    add_passphrase_options(imp, "passphrase", "encrypt the stored key with the passphrase")
    imp.add_argument("--force", action="store_true", help="replace an existing CA")
    _add_state_dir(imp)
    imp.set_defaults(func=_cmd_import)

    export = commands.add_parser(
        "export",
        help="print the CA certificate for clients to trust",
        description="Write the CA certificate (PEM, or DER with --der) to stdout or --out.",
    )
    export.add_argument("--der", action="store_true", help="DER instead of PEM")
    export.add_argument(
        "--all",
        action="store_true",
        help="PEM bundle of the current CA and the one it replaced (if still valid), for "
        "clients during a CA rotation",
    )
    export.add_argument("--out", metavar="FILE", help="write to FILE (mode 0644) instead")
    _add_state_dir(export)
    export.set_defaults(func=_cmd_export)

    info = commands.add_parser(
        "info",
        help="show the CA's fingerprint, subject, key, validity and files",
        description="Describe the stored CA; needs no passphrase.",
    )
    info.add_argument("--json", action="store_true", help="one JSON object")
    _add_state_dir(info)
    info.set_defaults(func=_cmd_info)


def add_passphrase_options(parser: argparse.ArgumentParser, flag: str, purpose: str) -> None:
    """Add ``--<flag>-file FILE`` and ``--<flag>-fd N`` (mutually exclusive) to ``parser``.

    Read the result with :func:`passphrase_from_args` and the same ``flag``.
    """
    group = parser.add_mutually_exclusive_group()
    dest = flag.replace("-", "_")
    group.add_argument(
        f"--{flag}-file",
        dest=f"{dest}_file",
        metavar="FILE",
        help=f"{purpose}, read from FILE (one trailing newline stripped)",
    )
    group.add_argument(
        f"--{flag}-fd",
        dest=f"{dest}_fd",
        type=_fd,
        metavar="N",
        help=f"{purpose}, read from inherited file descriptor N until EOF",
    )


def passphrase_from_args(args: argparse.Namespace, flag: str = "passphrase") -> bytes | None:
    """The passphrase given by the options :func:`add_passphrase_options` added, or None."""
    dest = flag.replace("-", "_")
    path: str | None = getattr(args, f"{dest}_file")
    fd: int | None = getattr(args, f"{dest}_fd")
    if path is not None:
        return read_passphrase_file(Path(path), f"--{flag}-file")
    if fd is not None:
        return read_passphrase_fd(fd, f"--{flag}-fd")
    return None


def read_passphrase_file(path: Path, option: str = "--passphrase-file") -> bytes:
    """A passphrase from a file only its owner can access; :class:`ConfigError` if unusable."""
    try:
        with open(path, "rb") as src:
            st = os.stat(src.fileno())
            data = src.read(MAX_PASSPHRASE_BYTES + 3)
    except OSError as err:
        raise ConfigError(f"cannot read {option} {path}: {err.strerror}") from err
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{option} {path} is accessible by group or other "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run chmod 600 {shlex.quote(str(path))}"
        )
    return _passphrase(data, f"{option} {path}")


def read_passphrase_fd(fd: int, option: str = "--passphrase-fd") -> bytes:
    """A passphrase read from ``fd`` until EOF; the descriptor is closed (unless 0-2)."""
    chunks: list[bytes] = []
    size = 0
    try:
        while size <= MAX_PASSPHRASE_BYTES + 2:
            chunk = os.read(fd, _READ_CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as err:
        raise ConfigError(
            f"cannot read {option} {fd}: {err.strerror}; pass a descriptor the parent left "
            "open for reading (e.g. `3<passphrase.txt`)"
        ) from err
    finally:
        if fd not in _STD_FDS:
            # An already closed (or never open) fd: the read error above says so.
            with contextlib.suppress(OSError):
                os.close(fd)
    return _passphrase(b"".join(chunks), f"{option} {fd}")


def _passphrase(data: bytes, source: str) -> bytes:
    if data.endswith(b"\n"):
        data = data[:-2] if data.endswith(b"\r\n") else data[:-1]
    if not data:
        raise ConfigError(f"{source} holds an empty passphrase; put the passphrase in it")
    if len(data) > MAX_PASSPHRASE_BYTES:
        raise ConfigError(
            f"{source} holds more than {MAX_PASSPHRASE_BYTES} bytes; a passphrase is one line"
        )
    return data


def days_type(max_days: int) -> Callable[[str], int]:
    """An argparse ``type`` for a number of days from 1 to ``max_days``."""

    def days(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
        if not 1 <= value <= max_days:
            raise argparse.ArgumentTypeError(f"must be 1 to {max_days} days, not {value}")
        return value

    return days


_days = days_type(MAX_CA_DAYS)


def _fd(text: str) -> int:
    try:
        fd = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a file descriptor number: {text!r}") from None
    if fd < 0:
        raise argparse.ArgumentTypeError(f"not a file descriptor number: {fd}")
    return fd


def _add_state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="state directory holding ca/ (default: /var/lib/tlsgate as root, else "
        "$XDG_STATE_HOME/tlsgate)",
    )


def _read_input(path_text: str, what: str) -> bytes:
    path = Path(path_text)
    try:
        with open(path, "rb") as src:
            data = src.read(MAX_CA_FILE_BYTES + 1)
    except OSError as err:
        raise OperatorError(f"cannot read {what} {path}: {err.strerror}") from err
    if len(data) > MAX_CA_FILE_BYTES:
        raise OperatorError(
            f"{what} {path} is larger than {MAX_CA_FILE_BYTES} bytes; it is not a PEM CA file"
        )
    return data


def _cmd_init(args: argparse.Namespace) -> int:
    state_dir = resolve_state_dir(args.state_dir)
    passphrase = passphrase_from_args(args)
    init_ca(state_dir, args.key_type, args.days, passphrase, args.force)
    _print_stored("created a new CA", state_dir, "Clients must trust this CA")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    state_dir = resolve_state_dir(args.state_dir)
    cert_pem = _read_input(args.cert, "CERT")
    key_pem = _read_input(args.key, "KEY")
    key_passphrase = passphrase_from_args(args, "key-passphrase")
    store_passphrase = passphrase_from_args(args, "passphrase")
    import_ca(state_dir, cert_pem, key_pem, key_passphrase, store_passphrase, args.force)
    _print_stored("imported the CA", state_dir, "Clients must trust this CA or the root above it")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    state_dir = resolve_state_dir(args.state_dir)
    cert = read_ca_certificates(state_dir)[0]
    encoding = serialization.Encoding.DER if args.der else serialization.Encoding.PEM
    data = cert.public_bytes(encoding)
    if args.all:
        if args.der:
            raise ConfigError("--all writes a PEM bundle; it cannot be combined with --der")
        previous = read_previous_ca_certificate(state_dir)
        if previous is not None and previous.not_valid_after_utc > datetime.now(UTC):
            data += previous.public_bytes(serialization.Encoding.PEM)
    if args.out is not None:
        out = Path(args.out)
        try:
            write_file_atomically(out, data, CERT_MODE)
        except OSError as err:
            raise OperatorError(f"cannot write --out {out}: {err.strerror}") from err
        return 0
    if args.der and sys.stdout.isatty():
        raise OperatorError(
            "refusing to write DER (binary) to a terminal; redirect stdout or use --out FILE"
        )
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    info = describe_ca(resolve_state_dir(args.state_dir))
    if args.json:
        print(json.dumps(_info_json(info), indent=2))
    else:
        print(_info_text(info))
    return 0


def _info_json(info: CAInfo) -> dict[str, object]:
    return {
        "cert_path": str(info.cert_path),
        "key_path": str(info.key_path),
        "subject": info.subject,
        "issuer": info.issuer,
        "fingerprint_sha256": info.fingerprint_sha256,
        "key_type": info.key_type,
        "key_size": info.key_size,
        "not_before": info.not_before.isoformat(),
        "not_after": info.not_after.isoformat(),
        "chain_length": info.chain_length,
        "key_mode": f"{info.key_mode:04o}",
        "key_encrypted": info.key_encrypted,
        "self_signed": info.self_signed,
    }


def _info_text(info: CAInfo) -> str:
    kind = "self-signed root" if info.self_signed else f"issued by {info.issuer}"
    return "\n".join(
        (
            f"subject:     {info.subject} ({kind})",
            f"fingerprint: SHA-256 {info.fingerprint_sha256}",
            f"key:         {info.key_type}, {info.key_size} bits, "
            f"{'encrypted' if info.key_encrypted else 'not encrypted'}",
            f"valid:       {info.not_before:%Y-%m-%d %H:%M:%S} UTC to "
            f"{info.not_after:%Y-%m-%d %H:%M:%S} UTC",
            f"chain:       {info.chain_length} certificate(s) sent to clients after each leaf",
            f"certificate: {info.cert_path}",
            f"key file:    {info.key_path} (mode {info.key_mode:04o})",
        )
    )


def _print_stored(what: str, state_dir: Path, trust: str) -> None:
    default = state_dir == resolve_state_dir(None)
    sd = "" if default else f" --state-dir {shlex.quote(str(state_dir))}"
    print(f"tlsgate: {what}")
    print(_info_text(describe_ca(state_dir)))
    print(f"{trust}: tlsgate ca export{sd} > tlsgate-ca.pem")
