"""eBPF steering with the real program, real sockets on 127.0.0.1:0 and real counters.

Each test builds its own SO_REUSEPORT group of listening sockets (slot k = socket k),
loads the program, and counts what every socket accepted. Connections are left in the
accept queues and drained afterwards, so which socket got a connection is decided by the
program alone.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tlsgate.bpf import steering as steering_module
from tlsgate.bpf import sysbpf
from tlsgate.bpf.steering import (
    MAX_SLOTS,
    OUTCOMES,
    PROGRAM_SOURCE,
    LoadPublisher,
    Steering,
    SteeringError,
    SteeringUnavailable,
    availability,
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="eBPF steering tests need root (CAP_BPF) to load programs"
)

CONNECTIONS = 400
BACKLOG = 4096
TIMEOUT = 10.0
TCP_MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


# -- helpers ---------------------------------------------------------------------------------
class Group:
    """Listening sockets sharing one 127.0.0.1 port with SO_REUSEPORT; all closed at the end."""

    def __init__(self) -> None:
        self.port = 0
        self.owned: list[socket.socket] = []

    def listener(self, port: int | None = None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.owned.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", self.port if port is None else port))
        if port is None and self.port == 0:
            self.port = sock.getsockname()[1]
        sock.listen(BACKLOG)
        sock.setblocking(False)
        return sock

    def listeners(self, n: int) -> list[socket.socket]:
        return [self.listener() for _ in range(n)]

    def connect(self, n: int) -> list[socket.socket]:
        clients = []
        for _ in range(n):
            client = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
            self.owned.append(client)
            clients.append(client)
        return clients

    def close(self) -> None:
        for sock in self.owned:
            sock.close()


@pytest.fixture
def group() -> Iterator[Group]:
    g = Group()
    try:
        yield g
    finally:
        g.close()


@pytest.fixture
def loaded() -> Iterator[Callable[..., Steering]]:
    """``loaded(n, policy=..., migrate=...)``: a Steering closed at the end of the test."""
    made: list[Steering] = []

    def load(n_slots: int, policy: str = "least-loaded", migrate: bool = True) -> Steering:
        steering = Steering.load(n_slots, policy=policy, migrate=migrate)
        made.append(steering)
        return steering

    try:
        yield load
    finally:
        for steering in made:
            steering.close()


def steered(
    load: Callable[..., Steering], group: Group, n: int, **kwargs: object
) -> tuple[Steering, list[socket.socket]]:
    """n listeners in slots 0..n-1 with the program attached."""
    socks = group.listeners(n)
    steering = load(n, **kwargs)
    for k, sock in enumerate(socks):
        steering.set_slot(k, sock)
    steering.attach(socks[0])
    return steering, socks


def drain(listeners: list[socket.socket], expected: int, timeout: float = TIMEOUT) -> list[int]:
    """Accept until ``expected`` connections came in (or the deadline); per-listener counts."""
    counts = [0] * len(listeners)
    deadline = time.monotonic() + timeout
    while sum(counts) < expected and time.monotonic() < deadline:
        ready, _, _ = select.select(listeners, [], [], 0.05)
        for sock in ready:
            counts[listeners.index(sock)] += _accept_all(sock)
    for k, sock in enumerate(listeners):  # nothing more may be waiting
        counts[k] += _accept_all(sock)
    return counts


def _accept_all(sock: socket.socket) -> int:
    n = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    """Poll ``predicate`` until it holds (kernel objects are freed after an RCU grace)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def bpftool_shows(kind: str, object_id: int) -> bool:
    result = subprocess.run(
        ["bpftool", kind, "show", "id", str(object_id)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    return result.returncode == 0


# -- steering -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n_slots", "policy"), [(2, "least-loaded"), (4, "least-loaded"), (4, "hash")]
)
def test_every_slot_accepts_connections_and_the_counters_equal_what_each_socket_accepted(
    loaded: Callable[..., Steering], group: Group, n_slots: int, policy: str
) -> None:
    steering, socks = steered(loaded, group, n_slots, policy=policy)
    group.connect(CONNECTIONS)
    accepted = drain(socks, CONNECTIONS)
    counters = steering.counters()
    assert sum(accepted) == CONNECTIONS
    assert all(n > 0 for n in accepted), accepted
    assert counters["selected"] == accepted
    assert counters["hit"] == CONNECTIONS
    assert counters["fallback"] == counters["empty_slot"] == counters["select_error"] == 0


def test_least_loaded_sends_nothing_to_a_worker_that_published_a_high_load(
    loaded: Callable[..., Steering], group: Group
) -> None:
    steering, socks = steered(loaded, group, 4)
    with LoadPublisher(steering.load_fd, 0) as busy:
        busy.publish(1000)
        assert steering.published_loads() == [1000, 0, 0, 0]
        group.connect(CONNECTIONS)
        accepted = drain(socks, CONNECTIONS)
    # The two candidates are distinct slots, so the busy one always loses the comparison.
    assert accepted[0] == 0, accepted
    assert all(n > 0 for n in accepted[1:]), accepted
    assert steering.counters()["selected"] == accepted


def test_cleared_slots_get_no_new_connection_and_set_slot_swaps_in_a_new_socket(
    loaded: Callable[..., Steering], group: Group
) -> None:
    steering, socks = steered(loaded, group, 4)
    steering.clear_slot(1)
    steering.clear_slot(3)
    steering.clear_slot(3)  # clearing an empty slot is fine
    group.connect(CONNECTIONS)
    accepted = drain(socks, CONNECTIONS)
    assert accepted[1] == accepted[3] == 0, accepted
    counters = steering.counters()
    assert counters["second_choice"] > 0  # one candidate was empty
    assert counters["scan"] > 0  # both were (1 in 6 connections)
    assert counters["fallback"] == 0

    new = group.listener()
    steering.set_slot(1, new)
    group.connect(CONNECTIONS)
    accepted = drain([*socks, new], CONNECTIONS)
    assert accepted[1] == 0, accepted  # the old socket is still listening, but not steered to
    assert accepted[4] > 0, accepted


def test_hash_policy_sends_every_connection_of_a_flow_to_the_same_slot(
    loaded: Callable[..., Steering], group: Group
) -> None:
    steering, socks = steered(loaded, group, 4, policy="hash")
    slots_of: dict[int, set[int]] = {}
    for _ in range(20):
        source_port = 0
        for _ in range(3):  # the same 4-tuple three times: reset, then reconnect
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            try:
                client.bind(("127.0.0.1", source_port))
                source_port = client.getsockname()[1]
                client.settimeout(TIMEOUT)
                client.connect(("127.0.0.1", group.port))
            finally:
                client.close()  # RST: no TIME_WAIT keeps the 4-tuple busy
            accepted = drain(socks, 1)
            slots_of.setdefault(source_port, set()).add(accepted.index(1))
    assert all(len(slots) == 1 for slots in slots_of.values()), slots_of
    assert len(set().union(*slots_of.values())) > 1
    assert steering.counters()["hit"] == 60


def test_hash_policy_moves_on_to_the_next_slot_when_the_hashed_one_is_empty(
    loaded: Callable[..., Steering], group: Group
) -> None:
    steering, socks = steered(loaded, group, 4, policy="hash")
    steering.clear_slot(2)
    group.connect(CONNECTIONS)
    accepted = drain(socks, CONNECTIONS)
    counters = steering.counters()
    assert accepted[2] == 0, accepted
    assert counters["scan"] == counters["empty_slot"] > 0
    assert counters["selected"] == accepted


def test_with_every_slot_empty_the_kernel_hash_still_serves_the_clients(
    loaded: Callable[..., Steering], group: Group
) -> None:
    steering, socks = steered(loaded, group, 2)
    steering.clear_slot(0)
    steering.clear_slot(1)
    group.connect(100)
    accepted = drain(socks, 100)
    counters = steering.counters()
    assert sum(accepted) == 100
    assert counters["fallback"] == 100
    assert counters["selected"] == [0, 0]


def test_a_slot_holding_a_socket_of_another_group_is_counted_and_skipped(
    loaded: Callable[..., Steering], group: Group
) -> None:
    steering, socks = steered(loaded, group, 2)
    stranger = Group()
    try:
        steering.set_slot(1, stranger.listener())
        group.connect(100)
        accepted = drain(socks, 100)
    finally:
        stranger.close()
    counters = steering.counters()
    assert accepted == [100, 0]
    assert counters["select_error"] > 0
    assert counters["selected"] == [100, 0]


# -- replacing a worker's socket --------------------------------------------------------------
def _migrate_sysctl_off() -> bool:
    return TCP_MIGRATE_REQ.read_text().strip() == "0"


@pytest.mark.parametrize("migrate", [True, False])
def test_connections_queued_on_a_replaced_socket_move_to_live_slots_only_with_migration(
    loaded: Callable[..., Steering], group: Group, migrate: bool
) -> None:
    if not migrate and not _migrate_sysctl_off():
        pytest.skip("net.ipv4.tcp_migrate_req=1 makes the kernel migrate without the program")
    steering, socks = steered(loaded, group, 2, migrate=migrate)
    group.connect(200)
    queued_on_old = steering.counters()["selected"][1]
    assert queued_on_old > 0
    new = group.listener()
    steering.set_slot(1, new)
    socks[1].close()  # swap first, close then: the procedure that measured 0 lost
    # Without migration (the control) the connections queued on the old socket are reset.
    expected = 200 if migrate else 200 - queued_on_old
    accepted = drain([socks[0], new], expected)
    assert sum(accepted) == expected
    assert steering.counters()["migrate"] == (queued_on_old if migrate else 0)


def test_closing_a_socket_still_in_its_slot_migrates_its_queue_to_the_others(
    loaded: Callable[..., Steering], group: Group
) -> None:
    steering, socks = steered(loaded, group, 3)
    group.connect(300)
    queued_on_old = steering.counters()["selected"][1]
    socks[1].close()  # no clear_slot: the kernel empties the slot before migrating
    accepted = drain([socks[0], socks[2]], 300)
    counters = steering.counters()
    assert sum(accepted) == 300
    assert counters["migrate"] == queued_on_old > 0
    assert counters["fallback"] == 0


def test_replacing_a_socket_while_1000_connections_arrive_loses_none(
    loaded: Callable[..., Steering], group: Group
) -> None:
    steering, socks = steered(loaded, group, 4)
    total = 1000
    errors: list[BaseException] = []
    halfway = threading.Event()

    def connect_all() -> None:
        try:
            for i in range(total):
                group.connect(1)
                if i == total // 3:
                    halfway.set()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            halfway.set()

    clients = threading.Thread(target=connect_all)
    clients.start()
    try:
        assert halfway.wait(TIMEOUT)
        new = group.listener()
        steering.set_slot(1, new)
        socks[1].close()
    finally:
        clients.join(TIMEOUT * 3)
    assert not clients.is_alive()
    assert errors == []
    accepted = drain([socks[0], new, socks[2], socks[3]], total)
    assert sum(accepted) == total, accepted
    assert steering.counters()["migrate"] > 0


# -- lifetime -------------------------------------------------------------------------------
def test_bpftool_lists_the_program_and_maps_while_loaded_and_not_after_close(
    group: Group,
) -> None:
    socks = group.listeners(2)
    with Steering.load(2) as steering:
        for k, sock in enumerate(socks):
            steering.set_slot(k, sock)
        steering.attach(socks[0])
        prog_id, map_ids = steering.prog_id, steering.map_ids
        assert bpftool_shows("prog", prog_id)
        assert all(bpftool_shows("map", map_id) for map_id in map_ids)
    assert steering.closed
    steering.close()  # idempotent
    assert wait_until(lambda: not bpftool_shows("prog", prog_id))
    assert wait_until(lambda: not any(bpftool_shows("map", m) for m in map_ids))


def test_a_with_block_left_by_an_exception_detaches_the_program(group: Group) -> None:
    socks = group.listeners(2)
    with pytest.raises(RuntimeError), Steering.load(2) as steering:
        for k, sock in enumerate(socks):
            steering.set_slot(k, sock)
        steering.attach(socks[0])
        steering.clear_slot(0)
        raise RuntimeError("supervisor failed")
    # Detached: the kernel hash spreads connections over both sockets again.
    group.connect(100)
    accepted = drain(socks, 100)
    assert accepted[0] > 0, accepted


def test_close_in_a_forked_child_leaves_the_parents_program_attached(
    loaded: Callable[..., Steering], group: Group
) -> None:
    steering, socks = steered(loaded, group, 2)
    pid = os.fork()
    if pid == 0:  # the child: like a worker that inherited the supervisor's objects
        code = 1
        try:
            steering.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    steering.clear_slot(0)
    group.connect(100)
    assert drain(socks, 100) == [0, 100]


def test_a_worker_publishes_its_load_through_the_inherited_fd_without_importing_bcc(
    loaded: Callable[..., Steering],
) -> None:
    steering = loaded(4)
    code = (
        "import json, sys\n"
        "from tlsgate.bpf.steering import LoadPublisher\n"
        "with LoadPublisher(int(sys.argv[1]), 2) as publisher:\n"
        "    publisher.publish(7)\n"
        "rss = int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) // 1024\n"
        "print(json.dumps({'bcc': 'bcc' in sys.modules, 'rss_mib': rss}))\n"
    )
    fd = steering.load_fd
    result = subprocess.run(
        [sys.executable, "-c", code, str(fd)],
        pass_fds=(fd,),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["bcc"] is False
    assert report["rss_mib"] < 48
    assert steering.published_loads() == [0, 0, 7, 0]


def test_load_publisher_refuses_an_fd_that_is_not_the_load_array(
    loaded: Callable[..., Steering], tmp_path: Path
) -> None:
    steering = loaded(2)
    with open(tmp_path / "not-a-map", "wb+") as f:
        with pytest.raises(SteeringError, match="not the steering load array"):
            LoadPublisher(f.fileno(), 0)
    with pytest.raises(SteeringError, match="not open in this process"):
        LoadPublisher(1_000_000, 0)
    with pytest.raises(SteeringError, match=r"slots are 0\.\.1"):
        LoadPublisher(steering.load_fd, 2)


# -- errors ---------------------------------------------------------------------------------
def test_bad_arguments_are_refused_with_the_action_and_the_limits(
    loaded: Callable[..., Steering], group: Group
) -> None:
    with pytest.raises(SteeringError, match=f"between 1 and {MAX_SLOTS}"):
        Steering.load(0)
    with pytest.raises(SteeringError, match=f"between 1 and {MAX_SLOTS}"):
        Steering.load(MAX_SLOTS + 1)
    with pytest.raises(SteeringError, match="unknown policy 'random'"):
        Steering.load(2, policy="random")
    steering = loaded(2)
    with pytest.raises(SteeringError, match=r"set steering slot 2: slots are 0\.\.1"):
        steering.set_slot(2, group.listener())


def test_a_socket_that_is_not_listening_cannot_take_a_slot(
    loaded: Callable[..., Steering], group: Group
) -> None:
    steering = loaded(2)
    sock = socket.socket()
    group.owned.append(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    with pytest.raises(
        SteeringError,
        match=rf"put socket 127\.0\.0\.1:{port} \(fd \d+\) in steering slot 1: EINVAL .*listening",
    ):
        steering.set_slot(1, sock)


def test_a_socket_holds_one_slot_only(loaded: Callable[..., Steering], group: Group) -> None:
    steering = loaded(2)
    sock = group.listener()
    steering.set_slot(0, sock)
    steering.set_slot(0, sock)  # already there: nothing to do
    with pytest.raises(SteeringError, match=r"in steering slot 1: EBUSY .*in steering slot 0"):
        steering.set_slot(1, sock)
    steering.clear_slot(0)
    steering.set_slot(1, sock)


def test_attaching_to_a_socket_without_so_reuseport_names_the_socket(
    loaded: Callable[..., Steering], group: Group
) -> None:
    steering = loaded(2)
    sock = socket.socket()
    group.owned.append(sock)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    with pytest.raises(
        SteeringError,
        match=rf"attach steering program \d+ to the reuseport group of 127\.0\.0\.1:{port}.*EINVAL",
    ):
        steering.attach(sock)


def test_a_closed_steering_refuses_further_use(loaded: Callable[..., Steering]) -> None:
    steering = loaded(2)
    steering.close()
    with pytest.raises(SteeringError, match="was closed; load it again"):
        steering.counters()


# -- availability ---------------------------------------------------------------------------
UNAVAILABLE_REPORT = (
    "import json\n"
    "from tlsgate.bpf.steering import Steering, availability\n"
    "ok, reason = availability()\n"
    "try:\n"
    "    Steering.load(2)\n"
    "    error = None\n"
    "except Exception as exc:\n"
    "    error = [type(exc).__name__, str(exc)]\n"
    "print(json.dumps({'ok': ok, 'reason': reason, 'error': error}))\n"
)


def test_availability_is_true_here() -> None:
    assert availability() == (True, "")


def test_without_cap_bpf_availability_says_so_in_one_line_and_load_refuses() -> None:
    report = run_python_without_caps(UNAVAILABLE_REPORT)
    assert report["ok"] is False
    reason = str(report["reason"])
    assert "\n" not in reason
    assert "EPERM" in reason
    assert "CAP_BPF" in reason
    assert report["error"] == ["SteeringUnavailable", reason]


def run_python_without_caps(code: str) -> dict[str, object]:
    """``code`` as root but without CAP_BPF, CAP_SYS_ADMIN and CAP_NET_ADMIN."""
    result = subprocess.run(
        [
            "capsh",
            "--drop=cap_bpf,cap_sys_admin,cap_net_admin",
            "--",
            "-c",
            'exec "$0" -c "$1"',
            sys.executable,
            code,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def test_without_kernel_headers_availability_names_where_it_looked_and_load_refuses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "no-headers"
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(missing))
    ok, reason = availability()
    assert not ok
    assert f"no kernel headers at {missing}" in reason
    assert "\n" not in reason
    with pytest.raises(SteeringUnavailable) as raised:
        Steering.load(2)
    assert str(raised.value) == reason


def test_a_compile_failure_names_the_program_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # Headers vanish between the availability check and the compile.
    monkeypatch.setattr(steering_module, "availability", lambda: (True, ""))
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path / "no-headers"))
    with pytest.raises(SteeringError, match=rf"compile {re.escape(str(PROGRAM_SOURCE))} with bcc"):
        Steering.load(2)
    capfd.readouterr()  # bcc's own complaint about the headers


# -- the C program and this module agree --------------------------------------------------
def test_the_outcome_names_and_max_slots_match_the_c_program() -> None:
    source = PROGRAM_SOURCE.read_text()
    enum = re.search(r"enum outcome \{(.*?)\};", source, re.S)
    assert enum is not None
    names = re.findall(r"OUTCOME_(\w+),", enum.group(1))
    assert tuple(name.lower() for name in names) == OUTCOMES
    max_slots = re.search(r"#define MAX_SLOTS (\d+)", source)
    assert max_slots is not None
    assert int(max_slots.group(1)) == MAX_SLOTS


def test_possible_cpus_counts_every_range(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    possible = tmp_path / "possible"
    possible.write_text("0,2-5,8\n")
    monkeypatch.setattr(sysbpf, "POSSIBLE_CPUS_FILE", possible)
    assert sysbpf.possible_cpus() == 6
