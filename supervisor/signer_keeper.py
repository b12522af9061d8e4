"""Keeping the signer process alive (the supervisor's side of :mod:`.signer_process`).

Rules:

- :meth:`SignerKeeper.start` starts the first signer and waits for its report (the CA is
  created on the gateway's first start); :meth:`SignerKeeper.rotate` (reload) starts a
  new signer on a new socket path with the CA now on disk, and stops the old one only
  once the new one is serving — a CA that cannot be loaded leaves the old signer running
  and the reload fails with the signer's reason. Both raise
  :class:`~tlsgate.errors.OperatorError` with that reason.
- :meth:`SignerKeeper.tick`, called by the supervisor's loop every turn (about five times a
  second, and at once on SIGCHLD), never blocks: it reaps a dead signer (logged with its
  exit code or signal), starts the next one (each incarnation listens on its own socket
  path, ``signer-<n>.sock``; the dead one's file is removed), and once it reports ready
  returns a :class:`SignerRestart` — the supervisor then emits ``signer_restart`` and
  replaces the workers one at a time (workers that dropped root cannot reconnect by path,
  and the path changed anyway).
- Crash loops back off like workers: a signer that dies before reporting ready, or within
  ``BOOT_WINDOW`` of it, is a boot failure; the next start waits 0.1 s · 2^failures (at most
  ``MAX_BACKOFF``), and ``MAX_BOOT_FAILURES`` in a row stop the gateway
  (:class:`~tlsgate.supervisor.arbiter.BootFailure`) with the signer's last reason. One
  that does not report within :data:`BOOT_TIMEOUT` is killed and counts as a failure.
- A signer alive but not serving (stopped, its service thread stuck) is found by its
  heartbeat (the time of the service thread's last round, published every 0.5 s): after
  :data:`HEARTBEAT_TIMEOUT` without one it is killed, and restarted as a dead one would be
  (``signer_restart`` reason "it stopped answering ...").
- Meanwhile nothing hangs and nothing is minted elsewhere: a worker's request to the dead
  signer fails when its connection closes, re-sent requests fail when the worker cannot
  reconnect (or after the client's timeout), and the client of that connection gets a
  TLS alert (``close_reason`` ``signer-unavailable``). Leaves already in the shared cache
  (which a restart does not empty) keep being served.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tlsgate.errors import OperatorError
from tlsgate.supervisor.arbiter import (
    BOOT_WINDOW,
    MAX_BOOT_FAILURES,
    BootFailure,
    restart_backoff,
)
from tlsgate.supervisor.signer_process import STATS_FIELDS, SignerSpec, signer_main

#: Seconds a starting signer has to report ready (imports and key loading on a busy host).
BOOT_TIMEOUT: Final = 60.0
#: A serving signer whose service thread has not gone round for this long (seconds; it goes
#: round at least once a second) is killed and restarted like a dead one.
HEARTBEAT_TIMEOUT: Final = 10.0
#: Seconds a signer has to exit after SIGTERM before it is killed.
STOP_TIMEOUT: Final = 10.0
#: Counters summed over every incarnation (a restarted signer counts from zero).
_TOTALS: Final = STATS_FIELDS[1:-1]


@dataclass(frozen=True)
class SignerInfo:
    """What a running signer reported: about its CA, never the key."""

    pid: int
    cert_path: Path
    fingerprint_sha256: str
    chain_pem: bytes
    created: bool


@dataclass(frozen=True)
class SignerRestart:
    """A signer died and its successor serves: the fields of the ``signer_restart`` event."""

    reason: str
    old_pid: int
    exit_code: int | None
    signal: str | None
    pid: int
    restarts: int
    down_for: float

    def event(self) -> dict[str, Any]:
        return {
            "reason": self.reason, "restarts": self.restarts, "pid": self.pid,
            "old_pid": self.old_pid, "exit_code": self.exit_code, "signal": self.signal,
            "down_for": round(self.down_for, 3),
        }  # fmt: skip


class _Incarnation:
    """One signer process, from spawn to reaping."""

    def __init__(self, process: Any, report: Any, stats: Any, socket_path: Path) -> None:
        self.process = process
        self.report = report  # the parent's (read) end of the pipe
        self.stats = stats
        self.socket_path = socket_path
        self.spawned = time.monotonic()
        self.ready_at = 0.0
        self.info: SignerInfo | None = None
        self.error: str | None = None

    def silent_for(self, now: float) -> float:
        """Seconds since its last heartbeat (since it reported ready, before the first)."""
        return now - max(self.stats[0], self.ready_at)

    def poll_report(self) -> None:
        """Take the report if it came (non-blocking)."""
        if self.info is not None or self.error is not None or self.report.closed:
            return
        try:
            if not self.report.poll(0):
                return
            message = self.report.recv()
        except (EOFError, OSError):
            self.report.close()
            return  # died before reporting
        self.report.close()
        if message.get("ok"):
            self.info = SignerInfo(
                pid=int(message["pid"]),
                cert_path=Path(message["cert_path"]),
                fingerprint_sha256=str(message["fingerprint_sha256"]),
                chain_pem=bytes(message["chain_pem"]),
                created=bool(message["created"]),
            )
            self.ready_at = time.monotonic()
        else:
            self.error = str(message.get("error") or "unknown error")


class SignerKeeper:
    """Starts, watches, restarts and stops the signer process (see the module rules)."""

    def __init__(
        self,
        mp: Any,
        state_dir: Path,
        passphrase: bytes | None,
        run_dir: Path,
        leaf_public_pem: bytes,
        log: Callable[[str], None],
        *,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
    ) -> None:
        self._mp = mp
        self.heartbeat_timeout = heartbeat_timeout
        self._state_dir = state_dir
        self._passphrase = passphrase
        self._run_dir = run_dir
        self._leaf_public_pem = leaf_public_pem
        self._log = log
        self._generation = 0
        self._current: _Incarnation | None = None
        #: The CA the gateway serves (what a restarted signer must find).
        self.info: SignerInfo | None = None
        self.restarts = 0
        self.boot_failures = 0
        self._next_start = 0.0
        self._down_since: float | None = None
        self._death: tuple[str, int, int | None, str | None] | None = None
        self._totals = dict.fromkeys(_TOTALS, 0)

    # -- the current signer ------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        """Where the current signer listens (or the last one did)."""
        cur = self._current
        if cur is not None:
            return cur.socket_path
        return self._run_dir / f"signer-{self._generation}.sock"

    @property
    def pid(self) -> int | None:
        cur = self._current
        return cur.process.pid if cur is not None else None

    @property
    def serving(self) -> bool:
        cur = self._current
        return cur is not None and cur.info is not None and cur.process.is_alive()

    def stats(self) -> dict[str, int]:
        """Counters over every incarnation, plus the current one's connections."""
        out = dict(self._totals)
        cur = self._current
        live = _read_stats(cur) if cur is not None else {}
        for name in _TOTALS:
            out[name] += live.get(name, 0)
        out["connections"] = live.get("connections", 0)
        return out

    def status(self) -> dict[str, Any]:
        cur = self._current
        return {
            "pid": self.pid,
            "alive": self.serving,
            "restarts": self.restarts,
            "boot_failures": self.boot_failures,
            "uptime": round(time.monotonic() - cur.ready_at, 3) if self.serving and cur else 0.0,
            "heartbeat_age": round(cur.silent_for(time.monotonic()), 3)
            if self.serving and cur
            else None,
            **self.stats(),
        }

    # -- blocking: first start and reload ----------------------------------------------

    def start(self, *, create_ca: bool = False) -> SignerInfo:
        """The first signer, serving; OperatorError with its reason if it cannot start."""
        inc = self._spawn(create_ca=create_ca, expect=None)
        info = self._wait_ready(inc, "")  # the CA's own message, e.g. "run chmod 600 ..."
        self._current, self.info = inc, info
        return info

    def rotate(self) -> SignerInfo:
        """A new signer with the CA on disk in place of the current one (reload)."""
        old = self._current
        inc = self._spawn(create_ca=False, expect=None)
        info = self._wait_ready(inc, "the signer cannot start with the CA on disk: ")
        self._current, self.info = inc, info
        self._down_since, self._death, self.boot_failures = None, None, 0
        if old is not None:
            self._stop(old)
        return info

    def _wait_ready(self, inc: _Incarnation, prefix: str) -> SignerInfo:
        deadline = inc.spawned + BOOT_TIMEOUT
        while True:
            inc.poll_report()
            if inc.info is not None:
                return inc.info
            if inc.error is not None or not inc.process.is_alive():
                inc.process.join(5)
                self._forget(inc)
                if inc.error is not None:
                    raise OperatorError(f"{prefix}{inc.error}")
                code = inc.process.exitcode
                raise OperatorError(f"the signer exited with code {code} before serving")
            if time.monotonic() > deadline:
                self._stop(inc)
                raise OperatorError(f"the signer did not start within {BOOT_TIMEOUT:.0f} s")
            with contextlib.suppress(EOFError, OSError):
                inc.report.poll(0.05)

    # -- non-blocking: the supervisor's loop -------------------------------------------

    def tick(self) -> SignerRestart | None:
        """Reap, restart, and report a completed restart; BootFailure on a crash loop."""
        now = time.monotonic()
        cur = self._current
        if cur is not None:
            cur.poll_report()
            if cur.info is not None and cur.process.is_alive():
                silent = cur.silent_for(now)
                if silent <= self.heartbeat_timeout:
                    if self._death is not None:
                        return self._restarted(cur, now)
                    if now - cur.ready_at >= BOOT_WINDOW:
                        self.boot_failures = 0
                    return None
                # alive but not serving (stopped, or its service thread stuck): new names
                # would fail until someone restarted it by hand
                self._log(f"the signer (pid {cur.process.pid}) has not answered for "
                          f"{silent:.0f} s; killing it")  # fmt: skip
                cur.error = f"it stopped answering (no heartbeat for {silent:.0f} s)"
                if self._down_since is None:
                    self._down_since = now - silent  # it has not served since
                _kill(cur.process, self._log)
                cur.process.join(5)
            if cur.process.is_alive():
                if now - cur.spawned <= BOOT_TIMEOUT:
                    return None  # still starting
                self._log(f"the signer (pid {cur.process.pid}) did not start within "
                          f"{BOOT_TIMEOUT:.0f} s; killing it")  # fmt: skip
                cur.error = f"it did not start within {BOOT_TIMEOUT:.0f} s"
                _kill(cur.process, self._log)
                cur.process.join(5)
            self._reap(cur, now)
        if self._current is None and now >= self._next_start:
            self._current = self._spawn(create_ca=False, expect=self._expected())
        return None

    def _expected(self) -> str | None:
        return self.info.fingerprint_sha256 if self.info is not None else None

    def _reap(self, cur: _Incarnation, now: float) -> None:
        cur.process.join(0)
        code = cur.process.exitcode
        sig = signal.Signals(-code).name if code is not None and code < 0 else None
        how = f"was killed by {sig}" if sig else f"exited with code {code}"
        reason = f"{how}: {cur.error}" if cur.error else how
        failed = cur.info is None or now - cur.ready_at < BOOT_WINDOW
        self.boot_failures = self.boot_failures + 1 if failed else 0
        self._forget(cur)
        if self._death is None or not failed:
            self._death = (reason, cur.process.pid, code, sig)
        if self._down_since is None:
            self._down_since = now
        if self.boot_failures >= MAX_BOOT_FAILURES:
            raise BootFailure(
                f"the signer failed to start {self.boot_failures} times in a row (last: it "
                f"{reason}); fix the cause and restart the gateway"
            )
        backoff = restart_backoff(self.boot_failures)
        self._next_start = now + backoff
        self._log(f"the signer (pid {cur.process.pid}) {reason}; restarting it"
                  f"{f' in {backoff:.1f} s' if backoff else ''}")  # fmt: skip

    def _restarted(self, cur: _Incarnation, now: float) -> SignerRestart:
        assert self._death is not None and cur.info is not None
        reason, old_pid, code, sig = self._death
        down_since = self._down_since if self._down_since is not None else now
        self._death, self._down_since = None, None
        self.restarts += 1
        return SignerRestart(reason=reason, old_pid=old_pid, exit_code=code, signal=sig,
                             pid=cur.info.pid, restarts=self.restarts,
                             down_for=now - down_since)  # fmt: skip

    # -- processes ---------------------------------------------------------------------

    def _spawn(self, *, create_ca: bool, expect: str | None) -> _Incarnation:
        self._generation += 1
        path = self._run_dir / f"signer-{self._generation}.sock"
        theirs_r, theirs_w = self._mp.Pipe(duplex=False)
        stats = self._mp.Array("d", len(STATS_FIELDS), lock=False)
        spec = SignerSpec(
            state_dir=self._state_dir, passphrase=self._passphrase, create_ca=create_ca,
            expect_fingerprint=expect, socket_path=path,
            cache_path=self._run_dir / "certcache", leaf_public_pem=self._leaf_public_pem,
            report=theirs_w, stats=stats,
        )  # fmt: skip
        proc = self._mp.Process(target=signer_main, args=(spec,), name="tlsgate-signer")
        proc.start()
        theirs_w.close()
        return _Incarnation(proc, theirs_r, stats, path)

    def _forget(self, inc: _Incarnation) -> None:
        """A dead incarnation: its counters kept, its pipe and stale socket file removed."""
        live = _read_stats(inc)
        for name in _TOTALS:
            self._totals[name] += live.get(name, 0)
        inc.stats = None
        if not inc.report.closed:
            inc.report.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(inc.socket_path)
        if self._current is inc:
            self._current = None

    def _stop(self, inc: _Incarnation) -> None:
        proc = inc.process
        if proc.is_alive():
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except OSError as exc:
                self._log(f"cannot stop the signer (pid {proc.pid}): {exc.strerror or exc}")
            proc.join(STOP_TIMEOUT)
            if proc.is_alive():
                self._log(f"the signer (pid {proc.pid}) did not stop within "
                          f"{STOP_TIMEOUT:.0f} s; killing it")  # fmt: skip
                _kill(proc, self._log)
                proc.join(5)
        self._forget(inc)

    def stop(self) -> None:
        """Stop the signer for good (gateway exit); idempotent."""
        cur = self._current
        if cur is not None:
            self._stop(cur)


def _read_stats(inc: _Incarnation) -> dict[str, int]:
    if inc.stats is None:
        return {}
    return {name: int(inc.stats[i]) for i, name in enumerate(STATS_FIELDS) if i}


def _kill(proc: Any, log: Callable[[str], None]) -> None:
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except OSError as exc:
        log(f"cannot kill the signer (pid {proc.pid}): {exc.strerror or exc}")
