"""A supervisor service on its own thread around a selector (the event hub, the signer).

Rules:

- :meth:`SelectorService._start_service` opens the selector and a wake-up socketpair,
  lets the subclass set up (listeners, files) and starts the thread; a set-up error closes
  everything and propagates. :meth:`SelectorService.stop` sets the stop flag, wakes the
  thread and joins it (idempotent).
- The thread loops: ``select`` with the subclass's :meth:`~SelectorService._select_timeout`
  (shortened while a listener is paused), dispatch each ready key to its callback, resume
  paused listeners whose time has come, then :meth:`~SelectorService._tick`. On stop it
  runs :meth:`~SelectorService._on_stop` and closes everything. An exception that escapes
  is stored in :attr:`~SelectorService.failure` and logged as critical, with what it costs.
- Listeners (:meth:`~SelectorService._listen`) accept at most
  :data:`MAX_ACCEPTS_PER_WAKEUP` connections per wake-up and hand each, non-blocking, to
  their callback. When ``accept`` fails (out of descriptors, most likely) the listener is
  paused for :data:`ACCEPT_RETRY_DELAY` seconds: the backlog keeps the connections.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Final

logger = logging.getLogger(__name__)

#: Connections accepted per wake-up of a listening socket.
MAX_ACCEPTS_PER_WAKEUP: Final = 64
#: Seconds to stop accepting after accept() failed (e.g. out of file descriptors).
ACCEPT_RETRY_DELAY: Final = 1.0

#: What a listener's callback receives: the accepted socket (non-blocking) and its address.
OnConnection = Callable[[socket.socket, Any], None]


class _Listener:
    __slots__ = ("close", "on_connection", "on_ready", "paused_until", "sock", "what")

    def __init__(
        self, sock: socket.socket, what: str, on_connection: OnConnection,
        close: Callable[[], None],
    ) -> None:  # fmt: skip
        self.sock = sock
        self.what = what
        self.on_connection = on_connection
        self.close = close
        self.paused_until = 0.0
        self.on_ready: Callable[[int], None] = lambda mask: None


class SelectorService:
    """Base of a service thread: see the module rules. Subclasses set the class names."""

    #: Name of the thread.
    thread_name = "tlsgate-service"
    #: Logged, as critical, when the thread dies: what stops working.
    failure_consequence = "the service stopped"

    def __init__(self) -> None:
        self._selector: selectors.BaseSelector | None = None
        self._listeners: list[_Listener] = []
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failure: BaseException | None = None

    # -- any thread ---------------------------------------------------------------------

    def _start_service(self, set_up: Callable[[], None]) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__}.start() called twice")
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        try:
            set_up()
        except BaseException:
            self._close_all()
            raise
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (after :meth:`_on_stop`) and close everything; idempotent."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake()
        thread.join()

    @property
    def running(self) -> bool:
        """True while the service thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def failure(self) -> BaseException | None:
        """The error that killed the service thread (also logged), if one did."""
        return self._failure

    def _wake(self) -> None:
        if self._wake_w is None:
            return
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # full: a wake-up is pending already; closed: the thread is gone

    # -- set-up -------------------------------------------------------------------------

    def _listen(
        self, sock: socket.socket, what: str, on_connection: OnConnection,
        close: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        """Accept connections on ``sock`` (listening, non-blocking) for ``on_connection``."""
        assert self._selector is not None
        listener = _Listener(sock, what, on_connection, close or sock.close)
        listener.on_ready = lambda mask: self._accept(listener)
        self._listeners.append(listener)
        self._selector.register(sock, selectors.EVENT_READ, listener.on_ready)

    # -- the service thread -------------------------------------------------------------

    def _select_timeout(self) -> float | None:
        """Seconds ``select`` may wait (None: until something happens)."""
        return None

    def _tick(self) -> None:
        """Called after every ``select``, once its ready keys were dispatched."""

    def _on_stop(self) -> None:
        """Called on the thread once the stop flag is seen, before everything is closed."""

    def _close_connections(self) -> None:
        """Close what the subclass opened (connections, files)."""

    def _run(self) -> None:
        try:
            selector = self._selector
            assert selector is not None
            while not self._stopping:
                timeout = self._select_timeout()
                paused = [lst.paused_until for lst in self._listeners if lst.paused_until]
                if paused:
                    wait = max(0.0, min(paused) - time.monotonic())
                    timeout = wait if timeout is None else min(timeout, wait)
                for key, mask in selector.select(timeout):
                    key.data(mask)
                if paused:
                    self._resume_listeners()
                self._tick()
            self._on_stop()
        except BaseException as exc:
            self._failure = exc
            logger.critical("%s failed: %s", self.thread_name, self.failure_consequence,
                            exc_info=True)  # fmt: skip
        finally:
            self._close_all()

    def _on_wake(self, mask: int) -> None:
        assert self._wake_r is not None
        try:
            self._wake_r.recv(4096)
        except BlockingIOError:
            pass

    def _accept(self, listener: _Listener) -> None:
        for _ in range(MAX_ACCEPTS_PER_WAKEUP):
            try:
                conn, address = listener.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                logger.warning(
                    "the %s cannot accept connections (%s); retrying in %.0f s",
                    listener.what, exc, ACCEPT_RETRY_DELAY,
                )  # fmt: skip
                assert self._selector is not None
                self._selector.unregister(listener.sock)
                listener.paused_until = time.monotonic() + ACCEPT_RETRY_DELAY
                return
            conn.setblocking(False)
            listener.on_connection(conn, address)

    def _resume_listeners(self) -> None:
        now = time.monotonic()
        for listener in self._listeners:
            if listener.paused_until and now >= listener.paused_until:
                listener.paused_until = 0.0
                assert self._selector is not None
                self._selector.register(listener.sock, selectors.EVENT_READ, listener.on_ready)

    def _unregister(self, sock: socket.socket) -> None:
        """Stop watching ``sock``, also when the selector is broken (a service that failed
        because of it must still close every socket it holds)."""
        if self._selector is None:
            return
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass  # not registered, or the selector itself failed: closing goes on

    def _close_listeners(self) -> None:
        """Stop accepting for good (listening sockets closed, socket files removed)."""
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            if not listener.paused_until:
                self._unregister(listener.sock)
            listener.close()

    def _close_all(self) -> None:
        self._close_connections()
        self._close_listeners()
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None
        if self._selector is not None:
            try:
                self._selector.close()
            except (ValueError, OSError):
                pass  # closed already (a crash closed it under the thread)
            self._selector = None
