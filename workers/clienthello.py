"""Sans-I/O parser for the TLS ClientHello a client sends first, with JA3 and JA4.

The worker peeks (``MSG_PEEK``) at the first bytes of a connection and calls
:func:`client_hello_end` until it returns the size of the records that carry the complete
ClientHello, then :func:`parse_client_hello` on those bytes. Nothing here touches a socket.

Rules (RFC 8446 sections 4.1.2 and 5.1, RFC 6066, RFC 7301):

- The bytes are TLS records of content type 22 (handshake), record version major 3, each
  carrying 1..2^14 payload bytes. The ClientHello (handshake type 1) may be fragmented
  across several records; no other record type may come before it is complete, and the
  record that completes it carries nothing else. SSLv2-format hellos are refused.
- The records carrying it are at most :data:`MAX_CLIENT_HELLO_BYTES` in all (the worker's
  peek buffer).
- Every length field must agree exactly with what it encloses; an extension type may
  appear only once; ``pre_shared_key`` must be the last extension; the lists we read
  (server_name, ALPN, supported_groups, ec_point_formats, signature_algorithms,
  supported_versions) must be well formed and non-empty, as OpenSSL requires.
- SNI: exactly one ``host_name``; ASCII letters, digits, ``-``, ``_`` and dots only,
  labels of 1..63 characters, at most 253 characters; lower-cased, one trailing dot
  stripped; IP address literals are refused (RFC 6066 forbids them).
- Failures raise :class:`~tlsgate.errors.ClientHelloError` and nothing else, for any input.

Fingerprints (computed eagerly: together they cost about as much as the parse, and every
connection event carries them):

- JA3 (Salesforce): ``legacy_version,ciphers,extensions,groups,point_formats`` in decimal,
  values joined by ``-``, GREASE removed everywhere; ``ja3_hash`` is its MD5.
- JA4 (FoxIO, TLS over TCP): ``t`` + version (highest non-GREASE supported_versions entry,
  else legacy_version) + ``d``/``i`` (SNI present or not) + two-digit counts of non-GREASE
  ciphers and extensions (capped at 99) + first/last character of the first ALPN value
  (``00`` without ALPN; the first/last hex digit when either end byte is not ASCII
  alphanumeric) ``_`` sha256[:12] of the sorted 4-hex-digit ciphers ``_`` sha256[:12] of the
  sorted extensions without SNI and ALPN, then ``_`` and the signature algorithms in their
  original order (no ``_`` without any); an empty list hashes to ``000000000000``.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass

from tlsgate.errors import ClientHelloError

#: The most bytes (records included) a ClientHello may occupy; it is also the peek size.
MAX_CLIENT_HELLO_BYTES = 65536
#: Largest TLSPlaintext fragment (RFC 8446 section 5.1).
MAX_RECORD_PAYLOAD = 2**14
#: Longest host name (RFC 1035 section 2.3.4, without the trailing dot).
MAX_HOSTNAME_LENGTH = 253
#: How many leading bytes an error message shows of what the client sent.
MAX_SHOWN_BYTES = 16

RECORD_HEADER_LENGTH = 5
HANDSHAKE_HEADER_LENGTH = 4
CONTENT_TYPE_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
RANDOM_LENGTH = 32
MAX_SESSION_ID_LENGTH = 32

EXT_SERVER_NAME = 0x0000
EXT_SUPPORTED_GROUPS = 0x000A
EXT_EC_POINT_FORMATS = 0x000B
EXT_SIGNATURE_ALGORITHMS = 0x000D
EXT_ALPN = 0x0010
EXT_SESSION_TICKET = 0x0023
EXT_PRE_SHARED_KEY = 0x0029
EXT_SUPPORTED_VERSIONS = 0x002B
EXT_KEY_SHARE = 0x0033
SNI_HOST_NAME = 0

#: RFC 8701 GREASE values: 0x0a0a, 0x1a1a, ..., 0xfafa.
GREASE = frozenset(0x0A0A + 0x1010 * i for i in range(16))

_JA4_VERSIONS = {
    0x0304: "13",
    0x0303: "12",
    0x0302: "11",
    0x0301: "10",
    0x0300: "s3",
    0x0200: "s2",
    0x0002: "s2",
    0x0100: "s1",
    0xFEFF: "d1",
    0xFEFD: "d2",
    0xFEFC: "d3",
}
_JA4_EMPTY_HASH = "000000000000"
_JA4_NO_ALPN = "00"
_ALNUM = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")

_HOSTNAME = re.compile(rb"[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*")
_HOSTNAME_BAD_BYTE = re.compile(rb"[^a-z0-9_.-]")
# A last label that is a number makes resolvers read the name as an IPv4 address
# ("127.1", "0x7f000001"), so such names are IP literals, not host names.
_NUMERIC_LAST_LABEL = re.compile(rb"(?:^|\.)(?:[0-9]+|0x[0-9a-f]*)\Z")

_PLAIN_TEXT_HINT = (
    "client sent plain HTTP (or other non-TLS bytes) where a TLS ClientHello was expected"
)


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What a client offered in its ClientHello, and its JA3/JA4 fingerprints.

    Lists are as sent (GREASE included) except ``versions``; the fingerprints drop GREASE.
    """

    legacy_version: int
    #: supported_versions without GREASE, or ``(legacy_version,)`` when it is absent.
    versions: tuple[int, ...]
    cipher_suites: tuple[int, ...]
    #: Extension types in the order sent.
    extensions: tuple[int, ...]
    #: host_name from server_name: lower-case ASCII, no trailing dot; None when absent.
    sni: str | None
    alpn: tuple[bytes, ...]
    supported_groups: tuple[int, ...]
    #: The groups of the key_share extension's entries (TLS 1.3), in the order sent.
    key_share_groups: tuple[int, ...]
    ec_point_formats: tuple[int, ...]
    signature_algorithms: tuple[int, ...]
    session_id: bytes
    #: A non-empty session_ticket extension or a pre_shared_key extension: resumption.
    has_session_ticket: bool
    ja3: str
    ja3_hash: str
    ja4: str

    @property
    def max_version(self) -> int:
        """The highest protocol version offered (e.g. 0x0304 for TLS 1.3)."""
        return max(self.versions)


def _show(data: bytes) -> str:
    """A short, escaped rendering of peer bytes for error messages."""
    shown = repr(bytes(data[:MAX_SHOWN_BYTES]))
    return shown + ("..." if len(data) > MAX_SHOWN_BYTES else "")


def _malformed(detail: str) -> ClientHelloError:
    return ClientHelloError(
        f"malformed TLS ClientHello: {detail}; the connection was closed "
        "(the client is broken or not speaking TLS)"
    )


def _not_tls(data: bytes) -> ClientHelloError:
    if data[0] & 0x80:
        return ClientHelloError(
            "client sent an SSLv2-format ClientHello (first bytes "
            f"{_show(data)}); SSL 2.0 framing is not supported: configure the client for "
            "TLS 1.2 or later"
        )
    return ClientHelloError(
        f"{_PLAIN_TEXT_HINT} (first bytes {_show(data)}); if it is an HTTP client, "
        "point it at the gateway as an HTTPS proxy or at an https:// URL"
    )


def normalize_hostname(raw: bytes) -> str:
    """Validate a DNS host name as sent on the wire and return it in canonical form.

    Lower-cases, strips one trailing dot, and requires ASCII letters, digits, ``-``,
    ``_`` and dots, labels of 1..63 characters, at most 253 characters, and a last label
    that is not a number (that would be an IPv4 literal). IDNA A-labels pass unchanged.
    Raises :class:`ValueError` saying what is wrong.
    """
    name = raw.lower()
    if name.endswith(b"."):
        name = name[:-1]
    if not name:
        raise ValueError("the host name is empty")
    if len(name) > MAX_HOSTNAME_LENGTH:
        raise ValueError(f"the host name is {len(name)} characters long (at most 253)")
    if _HOSTNAME.fullmatch(name) is None:
        if _HOSTNAME_BAD_BYTE.search(name) is not None:
            raise ValueError(
                f"{_show(raw)} holds a character other than letters, digits, '-', '_' and "
                "'.' (internationalised names must be sent as xn-- A-labels)"
            )
        raise ValueError(f"{_show(raw)} has an empty label or one longer than 63 characters")
    if _NUMERIC_LAST_LABEL.search(name) is not None:
        raise ValueError(f"{_show(raw)} is an IP address literal, not a host name")
    return name.decode("ascii")


def client_hello_end(data: bytes) -> int | None:
    """How many bytes (records included) carry the complete ClientHello in ``data``.

    ``data`` is what the client sent so far. Returns ``None`` while more bytes are needed;
    raises :class:`ClientHelloError` as soon as the bytes cannot be a TLS ClientHello.
    Bytes after the returned offset (e.g. early data) are not looked at.
    """
    n = len(data)
    if n == 0:
        return None
    if data[0] != CONTENT_TYPE_HANDSHAKE:
        raise _not_tls(data)
    offset = 0
    header = b""  # the first bytes of the handshake message, up to its 4-byte header
    message_length = -1  # handshake header + body, once known
    seen = 0  # handshake bytes in complete records
    while True:
        if n - offset < RECORD_HEADER_LENGTH:
            _check_record_header_prefix(data, offset)
            return None
        _check_record_header_prefix(data, offset)
        payload_length = (data[offset + 3] << 8) | data[offset + 4]
        if payload_length == 0:
            raise _malformed("a handshake record is empty (zero-length fragment)")
        if payload_length > MAX_RECORD_PAYLOAD:
            raise _malformed(
                f"a record claims {payload_length} bytes, more than the 16384 TLS allows"
            )
        start = offset + RECORD_HEADER_LENGTH
        end = start + payload_length
        if end > MAX_CLIENT_HELLO_BYTES:
            raise _too_large()
        if message_length < 0:
            header += data[start : min(end, n, start + HANDSHAKE_HEADER_LENGTH - len(header))]
            if header and header[0] != HANDSHAKE_CLIENT_HELLO:
                raise _malformed(f"the first handshake message has type {header[0]}, not 1")
            if len(header) == HANDSHAKE_HEADER_LENGTH:
                message_length = HANDSHAKE_HEADER_LENGTH + int.from_bytes(header[1:4], "big")
                if message_length + RECORD_HEADER_LENGTH > MAX_CLIENT_HELLO_BYTES:
                    raise _too_large()
        if end > n:
            return None
        seen += payload_length
        offset = end
        if message_length >= 0 and seen >= message_length:
            if seen > message_length:
                raise _malformed(
                    f"{seen - message_length} bytes of another handshake message follow "
                    "the ClientHello in its last record"
                )
            return offset


def _check_record_header_prefix(data: bytes, offset: int) -> None:
    """Check the type and major version of the record at ``offset``, as far as present."""
    n = len(data)
    if offset < n and data[offset] != CONTENT_TYPE_HANDSHAKE:
        raise _malformed(
            f"a record of content type {data[offset]} arrived before the ClientHello was complete"
        )
    if offset + 1 < n and data[offset + 1] != 3:
        raise _malformed(f"record version major is {data[offset + 1]}, not 3 (TLS 1.x / SSL 3.0)")


def _too_large() -> ClientHelloError:
    return _malformed(f"it is larger than {MAX_CLIENT_HELLO_BYTES} bytes")


def parse_client_hello(data: bytes) -> ClientHello:
    """Parse the ClientHello carried by the TLS records at the start of ``data``.

    ``data`` must hold at least the complete ClientHello (see :func:`client_hello_end`);
    anything after it is ignored. Returns a :class:`ClientHello` or raises
    :class:`ClientHelloError`, for any input.
    """
    end = client_hello_end(data)
    if end is None:
        raise _malformed(f"it is truncated ({len(data)} bytes received)")
    first_length = (data[3] << 8) | data[4]
    if first_length + RECORD_HEADER_LENGTH == end:
        message = data[RECORD_HEADER_LENGTH:end]
    else:
        fragments = []
        offset = 0
        while offset < end:
            length = (data[offset + 3] << 8) | data[offset + 4]
            fragments.append(data[offset + RECORD_HEADER_LENGTH : offset + 5 + length])
            offset += RECORD_HEADER_LENGTH + length
        message = b"".join(fragments)
    return _parse_message(message)


def _u16_list(m: bytes, start: int, end: int, what: str) -> tuple[int, ...]:
    """A non-empty ``<2..2^16-2>`` vector of uint16 filling ``m[start:end]`` exactly."""
    if end - start < 2:
        raise _malformed(f"the {what} extension is truncated")
    length = (m[start] << 8) | m[start + 1]
    if length == 0 or length & 1 or start + 2 + length != end:
        raise _malformed(f"the {what} list length {length} does not fit its extension")
    return struct.unpack_from(f">{length >> 1}H", m, start + 2)


def _parse_sni(m: bytes, start: int, end: int) -> str:
    if end - start < 5:
        raise _malformed("the server_name extension is truncated or empty")
    if ((m[start] << 8) | m[start + 1]) != end - start - 2:
        raise _malformed("the server_name list length does not fit its extension")
    if m[start + 2] != SNI_HOST_NAME:
        raise _malformed(f"server_name has name type {m[start + 2]}, not host_name (0)")
    length = (m[start + 3] << 8) | m[start + 4]
    if start + 5 + length != end:
        raise _malformed("server_name must hold exactly one host_name")
    try:
        return normalize_hostname(m[start + 5 : end])
    except ValueError as exc:
        raise ClientHelloError(
            f"client sent an invalid SNI host name: {exc}; the connection was closed"
        ) from None


def _parse_alpn(m: bytes, start: int, end: int) -> tuple[bytes, ...]:
    if end - start < 2 or ((m[start] << 8) | m[start + 1]) != end - start - 2:
        raise _malformed("the ALPN list length does not fit its extension")
    offset = start + 2
    if offset == end:
        raise _malformed("the ALPN protocol list is empty")
    protocols = []
    while offset < end:
        length = m[offset]
        offset += 1
        if length == 0 or offset + length > end:
            raise _malformed("an ALPN protocol name is empty or overruns the list")
        protocols.append(m[offset : offset + length])
        offset += length
    return tuple(protocols)


def _parse_supported_versions(m: bytes, start: int, end: int) -> tuple[int, ...]:
    length = m[start] if end > start else -1
    if length < 2 or length & 1 or start + 1 + length != end:
        raise _malformed("the supported_versions list length does not fit its extension")
    versions = tuple(
        v for v in struct.unpack_from(f">{length >> 1}H", m, start + 1) if v not in GREASE
    )
    if not versions:
        raise _malformed("supported_versions lists only GREASE values")
    return versions


def _parse_message(m: bytes) -> ClientHello:
    """Parse a complete handshake message (4-byte header included) known to be type 1."""
    n = len(m)
    offset = HANDSHAKE_HEADER_LENGTH
    if n < offset + 2 + RANDOM_LENGTH + 1:
        raise _malformed("it is too short to hold a version, random and session id")
    legacy_version = (m[offset] << 8) | m[offset + 1]
    offset += 2 + RANDOM_LENGTH
    sid_length = m[offset]
    offset += 1
    if sid_length > MAX_SESSION_ID_LENGTH:
        raise _malformed(f"the session id is {sid_length} bytes long (at most 32)")
    if offset + sid_length + 2 > n:
        raise _malformed("it ends inside the session id or before the cipher suites")
    session_id = m[offset : offset + sid_length]
    offset += sid_length
    cs_length = (m[offset] << 8) | m[offset + 1]
    offset += 2
    if cs_length == 0 or cs_length & 1 or offset + cs_length + 1 > n:
        raise _malformed(f"the cipher suite list length {cs_length} is invalid")
    cipher_suites: tuple[int, ...] = struct.unpack_from(f">{cs_length >> 1}H", m, offset)
    offset += cs_length
    cm_length = m[offset]
    offset += 1
    if cm_length == 0 or offset + cm_length > n:
        raise _malformed("the compression method list is empty or truncated")
    offset += cm_length

    types: list[int] = []
    seen: set[int] = set()
    sni: str | None = None
    alpn: tuple[bytes, ...] = ()
    groups: tuple[int, ...] = ()
    shares: tuple[int, ...] = ()
    point_formats: tuple[int, ...] = ()
    sigalgs: tuple[int, ...] = ()
    versions: tuple[int, ...] | None = None
    has_ticket = False
    if offset != n:  # no extensions block at all is legal before TLS 1.3
        if offset + 2 > n or ((m[offset] << 8) | m[offset + 1]) != n - offset - 2:
            raise _malformed("the extensions length does not match the message length")
        offset += 2
        while offset < n:
            if offset + 4 > n:
                raise _malformed("an extension header is truncated")
            ext_type = (m[offset] << 8) | m[offset + 1]
            start = offset + 4
            end = start + ((m[offset + 2] << 8) | m[offset + 3])
            if end > n:
                raise _malformed(f"extension {ext_type} overruns the message")
            if ext_type in seen:
                raise _malformed(f"extension {ext_type} appears more than once")
            seen.add(ext_type)
            types.append(ext_type)
            if ext_type == EXT_SERVER_NAME:
                sni = _parse_sni(m, start, end)
            elif ext_type == EXT_ALPN:
                alpn = _parse_alpn(m, start, end)
            elif ext_type == EXT_SUPPORTED_GROUPS:
                groups = _u16_list(m, start, end, "supported_groups")
            elif ext_type == EXT_EC_POINT_FORMATS:
                if end == start or m[start] == 0 or start + 1 + m[start] != end:
                    raise _malformed("the ec_point_formats list length does not fit")
                point_formats = tuple(m[start + 1 : end])
            elif ext_type == EXT_SIGNATURE_ALGORITHMS:
                sigalgs = _u16_list(m, start, end, "signature_algorithms")
            elif ext_type == EXT_SUPPORTED_VERSIONS:
                versions = _parse_supported_versions(m, start, end)
            elif ext_type == EXT_KEY_SHARE:
                shares = _parse_key_share(m, start, end)
            elif ext_type == EXT_SESSION_TICKET:
                has_ticket = has_ticket or end > start
            elif ext_type == EXT_PRE_SHARED_KEY:
                has_ticket = True
            offset = end
        if EXT_PRE_SHARED_KEY in seen and types[-1] != EXT_PRE_SHARED_KEY:
            raise _malformed("pre_shared_key is not the last extension")

    if versions is None:
        versions = (legacy_version,)
    ciphers = [c for c in cipher_suites if c not in GREASE]
    exts = [e for e in types if e not in GREASE]
    ja3 = ",".join(
        (
            str(legacy_version),
            "-".join(map(str, ciphers)),
            "-".join(map(str, exts)),
            "-".join([str(g) for g in groups if g not in GREASE]),
            "-".join(map(str, point_formats)),
        )
    )
    return ClientHello(
        legacy_version=legacy_version,
        versions=versions,
        cipher_suites=cipher_suites,
        extensions=tuple(types),
        sni=sni,
        alpn=alpn,
        supported_groups=groups,
        key_share_groups=shares,
        ec_point_formats=point_formats,
        signature_algorithms=sigalgs,
        session_id=session_id,
        has_session_ticket=has_ticket,
        ja3=ja3,
        ja3_hash=hashlib.md5(ja3.encode("ascii"), usedforsecurity=False).hexdigest(),
        ja4=_ja4(versions, ciphers, exts, alpn, sigalgs),
    )


def _parse_key_share(m: bytes, start: int, end: int) -> tuple[int, ...]:
    """The group of each KeyShareEntry (RFC 8446 section 4.2.8), key bytes skipped."""
    if end - start < 2 or ((m[start] << 8) | m[start + 1]) != end - start - 2:
        raise _malformed("the key_share list length does not fit the extension")
    groups = []
    offset = start + 2
    while offset < end:
        if offset + 4 > end:
            raise _malformed("a key_share entry is truncated")
        groups.append((m[offset] << 8) | m[offset + 1])
        length = (m[offset + 2] << 8) | m[offset + 3]
        offset += 4 + length
        if length == 0 or offset > end:
            raise _malformed("a key_share entry's key is empty or overruns the extension")
    return tuple(groups)


def _hex_list(values: list[int]) -> bytes:
    """``[0x1301, 0x2f]`` -> ``b"1301,002f"``."""
    return struct.pack(f">{len(values)}H", *values).hex(",", 2).encode("ascii")


def _hash12(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()[:12]


def _ja4_alpn(alpn: tuple[bytes, ...]) -> str:
    if not alpn:
        return _JA4_NO_ALPN
    first = alpn[0]
    if first[0] in _ALNUM and first[-1] in _ALNUM:
        return chr(first[0]) + chr(first[-1])
    digits = first.hex()
    return digits[0] + digits[-1]


def _ja4(
    versions: tuple[int, ...],
    ciphers: list[int],
    exts: list[int],
    alpn: tuple[bytes, ...],
    sigalgs: tuple[int, ...],
) -> str:
    """JA4 from GREASE-free ``ciphers`` and ``exts`` (``versions`` is GREASE-free too)."""
    a = (
        f"t{_JA4_VERSIONS.get(max(versions), '00')}"
        f"{'d' if EXT_SERVER_NAME in exts else 'i'}"
        f"{min(len(ciphers), 99):02d}{min(len(exts), 99):02d}{_ja4_alpn(alpn)}"
    )
    b = _hash12(_hex_list(sorted(ciphers))) if ciphers else _JA4_EMPTY_HASH
    hashed = sorted(e for e in exts if e != EXT_SERVER_NAME and e != EXT_ALPN)
    if hashed:
        text = _hex_list(hashed)
        algorithms = [s for s in sigalgs if s not in GREASE]
        if algorithms:
            text += b"_" + _hex_list(algorithms)
        c = _hash12(text)
    else:
        c = _JA4_EMPTY_HASH
    return f"{a}_{b}_{c}"
