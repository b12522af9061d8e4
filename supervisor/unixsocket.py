"""The supervisor's Unix sockets (detection, signer, control): creating them and the files left.

- A socket file at the path is removed only when nothing listens on it (a gateway that
  exited without cleaning up); if something answers, another gateway is running and we
  refuse to start (:func:`remove_stale_socket`).
- :func:`create_unix_listener` creates a listening socket whose mode (and owner) are set
  before anyone can connect: bound inside a fresh private directory, chmod-ed and
  chown-ed there, then hard-linked into place, which also fails if the name was taken in
  the meantime. :meth:`UnixListener.close` removes the file only if it is still the one
  this listener created (another gateway may have replaced it).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import stat
import struct
import tempfile
from pathlib import Path
from typing import Final

from tlsgate.errors import OperatorError

logger = logging.getLogger(__name__)

#: Pending connections a listening socket queues.
LISTEN_BACKLOG: Final = 64

_PEERCRED: Final = struct.Struct("3i")


def peer_name(sock: socket.socket) -> str:
    """``pid N (uid U)`` of the process at the other end of a Unix socket, for logs."""
    try:
        pid, uid, _ = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
    except OSError:
        return "an unknown process"
    return f"pid {pid} (uid {uid})"


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


class UnixListener:
    """A listening Unix socket and the identity of the file it was bound to."""

    def __init__(self, sock: socket.socket, path: Path, file_id: tuple[int, int]) -> None:
        self.sock = sock
        self.path = path
        self._file_id = file_id

    def close(self) -> None:
        """Close the socket; remove its file if it is still the one this listener made."""
        self.sock.close()
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._file_id:
            unlink_quietly(self.path)


def create_unix_listener(
    path: Path, what: str, mode: int, *, uid: int | None = None, gid: int | None = None
) -> UnixListener:
    """A non-blocking ``what`` socket listening at ``path`` with ``mode`` (see module rules).

    OperatorError, saying what to do, when it cannot be created or a gateway is running.
    """
    if not path.parent.is_dir():
        raise OperatorError(
            f"cannot create the {what} socket {path}: directory {path.parent} does not exist;"
            " create it or choose another --state-dir"
        )
    remove_stale_socket(path, what)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            private = Path(tempfile.mkdtemp(prefix=".s", dir=path.parent))  # mode 0700
        except OSError:
            listener.close()
            raise
        temp = private / "s"
        try:
            listener.bind(str(temp))
            os.chmod(temp, mode)
            if uid is not None or gid is not None:
                os.chown(temp, -1 if uid is None else uid, -1 if gid is None else gid)
            listener.listen(LISTEN_BACKLOG)
            os.link(temp, path)
        finally:
            shutil.rmtree(private, ignore_errors=True)
        st = os.lstat(path)
    except FileExistsError as exc:
        listener.close()
        raise OperatorError(
            f"another gateway is running: it created the {what} socket {path} just now;"
            " stop it or use another --state-dir"
        ) from exc
    except OSError as exc:
        listener.close()
        raise OperatorError(
            f"cannot create the {what} socket {path}: {exc.strerror or exc}; check the"
            " directory's permissions (and that the path is short enough for a Unix socket),"
            " or choose another --state-dir"
        ) from exc
    listener.setblocking(False)
    return UnixListener(listener, path, (st.st_dev, st.st_ino))
