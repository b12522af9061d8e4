"""The no-resumption shim, checked where it matters: at a real nginx that logs
``$ssl_session_reused`` for every request wrk sends on a fresh connection."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tlsgate.loadtest import generators, origin
from tlsgate.loadtest.shim import build_shim, shim_env

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nginx", "wrk", "h2load", "cc")),
    reason="needs nginx, wrk, h2load and a C compiler (scripts/setup.sh test installs them)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    d = tmp_path_factory.mktemp("site")
    origin.make_pki(d)
    port = _free_port()
    conf = origin.write_site(d, [("127.0.0.1", port)], log_reuse=True)
    proc = subprocess.Popen(
        origin.nginx_argv(conf), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "nginx did not start"
                time.sleep(0.05)
        yield d, port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shim(tmp_path_factory.mktemp("shim"))


def _wrk_new_connections(
    d: Path, port: int, env: dict[str, str]
) -> tuple[generators.Measured, dict[str, int]]:
    log = d / "access.log"
    log.write_text("")
    subprocess.run(["kill", "-USR1", (d / "nginx.pid").read_text().strip()], check=True)
    argv = generators.wrk_argv(
        f"https://localhost:{port}/",
        connections=2,
        seconds=1,
        script=generators.lua_script(d),
        close=True,
    )
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env={**os.environ, **env}, check=True
    )
    time.sleep(0.2)  # nginx writes its log line after the response
    return generators.parse_wrk(done.stdout), origin.reuse_counts(log)


def test_wrk_resumes_sessions_by_default_which_is_why_the_shim_exists(
    site: tuple[Path, int],
) -> None:
    measured, counts = _wrk_new_connections(*site, {})
    assert measured.requests > 20 and measured.errors == 0
    assert counts["resumed"] > counts["full"]


def test_with_the_shim_every_wrk_connection_is_a_full_handshake(
    site: tuple[Path, int], shim: Path
) -> None:
    measured, counts = _wrk_new_connections(*site, shim_env(shim, resume=False))
    assert measured.requests > 20 and measured.errors == 0
    assert counts["resumed"] == 0
    assert counts["full"] >= measured.requests


def test_with_the_shim_in_resume_mode_wrk_resumes_as_it_does_alone(
    site: tuple[Path, int], shim: Path
) -> None:
    _, counts = _wrk_new_connections(*site, shim_env(shim, resume=True))
    assert counts["resumed"] > counts["full"]


def test_the_shim_rotates_the_sni_over_distinct_names(site: tuple[Path, int], shim: Path) -> None:
    d, port = site
    _wrk_new_connections(d, port, shim_env(shim, resume=False, names=7))
    names = {line.split()[1] for line in (d / "access.log").read_text().splitlines()}
    assert names == {f"n{i}.localhost" for i in range(7)}


def test_h2load_sessions_are_full_handshakes_under_the_shim(
    site: tuple[Path, int], shim: Path
) -> None:
    d, port = site
    (d / "access.log").write_text("")
    subprocess.run(["kill", "-USR1", (d / "nginx.pid").read_text().strip()], check=True)
    log = d / "h2.log"
    done = subprocess.run(
        ["h2load", "-n", "40", "-c", "4", "--log-file", str(log), f"https://localhost:{port}/"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, **shim_env(shim, resume=False)},
    )
    time.sleep(0.2)
    measured = generators.parse_h2load(done.stdout, log.read_text())
    assert measured.requests == 40 and measured.errors == 0
    assert origin.reuse_counts(d / "access.log") == {"full": 40, "resumed": 0}
