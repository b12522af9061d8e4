"""ClientHello parser (workers/clienthello.py): the first bytes of every TLS connection.

Input: the bytes a client sent. Contract: :func:`client_hello_end` and
:func:`parse_client_hello` return or raise ``ClientHelloError``; a complete hello is never
larger than the peek buffer, every prefix of it is "need more" (the worker peeks
incrementally), and the result holds a normalized SNI and well-formed fingerprints.
"""

from __future__ import annotations

import re

from tlsgate.errors import ClientHelloError
from tlsgate.workers.clienthello import (
    MAX_CLIENT_HELLO_BYTES,
    MAX_HOSTNAME_LENGTH,
    client_hello_end,
    parse_client_hello,
)

ERRORS = (ClientHelloError,)
MAX_LEN = MAX_CLIENT_HELLO_BYTES + 64

_JA4 = re.compile(r"t(13|12|11|10|s3|s2|s1|d1|d2|d3|00)[di]\d\d\d\d.._[0-9a-f]{12}_[0-9a-f]{12}")
_SNI = re.compile(r"[a-z0-9_.-]+")


def one_input(data: bytes) -> None:
    end = client_hello_end(data)
    if end is None:
        assert len(data) < MAX_CLIENT_HELLO_BYTES
        return
    assert 0 < end <= len(data) and end <= MAX_CLIENT_HELLO_BYTES
    for cut in (end - 1, end // 2):
        assert client_hello_end(data[:cut]) is None, f"prefix of {cut} bytes not 'need more'"
    hello = parse_client_hello(data)
    assert parse_client_hello(data[:end]) == hello
    if hello.sni is not None:
        assert 0 < len(hello.sni) <= MAX_HOSTNAME_LENGTH and _SNI.fullmatch(hello.sni)
    assert len(hello.ja3_hash) == 32 and hello.ja3.count(",") == 4
    assert _JA4.match(hello.ja4), hello.ja4
