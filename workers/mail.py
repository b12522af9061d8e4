"""SMTP, IMAP and POP3 dialogues as sans-I/O parsers: bytes in, records out.

Rules:

- One :class:`MailDialogue` per connection phase (the clear-text phase before STARTTLS and
  the phase inside TLS each get their own). The I/O layer feeds it every byte each side
  sends, in order, with :meth:`~MailDialogue.feed_client` / :meth:`~MailDialogue.feed_server`,
  and gets back a list of records (:class:`SmtpTransaction`, :class:`StartTlsOutcome`,
  :class:`Capabilities`). IMAP and POP3 sessions are summarized by
  :meth:`~MailDialogue.summary` when the connection ends.
- The parsers observe; they never change or hold back a byte. Commands and replies are
  matched in order through a FIFO of outstanding commands, so pipelining (RFC 2920, IMAP
  tags, POP3 PIPELINING) is followed exactly. The FIFO, every command or reply line
  (``max_line``) and every buffer are bounded: a peer that exceeds a bound gets
  :class:`MailProtocolError`, the one error these parsers raise (the h11 fuzz contract:
  any bytes either parse or raise that error).
- Binary sections are skipped by count, never scanned as commands: SMTP message bodies
  (``DATA`` up to the ``.`` line; ``BDAT`` chunks), IMAP literals (``{N}``/``{N+}``, both
  directions), POP3 multi-line answers (``RETR``, ``TOP``, ``LIST``, ``UIDL``, ``CAPA``).
- STARTTLS is the security boundary. A client that sends anything after its STARTTLS
  command before the answer, or a server that sends anything after accepting it, is a
  protocol error (the command-injection class of CVE-2011-0411): those bytes would cross
  from the clear-text phase into the TLS phase.
- Nothing identifying is kept raw unless the caller asks: SMTP envelope addresses are
  recorded (they are routing metadata, like a URL host), the Subject is recorded only as
  a SHA-256, IMAP/POP3 user names only as a SHA-256 prefix, passwords never.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from tlsgate.errors import RemoteProtocolError

#: Longest command or reply line accepted (RFC 5321 allows 512/1000; real servers send more).
DEFAULT_MAX_LINE: Final = 8192
#: Commands a client may have outstanding at once (pipelining).
MAX_PENDING: Final = 1000
#: Message header bytes kept to find the Subject.
MAX_HEADER_BYTES: Final = 65536
#: Client bytes buffered after DATA until the server answers it (compliant clients send none).
MAX_DATA_WAIT_BYTES: Final = 65536
#: Distinct command names counted per session; others are counted under ``OTHER``.
MAX_COMMAND_NAMES: Final = 32
#: Literal or chunk sizes above this are not plausible (and guard int parsing).
MAX_COUNTED_SIZE: Final = 1 << 40

_REPLY = re.compile(rb"^([2-5][0-9][0-9])([ -]|$)")
_LITERAL = re.compile(rb"\{([0-9]{1,13})\+?\}$")
_ATOM = re.compile(rb"^[A-Za-z][A-Za-z0-9-]{0,31}$")
#: ``* CAPABILITY a b`` or a status response with a ``[CAPABILITY a b]`` code (upper-cased).
_CAPABILITY = re.compile(
    rb"^(?:\* CAPABILITY ([^\r\n]*)|\S+ (?:OK|PREAUTH) \[CAPABILITY ([^]]*)\])"
)


class MailProtocolError(RemoteProtocolError):
    """A mail client or server sent bytes that break its protocol (or a bound)."""


class Protocol(StrEnum):
    """The mail protocols with a STARTTLS phase."""

    SMTP = "smtp"
    IMAP = "imap"
    POP3 = "pop3"


class StartTls(StrEnum):
    """Where the STARTTLS negotiation stands."""

    NOT_REQUESTED = "not-requested"
    REQUESTED = "requested"
    ACCEPTED = "accepted"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The server listed its capabilities (EHLO reply, IMAP CAPABILITY, POP3 CAPA)."""

    starttls: bool


@dataclass(frozen=True, slots=True)
class StartTlsOutcome:
    """The server answered the client's STARTTLS/STLS."""

    accepted: bool
    reply: str


@dataclass(frozen=True, slots=True)
class SmtpTransaction:
    """One SMTP mail transaction the server answered (or that the session ended inside)."""

    helo: str | None
    mail_from: str | None
    rcpt_count: int
    message_bytes: int
    subject_sha256: str | None
    reply_code: int | None
    complete: bool


@dataclass(slots=True)
class SessionSummary:
    """What an IMAP or POP3 session did (one event at the end of a phase)."""

    user_sha256: str | None = None
    commands: dict[str, int] = field(default_factory=dict)
    messages: int = 0
    message_bytes: int = 0
    uploaded_messages: int = 0
    uploaded_bytes: int = 0
    auth_failures: int = 0


Record = Capabilities | StartTlsOutcome | SmtpTransaction


def user_digest(user: bytes) -> str:
    """A stable, non-reversible-by-eye tag for a login name (first 16 hex of SHA-256)."""
    return hashlib.sha256(user).hexdigest()[:16]


def _text(line: bytes, limit: int = 200) -> str:
    return line[:limit].decode("utf-8", "replace")


class _Lines:
    """A bounded buffer that yields CRLF (or bare LF) terminated lines."""

    __slots__ = ("buf", "max_line", "side")

    def __init__(self, side: str, max_line: int) -> None:
        self.buf = bytearray()
        self.side = side
        self.max_line = max_line

    def next_line(self) -> bytes | None:
        end = self.buf.find(b"\n")
        if end < 0:
            if len(self.buf) > self.max_line:
                raise MailProtocolError(
                    f"{self.side} line longer than {self.max_line} bytes without an end; "
                    "raise the mail max_line setting if this server is legitimate"
                )
            return None
        if end > self.max_line:
            raise MailProtocolError(f"{self.side} line of {end} bytes exceeds {self.max_line}")
        line = bytes(self.buf[:end])
        del self.buf[: end + 1]
        return line[:-1] if line.endswith(b"\r") else line

    def take(self, n: int) -> int:
        """Drop up to ``n`` buffered bytes (a binary section); returns how many."""
        k = min(n, len(self.buf))
        del self.buf[:k]
        return k


class _DotBody:
    """Counts a dot-terminated body (SMTP DATA, POP3 multi-line) without holding it."""

    __slots__ = ("header", "header_done", "size", "tail")

    def __init__(self) -> None:
        self.tail = b"\r\n"  # the command line's CRLF: an empty body is just ".\r\n"
        self.size = 0
        self.header = bytearray()
        self.header_done = False

    def feed(self, buf: bytearray) -> bool:
        """Consume from ``buf`` up to the terminator; True when the body ended.

        The terminator is searched in place (no copy of the chunk); only the few bytes
        around the previous chunk's end are joined, for a terminator split across reads."""
        edge = self.tail + bytes(buf[:4])
        end = edge.find(b"\r\n.\r\n")
        if end >= 0:
            used = end + 5 - len(self.tail)
        else:
            found = buf.find(b"\r\n.\r\n")
            if found < 0:
                self._count(buf, len(buf))
                self.tail = (self.tail + bytes(buf[-4:]))[-4:]
                del buf[:]
                return False
            used = found + 5
        self._count(buf, used)
        del buf[:used]
        self.size -= 3  # the ".\r\n" line is not part of the message
        return True

    def _count(self, buf: bytearray, n: int) -> None:
        self.size += n
        if not self.header_done:
            room = MAX_HEADER_BYTES - len(self.header)
            self.header += buf[: min(n, room)]
            if b"\r\n\r\n" in self.header or len(self.header) >= MAX_HEADER_BYTES:
                self.header_done = True

    def subject_sha256(self) -> str | None:
        head = bytes(self.header).split(b"\r\n\r\n", 1)[0]
        unfolded = re.sub(rb"\r\n[ \t]+", b" ", head)
        for line in unfolded.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if sep and name.strip().lower() == b"subject":
                return hashlib.sha256(value.strip()).hexdigest()
        return None


class MailDialogue:
    """Base: the parts every protocol shares (outstanding commands, STARTTLS, counts)."""

    protocol: Protocol

    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE, tls: bool = False) -> None:
        self.tls = tls
        self.max_line = max_line
        self.client = _Lines("client", max_line)
        self.server = _Lines("server", max_line)
        self.pending: deque[str] = deque()
        self.starttls = StartTls.NOT_REQUESTED
        #: None until the server listed capabilities; then whether STARTTLS was among them.
        self.starttls_offered: bool | None = None
        self.commands: Counter[str] = Counter()
        self.client_bytes = 0
        self.server_bytes = 0

    # -- the interface ---------------------------------------------------------------------
    def feed_client(self, data: bytes) -> list[Record]:
        self.client_bytes += len(data)
        if self.starttls is StartTls.REQUESTED or self.starttls is StartTls.ACCEPTED:
            if data:
                raise MailProtocolError(
                    f"client sent {len(data)} bytes after STARTTLS before the TLS handshake "
                    "(command injection across the TLS boundary); connection refused"
                )
        self.client.buf += data
        out: list[Record] = []
        self._parse_client(out)
        return out

    def feed_server(self, data: bytes) -> list[Record]:
        self.server_bytes += len(data)
        if self.starttls is StartTls.ACCEPTED and data:
            raise MailProtocolError(
                f"server sent {len(data)} bytes after accepting STARTTLS (response injection "
                "across the TLS boundary); connection refused"
            )
        self.server.buf += data
        out: list[Record] = []
        self._parse_server(out)
        if self.starttls is StartTls.ACCEPTED and self.server.buf:
            raise MailProtocolError(
                f"server sent {len(self.server.buf)} bytes after accepting STARTTLS (response "
                "injection across the TLS boundary); connection refused"
            )
        return out

    def finish(self) -> list[Record]:
        """The connection ended: records for work cut short."""
        return []

    def summary(self) -> SessionSummary | None:
        """IMAP/POP3: what the session did; SMTP reports per transaction instead."""
        return None

    # -- shared helpers --------------------------------------------------------------------
    def _push(self, command: str) -> None:
        if len(self.pending) >= MAX_PENDING:
            raise MailProtocolError(
                f"more than {MAX_PENDING} commands outstanding without a reply; "
                "the client pipelines beyond any sane server's limit"
            )
        self.pending.append(command)

    def _count(self, name: str) -> None:
        if name not in self.commands and len(self.commands) >= MAX_COMMAND_NAMES:
            name = "OTHER"
        self.commands[name] += 1

    def _starttls_command(self) -> None:
        if self.tls:
            # inside TLS a second STARTTLS is meaningless; the server will refuse it
            return
        self.starttls = StartTls.REQUESTED

    def _starttls_answer(self, accepted: bool, line: bytes, out: list[Record]) -> None:
        if self.tls:
            if accepted:
                raise MailProtocolError("server accepted STARTTLS inside TLS; refusing")
            return
        self.starttls = StartTls.ACCEPTED if accepted else StartTls.REFUSED
        out.append(StartTlsOutcome(accepted, _text(line)))

    def _parse_client(self, out: list[Record]) -> None:
        raise NotImplementedError

    def _parse_server(self, out: list[Record]) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------- SMTP
class _SmtpClient(StrEnum):
    COMMAND = "command"
    DATA_WAIT = "data-wait"  # DATA sent, the server's 354 (or refusal) not yet seen
    BODY = "body"
    BDAT = "bdat"


class SmtpDialogue(MailDialogue):
    """RFC 5321 with PIPELINING (RFC 2920), CHUNKING (RFC 3030) and STARTTLS (RFC 3207)."""

    protocol = Protocol.SMTP

    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE, tls: bool = False) -> None:
        super().__init__(max_line=max_line, tls=tls)
        # the greeting is the answer to the connection itself (not sent again inside TLS)
        if not tls:
            self.pending.append("GREETING")
        self.state = _SmtpClient.COMMAND
        self.helo: str | None = None
        self._reset_transaction()
        self._bdat_left = 0
        self._bdat_last = False
        self._ehlo_has_starttls = False
        self._reply_lines = 0

    def _reset_transaction(self) -> None:
        self.mail_from: str | None = None
        self.rcpt_count = 0
        self.message_bytes = 0
        self.subject: str | None = None
        self.body: _DotBody | None = None
        self.in_transaction = False

    def _transaction(self, code: int | None, complete: bool) -> SmtpTransaction:
        return SmtpTransaction(self.helo, self.mail_from, self.rcpt_count, self.message_bytes,
                               self.subject, code, complete)  # fmt: skip

    def finish(self) -> list[Record]:
        if self.state is _SmtpClient.BODY and self.body is not None:
            self.message_bytes = self.body.size
        if self.in_transaction and (self.message_bytes or self.body is not None):
            return [self._transaction(None, False)]
        return []

    def _parse_client(self, out: list[Record]) -> None:
        buf = self.client.buf
        while buf:
            if self.state is _SmtpClient.DATA_WAIT:
                if len(buf) > MAX_DATA_WAIT_BYTES:
                    raise MailProtocolError(
                        "client sent more than 64 KiB after DATA before the server's 354"
                    )
                return
            if self.state is _SmtpClient.BODY:
                assert self.body is not None
                if not self.body.feed(buf):
                    return
                self.message_bytes = self.body.size
                self.subject = self.body.subject_sha256()
                self.state = _SmtpClient.COMMAND
                self._push("DATA-END")
                continue
            if self.state is _SmtpClient.BDAT:
                taken = self.client.take(self._bdat_left)
                self._bdat_left -= taken
                self.message_bytes += taken
                if self._bdat_left:
                    return
                self.state = _SmtpClient.COMMAND
                continue
            line = self.client.next_line()
            if line is None:
                return
            self._command(line)
            if self.starttls is StartTls.REQUESTED and buf:
                raise MailProtocolError(
                    f"client pipelined {len(buf)} bytes after STARTTLS (command injection "
                    "across the TLS boundary); connection refused"
                )

    def _command(self, line: bytes) -> None:
        verb, _, arg = line.partition(b" ")
        # a malformed command is the server's to refuse (500); it is counted, not fatal
        name = verb.upper().decode("ascii") if _ATOM.match(verb) else "INVALID"
        self._count(name)
        if name in ("EHLO", "HELO", "LHLO"):
            self.helo = _text(arg.strip(), 255)
            self._reset_transaction()
        elif name == "MAIL":
            self._reset_transaction()
            self.in_transaction = True
            self.mail_from = _address(arg, b"FROM:")
        elif name == "RCPT":
            self.rcpt_count += 1
        elif name == "RSET":
            self._reset_transaction()
        elif name == "DATA":
            self.state = _SmtpClient.DATA_WAIT
        elif name == "BDAT":
            parts = arg.split()
            if not parts or not parts[0].isdigit() or len(parts[0]) > 13:
                raise MailProtocolError(f"BDAT without a valid chunk size: {_text(line)!r}")
            self._bdat_left = int(parts[0])
            self._bdat_last = len(parts) > 1 and parts[1].upper() == b"LAST"
            self.in_transaction = True
            self._push("BDAT-LAST" if self._bdat_last else "BDAT")
            self.state = _SmtpClient.BDAT
            return
        elif name == "STARTTLS":
            self._starttls_command()
        self._push(name)

    def _parse_server(self, out: list[Record]) -> None:
        while True:
            line = self.server.next_line()
            if line is None:
                return
            m = _REPLY.match(line)
            if m is None:
                raise MailProtocolError(
                    f"server sent a line that is not an SMTP reply: {_text(line)!r}"
                )
            self._reply_lines += 1
            if self._reply_lines > 1000:
                raise MailProtocolError("server reply of more than 1000 lines")
            if self.pending and self.pending[0] == "EHLO":
                text = line[4:].strip().upper()
                if text == b"STARTTLS" or text.startswith(b"STARTTLS "):
                    self._ehlo_has_starttls = True
            if m.group(2) == b"-":
                continue
            self._reply_lines = 0
            self._reply(int(m.group(1)), line, out)
            if self.starttls is StartTls.ACCEPTED:
                return  # what follows is TLS (or an injection feed_server refuses)

    def _reply(self, code: int, line: bytes, out: list[Record]) -> None:
        if not self.pending:
            if code == 421:  # the server may close the session at any time with 421
                return
            raise MailProtocolError(f"server reply with no command outstanding: {_text(line)!r}")
        command = self.pending.popleft()
        if command == "EHLO":
            if code // 100 == 2 and not self.tls:
                self.starttls_offered = self._ehlo_has_starttls
                out.append(Capabilities(self._ehlo_has_starttls))
            self._ehlo_has_starttls = False
        elif command == "DATA" and self.state is _SmtpClient.DATA_WAIT:
            if code == 354:
                self.state = _SmtpClient.BODY
                self.body = _DotBody()
            else:
                self.state = _SmtpClient.COMMAND
            self._parse_client(out)
        elif command in ("DATA-END", "BDAT-LAST") or (command == "BDAT" and code // 100 != 2):
            out.append(self._transaction(code, code // 100 == 2))
            self._reset_transaction()
        elif command == "STARTTLS":
            self._starttls_answer(code == 220, line, out)


def _address(arg: bytes, prefix: bytes) -> str | None:
    if not arg.upper().startswith(prefix):
        return None
    rest = arg[len(prefix) :].strip()
    if rest.startswith(b"<"):
        end = rest.find(b">")
        rest = rest[1:end] if end > 0 else rest[1:]
    else:
        rest = rest.split(b" ", 1)[0]
    return _text(rest, 320)


# ---------------------------------------------------------------------------------- IMAP
class ImapDialogue(MailDialogue):
    """RFC 9051/3501 with literals (``{N}``, LITERAL+ ``{N+}``) and STARTTLS."""

    protocol = Protocol.IMAP

    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE, tls: bool = False) -> None:
        super().__init__(max_line=max_line, tls=tls)
        self.info = SessionSummary()
        self.tags: dict[bytes, str] = {}
        self._client_literal = 0
        self._server_literal = 0
        self._client_line: list[bytes] = []
        self._server_line: list[bytes] = []
        self._continuation: bytes | None = None  # tag of AUTHENTICATE/IDLE awaiting lines
        self._server_fetch_literals = 0
        self._greeted = tls

    def summary(self) -> SessionSummary:
        self.info.commands = dict(self.commands)
        return self.info

    def _parse_client(self, out: list[Record]) -> None:
        buf = self.client.buf
        while buf:
            if self._client_literal:
                self._client_literal -= self.client.take(self._client_literal)
                continue
            line = self.client.next_line()
            if line is None:
                return
            m = _LITERAL.search(line)
            self._client_line.append(line)
            if sum(len(p) for p in self._client_line) > self.max_line * 4:
                raise MailProtocolError("client IMAP command with too many literals")
            if m is not None:
                size = int(m.group(1))
                self._client_literal = size
                if self._client_line[0].upper().split(b" ", 2)[1:2] == [b"APPEND"]:
                    self.info.uploaded_bytes += size
                continue
            parts = self._client_line
            self._client_line = []
            self._command(parts)
            if self.starttls is StartTls.REQUESTED and buf:
                raise MailProtocolError(
                    f"client pipelined {len(buf)} bytes after STARTTLS (command injection "
                    "across the TLS boundary); connection refused"
                )

    def _command(self, parts: list[bytes]) -> None:
        first = parts[0]
        if self._continuation is not None:
            return  # an AUTHENTICATE response or IDLE's DONE: not a command
        tag, _, rest = first.partition(b" ")
        verb, _, arg = rest.partition(b" ")
        if not tag or not _ATOM.match(verb):
            # the server answers an untagged BAD; no tagged answer will follow
            self._count("INVALID")
            return
        name = verb.upper().decode("ascii")
        if name == "UID":
            sub = arg.split(b" ", 1)[0].upper()
            if _ATOM.match(sub):
                name = "UID " + sub.decode("ascii")
        self._count(name)
        if len(self.tags) >= MAX_PENDING:
            raise MailProtocolError(f"more than {MAX_PENDING} IMAP commands outstanding")
        self.tags[tag] = name
        if name == "LOGIN":
            user = _imap_first_arg(arg, parts)
            if user is not None:
                self.info.user_sha256 = user_digest(user)
        elif name in ("AUTHENTICATE", "IDLE"):
            self._continuation = tag
        elif name == "APPEND":
            self.info.uploaded_messages += 1
        elif name == "STARTTLS":
            self._starttls_command()

    def _parse_server(self, out: list[Record]) -> None:
        buf = self.server.buf
        while buf:
            if self._server_literal:
                self._server_literal -= self.server.take(self._server_literal)
                continue
            line = self.server.next_line()
            if line is None:
                return
            m = _LITERAL.search(line)
            self._server_line.append(line)
            if len(self._server_line) > 10000:
                raise MailProtocolError("server IMAP response with more than 10000 literals")
            if m is not None:
                size = int(m.group(1))
                self._server_literal = size
                if b" FETCH " in self._server_line[0].upper():
                    self._server_fetch_literals += 1
                    self.info.message_bytes += size
                continue
            parts = self._server_line
            self._server_line = []
            self._response(parts, out)
            if self.starttls is StartTls.ACCEPTED:
                return

    def _response(self, parts: list[bytes], out: list[Record]) -> None:
        first = parts[0]
        if self._server_fetch_literals:
            self.info.messages += 1
            self._server_fetch_literals = 0
        upper = first.upper()
        caps = _CAPABILITY.match(upper)
        if caps is not None:
            offered = b"STARTTLS" in (caps.group(1) or caps.group(2) or b"").split()
            if not self.tls:
                self.starttls_offered = offered
                out.append(Capabilities(offered))
        if first.startswith(b"* "):
            if not self._greeted:
                self._greeted = True
                if not upper.startswith((b"* OK", b"* PREAUTH")):
                    return  # * BYE: the server refuses the session
            return
        if first.startswith(b"+"):
            return  # continuation request (literal or SASL)
        tag, _, rest = first.partition(b" ")
        status = rest.split(b" ", 1)[0].upper()
        name = self.tags.pop(tag, None)
        if name is None or status not in (b"OK", b"NO", b"BAD"):
            raise MailProtocolError(
                f"server IMAP response for no outstanding command: {_text(first)!r}"
            )
        if self._continuation == tag:
            self._continuation = None
        if name in ("LOGIN", "AUTHENTICATE") and status != b"OK":
            self.info.auth_failures += 1
        if name == "STARTTLS":
            self._starttls_answer(status == b"OK", first, out)


def _imap_first_arg(arg: bytes, parts: list[bytes]) -> bytes | None:
    """LOGIN's user name: an atom, a quoted string or a literal (then in ``parts[1]``)."""
    if arg.startswith(b'"'):
        m = re.match(rb'"((?:[^"\\]|\\.)*)"', arg)
        return m.group(1) if m else None
    if arg.startswith(b"{"):
        return None  # the literal's bytes were skipped by count; the name is not kept
    return arg.split(b" ", 1)[0] or None


# ---------------------------------------------------------------------------------- POP3
_POP3_MULTILINE_ALWAYS: Final = frozenset({"CAPA", "RETR", "TOP"})
_POP3_MULTILINE_WITHOUT_ARG: Final = frozenset({"LIST", "UIDL"})


class Pop3Dialogue(MailDialogue):
    """RFC 1939 with CAPA/STLS (RFC 2595, 2449) and pipelining."""

    protocol = Protocol.POP3

    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE, tls: bool = False) -> None:
        super().__init__(max_line=max_line, tls=tls)
        self.info = SessionSummary()
        if not tls:
            self.pending.append("GREETING")
        self._multiline: tuple[str, _DotBody] | None = None
        self._sasl = False
        self._capa_starttls = False
        self._multi: dict[int, bool] = {}

    def summary(self) -> SessionSummary:
        self.info.commands = dict(self.commands)
        return self.info

    def _parse_client(self, out: list[Record]) -> None:
        while self.client.buf:
            line = self.client.next_line()
            if line is None:
                return
            if self._sasl:
                continue  # a SASL response line, not a command
            verb, _, arg = line.partition(b" ")
            # a malformed command is the server's to refuse (-ERR); it is counted, not fatal
            name = verb.upper().decode("ascii") if _ATOM.match(verb) else "INVALID"
            self._count(name)
            if name == "USER" or name == "APOP":
                self.info.user_sha256 = user_digest(arg.split(b" ", 1)[0])
            elif name == "AUTH" and arg.strip():
                self._sasl = True
            elif name == "STLS":
                self._starttls_command()
            multi = name in _POP3_MULTILINE_ALWAYS or (
                name in _POP3_MULTILINE_WITHOUT_ARG and not arg.strip()
            ) or (name == "AUTH" and not arg.strip())  # fmt: skip
            self._push(name + ("+" if multi else ""))
            if self.starttls is StartTls.REQUESTED and self.client.buf:
                raise MailProtocolError(
                    f"client pipelined {len(self.client.buf)} bytes after STLS (command "
                    "injection across the TLS boundary); connection refused"
                )

    def _parse_server(self, out: list[Record]) -> None:
        buf = self.server.buf
        while buf:
            if self._multiline is not None:
                name, body = self._multiline
                if name == "CAPA":
                    line = self.server.next_line()
                    if line is None:
                        return
                    if line == b".":
                        self._multiline = None
                        if not self.tls:
                            self.starttls_offered = self._capa_starttls
                            out.append(Capabilities(self._capa_starttls))
                    elif line.upper().split(b" ", 1)[0] == b"STLS":
                        self._capa_starttls = True
                    continue
                if not body.feed(buf):
                    return
                self._multiline = None
                if name in ("RETR", "TOP"):
                    self.info.messages += 1
                    self.info.message_bytes += body.size
                continue
            line = self.server.next_line()
            if line is None:
                return
            self._response(line, out)
            if self.starttls is StartTls.ACCEPTED:
                return

    def _response(self, line: bytes, out: list[Record]) -> None:
        if self._sasl and line.startswith(b"+ "):
            return  # SASL challenge
        ok = line.startswith(b"+OK")
        if not ok and not line.startswith(b"-ERR"):
            raise MailProtocolError(
                f"server sent a line that is not a POP3 response: {_text(line)!r}"
            )
        if not self.pending:
            raise MailProtocolError(f"server response with no command outstanding: {_text(line)!r}")
        command = self.pending.popleft()
        multi = command.endswith("+")
        name = command.rstrip("+")
        if name == "AUTH":
            self._sasl = False
        if name in ("PASS", "APOP", "AUTH") and not ok:
            self.info.auth_failures += 1
        if ok and multi:
            self._multiline = (name, _DotBody())
            self._capa_starttls = False
        if name == "STLS":
            self._starttls_answer(ok, line, out)


def new_dialogue(protocol: Protocol, *, max_line: int = DEFAULT_MAX_LINE,
                 tls: bool = False) -> MailDialogue:  # fmt: skip
    """The parser for ``protocol``, for the clear-text phase or (``tls``) the TLS phase."""
    cls: type[MailDialogue] = {Protocol.SMTP: SmtpDialogue, Protocol.IMAP: ImapDialogue,
                               Protocol.POP3: Pop3Dialogue}[protocol]  # fmt: skip
    return cls(max_line=max_line, tls=tls)
