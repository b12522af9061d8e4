"""The supervisor's Unix sockets (detection, signer, control): one rule for a file left behind.

A socket file at the path is removed only when nothing listens on it (a gateway that exited
without cleaning up); if something answers, another gateway is running and we refuse to start.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from pathlib import Path

from tlsgate.errors import OperatorError

logger = logging.getLogger(__name__)


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_stale_socket(path: Path, what: str) -> None:
    """Remove a ``what`` socket file nobody listens on; OperatorError if one is listening."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OperatorError(
            f"{path} exists and is not a socket; move it away or choose another --state-dir"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        logger.info("removing the stale %s socket %s left by a gateway that exited", what, path)
        unlink_quietly(path)
        return
    except FileNotFoundError:
        return
    except BlockingIOError:
        pass  # listening, with a full backlog: alive
    except OSError as exc:
        raise OperatorError(
            f"cannot check whether a gateway is listening on {path}: {exc.strerror or exc};"
            " remove the file if no gateway is running"
        ) from exc
    finally:
        probe.close()
    raise OperatorError(
        f"another gateway is running: {path} accepts connections;"
        " stop it first or use another --state-dir"
    )
