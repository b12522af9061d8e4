"""The events CA: certificates for management over TCP (remote subscribers, metrics scrapers).

Rules:

- A CA of its own, never the interception CA: ``<state-dir>/events-ca/`` (0700) holds
  ``cert.pem`` (0644) and ``key.pem`` (0600, PKCS#8, not encrypted: the gateway issues its
  own server certificate with it on start). Refusing to create or use it when its key is
  the interception CA's key (or its certificate is the interception CA's) is part of every
  load, not a convention.
- It issues three kinds of leaf, each ECDSA P-256, SHA-256, with a random serial,
  basicConstraints CA:FALSE, keyUsage digitalSignature, SKI and AKI:
  *subscriber* (``OU=events-subscriber``, EKU clientAuth) for an IDS host reading the
  detection stream; *scraper* (``OU=metrics-scraper``, EKU clientAuth) for a Prometheus
  host; *server* (``OU=gateway``, EKU serverAuth, SANs) for the gateway's own listeners.
  The role (OU) is checked by the gateway on every handshake, so a scraper certificate
  cannot read the detection stream and a subscriber certificate cannot scrape.
- Every certificate issued is also kept in ``issued/<serial>.pem`` (public) for
  ``tlsgate events-ca list`` and for revocation by name.
- Revocation is a deny list of serials, ``revoked`` (one lower-case hex serial per line,
  ``# name`` after it), read on start and on reload; the gateway refuses those
  certificates during the handshake and disconnects connected subscribers holding one.
- The gateway's server certificate lives in ``server-cert.pem``/``server-key.pem``
  (0600). :func:`ensure_server_certificate` issues it when it is missing, expires within
  :data:`SERVER_RENEW_BEFORE`, or does not cover the listen address (the old SANs are kept).
- Loading checks (:func:`load_events_ca`): files present and regular, directory 0700,
  key 0600 or stricter and matching the certificate, the certificate a valid CA, and not
  the interception CA. Every refusal is a :class:`~tlsgate.errors.CAError` that says what
  to do.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shlex
import stat
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tlsgate.errors import CAError
from tlsgate.paths import ca_cert_path, events_ca_dir
from tlsgate.supervisor.ca import (
    CERT_MODE,
    DIR_MODE,
    GROUP_OTHER_BITS,
    KEY_MODE,
    CAPrivateKey,
    _check_is_ca,
    _check_private_dir,
    _parse_bundle,
    _parse_key,
    _read_bounded,
    _write_files_atomically,
    create_ca,
    make_private_dir,
    sha256_fingerprint,
)
from tlsgate.supervisor.signer import _LEAF_BASIC_CONSTRAINTS, _LEAF_KEY_USAGE

#: The roles a client certificate of the events CA carries (its subject OU).
ROLE_SUBSCRIBER: Final = "events-subscriber"
ROLE_SCRAPER: Final = "metrics-scraper"
ROLE_SERVER: Final = "gateway"
CLIENT_ROLES: Final = (ROLE_SUBSCRIBER, ROLE_SCRAPER)

EVENTS_CA_COMMON_NAME: Final = "tlsgate events CA"
DEFAULT_CA_DAYS: Final = 3650
DEFAULT_LEAF_DAYS: Final = 397
MAX_LEAF_DAYS: Final = 825
#: The server certificate is re-issued on start when it expires within this.
SERVER_RENEW_BEFORE: Final = timedelta(days=30)
#: Leaves start this far in the past, for peers whose clock is behind.
LEAF_BACKDATE: Final = timedelta(minutes=5)
#: Subscriber names: what an operator types, and what appears in logs and metrics labels.
NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Bound on the deny list (a line per revoked certificate).
MAX_REVOKED_BYTES: Final = 1024 * 1024

_SHA256: Final = hashes.SHA256()


@dataclass(frozen=True, slots=True)
class EventsCA:
    """The events CA as loaded: its certificate, and its key when it was asked for."""

    directory: Path
    cert: x509.Certificate
    key: CAPrivateKey | None

    @property
    def cert_path(self) -> Path:
        return self.directory / "cert.pem"


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """One line of ``tlsgate events-ca list``."""

    serial: int
    name: str
    role: str
    not_after: datetime
    revoked: bool


# -- paths ------------------------------------------------------------------------------


def _files(directory: Path) -> dict[str, Path]:
    return {
        "cert": directory / "cert.pem",
        "key": directory / "key.pem",
        "server_cert": directory / "server-cert.pem",
        "server_key": directory / "server-key.pem",
        "issued": directory / "issued",
        "revoked": directory / "revoked",
    }


def server_certificate_paths(state_dir: Path) -> tuple[Path, Path]:
    """Where the gateway's server certificate and key for its TCP listeners live."""
    files = _files(events_ca_dir(state_dir))
    return files["server_cert"], files["server_key"]


def _q(path: Path) -> str:
    return shlex.quote(str(path))


# -- creating ---------------------------------------------------------------------------


def init_events_ca(
    state_dir: Path, *, days: int = DEFAULT_CA_DAYS, force: bool = False
) -> EventsCA:
    """Create the events CA under ``state_dir``; CAError if one exists (and not ``force``)."""
    directory = events_ca_dir(state_dir)
    for path, label in ((state_dir, "state directory"), (directory, "events CA directory")):
        make_private_dir(path, label)
    files = _files(directory)
    if not force and (files["cert"].exists() or files["key"].exists()):
        raise CAError(
            f"an events CA already exists in {directory}; pass --force to replace it (every"
            " subscriber certificate it issued stops working)"
        )
    cert, key = create_ca("ecdsa-p256", days, f"{EVENTS_CA_COMMON_NAME} {os.urandom(4).hex()}")
    _refuse_interception_ca(state_dir, cert, f"the new events CA in {directory}")
    _write_pair(files["cert"], cert, files["key"], key)
    for stale in (files["server_cert"], files["server_key"], files["revoked"]):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    return load_events_ca(state_dir, need_key=True)


def _write_pair(cert_path: Path, cert: x509.Certificate, key_path: Path, key: CAPrivateKey) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    try:
        _write_files_atomically(((key_path, key_pem, KEY_MODE), (cert_path, cert_pem, CERT_MODE)))
    except OSError as exc:
        raise CAError(
            f"cannot write {cert_path} and {key_path}: {exc.strerror or exc}; free space or"
            " fix the permissions there, then run the command again"
        ) from exc


def check_name(name: str) -> str:
    """``name`` if it is a usable certificate name, else ValueError saying what is."""
    if not NAME_RE.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a usable name: use 1 to 64 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit (e.g. ids-1.example.net)"
        )
    return name


def issue_client(
    state_dir: Path, name: str, role: str = ROLE_SUBSCRIBER, *, days: int = DEFAULT_LEAF_DAYS
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A client certificate for ``name`` in ``role``: ``(cert, key, ca_cert)``, recorded."""
    if role not in CLIENT_ROLES:
        raise ValueError(f"role must be one of {', '.join(CLIENT_ROLES)}, not {role!r}")
    check_name(name)
    ca = load_events_ca(state_dir, need_key=True)
    cert, key = _issue(ca, name, role, days, sans=())
    _record(ca, cert)
    return cert, key, ca.cert


def issue_server(
    state_dir: Path, sans: tuple[str, ...], *, days: int = DEFAULT_LEAF_DAYS
) -> x509.Certificate:
    """Issue (replace) the gateway's server certificate for ``sans`` (IPs or DNS names)."""
    if not sans:
        raise ValueError("a server certificate needs at least one IP address or DNS name")
    ca = load_events_ca(state_dir, need_key=True)
    cert, key = _issue(ca, "tlsgate gateway", ROLE_SERVER, days, sans=sans)
    cert_path, key_path = server_certificate_paths(state_dir)
    _write_pair(cert_path, cert, key_path, key)
    os.chmod(cert_path, KEY_MODE)  # the pair is the gateway's identity: root only
    _record(ca, cert)
    return cert


def ensure_server_certificate(state_dir: Path, host: str) -> tuple[Path, Path, bool]:
    """The server certificate for a listener on ``host``: ``(cert, key, issued_now)``.

    Issued when missing, when it expires within :data:`SERVER_RENEW_BEFORE`, or when it
    does not name ``host`` (an unspecified address such as ``0.0.0.0`` needs only the
    host name); the SANs of a replaced certificate are kept.
    """
    cert_path, key_path = server_certificate_paths(state_dir)
    wanted = _listen_sans(host)
    existing: tuple[str, ...] = ()
    if cert_path.exists() and key_path.exists():
        _, st = _read_bounded(key_path, "events server key")
        _check_key_mode(key_path, st)
        cert = _parse_bundle(
            _read_bounded(cert_path, "events server certificate")[0],
            f"events server certificate {cert_path}",
            f"remove it and restart: the gateway issues a new one ({_q(cert_path)})",
        )[0]
        existing = _sans(cert)
        fresh = cert.not_valid_after_utc - datetime.now(UTC) > SERVER_RENEW_BEFORE
        if fresh and set(wanted) <= set(existing):
            ca = load_events_ca(state_dir, need_key=False)
            if cert.issuer == ca.cert.subject:
                return cert_path, key_path, False
    sans = tuple(dict.fromkeys((*existing, *wanted)))
    issue_server(state_dir, sans)
    return cert_path, key_path, True


def _listen_sans(host: str) -> tuple[str, ...]:
    address = ipaddress.ip_address(host)
    names = [os.uname().nodename]
    if not address.is_unspecified:
        names.insert(0, str(address))
    return tuple(names)


def _issue(
    ca: EventsCA, name: str, role: str, days: int, sans: tuple[str, ...]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not 1 <= days <= MAX_LEAF_DAYS:
        raise ValueError(f"validity must be 1 to {MAX_LEAF_DAYS} days, not {days}")
    assert ca.key is not None
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC).replace(microsecond=0) - LEAF_BACKDATE
    not_after = min(now + timedelta(days=days), ca.cert.not_valid_after_utc)
    usage = (
        ExtendedKeyUsageOID.SERVER_AUTH if role == ROLE_SERVER else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tlsgate"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(not_after)
        .add_extension(_LEAF_BASIC_CONSTRAINTS.value, _LEAF_BASIC_CONSTRAINTS.critical)
        .add_extension(_LEAF_KEY_USAGE.value, _LEAF_KEY_USAGE.critical)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(san) for san in sans]), critical=False
        )
    return builder.sign(ca.key, _SHA256), key


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def _sans(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return (*ips, *san.get_values_for_type(x509.DNSName))


def _record(ca: EventsCA, cert: x509.Certificate) -> None:
    issued = _files(ca.directory)["issued"]
    issued.mkdir(mode=DIR_MODE, exist_ok=True)
    path = issued / f"{cert.serial_number:x}.pem"
    try:
        _write_files_atomically(((path, cert.public_bytes(serialization.Encoding.PEM), CERT_MODE),))
    except OSError as exc:
        raise CAError(f"cannot record the issued certificate in {issued}: {exc.strerror}") from exc


def write_client_bundle(
    out: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
    *, force: bool = False,
) -> tuple[Path, Path, Path]:  # fmt: skip
    """Write ``cert.pem``, ``key.pem`` (0600) and ``ca.pem`` into ``out`` (created 0700)."""
    out.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    paths = (out / "cert.pem", out / "key.pem", out / "ca.pem")
    taken = [p.name for p in paths if p.exists()]
    if taken and not force:
        raise CAError(
            f"{out} already holds {', '.join(taken)}; choose another --out directory or pass"
            " --force to replace them"
        )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        _write_files_atomically(
            (
                (paths[1], key_pem, KEY_MODE),
                (paths[0], cert.public_bytes(pem), CERT_MODE),
                (paths[2], ca_cert.public_bytes(pem), CERT_MODE),
            )
        )
    except OSError as exc:
        raise CAError(f"cannot write the subscriber files into {out}: {exc.strerror}") from exc
    return paths


# -- loading ----------------------------------------------------------------------------


def load_events_ca(state_dir: Path, *, need_key: bool) -> EventsCA:
    """The events CA of ``state_dir``, checked (see the module rules); CAError if unusable."""
    directory = events_ca_dir(state_dir)
    files = _files(directory)
    sd = _q(state_dir)
    init = f"`tlsgate events-ca init --state-dir {sd}`"
    if not files["cert"].exists():
        raise CAError(
            f"there is no events CA in {directory} (remote subscribers and the metrics"
            f" endpoint use certificates of their own, never the interception CA's); create"
            f" it with {init}"
        )
    _check_private_dir(directory, "events CA directory")
    remedy = f"replace it with `tlsgate events-ca init --force --state-dir {sd}`"
    cert_data, _ = _read_bounded(files["cert"], "events CA certificate")
    cert = _parse_bundle(cert_data, f"events CA certificate {files['cert']}", remedy)[0]
    _check_is_ca(cert, f"events CA certificate {files['cert']}", remedy)
    _check_validity(cert, f"events CA certificate {files['cert']}", remedy)
    _refuse_interception_ca(state_dir, cert, f"the events CA certificate {files['cert']}")
    key: CAPrivateKey | None = None
    if need_key or files["key"].exists():
        key_data, st = _read_bounded(files["key"], "events CA key")
        _check_key_mode(files["key"], st)
        if need_key:
            key = _parse_key(
                key_data, None, f"events CA key {files['key']}", remedy,
                passphrase_hint="the events CA key is never encrypted; " + remedy,
            )  # fmt: skip
            if key.public_key() != cert.public_key():
                raise CAError(
                    f"events CA key {files['key']} does not match its certificate"
                    f" {files['cert']}; {remedy}"
                )
    return EventsCA(directory=directory, cert=cert, key=key)


def check_trust_anchor(state_dir: Path, ca_file: Path, what: str) -> x509.Certificate:
    """A CA certificate file given for client verification: readable, a CA, not interception."""
    remedy = (
        f"point {what} at the events CA certificate ({_q(events_ca_dir(state_dir) / 'cert.pem')})"
    )
    data, _ = _read_bounded(ca_file, what)
    cert = _parse_bundle(data, f"{what} {ca_file}", remedy)[0]
    _check_is_ca(cert, f"{what} {ca_file}", remedy)
    _check_validity(cert, f"{what} {ca_file}", remedy)
    _refuse_interception_ca(state_dir, cert, f"{what} {ca_file}")
    return cert


def check_server_pair(state_dir: Path, cert_path: Path, key_path: Path, what: str) -> None:
    """A configured server certificate and key: readable, key private, not interception."""
    _, st = _read_bounded(key_path, f"{what} key")
    _check_key_mode(key_path, st)
    data, _ = _read_bounded(cert_path, f"{what} certificate")
    cert = _parse_bundle(data, f"{what} certificate {cert_path}", "give a PEM certificate")[0]
    _refuse_interception_ca(state_dir, cert, f"the {what} certificate {cert_path}")


def _check_key_mode(path: Path, st: os.stat_result) -> None:
    if st.st_mode & GROUP_OTHER_BITS:
        raise CAError(
            f"{path} is accessible by group or other (mode {stat.S_IMODE(st.st_mode):04o});"
            f" run chmod 600 {_q(path)}"
        )


def _check_validity(cert: x509.Certificate, label: str, remedy: str) -> None:
    now = datetime.now(UTC)
    if now > cert.not_valid_after_utc:
        raise CAError(f"{label} expired on {cert.not_valid_after_utc:%Y-%m-%d}; {remedy}")
    if now < cert.not_valid_before_utc:
        raise CAError(f"{label} is not valid before {cert.not_valid_before_utc}; check the clock")


def _refuse_interception_ca(state_dir: Path, cert: x509.Certificate, label: str) -> None:
    """CAError if ``cert`` is, or was issued by, the interception CA of ``state_dir``."""
    path = ca_cert_path(state_dir)
    try:
        data = path.read_bytes()
    except OSError:
        return  # no interception CA (yet): nothing to confuse it with
    try:
        interception = x509.load_pem_x509_certificates(data)[0]
    except ValueError:
        return  # load_ca refuses it with its own message
    same_key = interception.public_key() == cert.public_key()
    same_issuer = cert.issuer == interception.subject and _signed_by(cert, interception)
    if same_key or same_issuer or sha256_fingerprint(cert) == sha256_fingerprint(interception):
        raise CAError(
            f"{label} is the interception CA's (or issued by it): remote subscribers and the"
            " metrics endpoint must use the separate events CA, so that a subscriber"
            " certificate can never be used to impersonate servers to clients; create it with"
            f" `tlsgate events-ca init --state-dir {_q(state_dir)}` and use its files"
        )


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, Exception):
        return False
    return True


# -- listing and revoking ---------------------------------------------------------------


def read_revoked(state_dir: Path) -> frozenset[int]:
    """The serials on the deny list (empty if there is none); CAError if it is unreadable."""
    path = _files(events_ca_dir(state_dir))["revoked"]
    try:
        with open(path, "rb") as src:
            data = src.read(MAX_REVOKED_BYTES + 1)
    except FileNotFoundError:
        return frozenset()
    except OSError as exc:
        raise CAError(f"cannot read the deny list {path}: {exc.strerror}") from exc
    if len(data) > MAX_REVOKED_BYTES:
        raise CAError(f"the deny list {path} is larger than {MAX_REVOKED_BYTES} bytes")
    serials = set()
    for number, line in enumerate(data.decode("ascii", "replace").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            serials.add(int(text, 16))
        except ValueError:
            raise CAError(
                f"line {number} of the deny list {path} is not a hex serial ({text!r});"
                " fix or remove that line"
            ) from None
    return frozenset(serials)


def list_issued(state_dir: Path) -> list[IssuedCertificate]:
    """Every certificate the events CA issued, oldest first, with its revocation state."""
    directory = events_ca_dir(state_dir)
    load_events_ca(state_dir, need_key=False)
    revoked = read_revoked(state_dir)
    found = []
    for path in sorted(_files(directory)["issued"].glob("*.pem")):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        subject = cert.subject
        name = _attribute(subject, NameOID.COMMON_NAME)
        role = _attribute(subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
        found.append(
            IssuedCertificate(
                serial=cert.serial_number,
                name=name,
                role=role,
                not_after=cert.not_valid_after_utc,
                revoked=cert.serial_number in revoked,
            )
        )
    found.sort(key=lambda item: item.not_after)
    return found


def _attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    values = name.get_attributes_for_oid(oid)
    value = values[0].value if values else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def revoke(state_dir: Path, name_or_serial: str) -> list[IssuedCertificate]:
    """Put every certificate named ``name_or_serial`` (or with that hex serial) on the deny
    list; returns them. Effective on the gateway's next reload."""
    issued = list_issued(state_dir)
    wanted = name_or_serial.lower().removeprefix("0x")
    matches = [
        item for item in issued
        if item.name == name_or_serial or f"{item.serial:x}" == wanted
    ]  # fmt: skip
    if not matches:
        raise CAError(
            f"the events CA issued no certificate named or numbered {name_or_serial!r};"
            " see `tlsgate events-ca list`"
        )
    path = _files(events_ca_dir(state_dir))["revoked"]
    already = read_revoked(state_dir)
    lines = [f"{item.serial:x}  # {item.name} ({item.role})\n" for item in matches
             if item.serial not in already]  # fmt: skip
    if lines:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, CERT_MODE)
        with os.fdopen(fd, "a") as out:
            out.writelines(lines)
            out.flush()
            os.fsync(out.fileno())
    return matches


def listener_files(
    state_dir: Path, host: str, what: str, *, ca_file: Path | None = None,
    cert_file: Path | None = None, key_file: Path | None = None,
) -> tuple[Path, Path, Path, bool]:  # fmt: skip
    """``(client CA, server cert, server key, issued_now)`` for a management listener on
    ``host``, every file checked (see the module rules); CAError saying what to do."""
    if ca_file is None:
        ca_file = load_events_ca(state_dir, need_key=False).cert_path
    else:
        check_trust_anchor(state_dir, ca_file, f"the client CA of {what}")
    if cert_file is None or key_file is None:
        cert_file, key_file, issued = ensure_server_certificate(state_dir, host)
        return ca_file, cert_file, key_file, issued
    check_server_pair(state_dir, cert_file, key_file, what)
    return ca_file, cert_file, key_file, False
