"""``tlsgate ca init|import|export|info`` through a minimal argparse root, as in tlsgate.cli."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.supervisor.test_ca import build_cert, build_chain, ec_key, key_pem, pem
from tlsgate.errors import CAError, ConfigError, OperatorError
from tlsgate.paths import ca_cert_path, ca_key_path
from tlsgate.supervisor.ca import MAX_CA_FILE_BYTES, MAX_PASSPHRASE_BYTES, load_ca
from tlsgate.supervisor.ca_commands import add_ca_parser


def tlsgate(*argv: str | Path) -> int:
    """Parse and run ``tlsgate ARGV`` the way ``tlsgate.cli.main`` does (minus the error
    printing: OperatorError propagates to the test)."""
    parser = argparse.ArgumentParser(prog="tlsgate")
    add_ca_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(arg) for arg in argv])
    return int(args.func(args))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def secret_file(tmp_path: Path, content: bytes, name: str = "pass.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    os.chmod(path, 0o600)
    return path


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def pipe_with(request: pytest.FixtureRequest) -> Iterator[int]:
    """The read end of a pipe holding ``request.param``, its write end already closed."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, request.param)
    os.close(write_fd)
    yield read_fd
    with contextlib.suppress(OSError):  # the command closed it, as it should
        os.close(read_fd)


# --- init ------------------------------------------------------------------------------------


def test_init_creates_the_ca_files_with_their_modes_and_prints_the_fingerprint(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tlsgate("ca", "init", "--state-dir", state_dir) == 0
    assert mode_of(state_dir) == 0o700
    assert mode_of(state_dir / "ca") == 0o700
    assert mode_of(ca_key_path(state_dir)) == 0o600
    assert mode_of(ca_cert_path(state_dir)) == 0o644
    ca = load_ca(state_dir)
    out = capsys.readouterr().out
    assert ca.fingerprint_sha256 in out
    assert "ECDSA P-256" in out
    assert f"tlsgate ca export --state-dir {state_dir} > tlsgate-ca.pem" in out


def test_init_takes_the_key_type_and_validity(state_dir: Path) -> None:
    tlsgate("ca", "init", "--key-type", "rsa-3072", "--days", "30", "--state-dir", state_dir)
    ca = load_ca(state_dir)
    assert isinstance(ca.key, rsa.RSAPrivateKey)
    assert ca.key.key_size == 3072
    assert ca.cert.not_valid_after_utc - ca.cert.not_valid_before_utc == timedelta(days=30)


@pytest.mark.parametrize(
    "bad",
    [
        ["--days", "0"],
        ["--days", "3651"],
        ["--days", "ten"],
        ["--key-type", "dsa"],
        ["--passphrase-fd", "-1"],
        ["--passphrase-fd", "stdin"],
    ],
)
def test_init_rejects_bad_options_as_usage_errors(
    state_dir: Path, bad: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        tlsgate("ca", "init", "--state-dir", state_dir, *bad)
    assert exited.value.code == 2
    assert "usage:" in capsys.readouterr().err
    assert not state_dir.exists()


def test_init_refuses_to_replace_a_ca_unless_forced(state_dir: Path) -> None:
    tlsgate("ca", "init", "--state-dir", state_dir)
    first = load_ca(state_dir).fingerprint_sha256
    with pytest.raises(CAError, match="pass --force"):
        tlsgate("ca", "init", "--state-dir", state_dir)
    assert load_ca(state_dir).fingerprint_sha256 == first
    tlsgate("ca", "init", "--force", "--state-dir", state_dir)
    assert load_ca(state_dir).fingerprint_sha256 != first


@pytest.mark.parametrize("content", [b"correct horse\n", b"correct horse\r\n", b"correct horse"])
def test_init_encrypts_the_key_with_a_passphrase_file_minus_one_newline(
    state_dir: Path, tmp_path: Path, content: bytes
) -> None:
    passfile = secret_file(tmp_path, content)
    tlsgate("ca", "init", "--passphrase-file", passfile, "--state-dir", state_dir)
    assert ca_key_path(state_dir).read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY")
    load_ca(state_dir, b"correct horse")


def test_only_one_trailing_newline_is_stripped(state_dir: Path, tmp_path: Path) -> None:
    passfile = secret_file(tmp_path, b"two newlines\n\n")
    tlsgate("ca", "init", "--passphrase-file", passfile, "--state-dir", state_dir)
    load_ca(state_dir, b"two newlines\n")


@pytest.mark.parametrize("pipe_with", [b"piped secret\n"], indirect=True)
def test_init_reads_the_passphrase_from_an_inherited_fd_and_closes_it(
    state_dir: Path, pipe_with: int
) -> None:
    tlsgate("ca", "init", "--passphrase-fd", str(pipe_with), "--state-dir", state_dir)
    load_ca(state_dir, b"piped secret")
    with pytest.raises(OSError):
        os.fstat(pipe_with)


def test_the_passphrase_file_and_fd_exclude_each_other(
    state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    passfile = secret_file(tmp_path, b"pw")
    with pytest.raises(SystemExit):
        tlsgate(
            "ca", "init", "--passphrase-file", passfile, "--passphrase-fd", "0",
            "--state-dir", state_dir,
        )  # fmt: skip
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_passphrase_file_group_or_other_can_read_is_refused(
    state_dir: Path, tmp_path: Path
) -> None:
    passfile = secret_file(tmp_path, b"pw\n")
    os.chmod(passfile, 0o640)
    with pytest.raises(ConfigError, match=f"mode 0640.*run chmod 600 {passfile}"):
        tlsgate("ca", "init", "--passphrase-file", passfile, "--state-dir", state_dir)
    assert not state_dir.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\n", "holds an empty passphrase"),
        (b"", "holds an empty passphrase"),
        (b"x" * (MAX_PASSPHRASE_BYTES + 1), f"more than {MAX_PASSPHRASE_BYTES} bytes"),
    ],
)
def test_an_empty_or_oversized_passphrase_is_refused(
    state_dir: Path, tmp_path: Path, content: bytes, message: str
) -> None:
    passfile = secret_file(tmp_path, content)
    with pytest.raises(ConfigError, match=message):
        tlsgate("ca", "init", "--passphrase-file", passfile, "--state-dir", state_dir)


def test_the_longest_passphrase_is_accepted(state_dir: Path, tmp_path: Path) -> None:
    passphrase = b"x" * MAX_PASSPHRASE_BYTES
    passfile = secret_file(tmp_path, passphrase + b"\r\n")
    tlsgate("ca", "init", "--passphrase-file", passfile, "--state-dir", state_dir)
    load_ca(state_dir, passphrase)


@pytest.mark.parametrize("pipe_with", [b""], indirect=True)
def test_an_empty_fd_passphrase_is_refused(state_dir: Path, pipe_with: int) -> None:
    with pytest.raises(ConfigError, match=r"--passphrase-fd \d+ holds an empty passphrase"):
        tlsgate("ca", "init", "--passphrase-fd", str(pipe_with), "--state-dir", state_dir)


def test_an_fd_passphrase_is_read_only_up_to_the_bound(state_dir: Path) -> None:
    """A writer that never closes cannot make the command read (or wait) forever."""
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, b"y" * (MAX_PASSPHRASE_BYTES * 8))
        with pytest.raises(ConfigError, match=f"more than {MAX_PASSPHRASE_BYTES} bytes"):
            tlsgate("ca", "init", "--passphrase-fd", str(read_fd), "--state-dir", state_dir)
    finally:
        os.close(write_fd)
        with contextlib.suppress(OSError):
            os.close(read_fd)


def test_a_passphrase_on_stdin_is_read_and_stdin_stays_open(state_dir: Path) -> None:
    saved_stdin = os.dup(0)
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, b"from stdin\n")
        os.close(write_fd)
        os.dup2(read_fd, 0)
        tlsgate("ca", "init", "--passphrase-fd", "0", "--state-dir", state_dir)
        os.fstat(0)
    finally:
        os.dup2(saved_stdin, 0)
        os.close(saved_stdin)
        os.close(read_fd)
    load_ca(state_dir, b"from stdin")


def test_a_passphrase_fd_that_is_not_open_is_refused(state_dir: Path) -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    os.close(write_fd)
    with pytest.raises(ConfigError, match=f"cannot read --passphrase-fd {read_fd}"):
        tlsgate("ca", "init", "--passphrase-fd", str(read_fd), "--state-dir", state_dir)


def test_a_missing_passphrase_file_is_refused(state_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read --passphrase-file"):
        tlsgate("ca", "init", "--passphrase-file", tmp_path / "nope", "--state-dir", state_dir)


# --- import ----------------------------------------------------------------------------------


def write_inputs(tmp_path: Path, cert_data: bytes, key_data: bytes) -> tuple[Path, Path]:
    cert_file, key_file = tmp_path / "in-cert.pem", tmp_path / "in-key.pem"
    cert_file.write_bytes(cert_data)
    key_file.write_bytes(key_data)
    return cert_file, key_file


def test_import_adopts_an_intermediate_with_its_chain(
    state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inter, key, root = build_chain()
    cert_file, key_file = write_inputs(tmp_path, pem(inter, root), key_pem(key))
    assert tlsgate("ca", "import", cert_file, key_file, "--state-dir", state_dir) == 0
    assert ca_cert_path(state_dir).read_bytes() == pem(inter, root)
    assert mode_of(ca_key_path(state_dir)) == 0o600
    assert mode_of(ca_cert_path(state_dir)) == 0o644
    ca = load_ca(state_dir)
    assert ca.chain_for_clients() == (inter, root)
    out = capsys.readouterr().out
    assert "imported the CA" in out
    assert "2 certificate(s)" in out


def test_import_decrypts_with_the_key_passphrase_and_encrypts_with_the_new_one(
    state_dir: Path, tmp_path: Path
) -> None:
    inter, key, root = build_chain()
    cert_file, key_file = write_inputs(tmp_path, pem(inter, root), key_pem(key, b"given"))
    given = secret_file(tmp_path, b"given\n", "given.txt")
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"stored\n")
    os.close(write_fd)
    tlsgate(
        "ca", "import", cert_file, key_file, "--key-passphrase-file", given,
        "--passphrase-fd", str(read_fd), "--state-dir", state_dir,
    )  # fmt: skip
    assert load_ca(state_dir, b"stored").cert == inter
    with pytest.raises(CAError, match="wrong passphrase"):
        load_ca(state_dir, b"given")


def test_import_without_a_new_passphrase_stores_the_key_unencrypted(
    state_dir: Path, tmp_path: Path
) -> None:
    inter, key, root = build_chain()
    cert_file, key_file = write_inputs(tmp_path, pem(inter, root), key_pem(key, b"given"))
    given = secret_file(tmp_path, b"given", "given.txt")
    tlsgate(
        "ca", "import", cert_file, key_file, "--key-passphrase-file", given,
        "--state-dir", state_dir,
    )  # fmt: skip
    assert ca_key_path(state_dir).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_import_refuses_a_certificate_that_is_not_a_ca(state_dir: Path, tmp_path: Path) -> None:
    inter, key, _ = build_chain()
    leaf_key = ec_key()
    leaf = build_cert("www.example.com", leaf_key, (inter, key), ca=False, key_usage=None)
    cert_file, key_file = write_inputs(tmp_path, pem(leaf, inter), key_pem(leaf_key))
    with pytest.raises(CAError, match="the certificate to import is not a CA certificate"):
        tlsgate("ca", "import", cert_file, key_file, "--state-dir", state_dir)
    assert not state_dir.exists()


def test_import_refuses_a_key_of_another_certificate(state_dir: Path, tmp_path: Path) -> None:
    inter, _, root = build_chain()
    cert_file, key_file = write_inputs(tmp_path, pem(inter, root), key_pem(ec_key()))
    with pytest.raises(CAError, match="the key to import does not match"):
        tlsgate("ca", "import", cert_file, key_file, "--state-dir", state_dir)


def test_import_refuses_to_replace_a_ca_unless_forced(state_dir: Path, tmp_path: Path) -> None:
    tlsgate("ca", "init", "--state-dir", state_dir)
    inter, key, root = build_chain()
    cert_file, key_file = write_inputs(tmp_path, pem(inter, root), key_pem(key))
    with pytest.raises(CAError, match="pass --force"):
        tlsgate("ca", "import", cert_file, key_file, "--state-dir", state_dir)
    tlsgate("ca", "import", cert_file, key_file, "--force", "--state-dir", state_dir)
    assert load_ca(state_dir).cert == inter


def test_import_refuses_an_oversized_input(state_dir: Path, tmp_path: Path) -> None:
    cert_file, key_file = write_inputs(tmp_path, b"\n" * (MAX_CA_FILE_BYTES + 1), b"")
    with pytest.raises(OperatorError, match=f"CERT {cert_file} is larger than"):
        tlsgate("ca", "import", cert_file, key_file, "--state-dir", state_dir)


def test_import_of_files_that_cannot_be_read_says_which(state_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(OperatorError, match=r"cannot read CERT .*nope\.pem"):
        tlsgate("ca", "import", tmp_path / "nope.pem", tmp_path / "k", "--state-dir", state_dir)


# --- export ----------------------------------------------------------------------------------


def test_export_prints_the_ca_certificate_as_pem(
    state_dir: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    tlsgate("ca", "init", "--state-dir", state_dir)
    capsysbinary.readouterr()
    assert tlsgate("ca", "export", "--state-dir", state_dir) == 0
    exported = capsysbinary.readouterr().out
    assert x509.load_pem_x509_certificate(exported) == load_ca(state_dir).cert


def test_export_der_writes_binary_to_stdout(
    state_dir: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    tlsgate("ca", "init", "--state-dir", state_dir)
    capsysbinary.readouterr()
    tlsgate("ca", "export", "--der", "--state-dir", state_dir)
    exported = capsysbinary.readouterr().out
    assert x509.load_der_x509_certificate(exported) == load_ca(state_dir).cert


@pytest.mark.parametrize("der", [True, False])
def test_export_out_writes_a_world_readable_file(
    state_dir: Path, tmp_path: Path, der: bool, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    tlsgate("ca", "init", "--state-dir", state_dir)
    capsysbinary.readouterr()
    out = tmp_path / "exported.crt"
    tlsgate("ca", "export", *(["--der"] if der else []), "--out", out, "--state-dir", state_dir)
    assert capsysbinary.readouterr().out == b""
    assert mode_of(out) == 0o644
    load = x509.load_der_x509_certificate if der else x509.load_pem_x509_certificate
    assert load(out.read_bytes()) == load_ca(state_dir).cert


def test_export_of_an_intermediate_gives_the_ca_certificate_only(
    state_dir: Path, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    inter, key, root = build_chain()
    cert_file, key_file = write_inputs(tmp_path, pem(inter, root), key_pem(key))
    tlsgate("ca", "import", cert_file, key_file, "--state-dir", state_dir)
    capsysbinary.readouterr()
    tlsgate("ca", "export", "--state-dir", state_dir)
    assert capsysbinary.readouterr().out == inter.public_bytes(serialization.Encoding.PEM)


def test_export_der_refuses_to_write_to_a_terminal(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tlsgate("ca", "init", "--state-dir", state_dir)
    controller, terminal = os.openpty()
    with os.fdopen(controller, "rb") as _, open(terminal, "w") as tty:
        monkeypatch.setattr(sys, "stdout", tty)
        with pytest.raises(OperatorError, match="refusing to write DER"):
            tlsgate("ca", "export", "--der", "--state-dir", state_dir)


def test_export_to_a_missing_directory_says_so(state_dir: Path, tmp_path: Path) -> None:
    tlsgate("ca", "init", "--state-dir", state_dir)
    with pytest.raises(OperatorError, match="cannot write --out"):
        tlsgate("ca", "export", "--out", tmp_path / "no" / "ca.pem", "--state-dir", state_dir)


@pytest.mark.parametrize("command", ["export", "info"])
def test_without_a_ca_export_and_info_say_to_run_init(state_dir: Path, command: str) -> None:
    with pytest.raises(CAError, match=f"tlsgate ca init --state-dir {state_dir}"):
        tlsgate("ca", command, "--state-dir", state_dir)


# --- info ------------------------------------------------------------------------------------


def test_info_shows_the_facts_without_a_passphrase(
    state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    passfile = secret_file(tmp_path, b"pw")
    tlsgate("ca", "init", "--passphrase-file", passfile, "--state-dir", state_dir)
    ca = load_ca(state_dir, b"pw")
    capsys.readouterr()
    assert tlsgate("ca", "info", "--state-dir", state_dir) == 0
    out = capsys.readouterr().out
    assert f"SHA-256 {ca.fingerprint_sha256}" in out
    assert ca.cert.subject.rfc4514_string() in out
    assert "ECDSA P-256, 256 bits, encrypted" in out
    assert f"{ca.cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC" in out
    assert "1 certificate(s)" in out
    assert "(mode 0600)" in out


def test_info_json_is_one_object_with_every_fact(
    state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inter, key, root = build_chain()
    cert_file, key_file = write_inputs(tmp_path, pem(inter, root), key_pem(key))
    tlsgate("ca", "import", cert_file, key_file, "--state-dir", state_dir)
    ca = load_ca(state_dir)
    capsys.readouterr()
    tlsgate("ca", "info", "--json", "--state-dir", state_dir)
    info = json.loads(capsys.readouterr().out)
    assert info == {
        "cert_path": str(ca_cert_path(state_dir)),
        "key_path": str(ca_key_path(state_dir)),
        "subject": inter.subject.rfc4514_string(),
        "issuer": root.subject.rfc4514_string(),
        "fingerprint_sha256": ca.fingerprint_sha256,
        "key_type": "ECDSA P-256",
        "key_size": 256,
        "not_before": inter.not_valid_before_utc.isoformat(),
        "not_after": inter.not_valid_after_utc.isoformat(),
        "chain_length": 2,
        "key_mode": "0600",
        "key_encrypted": False,
        "self_signed": False,
    }


def test_info_shows_a_loose_key_mode(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tlsgate("ca", "init", "--state-dir", state_dir)
    os.chmod(ca_key_path(state_dir), 0o644)
    capsys.readouterr()
    tlsgate("ca", "info", "--state-dir", state_dir)
    assert "(mode 0644)" in capsys.readouterr().out


def test_ca_needs_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        tlsgate("ca")
    assert exited.value.code == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err


def test_a_traditional_rsa_key_is_imported(state_dir: Path, tmp_path: Path) -> None:
    root_key = rsa.generate_private_key(65537, 2048)
    root = build_cert("RSA root", root_key)
    pkcs1 = root_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    cert_file, key_file = write_inputs(tmp_path, pem(root), pkcs1)
    tlsgate("ca", "import", cert_file, key_file, "--state-dir", state_dir)
    ca = load_ca(state_dir)
    assert isinstance(ca.key, rsa.RSAPrivateKey)
    assert ca_key_path(state_dir).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
