"""Where tlsgate keeps its state: one function per path, so every command agrees.

- state dir (0700): ``/var/lib/tlsgate`` as root, else ``$XDG_STATE_HOME/tlsgate``
  (``~/.local/state/tlsgate``); ``--state-dir`` overrides. It holds ``ca/cert.pem`` and
  ``ca/key.pem`` (0600).
- runtime dir (0750): ``/run/tlsgate`` for the default root state dir, otherwise
  ``<state-dir>/run``, so that ``tlsgate events --state-dir DIR`` finds the sockets of
  the gateway started with ``--state-dir DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT_STATE_DIR = Path("/var/lib/tlsgate")
ROOT_RUNTIME_DIR = Path("/run/tlsgate")


def default_state_dir() -> Path:
    """The state directory used when ``--state-dir`` is not given."""
    if os.geteuid() == 0:
        return ROOT_STATE_DIR
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tlsgate"


def resolve_state_dir(state_dir: str | os.PathLike[str] | None) -> Path:
    """The state directory for a ``--state-dir`` value (``None``: the default)."""
    return Path(state_dir).expanduser().absolute() if state_dir else default_state_dir()


def runtime_dir(state_dir: Path) -> Path:
    """The runtime directory (sockets, shared cache) belonging to ``state_dir``."""
    if state_dir == ROOT_STATE_DIR:
        return ROOT_RUNTIME_DIR
    return state_dir / "run"


def ca_cert_path(state_dir: Path) -> Path:
    return state_dir / "ca" / "cert.pem"


def ca_key_path(state_dir: Path) -> Path:
    return state_dir / "ca" / "key.pem"


def ca_previous_cert_path(state_dir: Path) -> Path:
    """The CA certificate replaced by the last ``ca init/import --force`` (for clients that
    must trust both during a rotation)."""
    return state_dir / "ca" / "previous.pem"


def events_socket_path(state_dir: Path) -> Path:
    return runtime_dir(state_dir) / "events.sock"


def control_socket_path(state_dir: Path) -> Path:
    return runtime_dir(state_dir) / "control.sock"


def events_ca_dir(state_dir: Path) -> Path:
    """The events CA (remote subscribers, metrics scrapers): never the interception CA."""
    return state_dir / "events-ca"
