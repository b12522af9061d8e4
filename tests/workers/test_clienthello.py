"""The ClientHello parser: framing, fields, JA3/JA4 against published vectors and real clients."""

from __future__ import annotations

import hashlib
import itertools
import socket
import ssl
import struct
import subprocess
from collections.abc import Iterable, Sequence
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from tlsgate.errors import ClientHelloError
from tlsgate.workers.clienthello import (
    MAX_CLIENT_HELLO_BYTES,
    ClientHello,
    client_hello_end,
    normalize_hostname,
    parse_client_hello,
)

# -- building hellos byte by byte ----------------------------------------------------------


def u16(value: int) -> bytes:
    return struct.pack(">H", value)


def u16s(values: Iterable[int]) -> bytes:
    return b"".join(u16(v) for v in values)


def vec8(body: bytes) -> bytes:
    return bytes([len(body)]) + body


def vec16(body: bytes) -> bytes:
    return u16(len(body)) + body


def ext(ext_type: int, body: bytes = b"") -> bytes:
    return u16(ext_type) + vec16(body)


def sni_ext(name: bytes) -> bytes:
    return ext(0x0000, vec16(b"\x00" + vec16(name)))


def alpn_ext(*protocols: bytes) -> bytes:
    return ext(0x0010, vec16(b"".join(vec8(p) for p in protocols)))


def groups_ext(*groups: int) -> bytes:
    return ext(0x000A, vec16(u16s(groups)))


def point_formats_ext(*formats: int) -> bytes:
    return ext(0x000B, vec8(bytes(formats)))


def sigalgs_ext(*algorithms: int) -> bytes:
    return ext(0x000D, vec16(u16s(algorithms)))


def versions_ext(*versions: int) -> bytes:
    return ext(0x002B, vec8(u16s(versions)))


def key_share_ext(*entries: tuple[int, int]) -> bytes:
    return ext(0x0033, vec16(b"".join(u16(group) + vec16(bytes(n)) for group, n in entries)))


def handshake(
    ciphers: Sequence[int] = (0x1301,),
    extensions: Sequence[bytes] | None = (),
    *,
    version: int = 0x0303,
    random: bytes = bytes(32),
    session_id: bytes = b"",
) -> bytes:
    """A ClientHello handshake message; ``extensions=None`` omits the extensions block."""
    body = u16(version) + random + vec8(session_id) + vec16(u16s(ciphers)) + vec8(b"\x00")
    if extensions is not None:
        body += vec16(b"".join(extensions))
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message: bytes, *split_at: int, version: int = 0x0301) -> bytes:
    """``message`` in handshake records, cut at the given offsets."""
    cuts = [0, *split_at, len(message)]
    return b"".join(
        b"\x16" + u16(version) + vec16(message[a:b]) for a, b in itertools.pairwise(cuts)
    )


def hello(
    ciphers: Sequence[int] = (0x1301,),
    extensions: Sequence[bytes] | None = (),
    *,
    version: int = 0x0303,
    session_id: bytes = b"",
) -> bytes:
    """A ClientHello in one handshake record."""
    return records(handshake(ciphers, extensions, version=version, session_id=session_id))


def parse(message: bytes) -> ClientHello:
    return parse_client_hello(records(message))


# -- published vectors ---------------------------------------------------------------------

SPEC_CIPHERS: tuple[int, ...] = (0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030)
SPEC_CIPHERS += (0xCCA9, 0xCCA8, 0xC013, 0xC014, 0x009C, 0x009D, 0x002F, 0x0035)
SPEC_SIGALGS = (0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601)


def test_the_ja4_spec_example_hello_has_the_published_fingerprint() -> None:
    # FoxIO-LLC/ja4 technical_details/JA4.md "Example": ciphers and extensions in the
    # order of its JA4_ro, ALPN h2, TLS 1.3 offered.
    extensions = [
        ext(0x001B, vec8(u16(2))),
        sni_ext(b"example.com"),
        key_share_ext((0x001D, 32)),
        alpn_ext(b"h2", b"http/1.1"),
        ext(0x4469, vec16(vec8(b"h2"))),
        ext(0x0017),
        ext(0x002D, vec8(b"\x01")),
        sigalgs_ext(*SPEC_SIGALGS),
        ext(0x0005, b"\x01\x00\x00\x00\x00"),
        ext(0x0023),
        ext(0x0012),
        versions_ext(0x0304, 0x0303),
        ext(0xFF01, b"\x00"),
        point_formats_ext(0),
        groups_ext(0x001D, 0x0017, 0x0018),
        ext(0x0015, bytes(20)),
    ]
    parsed = parse(handshake(SPEC_CIPHERS, extensions))
    assert parsed.ja4 == "t13d1516h2_8daaf6152771_e5627efa2ab1"


GITHUB_SIGALGS: tuple[int, ...] = (0x0804, 0x0403, 0x0807, 0x0805, 0x0806, 0x0401, 0x0501)
GITHUB_SIGALGS += (0x0601, 0x0503, 0x0603, 0x0201, 0x0203)


def github_hello() -> bytes:
    """A browser's ClientHello to www.github.com, field by field from a Wireshark 4.x
    dissection that printed JA4 t13d1311h2_f57a46bbacb6_e7c285222651 and
    JA3 50982bb7732015b00f10d5024747686f (key-share bytes zeroed: not fingerprinted)."""
    ciphers = [0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8, 0xC009, 0xC013, 0xC00A]
    ciphers += [0xC014, 0x1301, 0x1302, 0x1303]
    extensions = [
        sni_ext(b"www.github.com"),
        point_formats_ext(0),
        ext(0xFF01, b"\x00"),
        ext(0x0017),
        ext(0x0012),
        ext(0x0005, b"\x01\x00\x00\x00\x00"),
        groups_ext(0x6399, 0x001D, 0x0017, 0x0018, 0x0019),
        sigalgs_ext(*GITHUB_SIGALGS),
        alpn_ext(b"h2", b"http/1.1"),
        versions_ext(0x0304, 0x0303),
        key_share_ext((0x6399, 1216), (0x001D, 32)),
    ]
    random = bytes.fromhex("a9db58b69b09230ed7c19ad16df45747ef374a63348ce1f9a20b64618f86e1d5")
    sid = bytes.fromhex("95e4dc721dcbb9d63cf82cf4c1fbbe742119e767a33569804f6848986690e482")
    return records(handshake(ciphers, extensions, random=random, session_id=sid))


def test_a_wireshark_dissected_browser_hello_has_the_published_ja3_and_ja4() -> None:
    data = github_hello()
    assert len(data) == 1494  # "Length: 1489" record, as dissected
    parsed = parse_client_hello(data)
    assert parsed.sni == "www.github.com"
    assert parsed.ja3 == (
        "771,49195-49199-49196-49200-52393-52392-49161-49171-49162-49172-4865-4866-4867,"
        "0-11-65281-23-18-5-10-13-16-43-51,25497-29-23-24-25,0"
    )
    assert parsed.ja3_hash == "50982bb7732015b00f10d5024747686f"
    assert parsed.ja4 == "t13d1311h2_f57a46bbacb6_e7c285222651"


def chrome_hello() -> bytes:
    """Chrome 143 as fingerprinted by browserleaks (its JA4_ro / JA3 text give every
    fingerprinted field), with GREASE where Chrome puts it."""
    extensions = [
        ext(0x1A1A),
        ext(0x002D, vec8(b"\x01")),
        key_share_ext((0x9A9A, 1), (0x11EC, 1216), (0x001D, 32)),
        alpn_ext(b"h2", b"http/1.1"),
        ext(0xFE0D, b"\x00\x00\x01\x00\x01\x8c" + vec16(bytes(32)) + vec16(bytes(144))),
        ext(0x0017),
        ext(0x44CD, vec16(vec8(b"h2"))),
        sni_ext(b"tls-outer.browserleaks.com"),
        point_formats_ext(0),
        groups_ext(0x9A9A, 0x11EC, 0x001D, 0x0017, 0x0018),
        versions_ext(0x5A5A, 0x0304, 0x0303),
        ext(0xFF01, b"\x00"),
        ext(0x0023),
        ext(0x0012),
        ext(0x0005, b"\x01\x00\x00\x00\x00"),
        sigalgs_ext(*SPEC_SIGALGS),
        ext(0x001B, vec8(u16(2))),
        ext(0xDADA, b"\x00"),
    ]
    return hello((0x3A3A, *SPEC_CIPHERS), extensions, session_id=bytes(32))


def test_a_chrome_hello_with_grease_has_the_published_ja3_and_ja4() -> None:
    parsed = parse_client_hello(chrome_hello())
    assert parsed.ja3 == (
        "771,4865-4866-4867-49195-49199-49196-49200-52393-52392-49171-49172-156-157-47-53,"
        "45-51-16-65037-23-17613-0-11-10-43-65281-35-18-5-13-27,4588-29-23-24,0"
    )
    assert parsed.ja3_hash == "98487aa16281980e7d1120d399efb6a4"
    assert parsed.ja4 == "t13d1516h2_8daaf6152771_d8a2da3f94cd"


def test_grease_stays_in_the_fields_but_not_in_the_fingerprints() -> None:
    parsed = parse_client_hello(chrome_hello())
    assert parsed.cipher_suites[0] == 0x3A3A
    assert parsed.extensions[0] == 0x1A1A
    assert parsed.extensions[-1] == 0xDADA
    assert parsed.supported_groups[0] == 0x9A9A
    assert parsed.versions == (0x0304, 0x0303)  # supported_versions minus GREASE


@pytest.mark.parametrize(
    ("hello_bytes", "ja3", "md5"),
    [
        (
            hello(
                (47, 53, 5, 10, 49161, 49162, 49171, 49172, 50, 56, 19, 4),
                [sni_ext(b"a.example"), groups_ext(23, 24, 25), point_formats_ext(0)],
                version=0x0301,
            ),
            "769,47-53-5-10-49161-49162-49171-49172-50-56-19-4,0-10-11,23-24-25,0",
            "ada70206e40642a3e4461f35503241d5",
        ),
        (
            hello((4, 5, 10, 9, 100, 98, 3, 6, 19, 18, 99), None, version=0x0301),
            "769,4-5-10-9-100-98-3-6-19-18-99,,,",
            "de350869b8c85de67a350c8d186f11e6",
        ),
    ],
    ids=["with-extensions", "without-extensions"],
)
def test_the_ja3_readme_examples_hash_to_their_published_md5(
    hello_bytes: bytes, ja3: str, md5: str
) -> None:
    parsed = parse_client_hello(hello_bytes)
    assert parsed.ja3 == ja3
    assert parsed.ja3_hash == md5


# -- JA4 rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "expected"),
    [
        (b"h2", "h2"),
        (b"http/1.1", "h1"),
        (b"x", "xx"),  # a single character is both first and last
        (b"\xab", "ab"),  # non-alphanumeric ends: first and last hex digit instead
        (b"\xab\xcd", "ad"),
        (b"\x30\xab", "3b"),
        (b"\x30\x31\xab\xcd", "3d"),
        (b"\x30\xab\xcd\x31", "01"),
    ],
)
def test_ja4_takes_the_first_and_last_character_of_the_first_alpn_value(
    protocol: bytes, expected: str
) -> None:
    parsed = parse(handshake(extensions=[alpn_ext(protocol, b"h3")]))
    assert parsed.ja4[8:10] == expected


def test_ja4_alpn_is_00_without_alpn_and_the_destination_is_i_without_sni() -> None:
    parsed = parse(handshake(extensions=[groups_ext(29)]))
    assert parsed.ja4.startswith("t12i010100_")
    assert parsed.alpn == ()
    assert parsed.sni is None


def test_ja4_version_is_the_highest_non_grease_supported_version_else_legacy() -> None:
    offered = parse(handshake(extensions=[versions_ext(0x0A0A, 0x0303, 0x0304)]))
    assert offered.ja4.startswith("t13")
    assert offered.max_version == 0x0304
    legacy = parse(handshake(version=0x0301))
    assert legacy.ja4.startswith("t10")
    assert legacy.versions == (0x0301,)
    unknown = parse(handshake(extensions=[versions_ext(0x7F1C)]))
    assert unknown.ja4.startswith("t00")


def test_ja4_counts_are_capped_at_99() -> None:
    many_ciphers = tuple(range(0x0100, 0x0100 + 120))
    many_extensions = [ext(0x1000 + i) for i in range(120)]
    parsed = parse(handshake(many_ciphers, many_extensions))
    assert parsed.ja4[4:8] == "9999"


def test_ja4_cipher_hash_is_zeros_when_only_grease_ciphers_are_offered() -> None:
    parsed = parse(handshake((0x0A0A,), [groups_ext(29)]))
    assert parsed.ja4.split("_")[0][4:6] == "00"
    assert parsed.ja4.split("_")[1] == "000000000000"


def test_ja4_extension_hash_is_zeros_when_only_sni_and_alpn_are_sent() -> None:
    parsed = parse(handshake(extensions=[sni_ext(b"a.example"), alpn_ext(b"h2")]))
    assert parsed.ja4 == "t12d0102h2_" + hashlib.sha256(b"1301").hexdigest()[:12] + "_000000000000"


def test_ja4_extension_hash_has_no_underscore_without_signature_algorithms() -> None:
    extensions = [ext(t) for t in (0x0005, 0x0017, 0xFF01)] + [groups_ext(29)]
    parsed = parse(handshake(extensions=extensions))
    expected = hashlib.sha256(b"0005,000a,0017,ff01").hexdigest()[:12]
    assert parsed.ja4.endswith("_" + expected)


def test_ja4_extension_hash_keeps_signature_algorithms_in_sent_order_without_grease() -> None:
    extensions = [sigalgs_ext(0x0806, 0x1A1A, 0x0403), ext(0x0017)]
    parsed = parse(handshake(extensions=extensions))
    expected = hashlib.sha256(b"000d,0017_0806,0403").hexdigest()[:12]
    assert parsed.ja4.endswith("_" + expected)
    assert parsed.signature_algorithms == (0x0806, 0x1A1A, 0x0403)


# -- real clients --------------------------------------------------------------------------


def python_ssl_hello(
    server_hostname: str | None = "X.Example.", alpn: Sequence[str] = ("h2", "http/1.1")
) -> tuple[bytes, ssl.SSLContext]:
    context = ssl.create_default_context()
    if alpn:
        context.set_alpn_protocols(list(alpn))
    if server_hostname is None:
        context.check_hostname = False
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read(), context


def test_python_ssl_hello_carries_sni_alpn_tls13_and_the_configured_ciphers() -> None:
    data, context = python_ssl_hello()
    assert client_hello_end(data) == len(data)
    parsed = parse_client_hello(data)
    assert parsed.sni == "x.example"  # lower-cased, trailing dot stripped
    assert parsed.alpn == (b"h2", b"http/1.1")
    assert 0x0304 in parsed.versions
    assert parsed.max_version == 0x0304
    configured = [c["id"] & 0xFFFF for c in context.get_ciphers()]
    sent = [c for c in parsed.cipher_suites if c != 0x00FF]
    # get_ciphers() may list suites the security level keeps out of the hello (Debian's
    # OpenSSL does): what was sent is the configured list, in order, minus those
    assert sent == [c for c in configured if c in set(sent)]
    assert {0x1301, 0x1302, 0x1303} <= set(sent)
    assert parsed.ja4.startswith(f"t13d{len(parsed.cipher_suites):02d}")
    assert parsed.ja4[8:10] == "h2"


def test_python_ssl_tls12_only_hello_offers_exactly_the_configured_cipher() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="tls12.example")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    parsed = parse_client_hello(outgoing.read())
    assert [c for c in parsed.cipher_suites if c != 0x00FF] == [0xC02F]
    assert 0x002B not in parsed.extensions  # no supported_versions
    assert parsed.versions == (0x0303,)
    assert parsed.ja4.startswith("t12d")


def test_python_ssl_hello_without_server_name_or_alpn_has_neither() -> None:
    data, _ = python_ssl_hello(server_hostname=None, alpn=())
    parsed = parse_client_hello(data)
    assert parsed.sni is None
    assert parsed.alpn == ()
    assert 0x0000 not in parsed.extensions
    assert parsed.ja4[3] == "i"
    assert parsed.ja4[8:10] == "00"


def test_pyopenssl_hello_carries_sni_alpn_and_the_configured_ciphers() -> None:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_alpn_protos([b"h2"])
    context.set_cipher_list(b"ECDHE-ECDSA-AES256-GCM-SHA384")
    context.set_tls13_ciphersuites(b"TLS_AES_256_GCM_SHA384")
    connection = SSL.Connection(context, None)
    connection.set_connect_state()
    connection.set_tlsext_host_name(b"pyopenssl.example")
    with pytest.raises(SSL.WantReadError):
        connection.do_handshake()
    parsed = parse_client_hello(connection.bio_read(MAX_CLIENT_HELLO_BYTES))
    assert parsed.sni == "pyopenssl.example"
    assert parsed.alpn == (b"h2",)
    assert [c for c in parsed.cipher_suites if c != 0x00FF] == [0x1302, 0xC02C]
    assert parsed.max_version == 0x0304


def test_openssl_s_client_hello_is_recognised_from_the_socket_byte_stream() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(20)
        port = listener.getsockname()[1]
        argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}"]
        argv += ["-servername", "x.example", "-alpn", "h2,http/1.1"]
        client = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(20)
                data = b""
                while (end := client_hello_end(data)) is None:
                    chunk = connection.recv(4096)
                    assert chunk, "s_client closed before its ClientHello was complete"
                    data += chunk
        finally:
            client.kill()
            client.wait(timeout=20)
    parsed = parse_client_hello(data[:end])
    assert parsed.sni == "x.example"
    assert parsed.alpn == (b"h2", b"http/1.1")
    assert 0x0304 in parsed.versions
    assert {0x1301, 0x1302, 0x1303} <= set(parsed.cipher_suites)


# -- framing -------------------------------------------------------------------------------


def test_client_hello_end_is_none_until_the_last_byte_arrives() -> None:
    data = records(handshake(SPEC_CIPHERS, [sni_ext(b"a.example")]), 40)
    for cut in range(len(data)):
        assert client_hello_end(data[:cut]) is None
    assert client_hello_end(data) == len(data)


def test_bytes_after_the_hello_are_not_counted() -> None:
    data = hello(SPEC_CIPHERS)
    change_cipher_spec = b"\x14\x03\x03\x00\x01\x01"
    assert client_hello_end(data + change_cipher_spec) == len(data)
    assert parse_client_hello(data + change_cipher_spec) == parse_client_hello(data)


def test_a_hello_fragmented_into_two_records_parses_like_one_record() -> None:
    message = handshake(SPEC_CIPHERS, [sni_ext(b"frag.example"), alpn_ext(b"h2")])
    whole, split = records(message), records(message, 50)
    assert client_hello_end(split) == len(split) == len(whole) + 5
    assert parse_client_hello(split) == parse_client_hello(whole)
    assert parse_client_hello(split).sni == "frag.example"


def test_a_hello_split_inside_its_handshake_header_is_reassembled() -> None:
    message = handshake(extensions=[sni_ext(b"tiny.example")])
    data = records(message, 1, 2, 3)
    assert client_hello_end(data[:8]) is None
    assert client_hello_end(data) == len(data)
    assert parse_client_hello(data).sni == "tiny.example"


def test_plain_http_is_refused_with_a_message_saying_so() -> None:
    with pytest.raises(ClientHelloError) as caught:
        client_hello_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert "client sent plain HTTP (or other non-TLS bytes) where a TLS ClientHello was " in str(
        caught.value
    )
    assert "GET / HTTP" in str(caught.value)


def test_an_sslv2_format_hello_is_refused() -> None:
    sslv2 = b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10"
    with pytest.raises(ClientHelloError, match="SSLv2"):
        client_hello_end(sslv2)


def test_the_key_share_groups_are_read_in_the_order_sent_grease_included() -> None:
    # what tells a post-quantum client (X25519MLKEM768 share) from a classical one
    assert parse_client_hello(chrome_hello()).key_share_groups == (0x9A9A, 0x11EC, 0x001D)
    assert parse(handshake()).key_share_groups == ()


@pytest.mark.parametrize(
    "body",
    [
        b"\x00",  # no room for the list length
        u16(9) + u16(0x001D) + u16(1) + b"\x00",  # the list length says 9, it holds 5
        u16(4) + u16(0x001D) + u16(0),  # an empty key
        u16(6) + u16(0x001D) + u16(32) + b"\x00\x00",  # key overruns the extension
        u16(3) + u16(0x001D) + b"\x00",  # an entry header cut short
    ],
    ids=["short", "length-mismatch", "empty-key", "key-overrun", "entry-truncated"],
)
def test_a_malformed_key_share_is_refused(body: bytes) -> None:
    with pytest.raises(ClientHelloError, match="key_share"):
        parse(handshake(extensions=[ext(0x0033, body)]))


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (b"\x16\x02", "major is 2"),
        (b"\x16\x03\x01\x00\x00", "empty"),
        (b"\x16\x03\x01\x40\x01", "16384"),
        (b"\x16\x03\x01\x00\x30\x02", "type 2, not 1"),
        (b"\x16\x03\x01\x00\x04\x01\x01\x00\x00", f"larger than {MAX_CLIENT_HELLO_BYTES}"),
    ],
    ids=["record-major-2", "zero-length-record", "oversized-record", "server-hello", "too-big"],
)
def test_bytes_that_cannot_start_a_client_hello_are_refused_at_once(
    data: bytes, complaint: str
) -> None:
    with pytest.raises(ClientHelloError, match=complaint):
        client_hello_end(data)


def test_a_hello_larger_than_the_limit_is_refused_across_records() -> None:
    header = b"\x01" + (MAX_CLIENT_HELLO_BYTES - 100).to_bytes(3, "big")
    first = b"\x16\x03\x01" + vec16(header + bytes(16000))
    following = (b"\x16\x03\x01" + vec16(bytes(16384))) * 4
    with pytest.raises(ClientHelloError, match="larger than"):
        client_hello_end(first + following)


def test_another_record_type_inside_a_fragmented_hello_is_refused() -> None:
    message = handshake(SPEC_CIPHERS)
    data = records(message[:30]) + b"\x15\x03\x03\x00\x02\x02\x28" + records(message[30:])
    with pytest.raises(ClientHelloError, match="content type 21"):
        client_hello_end(data)


def test_handshake_bytes_after_the_hello_in_its_last_record_are_refused() -> None:
    data = records(handshake() + b"\x14\x00\x00\x00")
    with pytest.raises(ClientHelloError, match="another handshake message"):
        client_hello_end(data)


def test_a_truncated_hello_cannot_be_parsed() -> None:
    data = hello(SPEC_CIPHERS)
    with pytest.raises(ClientHelloError, match="truncated"):
        parse_client_hello(data[:-1])


# -- fields --------------------------------------------------------------------------------


def test_sni_is_lower_cased_and_loses_its_trailing_dot() -> None:
    assert parse(handshake(extensions=[sni_ext(b"WWW.Example.COM.")])).sni == "www.example.com"


def test_sni_accepts_underscores_and_idna_a_labels() -> None:
    name = b"_srv.xn--bcher-kva.example"
    assert parse(handshake(extensions=[sni_ext(name)])).sni == name.decode()


@pytest.mark.parametrize(
    ("name", "complaint"),
    [
        ("bücher.example".encode(), "xn--"),
        (b"a..example", "empty label"),
        (b"a" * 64 + b".example", "longer than 63"),
        (b"x" * 250 + b".example", "at most 253"),
        (b"10.0.0.1", "IP address literal"),
        (b"evil.example\x00.good.example", "other than letters"),
    ],
    ids=["non-ascii", "empty-label", "long-label", "long-name", "ip-literal", "nul-byte"],
)
def test_an_invalid_sni_host_name_is_refused(name: bytes, complaint: str) -> None:
    with pytest.raises(ClientHelloError, match=complaint):
        parse(handshake(extensions=[sni_ext(name)]))


def test_server_name_must_hold_exactly_one_host_name() -> None:
    two = ext(0x0000, vec16(b"\x00" + vec16(b"a.example") + b"\x00" + vec16(b"b.example")))
    with pytest.raises(ClientHelloError, match="exactly one host_name"):
        parse(handshake(extensions=[two]))
    other_type = ext(0x0000, vec16(b"\x01" + vec16(b"a.example")))
    with pytest.raises(ClientHelloError, match="not host_name"):
        parse(handshake(extensions=[other_type]))
    empty = ext(0x0000)
    with pytest.raises(ClientHelloError, match="server_name"):
        parse(handshake(extensions=[empty]))


def test_an_extension_sent_twice_is_refused() -> None:
    with pytest.raises(ClientHelloError, match="more than once"):
        parse(handshake(extensions=[ext(0x0017), ext(0x0017)]))


def test_pre_shared_key_must_be_the_last_extension_and_marks_resumption() -> None:
    psk = ext(0x0029, bytes(10))
    assert parse(handshake(extensions=[ext(0x0017), psk])).has_session_ticket
    with pytest.raises(ClientHelloError, match="last extension"):
        parse(handshake(extensions=[psk, ext(0x0017)]))


def test_only_a_non_empty_session_ticket_marks_resumption() -> None:
    assert not parse(handshake(extensions=[ext(0x0023)])).has_session_ticket
    assert parse(handshake(extensions=[ext(0x0023, b"ticket")])).has_session_ticket


def test_supported_versions_with_only_grease_is_refused() -> None:
    with pytest.raises(ClientHelloError, match="only GREASE"):
        parse(handshake(extensions=[versions_ext(0x0A0A)]))


def test_an_empty_alpn_protocol_name_or_list_is_refused() -> None:
    with pytest.raises(ClientHelloError, match="ALPN"):
        parse(handshake(extensions=[alpn_ext(b"h2", b"")]))
    with pytest.raises(ClientHelloError, match="ALPN"):
        parse(handshake(extensions=[ext(0x0010, vec16(b""))]))


def test_a_session_id_longer_than_32_bytes_is_refused() -> None:
    with pytest.raises(ClientHelloError, match="session id"):
        parse(handshake(session_id=bytes(33)))


def test_the_session_id_point_formats_and_groups_are_kept_as_sent() -> None:
    parsed = parse(
        handshake(
            extensions=[point_formats_ext(0, 1, 2), groups_ext(0x2A2A, 29, 23)],
            session_id=b"\x07" * 32,
        )
    )
    assert parsed.session_id == b"\x07" * 32
    assert parsed.ec_point_formats == (0, 1, 2)
    assert parsed.supported_groups == (0x2A2A, 29, 23)
    assert parsed.extensions == (0x000B, 0x000A)


@pytest.mark.parametrize(
    "message",
    [
        handshake((0x1301,), [ext(0x000A, vec16(b"\x00\x1d\x00"))]),  # odd group list
        handshake((0x1301,), [ext(0x000D, vec16(b""))]),  # empty sigalgs
        handshake((0x1301,), [ext(0x000B, b"")]),  # empty point formats extension
        handshake((0x1301,), [ext(0x000B, b"\x00")]),  # empty point formats list
        handshake((0x1301,), [ext(0x002B, vec8(b"\x03\x04\x03"))]),  # odd versions
        handshake((0x1301,), [u16(0x0017) + u16(10) + b"ab"]),  # extension overruns
        handshake(()),  # no cipher suites
    ],
    ids=[
        "groups",
        "sigalgs",
        "point-formats-extension",
        "point-formats-list",
        "versions",
        "overrun",
        "no-ciphers",
    ],
)
def test_lists_whose_lengths_do_not_fit_are_refused(message: bytes) -> None:
    with pytest.raises(ClientHelloError, match="malformed TLS ClientHello"):
        parse(message)


def test_normalize_hostname_returns_the_canonical_name() -> None:
    assert normalize_hostname(b"Mail.Example.") == "mail.example"
    with pytest.raises(ValueError, match="IP address literal"):
        normalize_hostname(b"0x7f000001")
    with pytest.raises(ValueError, match="IP address literal"):
        normalize_hostname(b"127.1")
    with pytest.raises(ValueError, match="empty"):
        normalize_hostname(b".")


# -- any input: a ClientHello or ClientHelloError, nothing else ----------------------------


@cache
def real_hellos() -> tuple[bytes, ...]:
    return (
        python_ssl_hello()[0],
        github_hello(),
        chrome_hello(),
        records(handshake(SPEC_CIPHERS, [sni_ext(b"a.example"), alpn_ext(b"h2")]), 20),
    )


def outcome(data: bytes) -> ClientHello | None:
    """Parse ``data`` both ways; only ClientHelloError may escape."""
    try:
        end = client_hello_end(data)
    except ClientHelloError:
        end = None
    assert end is None or 0 < end <= min(len(data), MAX_CLIENT_HELLO_BYTES)
    try:
        return parse_client_hello(data)
    except ClientHelloError:
        return None


@given(st.binary(max_size=600))
def test_any_bytes_give_a_client_hello_or_a_client_hello_error(data: bytes) -> None:
    outcome(data)


@given(st.binary(min_size=4, max_size=600), st.integers(0, 0xFF))
def test_any_handshake_body_in_valid_records_gives_a_client_hello_or_an_error(
    body: bytes, record_minor: int
) -> None:
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    outcome(records(message, version=0x0300 | record_minor))


@given(st.integers(0, 3), st.data())
def test_truncations_of_real_hellos_give_a_client_hello_or_an_error(
    which: int, data: st.DataObject
) -> None:
    original = real_hellos()[which]
    cut = data.draw(st.integers(0, len(original)))
    result = outcome(original[:cut])
    assert (result is not None) == (cut == len(original))


@settings(max_examples=300)
@given(st.integers(0, 3), st.data())
def test_byte_flips_in_real_hellos_give_a_client_hello_or_an_error(
    which: int, data: st.DataObject
) -> None:
    original = bytearray(real_hellos()[which])
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(1, 255))))
    for index, mask in flips[:4]:
        original[index] ^= mask
    outcome(bytes(original))
