"""Real mail servers and clients for the STARTTLS tests, runnable inside a namespace:

    python -m tests.mailpeers smtp-server --host H --port P --cert C --key K [--starttls MODE]
    python -m tests.mailpeers imap-server|pop3-server --host H --port P --cert C --key K
    python -m tests.mailpeers echo-server --host H --port P --cert C --key K --alpn NAME
    python -m tests.mailpeers smtp-client|imap-client|pop3-client|echo-client|pinned-client \\
        --ip IP --port P --name NAME --ca CA [--no-sni]

Servers print ``listening HOST PORT`` once ready and run until SIGTERM. Clients print one
JSON object (``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``) and exit 0.

- SMTP: aiosmtpd (a real, widely used SMTP server) with STARTTLS from its own certificate;
  ``--starttls none`` offers no STARTTLS, ``--starttls refuse`` offers it and answers 454
  (what a stripping middlebox or a broken server does), ``--starttls implicit`` is SMTPS.
- IMAP and POP3: small servers written here on asyncio streams. Dovecot would be the real
  thing, but it needs system users, a mail store and a root-owned config under /etc, and
  its processes would be started by name in every namespace; these servers speak enough
  of RFC 9051 / RFC 1939 (greeting with capabilities, CAPABILITY/CAPA, STARTTLS/STLS with
  asyncio's real TLS upgrade, LOGIN/USER+PASS, SELECT, FETCH with a literal, LIST, RETR,
  LOGOUT/QUIT) for the standard library's imaplib and poplib clients, which are the
  clients under test.
- Clients are the standard library's smtplib, imaplib and poplib: they connect to the
  server's IP address (the gateway intercepts transparently) and send ``--name`` as SNI
  unless ``--no-sni``.
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import json
import poplib
import signal
import smtplib
import socket
import ssl
import sys
import threading
from email.message import EmailMessage
from typing import Any

MESSAGE = b"From: alice@example.test\r\nSubject: quarterly figures\r\n\r\nhello over TLS\r\n"


def _server_context(cert: str, key: str, alpn: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if alpn:
        ctx.set_alpn_protocols([alpn])
    return ctx


def _ready(host: str, port: int) -> None:
    print(f"listening {host} {port}", flush=True)


def _wait_for_term() -> None:
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()


# -- servers ----------------------------------------------------------------------------------
def smtp_server(args: argparse.Namespace) -> None:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's hook name)
            return "250 2.0.0 queued"

    class Refusing(SMTP):
        async def smtp_STARTTLS(self, arg: str) -> None:  # noqa: N802 (aiosmtpd's verb name)
            await self.push("454 4.7.0 TLS not available due to temporary reason")

    ctx = _server_context(args.cert, args.key)
    mode = args.starttls

    class Ctl(Controller):
        def factory(self) -> SMTP:
            cls = Refusing if mode == "refuse" else SMTP
            tls = ctx if mode in ("offer", "refuse") else None
            return cls(self.handler, tls_context=tls, require_starttls=False,
                       hostname="mail.test")  # fmt: skip

    kw: dict[str, Any] = {"ssl_context": ctx} if mode == "implicit" else {}
    controller = Ctl(Handler(), hostname=args.host, port=args.port, ready_timeout=10, **kw)
    controller.start()
    _ready(args.host, args.port)
    try:
        _wait_for_term()
    finally:
        controller.stop()


class LineServer:
    """The shared part of the IMAP and POP3 servers: a line loop with a TLS upgrade."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx

    async def serve(self, host: str, port: int) -> None:
        server = await asyncio.start_server(self.session, host, port)
        _ready(host, port)
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        async with server:
            await stop

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.dialogue(reader, writer)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass  # the client went away (or refused TLS): the test looks at the client side
        finally:
            writer.close()

    async def dialogue(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class ImapServer(LineServer):
    async def dialogue(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = False

        def caps() -> bytes:
            return b"IMAP4rev1 AUTH=PLAIN" + (b"" if tls else b" STARTTLS LOGINDISABLED")

        writer.write(b"* OK [CAPABILITY " + caps() + b"] test IMAP ready\r\n")
        for _ in range(100):
            line = await reader.readline()
            if not line:
                return
            tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
            cmd = rest.split(b" ", 1)[0].upper()
            if cmd == b"CAPABILITY":
                writer.write(b"* CAPABILITY " + caps() + b"\r\n" + tag + b" OK done\r\n")
            elif cmd == b"STARTTLS" and not tls:
                writer.write(tag + b" OK Begin TLS negotiation now\r\n")
                await writer.drain()
                await writer.start_tls(self.ctx)
                tls = True
            elif cmd == b"LOGIN" and tls:
                writer.write(tag + b" OK [CAPABILITY IMAP4rev1] logged in\r\n")
            elif cmd == b"SELECT":
                writer.write(b"* 1 EXISTS\r\n" + tag + b" OK [READ-WRITE] selected\r\n")
            elif cmd == b"FETCH":
                writer.write(b"* 1 FETCH (RFC822 {%d}\r\n" % len(MESSAGE) + MESSAGE + b")\r\n")
                writer.write(tag + b" OK fetched\r\n")
            elif cmd == b"LOGOUT":
                writer.write(b"* BYE see you\r\n" + tag + b" OK bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(tag + b" BAD unsupported here\r\n")
            await writer.drain()


class Pop3Server(LineServer):
    async def dialogue(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = False
        writer.write(b"+OK test POP3 ready\r\n")
        for _ in range(100):
            line = await reader.readline()
            if not line:
                return
            cmd = line.rstrip(b"\r\n").split(b" ", 1)[0].upper()
            if cmd == b"CAPA":
                writer.write(b"+OK\r\nUSER\r\n" + (b"" if tls else b"STLS\r\n") + b".\r\n")
            elif cmd == b"STLS" and not tls:
                writer.write(b"+OK Begin TLS negotiation\r\n")
                await writer.drain()
                await writer.start_tls(self.ctx)
                tls = True
            elif cmd in (b"USER", b"PASS", b"NOOP"):
                writer.write(b"+OK\r\n")
            elif cmd == b"STAT":
                writer.write(b"+OK 1 %d\r\n" % len(MESSAGE))
            elif cmd == b"LIST":
                writer.write(b"+OK 1 messages\r\n1 %d\r\n.\r\n" % len(MESSAGE))
            elif cmd == b"RETR":
                writer.write(b"+OK %d octets\r\n" % len(MESSAGE) + MESSAGE + b".\r\n")
            elif cmd == b"QUIT":
                writer.write(b"+OK bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"-ERR unsupported here\r\n")
            await writer.drain()


def echo_server(args: argparse.Namespace) -> None:
    """A TLS server speaking a non-HTTP protocol: it echoes every line back, upper-cased."""
    ctx = _server_context(args.cert, args.key, args.alpn)

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(1000):
                line = await reader.readline()
                if not line:
                    break
                writer.write(line.upper())
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(session, args.host, args.port, ssl=ctx)
        _ready(args.host, args.port)
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        async with server:
            await stop

    asyncio.run(main())


# -- clients ----------------------------------------------------------------------------------
def _client_context(args: argparse.Namespace) -> ssl.SSLContext:
    # with --no-sni the server_hostname is the IP address: Python sends no SNI and checks
    # the certificate's IP SANs instead
    return ssl.create_default_context(cafile=args.ca)


def _sni(args: argparse.Namespace) -> str:
    return args.ip if args.no_sni else args.name


def _connect(args: argparse.Namespace, timeout: float) -> socket.socket:
    return socket.create_connection((args.ip, args.port), timeout=timeout)


def smtp_client(args: argparse.Namespace) -> dict[str, Any]:
    class Client(smtplib.SMTP):
        def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
            return _connect(args, timeout)

    with Client(_sni(args), args.port, timeout=15) as smtp:
        code, _banner = smtp.ehlo("client.test")
        offered = smtp.has_extn("starttls")
        result: dict[str, Any] = {"offered": offered, "ehlo": code}
        if args.starttls:
            code, _reply = smtp.starttls(context=_client_context(args))
            result["starttls"] = code
            cipher = getattr(smtp.sock, "cipher", None)
            result["cipher"] = cipher()[0] if cipher is not None else None
            smtp.ehlo("client.test")
        msg = EmailMessage()
        msg["From"] = "alice@example.test"
        msg["To"] = "bob@example.test, carol@example.test"
        msg["Subject"] = "quarterly figures"
        msg.set_content("hello over TLS\n")
        refused = smtp.send_message(msg)
        result["refused"] = refused
    return result


def smtps_client(args: argparse.Namespace) -> dict[str, Any]:
    class Client(smtplib.SMTP_SSL):
        def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
            sock = _connect(args, timeout)
            return self.context.wrap_socket(sock, server_hostname=_sni(args))

    with Client(_sni(args), args.port, timeout=15, context=_client_context(args)) as smtp:
        smtp.ehlo("client.test")
        smtp.sendmail("alice@example.test", ["bob@example.test"], MESSAGE)
    return {}


def imap_client(args: argparse.Namespace) -> dict[str, Any]:
    class Client(imaplib.IMAP4):
        def _create_socket(self, timeout: float | None) -> socket.socket:
            return _connect(args, timeout or 15)

    imap = Client(_sni(args), args.port, timeout=15)
    imap.starttls(ssl_context=_client_context(args))
    imap.login("alice", "secret")
    imap.select("INBOX")
    _typ, data = imap.fetch("1", "(RFC822)")
    imap.logout()
    body = data[0][1] if isinstance(data[0], tuple) else b""
    return {"fetched": len(body), "same": body == MESSAGE}


def pop3_client(args: argparse.Namespace) -> dict[str, Any]:
    class Client(poplib.POP3):
        def _create_socket(self, timeout: float) -> socket.socket:
            return _connect(args, timeout)

    pop = Client(_sni(args), args.port, timeout=15)
    pop.stls(context=_client_context(args))
    pop.user("bob")
    pop.pass_("secret")
    _resp, lines, octets = pop.retr(1)
    pop.quit()
    body = b"\r\n".join(lines) + b"\r\n"
    return {"retrieved": octets, "same": body == MESSAGE}


def echo_client(args: argparse.Namespace) -> dict[str, Any]:
    ctx = _client_context(args)
    ctx.set_alpn_protocols([args.alpn])
    with _connect(args, 15) as raw, ctx.wrap_socket(raw, server_hostname=_sni(args)) as tls:
        tls.sendall(b"ping one\r\nping two\r\n")
        got = b""
        while got.count(b"\n") < 2:
            chunk = tls.recv(4096)
            if not chunk:
                break
            got += chunk
        return {"echo": got.decode(), "alpn": tls.selected_alpn_protocol()}


def pinned_client(args: argparse.Namespace) -> dict[str, Any]:
    """An HTTPS client that trusts only the origin's CA (``--ca``): what a pinned app does."""
    ctx = ssl.create_default_context(cafile=args.ca)
    with _connect(args, 15) as raw, ctx.wrap_socket(raw, server_hostname=args.name) as tls:
        tls.sendall(b"GET /pinned HTTP/1.1\r\nHost: " + args.name.encode()
                    + b"\r\nConnection: close\r\n\r\n")  # fmt: skip
        got = b""
        while chunk := tls.recv(65536):
            got += chunk
        return {"response": got.decode(errors="replace").split("\r\n")[0],
                "body": got.split(b"\r\n\r\n", 1)[-1].decode(errors="replace")}  # fmt: skip


def raw_client(args: argparse.Namespace) -> dict[str, Any]:
    """Read the greeting, send ``--send`` (hex), wait ``--wait`` seconds reading what comes
    back; reports it and whether the gateway closed the connection."""
    import time

    with _connect(args, 15) as sock:
        got = sock.recv(4096)
        sock.sendall(bytes.fromhex(args.send))
        deadline = time.monotonic() + args.wait
        closed = False
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            got += chunk
        return {"received": got.decode(errors="replace"), "closed": closed}


CLIENTS = {"raw-client": raw_client, "smtp-client": smtp_client, "smtps-client": smtps_client,
           "imap-client": imap_client, "pop3-client": pop3_client, "echo-client": echo_client,
           "pinned-client": pinned_client}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--starttls", default="offer")
    parser.add_argument("--alpn", default="x-echo")
    parser.add_argument("--ip")
    parser.add_argument("--name", default="mail.test")
    parser.add_argument("--ca")
    parser.add_argument("--no-sni", action="store_true")
    parser.add_argument("--send", default="")
    parser.add_argument("--wait", type=float, default=1.0)
    args = parser.parse_args()
    if args.role == "smtp-server":
        smtp_server(args)
    elif args.role in ("imap-server", "pop3-server"):
        cls = ImapServer if args.role == "imap-server" else Pop3Server
        asyncio.run(cls(_server_context(args.cert, args.key)).serve(args.host, args.port))
    elif args.role == "echo-server":
        echo_server(args)
    else:
        if args.role == "smtp-client":
            args.starttls = args.starttls != "none"
        try:
            result = {"ok": True, **CLIENTS[args.role](args)}
        except (OSError, smtplib.SMTPException, imaplib.IMAP4.error, poplib.error_proto) as exc:
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(result), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
