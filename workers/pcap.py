"""Decrypted traffic as PCAP: synthesized TCP/IP frames, rotated files, and PCAP-over-IP.

Rules:

- Content capture is off unless the operator turns it on. What it writes is the plaintext
  of intercepted connections, as sensitive as the traffic itself: files are created mode
  0600, only ever as new files (``O_EXCL``, never through a symlink), and PCAP-over-IP has
  no authentication — bind it to loopback or a management network only.
- :class:`FlowSynthesizer` is sans-I/O. Fed the plaintext of one connection, it returns
  libpcap records (record header, then Ethernet or nothing for ``LINKTYPE_RAW``, IPv4 or
  IPv6, TCP) carrying the real client and server addresses and ports: a three-way
  handshake (with an MSS option), the data of each chunk split at the MSS (1460 bytes over
  IPv4, 1440 over IPv6) with continuous sequence and acknowledgement numbers (modulo
  2**32), PSH on a chunk's last segment, a pure ACK from the receiver after every chunk and
  every :data:`ACK_EVERY_SEGMENTS` segments (so analysers never see a window overrun), and
  a FIN/ACK exchange. IP and TCP checksums are correct. All records of one call share one
  timestamp (the ``ts`` callable, Unix seconds), in microseconds or nanoseconds.
- Addresses: an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) is written as IPv4, a zone
  (``%eth0``) is dropped; a flow whose two ends are of different families is written as
  IPv6 with the IPv4 end mapped. Anything that is not an IP literal raises ``ValueError``.
- Calls follow ``open()``, then any number of ``client_data``/``server_data``, then
  ``close()``; data outside that order raises ``RuntimeError`` (a caller bug), ``close()``
  is idempotent and returns ``b""`` for a flow that was never opened.
- Byte cap: with ``cap`` set, at most ``cap`` payload bytes of the connection (both
  directions together) are written; the rest of the chunk that crosses it and every later
  chunk produce no record at all, but sequence numbers keep counting, so the FIN exchange
  shows analysers the missing bytes (Wireshark "previous segment not captured", Zeek
  ``missed_bytes``). ``truncated``/``truncated_bytes`` report it to the caller.
- Sinks (:class:`PcapFileWriter`, :class:`PcapOverIpServer`) never block the caller (the
  worker's event loop): ``submit(records)`` keeps a reference to the bytes in a bounded
  buffer, or drops them and counts the drop. A submission is kept or dropped whole, so a
  file or stream never holds a partial record. The worker reports ``dropped`` in events.
- :class:`PcapFileWriter`: one thread writes ``<prefix>-<UTC time>-<n>.pcap`` files in
  ``directory``, each starting with the pcap header. A file is closed when the next
  submission would take it past ``rotate_bytes`` (a larger submission gets a file of its
  own) or once it is ``rotate_seconds`` old, even when idle; the next file is opened at the
  next write. At most ``keep`` files of this prefix (the open one included) are kept, the
  oldest deleted first; other files — other prefixes included — are never touched, so
  each worker process writes under its own prefix. A failed write (disk full, quota, I/O
  error) keeps the submissions written whole, cuts the file back to the end of the last
  one, counts the others as dropped, and writing resumes after :data:`RETRY_SECONDS`
  (meanwhile the queue fills and submissions are dropped and counted). ``close()``
  writes what is queued.
- :class:`PcapOverIpServer`: a TCP listener (one thread, one selector). Each client gets
  the pcap header, then every submission made after it connected, from its own buffer of
  at most ``max_client_bytes``; a client that does not keep up loses whole submissions
  (counted), never stalls the caller or the other clients. Bytes a client sends are read
  and discarded; at most ``max_clients`` are served, others are closed at once.
  ``close()`` gives clients :data:`CLOSE_FLUSH_SECONDS` to take what is buffered; one
  that does not may see its stream end inside a record.
- Readers: Wireshark dissects port 443 as TLS, so plaintext HTTP there needs "Decode As"
  (``tshark -d tcp.port==443,http``); Zeek, Suricata and Arkime find HTTP by content.
- Cost: ~47 µs CPU to synthesize a 16 KiB chunk (12 segments and an ACK, both checksums
  of each; see :func:`_sum16`), returned as one ``bytes``; ``submit`` is a lock, an append
  and, when the consumer thread sleeps, a wake-up.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import logging
import os
import random
import re
import selectors
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol

from tlsgate.errors import ConfigError

logger = logging.getLogger(__name__)

#: Link types (``network`` field of the pcap header).
LINKTYPE_ETHERNET: Final = 1
LINKTYPE_RAW: Final = 101
#: Largest record the files declare (every synthesized frame is at most 1514 bytes).
SNAPLEN: Final = 65535
#: Segment payload sizes: a 1500-byte MTU minus IP and TCP headers.
MSS_IPV4: Final = 1460
MSS_IPV6: Final = 1440
#: Receive window every segment advertises (no window scaling).
WINDOW: Final = 65535
#: The receiver acknowledges at least every this many segments (46 KiB < WINDOW).
ACK_EVERY_SEGMENTS: Final = 32
#: Hop limit / TTL of synthesized packets.
TTL: Final = 64
#: Locally administered MAC addresses of the two ends (Ethernet link type).
CLIENT_MAC: Final = bytes.fromhex("020000000001")
SERVER_MAC: Final = bytes.fromhex("020000000002")

#: Bytes of the pcap file header.
PCAP_HEADER_BYTES: Final = 24

#: File writer defaults and bounds.
DEFAULT_ROTATE_BYTES: Final = 100 * 1024 * 1024
DEFAULT_ROTATE_SECONDS: Final = 3600.0
DEFAULT_KEEP: Final = 10
DEFAULT_QUEUE_BYTES: Final = 16 * 1024 * 1024
MIN_ROTATE_BYTES: Final = 4096
#: After a failed write the writer waits this long before writing again.
RETRY_SECONDS: Final = 5.0
#: The writer hands the kernel at most this much, in at most _MAX_IOVEC pieces, per writev().
WRITE_CHUNK_BYTES: Final = 1024 * 1024
#: Longest the writer thread sleeps before re-checking the age of the open file.
MAX_IDLE_WAIT: Final = 1.0
FILE_MODE: Final = 0o600

#: PCAP-over-IP defaults and bounds.
DEFAULT_CLIENT_BYTES: Final = 8 * 1024 * 1024
MAX_CLIENTS: Final = 16
CLOSE_FLUSH_SECONDS: Final = 1.0
#: Buffers handed to one sendmsg() (well below IOV_MAX).
SEND_BATCH: Final = 64
#: Bytes read (and discarded) from a client per readiness event.
CLIENT_READ_BYTES: Final = 4096
LISTEN_BACKLOG: Final = 16

_PREFIX: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MAX_IOVEC: Final = 512
#: File names tried (serial numbers) before opening a new file is given up as failed.
_MAX_NAME_TRIES: Final = 1000
_MAGIC_USEC: Final = 0xA1B2C3D4
_MAGIC_NSEC: Final = 0xA1B23C4D
_FILE_HEADER: Final = struct.Struct("<IHHiIII")
_RECORD: Final = struct.Struct("<IIII")
#: IPv4 + TCP (40 bytes) and IPv6 + TCP (60 bytes) headers, network order.
_IP4_TCP: Final = struct.Struct("!BBHHHBBH4s4sHHIIHHHH")
_IP6_TCP: Final = struct.Struct("!IHBB16s16sHHIIHHHH")
_ETHERTYPE_IPV4: Final = b"\x08\x00"
_ETHERTYPE_IPV6: Final = b"\x86\xdd"
_PROTO_TCP: Final = 6
_IP4_DF: Final = 0x4000
_IP6_FIRST_WORD: Final = 6 << 28

_FIN: Final = 0x01
_SYN: Final = 0x02
_PSH: Final = 0x08
_ACK: Final = 0x10
#: Data offset (in 32-bit words) shifted into place in the offset/flags word.
_OFF5: Final = 5 << 12
_OFF6: Final = 6 << 12
_MASK32: Final = 0xFFFFFFFF
#: Ones' complement arithmetic: sums are taken modulo 0xFFFF (2**16 ≡ 1).
_M: Final = 0xFFFF

_NEW, _OPEN, _CLOSED = 0, 1, 2

_IPv4 = ipaddress.IPv4Address
_IPv6 = ipaddress.IPv6Address


def pcap_header(
    linktype: int = LINKTYPE_ETHERNET, *, nanoseconds: bool = False, snaplen: int = SNAPLEN
) -> bytes:
    """The classic libpcap file header (little-endian, version 2.4)."""
    magic = _MAGIC_NSEC if nanoseconds else _MAGIC_USEC
    return _FILE_HEADER.pack(magic, 2, 4, 0, 0, snaplen, linktype)


class RecordSink(Protocol):
    """Where the worker hands synthesized records; never blocks, False when dropped."""

    def submit(self, records: bytes) -> bool: ...


def _address(host: str) -> _IPv4 | _IPv6:
    try:
        addr = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    if isinstance(addr, _IPv6) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _mapped(addr: _IPv4 | _IPv6) -> bytes:
    if isinstance(addr, _IPv4):
        return b"\x00" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


def _port(port: int) -> int:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"{port} is not a TCP port")
    return port


def _fold_schedule(nbits: int) -> tuple[tuple[int, int], ...]:
    """Shifts (multiples of 16) and masks that halve a ``nbits`` integer down to ~256 bits."""
    steps = []
    while nbits > _FOLD_FLOOR_BITS:
        shift = ((nbits >> 1) + 15) & ~15
        steps.append((shift, (1 << shift) - 1))
        nbits = shift + 1
    return tuple(steps)


#: _sum16 converts this many bytes to an integer at a time (even; measured fastest).
_SUM_PIECE: Final = 736
_FOLD_FLOOR_BITS: Final = 256
_SUM_FOLDS: Final = _fold_schedule(_SUM_PIECE * 8 + 16)


def _sum16(data: bytes | bytearray | memoryview) -> int:
    """Sum of the 16-bit big-endian words of ``data`` (zero-padded), modulo 0xFFFF.

    As 2**16 ≡ 1 (mod 0xFFFF), an integer read big-endian from an even number of bytes is
    congruent to the sum of its words, and so is ``(x >> h) + (x & (2**h - 1))`` for ``h`` a
    multiple of 16. So pieces read by ``int.from_bytes`` are added, the sum folded in halves,
    and one division by 0xFFFF is left on a small number (~2.5 µs for 1460 bytes, against
    ~4 µs for reading all at once and dividing).
    """
    n = len(data)
    x = 0
    if n & 1:
        n -= 1
        x = data[n] << 8
        data = data[:n]
    for i in range(0, n, _SUM_PIECE):
        x += int.from_bytes(data[i : i + _SUM_PIECE], "big")
    for shift, mask in _SUM_FOLDS:
        x = (x >> shift) + (x & mask)
    return x % _M


class _Side:
    """One sending end of the flow: its addresses, ports and next sequence number."""

    __slots__ = ("dport", "dst", "ident", "ip_base", "l2", "seq", "sport", "src", "tcp_base")

    def __init__(
        self, src: bytes, dst: bytes, sport: int, dport: int, l2: bytes, seq: int, v6: bool
    ) -> None:
        self.src = src
        self.dst = dst
        self.sport = sport
        self.dport = dport
        self.l2 = l2
        self.seq = seq
        self.ident = 0
        # constant parts of the TCP checksum: pseudo-header addresses and protocol, the
        # ports and the window; the rest is added per segment
        self.tcp_base = (_sum16(src + dst) + _PROTO_TCP + sport + dport + WINDOW) % _M
        # constant words of the IPv4 header: version/IHL/TOS, flags, TTL/protocol, addresses
        self.ip_base = 0
        if not v6:
            self.ip_base = (0x4500 + _IP4_DF + (TTL << 8 | _PROTO_TCP) + _sum16(src + dst)) % _M


class FlowSynthesizer:
    """The TCP conversation of one intercepted connection, as pcap records (sans-I/O).

    ``client``/``server`` are ``(ip, port)``; ``ts`` returns Unix seconds; ``cap`` bounds
    the payload bytes written (``None``: no bound); ``isn`` fixes the client's and the
    server's initial sequence numbers (random otherwise).
    """

    __slots__ = (
        "_c",
        "_frac",
        "_mss",
        "_room",
        "_s",
        "_state",
        "_ts",
        "_v6",
        "captured_bytes",
        "truncated_bytes",
    )

    def __init__(
        self,
        client: tuple[str, int],
        server: tuple[str, int],
        *,
        ts: Callable[[], float],
        cap: int | None = None,
        linktype: int = LINKTYPE_ETHERNET,
        nanoseconds: bool = False,
        isn: tuple[int, int] | None = None,
    ) -> None:
        if cap is not None and cap < 0:
            raise ValueError(f"cap must be None or at least 0, not {cap}")
        if linktype not in (LINKTYPE_ETHERNET, LINKTYPE_RAW):
            raise ValueError(f"linktype must be {LINKTYPE_ETHERNET} or {LINKTYPE_RAW}")
        caddr, saddr = _address(client[0]), _address(server[0])
        v6 = isinstance(caddr, _IPv6) or isinstance(saddr, _IPv6)
        if v6:
            csrc, ssrc = _mapped(caddr), _mapped(saddr)
            ethertype = _ETHERTYPE_IPV6
        else:
            csrc, ssrc = caddr.packed, saddr.packed
            ethertype = _ETHERTYPE_IPV4
        cport, sport = _port(client[1]), _port(server[1])
        ether = linktype == LINKTYPE_ETHERNET
        cisn, sisn = isn if isn is not None else (random.getrandbits(32), random.getrandbits(32))
        self._c = _Side(csrc, ssrc, cport, sport,
                        SERVER_MAC + CLIENT_MAC + ethertype if ether else b"",
                        cisn & _MASK32, v6)  # fmt: skip
        self._s = _Side(ssrc, csrc, sport, cport,
                        CLIENT_MAC + SERVER_MAC + ethertype if ether else b"",
                        sisn & _MASK32, v6)  # fmt: skip
        self._v6 = v6
        self._mss = MSS_IPV6 if v6 else MSS_IPV4
        self._ts = ts
        self._frac = 1_000_000_000 if nanoseconds else 1_000_000
        self._room = cap
        self._state = _NEW
        #: Payload bytes written so far (both directions).
        self.captured_bytes = 0
        #: Payload bytes not written because of the cap.
        self.truncated_bytes = 0

    @property
    def truncated(self) -> bool:
        """True once the cap has kept payload out of the capture."""
        return self.truncated_bytes > 0

    def open(self) -> bytes:
        """SYN, SYN-ACK, ACK."""
        if self._state != _NEW:
            raise RuntimeError("FlowSynthesizer.open() called twice")
        self._state = _OPEN
        c, s = self._c, self._s
        opt = b"\x02\x04" + self._mss.to_bytes(2, "big")
        parts: list[bytes | memoryview] = []
        sec, frac = self._now()
        self._segment(parts, sec, frac, c, _SYN, c.seq, 0, opt, _OFF6)
        c.seq = (c.seq + 1) & _MASK32
        self._segment(parts, sec, frac, s, _SYN | _ACK, s.seq, c.seq, opt, _OFF6)
        s.seq = (s.seq + 1) & _MASK32
        self._segment(parts, sec, frac, c, _ACK, c.seq, s.seq, b"", _OFF5)
        return b"".join(parts)

    def client_data(self, data: bytes | bytearray | memoryview) -> bytes:
        """Records carrying ``data`` from the client to the server (``b""`` past the cap)."""
        return self._data(self._c, self._s, data)

    def server_data(self, data: bytes | bytearray | memoryview) -> bytes:
        """Records carrying ``data`` from the server to the client (``b""`` past the cap)."""
        return self._data(self._s, self._c, data)

    def close(self) -> bytes:
        """Client FIN/ACK, server FIN/ACK, client ACK (``b""`` if not open)."""
        if self._state != _OPEN:
            self._state = _CLOSED
            return b""
        self._state = _CLOSED
        c, s = self._c, self._s
        parts: list[bytes | memoryview] = []
        sec, frac = self._now()
        self._segment(parts, sec, frac, c, _FIN | _ACK, c.seq, s.seq, b"", _OFF5)
        c.seq = (c.seq + 1) & _MASK32
        self._segment(parts, sec, frac, s, _FIN | _ACK, s.seq, c.seq, b"", _OFF5)
        s.seq = (s.seq + 1) & _MASK32
        self._segment(parts, sec, frac, c, _ACK, c.seq, s.seq, b"", _OFF5)
        return b"".join(parts)

    # -- internals ----------------------------------------------------------------------
    def _now(self) -> tuple[int, int]:
        t = self._ts()
        sec = int(t)
        return sec, int((t - sec) * self._frac)

    def _data(self, side: _Side, peer: _Side, data: bytes | bytearray | memoryview) -> bytes:
        if self._state != _OPEN:
            raise RuntimeError(
                "FlowSynthesizer got data before open() or after close()"
                if self._state == _NEW
                else "FlowSynthesizer got data after close()"
            )
        total = len(data)
        if not total:
            return b""
        seq0 = side.seq
        side.seq = (seq0 + total) & _MASK32
        n = total
        room = self._room
        if room is not None:
            if n > room:
                n = room
                self.truncated_bytes += total - room
            self._room = room - n
            if not n:
                return b""
        self.captured_bytes += n
        view = memoryview(data)
        mss = self._mss
        ack = peer.seq
        sec, frac = self._now()
        parts: list[bytes | memoryview] = []
        segment = self._segment
        off = 0
        segments = 0
        while off < n:
            end = off + mss
            if end >= n:
                end = n
                flags = _ACK | _PSH
            else:
                flags = _ACK
            seq = (seq0 + off) & _MASK32
            segment(parts, sec, frac, side, flags, seq, ack, view[off:end], _OFF5)
            off = end
            segments += 1
            if off == n or segments % ACK_EVERY_SEGMENTS == 0:
                segment(parts, sec, frac, peer, _ACK, ack, (seq0 + off) & _MASK32, b"", _OFF5)
        return b"".join(parts)

    def _segment(
        self,
        parts: list[bytes | memoryview],
        sec: int,
        frac: int,
        side: _Side,
        flags: int,
        seq: int,
        ack: int,
        payload: bytes | memoryview,
        offflags: int,
    ) -> None:
        """Append one frame's pieces to ``parts``: record header, L2, IP+TCP, payload."""
        offflags |= flags
        tcp_len = 20 + len(payload)  # a SYN's options travel as its payload
        csum = (
            side.tcp_base + tcp_len + (seq >> 16) + (seq & 0xFFFF) + (ack >> 16) + (ack & 0xFFFF)
            + offflags + (_sum16(payload) if payload else 0)
        )  # fmt: skip
        csum = -csum % _M  # a sum of 0 gives 0x0000: stacks never send 0xFFFF, Wireshark flags it
        if self._v6:
            header = _IP6_TCP.pack(_IP6_FIRST_WORD, tcp_len, _PROTO_TCP, TTL, side.src,
                                   side.dst, side.sport, side.dport, seq, ack, offflags, WINDOW,
                                   csum, 0)  # fmt: skip
            size = 40 + tcp_len
        else:
            ident = side.ident
            side.ident = (ident + 1) & 0xFFFF
            size = 20 + tcp_len
            ipsum = -(side.ip_base + size + ident) % _M
            header = _IP4_TCP.pack(0x45, 0, size, ident, _IP4_DF, TTL, _PROTO_TCP, ipsum,
                                   side.src, side.dst, side.sport, side.dport, seq, ack,
                                   offflags, WINDOW, csum, 0)  # fmt: skip
        l2 = side.l2
        size += len(l2)
        parts.append(_RECORD.pack(sec, frac, size, size))
        if l2:
            parts.append(l2)
        parts.append(header)
        if payload:
            parts.append(payload)


class PcapFileWriter:
    """Records → rotated pcap files in ``directory``, written by one thread (see rules).

    ``submit`` may be called before :meth:`start`; what is queued is written once the
    thread runs. ``clock`` (monotonic seconds) times rotation and retries.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        prefix: str = "tlsgate",
        rotate_bytes: int = DEFAULT_ROTATE_BYTES,
        rotate_seconds: float | None = DEFAULT_ROTATE_SECONDS,
        keep: int = DEFAULT_KEEP,
        linktype: int = LINKTYPE_ETHERNET,
        nanoseconds: bool = False,
        max_queue_bytes: int = DEFAULT_QUEUE_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not _PREFIX.fullmatch(prefix):
            raise ConfigError(
                f"pcap file prefix {prefix!r} must be letters, digits, '.', '_' or '-'"
            )
        if rotate_bytes < MIN_ROTATE_BYTES:
            raise ConfigError(
                f"pcap rotate_bytes must be at least {MIN_ROTATE_BYTES}, not {rotate_bytes}"
            )
        if rotate_seconds is not None and not rotate_seconds > 0:
            raise ConfigError(
                f"pcap rotate_seconds must be positive or unset, not {rotate_seconds}"
            )
        if keep < 1:
            raise ConfigError(f"pcap keep must be at least 1 file, not {keep}")
        if max_queue_bytes < 1:
            raise ConfigError(f"pcap max_queue_bytes must be at least 1, not {max_queue_bytes}")
        path = Path(directory)
        try:
            st = path.stat()
        except OSError as exc:
            raise ConfigError(
                f"pcap directory {path}: {exc.strerror}; create it (mode 0700, owned by the "
                "user the workers run as) or choose another"
            ) from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"pcap directory {path} is not a directory")
        self.directory = path
        # Files are created relative to this descriptor, opened now: a worker that later
        # drops root keeps using the directory even though its parents (the root-only state
        # directory) are closed to it.
        self._dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._check_writable()
        self.prefix = prefix
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.keep = keep
        self.max_queue_bytes = max_queue_bytes
        self._header = pcap_header(linktype, nanoseconds=nanoseconds)
        self._clock = clock
        self._names = re.compile(re.escape(prefix) + r"-(\d{8}T\d{6}Z)-(\d+)\.pcap")
        # shared with the caller's thread, under _cond
        self._cond = threading.Condition(threading.Lock())
        self._items: deque[bytes] = deque()
        self._queued = 0
        self._closing = False
        self._dropped_queue = 0
        self._dropped_queue_bytes = 0
        # the writer thread's own
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._opened_at = 0.0
        self._retry_at = float("-inf")
        self._serial = 0
        self._failing = False
        self._dropped_io = 0
        self._dropped_io_bytes = 0
        #: Bytes written to files (headers included), files opened, failed writes.
        self.written_bytes = 0
        self.files_opened = 0
        self.write_errors = 0
        #: The latest write or open failure, in words (``None`` if there was none).
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="tlsgate-pcap-writer",
                                        daemon=True)  # fmt: skip

    # -- the caller's side -----------------------------------------------------------------
    def start(self) -> None:
        """Start writing. Checks the directory again: the process may have changed user
        (workers drop privileges after building what they need as root)."""
        self._check_writable()
        self._thread.start()

    def _check_writable(self) -> None:
        if not os.access(".", os.W_OK | os.X_OK, dir_fd=self._dir_fd):
            raise ConfigError(
                f"pcap directory {self.directory} is not writable by uid {os.getuid()}; give "
                "the user the workers run as write access to it (it holds decrypted traffic: "
                "keep it mode 0700)"
            )

    def submit(self, records: bytes) -> bool:
        """Queue ``records`` (whole pcap records) for writing; False if dropped (counted)."""
        n = len(records)
        if not n:
            return True
        with self._cond:
            if self._closing or self._queued + n > self.max_queue_bytes:
                self._dropped_queue += 1
                self._dropped_queue_bytes += n
                return False
            if not self._items:
                self._cond.notify()
            self._items.append(records)
            self._queued += n
        return True

    @property
    def dropped(self) -> int:
        """Submissions lost: refused by a full queue, or lost to a failed write."""
        return self._dropped_queue + self._dropped_io

    @property
    def dropped_bytes(self) -> int:
        return self._dropped_queue_bytes + self._dropped_io_bytes

    @property
    def queued_bytes(self) -> int:
        return self._queued

    @property
    def current_path(self) -> Path | None:
        """The file being written, if one is open."""
        return self._path

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, close the file and stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if not self._thread.is_alive() and self._thread.ident is None:
            self._thread.start()  # never started: still write what was queued
        self._thread.join(timeout)
        if not self._thread.is_alive() and self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def __enter__(self) -> PcapFileWriter:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the writer thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    now = self._clock()
                    if not self._closing and (not self._items or now < self._retry_at):
                        self._cond.wait(self._idle_wait(now))
                        now = self._clock()
                    closing = self._closing
                    batch: list[bytes] = []
                    if self._items and (closing or now >= self._retry_at):
                        batch = list(self._items)
                        self._items.clear()
                        self._queued = 0
                if self._fd is not None and self._too_old(now):
                    self._close_file()
                if batch:
                    self._write(batch, now)
                if closing:
                    return
        finally:
            self._close_file()

    def _idle_wait(self, now: float) -> float:
        wait = MAX_IDLE_WAIT
        if self._fd is not None and self.rotate_seconds is not None:
            wait = min(wait, self._opened_at + self.rotate_seconds - now)
        if self._items:
            wait = min(wait, self._retry_at - now)
        return max(wait, 0.0)

    def _too_old(self, now: float) -> bool:
        return self.rotate_seconds is not None and now - self._opened_at >= self.rotate_seconds

    def _write(self, batch: list[bytes], now: float) -> None:
        pending: list[bytes] = []
        pending_bytes = 0
        header_bytes = len(self._header)
        for i, records in enumerate(batch):
            if (
                self._fd is not None
                and self._size + pending_bytes > header_bytes
                and self._size + pending_bytes + len(records) > self.rotate_bytes
            ):
                if pending and not self._flush(pending, pending_bytes):
                    self._lost(batch[i:])
                    return
                pending, pending_bytes = [], 0
                self._close_file()
            if self._fd is None:
                try:
                    self._open(now)
                except OSError as exc:
                    self._failed(f"cannot create a pcap file in {self.directory}", exc)
                    self._lost(batch[i:])
                    return
            pending.append(records)
            pending_bytes += len(records)
            if pending_bytes >= WRITE_CHUNK_BYTES or len(pending) >= _MAX_IOVEC:
                if not self._flush(pending, pending_bytes):
                    self._lost(batch[i + 1 :])
                    return
                pending, pending_bytes = [], 0
        if pending:
            self._flush(pending, pending_bytes)

    def _flush(self, pending: list[bytes], nbytes: int) -> bool:
        """Append ``pending`` to the file. On failure keep the submissions written whole,
        cut the file back to the end of the last one, and count the others as lost."""
        fd = self._fd
        assert fd is not None
        done = 0
        try:
            done = os.writev(fd, pending)
            if done < nbytes:  # only after an error or a signal: write the rest plainly
                rest = memoryview(b"".join(pending))
                while done < nbytes:
                    done += os.write(fd, rest[done:])
        except OSError as exc:
            kept = kept_bytes = 0
            for records in pending:
                if kept_bytes + len(records) > done:
                    break
                kept += 1
                kept_bytes += len(records)
            self._size += kept_bytes
            self.written_bytes += kept_bytes
            self._failed(f"cannot write {self._path}", exc)
            self._lost(pending[kept:])
            try:
                os.ftruncate(fd, self._size)  # O_APPEND: the next write goes there
            except OSError:
                self._close_file()  # cannot repair it: the next write starts a new file
            return False
        self._size += nbytes
        self.written_bytes += nbytes
        if self._failing:
            self._failing = False
            logger.info("pcap writing resumed in %s", self.directory)
        return True

    def _open(self, now: float) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        for _ in range(_MAX_NAME_TRIES):
            self._serial += 1
            name = f"{self.prefix}-{stamp}-{self._serial:04d}.pcap"
            path = self.directory / name
            try:
                fd = os.open(name, flags, FILE_MODE, dir_fd=self._dir_fd)
            except FileExistsError:
                continue
            break
        else:
            raise OSError(errno.EEXIST, "every candidate file name is taken")
        try:
            if os.write(fd, self._header) != len(self._header):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            os.close(fd)
            try:
                os.unlink(name, dir_fd=self._dir_fd)
            except FileNotFoundError:
                pass
            raise
        self._fd, self._path = fd, path
        self._size = len(self._header)
        self._opened_at = now
        self.files_opened += 1
        self.written_bytes += len(self._header)
        self._prune()

    def _prune(self) -> None:
        """Delete the oldest files of this prefix beyond ``keep`` (the open one counts)."""
        try:
            names = os.listdir(self._dir_fd)
        except OSError as exc:
            logger.warning("cannot list %s to delete old pcap files: %s", self.directory, exc)
            return
        ours = []
        for name in names:
            m = self._names.fullmatch(name)
            if m is not None:
                ours.append((m.group(1), int(m.group(2)), name))
        ours.sort()
        current = self._path.name if self._path else None
        for _, _, name in ours[: max(0, len(ours) - self.keep)]:
            if name == current:
                continue
            try:
                os.unlink(name, dir_fd=self._dir_fd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("cannot delete old pcap file %s: %s", name, exc)

    def _close_file(self) -> None:
        fd, self._fd, self._path = self._fd, None, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError as exc:
                self._failed("cannot close a pcap file", exc)

    def _failed(self, what: str, exc: OSError) -> None:
        self.write_errors += 1
        self.last_error = f"{what}: {exc.strerror or exc}"
        self._retry_at = self._clock() + RETRY_SECONDS
        if not self._failing:
            self._failing = True
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                hint = f"free space in {self.directory} or lower rotate_bytes/keep"
            else:
                hint = f"check {self.directory} and its permissions (uid {os.getuid()} writes)"
            logger.warning(
                "%s; pcap records are dropped (counted) and writing is retried every %.0f s: %s",
                self.last_error, RETRY_SECONDS, hint,
            )  # fmt: skip

    def _lost(self, items: list[bytes]) -> None:
        self._dropped_io += len(items)
        self._dropped_io_bytes += sum(map(len, items))


class _Client:
    __slots__ = ("address", "buffered", "items", "offset", "sock", "writing")

    def __init__(self, sock: socket.socket, address: object) -> None:
        self.sock = sock
        self.address = address
        self.items: deque[bytes] = deque()
        self.buffered = 0
        self.offset = 0
        self.writing = False


_LISTENER: Final = "listener"
_WAKE: Final = "wake"


class PcapOverIpServer:
    """Streams the live records, as a pcap, to every TCP client that connects (see rules).

    The constructor binds and listens (a :class:`~tlsgate.errors.ConfigError` says why it
    could not); :meth:`start` runs the thread.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        linktype: int = LINKTYPE_ETHERNET,
        nanoseconds: bool = False,
        max_client_bytes: int = DEFAULT_CLIENT_BYTES,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self._header = pcap_header(linktype, nanoseconds=nanoseconds)
        if max_client_bytes < len(self._header):
            raise ConfigError(f"PCAP-over-IP max_client_bytes is too small: {max_client_bytes}")
        if max_clients < 1:
            raise ConfigError(f"PCAP-over-IP max_clients must be at least 1, not {max_clients}")
        self.max_client_bytes = max_client_bytes
        self.max_clients = max_clients
        try:
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            listener = socket.socket(family, kind, proto)
        except OSError as exc:
            raise ConfigError(f"PCAP-over-IP address {host!r}: {exc}") from None
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(sockaddr)
            listener.listen(LISTEN_BACKLOG)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            raise ConfigError(
                f"cannot listen for PCAP-over-IP on {host} port {port}: {exc.strerror or exc}; "
                "choose a free address and port"
            ) from None
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(listener, selectors.EVENT_READ, _LISTENER)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._lock = threading.Lock()
        #: Replaced (never mutated) by the thread, so submit() can look without the lock.
        self._clients: list[_Client] = []
        self._wake_pending = False
        self._stopping = False
        self._accept_paused_until: float | None = None
        self._dropped = 0
        self._dropped_bytes = 0
        #: Clients turned away because ``max_clients`` were connected.
        self.rejected_clients = 0
        self._thread = threading.Thread(target=self._run, name="tlsgate-pcap-over-ip",
                                        daemon=True)  # fmt: skip

    # -- the caller's side -----------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def clients(self) -> int:
        return len(self._clients)

    @property
    def dropped(self) -> int:
        """Submissions a client lost because its buffer was full (one per client)."""
        return self._dropped

    @property
    def dropped_bytes(self) -> int:
        return self._dropped_bytes

    def start(self) -> None:
        self._thread.start()

    def submit(self, records: bytes) -> bool:
        """Queue ``records`` for every connected client; False if any client dropped them."""
        if not self._clients or not records:
            return True
        n = len(records)
        kept = True
        wake = False
        with self._lock:
            for client in self._clients:
                if client.buffered + n > self.max_client_bytes:
                    self._dropped += 1
                    self._dropped_bytes += n
                    kept = False
                else:
                    client.items.append(records)
                    client.buffered += n
                    wake = True
            if wake and not self._wake_pending:
                self._wake_pending = True
            else:
                wake = False
        if wake:
            self._wake()
        return kept

    def close(self, timeout: float = 5.0) -> None:
        """Give clients up to CLOSE_FLUSH_SECONDS for what is buffered, then close all."""
        self._stopping = True
        if self._thread.ident is None:
            self._close_sockets()
            return
        self._wake()
        self._thread.join(timeout)

    def __enter__(self) -> PcapOverIpServer:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # full (the thread has wake-ups pending anyway) or already closed

    # -- the server thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                timeout = None
                if self._accept_paused_until is not None:
                    timeout = max(0.0, self._accept_paused_until - time.monotonic())
                    if timeout == 0.0:
                        self._accept_paused_until = None
                        self._sel.register(self._listener, selectors.EVENT_READ, _LISTENER)
                        timeout = None
                flush_all = False
                for key, mask in self._sel.select(timeout):
                    tag = key.data
                    if tag is _LISTENER:
                        self._accept()
                    elif tag is _WAKE:
                        self._drain_wake()
                        flush_all = True
                    else:
                        client: _Client = tag
                        if mask & selectors.EVENT_READ and not self._read(client):
                            continue
                        if mask & selectors.EVENT_WRITE:
                            self._flush(client)
                if flush_all:
                    for client in self._clients:
                        if not client.writing:
                            self._flush(client)
            self._linger()
        finally:
            self._close_sockets()

    def _accept(self) -> None:
        while True:
            try:
                sock, address = self._listener.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # out of descriptors or memory: stop accepting a while
                logger.warning("PCAP-over-IP cannot accept a client: %s", exc)
                self._sel.unregister(self._listener)
                self._accept_paused_until = time.monotonic() + RETRY_SECONDS
                return
            if len(self._clients) >= self.max_clients:
                self.rejected_clients += 1
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(sock, address)
            client.items.append(self._header)
            client.buffered = len(self._header)
            with self._lock:
                self._clients = [*self._clients, client]
            self._sel.register(sock, selectors.EVENT_READ, client)
            self._flush(client)

    def _drain_wake(self) -> None:
        # drain, then clear: a submit in between leaves its byte for the next select
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass  # drained (BlockingIOError)
        with self._lock:
            self._wake_pending = False

    def _read(self, client: _Client) -> bool:
        """Discard what a client sends; False (and the client removed) at its end."""
        try:
            if client.sock.recv(CLIENT_READ_BYTES):
                return True
        except BlockingIOError:
            return True
        except OSError:
            pass
        self._remove(client)
        return False

    def _flush(self, client: _Client) -> None:
        """Send what the client's socket takes now; wait for writability for the rest."""
        sock = client.sock
        items = client.items
        while True:
            with self._lock:
                bufs: list[bytes | memoryview] = list(itertools.islice(items, SEND_BATCH))
            if not bufs:
                break
            offset = client.offset
            if offset:
                bufs[0] = memoryview(bufs[0])[offset:]
            want = sum(map(len, bufs))
            try:
                sent = sock.sendmsg(bufs)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._remove(client)
                return
            done = sent + offset
            with self._lock:
                while items and done >= len(items[0]):
                    size = len(items.popleft())
                    done -= size
                    client.buffered -= size
            client.offset = done
            if sent < want:
                break  # the socket is full
        self._set_writing(client, bool(items))

    def _set_writing(self, client: _Client, writing: bool) -> None:
        if writing != client.writing:
            client.writing = writing
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
            self._sel.modify(client.sock, events, client)

    def _remove(self, client: _Client) -> None:
        with self._lock:
            self._clients = [c for c in self._clients if c is not client]
        self._sel.unregister(client.sock)
        client.sock.close()

    def _linger(self) -> None:
        """Closing: let clients take what is buffered, for at most CLOSE_FLUSH_SECONDS."""
        deadline = time.monotonic() + CLOSE_FLUSH_SECONDS
        if self._accept_paused_until is None:
            self._sel.unregister(self._listener)
        self._sel.unregister(self._wake_r)
        for client in self._clients:
            self._flush(client)
        while any(c.items for c in self._clients):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for key, mask in self._sel.select(left):
                tag = key.data
                if mask & selectors.EVENT_READ and not self._read(tag):
                    continue
                if mask & selectors.EVENT_WRITE:
                    self._flush(tag)

    def _close_sockets(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.sock.close()
        self._sel.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()


class TeeSink:
    """Hands every submission to several sinks (pcap files and PCAP-over-IP)."""

    def __init__(self, *sinks: PcapFileWriter | PcapOverIpServer) -> None:
        self.sinks = sinks

    def submit(self, records: bytes) -> bool:
        ok = True
        for sink in self.sinks:
            ok = sink.submit(records) and ok
        return ok

    @property
    def dropped(self) -> int:
        return sum(sink.dropped for sink in self.sinks)

    def start(self) -> None:
        for sink in self.sinks:
            sink.start()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
