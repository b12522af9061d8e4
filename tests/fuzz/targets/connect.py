"""CONNECT request parser (workers/connect.py): the first bytes of an explicit-proxy client.

Input: the bytes a client sent. Contract: :func:`parse_connect` returns ``None`` (need more,
only below the size limit), a request whose header block ends exactly at ``header_length``,
or raises ``ConnectRequestError`` with a status the worker can answer (400, 405, 414, 431); the
refusal built from any error is one well-formed HTTP response that cannot be split.
"""

from __future__ import annotations

from tlsgate.errors import ConnectRequestError
from tlsgate.workers.connect import MAX_CONNECT_HEADER_BYTES, connect_refusal, parse_connect

ERRORS = (ConnectRequestError,)
MAX_LEN = MAX_CONNECT_HEADER_BYTES + 64


def one_input(data: bytes) -> None:
    try:
        req = parse_connect(data)
    except ConnectRequestError as exc:
        assert exc.status in (400, 405, 414, 431), exc.status
        answer = connect_refusal(exc.status, str(exc))
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.count(b"\r\n") == 3 and body.count(b"\n") == 1 and body.endswith(b"\n")
        raise
    if req is None:
        assert len(data) < MAX_CONNECT_HEADER_BYTES
        return
    n = req.header_length
    assert n <= len(data) and n <= MAX_CONNECT_HEADER_BYTES + 4
    assert data[:n].endswith(b"\r\n\r\n") and data.find(b"\r\n\r\n") == n - 4
    assert 1 <= req.port <= 65535 and req.host
    assert parse_connect(data[:n]) == req
