"""Suricata EVE-JSON rendering of tlsgate events (supervisor/eve.py, `tlsgate events --format eve`).

Every record is checked against Suricata 8.0's own schema (/work/shared/data), and the
values against the examples of docs/events.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsgate.errors import OperatorError
from tlsgate.supervisor.eve import (
    FLOW_ID_MASK,
    EveRenderer,
    EveRenderError,
    eve_timestamp,
    flow_id,
    render_eve,
)
from tlsgate.supervisor.events_commands import add_events_parser
from tlsgate.workers.events import new_packer

SCHEMA_PATH = Path("/work/shared/data/suricata-eve-schema.json")
SCHEMA = json.loads(SCHEMA_PATH.read_text())
VALIDATOR = jsonschema.validators.validator_for(SCHEMA)(SCHEMA)

#: The schema's own pattern for `timestamp`.
TIMESTAMP_PATTERN = re.compile(SCHEMA["properties"]["timestamp"]["pattern"])

GATEWAY = "gw1.example.net:4242"

# -- the examples of docs/events.md ---------------------------------------------------------

HELLO = {
    "type": "hello",
    "version": 1,
    "ts": 1767225599.01,
    "worker": -1,
    "seq": 0,
    "schema": 1,
    "gateway": GATEWAY,
    "started": 1767225598.77,
    "pid": 4242,
}
CONN_OPEN = {
    "type": "conn_open",
    "version": 1,
    "ts": 1767225600.123456,
    "worker": 0,
    "seq": 41,
    "conn": "0-17",
    "client_ip": "10.0.0.5",
    "client_port": 51234,
    "server_ip": "93.184.215.14",
    "server_port": 443,
    "mode": "explicit",
    "connect_host": "example.com",
    "sni": "example.com",
    "client_alpn": ["h2", "http/1.1"],
    "client_versions": ["TLS 1.3", "TLS 1.2"],
    "ja3": "771,4865-4866-4867-49195,0-23-65281-10-11-35-16-5-13-18-51-45-43,29-23-24,0",
    "ja3_hash": "cd08e31494f9531f560d64c695473da9",
    "ja4": "t13d1516h2_8daaf6152771_02713d6af862",
    "decision": "intercept",
    "decision_reason": "default",
}
POLICY = {
    "type": "policy",
    "version": 1,
    "ts": 1767225600.2,
    "worker": 0,
    "seq": 42,
    "conn": "0-18",
    "decision": "block",
    "reason": "block_domains: *.tracker.example",
    "name": "ads.tracker.example",
    "client_ip": "10.0.0.5",
}
UPSTREAM_REFUSED = {
    "type": "upstream_refused",
    "version": 1,
    "ts": 1767225601.5,
    "worker": 0,
    "seq": 43,
    "conn": "0-19",
    "sni": "expired.badssl.com",
    "name": "expired.badssl.com",
    "server_ip": "104.154.89.105",
    "server_port": 443,
    "category": "expired",
    "reason": "certificate CN=*.badssl.com expired on 2015-04-12T23:59:59Z",
}
HTTP = {
    "type": "http",
    "version": 1,
    "ts": 1767225600.31,
    "worker": 0,
    "seq": 44,
    "conn": "0-17",
    "client_ip": "10.0.0.5",
    "client_port": 51234,
    "server_ip": "93.184.215.14",
    "server_port": 443,
    "sni": "example.com",
    "method": "GET",
    "host": "example.com",
    "path": "/index.html",
    "http_version": "1.1",
    "status": 200,
    "request_headers": [
        ["host", "example.com"],
        ["user-agent", "curl/8.5.0"],
        ["accept", "*/*"],
        ["authorization", "[redacted]"],
    ],
    "response_headers": [["content-type", "text/html; charset=UTF-8"], ["content-length", "1256"]],
    "request_body_bytes": 0,
    "response_body_bytes": 1256,
    "content_type": "text/html; charset=UTF-8",
    "user_agent": "curl/8.5.0",
    "complete": True,
    "upgrade": None,
}
PROTOCOL_ERROR = {
    "type": "protocol_error",
    "version": 1,
    "ts": 1767225602.0,
    "worker": 0,
    "seq": 45,
    "conn": "0-20",
    "client_ip": "10.0.0.7",
    "client_port": 40112,
    "server_ip": None,
    "server_port": None,
    "stage": "client_hello",
    "error": "record type 0x47 is not a TLS handshake (plain HTTP sent to a TLS port?)",
}
CONN_CLOSE = {
    "type": "conn_close",
    "version": 1,
    "ts": 1767225605.42,
    "worker": 0,
    "seq": 46,
    "conn": "0-17",
    "client_ip": "10.0.0.5",
    "client_port": 51234,
    "server_ip": "93.184.215.14",
    "server_port": 443,
    "sni": "example.com",
    "connect_host": "example.com",
    "decision": "intercept",
    "client_tls_version": "TLSv1.3",
    "client_cipher": "TLS_AES_128_GCM_SHA256",
    "upstream_tls_version": "TLSv1.3",
    "upstream_cipher": "TLS_AES_256_GCM_SHA384",
    "alpn": "http/1.1",
    "upstream_subject": "CN=example.com",
    "upstream_issuer": "CN=DigiCert Global G3 TLS ECC SHA384 2020 CA1,O=DigiCert Inc,C=US",
    "upstream_fingerprint_sha256": "455943cf819425761d1f950263ebf547"
    "55d8d684c25535943976f488bc79d23b",
    "upstream_verdict": "valid",
    "upstream_verdict_reason": None,
    "bytes_from_client": 78,
    "bytes_from_server": 1614,
    "duration": 5.297,
    "handshake_duration": 0.112,
    "requests": 1,
    "close_reason": "client-closed",
}
GAP_WORKER = {
    "type": "gap",
    "version": 1,
    "ts": 1767225610.0,
    "worker": 0,
    "seq": 5012,
    "dropped": 12,
    "stage": "worker-queue",
}
GAP_SUBSCRIBER = {
    "type": "gap",
    "version": 1,
    "ts": 1767225610.2,
    "worker": -1,
    "seq": 3,
    "dropped": 4180,
    "stage": "subscriber",
}

#: The doc examples in stream order (conn 0-17: open, http, close).
STREAM = [
    HELLO,
    CONN_OPEN,
    POLICY,
    UPSTREAM_REFUSED,
    HTTP,
    PROTOCOL_ERROR,
    CONN_CLOSE,
    GAP_WORKER,
    GAP_SUBSCRIBER,
]

#: flow_id of conn 0-17 of GATEWAY. Pinned: the ids must not change between tlsgate
#: versions, or records rendered live and from a recording would no longer join.
FLOW_0_17 = flow_id(GATEWAY, "0-17")
PINNED_FLOW_0_17 = 978887167594947

EXPECTED_HTTP = {
    "timestamp": "2026-01-01T00:00:00.310000+0000",
    "flow_id": FLOW_0_17,
    "event_type": "http",
    "src_ip": "10.0.0.5",
    "src_port": 51234,
    "dest_ip": "93.184.215.14",
    "dest_port": 443,
    "proto": "TCP",
    "app_proto": "http",
    "http": {
        "hostname": "example.com",
        "url": "/index.html",
        "http_user_agent": "curl/8.5.0",
        "http_content_type": "text/html",
        "http_method": "GET",
        "protocol": "HTTP/1.1",
        "status": 200,
        "length": 1256,
        "request_headers": [
            {"name": "host", "value": "example.com"},
            {"name": "user-agent", "value": "curl/8.5.0"},
            {"name": "accept", "value": "*/*"},
            {"name": "authorization", "value": "[redacted]"},
        ],
        "response_headers": [
            {"name": "content-type", "value": "text/html; charset=UTF-8"},
            {"name": "content-length", "value": "1256"},
        ],
    },
}

EXPECTED_TLS = {
    # conn_close ts 1767225605.42 - duration 5.297 + handshake_duration 0.112
    "timestamp": "2026-01-01T00:00:00.235000+0000",
    "flow_id": FLOW_0_17,
    "event_type": "tls",
    "src_ip": "10.0.0.5",
    "src_port": 51234,
    "dest_ip": "93.184.215.14",
    "dest_port": 443,
    "proto": "TCP",
    "app_proto": "tls",
    "tls": {
        "subject": "CN=example.com",
        "issuerdn": "CN=DigiCert Global G3 TLS ECC SHA384 2020 CA1,O=DigiCert Inc,C=US",
        "sni": "example.com",
        "version": "TLS 1.3",
        "ja3": {
            "hash": "cd08e31494f9531f560d64c695473da9",
            "string": "771,4865-4866-4867-49195,0-23-65281-10-11-35-16-5-13-18-51-45-43,29-23-24,0",
        },
        "ja4": "t13d1516h2_8daaf6152771_02713d6af862",
        "client_alpns": ["h2", "http/1.1"],
        "server_alpns": ["http/1.1"],
    },
}

EXPECTED_ANOMALY = {
    "timestamp": "2026-01-01T00:00:02.000000+0000",
    "flow_id": flow_id(GATEWAY, "0-20"),
    "event_type": "anomaly",
    "src_ip": "10.0.0.7",
    "src_port": 40112,
    "proto": "TCP",
    "app_proto": "tls",
    "anomaly": {
        "type": "applayer",
        "app_proto": "tls",
        "event": "INVALID_CLIENT_HELLO",
        "layer": "proto_parser",
    },
}


def schema_errors(record: Mapping[str, Any]) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in VALIDATOR.iter_errors(record)]


def render(event: Mapping[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
    kwargs.setdefault("local_tz", UTC)
    kwargs.setdefault("gateway", GATEWAY)
    return render_eve(event, **kwargs)


def render_stream(events: list[dict[str, Any]], **kwargs: Any) -> list[dict[str, Any]]:
    renderer = EveRenderer(local_tz=UTC, **kwargs)
    return [record for event in events for record in renderer.render(event)]


def with_fields(event: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    return {**event, **fields}


# -- what each event type becomes -----------------------------------------------------------


def test_an_http_event_becomes_one_suricata_http_record_with_its_values() -> None:
    assert render(HTTP) == [EXPECTED_HTTP]


def test_a_conn_close_after_its_conn_open_becomes_one_tls_record_joining_both() -> None:
    assert render(CONN_CLOSE, conn_open=CONN_OPEN) == [EXPECTED_TLS]


def test_a_protocol_error_becomes_an_applayer_anomaly_record() -> None:
    assert render(PROTOCOL_ERROR) == [EXPECTED_ANOMALY]


@pytest.mark.parametrize(
    ("stage", "app_proto", "token"),
    [
        ("connect", "http", "INVALID_CONNECT_REQUEST"),
        ("client_hello", "tls", "INVALID_CLIENT_HELLO"),
        ("tls", "tls", "INVALID_TLS"),
        ("http", "http", "INVALID_HTTP"),
        ("smtp", "smtp", "INVALID_SMTP"),
        ("imap", "imap", "INVALID_IMAP"),
        ("pop3", "pop3", "INVALID_POP3"),
        ("http2", "http2", "INVALID_HTTP2"),
        ("websocket", "websocket", "INVALID_WEBSOCKET"),
    ],
)
def test_the_anomaly_names_the_protocol_and_a_stable_token_for_the_stage(
    stage: str, app_proto: str, token: str
) -> None:
    (record,) = render(with_fields(PROTOCOL_ERROR, stage=stage))
    assert schema_errors(record) == []
    assert record["app_proto"] == app_proto
    assert record["anomaly"]["app_proto"] == app_proto
    assert record["anomaly"]["event"] == token


def test_an_anomaly_of_an_unknown_stage_has_the_generic_token_and_no_app_proto() -> None:
    (record,) = render(with_fields(PROTOCOL_ERROR, stage="quic"))
    assert "app_proto" not in record
    assert record["anomaly"] == {
        "type": "applayer",
        "event": "PROTOCOL_ERROR",
        "layer": "proto_parser",
    }
    assert schema_errors(record) == []


@pytest.mark.parametrize(
    "event",
    [HELLO, CONN_OPEN, POLICY, UPSTREAM_REFUSED, GAP_WORKER, GAP_SUBSCRIBER],
    ids=lambda event: f"{event['type']}-{event['seq']}",
)
def test_other_event_types_render_no_record(event: dict[str, Any]) -> None:
    assert render(event) == []


def test_an_unknown_or_non_string_type_renders_no_record() -> None:
    assert render(with_fields(HTTP, type="http2")) == []
    assert render(with_fields(HTTP, type=["http"])) == []


def test_every_record_of_the_documented_stream_validates_against_suricatas_schema() -> None:
    records = render_stream(STREAM)
    assert [record["event_type"] for record in records] == ["http", "anomaly", "tls"]
    for record in records:
        assert schema_errors(record) == []
    assert records[0] == EXPECTED_HTTP
    assert records[2] == EXPECTED_TLS


def test_the_schema_check_itself_refuses_a_field_suricata_does_not_define() -> None:
    # Guards the guard: a stray `worker` or a null status must be reported.
    assert schema_errors({**EXPECTED_HTTP, "worker": 0}) != []
    assert schema_errors({**EXPECTED_HTTP, "http": {"status": None}}) != []


# -- top level --------------------------------------------------------------------------------


def test_records_carry_no_tlsgate_field_outside_suricatas_names() -> None:
    (record,) = render(HTTP)
    assert not {"type", "version", "ts", "worker", "seq", "conn"} & record.keys()


def test_the_sensor_name_is_the_top_level_host_only_when_given() -> None:
    (with_host,) = render(HTTP, host="sensor-7")
    assert with_host["host"] == "sensor-7"
    assert schema_errors(with_host) == []
    (without,) = render(HTTP)
    assert "host" not in without


def test_a_nil_server_address_is_left_out_not_null() -> None:
    (record,) = render(with_fields(HTTP, server_ip=None, server_port=None))
    assert "dest_ip" not in record
    assert "dest_port" not in record
    assert schema_errors(record) == []


# -- timestamp ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tz", "expected"),
    [
        (UTC, "2026-01-01T00:00:00.310000+0000"),
        (timezone(timedelta(hours=5, minutes=30)), "2026-01-01T05:30:00.310000+0530"),
        (timezone(-timedelta(hours=8)), "2025-12-31T16:00:00.310000-0800"),
    ],
)
def test_the_timestamp_is_local_time_with_microseconds_and_an_offset_without_colon(
    tz: timezone, expected: str
) -> None:
    assert eve_timestamp(1767225600.31, tz) == expected
    assert TIMESTAMP_PATTERN.match(expected)


def test_an_offset_with_seconds_keeps_them_so_the_time_stays_exact() -> None:
    lmt = timezone(timedelta(minutes=19, seconds=32))  # Amsterdam before 1937
    assert eve_timestamp(0, lmt) == "1970-01-01T00:19:32.000000+001932"
    assert TIMESTAMP_PATTERN.match(eve_timestamp(0, lmt))


def test_the_timestamp_keeps_six_fraction_digits_for_a_whole_second() -> None:
    assert eve_timestamp(1767225602.0, UTC) == "2026-01-01T00:00:02.000000+0000"
    assert eve_timestamp(0, UTC) == "1970-01-01T00:00:00.000000+0000"


def test_the_timestamp_pads_a_year_before_1000_to_four_digits() -> None:
    assert eve_timestamp(-60000000000.0, UTC) == "0068-09-03T13:20:00.000000+0000"


@pytest.fixture
def india_local_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone is UTC+05:30 (a POSIX TZ rule: no tz database needed)."""
    monkeypatch.setenv("TZ", "IST-05:30")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("india_local_time")
def test_without_a_time_zone_the_timestamp_is_in_the_systems_local_time() -> None:
    assert eve_timestamp(1767225600.31) == "2026-01-01T05:30:00.310000+0530"
    (record,) = render_eve(HTTP)
    assert record["timestamp"] == "2026-01-01T05:30:00.310000+0530"


@pytest.mark.parametrize(
    "ts", [None, "1767225600", True, float("nan"), float("inf"), 1e20, -1e20, 10**30]
)
def test_an_event_without_a_usable_ts_cannot_be_rendered(ts: Any) -> None:
    with pytest.raises(EveRenderError, match="ts"):
        render(with_fields(HTTP, ts=ts))


def test_the_tls_record_is_timed_at_the_close_when_the_handshake_never_completed() -> None:
    close = with_fields(CONN_CLOSE, handshake_duration=None)
    (record,) = render(close, conn_open=CONN_OPEN)
    assert record["timestamp"] == "2026-01-01T00:00:05.420000+0000"


def test_the_tls_record_ignores_a_handshake_duration_longer_than_the_connection() -> None:
    close = with_fields(CONN_CLOSE, handshake_duration=9.0)
    (record,) = render(close, conn_open=CONN_OPEN)
    assert record["timestamp"] == "2026-01-01T00:00:05.420000+0000"


# -- flow_id ------------------------------------------------------------------------------------


def test_a_connections_tls_and_http_records_share_one_51_bit_flow_id() -> None:
    records = render_stream(STREAM)
    http, anomaly, tls = records
    assert http["flow_id"] == tls["flow_id"] == FLOW_0_17
    assert anomaly["flow_id"] != FLOW_0_17
    assert 0 <= FLOW_0_17 <= 2**51 - 1
    assert FLOW_ID_MASK == 2**51 - 1


def test_the_flow_id_is_stable_across_tlsgate_versions() -> None:
    assert FLOW_0_17 == PINNED_FLOW_0_17


def test_flow_ids_stay_within_51_bits_and_differ_per_gateway_and_connection() -> None:
    ids = {
        flow_id(gateway, f"{worker}-{n}")
        for gateway in ("a:1", "b:1")
        for worker in range(4)
        for n in range(500)
    }
    assert len(ids) == 2 * 4 * 500
    assert all(0 <= value <= FLOW_ID_MASK for value in ids)
    assert max(ids) > 2**50  # the whole range is used, not only 32 bits of it


def test_the_renderer_takes_the_gateway_id_from_the_streams_hello() -> None:
    (before,) = render_stream([HTTP])
    (after,) = render_stream([HELLO, HTTP])
    assert before["flow_id"] == flow_id("", "0-17")
    assert after["flow_id"] == FLOW_0_17


# -- http ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "path", "hostname", "port"),
    [
        ("example.com:8443", "/", "example.com", 8443),
        ("Example.COM.", "/", "example.com", None),
        ("[2001:db8::1]:8080", "/", "[2001:db8::1]", 8080),
        ("[2001:db8::1]", "/", "[2001:db8::1]", None),
        ("example.com:", "/", "example.com", None),
        ("example.com:99999", "/", "example.com", None),
        ("example.com:http", "/", "example.com:http", None),
        ("example.com:\u00b2", "/", "example.com:\u00b2", None),
        ("example.com:" + "1" * 5000, "/", "example.com", None),
        ("ignored.example", "http://user@Proxy.Example:3128/x?y", "proxy.example", 3128),
        (None, "https://api.example/v1", "api.example", None),
        (None, "/index.html", None, None),
    ],
)
def test_hostname_is_the_lower_case_host_without_its_port_which_goes_to_http_port(
    host: str | None, path: str, hostname: str | None, port: int | None
) -> None:
    (record,) = render(with_fields(HTTP, host=host, path=path))
    assert record["http"].get("hostname") == hostname
    assert record["http"].get("http_port") == port
    assert record["http"]["url"] == path
    assert schema_errors(record) == []


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/json", "application/json"),
        ("text/html; charset=UTF-8", "text/html"),
        ("multipart/form-data ;boundary=x", "multipart/form-data"),
    ],
)
def test_http_content_type_is_the_media_type_without_parameters(
    content_type: str, expected: str
) -> None:
    (record,) = render(with_fields(HTTP, content_type=content_type))
    assert record["http"]["http_content_type"] == expected


def test_the_protocol_follows_the_requests_http_version() -> None:
    (record,) = render(with_fields(HTTP, http_version="1.0"))
    assert record["http"]["protocol"] == "HTTP/1.0"


def test_recorded_referer_forwarded_for_and_location_fill_their_own_fields() -> None:
    event = with_fields(
        HTTP,
        status=302,
        request_headers=[
            ["referer", "https://a.example/"],
            ["x-forwarded-for", "10.9.9.9"],
            ["referer", "https://second.example/"],
        ],
        response_headers=[["location", "https://b.example/next"]],
    )
    (record,) = render(event)
    http = record["http"]
    assert http["http_refer"] == "https://a.example/"
    assert http["xff"] == "10.9.9.9"
    assert http["redirect"] == "https://b.example/next"
    assert len(http["request_headers"]) == 3
    assert schema_errors(record) == []


def test_an_exchange_cut_before_its_response_leaves_out_what_is_missing() -> None:
    event = with_fields(
        HTTP,
        host=None,
        status=None,
        content_type=None,
        user_agent=None,
        response_headers=[],
        request_headers=[],
    )
    (record,) = render(event)
    assert record["http"] == {
        "url": "/index.html",
        "http_method": "GET",
        "protocol": "HTTP/1.1",
        "length": 1256,
    }
    assert schema_errors(record) == []


def test_values_of_the_wrong_type_are_left_out_and_bytes_become_text() -> None:
    event = with_fields(
        HTTP,
        status="200",
        response_body_bytes=True,
        method=b"GE\xffT",
        request_headers=[["host"], ["a", 1], "junk", ["b", b"\x80"], ("c", "d")],
    )
    (record,) = render(event)
    http = record["http"]
    assert "status" not in http
    assert "length" not in http
    assert http["http_method"] == "GE\ufffdT"
    assert http["request_headers"] == [
        {"name": "b", "value": "\ufffd"},
        {"name": "c", "value": "d"},
    ]
    assert schema_errors(record) == []


# -- tls ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("openssl", "suricata"),
    [
        ("TLSv1.3", "TLS 1.3"),
        ("TLSv1.2", "TLS 1.2"),
        ("TLSv1.1", "TLS 1.1"),
        ("TLSv1", "TLSv1"),
        ("SSLv3", "SSLv3"),
        ("DTLSv1.2", "DTLSv1.2"),
    ],
)
def test_the_tls_version_is_the_upstream_one_in_suricatas_names(
    openssl: str, suricata: str
) -> None:
    close = with_fields(CONN_CLOSE, upstream_tls_version=openssl, client_tls_version="TLSv1.2")
    (record,) = render(close)
    assert record["tls"]["version"] == suricata


def test_a_conn_close_without_its_conn_open_still_reports_the_server_side() -> None:
    (record,) = render(CONN_CLOSE)
    assert record["tls"] == {
        "subject": "CN=example.com",
        "issuerdn": "CN=DigiCert Global G3 TLS ECC SHA384 2020 CA1,O=DigiCert Inc,C=US",
        "sni": "example.com",
        "version": "TLS 1.3",
        "server_alpns": ["http/1.1"],
    }


def test_the_sha256_fingerprint_is_not_passed_off_as_suricatas_sha1_fingerprint() -> None:
    (record,) = render(CONN_CLOSE, conn_open=CONN_OPEN)
    assert "fingerprint" not in record["tls"]


def test_a_blocked_connection_reports_what_its_client_hello_showed() -> None:
    open_ = with_fields(
        CONN_OPEN, conn="0-18", sni="ads.tracker.example", client_alpn=[], decision="block"
    )
    close = with_fields(
        CONN_CLOSE,
        conn="0-18",
        sni="ads.tracker.example",
        decision="block",
        client_tls_version=None,
        client_cipher=None,
        upstream_tls_version=None,
        upstream_cipher=None,
        alpn=None,
        upstream_subject=None,
        upstream_issuer=None,
        upstream_fingerprint_sha256=None,
        upstream_verdict="not-checked",
        handshake_duration=None,
        close_reason="blocked",
    )
    (record,) = render(close, conn_open=open_)
    assert record["tls"] == {
        "sni": "ads.tracker.example",
        "ja3": EXPECTED_TLS["tls"]["ja3"],  # type: ignore[index]
        "ja4": "t13d1516h2_8daaf6152771_02713d6af862",
    }
    assert schema_errors(record) == []


def test_a_connection_that_ended_before_its_client_hello_renders_no_tls_record() -> None:
    close = with_fields(CONN_CLOSE, decision=None, sni=None, close_reason="protocol-error")
    assert render(close) == []


def test_the_sni_of_the_conn_open_fills_in_when_the_close_has_none() -> None:
    (record,) = render(with_fields(CONN_CLOSE, sni=None), conn_open=CONN_OPEN)
    assert record["tls"]["sni"] == "example.com"


# -- the stream renderer ------------------------------------------------------------------------


def test_the_renderer_joins_each_conn_close_with_its_own_conn_open() -> None:
    other_open = with_fields(CONN_OPEN, conn="1-3", ja4="t12d0000h1_000000000000_000000000000")
    other_close = with_fields(CONN_CLOSE, conn="1-3")
    records = render_stream([HELLO, CONN_OPEN, other_open, other_close, CONN_CLOSE])
    assert [r["tls"]["ja4"] for r in records] == [
        "t12d0000h1_000000000000_000000000000",
        "t13d1516h2_8daaf6152771_02713d6af862",
    ]
    assert records[1] == EXPECTED_TLS


def test_the_renderer_forgets_a_connection_at_its_close() -> None:
    renderer = EveRenderer(local_tz=UTC)
    renderer.render(CONN_OPEN)
    assert renderer.tracked == 1
    renderer.render(CONN_CLOSE)
    assert renderer.tracked == 0
    (again,) = renderer.render(CONN_CLOSE)
    assert "ja3" not in again["tls"]


def test_the_remembered_conn_opens_are_bounded_and_the_oldest_is_forgotten_first() -> None:
    renderer = EveRenderer(local_tz=UTC, max_tracked=2)
    for n in range(3):
        renderer.render(with_fields(CONN_OPEN, conn=f"0-{n}"))
    assert renderer.tracked == 2
    assert renderer.evicted == 1
    (oldest,) = renderer.render(with_fields(CONN_CLOSE, conn="0-0"))
    (newest,) = renderer.render(with_fields(CONN_CLOSE, conn="0-2"))
    assert "ja3" not in oldest["tls"]
    assert newest["tls"]["ja3"] == EXPECTED_TLS["tls"]["ja3"]  # type: ignore[index]


def test_the_renderer_keeps_only_the_client_side_of_a_conn_open() -> None:
    renderer = EveRenderer(local_tz=UTC)
    renderer.render(CONN_OPEN)
    (kept,) = renderer._opened.values()
    assert set(kept) == {"ja3", "ja3_hash", "ja4", "client_alpn", "sni"}


def test_a_hello_starts_a_new_stream_and_drops_what_was_remembered() -> None:
    renderer = EveRenderer(local_tz=UTC)
    renderer.render(CONN_OPEN)
    renderer.render(with_fields(HELLO, gateway="gw2:77"))
    assert renderer.tracked == 0
    assert renderer.gateway == "gw2:77"
    (record,) = renderer.render(CONN_CLOSE)
    assert "ja3" not in record["tls"]
    assert record["flow_id"] == flow_id("gw2:77", "0-17")


def test_skipping_an_event_keeps_the_renderers_state_right() -> None:
    renderer = EveRenderer(local_tz=UTC)
    renderer.skip(HELLO)
    renderer.skip(CONN_OPEN)
    assert renderer.gateway == GATEWAY
    assert renderer.tracked == 1
    renderer.skip(CONN_CLOSE)
    assert renderer.tracked == 0


def test_the_renderer_refuses_a_table_of_no_connections() -> None:
    with pytest.raises(ValueError, match="max_tracked"):
        EveRenderer(max_tracked=0)


# -- property: any well-typed tlsgate event ------------------------------------------------------


def nullable(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


TEXT = st.text(max_size=40)
INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)
CONN = st.sampled_from(["0-1", "0-2", "1-1"])
HEADERS = st.lists(st.tuples(TEXT, TEXT).map(list), max_size=6)
COMMON = {
    "version": st.just(1),
    "ts": st.floats(min_value=-(2**31), max_value=2**34, allow_nan=False),
    "worker": st.integers(min_value=-1, max_value=64),
    "seq": st.integers(min_value=0, max_value=2**63),
}
ADDRESSES = {
    "conn": CONN,
    "client_ip": TEXT,
    "client_port": INT,
    "server_ip": nullable(TEXT),
    "server_port": nullable(INT),
    "sni": nullable(TEXT),
}
DECISION = nullable(st.sampled_from(["intercept", "bypass", "block"]))
SEC = st.floats(min_value=0, max_value=1e6, allow_nan=False)


def event_of(kind: str, fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Events of type ``kind``: common fields always, the others present, nil or absent."""
    return st.fixed_dictionaries(
        {"type": st.just(kind), **COMMON},
        optional={**ADDRESSES, **fields},
    )


EVENTS = st.one_of(
    event_of("hello", {"gateway": TEXT, "schema": INT, "started": SEC, "pid": INT}),
    event_of(
        "conn_open",
        {
            "mode": TEXT,
            "connect_host": nullable(TEXT),
            "client_alpn": st.lists(TEXT, max_size=4),
            "client_versions": st.lists(TEXT, max_size=4),
            "ja3": nullable(TEXT),
            "ja3_hash": nullable(TEXT),
            "ja4": nullable(TEXT),
            "decision": DECISION,
            "decision_reason": TEXT,
        },
    ),
    event_of(
        "conn_close",
        {
            "connect_host": nullable(TEXT),
            "decision": DECISION,
            **{
                name: nullable(TEXT)
                for name in (
                    "client_tls_version",
                    "client_cipher",
                    "upstream_tls_version",
                    "upstream_cipher",
                    "alpn",
                    "upstream_subject",
                    "upstream_issuer",
                    "upstream_fingerprint_sha256",
                    "upstream_verdict_reason",
                )
            },
            "upstream_tls_version": nullable(
                st.sampled_from(["TLSv1.3", "TLSv1.2", "TLSv1.1", "TLSv1", "SSLv3"]) | TEXT
            ),
            "upstream_verdict": TEXT,
            "bytes_from_client": INT,
            "bytes_from_server": INT,
            "duration": SEC,
            "handshake_duration": nullable(SEC),
            "requests": INT,
            "close_reason": TEXT,
        },
    ),
    event_of(
        "http",
        {
            "method": TEXT,
            "host": nullable(TEXT | st.sampled_from(["a.example:8080", "[::1]:1", "x:"])),
            "path": TEXT | st.sampled_from(["http://h.example:81/p", "https://u@h/"]),
            "http_version": st.sampled_from(["1.1", "1.0"]),
            "status": nullable(st.integers(min_value=100, max_value=999)),
            "request_headers": HEADERS,
            "response_headers": HEADERS,
            "request_body_bytes": INT,
            "response_body_bytes": INT,
            "content_type": nullable(TEXT),
            "request_content_type": nullable(TEXT),
            "user_agent": nullable(TEXT),
            "complete": st.booleans(),
            "upgrade": nullable(TEXT),
        },
    ),
    event_of(
        "protocol_error", {"stage": TEXT | st.sampled_from(["connect", "tls"]), "error": TEXT}
    ),
    event_of("policy", {"decision": DECISION, "reason": TEXT, "name": nullable(TEXT)}),
    event_of("upstream_refused", {"name": nullable(TEXT), "category": TEXT, "reason": TEXT}),
    event_of("gap", {"dropped": INT, "stage": TEXT}),
)

TIME_ZONES = st.sampled_from(
    [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=9, seconds=30))]
)


@settings(max_examples=300, deadline=None)
@given(events=st.lists(EVENTS, max_size=12), tz=TIME_ZONES, host=nullable(TEXT))
def test_any_well_typed_stream_of_tlsgate_events_renders_records_that_validate(
    events: list[dict[str, Any]], tz: timezone, host: str | None
) -> None:
    renderer = EveRenderer(local_tz=tz, host=host)
    for event in events:
        for record in renderer.render(event):
            assert schema_errors(record) == []
            assert TIMESTAMP_PATTERN.match(record["timestamp"])
            json.dumps(record, allow_nan=False)  # plain JSON, nothing else
            if "flow_id" in record:
                assert 0 <= record["flow_id"] <= FLOW_ID_MASK
            assert record["event_type"] in ("tls", "http", "anomaly")


# -- the command: tlsgate events --format eve ---------------------------------------------------


def write_recording(path: Path, events: list[dict[str, Any]]) -> None:
    pack = new_packer().pack
    path.write_bytes(b"".join(pack(event) for event in events))


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tlsgate")
    add_events_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["events", *argv])
    result: int = args.func(args)
    return result


def test_tlsgate_events_format_eve_prints_a_recording_as_valid_eve_lines(tmp_path: Path) -> None:
    recording = tmp_path / "events.msgpack"
    write_recording(recording, STREAM)
    result = subprocess.run(
        [sys.executable, "-m", "tlsgate", "events", "--file", str(recording), "--format", "eve"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "TZ": "UTC"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    records = [json.loads(line) for line in lines]
    assert records == [EXPECTED_HTTP, EXPECTED_ANOMALY, EXPECTED_TLS]
    for record in records:
        assert schema_errors(record) == []
    assert all(line.isascii() and ": " not in line for line in lines)


def test_filter_picks_the_tlsgate_types_whose_records_are_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recording = tmp_path / "events.msgpack"
    write_recording(recording, STREAM)
    assert run(["--file", str(recording), "--format", "eve", "--filter", "conn_close"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    # The filtered-out hello and conn_open still fed the renderer.
    assert record["flow_id"] == FLOW_0_17
    assert record["tls"]["ja4"] == "t13d1516h2_8daaf6152771_02713d6af862"


def test_count_counts_printed_records_not_events(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recording = tmp_path / "events.msgpack"
    write_recording(recording, STREAM)
    assert run(["--file", str(recording), "--format", "eve", "--count", "2"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [record["event_type"] for record in records] == ["http", "anomaly"]


def test_an_event_without_a_usable_ts_is_an_operator_error_after_the_records_before_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recording = tmp_path / "events.msgpack"
    write_recording(recording, [HELLO, HTTP, with_fields(HTTP, ts="yesterday", seq=45)])
    with pytest.raises(OperatorError, match="event 45 of worker 0 cannot be written as EVE"):
        run(["--file", str(recording), "--format", "eve"])
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line) == EXPECTED_HTTP


# -- websocket --------------------------------------------------------------------------------

WS_MESSAGE = {
    "type": "websocket", "version": 1, "ts": 1795839812.9715345, "worker": 0, "seq": 7,
    "conn": "0-1", "client_ip": "127.0.0.1", "client_port": 56576, "server_ip": "127.0.0.1",
    "server_port": 36993, "sni": "localhost", "kind": "message", "stream_id": None,
    "direction": "client", "opcode": "text", "size": 5, "fragments": 1, "compressed": False,
    "close_code": None,
}  # fmt: skip


def test_a_websocket_message_becomes_one_websocket_record() -> None:
    (record,) = render(WS_MESSAGE)
    assert schema_errors(record) == []
    assert (record["event_type"], record["app_proto"], record["direction"]) == (
        "websocket",
        "websocket",
        "to_server",
    )
    assert record["websocket"] == {"fin": True, "opcode": "text"}  # no payload: no capture
    assert record["flow_id"] == flow_id(GATEWAY, "0-1")  # the connection's other records'


def test_a_server_message_is_to_client_and_a_captured_payload_is_base64_and_printable() -> None:
    event = with_fields(WS_MESSAGE, direction="server", opcode="binary", payload=b"hi\x00\xff!")
    (record,) = render(event)
    assert schema_errors(record) == []
    assert record["direction"] == "to_client"
    assert record["websocket"] == {
        "fin": True,
        "opcode": "binary",
        "payload_base64": "aGkA/yE=",
        "payload_printable": "hi..!",
    }


def test_the_websocket_upgrade_renders_no_record_of_its_own() -> None:
    # the Upgrade request and its 101 are the connection's http record already
    upgrade = with_fields(WS_MESSAGE, kind="upgrade", http_version="1.1", path="/chat")
    assert render(upgrade) == []
