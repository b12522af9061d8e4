"""eBPF steering of new connections across the workers' SO_REUSEPORT listening sockets.

Who does what:

- The supervisor (root, before it starts workers) calls :func:`availability`, then
  :meth:`Steering.load`, puts worker k's listening socket in slot k with
  :meth:`Steering.set_slot`, and :meth:`Steering.attach`-es the program to the reuseport
  group. To replace worker k it puts the new socket in slot k first and closes the old one
  only then: with ``migrate=True`` (attach type ``BPF_SK_REUSEPORT_SELECT_OR_MIGRATE``) the
  connections queued on the old socket move to live slots instead of being reset.
- A worker publishes its active-connection count with a :class:`LoadPublisher` over the
  load array's fd (:attr:`Steering.load_fd`): one memory store into an mmap-ed BPF array,
  no system call per connection. This module imports bcc only inside
  :meth:`Steering.load`, so workers that import it for :class:`LoadPublisher` stay small
  (bcc costs ~120 MiB of RSS that is never given back).

Contract:

- The program (``steering.c``) never refuses a connection: when no slot can take one, the
  kernel's reuseport hash decides, and that is counted (``fallback``).
- :meth:`Steering.close` detaches the program and releases every fd; it is idempotent and
  runs on every exit path of a ``with`` block. In a forked child it only closes the
  child's copies of the fds: a child never detaches the supervisor's program.
- Errors are :class:`SteeringError` (an :class:`~tlsgate.errors.OperatorError`) naming the
  action and the object, e.g. ``attach steering program to the reuseport group of
  127.0.0.1:8080: EPERM ...``; :class:`SteeringUnavailable` when this host cannot run eBPF
  steering at all (the supervisor then announces the kernel-hash fallback).
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import mmap
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict

from tlsgate.bpf import sysbpf
from tlsgate.errors import OperatorError

MAX_SLOTS = 1024  # steering.c MAX_SLOTS must match
POLICIES = {"least-loaded": 0, "hash": 1}  # name -> steering.c POLICY
#: Outcome counters, in the order of ``enum outcome`` in steering.c.
OUTCOMES = ("hit", "second_choice", "scan", "empty_slot", "select_error", "fallback", "migrate")

PROGRAM_SOURCE = Path(__file__).with_name("steering.c")
PROGRAM_NAME = "tlsgate_steer"
SOCKS_MAP_NAME = "tlsgate_socks"
LOAD_MAP_NAME = "tlsgate_load"
SELECTED_MAP_NAME = "tlsgate_selected"
OUTCOMES_MAP_NAME = "tlsgate_outcomes"

KERNEL_MODULES_DIR = Path("/lib/modules")
KHEADERS_ARCHIVE = Path("/sys/kernel/kheaders.tar.xz")

LOAD_VALUE_SIZE = 8  # u64 active connections per slot
COUNTER_SIZE = 8  # u64 per CPU

_U32 = sysbpf.U32
_U64 = sysbpf.U64
_SLOT_KEYS = tuple(_U32.pack(k) for k in range(MAX_SLOTS))


class SteeringError(OperatorError):
    """Setting up or changing eBPF steering failed; the message names action and object."""


class SteeringUnavailable(SteeringError):
    """This host cannot run eBPF steering (privileges, kernel headers, bcc)."""


class SteeringCounters(TypedDict):
    """What the program counted since it was loaded, summed over CPUs.

    Every run ends in exactly one of ``hit``, ``second_choice``, ``scan`` or ``fallback``;
    ``empty_slot`` and ``select_error`` count slots tried on the way; ``migrate`` counts
    the runs that placed a connection of a closing listener (also counted where it went).
    """

    selected: list[int]  # per slot: connections placed on its socket (new and migrated)
    hit: int
    second_choice: int
    scan: int
    empty_slot: int
    select_error: int
    fallback: int
    migrate: int


def _errno_text(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "error")
    return f"{name} ({exc.strerror})"


def _describe(sock: socket.socket) -> str:
    """``127.0.0.1:8080 (fd 7)`` for messages; never raises."""
    try:
        host, port = sock.getsockname()[:2]
        return f"{host}:{port} (fd {sock.fileno()})"
    except OSError:
        return f"fd {sock.fileno()}"


def kernel_headers_dir() -> Path:
    """Where bcc 0.26 looks for kernel headers (its ``loader.cc``): ``$BCC_KERNEL_SOURCE``,
    else ``/lib/modules/<release>/source`` when both ``build`` and ``source`` exist there,
    else ``/lib/modules/<release>/build`` (or ``$BCC_KERNEL_MODULES_SUFFIX``)."""
    from_env = os.environ.get("BCC_KERNEL_SOURCE")
    if from_env:
        return Path(from_env)
    kdir = KERNEL_MODULES_DIR / os.uname().release
    if (kdir / "build").is_dir() and (kdir / "source").is_dir():
        return kdir / "source"
    return kdir / os.environ.get("BCC_KERNEL_MODULES_SUFFIX", "build")


def availability() -> tuple[bool, str]:
    """Can eBPF steering work in this process? ``(True, "")`` or ``(False, reason)`` where
    ``reason`` is one line saying what is missing and what to do.

    Checks, cheapest first, without importing bcc: the kernel lets this process create the
    socket array (``bpf()`` exists, CAP_BPF or root), bcc will find kernel headers, and the
    bcc Python module is importable."""
    try:
        probe = sysbpf.map_create(sysbpf.BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, 1)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            return False, (
                f"the kernel refused to create a BPF map ({_errno_text(exc)}): "
                "run tlsgate as root or grant it CAP_BPF"
            )
        return False, f"this kernel cannot create a REUSEPORT_SOCKARRAY map: {_errno_text(exc)}"
    os.close(probe)
    headers = kernel_headers_dir()
    if not (headers / "include/linux/kconfig.h").is_file() and not KHEADERS_ARCHIVE.is_file():
        return False, (
            f"no kernel headers at {headers} (bcc compiles the program against them): "
            "install them (linux-headers-amd64 on Debian) and link them there, "
            "or point BCC_KERNEL_SOURCE at them"
        )
    if importlib.util.find_spec("bcc") is None:
        return False, "the bcc Python module is not importable: install python3-bpfcc"
    return True, ""


class Steering:
    """The loaded steering program and its maps (supervisor side). See the module doc."""

    def __init__(
        self,
        *,
        n_slots: int,
        policy: str,
        migrate: bool,
        prog_fd: int,
        socks_fd: int,
        load_fd: int,
        selected_fd: int,
        outcomes_fd: int,
    ) -> None:
        self.n_slots = n_slots
        self.policy = policy
        self.migrate = migrate
        self.prog_fd = prog_fd
        self.prog_id = sysbpf.prog_info(prog_fd).id
        self._socks_fd = socks_fd
        self._load_fd = load_fd
        self._selected_fd = selected_fd
        self._outcomes_fd = outcomes_fd
        self._owner_pid = os.getpid()
        self._closed = False
        self._attached: socket.socket | None = None
        self._slots: dict[int, socket.socket] = {}
        self._loads: mmap.mmap | None = None
        self._percpu_size = sysbpf.possible_cpus() * COUNTER_SIZE

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, n_slots: int, policy: str = "least-loaded", migrate: bool = True) -> Steering:
        """Create the maps, compile ``steering.c`` with bcc and load it into the kernel.

        ``n_slots``: workers (1..MAX_SLOTS); ``policy``: ``least-loaded`` or ``hash``;
        ``migrate``: move a closed listener's queued connections to live slots.
        Costs ~0.3 s and leaves the calling process ~120 MiB larger (bcc + LLVM), for good."""
        if not 1 <= n_slots <= MAX_SLOTS:
            raise SteeringError(
                f"load steering program for {n_slots} workers: the number of workers must be "
                f"between 1 and {MAX_SLOTS}"
            )
        if policy not in POLICIES:
            raise SteeringError(
                f"load steering program: unknown policy {policy!r} "
                f"(use one of: {', '.join(POLICIES)})"
            )
        ok, reason = availability()
        if not ok:
            raise SteeringUnavailable(reason)

        fds: list[int] = []
        try:
            specs = (
                (sysbpf.BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, n_slots, 0, SOCKS_MAP_NAME),
                (sysbpf.BPF_MAP_TYPE_ARRAY, n_slots, sysbpf.BPF_F_MMAPABLE, LOAD_MAP_NAME),
                (sysbpf.BPF_MAP_TYPE_PERCPU_ARRAY, n_slots, 0, SELECTED_MAP_NAME),
                (sysbpf.BPF_MAP_TYPE_PERCPU_ARRAY, len(OUTCOMES), 0, OUTCOMES_MAP_NAME),
            )
            for map_type, entries, flags, name in specs:
                try:
                    fds.append(sysbpf.map_create(map_type, 4, 8, entries, flags, name))
                except OSError as exc:
                    raise SteeringError(
                        f"create BPF map {name} ({entries} entries): {_errno_text(exc)}"
                    ) from exc
            socks_fd, load_fd, selected_fd, outcomes_fd = fds
            prog_fd = _compile_and_load(
                n_slots=n_slots,
                policy=policy,
                migrate=migrate,
                cflags=[
                    f"-DN_SLOTS={n_slots}",
                    f"-DPOLICY={POLICIES[policy]}",
                    f"-DSOCKS_FD={socks_fd}",
                    f"-DLOAD_FD={load_fd}",
                    f"-DSELECTED_FD={selected_fd}",
                    f"-DOUTCOMES_FD={outcomes_fd}",
                ],
            )
            fds.append(prog_fd)
            return cls(
                n_slots=n_slots,
                policy=policy,
                migrate=migrate,
                prog_fd=prog_fd,
                socks_fd=socks_fd,
                load_fd=load_fd,
                selected_fd=selected_fd,
                outcomes_fd=outcomes_fd,
            )
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    # -- the socket array -----------------------------------------------------------------
    def set_slot(self, slot: int, sock: socket.socket) -> None:
        """Put ``sock`` (listening, SO_REUSEPORT, in the group) in ``slot``, replacing what
        was there: new connections for that slot go to ``sock`` from now on."""
        self._check_open()
        self._check_slot(slot, "set")
        if self._slots.get(slot) is sock and sock.fileno() != -1:
            return  # already there (the kernel would refuse it as busy)
        value = _U64.pack(sock.fileno())
        try:
            sysbpf.map_update(self._socks_fd, _SLOT_KEYS[slot], value)
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EINVAL:
                hint = ": it must be a listening TCP socket with SO_REUSEPORT"
            elif exc.errno == errno.EBUSY:
                other = [k for k, held in self._slots.items() if held is sock]
                hint = (
                    f": it is in steering slot {other[0]}; clear that slot first"
                    if other
                    else ": it is already in another BPF socket array"
                )
            raise SteeringError(
                f"put socket {_describe(sock)} in steering slot {slot}: {_errno_text(exc)}{hint}"
            ) from exc
        self._slots[slot] = sock

    def clear_slot(self, slot: int) -> None:
        """Empty ``slot``: new connections avoid its worker (already queued ones stay)."""
        self._check_open()
        self._check_slot(slot, "clear")
        try:
            sysbpf.map_delete(self._socks_fd, _SLOT_KEYS[slot])
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: already empty, which is what we want
                raise SteeringError(f"clear steering slot {slot}: {_errno_text(exc)}") from exc
        self._slots.pop(slot, None)

    # -- attaching ------------------------------------------------------------------------
    def attach(self, sock: socket.socket) -> None:
        """Attach the program to the reuseport group ``sock`` belongs to (any member will
        do); it replaces whatever program the group had."""
        self._check_open()
        try:
            sock.setsockopt(socket.SOL_SOCKET, sysbpf.SO_ATTACH_REUSEPORT_EBPF, self.prog_fd)
        except OSError as exc:
            raise SteeringError(
                f"attach steering program {self.prog_id} to the reuseport group of "
                f"{_describe(sock)}: {_errno_text(exc)}"
            ) from exc
        self._attached = sock

    def detach(self) -> None:
        """Detach the program from the group: the kernel hash steers again. Done through a
        socket of the group still open in this process; a no-op when none is (the program
        then lives exactly as long as the group)."""
        group = self._group_sockets()
        if group:
            sock = group[0]
            try:
                sock.setsockopt(socket.SOL_SOCKET, sysbpf.SO_DETACH_REUSEPORT_BPF, 0)
            except OSError as exc:
                if exc.errno != errno.ENOENT:  # ENOENT: no program attached, nothing to do
                    raise SteeringError(
                        f"detach steering program {self.prog_id} from the reuseport group "
                        f"of {_describe(sock)}: {_errno_text(exc)}"
                    ) from exc
        self._attached = None

    # -- observing ------------------------------------------------------------------------
    @property
    def load_fd(self) -> int:
        """The fd of the load array, for :class:`LoadPublisher` in the workers (close-on-exec:
        a worker gets it by fork, ``SCM_RIGHTS`` or ``pass_fds``)."""
        self._check_open()
        return self._load_fd

    @property
    def map_ids(self) -> tuple[int, ...]:
        """Kernel ids of the socket, load, selected and outcomes maps (for ``bpftool``)."""
        self._check_open()
        fds = (self._socks_fd, self._load_fd, self._selected_fd, self._outcomes_fd)
        return tuple(sysbpf.map_info(fd).id for fd in fds)

    def counters(self) -> SteeringCounters:
        """Per-slot selections and every outcome, summed over CPUs."""
        self._check_open()
        selected = [self._percpu_sum(self._selected_fd, k) for k in range(self.n_slots)]
        outcomes = {name: self._percpu_sum(self._outcomes_fd, i) for i, name in enumerate(OUTCOMES)}
        return SteeringCounters(
            selected=selected,
            hit=outcomes["hit"],
            second_choice=outcomes["second_choice"],
            scan=outcomes["scan"],
            empty_slot=outcomes["empty_slot"],
            select_error=outcomes["select_error"],
            fallback=outcomes["fallback"],
            migrate=outcomes["migrate"],
        )

    def published_loads(self) -> list[int]:
        """The active-connection counts the workers published, per slot."""
        self._check_open()
        if self._loads is None:
            size = -(-self.n_slots * LOAD_VALUE_SIZE // mmap.PAGESIZE) * mmap.PAGESIZE
            try:
                self._loads = mmap.mmap(self._load_fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            except OSError as exc:
                raise SteeringError(
                    f"map the steering load array (map fd {self._load_fd}): {_errno_text(exc)}"
                ) from exc
        return [_U64.unpack_from(self._loads, k * LOAD_VALUE_SIZE)[0] for k in range(self.n_slots)]

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Detach (only in the process that loaded it) and close every fd. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if os.getpid() == self._owner_pid:
                self.detach()
        finally:
            if self._loads is not None:
                self._loads.close()
                self._loads = None
            for fd in (
                self.prog_fd,
                self._socks_fd,
                self._load_fd,
                self._selected_fd,
                self._outcomes_fd,
            ):
                os.close(fd)
            self._slots.clear()

    def __enter__(self) -> Steering:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- helpers --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise SteeringError(f"steering program {self.prog_id} was closed; load it again")

    def _check_slot(self, slot: int, action: str) -> None:
        if not 0 <= slot < self.n_slots:
            raise SteeringError(f"{action} steering slot {slot}: slots are 0..{self.n_slots - 1}")

    def _group_sockets(self) -> list[socket.socket]:
        """Sockets of the group still open here, the attach socket first."""
        candidates = [self._attached, *self._slots.values()]
        return [s for s in candidates if s is not None and s.fileno() != -1]

    def _percpu_sum(self, fd: int, key: int) -> int:
        raw = sysbpf.map_lookup(fd, _SLOT_KEYS[key], self._percpu_size)
        return sum(value for (value,) in _U64.iter_unpack(raw))


def _compile_and_load(*, n_slots: int, policy: str, migrate: bool, cflags: list[str]) -> int:
    """Compile ``steering.c`` with bcc and load it; returns the program fd (ours: bcc's
    module and its own fd are released before returning)."""
    what = f"steering program ({policy}, {n_slots} workers)"
    try:
        bcc = importlib.import_module("bcc")
    except (ImportError, OSError) as exc:
        raise SteeringUnavailable(f"import bcc to compile the {what}: {exc}") from exc
    try:
        text = PROGRAM_SOURCE.read_bytes()
    except OSError as exc:
        raise SteeringError(f"read {PROGRAM_SOURCE}: {_errno_text(exc)}") from exc
    module: Any
    try:
        module = bcc.BPF(text=text, cflags=cflags)
    except Exception as exc:  # bcc raises bare Exception; clang's diagnostics went to stderr
        raise SteeringError(
            f"compile {PROGRAM_SOURCE} with bcc for the {what}: {exc} (compiler output above)"
        ) from exc
    attach_type = (
        sysbpf.BPF_SK_REUSEPORT_SELECT_OR_MIGRATE if migrate else sysbpf.BPF_SK_REUSEPORT_SELECT
    )
    try:
        function = module.load_func(
            PROGRAM_NAME.encode(), sysbpf.BPF_PROG_TYPE_SK_REUSEPORT, attach_type=attach_type
        )
        return os.dup(function.fd)
    except Exception as exc:  # bcc raises bare Exception; the verifier log went to stderr
        raise SteeringError(
            f"load the {what} into the kernel: {exc} (verifier output above)"
        ) from exc
    finally:
        module.cleanup()


class LoadPublisher:
    """A worker's side of least-loaded steering: ``publish(active)`` stores its
    active-connection count in its slot of the load array — one aligned 8-byte memory write
    into a shared mapping, no system call. Imports nothing from bcc; the fd is checked
    through ``/proc/self/fdinfo``, so it also works after the worker dropped root."""

    __slots__ = ("_index", "_map", "_view", "slot")

    def __init__(self, load_fd: int, slot: int) -> None:
        action = f"publish the load of worker {slot} through fd {load_fd}"
        try:
            info = sysbpf.map_info_from_proc(load_fd)
        except OSError as exc:
            raise SteeringError(
                f"{action}: the fd is not open in this process ({_errno_text(exc)}); "
                "pass the supervisor's Steering.load_fd to the worker"
            ) from exc
        if (
            info is None
            or info.type != sysbpf.BPF_MAP_TYPE_ARRAY
            or info.value_size != LOAD_VALUE_SIZE
            or not info.flags & sysbpf.BPF_F_MMAPABLE
        ):
            raise SteeringError(f"{action}: the fd is not the steering load array")
        if not 0 <= slot < info.max_entries:
            raise SteeringError(f"{action}: slots are 0..{info.max_entries - 1}")
        offset = slot * LOAD_VALUE_SIZE
        page_start = offset - offset % mmap.PAGESIZE
        try:
            self._map = mmap.mmap(
                load_fd,
                mmap.PAGESIZE,
                mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE,
                offset=page_start,
            )
        except OSError as exc:
            raise SteeringError(f"{action}: mmap the load array: {_errno_text(exc)}") from exc
        self._view = memoryview(self._map).cast("Q")
        self._index = (offset - page_start) // LOAD_VALUE_SIZE
        self.slot = slot

    def publish(self, active: int) -> None:
        """This worker now has ``active`` connections (0 <= active < 2**64)."""
        self._view[self._index] = active

    def close(self) -> None:
        """Unmap; idempotent. The published value stays (the supervisor clears the slot)."""
        if not self._map.closed:
            self._view.release()
            self._map.close()

    def __enter__(self) -> LoadPublisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
