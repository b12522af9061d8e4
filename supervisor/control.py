"""The management interface: a root-only Unix socket, one JSON request per line.

Requests: ``{"cmd": "status"}``, ``{"cmd": "reload"}``, ``{"cmd": "drain", "worker": K}``,
``{"cmd": "metrics"}`` (Prometheus text in ``"text"``). Every answer is one JSON line with
``"ok"``. The socket is created mode 0600 in the runtime directory (0750): only root (the
supervisor's user) may manage the gateway. Requests that change state are handed to the
arbiter's loop (the one place that touches worker processes) and answered when done.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tlsgate.errors import OperatorError
from tlsgate.supervisor.unixsocket import remove_stale_socket

MAX_REQUEST_BYTES = 4096
REQUEST_TIMEOUT = 60.0

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlServer:
    """Serves the control socket in a thread; ``handle`` answers one request."""

    def __init__(self, path: Path, handle: Handler) -> None:
        self.path = path
        self._handle = handle
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        path = self.path
        remove_stale_socket(path, "control")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(16)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="tlsgate-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected: closing is enough
            self._sock.close()
            self._sock = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _serve(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(REQUEST_TIMEOUT)
            try:
                data = b""
                while b"\n" not in data and len(data) <= MAX_REQUEST_BYTES:
                    chunk = conn.recv(1024)
                    if not chunk:
                        break
                    data += chunk
                try:
                    request = json.loads(data.split(b"\n", 1)[0] or b"null")
                    if not isinstance(request, dict):
                        raise ValueError("a request is a JSON object")
                    answer = self._handle(request)
                except (ValueError, KeyError) as exc:
                    answer = {"ok": False, "error": f"bad request: {exc}"}
                conn.sendall(json.dumps(answer).encode() + b"\n")
            except OSError:
                return  # the client went away


def request(path: Path, payload: dict[str, Any], timeout: float = REQUEST_TIMEOUT) -> Any:
    """Send one request to the gateway's control socket and return its answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except FileNotFoundError:
        raise OperatorError(
            f"no gateway is running with this state dir (no control socket at {path}); "
            "start one with `tlsgate run`"
        ) from None
    except PermissionError:
        raise OperatorError(
            f"permission denied on {path}: the control socket is root-only"
        ) from None
    except OSError as exc:
        raise OperatorError(f"cannot reach the gateway at {path}: {exc.strerror}") from None
    with sock:
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise OperatorError(
            f"the gateway closed the control connection at {path} without answering"
        )
    return json.loads(data)
