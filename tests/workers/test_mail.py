"""The SMTP, IMAP and POP3 dialogue parsers, with bytes alone (no sockets)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsgate.workers.mail import (
    Capabilities,
    ImapDialogue,
    MailDialogue,
    MailProtocolError,
    Pop3Dialogue,
    Protocol,
    SmtpDialogue,
    SmtpTransaction,
    StartTls,
    StartTlsOutcome,
    new_dialogue,
    user_digest,
)

EHLO_WITH_STARTTLS = b"250-mail.test\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
EHLO_WITHOUT_STARTTLS = b"250-mail.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"


def converse(d: MailDialogue, *steps: tuple[str, bytes]) -> list[object]:
    out: list[object] = []
    for side, data in steps:
        out += d.feed_client(data) if side == "c" else d.feed_server(data)
    return out


# -- SMTP -------------------------------------------------------------------------------------
def test_smtp_starttls_offered_requested_and_accepted() -> None:
    d = SmtpDialogue()
    out = converse(d, ("s", b"220 mail.test ESMTP\r\n"), ("c", b"EHLO client.test\r\n"),
                   ("s", EHLO_WITH_STARTTLS), ("c", b"STARTTLS\r\n"),
                   ("s", b"220 2.0.0 Ready to start TLS\r\n"))  # fmt: skip
    assert out == [Capabilities(True), StartTlsOutcome(True, "220 2.0.0 Ready to start TLS")]
    assert d.starttls is StartTls.ACCEPTED and d.helo == "client.test"


def test_smtp_server_without_starttls_is_reported_as_not_offering_it() -> None:
    d = SmtpDialogue()
    out = converse(d, ("s", b"220 hi\r\n"), ("c", b"EHLO c\r\n"), ("s", EHLO_WITHOUT_STARTTLS))
    assert out == [Capabilities(False)] and d.starttls_offered is False


def test_smtp_starttls_answered_454_is_a_refusal() -> None:
    d = SmtpDialogue()
    out = converse(d, ("s", b"220 hi\r\n"), ("c", b"EHLO c\r\n"), ("s", EHLO_WITH_STARTTLS),
                   ("c", b"STARTTLS\r\n"), ("s", b"454 4.7.0 TLS not available\r\n"),
                   ("c", b"QUIT\r\n"))  # fmt: skip
    assert out[-1] == StartTlsOutcome(False, "454 4.7.0 TLS not available")
    assert d.starttls is StartTls.REFUSED


def test_smtp_bytes_pipelined_after_starttls_are_refused() -> None:
    d = converse_ready()
    with pytest.raises(MailProtocolError, match="after STARTTLS"):
        d.feed_client(b"STARTTLS\r\nMAIL FROM:<x@y>\r\n")


def test_smtp_client_bytes_before_the_starttls_answer_are_refused() -> None:
    d = converse_ready()
    d.feed_client(b"STARTTLS\r\n")
    with pytest.raises(MailProtocolError, match="injection"):
        d.feed_client(b"\x16\x03\x01")


def test_smtp_server_bytes_after_accepting_starttls_are_refused() -> None:
    d = converse_ready()
    d.feed_client(b"STARTTLS\r\n")
    with pytest.raises(MailProtocolError, match="after accepting STARTTLS"):
        d.feed_server(b"220 go ahead\r\n250 injected\r\n")


def converse_ready() -> SmtpDialogue:
    d = SmtpDialogue()
    converse(d, ("s", b"220 hi\r\n"), ("c", b"EHLO c\r\n"), ("s", EHLO_WITH_STARTTLS))
    return d


def test_smtp_pipelined_transaction_yields_envelope_size_and_subject_hash() -> None:
    d = SmtpDialogue(tls=True)
    message = b"Subject: quarterly\r\n figures\r\nFrom: a@b\r\n\r\nbody line\r\n..dot\r\n"
    out = converse(
        d,
        ("c", b"EHLO client.test\r\n"), ("s", EHLO_WITHOUT_STARTTLS),
        ("c", b"MAIL FROM:<alice@example.test> SIZE=99\r\nRCPT TO:<b@x>\r\n"),
        ("c", b"RCPT TO:<c@x>\r\nDATA\r\n"),
        ("s", b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n"),
        ("c", message[:10]), ("c", message[10:] + b".\r\n"),
        ("s", b"250 queued as 42\r\n"),
    )  # fmt: skip
    assert out == [SmtpTransaction(
        helo="client.test", mail_from="alice@example.test", rcpt_count=2,
        message_bytes=len(message), subject_sha256=hashlib.sha256(b"quarterly figures").hexdigest(),
        reply_code=250, complete=True,
    )]  # fmt: skip


def test_smtp_body_terminator_split_across_every_boundary() -> None:
    message = b"Subject: s\r\n\r\nx\r\n"
    for cut in range(len(message) + 3):
        d = SmtpDialogue(tls=True)
        converse(d, ("c", b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"),
                 ("s", b"250 a\r\n250 b\r\n354 c\r\n"))  # fmt: skip
        stream = message + b".\r\n"
        d.feed_client(stream[:cut])
        d.feed_client(stream[cut:])
        (tx,) = d.feed_server(b"250 ok\r\n")
        assert isinstance(tx, SmtpTransaction) and tx.message_bytes == len(message), cut


def test_smtp_data_refused_returns_to_commands() -> None:
    d = SmtpDialogue(tls=True)
    out = converse(d, ("c", b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"),
                   ("c", b"QUIT\r\n"), ("s", b"250 a\r\n550 no such user\r\n554 no recipients\r\n"),
                   ("s", b"221 bye\r\n"))  # fmt: skip
    assert out == [] and d.commands["QUIT"] == 1 and not d.pending


def test_smtp_bdat_chunks_are_counted_not_parsed() -> None:
    d = SmtpDialogue(tls=True)
    out = converse(d, ("c", b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 10\r\nQUIT\r\nxxxx"),
                   ("c", b"BDAT 3 LAST\r\nabc"),
                   ("s", b"250 a\r\n250 b\r\n250 10 octets\r\n250 done\r\n"))  # fmt: skip
    assert len(out) == 1 and isinstance(out[0], SmtpTransaction)
    assert out[0].message_bytes == 13 and out[0].complete


def test_smtp_over_long_line_is_a_clear_error() -> None:
    d = SmtpDialogue(max_line=100)
    with pytest.raises(MailProtocolError, match="longer than 100 bytes"):
        d.feed_server(b"220 " + b"x" * 200)


def test_smtp_reply_without_command_is_refused_except_421() -> None:
    d = SmtpDialogue(tls=True)
    d.feed_server(b"421 shutting down\r\n")
    with pytest.raises(MailProtocolError, match="no command outstanding"):
        d.feed_server(b"250 unsolicited\r\n")


def test_smtp_session_cut_inside_a_message_reports_it_incomplete() -> None:
    d = SmtpDialogue(tls=True)
    converse(d, ("c", b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"),
             ("s", b"250 a\r\n250 b\r\n354 c\r\n"), ("c", b"partial"))  # fmt: skip
    (tx,) = d.finish()
    assert isinstance(tx, SmtpTransaction) and not tx.complete and tx.message_bytes == 7


# -- IMAP -------------------------------------------------------------------------------------
def test_imap_starttls_from_greeting_capabilities() -> None:
    d = ImapDialogue()
    out = converse(d, ("s", b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n"),
                   ("c", b"a1 STARTTLS\r\n"),
                   ("s", b"a1 OK Begin TLS negotiation now\r\n"))  # fmt: skip
    assert out == [Capabilities(True), StartTlsOutcome(True, "a1 OK Begin TLS negotiation now")]


def test_imap_capability_without_starttls_and_a_refused_starttls() -> None:
    d = ImapDialogue()
    out = converse(d, ("s", b"* OK ready\r\n"), ("c", b"a1 CAPABILITY\r\n"),
                   ("s", b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\na1 OK done\r\n"),
                   ("c", b"a2 STARTTLS\r\n"), ("s", b"a2 BAD not supported\r\n"))  # fmt: skip
    assert out == [Capabilities(False), StartTlsOutcome(False, "a2 BAD not supported")]


def test_imap_literals_are_skipped_by_count_and_fetch_sizes_summed() -> None:
    d = ImapDialogue(tls=True)
    body = b"a2 STARTTLS\r\nSubject: x\r\n\r\nhi\r\n"  # a literal that looks like a command
    converse(d, ("c", b'a1 LOGIN "alice" "pw"\r\n'), ("s", b"a1 OK\r\n"),
             ("c", b"a2 FETCH 1 BODY[]\r\n"),
             ("s", b"* 1 FETCH (BODY[] {%d}\r\n" % len(body) + body + b")\r\na2 OK\r\n"),
             ("c", b"a3 APPEND INBOX {5+}\r\nhello\r\n"), ("s", b"a3 OK\r\n"))  # fmt: skip
    info = d.summary()
    assert info.user_sha256 == user_digest(b"alice")
    assert info.messages == 1 and info.message_bytes == len(body)
    assert info.uploaded_messages == 1 and info.uploaded_bytes == 5
    assert info.commands == {"LOGIN": 1, "FETCH": 1, "APPEND": 1}
    assert d.starttls is StartTls.NOT_REQUESTED and not d.tags


def test_imap_authenticate_continuations_are_not_commands() -> None:
    d = ImapDialogue(tls=True)
    converse(d, ("c", b"a1 AUTHENTICATE PLAIN\r\n"), ("s", b"+ \r\n"),
             ("c", b"AGFsaWNlAHB3\r\n"), ("s", b"a1 NO bad\r\n"))  # fmt: skip
    assert d.summary().auth_failures == 1 and d.summary().commands == {"AUTHENTICATE": 1}


def test_imap_tagged_answer_to_an_unknown_tag_is_refused() -> None:
    d = ImapDialogue(tls=True)
    with pytest.raises(MailProtocolError, match="no outstanding command"):
        d.feed_server(b"zz OK forged\r\n")


# -- POP3 -------------------------------------------------------------------------------------
def test_pop3_stls_offered_in_capa_and_accepted() -> None:
    d = Pop3Dialogue()
    out = converse(d, ("s", b"+OK POP3 ready\r\n"), ("c", b"CAPA\r\n"),
                   ("s", b"+OK\r\nUSER\r\nSTLS\r\nPIPELINING\r\n.\r\n"), ("c", b"STLS\r\n"),
                   ("s", b"+OK Begin TLS\r\n"))  # fmt: skip
    assert out == [Capabilities(True), StartTlsOutcome(True, "+OK Begin TLS")]


def test_pop3_retr_sizes_and_pipelined_commands() -> None:
    d = Pop3Dialogue(tls=True)
    msg = b"Subject: a\r\n\r\n..stuffed\r\n"
    converse(d, ("c", b"USER bob\r\nPASS secret\r\nLIST\r\nRETR 1\r\nQUIT\r\n"),
             ("s", b"+OK\r\n+OK\r\n+OK 1 msg\r\n1 %d\r\n.\r\n" % len(msg)),
             ("s", b"+OK\r\n" + msg + b".\r\n+OK bye\r\n"))  # fmt: skip
    info = d.summary()
    assert info.user_sha256 == user_digest(b"bob") and info.messages == 1
    assert info.message_bytes == len(msg)
    assert info.commands == {"USER": 1, "PASS": 1, "LIST": 1, "RETR": 1, "QUIT": 1}
    assert not d.pending


def test_pop3_failed_login_is_counted() -> None:
    d = Pop3Dialogue(tls=True)
    converse(d, ("c", b"USER bob\r\nPASS x\r\n"), ("s", b"+OK\r\n-ERR auth failed\r\n"))
    assert d.summary().auth_failures == 1


# -- properties -------------------------------------------------------------------------------
protocols = st.sampled_from(list(Protocol))
chunks = st.lists(st.tuples(st.sampled_from("cs"), st.binary(max_size=300)), max_size=20)
vocabulary = st.sampled_from([
    b"220 hi\r\n", b"250-STARTTLS\r\n", b"250 ok\r\n", b"354 go\r\n", b"EHLO x\r\n", b"DATA\r\n",
    b".\r\n", b"STARTTLS\r\n", b"a1 STARTTLS\r\n", b"* OK [CAPABILITY STARTTLS]\r\n",
    b"a1 OK\r\n", b"{3}\r\n", b"+OK\r\n", b"-ERR\r\n", b"STLS\r\n", b"RETR 1\r\n", b"BDAT 4\r\n",
    b"MAIL FROM:<a@b>\r\n", b"\r\n", b"x",
])  # fmt: skip
token_chunks = st.lists(
    st.tuples(st.sampled_from("cs"), st.lists(vocabulary, max_size=6).map(b"".join)), max_size=25
)


def _never_crashes(protocol: Protocol, tls: bool, steps: list[tuple[str, bytes]]) -> None:
    d = new_dialogue(protocol, max_line=256, tls=tls)
    try:
        for side, data in steps:
            records = d.feed_client(data) if side == "c" else d.feed_server(data)
            assert all(isinstance(r, Capabilities | StartTlsOutcome | SmtpTransaction)
                       for r in records)  # fmt: skip
        d.finish()
        d.summary()
    except MailProtocolError:
        pass
    # every buffer stays bounded whatever the bytes
    assert len(d.client.buf) <= 256 + 300 * 6 + MAX_WAIT and len(d.pending) <= 1000


MAX_WAIT = 65536


@settings(max_examples=300, deadline=None)
@given(protocols, st.booleans(), chunks)
def test_arbitrary_bytes_either_parse_or_raise_the_one_declared_error(
    protocol: Protocol, tls: bool, steps: list[tuple[str, bytes]]
) -> None:
    _never_crashes(protocol, tls, steps)


@settings(max_examples=300, deadline=None)
@given(protocols, st.booleans(), token_chunks)
def test_protocol_shaped_noise_either_parses_or_raises_the_one_declared_error(
    protocol: Protocol, tls: bool, steps: list[tuple[str, bytes]]
) -> None:
    _never_crashes(protocol, tls, steps)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), max_size=8))
def test_how_a_smtp_session_is_chunked_never_changes_what_it_reports(cuts: list[int]) -> None:
    stream_c = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"
    body = b"Subject: hello\r\n\r\nline\r\n.\r\n"
    whole = SmtpDialogue(tls=True)
    expected = converse(whole, ("c", stream_c), ("s", b"250 a\r\n250 b\r\n250 c\r\n354 d\r\n"),
                        ("c", body), ("s", b"250 queued\r\n"))  # fmt: skip
    d = SmtpDialogue(tls=True)
    got = []
    pos = 0
    data = stream_c
    for cut in cuts:
        got += d.feed_client(data[pos : pos + cut])
        pos += cut
    got += d.feed_client(data[pos:])
    got += d.feed_server(b"250 a\r\n250 b\r\n250 c\r\n354 d\r\n")
    pos = 0
    for cut in cuts:
        got += d.feed_client(body[pos : pos + cut])
        pos += cut
    got += d.feed_client(body[pos:])
    got += d.feed_server(b"250 queued\r\n")
    assert got == expected and len(expected) == 1
