"""Mail with STARTTLS, implicit TLS, opaque TLS and the learned bypass, through a real
transparent gateway: client ns → gateway ns (REDIRECT to tlsgate) → server ns.

One topology, one set of servers and one gateway serve the whole module (starting them is
most of the cost); each test uses its own destination port or client, and finds its events
by the server port it used. Servers: aiosmtpd (SMTP), the IMAP/POP3/echo servers of
``tests/mailpeers.py``, ``tests/https_server.py``. Clients: smtplib, imaplib, poplib and
ssl, run in the client namespace (``tests/mailpeers.py``)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.gateway import Gateway, Origin, _wait_line
from tests.netns import ALLOW_TEST_CLIENTS, Topology, requires_netns

pytestmark = [
    requires_netns,
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nftables (nft)"),
]

ROOT = Path(__file__).resolve().parents[2]
GATEWAY_PORT = 8443
REDIRECTED = "25, 110, 143, 443, 465, 2525, 2526, 4433, 8444"
RULES = f"""
table ip tlsgate_mail_test {{
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "g1" tcp dport {{ {REDIRECTED} }} redirect to :{GATEWAY_PORT}
  }}
}}
"""


@dataclass
class Lab:
    topo: Topology
    gw: Gateway
    origin_ca: Path
    server_ip: str
    strict_ip: str  # a second server address, in mail.starttls_required

    def client(self, role: str, port: int, *extra: str, ip: str | None = None,
               ca: Path | None = None) -> dict[str, Any]:  # fmt: skip
        argv = [sys.executable, "-m", "tests.mailpeers", role, "--ip", ip or self.server_ip,
                "--port", str(port), "--ca", str(ca or self.gw.ca_cert), *extra]  # fmt: skip
        done = self.topo.run(self.topo.client, argv, timeout=60)
        result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
        return result

    def events(self, type_: str, port: int, count: int = 1, ip: str | None = None,
               timeout: float = 10.0) -> list[dict[str, Any]]:  # fmt: skip
        want = ip or self.server_ip
        return self.gw.wait_match(
            type_, lambda e: e.get("server_port") == port and e.get("server_ip") == want,
            count, timeout,
        )  # fmt: skip


def _write_leaf(ca: trustme.CA, d: Path, tag: str, *names: str) -> tuple[Path, Path]:
    leaf = ca.issue_cert(*names)
    cert, key = d / f"{tag}.pem", d / f"{tag}-key.pem"
    leaf.private_key_pem.write_to_path(str(key))
    with cert.open("wb") as fh:
        for blob in leaf.cert_chain_pems:
            fh.write(blob.bytes())
    return cert, key


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    d = tmp_path_factory.mktemp("mail")
    pipes: list[Any] = []
    with Topology() as topo, contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: [p.close() for p in pipes])
        strict_ip = topo.server_ip.rsplit(".", 1)[0] + ".3"
        topo.run(topo.server, ["ip", "addr", "add", f"{strict_ip}/24", "dev", "s0"])
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(d / "origin-ca.pem"))
        # the mail server's certificate covers its name and both addresses (IP SANs);
        # the IMAP server's only the name: a client without SNI cannot be validated there
        mail = _write_leaf(ca, d, "mail", "mail.test", topo.server_ip, strict_ip)
        imap = _write_leaf(ca, d, "imap", "mail.test")
        web = _write_leaf(ca, d, "web", "server.test", topo.server_ip)
        bad = _write_leaf(trustme.CA(), d, "bad", "other.test")

        def serve(role: str, host: str, port: int, cert: tuple[Path, Path], *extra: str) -> None:
            proc = topo.popen(topo.server, [
                sys.executable, "-m", "tests.mailpeers", role, "--host", host, "--port",
                str(port), "--cert", str(cert[0]), "--key", str(cert[1]), *extra,
            ], stdout=subprocess.PIPE, cwd=ROOT)  # fmt: skip
            pipes.append(proc.stdout)
            _wait_line(proc, proc.stdout, re.compile(r"listening"))

        ip = topo.server_ip
        serve("smtp-server", ip, 25, mail)
        serve("smtp-server", ip, 2525, mail, "--starttls", "none")
        serve("smtp-server", ip, 2526, mail, "--starttls", "refuse")
        serve("smtp-server", strict_ip, 25, mail, "--starttls", "none")
        serve("smtp-server", ip, 465, mail, "--starttls", "implicit")
        serve("imap-server", ip, 143, imap)
        serve("pop3-server", ip, 110, mail)
        serve("echo-server", ip, 4433, mail, "--alpn", "x-echo")
        topo.gateway_nft(RULES)
        config = d / "tlsgate.toml"
        config.write_text(
            "[mail]\nsmtp_ports = [25, 587, 2525, 2526]\nnegotiation_timeout = 2.0\n"
            f'starttls_required = ["{strict_ip}/32"]\n'
            "[learned_bypass]\nenabled = true\nthreshold = 2\nwindow = 60.0\nttl = 3600.0\n"
        )
        with (
            Origin(web[0], web[1], host=ip, port=443, netns=topo.server),
            Origin(bad[0], bad[1], host=ip, port=8444, netns=topo.server),
            Gateway(d / "gw", upstream_ca=d / "origin-ca.pem",
                    listen=f"{topo.gateway_client_ip}:{GATEWAY_PORT}", netns=topo.gateway,
                    args=["--mode", "transparent", "--workers", "2", "--config",
                          str(config), *ALLOW_TEST_CLIENTS]) as gw,
        ):  # fmt: skip
            yield Lab(topo, gw, d / "origin-ca.pem", ip, strict_ip)


# -- SMTP ---------------------------------------------------------------------------------------
def test_smtp_starttls_is_intercepted_and_the_transaction_reported(lab: Lab) -> None:
    result = lab.client("smtp-client", 25, "--name", "mail.test")
    assert result == {"ok": True, "offered": True, "ehlo": 250, "starttls": 220,
                      "cipher": result["cipher"], "refused": {}}  # fmt: skip
    (starttls,) = lab.events("starttls", 25)
    assert starttls["status"] == "upgraded" and starttls["sni"] == "mail.test"
    assert starttls["offered"] is True and starttls["downgrade"] is False
    assert starttls["ja3_hash"] and starttls["ja4"]
    (smtp,) = lab.events("smtp", 25)
    assert smtp["tls"] is True and smtp["helo"] == "client.test"
    assert smtp["mail_from"] == "alice@example.test" and smtp["rcpt_count"] == 2
    assert smtp["reply_code"] == 250 and smtp["complete"] is True
    assert smtp["message_bytes"] > 0 and len(smtp["subject_sha256"]) == 64
    (close,) = lab.events("conn_close", 25)
    assert close["app_protocol"] == "smtp" and close["upstream_verdict"] == "valid"
    assert close["client_tls_version"] and close["bytes_from_client"] > smtp["message_bytes"]
    assert "hello over TLS" not in json.dumps(lab.gw.events())  # no bodies without capture


def test_smtp_without_sni_is_validated_against_the_destination_ip(lab: Lab) -> None:
    result = lab.client("smtp-client", 25, "--no-sni", ip=lab.server_ip)
    assert result["ok"] and result["starttls"] == 220, result
    upgraded = [e for e in lab.events("starttls", 25, 2) if e["sni"] is None]
    assert upgraded and upgraded[0]["status"] == "upgraded"
    closes = [e for e in lab.events("conn_close", 25, 2) if e["sni"] is None]
    assert closes[0]["upstream_verdict"] == "valid"


def test_smtp_server_not_offering_starttls_is_relayed_in_clear_and_reported(lab: Lab) -> None:
    result = lab.client("smtp-client", 2525, "--starttls", "none")
    assert result["ok"] and result["offered"] is False, result
    (smtp,) = lab.events("smtp", 2525)
    assert smtp["tls"] is False and smtp["rcpt_count"] == 2 and smtp["complete"]
    (starttls,) = lab.events("starttls", 2525)
    assert starttls["status"] == "not-offered" and starttls["downgrade"] is False
    (close,) = lab.events("conn_close", 2525)
    assert close["app_protocol"] == "smtp" and close["client_tls_version"] is None


def test_a_fully_pipelined_smtp_session_stays_in_step(lab: Lab) -> None:
    # commands, the message and QUIT in one write: the gateway holds the parse of what
    # follows DATA until the server's 354, as the server itself does
    session = (b"EHLO pipe.test\r\nMAIL FROM:<p@example.test>\r\nRCPT TO:<r@example.test>\r\n"
               b"DATA\r\nSubject: piped\r\n\r\nbody\r\n.\r\nQUIT\r\n")  # fmt: skip
    result = lab.client("raw-client", 2525, "--send", session.hex(), "--wait", "5")
    assert result["ok"] and result["closed"] and "221" in result["received"], result
    piped = lab.gw.wait_match("smtp", lambda e: e["helo"] == "pipe.test")
    assert piped and piped[0]["mail_from"] == "p@example.test" and piped[0]["rcpt_count"] == 1
    assert piped[0]["complete"] and piped[0]["message_bytes"] == len(
        b"Subject: piped\r\n\r\nbody\r\n"
    )
    assert lab.gw.events("protocol_error") == []


def test_commands_pipelined_behind_starttls_are_refused_not_relayed(lab: Lab) -> None:
    # CVE-2011-0411's class: bytes sent in clear after STARTTLS would be taken as sent
    # inside TLS by a vulnerable server; the gateway refuses them instead of relaying them
    session = b"EHLO inject.test\r\nSTARTTLS\r\nMAIL FROM:<evil@example.test>\r\n"
    result = lab.client("raw-client", 25, "--send", session.hex(), "--wait", "5")
    assert result["ok"] and result["closed"], result
    errors = lab.gw.wait_match("protocol_error", lambda e: "after STARTTLS" in e["error"])
    assert errors and errors[0]["stage"] == "smtp" and errors[0]["server_port"] == 25
    assert "220 Ready to start TLS" not in result["received"]  # the server never saw it
    ended = lab.gw.wait_match("starttls", lambda e: e["conn"] == errors[0]["conn"])
    assert ended and ended[0]["status"] == "not-completed"


def test_starttls_answered_454_is_reported_as_a_downgrade(lab: Lab) -> None:
    result = lab.client("smtp-client", 2526)
    assert not result["ok"] and "454" in result["error"], result
    (starttls,) = lab.events("starttls", 2526)
    assert starttls["status"] == "refused" and starttls["downgrade"] is True
    assert starttls["server_reply"].startswith("454")


def test_stripped_starttls_for_a_server_that_requires_it_is_refused(lab: Lab) -> None:
    result = lab.client("smtp-client", 25, ip=lab.strict_ip)
    assert not result["ok"], result
    (starttls,) = lab.events("starttls", 25, ip=lab.strict_ip)
    assert starttls["status"] == "downgrade" and starttls["required"] is True
    assert "lack STARTTLS" in starttls["detail"]
    (close,) = lab.events("conn_close", 25, ip=lab.strict_ip)
    assert close["close_reason"] == "starttls-downgrade"


def test_an_over_long_clear_text_line_ends_the_connection_with_a_clear_error(lab: Lab) -> None:
    result = lab.client("raw-client", 2525, "--send", (b"EHLO " + b"a" * 9000).hex(),
                        "--wait", "5")  # fmt: skip
    assert result["ok"] and result["closed"], result
    (error,) = lab.events("protocol_error", 2525)
    assert error["stage"] == "smtp" and "longer than 8192 bytes" in error["error"]
    closes = lab.events("conn_close", 2525, 2)
    assert [c["close_reason"] for c in closes if c["bytes_from_client"] > 8192] == [
        "protocol-error"
    ]


def test_a_clear_text_phase_that_never_reaches_starttls_is_ended_by_its_timeout(lab: Lab) -> None:
    # the server offers STARTTLS; the client neither uses it nor goes on: after
    # mail.negotiation_timeout (2 s here) the gateway ends it
    result = lab.client("raw-client", 25, "--send", b"EHLO slow.test\r\n".hex(), "--wait", "8",
                        ip=lab.server_ip)  # fmt: skip
    assert result["ok"] and result["closed"] and "STARTTLS" in result["received"], result
    timeouts = lab.gw.wait_match(
        "starttls", lambda e: e["status"] == "timeout" and e["server_port"] == 25
    )
    assert timeouts and "negotiation_timeout" in timeouts[0]["detail"]
    assert timeouts[0]["offered"] is True
    closes = lab.gw.wait_match("conn_close", lambda e: e["conn"] == timeouts[0]["conn"])
    assert closes[0]["close_reason"] == "starttls-timeout"


def test_implicit_tls_smtps_is_intercepted_as_generic_tls(lab: Lab) -> None:
    result = lab.client("smtps-client", 465)
    assert result == {"ok": True}, result
    (close,) = lab.events("conn_close", 465)
    assert close["upstream_verdict"] == "valid" and close["app_protocol"] == "opaque"
    assert close["bytes_from_client"] > 0 and close["bytes_from_server"] > 0


# -- IMAP and POP3 ------------------------------------------------------------------------------
def test_imap_starttls_is_intercepted_and_the_session_summarized(lab: Lab) -> None:
    result = lab.client("imap-client", 143)
    assert result == {"ok": True, "fetched": result["fetched"], "same": True}, result
    (starttls,) = lab.events("starttls", 143)
    assert starttls["status"] == "upgraded" and starttls["protocol"] == "imap"
    (imap,) = lab.events("imap", 143)
    assert imap["tls"] is True and imap["messages"] == 1
    assert imap["message_bytes"] == result["fetched"]
    assert imap["user_sha256"] and imap["user_sha256"] != "alice"
    assert imap["commands"]["LOGIN"] == 1 and imap["commands"]["FETCH"] == 1


def test_imap_without_sni_to_a_certificate_without_ip_san_is_refused(lab: Lab) -> None:
    result = lab.client("imap-client", 143, "--no-sni")
    assert not result["ok"], result
    refused = lab.events("upstream_refused", 143)
    assert refused and refused[0]["name"] == lab.server_ip and refused[0]["sni"] is None


def test_pop3_stls_is_intercepted_and_the_session_summarized(lab: Lab) -> None:
    result = lab.client("pop3-client", 110)
    assert result["ok"] and result["same"], result
    (starttls,) = lab.events("starttls", 110)
    assert starttls["status"] == "upgraded" and starttls["protocol"] == "pop3"
    (pop3,) = lab.events("pop3", 110)
    assert pop3["tls"] and pop3["messages"] == 1 and pop3["message_bytes"] == result["retrieved"]
    assert pop3["commands"]["RETR"] == 1 and pop3["user_sha256"]


# -- opaque TLS ---------------------------------------------------------------------------------
def test_a_non_http_tls_protocol_is_relayed_opaque_with_counts_and_fingerprints(lab: Lab) -> None:
    result = lab.client("echo-client", 4433, "--name", "mail.test")
    assert result == {"ok": True, "echo": "PING ONE\r\nPING TWO\r\n", "alpn": "x-echo"}
    (opened,) = lab.events("conn_open", 4433)
    assert opened["client_alpn"] == ["x-echo"] and opened["ja3_hash"] and opened["ja4"]
    (close,) = lab.events("conn_close", 4433)
    assert close["app_protocol"] == "opaque" and close["alpn"] == "x-echo"
    assert close["bytes_from_client"] == 20 and close["bytes_from_server"] == 20


# -- learned bypass -----------------------------------------------------------------------------
def test_a_pinning_client_teaches_the_bypass_and_its_next_connection_is_spliced(
    lab: Lab,
) -> None:
    for _ in range(2):  # threshold = 2
        refused = lab.client("pinned-client", 443, "--name", "server.test", ca=lab.origin_ca)
        assert not refused["ok"] and "CERTIFICATE_VERIFY_FAILED" in refused["error"], refused
    (learned,) = lab.gw.wait_match("bypass_learned", lambda e: e["name"] == "server.test")
    assert learned["kind"] == "unknown_ca" and learned["rejections"] == 2
    spliced = lab.client("pinned-client", 443, "--name", "server.test", ca=lab.origin_ca)
    assert spliced == {"ok": True, "response": "HTTP/1.1 200 OK",
                       "body": "hello from /pinned\n"}  # fmt: skip
    policy = lab.gw.wait_match("policy", lambda e: e["name"] == "server.test")
    assert policy[0]["decision"] == "bypass" and "learned bypass" in policy[0]["reason"]
    status = json.loads(subprocess.run(
        [sys.executable, "-m", "tlsgate", "status", "--json", "--state-dir",
         str(lab.gw.state_dir)], capture_output=True, text=True, timeout=60, check=True,
    ).stdout)["learned_bypass"]  # fmt: skip
    assert status["enabled"] is True
    assert [e["name"] for e in status["entries"]] == ["server.test"]
    assert status["entries"][0]["spliced"] >= 1
    text = subprocess.run(
        [sys.executable, "-m", "tlsgate", "status", "--state-dir", str(lab.gw.state_dir)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "learned bypass: on, 1 names" in text and "server.test  (unknown_ca x2" in text
    metrics = subprocess.run(
        [sys.executable, "-m", "tlsgate", "metrics", "--state-dir", str(lab.gw.state_dir)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "tlsgate_learned_bypass_entries 1" in metrics


def test_an_upstream_validation_failure_never_teaches_the_bypass(lab: Lab) -> None:
    for _ in range(3):
        result = lab.client("pinned-client", 8444, "--name", "other.test", ca=lab.origin_ca)
        assert not result["ok"], result
    assert len(lab.events("upstream_refused", 8444, 3)) == 3
    time.sleep(0.5)
    learned = [e for e in lab.gw.events("bypass_learned") if e["name"] == "other.test"]
    assert learned == []
    closes = lab.events("conn_close", 8444, 3)
    assert all(c["decision"] == "intercept" for c in closes)
