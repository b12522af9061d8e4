"""The clear-text phase's decisions (workers/starttls.py), with bytes alone."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsgate.workers.mail import MailProtocolError, Protocol, new_dialogue
from tlsgate.workers.starttls import ClearTextPhase, MailPorts, Next

GREETING = b"220 mail.test ESMTP\r\n"
EHLO_OK = b"250-mail.test\r\n250-STARTTLS\r\n250 SIZE 1000\r\n"
EHLO_STRIPPED = b"250-mail.test\r\n250 SIZE 1000\r\n"


def smtp(required: bool = False) -> ClearTextPhase:
    phase = ClearTextPhase(new_dialogue(Protocol.SMTP), required=required)
    assert phase.feed_server(GREETING).next is Next.RELAY
    assert phase.feed_client(b"EHLO c.test\r\n").next is Next.RELAY
    return phase


def test_an_accepted_starttls_switches_and_hands_back_the_reply_bytes() -> None:
    phase = smtp()
    phase.feed_server(EHLO_OK)
    phase.feed_client(b"STARTTLS\r\n")
    step = phase.feed_server(b"220 2.0.0 go ahead\r\n")
    assert step.next is Next.SWITCH and step.reply == b"220 2.0.0 go ahead\r\n"
    event = phase.upgraded()
    assert event["status"] == "upgraded" and event["offered"] is True


def test_a_stripped_capability_is_a_downgrade_when_starttls_is_required() -> None:
    phase = smtp(required=True)
    step = phase.feed_server(EHLO_STRIPPED)
    assert step.next is Next.REFUSE and step.reason == "starttls-downgrade"
    ((type_, fields),) = step.events
    assert type_ == "starttls" and fields["status"] == "downgrade" and fields["required"]


def test_a_stripped_capability_is_only_reported_when_not_required() -> None:
    phase = smtp()
    assert phase.feed_server(EHLO_STRIPPED).next is Next.RELAY
    assert phase.settled
    phase.feed_client(b"QUIT\r\n")
    phase.feed_server(b"221 bye\r\n")
    (event,) = [f for t, f in phase.finish() if t == "starttls"]
    assert event["status"] == "not-offered" and event["downgrade"] is False


def test_a_refused_starttls_is_reported_as_a_downgrade_and_the_session_continues() -> None:
    phase = smtp()
    phase.feed_server(EHLO_OK)
    phase.feed_client(b"STARTTLS\r\n")
    step = phase.feed_server(b"454 4.7.0 TLS not available\r\n")
    assert step.next is Next.RELAY
    ((_, fields),) = step.events
    assert fields["status"] == "refused" and fields["downgrade"] is True
    assert [t for t, _ in phase.finish()] == []  # one starttls event per connection


def test_a_refused_starttls_is_a_refusal_when_required() -> None:
    phase = smtp(required=True)
    phase.feed_server(EHLO_OK)
    phase.feed_client(b"STARTTLS\r\n")
    assert phase.feed_server(b"454 no\r\n").next is Next.REFUSE


def test_a_client_sending_mail_in_clear_to_a_required_server_is_refused() -> None:
    phase = smtp(required=True)
    phase.feed_server(EHLO_OK)
    step = phase.feed_client(b"MAIL FROM:<a@b>\r\n")
    assert step.next is Next.REFUSE and "MAIL in clear" in step.events[0][1]["detail"]


def test_offered_but_unused_starttls_is_reported_at_the_end() -> None:
    phase = smtp()
    phase.feed_server(EHLO_OK)
    assert not phase.settled  # offered, the client has not decided yet
    phase.feed_client(b"MAIL FROM:<a@b>\r\n")
    assert phase.settled
    (event,) = [f for t, f in phase.finish() if t == "starttls"]
    assert event["status"] == "not-used"


def test_injection_after_starttls_surfaces_as_the_parsers_error() -> None:
    phase = smtp()
    phase.feed_server(EHLO_OK)
    with pytest.raises(MailProtocolError):
        phase.feed_client(b"STARTTLS\r\nRSET\r\n")


def test_imap_and_pop3_summaries_at_the_end_of_a_clear_session() -> None:
    phase = ClearTextPhase(new_dialogue(Protocol.POP3), required=False)
    phase.feed_server(b"+OK ready\r\n")
    phase.feed_client(b"USER bob\r\nPASS x\r\nQUIT\r\n")
    phase.feed_server(b"+OK\r\n+OK\r\n+OK bye\r\n")
    events = dict(phase.finish())
    assert events["pop3"]["tls"] is False and events["pop3"]["commands"]["USER"] == 1
    assert events["starttls"]["status"] == "not-offered"


def test_mail_ports_map_ports_to_protocols_and_required_networks() -> None:
    ports = MailPorts.build((25, 587), (143,), (110,), ("192.0.2.0/24",))
    assert ports.protocol(587) is Protocol.SMTP and ports.protocol(443) is None
    assert ports.protocol(143) is Protocol.IMAP and ports.protocol(110) is Protocol.POP3
    assert ports.required("192.0.2.7") and not ports.required("198.51.100.1")


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(list(Protocol)),
    st.booleans(),
    st.lists(st.tuples(st.booleans(), st.binary(max_size=200)), max_size=20),
)
def test_any_bytes_give_a_decision_or_the_parsers_one_error(
    protocol: Protocol, required: bool, chunks: list[tuple[bool, bytes]]
) -> None:
    phase = ClearTextPhase(new_dialogue(protocol, max_line=512), required=required)
    try:
        for from_client, data in chunks:
            step = phase.feed_client(data) if from_client else phase.feed_server(data)
            assert step.next in (Next.RELAY, Next.SWITCH, Next.REFUSE)
            if step.next is not Next.RELAY:
                break
        phase.finish()
    except MailProtocolError:
        pass
