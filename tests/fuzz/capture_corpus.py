"""Regenerate the seed corpora from real clients and servers (run as root, needs curl and
openssl; it overwrites the ``real-*`` files of each target)::

    .venv/bin/python -m tests.fuzz.capture_corpus

- ``clienthello``: the first bytes curl, openssl s_client and Python's ssl send to a TLS
  server (several versions and ALPN offers), recorded by a plain TCP listener.
- ``connect``: the CONNECT requests curl, openssl s_client and Python's http.client send
  to a proxy (with and without proxy credentials).
- ``http1``: both directions of real exchanges (curl and http.client against
  http.server: GET, HEAD, POST, keep-alive, chunked upload), recorded by a TCP relay.
- ``events`` / ``eventframe``: the event file of a real gateway that served requests,
  refused an upstream and a block, and the same events as worker frames.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import msgpack
import trustme

from tests.fuzz import CORPUS_ROOT
from tests.fuzz.targets.http1 import encode
from tlsgate.workers.eventpipe import encode_frame

TIMEOUT = 5.0


def save(target: str, label: str, data: bytes) -> None:
    folder = CORPUS_ROOT / target
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"real-{label}-*"):
        old.unlink()
    digest = hashlib.sha1(data).hexdigest()[:10]
    (folder / f"real-{label}-{digest}").write_bytes(data)


def record_first_bytes(client: Callable[[int], object], until: bytes | None) -> bytes:
    """Listen on loopback, run ``client(port)``, return what it sent first."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        got: list[bytes] = []

        def serve() -> None:
            conn, _ = server.accept()
            conn.settimeout(1.0)
            buf = b""
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline and (until is None or until not in buf):
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                buf += chunk
            got.append(buf)
            conn.close()

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            client(port)
        except (OSError, ssl.SSLError, subprocess.SubprocessError, http.client.HTTPException):
            pass  # the recorder closes on the client: it fails, as expected
        thread.join(TIMEOUT + 2)
        return got[0] if got else b""


def run(argv: list[str]) -> None:
    subprocess.run(argv, capture_output=True, timeout=TIMEOUT + 5, input=b"", check=False)


def python_tls(port: int, alpn: list[str], maximum: ssl.TLSVersion) -> None:
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(alpn)
    ctx.maximum_version = maximum
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        ctx.wrap_socket(s, server_hostname="python.example")


def client_hellos() -> None:
    url = "https://curl.example:{}/"
    clients: dict[str, Callable[[int], object]] = {
        "curl-h2": lambda p: run(["curl", "-sk", "--max-time", "3", "--resolve",
                                  f"curl.example:{p}:127.0.0.1", url.format(p)]),
        "curl-h1-tls12": lambda p: run(["curl", "-sk", "--max-time", "3", "--http1.1",
                                        "--tls-max", "1.2", "--resolve",
                                        f"curl.example:{p}:127.0.0.1", url.format(p)]),
        "curl-ip-no-sni": lambda p: run(["curl", "-sk", "--max-time", "3",
                                         f"https://127.0.0.1:{p}/"]),
        "openssl-tls13": lambda p: run(["timeout", "3", "openssl", "s_client", "-connect",
                                        f"127.0.0.1:{p}", "-servername", "openssl.example",
                                        "-alpn", "h2,http/1.1", "-tls1_3"]),
        "openssl-tls12": lambda p: run(["timeout", "3", "openssl", "s_client", "-connect",
                                        f"127.0.0.1:{p}", "-servername", "openssl.example",
                                        "-tls1_2"]),
        "python-tls13": lambda p: python_tls(p, ["http/1.1"], ssl.TLSVersion.TLSv1_3),
        "python-tls12": lambda p: python_tls(p, ["h2", "http/1.1"], ssl.TLSVersion.TLSv1_2),
    }  # fmt: skip
    for label, client in clients.items():
        data = record_first_bytes(client, None)
        if data:
            save("clienthello", label, data)


def connect_requests() -> None:
    def python_tunnel(port: int, headers: dict[str, str]) -> None:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=TIMEOUT)
        conn.set_tunnel("python.example", 8443, headers=headers)
        conn.request("GET", "/")

    clients: dict[str, Callable[[int], object]] = {
        "curl": lambda p: run(["curl", "-sk", "--max-time", "3", "--proxy",
                               f"http://127.0.0.1:{p}", "https://curl.example/"]),
        "curl-auth-ipv6": lambda p: run(["curl", "-sk", "--max-time", "3", "--proxy",
                                         f"http://u:secret@127.0.0.1:{p}",
                                         "https://[2001:db8::1]:8443/"]),
        "openssl": lambda p: run(["timeout", "3", "openssl", "s_client", "-proxy",
                                  f"127.0.0.1:{p}", "-connect", "openssl.example:443"]),
        "python": lambda p: python_tunnel(p, {}),
        "python-headers": lambda p: python_tunnel(p, {"User-Agent": "fuzz-seed/1",
                                                       "Proxy-Authorization": "Basic eDp5"}),
    }  # fmt: skip
    for label, client in clients.items():
        data = record_first_bytes(client, b"\r\n\r\n")
        if data:
            save("connect", label, data)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, body: bytes, head: bool = False) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Set-Cookie", "s=1")
        if self.path.startswith("/chunked"):
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if not head:
                self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(f"hello {self.path}\n".encode())

    def do_HEAD(self) -> None:
        self._answer(b"x" * 10, head=True)

    def do_POST(self) -> None:
        if self.headers.get("Transfer-Encoding") == "chunked":
            body = b""
            while (size := int(self.rfile.readline().strip(), 16)) > 0:
                body += self.rfile.read(size + 2)[:-2]
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._answer(body)


def record_exchange(client: Callable[[int], object]) -> bytes:
    """Relay one connection to an http.server, recording both directions in order."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    parts: list[tuple[bool, bytes]] = []
    lock = threading.Lock()
    with socket.create_server(("127.0.0.1", 0)) as relay:
        port = relay.getsockname()[1]

        def pump(src: socket.socket, dst: socket.socket, from_client: bool) -> None:
            while True:
                try:
                    chunk = src.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                with lock:
                    parts.append((from_client, chunk))
                dst.sendall(chunk)

        def serve() -> None:
            conn, _ = relay.accept()
            up = socket.create_connection(server.server_address[:2])  # type: ignore[arg-type]
            threads = [threading.Thread(target=pump, args=(conn, up, True)),
                       threading.Thread(target=pump, args=(up, conn, False))]  # fmt: skip
            for t in threads:
                t.start()
            for t in threads:
                t.join(TIMEOUT + 2)
            conn.close()
            up.close()

        thread = threading.Thread(target=serve)
        thread.start()
        client(port)
        thread.join(TIMEOUT + 5)
    server.shutdown()
    server.server_close()
    return encode(parts)


def http_exchanges() -> None:
    def python_keepalive(port: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        for method, path, body in [
            ("GET", "/a", None),
            ("HEAD", "/h", None),
            ("POST", "/p", b"q=1&r=2"),
            ("GET", "/chunked", None),
        ]:
            conn.request(method, path, body=body, headers={"Cookie": "c=1"})
            conn.getresponse().read()
        conn.request("POST", "/chunked-up", body=iter([b"abc", b"defgh"]), encode_chunked=True)
        conn.getresponse().read()
        conn.close()

    clients: dict[str, Callable[[int], object]] = {
        "curl-get": lambda p: run(["curl", "-s", "--max-time", "3",
                                   f"http://127.0.0.1:{p}/index?x=1"]),
        "curl-keepalive": lambda p: run(["curl", "-s", "--max-time", "3",
                                         f"http://127.0.0.1:{p}/one",
                                         f"http://127.0.0.1:{p}/chunked"]),
        "curl-post": lambda p: run(["curl", "-s", "--max-time", "3", "-d", "a=b",
                                    "-H", "Authorization: Bearer t",
                                    f"http://127.0.0.1:{p}/form"]),
        "curl-head-http10": lambda p: run(["curl", "-s", "--max-time", "3", "-I", "-0",
                                           f"http://127.0.0.1:{p}/head"]),
        "python-keepalive": python_keepalive,
    }  # fmt: skip
    for label, client in clients.items():
        save("http1", label, record_exchange(client))


def event_streams() -> None:
    from tests.gateway import Gateway, Origin

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ca.cert_pem.write_to_path(str(d / "ca.pem"))
        leaf.private_key_pem.write_to_path(str(d / "key.pem"))
        (d / "cert.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        untrusted = trustme.CA().issue_cert("localhost")
        untrusted.private_key_pem.write_to_path(str(d / "ukey.pem"))
        (d / "ucert.pem").write_bytes(b"".join(b.bytes() for b in untrusted.cert_chain_pems))
        state = d / "state"
        state.mkdir(mode=0o700)
        with Origin(d / "cert.pem", d / "key.pem", alpn="http/1.1") as good, \
                Origin(d / "ucert.pem", d / "ukey.pem") as bad, \
                Gateway(state, upstream_ca=d / "ca.pem",
                        args=["--workers", "1", "--block", "blocked.example"]) as gw:  # fmt: skip
            base = ["curl", "-s", "--max-time", "5", "--proxy", gw.proxy, "--cacert",
                    str(gw.ca_cert)]  # fmt: skip
            run([*base, "-H", "Cookie: a=b", f"https://localhost:{good.port}/x?y=1",
                 f"https://localhost:{good.port}/bytes/3000"])  # fmt: skip
            run([*base, "-d", "a=b", f"https://localhost:{good.port}/echo"])
            run([*base, f"https://localhost:{bad.port}/"])
            run([*base, "https://blocked.example/"])
            gw.wait_events("conn_close", 4)
            time.sleep(0.5)
            stream = gw.events_file.read_bytes()
    save("events", "gateway-run", stream)
    # the same events as a worker frames them: the exact bytes of each one
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(stream)
    raw: list[bytes] = []
    start = 0
    for _event in unpacker:
        raw.append(stream[start : unpacker.tell()])
        start = unpacker.tell()
    save("eventframe", "gateway-run", encode_frame(raw)[4:])
    save("events", "first-event", raw[0])


def main() -> int:
    client_hellos()
    connect_requests()
    http_exchanges()
    event_streams()
    for folder in sorted(CORPUS_ROOT.iterdir()):
        print(f"{folder.name}: {len(list(folder.iterdir()))} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
