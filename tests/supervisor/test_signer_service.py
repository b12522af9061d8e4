"""The signer service: one signature per name across worker processes, hostile requests,
restarts, and workers that never hold (or can read) the CA key."""

from __future__ import annotations

import asyncio
import os
import pwd
import selectors
import shutil
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgpack
import multiprocess  # type: ignore[import-untyped]
import pytest
from cryptography import x509

from tlsgate.errors import OperatorError
from tlsgate.paths import ca_key_path
from tlsgate.supervisor.ca import LoadedCA, init_ca
from tlsgate.supervisor.signer import MAX_LEAF_NAMES, LeafRequest, LeafSigner, generate_leaf_key
from tlsgate.supervisor.signer_service import (
    MAX_OUTPUT_BYTES,
    MAX_REQUEST_BYTES,
    MAX_REQUESTS_PER_ROUND,
    SignerClient,
    SignerRejected,
    SignerServer,
    SignerUnavailable,
)
from tlsgate.workers.certcache import SharedCertificateCache
from tlsgate.workers.certs import cache_key

PROCESS_TIMEOUT = 30.0
IO_TIMEOUT = 10.0
SPAWN = multiprocess.get_context("spawn")
FINGERPRINT = "ab" * 32


def leaf_request(*names: str, ips: tuple[str, ...] = ()) -> LeafRequest:
    return LeafRequest(names, ips, datetime.now(UTC) + timedelta(days=30))


def san_dns_names(der: bytes) -> list[str]:
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LoadedCA:
    return init_ca(tmp_path_factory.mktemp("ca") / "state", "ecdsa-p256")


@pytest.fixture
def signer(ca: LoadedCA) -> LeafSigner:
    return LeafSigner(ca, generate_leaf_key())


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[SharedCertificateCache]:
    with SharedCertificateCache(tmp_path / "certcache") as cache:
        yield cache


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "signer.sock"


@pytest.fixture
def server(
    signer: LeafSigner, cache: SharedCertificateCache, socket_path: Path
) -> Iterator[SignerServer]:
    server = SignerServer(signer, cache, socket_path)
    server.start()
    yield server
    server.stop()
    assert server.failure is None


# -- raw wire access (what a hostile worker could send) -----------------------------------


class Wire:
    """A plain blocking connection speaking the framing by hand."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.connect(str(path))

    def send(self, message: object) -> None:
        self.send_raw(msgpack.packb(message, use_bin_type=True))

    def send_raw(self, body: bytes, length: int | None = None) -> None:
        self.sock.sendall(struct.pack(">I", len(body) if length is None else length) + body)

    def receive(self) -> dict[str, Any] | None:
        """The next answer, or None if the server closed the connection."""
        header = self._exactly(4)
        if header is None:
            return None
        body = self._exactly(struct.unpack(">I", header)[0])
        assert body is not None
        answer = msgpack.unpackb(body)
        assert isinstance(answer, dict)
        return answer

    def _exactly(self, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            try:
                chunk = self.sock.recv(size - len(data))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def wire_request(request_id: int, *names: str, key: bytes | None = None) -> dict[str, Any]:
    req = leaf_request(*names)
    return {
        "id": request_id,
        "dns_names": list(req.dns_names),
        "ip_addresses": [],
        "not_after": int(req.not_after.timestamp()),
        "key": key if key is not None else cache_key(req, FINGERPRINT),
    }


def assert_still_serving(server: SignerServer, socket_path: Path, name: str) -> None:
    req = leaf_request(name)
    client = SignerClient(socket_path)
    try:
        der = client.sign_blocking(req, cache_key(req, FINGERPRINT))
    finally:
        client.close()
    assert san_dns_names(der) == [name]
    assert server.running


# -- worker processes (spawned, as the supervisor starts them) ------------------------------


def _worker(socket_path: Path, barrier: Any, results: Any, count: int) -> None:
    """Ask for one name ``count`` times at once, after every worker is ready."""

    async def main() -> list[bytes]:
        client = SignerClient(socket_path, timeout=PROCESS_TIMEOUT)
        req = leaf_request("www.example.com")
        key = cache_key(req, FINGERPRINT)
        barrier.wait(PROCESS_TIMEOUT)
        try:
            return await asyncio.gather(*(client.sign(req, key) for _ in range(count)))
        finally:
            client.close()

    results.put(set(asyncio.run(main())))


def test_four_processes_asking_for_one_name_fifty_times_at_once_cause_one_signature(
    server: SignerServer, signer: LeafSigner, cache: SharedCertificateCache, socket_path: Path
) -> None:
    barrier = SPAWN.Barrier(4)
    results = SPAWN.Queue()
    workers = [
        SPAWN.Process(target=_worker, args=(socket_path, barrier, results, 50)) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    answers = [results.get(timeout=PROCESS_TIMEOUT) for _ in workers]
    for worker in workers:
        worker.join(PROCESS_TIMEOUT)
        assert worker.exitcode == 0
    assert all(len(ders) == 1 for ders in answers)
    ders = set.union(*answers)
    assert len(ders) == 1
    assert signer.signatures == 1
    (der,) = ders
    req = leaf_request("www.example.com")
    assert cache.get(cache_key(req, FINGERPRINT)) == der
    assert server.stats()["requests"] == 200


class ForgetfulCache:
    """A cache that keeps nothing, so that only the service's own coalescing can help."""

    def __init__(self) -> None:
        self.stored: list[bytes] = []

    def get(self, key: bytes) -> bytes | None:
        return None

    def put(self, key: bytes, der: bytes) -> None:
        self.stored.append(key)

    def clear(self) -> None:
        self.stored.clear()


def test_requests_for_one_key_read_together_cost_one_signature_without_any_cache(
    signer: LeafSigner, socket_path: Path
) -> None:
    forgetful = ForgetfulCache()
    server = SignerServer(signer, forgetful, socket_path)
    server.start()
    try:
        wire = Wire(socket_path)
        names = ["a.example.com", "b.example.com", "c.example.com"]
        burst = b""
        for i in range(30):
            body = msgpack.packb(wire_request(i, names[i % 3]), use_bin_type=True)
            burst += struct.pack(">I", len(body)) + body
        wire.sock.sendall(burst)  # one write: the service reads all 30 in one round
        answers = [wire.receive() for _ in range(30)]
        wire.close()
    finally:
        server.stop()
    by_id = {a["id"]: a["der"] for a in answers if a is not None}
    assert sorted(by_id) == list(range(30))
    assert signer.signatures == 3
    for i, der in by_id.items():
        assert san_dns_names(der) == [names[i % 3]]
        assert der == by_id[i % 3]
    assert len(forgetful.stored) == 3


def test_the_leaf_is_in_the_shared_cache_when_the_answer_arrives(
    server: SignerServer, cache: SharedCertificateCache, socket_path: Path
) -> None:
    client = SignerClient(socket_path)
    for n in range(20):
        req = leaf_request(f"host{n}.example.com")
        key = cache_key(req, FINGERPRINT)
        der = client.sign_blocking(req, key)
        assert cache.get(key) == der
    client.close()


def test_concurrent_requests_on_one_connection_are_matched_to_their_answers_by_id(
    server: SignerServer, socket_path: Path
) -> None:
    names = [f"n{n}.example.com" for n in range(40)]

    async def main() -> list[bytes]:
        client = SignerClient(socket_path)
        try:
            reqs = [leaf_request(name) for name in names]
            return await asyncio.gather(*(client.sign(r, cache_key(r, FINGERPRINT)) for r in reqs))
        finally:
            client.close()

    ders = asyncio.run(main())
    assert [san_dns_names(der) for der in ders] == [[name] for name in names]
    assert server.stats()["connections"] <= 1


# -- hostile input ------------------------------------------------------------------------

UNANSWERABLE = {
    "garbage bytes": b"\x00\xc1garbage that is not msgpack",
    "msgpack but not a map": msgpack.packb([1, 2, 3]),
    "a map without an id": msgpack.packb({"dns_names": ["a.example"]}),
    "an id that is not an integer": msgpack.packb({"id": "seven"}),
    "a negative id": msgpack.packb({"id": -1}),
    "invalid UTF-8 in a name": msgpack.packb({"id": 1, "dns_names": [b"\xff"]}).replace(
        b"\xc4\x01\xff", b"\xa1\xff"
    ),
    "trailing bytes after the map": msgpack.packb({"id": 1}) + b"\x00",
}


@pytest.mark.parametrize("body", UNANSWERABLE.values(), ids=UNANSWERABLE.keys())
def test_a_frame_without_a_usable_id_closes_that_connection_only(
    server: SignerServer, socket_path: Path, body: bytes
) -> None:
    wire = Wire(socket_path)
    wire.send_raw(body)
    assert wire.receive() is None
    wire.close()
    assert server.stats()["dropped"] == 1
    assert_still_serving(server, socket_path, "after.example.com")


def test_an_oversized_frame_closes_the_connection_before_its_body_is_read(
    server: SignerServer, socket_path: Path
) -> None:
    wire = Wire(socket_path)
    wire.send_raw(b"x" * 100, length=MAX_REQUEST_BYTES + 1)
    assert wire.receive() is None
    wire.close()
    assert server.stats()["dropped"] == 1
    assert_still_serving(server, socket_path, "after.example.com")


def _with(**changes: Any) -> dict[str, Any]:
    message = wire_request(7, "ok.example.com")
    for field, value in changes.items():
        if value is _MISSING:
            del message[field]
        else:
            message[field] = value
    return message


_MISSING = object()

ANSWERABLE = {
    "a name LeafSigner refuses": (_with(dns_names=["bad name!.example"]), "cannot sign"),
    "an invalid IP address": (_with(ip_addresses=["300.1.1.1"]), "cannot sign"),
    "too many names": (
        _with(dns_names=[f"h{n}.example" for n in range(MAX_LEAF_NAMES + 1)]),
        "list of at most",
    ),
    "names and addresses over the limit together": (
        _with(
            dns_names=[f"h{n}.example" for n in range(MAX_LEAF_NAMES)], ip_addresses=["10.0.0.1"]
        ),
        "1 to 1000 names",
    ),
    "no names": (_with(dns_names=[]), "1 to 1000 names"),
    "an over-long name": (_with(dns_names=["a" * 254]), "at most 253 characters"),
    "names that are not strings": (_with(dns_names=[1, 2]), "strings"),
    "names that are not a list": (_with(dns_names="a.example"), "list"),
    "a missing field": (_with(key=_MISSING), "exactly the fields"),
    "an extra field": (_with(ca_key="please"), "exactly the fields"),
    "a short key": (_with(key=b"k" * 31), "key must be 32 bytes"),
    "a key that is text": (_with(key="k" * 32), "key must be 32 bytes"),
    "not_after as text": (_with(not_after="2030-01-01"), "not_after"),
    "not_after as a boolean": (_with(not_after=True), "not_after"),
    "not_after before 1970": (_with(not_after=-5), "not_after"),
    "not_after after 9999": (_with(not_after=2**40), "not_after"),
    "not_after already past": (_with(not_after=1_000_000), "cannot sign"),
}


@pytest.mark.parametrize(("message", "error"), ANSWERABLE.values(), ids=ANSWERABLE.keys())
def test_a_defective_request_gets_an_error_and_the_connection_keeps_working(
    server: SignerServer, signer: LeafSigner, socket_path: Path, message: Any, error: str
) -> None:
    wire = Wire(socket_path)
    wire.send(message)
    answer = wire.receive()
    assert answer is not None
    assert answer["id"] == 7
    assert "der" not in answer
    assert error in answer["error"]
    wire.send(wire_request(8, "good.example.com"))
    good = wire.receive()
    assert good is not None and good["id"] == 8
    assert san_dns_names(good["der"]) == ["good.example.com"]
    wire.close()
    assert signer.signatures == 1
    assert server.stats()["rejected"] == 1


def test_a_peer_that_never_reads_its_answers_stops_being_read_and_others_are_served(
    server: SignerServer, socket_path: Path
) -> None:
    # Cheap requests with big answers: one name minted once, then asked for again and again.
    wire = Wire(socket_path)
    body = msgpack.packb(wire_request(1, "flood.example.com"), use_bin_type=True)
    wire.send_raw(body)
    first = wire.receive()
    assert first is not None
    answer_size = len(first["der"]) + 64
    wire.sock.setblocking(False)
    frame = struct.pack(">I", len(body)) + body
    flood = frame * (4 * MAX_OUTPUT_BYTES // answer_size)
    sent = 0
    deadline = time.monotonic() + IO_TIMEOUT
    while sent < len(flood) and time.monotonic() < deadline:
        try:
            sent += wire.sock.send(flood[sent : sent + 65536])
        except BlockingIOError:
            if not any(c.interest & selectors.EVENT_READ for c in server._connections.values()):
                break  # the service stopped reading us; our socket buffer is full
            time.sleep(0.001)
    assert sent < len(flood), "the service kept reading a peer that does not read"
    queued = max(conn.out_bytes for conn in server._connections.values())
    assert queued <= MAX_OUTPUT_BYTES + MAX_REQUESTS_PER_ROUND * answer_size
    started = time.monotonic()
    assert_still_serving(server, socket_path, "other.example.com")
    assert time.monotonic() - started < 2.0
    wire.close()


# -- the client -------------------------------------------------------------------------------


def test_a_refused_request_raises_signer_rejected_which_is_a_value_error(
    server: SignerServer, socket_path: Path
) -> None:
    req = leaf_request("bad name!.example")

    async def main() -> None:
        client = SignerClient(socket_path)
        try:
            await client.sign(req, cache_key(req, FINGERPRINT))
        finally:
            client.close()

    with pytest.raises(SignerRejected, match="is not an ASCII DNS name") as info:
        asyncio.run(main())
    assert isinstance(info.value, ValueError)


def test_a_request_the_signer_would_drop_is_refused_before_it_is_sent(
    server: SignerServer, socket_path: Path
) -> None:
    client = SignerClient(socket_path)
    naive = LeafRequest(("a.example",), (), datetime(2030, 1, 1))
    with pytest.raises(SignerRejected, match="timezone-aware"):
        client.sign_blocking(naive, b"k" * 32)
    with pytest.raises(SignerRejected, match="32 bytes"):
        client.sign_blocking(leaf_request("a.example"), b"short")
    huge = leaf_request(*(f"{n}.{'x' * 240}.example" for n in range(MAX_LEAF_NAMES + 300)))
    with pytest.raises(SignerRejected, match=f"at most {MAX_REQUEST_BYTES} bytes"):
        client.sign_blocking(huge, b"k" * 32)
    client.close()
    assert server.stats()["requests"] == 0


def test_an_unreachable_signer_raises_signer_unavailable_after_the_timeout(
    tmp_path: Path,
) -> None:
    client = SignerClient(tmp_path / "nobody-listens.sock", timeout=0.3)
    req = leaf_request("a.example")
    started = time.monotonic()
    with pytest.raises(SignerUnavailable, match=r"nobody-listens\.sock did not answer within"):
        asyncio.run(client.sign(req, cache_key(req, FINGERPRINT)))
    assert 0.25 < time.monotonic() - started < 3.0
    with pytest.raises(SignerUnavailable, match="unavailable"):
        client.sign_blocking(req, cache_key(req, FINGERPRINT))


def test_the_client_reconnects_when_the_signer_restarts(
    signer: LeafSigner, cache: SharedCertificateCache, socket_path: Path
) -> None:
    first = SignerServer(signer, cache, socket_path)
    first.start()

    async def main() -> list[bytes]:
        client = SignerClient(socket_path)
        try:
            one = leaf_request("one.example")
            der1 = await client.sign(one, cache_key(one, FINGERPRINT))
            first.stop()
            # The next request finds the signer gone and keeps trying until it is back.
            two = leaf_request("two.example")
            pending = asyncio.ensure_future(client.sign(two, cache_key(two, FINGERPRINT)))
            while "cannot connect" not in client._last_error:
                await asyncio.sleep(0.005)
            second = SignerServer(signer, cache, socket_path)
            second.start()
            try:
                der2 = await pending
            finally:
                second.stop()
            return [der1, der2]
        finally:
            client.close()

    der1, der2 = asyncio.run(asyncio.wait_for(main(), IO_TIMEOUT))
    assert (san_dns_names(der1), san_dns_names(der2)) == (["one.example"], ["two.example"])


def test_a_client_uses_the_connection_the_supervisor_made_for_it_first(
    server: SignerServer, socket_path: Path, tmp_path: Path
) -> None:
    handed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    handed.connect(str(socket_path))

    async def main() -> bytes:
        # The path is one the worker cannot reach: only the handed connection works.
        client = SignerClient(tmp_path / "unreachable.sock", sock=handed, timeout=IO_TIMEOUT)
        try:
            req = leaf_request("handed.example")
            return await client.sign(req, cache_key(req, FINGERPRINT))
        finally:
            client.close()

    assert san_dns_names(asyncio.run(main())) == ["handed.example"]


def test_rotate_signs_with_the_new_ca_empties_the_cache_and_keeps_connections(
    server: SignerServer,
    cache: SharedCertificateCache,
    socket_path: Path,
    ca: LoadedCA,
    tmp_path: Path,
) -> None:
    wire = Wire(socket_path)
    message = wire_request(1, "rotated.example")
    wire.send(message)
    before = wire.receive()
    assert before is not None
    x509.load_der_x509_certificate(before["der"]).verify_directly_issued_by(ca.cert)
    assert cache.get(message["key"]) == before["der"]
    new_ca = init_ca(tmp_path / "new-state", "ecdsa-p256")
    new_signer = LeafSigner(new_ca, generate_leaf_key())
    server.rotate(new_signer)
    assert cache.get(message["key"]) is None
    wire.send({**message, "id": 2})
    after = wire.receive()
    wire.close()
    assert after is not None and after["id"] == 2
    x509.load_der_x509_certificate(after["der"]).verify_directly_issued_by(new_ca.cert)
    assert new_signer.signatures == 1
    assert server.stats()["dropped"] == 0


# -- the socket -------------------------------------------------------------------------------


def test_the_socket_is_created_with_its_mode_and_removed_at_stop(
    server: SignerServer, socket_path: Path
) -> None:
    st = os.lstat(socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert [p.name for p in socket_path.parent.iterdir() if p.name.startswith(".s")] == []
    server.stop()
    assert not socket_path.exists()


def test_a_second_signer_on_a_live_socket_is_an_operator_error(
    server: SignerServer, signer: LeafSigner, cache: SharedCertificateCache, socket_path: Path
) -> None:
    with pytest.raises(OperatorError, match="another gateway is running"):
        SignerServer(signer, cache, socket_path).start()
    assert_still_serving(server, socket_path, "still.example.com")


def test_a_stale_socket_file_is_replaced(
    signer: LeafSigner, cache: SharedCertificateCache, socket_path: Path
) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(socket_path))
    stale.close()  # the file stays; nobody listens
    server = SignerServer(signer, cache, socket_path)
    server.start()
    try:
        assert_still_serving(server, socket_path, "fresh.example.com")
    finally:
        server.stop()


# -- privilege separation ---------------------------------------------------------------------


def _unprivileged_worker(
    socket_path: Path, cache_path: Path, ca_key: Path, uid: int, gid: int, results: Any
) -> None:
    """A worker as the supervisor will run it: another user, the socket path and the cache."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    report: dict[str, Any] = {}
    try:
        ca_key.read_bytes()
    except PermissionError:
        report["ca_key"] = "unreadable"
    else:
        report["ca_key"] = "READABLE"
    cache = SharedCertificateCache.open_reader(cache_path)
    req = leaf_request("worker.example.com")
    key = cache_key(req, FINGERPRINT)
    report["cached_before"] = cache.get(key)
    der = asyncio.run(SignerClient(socket_path).sign(req, key))
    report["names"] = san_dns_names(der)
    report["cached_after"] = cache.get(key) == der
    results.put(report)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_a_worker_of_another_user_mints_through_the_socket_and_cannot_read_the_ca_key(
    ca: LoadedCA, signer: LeafSigner
) -> None:
    nobody = pwd.getpwnam("nobody")
    # The runtime directory must be reachable by the worker; the state dir stays root's.
    run_dir = Path(tempfile.mkdtemp(prefix="tlsgate-run-", dir="/dev/shm"))
    try:
        os.chmod(run_dir, 0o711)
        socket_path = run_dir / "signer.sock"
        with SharedCertificateCache(run_dir / "certcache", reader_gid=nobody.pw_gid) as cache:
            server = SignerServer(signer, cache, socket_path, owner_uid=nobody.pw_uid)
            server.start()
            try:
                st = os.lstat(socket_path)
                assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (nobody.pw_uid, 0o600)
                results = SPAWN.Queue()
                ca_key = ca_key_path(ca.cert_path.parent.parent)
                assert ca_key.is_file()
                args = (socket_path, run_dir / "certcache", ca_key, nobody.pw_uid,
                        nobody.pw_gid, results)  # fmt: skip
                worker = SPAWN.Process(target=_unprivileged_worker, args=args)
                worker.start()
                report = results.get(timeout=PROCESS_TIMEOUT)
                worker.join(PROCESS_TIMEOUT)
            finally:
                server.stop()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    assert worker.exitcode == 0
    assert report == {
        "ca_key": "unreadable",
        "cached_before": None,
        "names": ["worker.example.com"],
        "cached_after": True,
    }
    assert signer.signatures == 1


def test_start_returns_at_once_and_stop_ends_the_service_thread(
    signer: LeafSigner, cache: SharedCertificateCache, socket_path: Path
) -> None:
    server = SignerServer(signer, cache, socket_path)
    server.start()
    assert server.running
    assert_still_serving(server, socket_path, "thread.example")
    server.stop()
    server.stop()
    assert not server.running
    assert server.failure is None


def test_a_closed_client_refuses_to_sign(server: SignerServer, socket_path: Path) -> None:
    client = SignerClient(socket_path)
    client.close()
    req = leaf_request("closed.example")
    with pytest.raises(SignerUnavailable, match="was closed"):
        asyncio.run(client.sign(req, cache_key(req, FINGERPRINT)))
    with pytest.raises(SignerUnavailable, match="was closed"):
        client.sign_blocking(req, cache_key(req, FINGERPRINT))
