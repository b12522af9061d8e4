"""The interception CA: create it, adopt an existing one, store it, load it for the gateway.

Contract:

- The CA lives in ``<state-dir>/ca/``: ``key.pem`` (PKCS#8 PEM, mode 0600, optionally
  encrypted with a passphrase) and ``cert.pem`` (mode 0644: the CA certificate first, then
  the certificates above it up to the root, if any). The state directory and ``ca/`` are
  mode 0700; missing ones are created so, and existing ones that group or other can enter
  are refused, never silently "fixed".
- Files are written atomically: a temporary file in the target directory is created 0600,
  given its final mode before a byte is written, fsynced, then renamed over the target.
  A key file is never, even briefly, accessible by group or other. Key and certificate are
  renamed back to back; if a crash lands between the two renames, :func:`load_ca` reports
  that the key does not match the certificate.
- An existing CA is never replaced unless the caller passes ``force=True``; a half CA (one
  of the two files) is never silently completed or replaced. When one is replaced, its
  certificate bundle is kept as ``previous.pem`` (0644, written in the same atomic batch),
  so that ``tlsgate ca export --all`` can hand clients both CAs during a rotation.
- :func:`load_ca` refuses, with one :class:`~tlsgate.errors.CAError` line that says what to
  do, a CA that is missing or half there, stored with loose permissions, encrypted without
  (or with the wrong) passphrase, whose key does not match, that is expired or not yet
  valid, that is not a CA (basicConstraints CA:TRUE, keyCertSign when keyUsage is present),
  whose key type browsers do not accept, or whose chain is out of order, expired, weakly
  signed or forbids it by a pathLenConstraint. ``import_ca`` applies the same checks before
  it writes anything.
- Generated CAs: ECDSA P-256 (default), ECDSA P-384 or RSA 3072; validity at most
  :data:`MAX_CA_DAYS` (starting :data:`CA_BACKDATE` in the past for clock skew);
  basicConstraints CA:TRUE pathlen 0 and keyUsage keyCertSign+cRLSign (both critical);
  SKI; a subject unique to the install; a random 159-bit serial; SHA-256 (SHA-384 for
  P-384) signatures.
- Only pyca/cryptography is used; nothing here touches the network.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from tlsgate.errors import CAError
from tlsgate.paths import ca_cert_path, ca_key_path, ca_previous_cert_path

CAPrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
SignatureHash: TypeAlias = hashes.SHA256 | hashes.SHA384 | hashes.SHA512

#: ``key_type`` values :func:`create_ca` accepts (the CLI's ``--key-type`` choices).
KEY_TYPES: Final = ("ecdsa-p256", "ecdsa-p384", "rsa-3072")
DEFAULT_KEY_TYPE: Final = "ecdsa-p256"
RSA_KEY_BITS: Final = 3072
RSA_PUBLIC_EXPONENT: Final = 65537
#: Imported RSA keys: browsers refuse smaller ones.
MIN_RSA_KEY_BITS: Final = 2048

MAX_CA_DAYS: Final = 3650
DEFAULT_CA_DAYS: Final = MAX_CA_DAYS
#: A new CA's notBefore lies this far in the past, for clients whose clock is behind.
CA_BACKDATE: Final = timedelta(hours=1)
CA_ORGANIZATION: Final = "tlsgate"
CA_COMMON_NAME_PREFIX: Final = "tlsgate interception CA"
#: Random hex digits appended to the CA common name, so each install's CA is unique.
CA_ID_BYTES: Final = 4
MAX_COMMON_NAME_CHARS: Final = 64

DIR_MODE: Final = 0o700
KEY_MODE: Final = 0o600
CERT_MODE: Final = 0o644
#: Permission bits that let group or other read, write or enter.
GROUP_OTHER_BITS: Final = 0o077

#: OpenSSL's limit on PEM passphrases.
MAX_PASSPHRASE_BYTES: Final = 1023
#: Bound on CA files read from disk (a certificate bundle is a few KiB).
MAX_CA_FILE_BYTES: Final = 256 * 1024
#: Bound on the certificates in a CA bundle (the CA certificate and its chain).
MAX_BUNDLE_CERTS: Final = 8

_SHA256: Final = hashes.SHA256()
_SHA384: Final = hashes.SHA384()
_SHA512: Final = hashes.SHA512()
#: Curves browsers accept for CA keys, and the hash each one signs with.
_CURVE_HASHES: Final[dict[str, SignatureHash]] = {
    "secp256r1": _SHA256,
    "secp384r1": _SHA384,
    "secp521r1": _SHA512,
}
_CURVE_LABELS: Final = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
#: Signature algorithms browsers accept on a (non-self-signed) certificate in the bundle.
_BROWSER_SIGNATURES: Final = frozenset(
    {
        SignatureAlgorithmOID.RSA_WITH_SHA256,
        SignatureAlgorithmOID.RSA_WITH_SHA384,
        SignatureAlgorithmOID.RSA_WITH_SHA512,
        SignatureAlgorithmOID.ECDSA_WITH_SHA256,
        SignatureAlgorithmOID.ECDSA_WITH_SHA384,
        SignatureAlgorithmOID.ECDSA_WITH_SHA512,
    }
)
#: Hashes an RSASSA-PSS signature in the bundle may use.
_STRONG_HASHES: Final = (hashes.SHA256, hashes.SHA384, hashes.SHA512)

_PEM_ENCRYPTED_PKCS8: Final = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
_PEM_ENCRYPTED_LEGACY: Final = b"Proc-Type: 4,ENCRYPTED"

_CA_KEY_USAGE: Final = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
_CA_BASIC_CONSTRAINTS: Final = x509.BasicConstraints(ca=True, path_length=0)


@dataclass(frozen=True, slots=True)
class LoadedCA:
    """A CA that passed every check of :func:`load_ca`, ready to sign leaves.

    ``chain`` holds the certificates above ``cert`` (issuer first), empty for a
    self-signed root.
    """

    cert: x509.Certificate
    key: CAPrivateKey
    chain: tuple[x509.Certificate, ...]
    cert_path: Path
    fingerprint_sha256: str
    _for_clients: tuple[x509.Certificate, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_for_clients", (self.cert, *self.chain))

    def chain_for_clients(self) -> tuple[x509.Certificate, ...]:
        """The certificates to send after a leaf: the CA certificate, then its chain."""
        return self._for_clients


@dataclass(frozen=True, slots=True)
class CAInfo:
    """What ``tlsgate ca info`` shows; read without decrypting the key."""

    cert_path: Path
    key_path: Path
    subject: str
    issuer: str
    fingerprint_sha256: str
    key_type: str
    key_size: int
    not_before: datetime
    not_after: datetime
    chain_length: int
    key_mode: int
    key_encrypted: bool
    self_signed: bool


def sha256_fingerprint(cert: x509.Certificate) -> str:
    """The certificate's SHA-256 fingerprint as upper-case colon hex (``AB:CD:...``)."""
    return cert.fingerprint(_SHA256).hex(":").upper()


def signature_hash(key: CAPrivateKey) -> SignatureHash:
    """The hash a CA key signs with: SHA-256, or the curve's own size for P-384/P-521."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return _CURVE_HASHES.get(key.curve.name, _SHA256)
    return _SHA256


def describe_public_key(public_key: object) -> tuple[str, int]:
    """``("ECDSA P-256", 256)``, ``("RSA", 3072)``, ...: a key's type and size for humans."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        name = public_key.curve.name
        return f"ECDSA {_CURVE_LABELS.get(name, name)}", public_key.key_size
    if isinstance(public_key, rsa.RSAPublicKey):
        return "RSA", public_key.key_size
    key_size = getattr(public_key, "key_size", 0)
    return type(public_key).__name__.removesuffix("PublicKey").lstrip("_"), int(key_size)


def create_ca(
    key_type: str = DEFAULT_KEY_TYPE,
    days: int = DEFAULT_CA_DAYS,
    common_name: str | None = None,
) -> tuple[x509.Certificate, CAPrivateKey]:
    """A new self-signed root CA and its key (see the module docstring for its profile)."""
    _check_ca_params(key_type, days)
    if common_name is None:
        common_name = f"{CA_COMMON_NAME_PREFIX} {secrets.token_hex(CA_ID_BYTES)}"
    if not 1 <= len(common_name) <= MAX_COMMON_NAME_CHARS:
        raise ValueError(f"CA common name must be 1 to {MAX_COMMON_NAME_CHARS} characters")

    key: CAPrivateKey
    if key_type == "rsa-3072":
        key = rsa.generate_private_key(RSA_PUBLIC_EXPONENT, RSA_KEY_BITS)
    elif key_type == "ecdsa-p384":
        key = ec.generate_private_key(ec.SECP384R1())
    else:
        key = ec.generate_private_key(ec.SECP256R1())

    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, CA_ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    not_before = datetime.now(UTC).replace(microsecond=0) - CA_BACKDATE
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + timedelta(days=days))
        .add_extension(_CA_BASIC_CONSTRAINTS, critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, signature_hash(key))
    )
    return cert, key


def _check_ca_params(key_type: str, days: int) -> None:
    if key_type not in KEY_TYPES:
        raise ValueError(f"unknown CA key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")
    if not 1 <= days <= MAX_CA_DAYS:
        raise ValueError(f"CA validity must be 1 to {MAX_CA_DAYS} days, not {days}")


def _check_store_passphrase(passphrase: bytes | None) -> None:
    if passphrase is not None and not 1 <= len(passphrase) <= MAX_PASSPHRASE_BYTES:
        raise CAError(
            f"a passphrase for the CA key must be 1 to {MAX_PASSPHRASE_BYTES} bytes, not "
            f"{len(passphrase)}; choose another one"
        )


def init_ca(
    state_dir: Path,
    key_type: str = DEFAULT_KEY_TYPE,
    days: int = DEFAULT_CA_DAYS,
    passphrase: bytes | None = None,
    force: bool = False,
) -> LoadedCA:
    """Create a CA in ``state_dir`` and return it as :func:`load_ca` reads it back.

    Raises :class:`CAError` if a CA (or half of one) exists and ``force`` is false, or the
    state directory is unsafe; ``ValueError`` for a bad ``key_type`` or ``days``.
    """
    _check_ca_params(key_type, days)
    _check_store_passphrase(passphrase)
    _prepare_store(state_dir, force)
    cert, key = create_ca(key_type, days)
    _store(state_dir, (cert,), key, passphrase)
    return load_ca(state_dir, passphrase)


def import_ca(
    state_dir: Path,
    cert_pem: bytes,
    key_pem: bytes,
    key_passphrase: bytes | None = None,
    store_passphrase: bytes | None = None,
    force: bool = False,
) -> LoadedCA:
    """Adopt an existing CA: ``cert_pem`` is the CA certificate, then its chain to the root.

    The bundle and key get every :func:`load_ca` check before anything is written;
    ``key_passphrase`` decrypts ``key_pem``, ``store_passphrase`` (if any) encrypts the
    stored copy. Returns the CA as :func:`load_ca` reads it back.
    """
    _check_store_passphrase(store_passphrase)
    remedy = "import a usable CA certificate and its key"
    bundle = _parse_bundle(cert_pem, "the certificate file to import", remedy)
    key = _parse_key(
        key_pem,
        key_passphrase,
        "the key file to import",
        remedy,
        passphrase_hint="give its passphrase with --key-passphrase-file FILE",
    )
    _check_ca(
        bundle,
        key,
        cert_label="the certificate to import",
        bundle_label="CERT",
        key_label="the key to import",
        remedy=remedy,
        order_hint="put the CA certificate first in CERT, then its issuer, up to the root",
    )
    _prepare_store(state_dir, force)
    _store(state_dir, bundle, key, store_passphrase)
    return load_ca(state_dir, store_passphrase)


def ensure_ca(state_dir: Path, passphrase: bytes | None = None) -> tuple[LoadedCA, bool]:
    """The CA for ``tlsgate run``: created (``True``) if neither file exists, else loaded.

    If exactly one of the two files exists this is an error; it is never replaced.
    """
    has_cert = _stat_or_none(ca_cert_path(state_dir)) is not None
    has_key = _stat_or_none(ca_key_path(state_dir)) is not None
    if not has_cert and not has_key:
        return init_ca(state_dir, passphrase=passphrase), True
    return load_ca(state_dir, passphrase), False


def load_ca(state_dir: Path, passphrase: bytes | None = None) -> LoadedCA:
    """Load and check the CA in ``state_dir``; :class:`CAError` says what to do if unusable."""
    cert_path, key_path = ca_cert_path(state_dir), ca_key_path(state_dir)
    _require_ca_files(state_dir)
    _check_private_dir(state_dir, "state directory")
    _check_private_dir(cert_path.parent, "CA directory")

    key_data, key_stat = _read_bounded(key_path, "CA key")
    if key_stat.st_mode & GROUP_OTHER_BITS:
        raise CAError(
            f"CA key {key_path} is accessible by group or other "
            f"(mode {stat.S_IMODE(key_stat.st_mode):04o}); run chmod 600 {_q(key_path)}"
        )
    cert_data, _ = _read_bounded(cert_path, "CA certificate")

    sd = _q(state_dir)
    remedy = (
        f"replace the CA with `tlsgate ca init --force --state-dir {sd}` or "
        f"`tlsgate ca import --force --state-dir {sd} CERT KEY`"
    )
    bundle = _parse_bundle(cert_data, f"CA certificate {cert_path}", remedy)
    key = _parse_key(
        key_data,
        passphrase,
        f"CA key {key_path}",
        remedy,
        passphrase_hint="give its passphrase (`tlsgate run --ca-passphrase-file FILE`)",
    )
    _check_ca(
        bundle,
        key,
        cert_label=f"CA certificate {cert_path}",
        bundle_label=str(cert_path),
        key_label=f"CA key {key_path}",
        remedy=remedy,
        order_hint=f"reorder {cert_path}: CA certificate first, then its issuer, up to the root",
    )
    return LoadedCA(
        cert=bundle[0],
        key=key,
        chain=tuple(bundle[1:]),
        cert_path=cert_path,
        fingerprint_sha256=sha256_fingerprint(bundle[0]),
    )


def read_ca_certificates(state_dir: Path) -> tuple[x509.Certificate, ...]:
    """The stored bundle (CA certificate first), parsed but not checked; for export/info."""
    cert_path = ca_cert_path(state_dir)
    if _stat_or_none(cert_path) is None:
        raise CAError(_no_ca_message(state_dir))
    data, _ = _read_bounded(cert_path, "CA certificate")
    return _parse_bundle(data, f"CA certificate {cert_path}", "restore it or re-create the CA")


def read_previous_ca_certificate(state_dir: Path) -> x509.Certificate | None:
    """The CA certificate that the current one replaced, if it was kept (``previous.pem``)."""
    path = ca_previous_cert_path(state_dir)
    if _stat_or_none(path) is None:
        return None
    data, _ = _read_bounded(path, "previous CA certificate")
    return _parse_bundle(data, f"previous CA certificate {path}", f"remove {path}")[0]


def describe_ca(state_dir: Path) -> CAInfo:
    """Facts about the stored CA, without the passphrase (the key is not decrypted)."""
    cert_path, key_path = ca_cert_path(state_dir), ca_key_path(state_dir)
    _require_ca_files(state_dir)
    bundle = read_ca_certificates(state_dir)
    key_data, key_stat = _read_bounded(key_path, "CA key")
    cert = bundle[0]
    key_type, key_size = describe_public_key(cert.public_key())
    return CAInfo(
        cert_path=cert_path,
        key_path=key_path,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        fingerprint_sha256=sha256_fingerprint(cert),
        key_type=key_type,
        key_size=key_size,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        chain_length=len(bundle),
        key_mode=stat.S_IMODE(key_stat.st_mode),
        key_encrypted=_pem_is_encrypted(key_data),
        self_signed=cert.issuer == cert.subject,
    )


def write_file_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temporary file that has ``mode`` before any byte."""
    _write_files_atomically(((path, data, mode),))


# --- storing -------------------------------------------------------------------------------


def _prepare_store(state_dir: Path, force: bool) -> None:
    """Create the directories 0700 (refusing loose ones) and refuse to replace a CA."""
    ca_dir = ca_cert_path(state_dir).parent
    for directory, label in ((state_dir, "state directory"), (ca_dir, "CA directory")):
        make_private_dir(directory, label)
    if force:
        return
    existing = [
        path.name
        for path in (ca_cert_path(state_dir), ca_key_path(state_dir))
        if _stat_or_none(path) is not None
    ]
    if existing:
        raise CAError(
            f"a CA already exists in {ca_dir} ({', '.join(existing)}); pass --force to replace "
            "it (clients that trust the old CA will have to trust the new one)"
        )


def make_private_dir(directory: Path, label: str) -> None:
    """Create ``directory`` (and parents) mode 0700, or refuse an existing loose one."""
    try:
        directory.mkdir(mode=DIR_MODE, parents=True)
    except FileExistsError:
        pass
    except OSError as err:
        raise CAError(
            f"cannot create {label} {directory}: {err.strerror}; "
            "run as root or pass --state-dir with a directory you own"
        ) from err
    else:
        os.chmod(directory, DIR_MODE)  # mkdir's mode was reduced by the umask
    _check_private_dir(directory, label)


def _store(
    state_dir: Path,
    bundle: Sequence[x509.Certificate],
    key: CAPrivateKey,
    passphrase: bytes | None,
) -> None:
    encryption: serialization.KeySerializationEncryption
    if passphrase is not None:
        encryption = serialization.BestAvailableEncryption(passphrase)
    else:
        encryption = serialization.NoEncryption()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    cert_pem = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in bundle)
    key_path, cert_path = ca_key_path(state_dir), ca_cert_path(state_dir)
    files = [(key_path, key_pem, KEY_MODE), (cert_path, cert_pem, CERT_MODE)]
    if _stat_or_none(cert_path) is not None:
        old, _ = _read_bounded(cert_path, "CA certificate")
        if old != cert_pem:
            files.append((ca_previous_cert_path(state_dir), old, CERT_MODE))
    try:
        _write_files_atomically(files)
    except OSError as err:
        raise CAError(
            f"cannot write the CA to {cert_path.parent}: {err.strerror or err}; "
            "free space or fix permissions there, then run the command again"
        ) from err


def _write_files_atomically(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write every file to a temporary sibling first, then rename them all back to back."""
    pending: list[tuple[str, Path]] = []
    try:
        for path, data, mode in files:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            pending.append((tmp, path))
            # mkstemp created it 0600; set the final mode (the umask does not apply)
            # before writing, so no reader ever sees the data with other permissions.
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        while pending:
            tmp, path = pending[0]
            os.replace(tmp, path)
            del pending[0]
    finally:
        for tmp, _ in pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    for directory in {path.parent for path, _, _ in files}:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# --- loading and checking ------------------------------------------------------------------


def _q(path: Path) -> str:
    return shlex.quote(str(path))


def _no_ca_message(state_dir: Path) -> str:
    sd = _q(state_dir)
    return (
        f"no CA in {ca_cert_path(state_dir).parent}: run `tlsgate ca init --state-dir {sd}` "
        f"to create one, or `tlsgate ca import --state-dir {sd} CERT KEY` to adopt yours"
    )


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        raise CAError(
            f"cannot access {path}: {err.strerror}; run tlsgate as the user that owns the "
            "state directory (or as root)"
        ) from err


def _require_ca_files(state_dir: Path) -> None:
    cert_path, key_path = ca_cert_path(state_dir), ca_key_path(state_dir)
    has_cert = _stat_or_none(cert_path) is not None
    has_key = _stat_or_none(key_path) is not None
    if has_cert and has_key:
        return
    if not has_cert and not has_key:
        raise CAError(_no_ca_message(state_dir))
    present, missing = (cert_path, key_path) if has_cert else (key_path, cert_path)
    raise CAError(
        f"the CA in {cert_path.parent} is incomplete: {missing.name} is missing but "
        f"{present.name} exists; restore {missing} from a backup, or replace the CA with "
        f"`tlsgate ca init --force --state-dir {_q(state_dir)}`"
    )


def _check_private_dir(directory: Path, label: str) -> None:
    st = _stat_or_none(directory)
    if st is None or not stat.S_ISDIR(st.st_mode):
        raise CAError(f"{label} {directory} is not a directory; remove it or pick another one")
    if st.st_mode & GROUP_OTHER_BITS:
        raise CAError(
            f"{label} {directory} is accessible by group or other "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run chmod 700 {_q(directory)}"
        )


def _read_bounded(path: Path, label: str) -> tuple[bytes, os.stat_result]:
    """The file's bytes and the ``os.stat`` of the very file that was read.

    Opened non-blocking so that a FIFO in the key's place is refused instead of hanging.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise CAError(
            f"cannot read {label} {path}: {err.strerror}; run tlsgate as the user that owns "
            "it (or as root)"
        ) from err
    st = os.stat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CAError(f"{label} {path} is not a regular file; restore it")
    with os.fdopen(fd, "rb") as src:
        data = src.read(MAX_CA_FILE_BYTES + 1)
    if len(data) > MAX_CA_FILE_BYTES:
        raise CAError(
            f"{label} {path} is larger than {MAX_CA_FILE_BYTES} bytes, so it is not a CA "
            "file; restore it"
        )
    return data, st


def _pem_is_encrypted(key_pem: bytes) -> bool:
    return _PEM_ENCRYPTED_PKCS8 in key_pem or _PEM_ENCRYPTED_LEGACY in key_pem


def _parse_bundle(data: bytes, label: str, remedy: str) -> tuple[x509.Certificate, ...]:
    try:
        bundle = tuple(x509.load_pem_x509_certificates(data))
    except ValueError as err:
        raise CAError(f"{label} holds no readable PEM certificate ({err}); {remedy}") from err
    if len(bundle) > MAX_BUNDLE_CERTS:
        raise CAError(
            f"{label} holds {len(bundle)} certificates, more than {MAX_BUNDLE_CERTS}; keep only "
            f"the CA certificate and its chain up to the root; {remedy}"
        )
    return bundle


def _parse_key(
    data: bytes, passphrase: bytes | None, label: str, remedy: str, *, passphrase_hint: str
) -> CAPrivateKey:
    encrypted = _pem_is_encrypted(data)
    if encrypted and not passphrase:
        raise CAError(f"{label} is encrypted: {passphrase_hint}")
    try:
        key = serialization.load_pem_private_key(data, passphrase if encrypted else None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        if encrypted:
            raise CAError(
                f"cannot decrypt {label} with the given passphrase (wrong passphrase?); "
                f"{passphrase_hint}"
            ) from err
        raise CAError(f"{label} is not a readable PEM private key ({err}); {remedy}") from err
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size >= MIN_RSA_KEY_BITS:
            return key
        raise CAError(
            f"{label} is a {key.key_size}-bit RSA key; browsers need at least "
            f"{MIN_RSA_KEY_BITS} bits; {remedy}"
        )
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name in _CURVE_HASHES:
            return key
        raise CAError(
            f"{label} uses the curve {key.curve.name}, which browsers do not accept "
            f"(use P-256, P-384 or P-521); {remedy}"
        )
    kind, _ = describe_public_key(key.public_key())
    raise CAError(
        f"{label} holds a key of type {kind}, which browsers do not accept for CAs (use "
        f"ECDSA or RSA); {remedy}"
    )


def _check_ca(
    bundle: Sequence[x509.Certificate],
    key: CAPrivateKey,
    *,
    cert_label: str,
    bundle_label: str,
    key_label: str,
    remedy: str,
    order_hint: str,
) -> None:
    """Every check that makes a bundle and key a usable interception CA (see module doc)."""
    ca_cert = bundle[0]
    if ca_cert.public_key() != key.public_key():
        raise CAError(
            f"{key_label} does not match {cert_label} (subject "
            f"{ca_cert.subject.rfc4514_string()}); the CA certificate must come first; {remedy}"
        )

    now = datetime.now(UTC)
    for index, cert in enumerate(bundle):
        label = cert_label if index == 0 else _chain_label(bundle_label, index, cert)
        if now < cert.not_valid_before_utc:
            raise CAError(
                f"{label} is not yet valid (valid from {_when(cert.not_valid_before_utc)}); "
                f"check the system clock, or {remedy}"
            )
        if now > cert.not_valid_after_utc:
            raise CAError(f"{label} expired on {_when(cert.not_valid_after_utc)}; {remedy}")
        constraints = _check_is_ca(cert, label, remedy)
        # ``index`` CA certificates stand between this one and the leaves we issue.
        if constraints.path_length is not None and index > constraints.path_length:
            raise CAError(
                f"{label} has pathLenConstraint {constraints.path_length}, which forbids the "
                f"{index} CA certificate(s) below it, so leaves issued by the CA would be "
                f"rejected; {remedy}"
            )
        weak = None if cert.issuer == cert.subject else _weak_signature(cert)
        if weak is not None:
            raise CAError(
                f"{label} is signed with the algorithm {weak}, which browsers reject (they "
                f"need RSA or ECDSA with SHA-256, SHA-384 or SHA-512); {remedy}"
            )
        if index + 1 < len(bundle):
            issuer = bundle[index + 1]
            try:
                cert.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature) as err:
                raise CAError(
                    f"{_chain_label(bundle_label, index + 1, issuer)} did not issue the "
                    f"certificate before it ({cert.subject.rfc4514_string()}); {order_hint}"
                ) from err


def _check_is_ca(cert: x509.Certificate, label: str, remedy: str) -> x509.BasicConstraints:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CAError(
            f"{label} is not a CA certificate (it lacks basicConstraints CA:TRUE), so clients "
            f"would reject the leaves it signs; {remedy}"
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return constraints
    if not usage.key_cert_sign:
        raise CAError(
            f"{label} is not allowed to sign certificates (its keyUsage lacks keyCertSign); "
            f"{remedy}"
        )
    return constraints


def _weak_signature(cert: x509.Certificate) -> str | None:
    """The certificate's signature algorithm (dotted OID) if browsers reject it, else None."""
    oid = cert.signature_algorithm_oid
    if oid in _BROWSER_SIGNATURES:
        return None
    if oid == SignatureAlgorithmOID.RSASSA_PSS and isinstance(
        cert.signature_hash_algorithm, _STRONG_HASHES
    ):
        return None
    return oid.dotted_string


def _chain_label(bundle_label: str, index: int, cert: x509.Certificate) -> str:
    return f"certificate {index + 1} in {bundle_label} ({cert.subject.rfc4514_string()})"


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"
