"""The few raw ``bpf()`` system calls tlsgate's steering needs, through ctypes.

Rules of this module:

- It never imports bcc (workers import it; bcc costs ~130 MiB of RSS per process).
- Every function is one system call (or one read of ``/proc``) and raises :class:`OSError`
  with the kernel's errno on failure; callers add the action and the object to the message.
- Keys and values are fixed-width little-endian integers packed with precomputed
  :class:`struct.Struct` objects; nothing here is on a per-connection path.
- File descriptors returned by :func:`map_create` are close-on-exec (the kernel always sets
  ``O_CLOEXEC`` on bpf fds); pass them on explicitly (fork, ``SCM_RIGHTS``, ``pass_fds``).
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from dataclasses import dataclass
from pathlib import Path

# bpf(2) commands (include/uapi/linux/bpf.h, enum bpf_cmd).
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_OBJ_GET_INFO_BY_FD = 15

# Map types (enum bpf_map_type).
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_REUSEPORT_SOCKARRAY = 20

# Map flags.
BPF_F_MMAPABLE = 1 << 10

# Update flags.
BPF_ANY = 0

# Program types and expected attach types.
BPF_PROG_TYPE_SK_REUSEPORT = 21
BPF_SK_REUSEPORT_SELECT = 39
BPF_SK_REUSEPORT_SELECT_OR_MIGRATE = 40

# Socket options (include/uapi/asm-generic/socket.h).
SO_ATTACH_REUSEPORT_EBPF = 52
SO_DETACH_REUSEPORT_BPF = 68

BPF_OBJ_NAME_LEN = 16

# The bpf() system call number per machine (arch/*/entry/syscalls).
_SYSCALL_NUMBERS = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}

U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")

POSSIBLE_CPUS_FILE = Path("/sys/devices/system/cpu/possible")


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    ]


class _MapElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class _ProgInfo(ctypes.Structure):
    """The head of ``struct bpf_prog_info`` (the kernel fills what fits)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    ]


class _MapInfo(ctypes.Structure):
    """The head of ``struct bpf_map_info``."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    ]


@dataclass(frozen=True, slots=True)
class ProgInfo:
    """What the kernel reports about a loaded program."""

    id: int
    type: int
    name: str


@dataclass(frozen=True, slots=True)
class MapInfo:
    """What the kernel reports about a map (from ``bpf()`` or ``/proc/self/fdinfo``)."""

    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]
_NR_BPF = _SYSCALL_NUMBERS.get(platform.machine())


def bpf(cmd: int, attr: ctypes.Structure) -> int:
    """``bpf(cmd, &attr, sizeof attr)``; the result, or :class:`OSError` with errno."""
    if _NR_BPF is None:
        raise OSError(38, f"no bpf() system call number known for machine {platform.machine()}")
    result = int(_syscall(_NR_BPF, cmd, ctypes.addressof(attr), ctypes.sizeof(attr)))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def map_create(
    map_type: int,
    key_size: int,
    value_size: int,
    max_entries: int,
    flags: int = 0,
    name: str = "",
) -> int:
    """Create a map; returns its (close-on-exec) fd. ``name``: at most 15 of ``[A-Za-z0-9_.]``."""
    attr = _MapCreateAttr(
        map_type=map_type,
        key_size=key_size,
        value_size=value_size,
        max_entries=max_entries,
        map_flags=flags,
        map_name=name.encode("ascii")[: BPF_OBJ_NAME_LEN - 1],
    )
    return bpf(BPF_MAP_CREATE, attr)


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """Set ``key`` to ``value`` (raw bytes of the map's key and value sizes)."""
    key_buf = ctypes.create_string_buffer(key, len(key))
    value_buf = ctypes.create_string_buffer(value, len(value))
    attr = _MapElemAttr(
        map_fd=fd,
        key=ctypes.addressof(key_buf),
        value=ctypes.addressof(value_buf),
        flags=flags,
    )
    bpf(BPF_MAP_UPDATE_ELEM, attr)


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes:
    """The value at ``key`` (``value_size`` bytes: for per-CPU maps, all CPUs' values)."""
    key_buf = ctypes.create_string_buffer(key, len(key))
    value_buf = ctypes.create_string_buffer(value_size)
    attr = _MapElemAttr(map_fd=fd, key=ctypes.addressof(key_buf), value=ctypes.addressof(value_buf))
    bpf(BPF_MAP_LOOKUP_ELEM, attr)
    return value_buf.raw


def map_delete(fd: int, key: bytes) -> None:
    """Delete ``key`` (``ENOENT`` if it holds nothing)."""
    key_buf = ctypes.create_string_buffer(key, len(key))
    attr = _MapElemAttr(map_fd=fd, key=ctypes.addressof(key_buf))
    bpf(BPF_MAP_DELETE_ELEM, attr)


def prog_info(fd: int) -> ProgInfo:
    """Id, type and name of the program behind ``fd``."""
    info = _ProgInfo()
    bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(fd, ctypes.sizeof(info), ctypes.addressof(info)))
    return ProgInfo(id=info.id, type=info.type, name=info.name.decode("ascii", "replace"))


def map_info(fd: int) -> MapInfo:
    """Id, type, sizes and flags of the map behind ``fd``."""
    info = _MapInfo()
    bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(fd, ctypes.sizeof(info), ctypes.addressof(info)))
    return MapInfo(
        id=info.id,
        type=info.type,
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        flags=info.map_flags,
    )


def map_info_from_proc(fd: int) -> MapInfo | None:
    """The map behind ``fd`` as ``/proc/self/fdinfo`` shows it — no ``bpf()`` call, so it
    works after a worker dropped its privileges. ``None`` if ``fd`` is not a bpf map;
    :class:`OSError` if ``fd`` is not open."""
    fields: dict[str, str] = {}
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    try:
        return MapInfo(
            id=int(fields["map_id"]),
            type=int(fields["map_type"]),
            key_size=int(fields["key_size"]),
            value_size=int(fields["value_size"]),
            max_entries=int(fields["max_entries"]),
            flags=int(fields["map_flags"], 16),
        )
    except (KeyError, ValueError):
        return None


def possible_cpus() -> int:
    """How many values a per-CPU map lookup returns: the number of possible CPUs, from
    ``/sys/devices/system/cpu/possible`` (``0-3``, ``0,2-5``...), as the kernel counts them."""
    text = POSSIBLE_CPUS_FILE.read_text(encoding="ascii").strip()
    count = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count
