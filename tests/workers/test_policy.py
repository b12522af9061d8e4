"""The policy: which connections are intercepted, bypassed (spliced) or blocked, and why."""

from __future__ import annotations

from typing import Any

import pytest

from tlsgate.errors import ConfigError
from tlsgate.workers.policy import NO_MATCH_REASON, Decision, Policy, PolicyRule

CLIENT = "198.51.100.7"


def test_decision_values_are_the_strings_events_carry() -> None:
    assert [d.value for d in Decision] == ["intercept", "bypass", "block"]
    assert Decision.BLOCK == "block"


def test_a_connection_matching_nothing_is_intercepted() -> None:
    policy = Policy(bypass_domains=["bank.example"], block_domains=["*.evil.example"])
    assert policy.decide(CLIENT, "www.example.com") == (Decision.INTERCEPT, NO_MATCH_REASON)
    assert policy.decide(CLIENT, None) == (Decision.INTERCEPT, NO_MATCH_REASON)
    assert Policy().decide(CLIENT, "anything.example") == (Decision.INTERCEPT, NO_MATCH_REASON)


def test_an_exact_domain_matches_only_that_name() -> None:
    policy = Policy(bypass_domains=["bank.example"])
    assert policy.decide(CLIENT, "bank.example") == (Decision.BYPASS, "bypass list: bank.example")
    assert policy.decide(CLIENT, "www.bank.example")[0] is Decision.INTERCEPT
    assert policy.decide(CLIENT, "notbank.example")[0] is Decision.INTERCEPT


def test_a_wildcard_domain_matches_subdomains_at_any_depth_but_not_the_domain_itself() -> None:
    policy = Policy(bypass_domains=["*.bank.example"])
    for name in ("www.bank.example", "a.b.c.bank.example"):
        assert policy.decide(CLIENT, name) == (Decision.BYPASS, "bypass list: *.bank.example")
    assert policy.decide(CLIENT, "bank.example")[0] is Decision.INTERCEPT
    assert policy.decide(CLIENT, "evilbank.example")[0] is Decision.INTERCEPT
    assert policy.decide(CLIENT, "bank.example.net")[0] is Decision.INTERCEPT


def test_domain_matching_ignores_case_and_a_trailing_dot_on_both_sides() -> None:
    policy = Policy(block_domains=["*.Evil.EXAMPLE.", "Mail.Example"])
    assert policy.decide(CLIENT, "WWW.Evil.Example.") == (
        Decision.BLOCK,
        "block list: *.evil.example",
    )
    assert policy.decide(CLIENT, "MAIL.example.") == (Decision.BLOCK, "block list: mail.example")


def test_a_lone_star_matches_every_connection_even_without_a_name() -> None:
    policy = Policy(bypass_domains=["*"])
    assert policy.decide(CLIENT, None) == (Decision.BYPASS, "bypass list: *")
    assert policy.decide(CLIENT, "x.example") == (Decision.BYPASS, "bypass list: *")
    assert policy.decide(CLIENT, "192.0.2.1") == (Decision.BYPASS, "bypass list: *")


def test_an_ip_literal_server_name_matches_no_domain_pattern_but_star() -> None:
    policy = Policy(block_domains=["*.example", "example"])
    assert policy.decide(CLIENT, "192.0.2.1")[0] is Decision.INTERCEPT
    assert policy.decide(CLIENT, "2001:db8::1")[0] is Decision.INTERCEPT


def test_the_most_specific_wildcard_names_the_reason() -> None:
    policy = Policy(bypass_domains=["*.example", "*.bank.example", "www.bank.example"])
    assert policy.decide(CLIENT, "www.bank.example")[1] == "bypass list: www.bank.example"
    assert policy.decide(CLIENT, "api.bank.example")[1] == "bypass list: *.bank.example"
    assert policy.decide(CLIENT, "shop.example")[1] == "bypass list: *.example"


def test_client_networks_match_whatever_the_name() -> None:
    policy = Policy(bypass_clients=["10.20.0.0/16", "2001:db8:1::/48", "192.0.2.9"])
    assert policy.decide("10.20.3.4", "x.example") == (
        Decision.BYPASS,
        "bypass list: client 10.20.0.0/16",
    )
    assert policy.decide("10.20.3.4", None)[0] is Decision.BYPASS
    assert policy.decide("2001:db8:1:ffff::5", "y.example") == (
        Decision.BYPASS,
        "bypass list: client 2001:db8:1::/48",
    )
    assert policy.decide("192.0.2.9", None) == (Decision.BYPASS, "bypass list: client 192.0.2.9/32")
    assert policy.decide("10.21.0.1", "x.example")[0] is Decision.INTERCEPT
    assert policy.decide("192.0.2.10", None)[0] is Decision.INTERCEPT
    assert policy.decide("2001:db8:2::1", None)[0] is Decision.INTERCEPT


def test_the_most_specific_client_network_names_the_reason() -> None:
    policy = Policy(block_clients=["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24"])
    assert policy.decide("10.1.2.3", None)[1] == "block list: client 10.1.2.0/24"
    assert policy.decide("10.1.3.3", None)[1] == "block list: client 10.1.0.0/16"
    assert policy.decide("10.2.3.3", None)[1] == "block list: client 10.0.0.0/8"


def test_ipv4_networks_do_not_match_ipv6_clients_with_the_same_bits() -> None:
    policy = Policy(block_clients=["0.0.0.0/0"])
    assert policy.decide("2001:db8::1", None)[0] is Decision.INTERCEPT
    assert policy.decide("203.0.113.1", None)[0] is Decision.BLOCK
    everything_v6 = Policy(block_clients=["::/0"])
    assert everything_v6.decide("203.0.113.1", None)[0] is Decision.INTERCEPT


def test_ipv4_mapped_ipv6_clients_match_ipv4_networks() -> None:
    policy = Policy(block_clients=["192.0.2.0/24"])
    assert policy.decide("::ffff:192.0.2.7", None) == (
        Decision.BLOCK,
        "block list: client 192.0.2.0/24",
    )


def test_block_wins_over_bypass() -> None:
    policy = Policy(
        bypass_domains=["*.example"],
        bypass_clients=["10.0.0.0/8"],
        block_domains=["bad.example"],
        block_clients=["10.6.6.6"],
    )
    assert policy.decide("10.1.1.1", "bad.example") == (Decision.BLOCK, "block list: bad.example")
    assert policy.decide("10.6.6.6", "good.example") == (
        Decision.BLOCK,
        "block list: client 10.6.6.6/32",
    )
    assert policy.decide("10.1.1.1", "good.example")[0] is Decision.BYPASS


def test_an_invalid_client_address_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Policy().decide("not-an-ip", None)


def test_the_parsed_rules_are_listed_block_first() -> None:
    policy = Policy(bypass_domains=["A.example"], block_clients=["10.0.0.0/8"])
    assert policy.rules == (
        PolicyRule(Decision.BLOCK, "client", "10.0.0.0/8"),
        PolicyRule(Decision.BYPASS, "domain", "a.example"),
    )
    assert policy.rules[0].reason == "block list: client 10.0.0.0/8"


@pytest.mark.parametrize(
    ("pattern", "complaint"),
    [
        ("", "empty"),
        ("*bank.example", "other than letters"),
        ("bank.*.example", "other than letters"),
        ("*.*.example", "other than letters"),
        ("**", "other than letters"),
        ("*.", "empty"),
        ("a..example", "empty label"),
        ("bücher.example", "not ASCII"),
        ("https://bank.example/", "other than letters"),
        ("10.0.0.1", "IP address literal"),
        ("x" * 64 + ".example", "longer than 63"),
    ],
)
def test_an_invalid_domain_pattern_is_a_config_error_naming_it_and_the_valid_forms(
    pattern: str, complaint: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Policy(block_domains=[pattern])
    message = str(caught.value)
    assert f"invalid block domain pattern {pattern!r}" in message
    assert complaint in message
    assert "'*.example.com' (every name below it)" in message


@pytest.mark.parametrize(
    ("network", "complaint"),
    [
        ("10.0.0.0/33", "10.0.0.0/33"),
        ("10.0.0.1/8", "did you mean 10.0.0.0/8?"),
        ("2001:db8::1/32", "did you mean 2001:db8::/32?"),
        ("bank.example", "bank.example"),
        ("", "''"),
    ],
)
def test_an_invalid_client_network_is_a_config_error_naming_it_and_the_valid_forms(
    network: str, complaint: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Policy(bypass_clients=[network])
    message = str(caught.value)
    assert f"invalid bypass client network {network!r}" in message
    assert complaint in message
    assert "e.g. '10.0.0.0/8'" in message


def test_a_single_string_instead_of_a_list_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="bypass_domains must be a list"):
        Policy(bypass_domains="bank.example")


def test_a_list_entry_that_is_not_a_string_is_a_config_error() -> None:
    not_strings: list[Any] = [10, None]  # e.g. unquoted TOML values
    with pytest.raises(ConfigError, match="invalid block client network 10: it must be a string"):
        Policy(block_clients=not_strings[:1])
    with pytest.raises(ConfigError, match="invalid bypass domain pattern None"):
        Policy(bypass_domains=not_strings[1:])
