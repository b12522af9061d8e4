"""Pure helpers of the interception flow (the flow itself is tested end to end elsewhere)."""

from __future__ import annotations

import pytest

from tlsgate.workers.intercept import _is_ip


@pytest.mark.parametrize(
    ("name", "is_ip"),
    [
        ("bench.test", False),
        ("example.com.", False),
        ("a1", False),  # ends in a digit, still a host name: ipaddress decides
        ("1.2.3.4.example", False),
        ("1.2.3.4", True),
        ("198.18.0.1", True),
        ("256.1.1.1", False),
        ("::1", True),
        ("2001:db8::1", True),
        ("x:1", False),
        ("", False),
    ],
)
def test_an_ip_literal_is_told_from_a_host_name(name: str, is_ip: bool) -> None:
    # decides whether a name goes into SNI (never an IP literal, RFC 6066)
    assert _is_ip(name) is is_ip
