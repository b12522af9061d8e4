"""A real HTTPS origin server for tests (Python's ssl + http.server), runnable anywhere:

    python -m tests.https_server --cert C --key K --host 127.0.0.1 --port 0 [--alpn h2,...]

It prints ``listening HOST PORT`` once ready. Paths: ``/bytes/N`` answers N bytes,
``/echo`` answers the request body, anything else a short text naming the path. HTTP/1.1
keep-alive; HEAD supported. Used by the end-to-end and network-namespace tests.
"""

from __future__ import annotations

import argparse
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: tests read stdout for the ready line only

    def _body(self) -> bytes:
        if self.path.startswith("/bytes/"):
            return b"x" * int(self.path.removeprefix("/bytes/"))
        if self.path == "/echo":
            length = int(self.headers.get("Content-Length", "0"))
            return self.rfile.read(length)
        return f"hello from {self.path}\n".encode()

    def _answer(self, head_only: bool) -> None:
        body = self._body()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Set-Cookie", "session=secret-value")
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(False)

    def do_POST(self) -> None:
        self._answer(False)

    def do_HEAD(self) -> None:
        self._answer(True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cert", required=True, help="PEM: leaf then intermediates")
    parser.add_argument("--key", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--alpn", default="")
    args = parser.parse_args(argv)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    if args.alpn:
        ctx.set_alpn_protocols(args.alpn.split(","))
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    host, port = str(server.server_address[0]), server.server_address[1]
    print(f"listening {host} {port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
