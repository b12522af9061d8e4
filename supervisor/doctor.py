"""``tlsgate doctor``: is this gateway host fit to run tlsgate safely?

Each check is a :class:`Check` with a status: ``ok``, ``warn`` (works, but look at it) or
``fail`` (unsafe: the command exits 1). The judging functions are pure (versions, dates and
file modes in, a Check out); :func:`run_doctor` gathers the facts from this host.

What is checked:
- OpenSSL as pyOpenSSL really links it (``OpenSSL.SSL.OpenSSL_version``) — the library that
  does every handshake — against the OpenSSL project's support dates: older than 3.0 or past
  its end of life is ``fail``; within :data:`EOL_WARNING` of it, or unknown, ``warn``. The
  OpenSSL of cryptography (the same library, normally) and of Python's ``ssl`` module (not
  used on the traffic path: ``warn`` at most) are reported too.
- pyOpenSSL and cryptography below the versions tlsgate needs: ``fail``.
- The kernel (``warn`` below 5.14: no migration of queued connections) and bcc; whether the
  eBPF steering program can be loaded here (``warn`` if not: the kernel hash takes over).
- The CA: key mode 0600 (no group/other bits) and owned by this user or root, CA directory
  and state directory 0700, runtime directory not open to other, control socket 0600;
  the CA certificate's expiry (``warn`` within :data:`CA_EXPIRY_WARNING`, ``fail`` once
  expired or not yet valid).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import stat
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from tlsgate.paths import (
    ca_cert_path,
    ca_key_path,
    control_socket_path,
    resolve_state_dir,
    runtime_dir,
)

OK: Final = "ok"
WARN: Final = "warn"
FAIL: Final = "fail"

#: End of support of OpenSSL release lines (openssl.org/policies/releasestrat.html);
#: 4.0: 13 months after its April 2026 release, as for every non-LTS line.
OPENSSL_EOL: Final[dict[tuple[int, int], date]] = {
    (1, 1): date(2023, 9, 11),
    (3, 0): date(2026, 9, 7),
    (3, 1): date(2025, 3, 14),
    (3, 2): date(2025, 11, 23),
    (3, 3): date(2026, 4, 9),
    (3, 4): date(2026, 10, 22),
    (3, 5): date(2030, 4, 8),
    (3, 6): date(2026, 11, 1),
    (4, 0): date(2027, 5, 14),
}
EOL_WARNING: Final = timedelta(days=90)
CA_EXPIRY_WARNING: Final = timedelta(days=90)
#: What tlsgate needs (pyproject.toml): older releases lack APIs or fixes it relies on.
MIN_PYOPENSSL: Final = (26, 0)
MIN_CRYPTOGRAPHY: Final = (46, 0)
#: Below this kernel, a closed listener's queued connections cannot migrate (5.14).
MIN_KERNEL: Final = (5, 14)

_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class Check:
    """One finding: ``name`` of the thing checked, ``status`` (ok/warn/fail), ``detail``."""

    name: str
    status: str
    detail: str


def parse_version(text: str) -> tuple[int, ...]:
    """The first ``X.Y[.Z]`` in ``text`` as integers; () if none."""
    m = _VERSION.search(text)
    if m is None:
        return ()
    return tuple(int(g) for g in m.groups() if g is not None)


def judge_openssl(name: str, version_text: str, today: date, on_traffic_path: bool) -> Check:
    """An OpenSSL build against its release line's end of life."""
    version = parse_version(version_text)
    worst = FAIL if on_traffic_path else WARN
    if not version:
        return Check(name, WARN, f"{version_text!r}: cannot tell which OpenSSL this is")
    line = (version[0], version[1] if len(version) > 1 else 0)
    if line < (3, 0):
        return Check(
            name,
            worst,
            f"{version_text} is older than OpenSSL 3.0 and unsupported; "
            "upgrade the cryptography wheel (pip install -U cryptography pyOpenSSL)",
        )
    eol = OPENSSL_EOL.get(line)
    if eol is None:
        return Check(
            name,
            WARN,
            f"{version_text}: end of support of {line[0]}.{line[1]} unknown "
            "to this tlsgate; check openssl.org/policies/releasestrat.html",
        )
    if today > eol:
        return Check(
            name,
            worst,
            f"{version_text}: OpenSSL {line[0]}.{line[1]} reached end of "
            f"life on {eol} (no more security fixes); upgrade it",
        )
    if eol - today <= EOL_WARNING:
        return Check(
            name,
            WARN,
            f"{version_text}: OpenSSL {line[0]}.{line[1]} reaches end of "
            f"life on {eol}; plan the upgrade",
        )
    return Check(name, OK, f"{version_text} (supported until {eol})")


def judge_minimum(name: str, version_text: str, minimum: tuple[int, ...]) -> Check:
    version = parse_version(version_text)
    need = ".".join(map(str, minimum))
    if version[: len(minimum)] < minimum:
        return Check(
            name,
            FAIL,
            f"{version_text} is older than {need}, which tlsgate needs; "
            f"pip install -U '{name}>={need}'",
        )
    return Check(name, OK, version_text)


def judge_kernel(release: str) -> Check:
    version = parse_version(release)
    if version[:2] < MIN_KERNEL:
        return Check(
            "kernel",
            WARN,
            f"{release}: below 5.14, connections queued on a replaced "
            "worker's socket cannot migrate (they are reset on reload)",
        )
    return Check("kernel", OK, release)


def judge_mode(
    name: str, path: Path, st: os.stat_result | None, forbidden: int, want: str, euid: int
) -> Check:
    """A file or directory whose mode must have none of ``forbidden`` bits, owned by this
    user or root."""
    if st is None:
        return Check(name, WARN, f"{path} does not exist (yet)")
    mode = stat.S_IMODE(st.st_mode)
    if mode & forbidden:
        return Check(name, FAIL, f"{path} has mode {mode:04o}; run chmod {want} {path}")
    if st.st_uid not in (euid, 0):
        return Check(
            name,
            FAIL,
            f"{path} is owned by uid {st.st_uid}, not by this user or root; run chown root: {path}",
        )
    return Check(name, OK, f"{path} mode {mode:04o}, uid {st.st_uid}")


def judge_ca_expiry(not_before: datetime, not_after: datetime, now: datetime) -> Check:
    if now < not_before:
        return Check(
            "ca expiry",
            FAIL,
            f"the CA certificate is not valid before {not_before:%Y-%m-%d %H:%M} "
            "UTC: check the clock, or replace the CA (tlsgate ca init --force)",
        )
    if now >= not_after:
        return Check(
            "ca expiry",
            FAIL,
            f"the CA certificate expired on {not_after:%Y-%m-%d}: "
            "clients refuse every minted certificate; replace it (tlsgate ca init "
            "--force), then tlsgate reload",
        )
    left = not_after - now
    if left <= CA_EXPIRY_WARNING:
        return Check(
            "ca expiry",
            WARN,
            f"the CA certificate expires on {not_after:%Y-%m-%d} "
            f"({left.days} days); rotate it now (see docs/security.md)",
        )
    return Check("ca expiry", OK, f"valid until {not_after:%Y-%m-%d} ({left.days} days)")


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _versions() -> tuple[dict[str, str], list[Check]]:
    import cryptography
    import OpenSSL
    from cryptography.hazmat.backends.openssl import backend
    from OpenSSL import SSL

    today = datetime.now(UTC).date()
    pyopenssl_ssl = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode("ascii", "replace")
    crypto_ssl = backend.openssl_version_text()
    import ssl

    versions = {
        "openssl (pyOpenSSL)": pyopenssl_ssl,
        "openssl (cryptography)": crypto_ssl,
        "openssl (python ssl module)": ssl.OPENSSL_VERSION,
        "pyOpenSSL": OpenSSL.__version__,
        "cryptography": cryptography.__version__,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    checks = [
        judge_openssl("openssl (pyOpenSSL)", pyopenssl_ssl, today, on_traffic_path=True),
        judge_openssl("openssl (cryptography)", crypto_ssl, today, on_traffic_path=True),
        judge_openssl(
            "openssl (python ssl module, not on the traffic path)",
            ssl.OPENSSL_VERSION,
            today,
            on_traffic_path=False,
        ),
        judge_minimum("pyOpenSSL", OpenSSL.__version__, MIN_PYOPENSSL),
        judge_minimum("cryptography", cryptography.__version__, MIN_CRYPTOGRAPHY),
        judge_kernel(platform.release()),
    ]
    return versions, checks


def _ebpf(load: bool) -> tuple[str, Check]:
    import importlib.util

    bcc_version = "not installed"
    if importlib.util.find_spec("bcc") is not None:
        try:
            import bcc  # type: ignore[import-not-found,import-untyped,unused-ignore]

            bcc_version = str(getattr(bcc, "__version__", "unknown"))
        except Exception as exc:  # a broken bcc install: report it, the doctor goes on
            bcc_version = f"broken ({exc})"
    from tlsgate.bpf import steering
    from tlsgate.errors import OperatorError

    ok, reason = steering.availability()
    if ok and load:
        try:
            steering.Steering.load(1).close()
        except OperatorError as exc:
            ok, reason = False, str(exc)
    if not ok:
        return bcc_version, Check(
            "ebpf steering",
            WARN,
            f"unavailable ({reason}); the kernel's reuseport hash steers instead",
        )
    what = "the steering program loads" if load else "available (not loaded: --no-load)"
    return bcc_version, Check("ebpf steering", OK, what)


def _files(state_dir: Path) -> list[Check]:
    euid = os.geteuid()
    checks = [
        judge_mode("state dir", state_dir, _stat(state_dir), 0o077, "700", euid),
        judge_mode(
            "ca dir",
            ca_cert_path(state_dir).parent,
            _stat(ca_cert_path(state_dir).parent),
            0o077,
            "700",
            euid,
        ),
        judge_mode(
            "ca key", ca_key_path(state_dir), _stat(ca_key_path(state_dir)), 0o077, "600", euid
        ),
    ]
    run = runtime_dir(state_dir)
    if _stat(run) is not None:
        checks.append(judge_mode("runtime dir", run, _stat(run), 0o027, "750", euid))
        control = control_socket_path(state_dir)
        if _stat(control) is not None:
            checks.append(judge_mode("control socket", control, _stat(control), 0o077, "600", euid))
    if _stat(ca_cert_path(state_dir)) is not None:
        from tlsgate.errors import CAError
        from tlsgate.supervisor.ca import read_ca_certificates

        try:
            cert = read_ca_certificates(state_dir)[0]
        except CAError as exc:
            checks.append(Check("ca expiry", FAIL, str(exc)))
        else:
            checks.append(
                judge_ca_expiry(
                    cert.not_valid_before_utc, cert.not_valid_after_utc, datetime.now(UTC)
                )
            )
    else:
        checks.append(
            Check(
                "ca expiry",
                WARN,
                f"no CA in {ca_cert_path(state_dir).parent} yet (tlsgate run creates one)",
            )
        )
    return checks


@dataclass(frozen=True)
class Report:
    versions: dict[str, str]
    checks: list[Check]

    @property
    def unsafe(self) -> bool:
        return any(c.status == FAIL for c in self.checks)

    def as_json(self) -> dict[str, object]:
        return {
            "ok": not self.unsafe,
            "versions": self.versions,
            "checks": [asdict(c) for c in self.checks],
        }

    def as_text(self) -> str:
        lines = [f"{name:<28} {value}" for name, value in self.versions.items()]
        lines.append("")
        lines += [f"[{c.status.upper():>4}] {c.name}: {c.detail}" for c in self.checks]
        failed = sum(c.status == FAIL for c in self.checks)
        warned = sum(c.status == WARN for c in self.checks)
        lines.append("")
        lines.append(f"{'UNSAFE' if failed else 'ok'}: {failed} failed, {warned} warnings")
        return "\n".join(lines) + "\n"


def run_doctor(state_dir: Path, load_ebpf: bool = True) -> Report:
    versions, checks = _versions()
    bcc_version, ebpf = _ebpf(load_ebpf)
    versions["bcc"] = bcc_version
    checks.append(ebpf)
    checks += _files(state_dir)
    return Report(versions, checks)


def _cmd_doctor(args: argparse.Namespace) -> int:
    report = run_doctor(resolve_state_dir(args.state_dir), load_ebpf=not args.no_load)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        sys.stdout.write(report.as_text())
    return 1 if report.unsafe else 0


def add_doctor_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="check crypto library versions, eBPF readiness, CA permissions and expiry; "
        "exits 1 if something is unsafe",
    )
    p.add_argument("--state-dir", metavar="DIR", help="state dir the gateway uses")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-load", action="store_true", help="do not load the eBPF program to test it")
    p.set_defaults(func=_cmd_doctor)
