"""Mail dialogues (workers/mail.py) and the STARTTLS clear-text phase (workers/starttls.py).

Input: one mode byte, then chunks as in the ``http1`` target (``direction | length | bytes``).
The mode byte picks the protocol (``mode % 3``: SMTP, IMAP, POP3), whether the server is one
STARTTLS is required from (bit 2), and which phase is fed (bit 3 set: the dialogue parser of
the TLS phase on its own; clear: the clear-text phase's decisions).

Contract: feeds return records / a :class:`~tlsgate.workers.starttls.Step` or raise
``MailProtocolError``; the clear-text phase stops being fed at its first SWITCH or REFUSE (as
the I/O layer does), a SWITCH hands back server bytes, a REFUSE names its reason, and one
connection never reports more than one ``starttls`` event; ``finish()`` never raises; the
parser holds no more than its line limit per direction (memory per connection is bounded).
"""

from __future__ import annotations

from typing import Any

from tests.fuzz.targets.http1 import chunks
from tlsgate.workers.mail import (
    MAX_PENDING,
    MailDialogue,
    MailProtocolError,
    Protocol,
    new_dialogue,
)
from tlsgate.workers.starttls import ClearTextPhase, Next

ERRORS = (MailProtocolError,)
MAX_LEN = 1 << 16
MAX_LINE = 512
PROTOCOLS = (Protocol.SMTP, Protocol.IMAP, Protocol.POP3)


def mode_byte(protocol: Protocol, *, required: bool = False, tls_phase: bool = False) -> bytes:
    """The first byte of an input (used by capture_corpus.py)."""
    return bytes((PROTOCOLS.index(protocol) | (4 if required else 0) | (8 if tls_phase else 0),))


def _bounded(dialogue: MailDialogue) -> None:
    # at most a line's worth (plus the chunk being parsed) held per direction, and a bounded
    # number of commands awaiting their replies
    for side in (dialogue.client, dialogue.server):
        assert len(side.buf) <= MAX_LINE + 0xFFFF, len(side.buf)
    assert len(dialogue.pending) <= MAX_PENDING + 1, len(dialogue.pending)


def _starttls_events(events: list[tuple[str, dict[str, Any]]]) -> int:
    return sum(1 for kind, _fields in events if kind == "starttls")


def _tls_phase(protocol: Protocol, parts: list[tuple[bool, bytes]]) -> None:
    dialogue = new_dialogue(protocol, max_line=MAX_LINE, tls=True)
    try:
        for from_client, payload in parts:
            (dialogue.feed_client if from_client else dialogue.feed_server)(payload)
            _bounded(dialogue)
    finally:
        dialogue.finish()


def _clear_phase(protocol: Protocol, required: bool, parts: list[tuple[bool, bytes]]) -> None:
    phase = ClearTextPhase(new_dialogue(protocol, max_line=MAX_LINE), required=required)
    reported = 0
    try:
        for from_client, payload in parts:
            step = phase.feed_client(payload) if from_client else phase.feed_server(payload)
            reported += _starttls_events(step.events)
            _bounded(phase.dialogue)
            if step.next is Next.SWITCH:
                assert not from_client and step.reply, "a switch carries the server's reply"
                reported += _starttls_events([("starttls", phase.upgraded())])
                break
            if step.next is Next.REFUSE:
                assert step.reason and reported == 1, (step.reason, reported)
                break
    except MailProtocolError:
        assert reported <= 1
        raise
    reported += _starttls_events(phase.finish())
    assert reported == 1, f"{reported} starttls events for one connection"


def one_input(data: bytes) -> None:
    if not data:
        return
    protocol = PROTOCOLS[data[0] % 3]
    parts = chunks(data[1:])
    if data[0] & 8:
        _tls_phase(protocol, parts)
    else:
        _clear_phase(protocol, bool(data[0] & 4), parts)
