"""Access decisions: the client allow-list, its default from the host's interfaces, the
bounded per-source tally of refusals, and the destinations a CONNECT may not reach."""

from __future__ import annotations

import pytest

from tlsgate.errors import ConfigError
from tlsgate.supervisor.config import build_config
from tlsgate.supervisor.interfaces import interface_networks, resolve_access
from tlsgate.workers.access import (
    MAX_REPORTED_SOURCES,
    MAX_TRACKED_SOURCES,
    AccessPolicy,
    SourceTally,
    default_client_networks,
)

HOST = ("127.0.0.1/8", "::1/128", "10.1.2.3/24", "192.0.2.7/24", "100.64.5.6/10",
        "fd12:3456::1/64", "fe80::1/64", "198.18.4.1/24", "172.20.0.5/16")  # fmt: skip


def test_the_default_allow_list_is_loopback_plus_the_private_networks_the_host_is_on() -> None:
    assert default_client_networks(HOST) == (
        "127.0.0.0/8", "::1/128", "10.1.2.0/24", "100.64.0.0/10", "fd12:3456::/64",
        "172.20.0.0/16",
    )  # fmt: skip


def test_a_public_source_is_refused_and_a_private_one_of_the_hosts_networks_served() -> None:
    access = AccessPolicy.build(default_client_networks(HOST))
    assert access.client_allowed("10.1.2.99")
    assert access.client_allowed("127.0.0.1") and access.client_allowed("::1")
    assert access.client_allowed("::ffff:10.1.2.99")  # v4-mapped, as a dual-stack accept gives
    for public in ("8.8.8.8", "192.0.2.8", "198.18.4.2", "10.1.3.1", "2001:db8::1"):
        assert not access.client_allowed(public), public
    assert not access.client_allowed("not-an-address")  # fail closed


def test_explicit_mode_defaults_to_the_host_networks_and_transparent_to_intercept_from() -> None:
    explicit = resolve_access(build_config({}), HOST)
    assert explicit.allow_clients == default_client_networks(HOST)
    assert "10.1.2.3" in explicit.own_addresses
    transparent = resolve_access(
        build_config({"mode": "transparent", "intercept_from": ["203.0.113.0/24"]}), HOST
    )
    assert transparent.allow_clients == ("127.0.0.0/8", "::1/128", "203.0.113.0/24")
    configured = resolve_access(build_config({"access": {"allow_clients": ["0.0.0.0/0"]}}), HOST)
    assert configured.allow_clients == ("0.0.0.0/0",)


def test_the_hosts_interface_networks_include_loopback() -> None:
    assert "127.0.0.1/8" in interface_networks()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"access": {"allow_clients": ["10.0.0.0/33"]}}, "is not a network"),
        ({"access": {"allow_clients": []}}, "refuse every client"),
        ({"access": {"allow_destinations": ["x"]}}, "is not a network"),
        ({"access": {"allow_everyone": True}}, "unknown setting"),
    ],
)
def test_bad_access_settings_are_startup_errors(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(data)


def test_refusals_are_tallied_per_source_with_bounded_memory_and_reported_once() -> None:
    tally = SourceTally()
    assert tally.take() is None
    for i in range(MAX_TRACKED_SOURCES + 100):
        tally.add(f"203.0.{i // 256}.{i % 256}")
    for _ in range(50):
        tally.add("198.51.100.1")
    assert len(tally.counts) == MAX_TRACKED_SOURCES  # the late source is counted, not kept
    report = tally.take()
    assert report is not None
    assert report["refused"] == MAX_TRACKED_SOURCES + 150
    sources = report["sources"]
    assert isinstance(sources, list) and len(sources) == MAX_REPORTED_SOURCES
    assert {"client_ip": "198.51.100.1", "count": 50} not in sources  # untracked
    assert sources[0]["count"] == 1
    named = sum(s["count"] for s in sources)
    assert report["other_sources_count"] == MAX_TRACKED_SOURCES + 150 - named
    assert tally.take() is None  # reset after each report


@pytest.mark.parametrize(
    ("ip", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("127.5.6.7", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local (cloud metadata)"),
        ("fe80::1", "link-local"),
        ("fd00:ec2::254", "cloud metadata"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("10.1.2.3", "the gateway's own address"),
    ],
)
def test_a_connect_may_not_reach_the_gateway_itself_or_link_local(ip: str, why: str) -> None:
    access = AccessPolicy.build(["0.0.0.0/0"], own_addresses=["10.1.2.3"])
    assert access.destination_refusal(ip) == why


def test_ordinary_destinations_pass_and_allowed_networks_override_the_refusal() -> None:
    access = AccessPolicy.build(["0.0.0.0/0"], own_addresses=["10.1.2.3"])
    assert access.destination_refusal("93.184.216.34") is None
    assert access.destination_refusal("10.1.2.4") is None  # a neighbour, not the gateway
    allowed = AccessPolicy.build(["0.0.0.0/0"], ["127.0.0.0/8"])
    assert allowed.destination_refusal("127.0.0.1") is None
    assert allowed.destination_refusal("169.254.169.254") is not None


def test_the_startup_line_names_the_allow_list_and_warns_about_a_listener_on_every_address() -> (
    None
):
    from tlsgate.supervisor.interfaces import access_summary

    internal = resolve_access(build_config({"listen": "10.1.2.3:8080"}), HOST)
    assert access_summary(internal).startswith("clients allowed: 127.0.0.0/8, ::1/128, 10.1.2.0/24")
    assert "warning" not in access_summary(internal)
    everywhere = resolve_access(build_config({"listen": "0.0.0.0:8080"}), HOST)
    assert "warning: listening on every address (0.0.0.0)" in access_summary(everywhere)
