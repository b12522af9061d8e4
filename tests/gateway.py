"""Run the real `tlsgate run` and real origin servers for end-to-end tests.

``Gateway`` starts ``python -m tlsgate run`` as a subprocess (optionally inside a network
namespace), waits for its banner, and reads back the events it appended to its events file.
``Origin`` starts ``tests/https_server.py`` with a certificate chain from a trustme CA.
Both stop their process by PID on exit.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import msgpack

LISTEN_RE = re.compile(r"listening on \[?([0-9a-fA-F.:]+?)\]?:(\d+) ")
STARTUP_TIMEOUT = 20.0
#: Lines of the gateway's stderr kept for ``stderr_tail`` (the oldest are dropped).
STDERR_LINES_KEPT = 20000


def _wait_line(
    proc: subprocess.Popen[bytes], stream: Any, pattern: re.Pattern[str]
) -> re.Match[str]:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    seen: list[str] = []
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        text = line.decode(errors="replace")
        seen.append(text)
        m = pattern.search(text)
        if m:
            return m
    proc.kill()
    proc.wait(timeout=10)
    rest = stream.read().decode(errors="replace")
    stream.close()
    raise RuntimeError(f"process did not become ready; output: {''.join(seen)}{rest}")


class Gateway:
    """A running gateway; ``port`` is where it listens, ``events()`` what it reported."""

    def __init__(
        self,
        state_dir: Path,
        *,
        upstream_ca: Path | None,
        args: Sequence[str] = (),
        listen: str = "127.0.0.1:0",
        netns: str | None = None,
        env: dict[str, str] | None = None,
        loopback_origins: bool = True,
    ) -> None:
        self.state_dir = state_dir
        self.extra_env = env or {}
        self.events_file = state_dir / "events.msgpack"
        argv = [sys.executable, "-m", "tlsgate", "run", "--state-dir", str(state_dir),
                "--listen", listen, "--events-file", str(self.events_file), *args]  # fmt: skip
        if upstream_ca is not None:
            argv += ["--upstream-ca-bundle", str(upstream_ca)]
        if loopback_origins:
            # test origins listen on loopback, which a CONNECT may not reach by default
            argv += ["--allow-destination", "127.0.0.0/8", "--allow-destination", "::1/128"]
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None
        #: descriptors the gateway inherits (e.g. --ca-passphrase-fd)
        self.pass_fds: tuple[int, ...] = ()
        self.host = ""
        self.port = 0
        self.stderr_tail = ""
        self._stderr_lines: deque[str] = deque(maxlen=STDERR_LINES_KEPT)
        self._stderr_reader: threading.Thread | None = None

    @property
    def ca_cert(self) -> Path:
        return self.state_dir / "ca" / "cert.pem"

    @property
    def proxy(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> Gateway:
        # deprecations in the gateway's own code paths fail the test that reaches them
        env = {**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning", **self.extra_env}
        self.proc = subprocess.Popen(
            self.argv,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env=env,
            pass_fds=self.pass_fds,
        )
        m = _wait_line(self.proc, self.proc.stderr, LISTEN_RE)
        self.host, self.port = m.group(1), int(m.group(2))
        # Keep reading: a full stderr pipe would block the gateway's next log line (and with
        # it the supervisor or a worker) — a hang of the test's making, not the gateway's.
        self._stderr_reader = threading.Thread(
            target=self._read_stderr, args=(self.proc.stderr,), daemon=True
        )
        self._stderr_reader.start()
        return self

    def _read_stderr(self, stream: Any) -> None:
        for line in iter(stream.readline, b""):
            self._stderr_lines.append(line.decode(errors="replace"))

    @property
    def stderr_so_far(self) -> str:
        """What the gateway wrote to stderr after its banner (the last lines, bounded)."""
        return "".join(self._stderr_lines)

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> int:
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._stderr_reader is not None:
            self._stderr_reader.join(timeout=10)
        self.stderr_tail = self.stderr_so_far
        if proc.stderr is not None:
            proc.stderr.close()
        return proc.returncode

    def events(self, type_: str | None = None) -> list[dict[str, Any]]:
        """Events written so far (the hub flushes its file every few milliseconds)."""
        if not self.events_file.exists():
            return []
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(self.events_file.read_bytes())
        events = list(unpacker)
        return [e for e in events if type_ is None or e.get("type") == type_]

    def wait_match(
        self, type_: str, match: Any, count: int = 1, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Events of ``type_`` for which ``match(event)`` is true, once ``count`` are there
        (events of several workers reach the file in no particular order)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events(type_) if match(e)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def wait_events(
        self, type_: str, count: int = 1, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(type_)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


class Origin:
    """A real HTTPS server (tests/https_server.py) on 127.0.0.1:0 or in a namespace."""

    def __init__(
        self, cert: Path, key: Path, *, host: str = "127.0.0.1", port: int = 0,
        alpn: str = "", netns: str | None = None,
    ) -> None:  # fmt: skip
        argv = [sys.executable, "-m", "tests.https_server", "--cert", str(cert), "--key",
                str(key), "--host", host, "--port", str(port)]  # fmt: skip
        if alpn:
            argv += ["--alpn", alpn]
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None
        self.host = host
        self.port = port

    def __enter__(self) -> Origin:
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, cwd=root)
        m = _wait_line(self.proc, self.proc.stdout, re.compile(r"listening (\S+) (\d+)"))
        self.port = int(m.group(2))
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
