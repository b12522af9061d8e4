"""Build the client-side OpenSSL shim (``noresume.c``) with the system C compiler.

:func:`build_shim` compiles it once into ``directory`` and returns the path of the shared
object; :func:`shim_env` gives the environment a load generator runs with. The shim is
documented in its source: it defeats session resumption (every connection a full handshake)
unless ``resume`` is set, and can rotate the SNI over ``names`` distinct names.
"""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources
from pathlib import Path


class ShimError(RuntimeError):
    """The shim cannot be built (no C compiler, or it failed)."""


def build_shim(directory: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise ShimError(
            "no C compiler to build the no-resumption shim: apt-get install gcc "
            "(wrk and h2load resume TLS sessions unless the shim stops them)"
        )
    source = resources.files("tlsgate.loadtest").joinpath("noresume.c").read_bytes()
    src = directory / "noresume.c"
    out = directory / "noresume.so"
    src.write_bytes(source)
    done = subprocess.run(
        [cc, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(out), str(src), "-ldl"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise ShimError(f"building {src} with {cc} failed: {done.stderr.strip()}")
    return out


def shim_env(shim: Path, *, resume: bool, names: int = 0) -> dict[str, str]:
    """Variables that load ``shim`` into a load generator."""
    env = {"LD_PRELOAD": str(shim), "TLSGATE_RESUME": "1" if resume else "0"}
    if names:
        env["TLSGATE_SNI_NAMES"] = str(names)
    return env
