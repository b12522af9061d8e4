"""Which connections to intercept, to pass through untouched (bypass), or to block.

Rules:

- Four lists, each of domain patterns or client networks: ``block_domains``,
  ``block_clients``, ``bypass_domains``, ``bypass_clients``.
- Domain patterns (case-insensitive, a trailing dot ignored): ``bank.example`` matches
  exactly that name; ``*.bank.example`` matches any name below it, at any depth, but not
  ``bank.example`` itself; ``*`` alone matches every connection, with or without a name.
  The name part must be a valid host name (xn-- A-labels for international names).
- Client networks: IPv4 or IPv6 CIDRs (``10.0.0.0/8``, ``2001:db8::/32``) or single
  addresses; host bits must be zero. IPv4-mapped IPv6 clients (``::ffff:10.1.2.3``, from a
  dual-stack socket) match IPv4 networks.
- Block wins over bypass; a client match applies whatever the name; a connection that
  matches nothing is intercepted. Invalid patterns raise
  :class:`~tlsgate.errors.ConfigError` naming the value and what a valid one looks like.

Matching is precompiled: a set lookup per label suffix of the name and a dict lookup per
distinct prefix length of the client networks. :meth:`Policy.decide` runs per connection.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from tlsgate.errors import ConfigError
from tlsgate.workers.clienthello import normalize_hostname

WILDCARD = "*"
_WILDCARD_PREFIX = "*."
NO_MATCH_REASON = "no policy rule matched"

_DOMAIN_HELP = (
    "use 'example.com' (that name only), '*.example.com' (every name below it) or '*' "
    "(everything); international names as xn-- A-labels"
)
_CLIENT_HELP = "use an IPv4 or IPv6 address or network, e.g. '10.0.0.0/8' or '2001:db8::/32'"


class Decision(StrEnum):
    """What the gateway does with a connection."""

    INTERCEPT = "intercept"
    BYPASS = "bypass"
    BLOCK = "block"


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """One parsed entry of a block or bypass list."""

    decision: Decision
    kind: Literal["domain", "client"]
    #: Canonical form: ``*``, ``*.name``, ``name``, or a network like ``10.0.0.0/8``.
    pattern: str

    @property
    def reason(self) -> str:
        """The short text events carry, e.g. ``block list: *.evil.example``."""
        client = "client " if self.kind == "client" else ""
        return f"{self.decision.value} list: {client}{self.pattern}"

    @classmethod
    def domain(cls, decision: Decision, text: str) -> PolicyRule:
        """Parse a domain pattern; raises :class:`ConfigError` if it is not one."""
        value = _text(decision, "domain pattern", text)
        if value == WILDCARD:
            return cls(decision, "domain", WILDCARD)
        wildcard = value.startswith(_WILDCARD_PREFIX)
        name = value[len(_WILDCARD_PREFIX) :] if wildcard else value
        try:
            canonical = normalize_hostname(name.encode("ascii"))
        except UnicodeEncodeError:
            raise ConfigError(
                f"invalid {decision.value} domain pattern {text!r}: it is not ASCII; "
                + _DOMAIN_HELP
            ) from None
        except ValueError as exc:
            raise ConfigError(
                f"invalid {decision.value} domain pattern {text!r} ({exc}); " + _DOMAIN_HELP
            ) from None
        return cls(decision, "domain", _WILDCARD_PREFIX + canonical if wildcard else canonical)

    @classmethod
    def client(cls, decision: Decision, text: str) -> PolicyRule:
        """Parse a client address or network; raises :class:`ConfigError` if invalid."""
        value = _text(decision, "client network", text)
        try:
            network = ipaddress.ip_network(value, strict=True)
        except ValueError as exc:
            hint = ""
            try:
                loose = ipaddress.ip_network(value, strict=False)
            except ValueError:
                pass
            else:
                hint = f" (did you mean {loose}?)"
            raise ConfigError(
                f"invalid {decision.value} client network {text!r}: {exc}{hint}; " + _CLIENT_HELP
            ) from None
        return cls(decision, "client", str(network))


def _text(decision: Decision, what: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(
            f"invalid {decision.value} {what} {value!r}: it must be a string (quote it)"
        )
    return value.strip()


class _Matcher:
    """The rules of one list, compiled for lookups."""

    __slots__ = ("everything", "exact", "networks", "suffixes")

    def __init__(self, rules: Sequence[PolicyRule]) -> None:
        self.everything: str | None = None
        self.exact: dict[str, str] = {}
        self.suffixes: dict[str, str] = {}
        # (version, prefix length) -> {network bits >> host bits: reason}, longest first
        buckets: dict[tuple[int, int], dict[int, str]] = {}
        for rule in rules:
            reason = rule.reason
            if rule.kind == "client":
                net = ipaddress.ip_network(rule.pattern)
                shift = net.max_prefixlen - net.prefixlen
                key = (net.version, net.prefixlen)
                buckets.setdefault(key, {}).setdefault(int(net.network_address) >> shift, reason)
            elif rule.pattern == WILDCARD:
                self.everything = self.everything or reason
            elif rule.pattern.startswith(_WILDCARD_PREFIX):
                self.suffixes.setdefault(rule.pattern[len(_WILDCARD_PREFIX) :], reason)
            else:
                self.exact.setdefault(rule.pattern, reason)
        self.networks: tuple[tuple[int, int, dict[int, str]], ...] = tuple(
            (version, (32 if version == 4 else 128) - plen, table)
            for (version, plen), table in sorted(buckets.items(), key=lambda kv: -kv[0][1])
        )

    def client(self, version: int, address: int) -> str | None:
        for net_version, shift, table in self.networks:
            if net_version == version:
                reason = table.get(address >> shift)
                if reason is not None:
                    return reason
        return None

    def name(self, name: str | None) -> str | None:
        if self.everything is not None:
            return self.everything
        if name is None:
            return None
        reason = self.exact.get(name)
        if reason is not None or not self.suffixes:
            return reason
        dot = name.find(".")
        while dot >= 0:
            reason = self.suffixes.get(name[dot + 1 :])
            if reason is not None:
                return reason
            dot = name.find(".", dot + 1)
        return None


class Policy:
    """Block / bypass / intercept decisions from domain patterns and client networks."""

    __slots__ = ("_lists", "rules")

    def __init__(
        self,
        bypass_domains: Sequence[str] = (),
        bypass_clients: Sequence[str] = (),
        block_domains: Sequence[str] = (),
        block_clients: Sequence[str] = (),
    ) -> None:
        for label, values in (
            ("bypass_domains", bypass_domains),
            ("bypass_clients", bypass_clients),
            ("block_domains", block_domains),
            ("block_clients", block_clients),
        ):
            if isinstance(values, str):
                raise ConfigError(f"policy {label} must be a list of strings, not one string")
        block = [PolicyRule.domain(Decision.BLOCK, v) for v in block_domains]
        block += [PolicyRule.client(Decision.BLOCK, v) for v in block_clients]
        bypass = [PolicyRule.domain(Decision.BYPASS, v) for v in bypass_domains]
        bypass += [PolicyRule.client(Decision.BYPASS, v) for v in bypass_clients]
        #: Every parsed rule, block rules first.
        self.rules: tuple[PolicyRule, ...] = (*block, *bypass)
        self._lists = ((Decision.BLOCK, _Matcher(block)), (Decision.BYPASS, _Matcher(bypass)))

    def decide(self, client_ip: str, server_name: str | None) -> tuple[Decision, str]:
        """Decide for a connection from ``client_ip`` to ``server_name`` (SNI or CONNECT host).

        Returns the decision and a short reason for events. ``server_name`` may be None
        (no SNI) or an IP address literal, which only ``*`` matches. Raises
        :class:`ValueError` if ``client_ip`` is not an IP address.
        """
        address = ipaddress.ip_address(client_ip)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        version, number = address.version, int(address)
        if server_name is not None:
            server_name = server_name.lower()
            if server_name.endswith("."):
                server_name = server_name[:-1]
        for decision, matcher in self._lists:
            reason = matcher.client(version, number) or matcher.name(server_name)
            if reason is not None:
                return decision, reason
        return Decision.INTERCEPT, NO_MATCH_REASON
