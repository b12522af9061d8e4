"""PCAP export: synthesized TCP/IP flows, rotated files and PCAP-over-IP.

Frames are checked twice: by an independent parser in this file (RFC 1071 checksums
computed word by word, sequence numbers modelled call by call) and by tshark, which must
decode the HTTP carried in them and find no bad checksum and no malformed packet. Files go
to a real directory (a real, tiny tmpfs for disk-full), streams over real loopback TCP."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsgate.errors import ConfigError
from tlsgate.workers.pcap import (
    CLIENT_MAC,
    LINKTYPE_ETHERNET,
    LINKTYPE_RAW,
    MSS_IPV4,
    MSS_IPV6,
    PCAP_HEADER_BYTES,
    RETRY_SECONDS,
    SERVER_MAC,
    SNAPLEN,
    WINDOW,
    FlowSynthesizer,
    PcapFileWriter,
    PcapOverIpServer,
    pcap_header,
)

TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="needs tshark (Debian package tshark)")
#: Verify IP and TCP checksums (tshark does not by default); no name resolution.
CHECKSUMS = ("-n", "-o", "tcp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE")
#: Plaintext on 443 is HTTP for these tests (Wireshark's "Decode As").
AS_HTTP = ("-d", "tcp.port==443,http")
#: tshark's checksum status: 0 bad, 1 good, 2 unverified. Anything but good is a failure.
NOT_CLEAN = "tcp.checksum.status != 1 || ip.checksum.status != 1 || _ws.malformed"

MAGIC_USEC = 0xA1B2C3D4
MAGIC_NSEC = 0xA1B23C4D
SYN, FIN, PSH, ACK = 0x02, 0x01, 0x08, 0x10
MOD32 = 1 << 32
T0 = 1_700_000_000.375  # exact in binary: .375 s is 375000 µs, 375000000 ns

V4 = (("192.0.2.10", 51000), ("198.51.100.20", 443))
V6 = (("2001:db8::10", 51001), ("2001:db8:1::20", 443))
LONG_URI = "/search?q=" + "x" * 3000  # a request of three segments


def fixed_ts() -> float:
    return T0


def tshark(path: Path, *args: str) -> str:
    assert TSHARK is not None
    proc = subprocess.run(
        [TSHARK, "-r", str(path), *CHECKSUMS, *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# -- an independent reader ---------------------------------------------------------------
@dataclass
class Segment:
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    options: bytes
    payload: bytes


def read_pcap(data: bytes) -> tuple[int, int, list[tuple[int, int, bytes]]]:
    """(magic, linktype, [(sec, frac, frame)]); fails on anything but whole records."""
    magic, major, minor, _, _, snaplen, linktype = struct.unpack_from("<IHHiIII", data)
    assert magic in (MAGIC_USEC, MAGIC_NSEC)
    assert (major, minor, snaplen) == (2, 4, SNAPLEN)
    records = []
    pos = PCAP_HEADER_BYTES
    while pos < len(data):
        sec, frac, incl, orig = struct.unpack_from("<IIII", data, pos)
        pos += 16
        assert incl == orig <= snaplen
        assert pos + incl <= len(data), "the last record is cut short"
        assert frac < (1_000_000_000 if magic == MAGIC_NSEC else 1_000_000)
        records.append((sec, frac, data[pos : pos + incl]))
        pos += incl
    return magic, linktype, records


def ones_complement_sum(data: bytes) -> int:
    """RFC 1071, one word at a time."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def parse_frame(frame: bytes, linktype: int) -> Segment:
    if linktype == LINKTYPE_ETHERNET:
        assert {frame[:6], frame[6:12]} == {CLIENT_MAC, SERVER_MAC}
        ethertype, ip = frame[12:14], frame[14:]
        assert ethertype == (b"\x08\x00" if ip[0] >> 4 == 4 else b"\x86\xdd")
    else:
        ip = frame
    if ip[0] >> 4 == 4:
        ihl = (ip[0] & 0x0F) * 4
        assert ihl == 20 and ip[9] == 6
        assert int.from_bytes(ip[2:4], "big") == len(ip)
        assert ones_complement_sum(ip[:ihl]) == 0xFFFF, "bad IPv4 header checksum"
        assert ip[10:12] != b"\xff\xff", "a computed checksum is never 0xFFFF"
        src, dst, tcp = ip[12:16], ip[16:20], ip[ihl:]
        pseudo = src + dst + b"\x00\x06" + len(tcp).to_bytes(2, "big")
    else:
        assert ip[0] >> 4 == 6 and ip[6] == 6
        assert int.from_bytes(ip[4:6], "big") + 40 == len(ip)
        src, dst, tcp = ip[8:24], ip[24:40], ip[40:]
        pseudo = src + dst + len(tcp).to_bytes(4, "big") + b"\x00\x00\x00\x06"
    assert ones_complement_sum(pseudo + tcp) == 0xFFFF, "bad TCP checksum"
    assert tcp[16:18] != b"\xff\xff", "a computed checksum is never 0xFFFF"
    sport, dport, seq, ack, offflags, window = struct.unpack_from("!HHIIHH", tcp)
    return Segment(
        ipaddress.ip_address(src), ipaddress.ip_address(dst), sport, dport, seq, ack,
        offflags & 0x3F, window, tcp[20 : (offflags >> 12) * 4], tcp[(offflags >> 12) * 4 :],
    )  # fmt: skip


def segments(records: bytes, linktype: int = LINKTYPE_ETHERNET) -> list[Segment]:
    _, _, recs = read_pcap(pcap_header(linktype) + records)
    return [parse_frame(frame, linktype) for _, _, frame in recs]


def read_segments(path: Path) -> list[Segment]:
    _, linktype, recs = read_pcap(path.read_bytes())
    return [parse_frame(frame, linktype) for _, _, frame in recs]


def http_exchange(host: str, uri: str, body: int) -> tuple[bytes, bytes]:
    request = f"GET {uri} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: t\r\n\r\n".encode()
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % body + b"r" * body
    return request, response


def whole_flow(
    client: tuple[str, int], server: tuple[str, int], linktype: int = LINKTYPE_ETHERNET
) -> bytes:
    """Two requests and responses, the first split over several calls and segments."""
    flow = FlowSynthesizer(client, server, ts=fixed_ts, linktype=linktype)
    req1, resp1 = http_exchange("www.example.com", LONG_URI, 4000)
    req2, resp2 = http_exchange("api.example.com", "/v1/items?id=7", 1)
    parts = [flow.open()]
    for piece in (req1[:7], req1[7:100], req1[100:]):
        parts.append(flow.client_data(piece))
    parts.append(flow.server_data(resp1))
    parts.append(flow.client_data(req2))
    parts.append(flow.server_data(resp2[:10]))
    parts.append(flow.server_data(resp2[10:]))
    parts.append(flow.close())
    return b"".join(parts)


# -- the synthesizer, read by tshark -------------------------------------------------------
@needs_tshark
@pytest.mark.parametrize("linktype", [LINKTYPE_ETHERNET, LINKTYPE_RAW], ids=["ethernet", "raw"])
def test_tshark_decodes_http_requests_split_across_segments_with_the_real_addresses_and_ports(
    tmp_path: Path, linktype: int
) -> None:
    path = tmp_path / "flows.pcap"
    path.write_bytes(
        pcap_header(linktype)
        + whole_flow(*V4, linktype=linktype)
        + whole_flow(*V6, linktype=linktype)
    )
    out = tshark(path, *AS_HTTP, "-Y", "http.request", "-T", "fields", "-E", "separator=|",
                 "-e", "ip.src", "-e", "ipv6.src", "-e", "tcp.srcport", "-e", "ip.dst",
                 "-e", "ipv6.dst", "-e", "tcp.dstport", "-e", "http.request.method",
                 "-e", "http.host", "-e", "http.request.uri")  # fmt: skip
    rows = [line.split("|") for line in out.splitlines()]
    v4 = ["192.0.2.10", "", "51000", "198.51.100.20", "", "443", "GET"]
    v6 = ["", "2001:db8::10", "51001", "", "2001:db8:1::20", "443", "GET"]
    assert rows == [
        [*v4, "www.example.com", LONG_URI],
        [*v4, "api.example.com", "/v1/items?id=7"],
        [*v6, "www.example.com", LONG_URI],
        [*v6, "api.example.com", "/v1/items?id=7"],
    ]
    codes = tshark(path, *AS_HTTP, "-Y", "http.response", "-T", "fields", "-e",
                   "http.response.code", "-e", "http.content_length")  # fmt: skip
    assert codes.split() == ["200", "4000", "200", "1"] * 2


@needs_tshark
def test_tshark_finds_no_bad_checksum_and_no_malformed_packet_and_would_see_one(
    tmp_path: Path,
) -> None:
    odd = FlowSynthesizer(("::ffff:203.0.113.7", 1), ("2001:db8::1", 443), ts=fixed_ts)
    big = FlowSynthesizer(("10.9.8.7", 65535), ("10.1.1.1", 8443), ts=fixed_ts)
    head = pcap_header() + b"".join([
        whole_flow(*V4), whole_flow(*V6),
        odd.open(), odd.client_data(b"a" * 1441), odd.server_data(b"\xff" * 3), odd.close(),
        big.open(), big.server_data(os.urandom(200_000)),
    ])  # fmt: skip
    good = tmp_path / "good.pcap"
    good.write_bytes(head + big.client_data(b"\x00") + big.close())
    assert tshark(good, *AS_HTTP, "-Y", NOT_CLEAN) == ""
    n_packets = len(read_pcap(good.read_bytes())[2])
    verified = tshark(good, "-Y", "tcp.checksum.status == 1", "-T", "fields", "-e", "frame.number")
    assert len(verified.split()) == n_packets > 150

    # the same check flags a single flipped payload bit: the last data segment of the big
    # flow's chunk is followed by the client's pure ACK (a 16 + 54 byte record)
    corrupt = bytearray(good.read_bytes())
    corrupt[len(head) - 70 - 10] ^= 0x10
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(bytes(corrupt))
    bad_frame = len(read_pcap(head)[2]) - 1
    assert tshark(bad, "-Y", NOT_CLEAN, "-T", "fields", "-e", "frame.number").split() == [
        str(bad_frame)
    ]


@needs_tshark
def test_a_checksum_over_words_that_sum_to_zero_is_written_0x0000_not_0xffff(
    tmp_path: Path,
) -> None:
    # each checksum falls by one per unit added to a 16-bit word it covers, so adding the
    # checksum seen with 0 there drives it to 0: the SYN's TCP checksum through the ISN,
    # the IPv4 header checksum through the last two bytes of the client address
    def syn(host: str, isn: int) -> tuple[int, int]:
        frame = read_pcap(pcap_header() + FlowSynthesizer(
            (host, 1), ("192.0.2.1", 443), ts=fixed_ts, isn=(isn, 0)).open())[2][0][2]  # fmt: skip
        return int.from_bytes(frame[24:26], "big"), int.from_bytes(frame[50:52], "big")

    ip0 = syn("10.0.0.0", 0)[0]
    host = f"10.0.{ip0 >> 8}.{ip0 & 0xFF}"
    tcp1 = syn(host, 0)[1]
    assert syn(host, tcp1) == (0, 0)
    path = tmp_path / "zero.pcap"
    flow = FlowSynthesizer((host, 1), ("192.0.2.1", 443), ts=fixed_ts, isn=(tcp1, 0))
    path.write_bytes(pcap_header() + flow.open())
    assert tshark(path, "-Y", NOT_CLEAN) == ""


# -- the synthesizer, read by this file's own parser ---------------------------------------
def check_handshake(segs: list[Segment], client_isn: int, server_isn: int) -> None:
    syn, synack, ack = segs
    assert (syn.flags, syn.seq, syn.ack) == (SYN, client_isn, 0)
    c1, s1 = (client_isn + 1) % MOD32, (server_isn + 1) % MOD32
    assert (synack.flags, synack.seq, synack.ack) == (SYN | ACK, server_isn, c1)
    assert (ack.flags, ack.seq, ack.ack) == (ACK, c1, s1)
    mss = MSS_IPV6 if syn.src.version == 6 else MSS_IPV4
    assert syn.options == synack.options == b"\x02\x04" + mss.to_bytes(2, "big")
    assert syn.payload == synack.payload == ack.options == ack.payload == b""


def check_chunk(
    segs: list[Segment], chunk: bytes, sender: tuple[object, int], next_seq: dict[int, int]
) -> None:
    """The records of one *_data call: data segments, then the receiver's ACK."""
    src, sport = sender
    data = [s for s in segs if s.payload]
    acks = [s for s in segs if not s.payload]
    mss = MSS_IPV6 if segs[0].src.version == 6 else MSS_IPV4
    peer = next(p for p in next_seq if p != sport)
    seq = next_seq[sport]
    for i, s in enumerate(data):
        assert (s.src, s.sport) == (src, sport)
        assert s.seq == seq and s.ack == next_seq[peer]
        assert 0 < len(s.payload) <= mss
        assert s.flags == (ACK | PSH if i == len(data) - 1 else ACK)
        seq = (seq + len(s.payload)) % MOD32
    assert b"".join(s.payload for s in data) == chunk
    assert acks and all(a.sport == peer and a.flags == ACK for a in acks)
    assert acks[-1].ack == seq and segs[-1] is acks[-1]
    next_seq[sport] = seq


isns = st.one_of(st.integers(0, MOD32 - 1), st.integers(MOD32 - 5000, MOD32 - 1))


@settings(max_examples=40, deadline=None)
@given(
    v6=st.booleans(),
    isn=st.tuples(isns, isns),
    chunks=st.lists(st.tuples(st.booleans(), st.binary(max_size=4000)), max_size=6),
)
def test_every_byte_goes_in_order_in_checksummed_segments_with_continuous_sequence_numbers(
    v6: bool, isn: tuple[int, int], chunks: list[tuple[bool, bytes]]
) -> None:
    client, server = V6 if v6 else V4
    flow = FlowSynthesizer(client, server, ts=fixed_ts, isn=isn)
    check_handshake(segments(flow.open()), *isn)
    caddr, saddr = ipaddress.ip_address(client[0]), ipaddress.ip_address(server[0])
    next_seq = {client[1]: (isn[0] + 1) % MOD32, server[1]: (isn[1] + 1) % MOD32}
    for from_client, chunk in chunks:
        records = flow.client_data(chunk) if from_client else flow.server_data(chunk)
        if not chunk:
            assert records == b""
            continue
        sender = (caddr, client[1]) if from_client else (saddr, server[1])
        check_chunk(segments(records), chunk, sender, next_seq)
    cfin, sfin, last = segments(flow.close())
    c, s = next_seq[client[1]], next_seq[server[1]]
    c1, s1 = (c + 1) % MOD32, (s + 1) % MOD32
    assert (cfin.flags, cfin.sport, cfin.seq, cfin.ack) == (FIN | ACK, client[1], c, s)
    assert (sfin.flags, sfin.sport, sfin.seq, sfin.ack) == (FIN | ACK, server[1], s, c1)
    assert (last.flags, last.seq, last.ack) == (ACK, c1, s1)
    assert flow.captured_bytes == sum(len(c) for _, c in chunks) and not flow.truncated


def test_a_chunk_larger_than_the_window_is_acknowledged_before_the_window_fills() -> None:
    flow = FlowSynthesizer(*V4, ts=fixed_ts)
    flow.open()
    acked = None
    in_flight_max = 0
    for s in segments(flow.server_data(b"w" * 300_000)):
        if s.payload:
            if acked is None:
                acked = s.seq  # the handshake acknowledged everything before the chunk
            base = acked
            in_flight_max = max(in_flight_max, (s.seq + len(s.payload) - base) % MOD32)
        else:
            acked = s.ack
        assert s.window == WINDOW
    assert 40_000 < in_flight_max <= WINDOW


def test_records_carry_the_call_time_in_microseconds_or_nanoseconds() -> None:
    for nanoseconds, magic, frac in ((False, MAGIC_USEC, 375_000), (True, MAGIC_NSEC, 375_000_000)):
        flow = FlowSynthesizer(*V4, ts=fixed_ts, nanoseconds=nanoseconds)
        header = pcap_header(nanoseconds=nanoseconds)
        got_magic, _, recs = read_pcap(header + flow.open() + flow.client_data(b"x") + flow.close())
        assert got_magic == magic
        assert {(sec, f) for sec, f, _ in recs} == {(int(T0), frac)}


def test_the_file_header_is_classic_libpcap_with_snaplen_65535() -> None:
    assert struct.unpack("<IHHiIII", pcap_header(LINKTYPE_RAW)) == (
        MAGIC_USEC, 2, 4, 0, 0, 65535, 101,
    )  # fmt: skip
    assert struct.unpack("<I", pcap_header(nanoseconds=True)[:4]) == (MAGIC_NSEC,)


@pytest.mark.parametrize(
    ("client", "server", "want"),
    [
        ("::ffff:192.0.2.1", "::ffff:192.0.2.2", ("192.0.2.1", "192.0.2.2")),
        ("::ffff:192.0.2.1", "2001:db8::2", ("::ffff:192.0.2.1", "2001:db8::2")),
        ("2001:db8::1", "192.0.2.2", ("2001:db8::1", "::ffff:192.0.2.2")),
        ("fe80::1%eth0", "fe80::2", ("fe80::1", "fe80::2")),
    ],
)
def test_mapped_addresses_are_written_as_ipv4_and_mixed_families_as_ipv6(
    client: str, server: str, want: tuple[str, str]
) -> None:
    flow = FlowSynthesizer((client, 1234), (server, 443), ts=fixed_ts)
    syn = segments(flow.open())[0]
    assert (syn.src, syn.dst) == (ipaddress.ip_address(want[0]), ipaddress.ip_address(want[1]))
    assert (syn.sport, syn.dport) == (1234, 443)


def test_an_address_that_is_not_an_ip_literal_or_a_bad_port_is_refused() -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        FlowSynthesizer(("example.com", 1), ("192.0.2.1", 443), ts=fixed_ts)
    with pytest.raises(ValueError, match="not a TCP port"):
        FlowSynthesizer(("192.0.2.2", 70000), ("192.0.2.1", 443), ts=fixed_ts)


def test_data_before_open_or_after_close_is_a_caller_error_and_close_is_idempotent() -> None:
    flow = FlowSynthesizer(*V4, ts=fixed_ts)
    with pytest.raises(RuntimeError, match="before open"):
        flow.client_data(b"x")
    flow.open()
    with pytest.raises(RuntimeError, match="twice"):
        flow.open()
    assert flow.close() != b""
    assert flow.close() == b""
    with pytest.raises(RuntimeError, match="after close"):
        flow.server_data(b"x")
    assert FlowSynthesizer(*V4, ts=fixed_ts).close() == b""


@needs_tshark
def test_the_byte_cap_stops_payload_at_the_cap_and_analysers_see_the_missing_bytes(
    tmp_path: Path,
) -> None:
    flow = FlowSynthesizer(*V4, ts=fixed_ts, cap=3000, isn=(100, 900))
    parts = [flow.open(), flow.client_data(b"c" * 2000), flow.server_data(b"s" * 5000)]
    assert (flow.captured_bytes, flow.truncated_bytes, flow.truncated) == (3000, 4000, True)
    assert flow.client_data(b"more") == b""
    assert flow.truncated_bytes == 4004
    parts.append(flow.close())
    segs = segments(b"".join(parts))
    assert [len(s.payload) for s in segs if s.payload] == [1460, 540, 1000]
    # sequence numbers counted every byte: the FINs sit after the uncaptured ones
    cfin, sfin = (s for s in segs if s.flags & FIN)
    assert cfin.seq == 101 + 2004 and sfin.seq == 901 + 5000

    path = tmp_path / "capped.pcap"
    path.write_bytes(pcap_header() + b"".join(parts))
    lengths = tshark(path, "-T", "fields", "-e", "tcp.len").split()
    assert sum(map(int, lengths)) == 3000
    lost = tshark(path, "-Y", "tcp.analysis.lost_segment", "-T", "fields", "-e", "tcp.srcport")
    assert sorted(lost.split()) == ["443", "51000"]


def test_a_cap_of_zero_records_the_connection_without_payload() -> None:
    flow = FlowSynthesizer(*V6, ts=fixed_ts, cap=0)
    opened = flow.open()
    assert flow.client_data(b"GET / HTTP/1.1\r\n\r\n") == b""
    assert [s.flags for s in segments(opened + flow.close())] == [
        SYN, SYN | ACK, ACK, FIN | ACK, FIN | ACK, ACK,
    ]  # fmt: skip
    assert flow.truncated_bytes == 18


# -- files ---------------------------------------------------------------------------------
class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def pcaps(directory: Path, prefix: str = "tlsgate") -> list[Path]:
    """The writer's files, oldest first."""
    name = re.compile(re.escape(prefix) + r"-\d{8}T\d{6}Z-\d{4}\.pcap")
    return sorted(p for p in directory.iterdir() if name.fullmatch(p.name))


def tagged_flow(port: int, size: int = 2500) -> bytes:
    flow = FlowSynthesizer(("192.0.2.10", port), ("198.51.100.20", 443), ts=fixed_ts)
    return flow.open() + flow.client_data(b"p" * size) + flow.close()


@needs_tshark
def test_rotation_by_size_makes_several_valid_files_and_keeps_only_the_newest(
    tmp_path: Path,
) -> None:
    previous_run = tmp_path / "tlsgate-20200101T000000Z-0001.pcap"
    foreign = ["notes.txt", "tlsgate-w1-20200101T000000Z-0001.pcap", "tlsgate-20200101.pcap"]
    for name in [previous_run.name, *foreign]:
        (tmp_path / name).write_bytes(b"keep me")
    flows = [tagged_flow(40000 + i) for i in range(12)]
    size = len(flows[0])
    rotate = PCAP_HEADER_BYTES + 2 * size + size // 2  # two flows per file
    with PcapFileWriter(tmp_path, rotate_bytes=rotate, keep=3) as writer:
        for records in flows:
            assert writer.submit(records)
    assert writer.files_opened == 6 and writer.dropped == 0
    kept = pcaps(tmp_path)
    assert len(kept) == 3 and not previous_run.exists()
    assert all((tmp_path / name).read_bytes() == b"keep me" for name in foreign)
    ports = []
    for path in kept:
        assert path.stat().st_size <= rotate
        assert path.read_bytes()[:PCAP_HEADER_BYTES] == pcap_header()
        assert tshark(path, "-Y", NOT_CLEAN) == ""
        ports += sorted({s.sport for s in read_segments(path)} - {443})
    assert ports == list(range(40006, 40012))


def test_rotation_by_time_closes_an_old_file_even_when_idle_and_opens_the_next_on_write(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    writer = PcapFileWriter(tmp_path, rotate_seconds=60, clock=clock)
    writer.start()
    try:
        first, second = tagged_flow(1), tagged_flow(2)
        writer.submit(first)
        until(lambda: writer.written_bytes == PCAP_HEADER_BYTES + len(first))
        clock.now += 59
        writer.submit(second)
        until(lambda: writer.written_bytes == PCAP_HEADER_BYTES + len(first) + len(second))
        assert writer.files_opened == 1
        clock.now += 2  # 61 s: the idle writer closes the file within MAX_IDLE_WAIT
        until(lambda: writer.current_path is None)
        writer.submit(first)
        until(lambda: writer.files_opened == 2 and writer.queued_bytes == 0)
    finally:
        writer.close()
    a, b = pcaps(tmp_path)
    assert a.read_bytes() == pcap_header() + first + second
    assert b.read_bytes() == pcap_header() + first


def test_a_full_queue_drops_and_counts_without_blocking_and_writes_what_it_kept(
    tmp_path: Path,
) -> None:
    records = tagged_flow(7, size=900)
    writer = PcapFileWriter(tmp_path, max_queue_bytes=10 * len(records))
    started = time.monotonic()
    kept = [writer.submit(records) for _ in range(100)]  # nothing drains: not started
    assert time.monotonic() - started < 1.0
    assert kept == [True] * 10 + [False] * 90
    assert (writer.dropped, writer.dropped_bytes) == (90, 90 * len(records))
    writer.start()
    writer.close()
    (path,) = pcaps(tmp_path)
    assert path.read_bytes() == pcap_header() + records * 10
    assert not writer.submit(records) and writer.dropped == 91


def test_files_are_new_and_private_to_the_owner(tmp_path: Path) -> None:
    with PcapFileWriter(tmp_path, prefix="w3") as writer:
        writer.submit(tagged_flow(1))
    (path,) = tmp_path.iterdir()
    assert path.name.startswith("w3-") and path.suffix == ".pcap"
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_bad_directory_or_setting_is_an_operator_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="create it"):
        PcapFileWriter(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        PcapFileWriter(tmp_path / "file")
    with pytest.raises(ConfigError, match="prefix"):
        PcapFileWriter(tmp_path, prefix="../escape")
    with pytest.raises(ConfigError, match="keep"):
        PcapFileWriter(tmp_path, keep=0)
    with pytest.raises(ConfigError, match="rotate_bytes"):
        PcapFileWriter(tmp_path, rotate_bytes=100)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to change user")
def test_start_refuses_a_directory_the_process_can_no_longer_write_after_dropping_root(
    tmp_path: Path,
) -> None:
    private = tmp_path / "root-only"
    private.mkdir(mode=0o700)
    script = (
        "import os, sys\n"
        "from tlsgate.errors import ConfigError\n"
        "from tlsgate.workers.pcap import PcapFileWriter\n"
        "writer = PcapFileWriter(sys.argv[1])  # as root: fine\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "try:\n"
        "    writer.start()\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(private)], capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "not writable by uid 65534" in proc.stdout


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=192k,mode=0700", "tmpfs", str(mountpoint)]
    proc = subprocess.run(mount, capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True, timeout=10)


@needs_tshark
def test_disk_full_drops_and_counts_keeps_running_and_resumes_when_space_returns(
    tiny_tmpfs: Path,
) -> None:
    filler = tiny_tmpfs / "filler"
    filler.write_bytes(b"\0" * (192 - 60) * 1024)  # ~60 KiB left
    flow = FlowSynthesizer(*V4, ts=fixed_ts)
    flow.open()
    records = flow.client_data(os.urandom(16384))  # every submission the same size
    per_submission = len(read_pcap(pcap_header() + records)[2])
    clock = ManualClock()
    writer = PcapFileWriter(tiny_tmpfs, clock=clock)
    accepted = sum(writer.submit(records) for _ in range(8))  # one batch, ~2x the free space
    writer.start()
    try:
        until(lambda: writer.write_errors >= 1 and writer.queued_bytes == 0)
        assert writer.dropped >= 1
        assert writer.last_error is not None and "No space left" in writer.last_error
        (path,) = pcaps(tiny_tmpfs)
        assert tshark(path, "-Y", NOT_CLEAN) == ""  # cut back to the last whole record

        assert writer.written_bytes > PCAP_HEADER_BYTES  # what fitted is kept

        filler.unlink()
        before = writer.written_bytes
        accepted += writer.submit(records)  # waits in the queue until the retry time
        clock.now += RETRY_SECONDS
        until(lambda: writer.written_bytes == before + len(records))
        assert writer.write_errors == 1
    finally:
        writer.close()
    written = sum(len(read_pcap(p.read_bytes())[2]) for p in pcaps(tiny_tmpfs))
    assert written == (accepted - writer.dropped) * per_submission


# -- PCAP-over-IP --------------------------------------------------------------------------
def connect(server: PcapOverIpServer, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(server.address)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "connection closed early"
        out += chunk
    return bytes(out)


def recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(1 << 20):
        out += chunk
    return bytes(out)


@needs_tshark
def test_pcap_over_ip_streams_a_pcap_that_tshark_decodes(tmp_path: Path) -> None:
    server = PcapOverIpServer("127.0.0.1", 0)
    server.start()
    try:
        client = connect(server)
        assert recv_exactly(client, PCAP_HEADER_BYTES) == pcap_header()  # registered
        assert server.clients == 1
        for records in (whole_flow(*V4), whole_flow(*V6)):
            assert server.submit(records)
    finally:
        server.close()
    path = tmp_path / "stream.pcap"
    path.write_bytes(pcap_header() + recv_all(client))
    client.close()
    methods = tshark(path, *AS_HTTP, "-Y", "http.request", "-T", "fields", "-e", "http.host")
    assert methods.split() == ["www.example.com", "api.example.com"] * 2
    assert tshark(path, *AS_HTTP, "-Y", NOT_CLEAN) == ""


def test_a_client_gets_every_submission_while_the_server_runs_in_order() -> None:
    records = [tagged_flow(port) for port in range(1, 2001)]  # 6 MB < the client's buffer
    total = sum(map(len, records))
    with PcapOverIpServer("127.0.0.1", 0) as server:
        client = connect(server)
        assert recv_exactly(client, PCAP_HEADER_BYTES) == pcap_header()
        received: list[bytes] = []
        reader = threading.Thread(target=lambda: received.append(recv_exactly(client, total)))
        reader.start()
        assert all(server.submit(r) for r in records)
        reader.join(20)  # everything arrives while the server runs, not at close()
        assert received == [b"".join(records)] and server.dropped == 0
        client.close()


def test_a_slow_client_loses_whole_submissions_counted_and_submit_never_blocks() -> None:
    flow = FlowSynthesizer(*V4, ts=fixed_ts)
    flow.open()
    records = flow.server_data(os.urandom(16384))
    per_submission = len(read_pcap(pcap_header() + records)[2])
    server = PcapOverIpServer("127.0.0.1", 0, max_client_bytes=64 * 1024)
    server.start()
    received: list[bytes] = []
    try:
        slow = connect(server, rcvbuf=4096)
        assert recv_exactly(slow, PCAP_HEADER_BYTES) == pcap_header()
        started = time.monotonic()
        kept = [server.submit(records) for _ in range(800)]  # 13 MB, the client reads none
        assert time.monotonic() - started < 5.0
        assert kept.count(False) > 0
        assert (server.dropped, server.dropped_bytes) == (
            kept.count(False), kept.count(False) * len(records),
        )  # fmt: skip
        reader = threading.Thread(target=lambda: received.append(recv_all(slow)))
        reader.start()
    finally:
        server.close()
    reader.join(10)
    slow.close()
    _, _, recs = read_pcap(pcap_header() + received[0])  # whole records only
    assert len(recs) == kept.count(True) * per_submission


def test_a_client_beyond_max_clients_is_turned_away() -> None:
    with PcapOverIpServer("127.0.0.1", 0, max_clients=1) as server:
        first = connect(server)
        assert recv_exactly(first, PCAP_HEADER_BYTES) == pcap_header()
        second = connect(server)
        assert second.recv(100) == b""
        assert server.rejected_clients == 1 and server.clients == 1
        first.close()
        second.close()


def test_a_client_that_leaves_is_forgotten() -> None:
    with PcapOverIpServer("127.0.0.1", 0) as server:
        client = connect(server)
        client.sendall(b"ignored")
        assert recv_exactly(client, PCAP_HEADER_BYTES) == pcap_header()
        client.close()
        until(lambda: server.clients == 0)
        assert server.submit(tagged_flow(1)) and server.dropped == 0


def test_a_busy_port_is_an_operator_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port}"):
            PcapOverIpServer("127.0.0.1", port)
