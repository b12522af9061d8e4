"""A real HTTPS server speaking HTTP/2 and HTTP/1.1 (hypercorn) for the end-to-end tests.

``python -m tests.h2_server --cert C --key K [--host H] [--port P] [--h1-only]`` prints
``listening HOST PORT`` once it accepts connections. Hypercorn negotiates ``h2`` by ALPN
(``--h1-only``: ``http/1.1`` only), supports server push and trailers (ASGI extensions),
WebSocket over HTTP/1.1 Upgrade and over HTTP/2 extended CONNECT (RFC 8441,
SETTINGS_ENABLE_CONNECT_PROTOCOL).

Routes:
- ``/push``: pushes ``/pushed.css`` (when the client allows push), then answers.
- ``/trailers``: a body followed by the trailer ``x-checksum``.
- ``/size/N``: an N-byte body.
- ``/echo``: answers the request body's size as text.
- anything else: ``hello from PATH``.
- WebSocket at any path: echoes every message; ``close`` closes with code 4001.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config

Scope = dict[str, Any]


async def app(scope: Scope, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await websocket(receive, send)
        return
    await http(scope, receive, send)


async def websocket(receive: Any, send: Any) -> None:
    msg = await receive()
    assert msg["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    while True:
        msg = await receive()
        if msg["type"] == "websocket.disconnect":
            return
        if msg.get("text") == "close":
            await send({"type": "websocket.close", "code": 4001})
            return
        await send({"type": "websocket.send", "text": msg.get("text"), "bytes": msg.get("bytes")})


async def http(scope: Scope, receive: Any, send: Any) -> None:
    size = 0
    while True:
        msg = await receive()
        size += len(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    path = scope["path"]
    headers = [(b"content-type", b"text/plain")]
    if path == "/push" and "http.response.push" in scope.get("extensions", {}):
        await send({"type": "http.response.push", "path": "/pushed.css", "headers": []})
    if path.startswith("/size/"):
        body = b"x" * int(path[6:])
    elif path == "/echo":
        body = f"{size}\n".encode()
    else:
        body = f"hello from {path}\n".encode()
    trailers = path == "/trailers" and "http.response.trailers" in scope.get("extensions", {})
    if trailers:
        headers.append((b"trailer", b"x-checksum"))
    else:
        headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers,
                "trailers": trailers})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
    if trailers:
        await send({"type": "http.response.trailers", "headers": [(b"x-checksum", b"42")]})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--h1-only", action="store_true")
    args = p.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)
    sock.set_inheritable(True)
    config = Config()
    if args.cert:
        config.bind = [f"fd://{sock.fileno()}"]
        config.certfile = args.cert
        config.keyfile = args.key
    else:  # cleartext (h2c with prior knowledge): for recording byte streams
        config.insecure_bind = [f"fd://{sock.fileno()}"]
    config.alpn_protocols = ["http/1.1"] if args.h1_only else ["h2", "http/1.1"]
    config.accesslog = None
    config.errorlog = None
    host, port = sock.getsockname()[:2]
    print(f"listening {host} {port}", flush=True)
    sys.stdout.flush()
    asyncio.run(serve(app, config))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()


class H2Origin:
    """``tests.h2_server`` as a subprocess (optionally in a network namespace)."""

    def __init__(self, cert: Any, key: Any, *, host: str = "127.0.0.1", port: int = 0,
                 h1_only: bool = False, netns: str | None = None) -> None:  # fmt: skip
        from tests.gateway import Origin

        self._origin = Origin(cert, key, host=host, port=port, netns=netns)
        argv = self._origin.argv
        argv[argv.index("tests.https_server")] = "tests.h2_server"
        if h1_only:
            argv.append("--h1-only")
        self.host = host
        self.port = port

    def __enter__(self) -> H2Origin:
        self._origin.__enter__()
        self.port = self._origin.port
        return self

    def __exit__(self, *exc: object) -> None:
        self._origin.__exit__(None, None, None)
