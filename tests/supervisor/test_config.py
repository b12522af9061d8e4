"""Configuration: a TOML file overridden by flags; every bad value is a clear startup error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tlsgate.errors import ConfigError
from tlsgate.supervisor.config import Config, build_config, load_config, parse_listen


def test_defaults_are_the_safe_explicit_proxy_on_loopback() -> None:
    config = build_config({})
    assert config.listen == ("127.0.0.1", 8080)
    assert config.mode == "explicit"
    assert config.workers == (os.cpu_count() or 1)  # one worker per core
    assert "authorization" in config.redact_headers and "cookie" in config.redact_headers


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tlsgate.toml"
    path.write_text('listen = "127.0.0.1:9000"\nmode = "transparent"\n[limits]\nidle_timeout = 5\n')
    config = load_config(path, {"listen": "[::1]:9443", "mode": None})
    assert config.listen == ("::1", 9443)
    assert config.mode == "transparent"
    assert config.limits.idle_timeout == 5.0


def test_policy_lists_come_from_the_file_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "tlsgate.toml"
    path.write_text(
        '[policy]\nbypass_domains = ["*.bank.example"]\nblock_clients = ["10.9.0.0/16"]\n'
    )
    config = load_config(path, {"policy.block_domains": ["evil.example"]})
    assert config.bypass_domains == ("*.bank.example",)
    assert config.block_domains == ("evil.example",)
    assert config.policy().decide("10.9.1.1", "ok.example")[0].value == "block"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"listen": "localhost:8080"}, "not an IP address"),
        ({"listen": "127.0.0.1"}, "ADDRESS:PORT"),
        ({"listen": "127.0.0.1:70000"}, "port must be"),
        ({"mode": "sideways"}, "choose one of: explicit, transparent"),
        ({"workers": 0}, "positive int"),
        ({"workers": "2"}, "positive int"),
        ({"lisen": "127.0.0.1:1"}, "unknown setting 'lisen'"),
        ({"limits": {"idle_timeout": -1}}, "limits.idle_timeout must be a positive"),
        ({"limits": {"idle": 3}}, "unknown setting 'idle'"),
        ({"limits": {"upstream_sessions": -1}}, "limits.upstream_sessions must be a whole"),
        ({"limits": {"upstream_sessions": True}}, "limits.upstream_sessions must be a whole"),
        ({"limits": {"max_connect_header_bytes": 100}}, "use 256 to 65536 bytes"),
        ({"limits": {"max_connect_header_bytes": 70000}}, "use 256 to 65536 bytes"),
        ({"policy": {"bypass_domains": "a.example"}}, "must be a list of strings"),
        ({"policy": {"block_clients": ["10.0.0.0/33"]}}, "10.0.0.0/33"),
        ({"upstream_ca_bundle": "/nonexistent/bundle.pem"}, "no such file"),
        ({"events": "file.msgpack"}, "must be a table"),
    ],
)
def test_every_bad_value_is_a_config_error_naming_it(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config(data)


def test_the_connect_request_size_is_a_limit_with_the_old_fixed_cap_as_default() -> None:
    assert build_config({}).limits.max_connect_header_bytes == 8192
    limits = build_config({"limits": {"max_connect_header_bytes": 65536}}).limits
    assert limits.max_connect_header_bytes == 65536


def test_upstream_session_reuse_can_be_turned_off_with_zero() -> None:
    assert build_config({"limits": {"upstream_sessions": 0}}).limits.upstream_sessions == 0
    assert build_config({}).limits.upstream_sessions == 1024


def test_an_ipv6_client_is_its_slash_64_unless_configured_otherwise() -> None:
    assert build_config({}).limits.client_ipv6_prefix == 64
    assert build_config({"limits": {"client_ipv6_prefix": 128}}).limits.client_ipv6_prefix == 128


@pytest.mark.parametrize("bits", [0, 31, 129, True, "64", 64.0])
def test_an_ipv6_client_prefix_outside_32_to_128_is_a_config_error(bits: object) -> None:
    with pytest.raises(ConfigError, match=r"limits\.client_ipv6_prefix .*32 to 128"):
        build_config({"limits": {"client_ipv6_prefix": bits}})


def test_a_broken_toml_file_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("listen = \n")
    with pytest.raises(ConfigError, match=r"broken\.toml is not valid TOML"):
        load_config(path, {})


def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", {})


def test_listen_accepts_bracketed_ipv6_and_port_zero() -> None:
    assert parse_listen("[::1]:0") == ("::1", 0)


def test_config_is_immutable() -> None:
    with pytest.raises(AttributeError):
        Config().mode = "transparent"  # type: ignore[misc]


def test_remote_events_and_metrics_are_off_by_default() -> None:
    config = build_config({})
    assert config.events_remote_listen is None
    assert config.metrics_listen is None and config.metrics_mtls is False


def test_remote_listen_and_metrics_come_from_the_file_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "tlsgate.toml"
    path.write_text('[events]\nremote_listen = "198.18.0.1:57100"\n[metrics]\nmtls = true\n')
    config = load_config(path, {"metrics.listen": "198.18.0.1:9464"})
    assert config.events_remote_listen == ("198.18.0.1", 57100)
    assert config.metrics_listen == ("198.18.0.1", 9464) and config.metrics_mtls


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"metrics": {"listen": "198.18.0.1:9464"}}, "must use mutual TLS"),
        ({"metrics": {"listen": "0.0.0.0:9464"}}, "must use mutual TLS"),
        ({"metrics": {"listen": "127.0.0.1:9464", "mtls": "yes"}}, "true or false"),
        ({"metrics": {"port": 1}}, "unknown setting 'port'"),
        ({"events": {"remote_listen": "ids.example:1"}}, "not an IP address"),
        ({"events": {"remote_cert": "/x.pem"}}, "go together"),
    ],
)
def test_management_over_tcp_settings_are_checked(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(data)


def test_metrics_on_loopback_need_no_mtls() -> None:
    assert build_config({"metrics": {"listen": "[::1]:9464"}}).metrics_listen == ("::1", 9464)


def test_mail_ports_default_to_the_starttls_ports_and_are_configurable() -> None:
    default = build_config({})
    assert (default.smtp_ports, default.imap_ports, default.pop3_ports) == (
        (25, 587),
        (143,),
        (110,),
    )
    mail = {"smtp_ports": [2525], "max_line": 2048, "negotiation_timeout": 5,
            "starttls_required": ["192.0.2.0/24"]}  # fmt: skip
    config = build_config({"mail": mail})
    assert config.smtp_ports == (2525,) and config.mail_max_line == 2048
    assert config.mail_negotiation_timeout == 5.0 and config.starttls_required == ("192.0.2.0/24",)


@pytest.mark.parametrize(("mail", "message"), [
    ({"smtp_ports": [143]}, "port 143 is also in mail.smtp_ports"),
    ({"max_line": 100}, "at least 512"),
    ({"starttls_required": ["mail.example"]}, "is not a network"),
    ({"pop3_ports": [0]}, "list of ports"),
    ({"smtp": [25]}, "unknown setting 'smtp'"),
])  # fmt: skip
def test_bad_mail_settings_are_startup_errors(mail: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({"mail": mail})


def test_learned_bypass_is_off_by_default_and_configurable(tmp_path: Path) -> None:
    assert build_config({}).learned_bypass.enabled is False
    path = tmp_path / "tlsgate.toml"
    path.write_text("[learned_bypass]\nthreshold = 5\nttl = 60\nmax_entries = 10\n")
    config = load_config(path, {"learned_bypass.enabled": True})
    lb = config.learned_bypass
    assert (lb.enabled, lb.threshold, lb.ttl, lb.max_entries, lb.window) == (
        True,
        5,
        60.0,
        10,
        300.0,
    )
    with pytest.raises(ConfigError, match=r"learned_bypass\.threshold must be a positive int"):
        build_config({"learned_bypass": {"threshold": 0}})
    with pytest.raises(ConfigError, match=r"learned_bypass\.enabled must be true or false"):
        build_config({"learned_bypass": {"enabled": "yes"}})
