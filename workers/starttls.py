"""The clear-text phase of a mail connection, up to STARTTLS: what to report, when to switch.

Rules:

- :class:`ClearTextPhase` wraps the protocol's :class:`~tlsgate.workers.mail.MailDialogue`
  and turns its records into decisions for the I/O layer, without doing any I/O:
  ``feed_client``/``feed_server`` return a :class:`Step` saying which events to emit and
  whether to go on relaying in clear, switch to TLS interception, or refuse.
- Switch: the server accepted the client's STARTTLS. The reply bytes that carried the
  acceptance are handed back (``Step.reply``): the I/O layer holds them, stops the clear
  relay, writes them to the client itself and then expects the client's ClientHello. So
  no client byte can be relayed in clear after the acceptance.
- Names. In transparent mode the original destination is an IP address; the server's
  greeting and EHLO banner are text any on-path attacker can write, so they are reported
  but never used for validation. The TLS phase validates the server against the
  ClientHello's SNI or, without SNI, against the destination IP address (an IP SAN), and
  refuses otherwise (see ``workers/intercept.py``).
- Downgrade. When the server is one the operator *requires* STARTTLS from
  (``mail.starttls_required``), each of these refuses the connection with a ``starttls``
  event ``status: "downgrade"``: the capability list lacks STARTTLS (stripped on the path),
  the server answers STARTTLS with a refusal (e.g. SMTP 454), or the client sends anything
  beyond the greeting commands in clear. Elsewhere a refused STARTTLS is reported
  (``status: "refused"``, ``downgrade: true``: a refusal after the capability was offered
  is what a stripping middlebox produces) and the session is relayed in clear, as is a
  server that never offered STARTTLS (``status: "not-offered"``).
- Exactly one ``starttls`` event per connection: at the switch (with the ClientHello's
  fingerprints, added by the I/O layer), at a refusal, or at the end (``not-offered``,
  ``not-used``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from tlsgate.workers.mail import (
    Capabilities,
    MailDialogue,
    Protocol,
    Record,
    SmtpTransaction,
    StartTls,
    StartTlsOutcome,
)

#: Commands a client may send in clear to a server STARTTLS is required from.
GREETING_COMMANDS: Final = frozenset(
    {"EHLO", "HELO", "LHLO", "STARTTLS", "STLS", "CAPABILITY", "CAPA", "NOOP", "QUIT", "RSET",
     "ID"}
)  # fmt: skip


class Next(StrEnum):
    """What the I/O layer does after a step."""

    RELAY = "relay"
    SWITCH = "switch"
    REFUSE = "refuse"


Events = list[tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class MailPorts:
    """Which destination ports start with a clear-text mail dialogue, and which servers
    must do STARTTLS (built once per worker from the configuration)."""

    by_port: dict[int, Protocol]
    required_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def build(cls, smtp: tuple[int, ...], imap: tuple[int, ...], pop3: tuple[int, ...],
              required: tuple[str, ...] = ()) -> MailPorts:  # fmt: skip
        by_port = {p: Protocol.SMTP for p in smtp}
        by_port.update({p: Protocol.IMAP for p in imap})
        by_port.update({p: Protocol.POP3 for p in pop3})
        return cls(by_port, tuple(ipaddress.ip_network(n) for n in required))

    def protocol(self, port: int) -> Protocol | None:
        return self.by_port.get(port)

    def required(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        return any(addr in net for net in self.required_networks)


@dataclass(slots=True)
class Step:
    """The outcome of feeding one chunk."""

    next: Next = Next.RELAY
    #: (event type, fields) pairs to emit, in order.
    events: Events = field(default_factory=list)
    #: SWITCH: the server bytes carrying the acceptance, for the client.
    reply: bytes = b""
    #: REFUSE: why, for the close event.
    reason: str = ""


def transaction_fields(tx: SmtpTransaction, tls: bool) -> dict[str, Any]:
    """The ``smtp`` event's own fields."""
    return {"tls": tls, "helo": tx.helo, "mail_from": tx.mail_from, "rcpt_count": tx.rcpt_count,
            "message_bytes": tx.message_bytes, "subject_sha256": tx.subject_sha256,
            "reply_code": tx.reply_code, "complete": tx.complete}  # fmt: skip


def summary_fields(dialogue: MailDialogue) -> dict[str, Any] | None:
    """The ``imap``/``pop3`` event's own fields, or None for SMTP or an idle phase."""
    info = dialogue.summary()
    if info is None or not (dialogue.client_bytes or dialogue.server_bytes):
        return None
    return {"tls": dialogue.tls, "user_sha256": info.user_sha256, "commands": dict(info.commands),
            "messages": info.messages, "message_bytes": info.message_bytes,
            "uploaded_messages": info.uploaded_messages, "uploaded_bytes": info.uploaded_bytes,
            "auth_failures": info.auth_failures}  # fmt: skip


def record_events(dialogue: MailDialogue, records: list[Record]) -> Events:
    """Per-transaction events (SMTP) for records of either phase."""
    return [(dialogue.protocol.value, transaction_fields(r, dialogue.tls))
            for r in records if isinstance(r, SmtpTransaction)]  # fmt: skip


class ClearTextPhase:
    """Decisions for the clear-text phase of one connection."""

    def __init__(self, dialogue: MailDialogue, *, required: bool) -> None:
        self.dialogue = dialogue
        self.required = required
        self.reported = False
        self.server_reply: str | None = None

    def starttls_event(self, status: str, *, downgrade: bool, detail: str) -> dict[str, Any]:
        self.reported = True
        return {"protocol": self.dialogue.protocol.value, "status": status,
                "offered": self.dialogue.starttls_offered, "downgrade": downgrade,
                "required": self.required, "detail": detail,
                "server_reply": self.server_reply}  # fmt: skip

    @property
    def settled(self) -> bool:
        """Is it known whether this session will use STARTTLS? (Until then the phase runs
        under ``mail.negotiation_timeout``.)"""
        d = self.dialogue
        return (
            self.reported
            or d.starttls is StartTls.ACCEPTED
            or d.starttls is StartTls.REFUSED
            or d.starttls_offered is False
            or bool(set(d.commands) - GREETING_COMMANDS)
        )

    def feed_client(self, data: bytes) -> Step:
        d = self.dialogue
        step = Step(events=record_events(d, d.feed_client(data)))
        if self.required and d.starttls is StartTls.NOT_REQUESTED:
            beyond = sorted(set(d.commands) - GREETING_COMMANDS)
            if beyond:
                return self._downgrade(step, f"client sent {beyond[0]} in clear before STARTTLS")
        return step

    def feed_server(self, data: bytes) -> Step:
        d = self.dialogue
        records = d.feed_server(data)
        step = Step(events=record_events(d, records))
        for r in records:
            if isinstance(r, Capabilities) and not r.starttls and self.required:
                return self._downgrade(step, "the server's capabilities lack STARTTLS")
            if isinstance(r, StartTlsOutcome):
                self.server_reply = r.reply
                if r.accepted:
                    step.next = Next.SWITCH
                    step.reply = data
                    return step
                if self.required:
                    return self._downgrade(step, "the server refused STARTTLS")
                step.events.append((
                    "starttls", self.starttls_event("refused", downgrade=True,
                                                    detail="the server refused STARTTLS"),
                ))  # fmt: skip
        return step

    def _downgrade(self, step: Step, detail: str) -> Step:
        step.next = Next.REFUSE
        step.reason = "starttls-downgrade"
        step.events.append(("starttls", self.starttls_event("downgrade", downgrade=True,
                                                            detail=detail)))  # fmt: skip
        return step

    def upgraded(self) -> dict[str, Any]:
        """The ``starttls`` event of a switch (the I/O layer adds the ClientHello's fields)."""
        return self.starttls_event("upgraded", downgrade=False, detail="TLS intercepted")

    def finish(self) -> Events:
        """The connection ended in clear: what is left to report."""
        d = self.dialogue
        events = record_events(d, d.finish())
        summary = summary_fields(d)
        if summary is not None:
            events.append((d.protocol.value, summary))
        if not self.reported:
            if d.starttls is StartTls.REQUESTED:
                status, detail = (
                    "not-completed",
                    "the connection ended before STARTTLS was answered",
                )
            elif d.starttls_offered is False:
                status, detail = "not-offered", "the server did not offer STARTTLS"
            elif d.starttls_offered is None:
                status, detail = "not-offered", "the server never listed its capabilities"
            else:
                status, detail = "not-used", "the client did not request STARTTLS"
            events.append(("starttls", self.starttls_event(status, downgrade=False, detail=detail)))
        return events
