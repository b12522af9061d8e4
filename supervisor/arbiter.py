"""The supervisor: one worker process per core behind SO_REUSEPORT, kept alive, replaced
without losing connections, and reported on.

Modelled on gunicorn's arbiter:
- signal handlers only enqueue; the main loop dispatches ``handle_<signal>``, then reaps
  dead workers, kills unresponsive ones (heartbeat) and spawns missing ones with backoff;
- signals to workers go through :meth:`Arbiter.signal_worker`: a worker that cannot be
  signalled (no ``CAP_KILL`` for workers of another user: ``PermissionError``; gone
  already: ``ProcessLookupError``) is logged with what to do, and the rest goes on — a
  stop never ends in a traceback that leaves workers behind;
- a worker that fails at boot repeatedly (exit code ``EXIT_BOOT_FAILURE``, or death within
  ``BOOT_WINDOW`` of its start) stops the supervisor with a clear message instead of looping.

The supervisor keeps every listening socket open itself: a worker that dies leaves its
socket in the reuseport group, so connections queued on it wait for the restarted worker
instead of being reset. A worker that is *replaced* (reload, drain) gets a new socket that
takes its steering slot first; the old socket is closed only then, and what was queued on
it migrates to the siblings (``SELECT_OR_MIGRATE`` or ``net.ipv4.tcp_migrate_req``).
"""

from __future__ import annotations

import os
import queue
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tlsgate.errors import OperatorError

BOOT_WINDOW = 2.0
MAX_BOOT_FAILURES = 5
HEARTBEAT_TIMEOUT = 10.0
DRAIN_GRACE = 5.0  # beyond the workers' own drain_timeout, then SIGKILL
MAX_BACKOFF = 10.0


def restart_backoff(boot_failures: int) -> float:
    """Seconds to wait before starting a process again after ``boot_failures`` failed boots
    in a row (workers and the signer alike): 0, then 0.2, 0.4, ... up to ``MAX_BACKOFF``."""
    return min(MAX_BACKOFF, 0.1 * 2**boot_failures) if boot_failures else 0.0


STATS_FIELDS = ("beat", "accepted", "active", "closed", "refused", "protocol_errors",
                "over_limit", "minted", "cert_lookups", "access_refused",
                "limit_hits")  # fmt: skip


class BootFailure(OperatorError):
    """Workers cannot start; respawning would loop."""


@dataclass
class Slot:
    """Worker k: its process, its listening socket, and its history."""

    index: int
    listener: Any
    process: Any = None
    stats: Any = None  # shared array of STATS_FIELDS
    started: float = 0.0
    boot_failures: int = 0
    restarts: int = 0
    next_spawn: float = 0.0
    retiring: list[Any] = field(default_factory=list)  # old processes draining after reload


class Arbiter:
    """Process bookkeeping; the gateway wiring (sockets, signer, hub) is passed in."""

    def __init__(
        self,
        n_workers: int,
        drain_timeout: float,
        make_listener: Callable[[int], Any],
        spawn: Callable[[Slot], None],
        on_slot_socket: Callable[[Slot], None],
        log: Callable[[str], None],
        report: Callable[[str, dict[str, Any]], None] | None = None,
        on_exit: Callable[[Any], None] | None = None,
    ) -> None:
        self.slots = [Slot(k, make_listener(k)) for k in range(n_workers)]
        self.drain_deadline = drain_timeout + DRAIN_GRACE
        self._make_listener = make_listener
        self._spawn = spawn
        self._on_slot_socket = on_slot_socket
        self._log = log
        #: ``report(event_type, fields)``: the supervisor's events (``worker_exit``)
        self._report = report
        #: ``on_exit(process)``: a worker process (current or retiring) was reaped
        self._on_exit = on_exit
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.requests: queue.SimpleQueue[tuple[str, Any, Callable[[Any], None]]] = (
            queue.SimpleQueue()
        )
        self.stopping = False
        self.started = time.time()
        self.reloads = 0

    # -- signals: handlers only enqueue ------------------------------------------------
    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._enqueue)

    def _enqueue(self, signum: int, frame: object) -> None:
        self._signals.put(signum)

    # -- main loop ---------------------------------------------------------------------------
    def run(self, on_reload: Callable[[], None], tick: Callable[[], None]) -> None:
        self._on_reload = on_reload
        self._tick = tick
        try:
            self._loop()
        finally:
            self.stop_all()

    def _loop(self) -> None:
        for slot in self.slots:
            self._start(slot)
        while not self.stopping:
            try:
                signum = self._signals.get(timeout=0.2)
            except queue.Empty:
                signum = None
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.stopping = True
                break
            if signum == signal.SIGHUP:
                try:
                    self.reload()
                except (OSError, OperatorError) as exc:
                    self._log(f"reload failed: {exc}; still running as before")
            self._serve_requests()
            self.reap()
            self.check_heartbeats()
            self.spawn_missing()
            self._tick()

    def _serve_requests(self) -> None:
        while True:
            try:
                what, arg, reply = self.requests.get_nowait()
            except queue.Empty:
                return
            try:
                if what == "reload":
                    self.reload()
                    reply({"ok": True, "reloads": self.reloads})
                elif what == "drain":
                    self.replace(self.slots[int(arg)], reason="drain")
                    reply({"ok": True})
                else:
                    reply({"ok": False, "error": f"unknown request {what!r}"})
            except (OSError, IndexError, ValueError, OperatorError) as exc:
                reply({"ok": False, "error": str(exc)})

    def _start(self, slot: Slot) -> None:
        slot.started = time.monotonic()
        self._spawn(slot)

    def reap(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            ended = [p for p in slot.retiring if not p.is_alive()]
            for old in ended:
                old.join(0)
                self._exited(old)
            slot.retiring = [p for p in slot.retiring if p not in ended]
            proc = slot.process
            if proc is None or proc.is_alive():
                continue
            proc.join(0)
            self._exited(proc)
            code = proc.exitcode
            lived = now - slot.started
            slot.process = None
            if self.stopping:
                continue
            from tlsgate.workers.process import EXIT_BOOT_FAILURE

            if code == EXIT_BOOT_FAILURE or lived < BOOT_WINDOW:
                slot.boot_failures += 1
            else:
                slot.boot_failures = 0
            if slot.boot_failures >= MAX_BOOT_FAILURES:
                self.stopping = True
                raise BootFailure(
                    f"worker {slot.index} failed to start {slot.boot_failures} times in a row "
                    f"(last exit code {code}); see its message above, fix the cause and restart"
                )
            backoff = restart_backoff(slot.boot_failures)
            slot.next_spawn = now + backoff
            slot.restarts += 1
            self._log(f"worker {slot.index} (pid {proc.pid}) exited with code {code}; "
                      f"restarting{f' in {backoff:.1f} s' if backoff else ''}")  # fmt: skip
            if self._report is not None:
                self._report("worker_exit", _exit_fields(slot, proc.pid, code, lived, backoff))

    def _exited(self, proc: Any) -> None:
        if self._on_exit is not None:
            self._on_exit(proc)

    def check_heartbeats(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            proc = slot.process
            if proc is None or slot.stats is None or now - slot.started < HEARTBEAT_TIMEOUT:
                continue
            if now - slot.stats[0] > HEARTBEAT_TIMEOUT:
                self._log(f"worker {slot.index} (pid {proc.pid}) missed its heartbeat for "
                          f"{HEARTBEAT_TIMEOUT:.0f} s; killing it")  # fmt: skip
                self.signal_worker(proc, signal.SIGKILL, "kill the unresponsive worker")

    def signal_worker(self, proc: Any, sig: int, what: str) -> bool:
        """Send ``sig`` to a worker; False (and a log line saying why) if it cannot be."""
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            return False  # it exited already; reaping will see it
        except PermissionError:
            self._log(
                f"cannot {what} (pid {proc.pid}, {signal.Signals(sig).name}): permission "
                "denied; the supervisor needs CAP_KILL to signal workers running as another "
                "user (see docs/security.md); stop it by hand: kill "
                f"-{signal.Signals(sig).name.removeprefix('SIG')} {proc.pid}"
            )
            return False
        return True

    def spawn_missing(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.process is None and not self.stopping and now >= slot.next_spawn:
                self._start(slot)

    # -- replacing workers without losing connections ----------------------------------------
    def replace(self, slot: Slot, reason: str) -> None:
        """A new socket and worker for ``slot``; the old worker drains and exits."""
        old_proc, old_sock = slot.process, slot.listener
        slot.listener = self._make_listener(slot.index)
        self._start(slot)
        self._wait_ready(slot)
        self._on_slot_socket(slot)  # steering now sends new connections to the new socket
        old_sock.close()  # our copy; the old worker closes its own when it stops
        if old_proc is not None and old_proc.is_alive():
            self.signal_worker(old_proc, signal.SIGTERM, f"stop the replaced worker {slot.index}")
            slot.retiring.append(old_proc)
        self._log(f"worker {slot.index} replaced ({reason})")

    def _wait_ready(self, slot: Slot, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if slot.stats is not None and slot.stats[0] >= slot.started:
                return
            if slot.process is not None and not slot.process.is_alive():
                raise OperatorError(f"the new worker {slot.index} died at start; see above")
            time.sleep(0.02)
        raise OperatorError(f"the new worker {slot.index} did not become ready in {timeout} s")

    def reload(self) -> None:
        self._on_reload()
        for slot in self.slots:
            self.replace(slot, reason="reload")
        self.reloads += 1

    def stop_all(self) -> None:
        """Stop accepting (close our listener copies; workers close theirs on SIGTERM), let
        in-flight connections finish up to the drain deadline, then kill what is left."""
        for slot in self.slots:
            slot.listener.close()
        procs = [s.process for s in self.slots if s.process is not None]
        procs += [p for s in self.slots for p in s.retiring]
        for proc in procs:
            if proc.is_alive():
                self.signal_worker(proc, signal.SIGTERM, "stop a worker")
        end = time.monotonic() + self.drain_deadline
        left = []
        for proc in procs:
            proc.join(max(0.0, end - time.monotonic()))
            if proc.is_alive():
                if self.signal_worker(proc, signal.SIGKILL, "kill a worker past its drain"):
                    proc.join(5)
                if proc.is_alive():
                    left.append(proc.pid)
        if left:
            self._log(f"workers still running after the stop: pids {' '.join(map(str, left))}; "
                      "they close when their connections end, or kill them by hand")  # fmt: skip


def _exit_fields(
    slot: Slot, pid: int, code: int | None, lived: float, backoff: float
) -> dict[str, Any]:
    """The ``worker_exit`` event: who died, how, and what it was serving at its last beat."""
    stats = dict(zip(STATS_FIELDS, slot.stats or [0.0] * len(STATS_FIELDS), strict=True))
    sig = -code if code is not None and code < 0 else None
    return {
        "worker_id": slot.index,
        "pid": pid,
        "exit_code": code,
        "signal": signal.Signals(sig).name if sig else None,
        "lifetime": round(lived, 3),
        # connections the worker had open at its last heartbeat: they ended without conn_close
        "connections_cut": int(stats["active"]),
        "restarts": slot.restarts,
        "restart_in": round(backoff, 3),
    }
