"""Upstream name resolution: literals skip the resolver, names are cached briefly."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tlsgate.workers.resolver import Resolver


def test_an_ip_literal_is_used_as_is_without_a_lookup() -> None:
    resolver = Resolver()
    infos = asyncio.run(resolver.resolve("198.18.0.7", 443))
    assert infos[0][0] == socket.AF_INET and infos[0][4] == ("198.18.0.7", 443)
    infos6 = asyncio.run(resolver.resolve("::1", 8443))
    assert infos6[0][0] == socket.AF_INET6
    assert resolver.lookups == 0


def test_a_name_is_looked_up_once_within_the_ttl() -> None:
    resolver = Resolver(ttl=60)

    async def twice() -> None:
        first = await resolver.resolve("localhost", 443)
        second = await resolver.resolve("localhost", 443)
        assert first == second

    asyncio.run(twice())
    assert resolver.lookups == 1 and resolver.hits == 1


def test_an_expired_answer_is_looked_up_again_and_the_cache_is_bounded() -> None:
    resolver = Resolver(ttl=-1, max_entries=2)

    async def lookups() -> None:
        for port in (1, 2, 3, 1):
            await resolver.resolve("localhost", port)

    asyncio.run(lookups())
    assert resolver.lookups == 4 and resolver.hits == 0
    assert len(resolver._cache) == 2


def test_a_failed_lookup_raises_and_is_not_cached() -> None:
    resolver = Resolver()
    for _ in range(2):
        with pytest.raises(socket.gaierror):
            asyncio.run(resolver.resolve("no-such-host.invalid", 443))
    assert resolver.lookups == 2
