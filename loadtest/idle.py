"""Hold COUNT idle keep-alive TLS connections (run by the suite in the client namespace).

    python -m tlsgate.loadtest.idle HOST PORT COUNT

Opens the connections one by one (each: full handshake, one GET answered), prints
``ready <open> <errors>`` and keeps them open until its standard input closes. The
suite then reads the gateway's RSS per worker at that many open connections.
"""

from __future__ import annotations

import resource
import socket
import ssl
import sys
import time


def main(argv: list[str]) -> int:
    host, port, count = argv[0], int(argv[1]), int(argv[2])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 64)), hard))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the gateway's certificate is not what is measured here
    held: list[ssl.SSLSocket] = []
    errors = 0
    deadline = time.monotonic() + 120
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    for _ in range(count):
        if time.monotonic() > deadline:
            errors += 1
            continue
        try:
            tls = ctx.wrap_socket(
                socket.create_connection((host, port), timeout=10), server_hostname=host
            )
            tls.sendall(request)
            got = b""
            while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < 1024:
                chunk = tls.recv(65536)
                if not chunk:
                    raise OSError("closed before the response ended")
                got += chunk
            held.append(tls)
        except OSError:
            errors += 1
    print(f"ready {len(held)} {errors}", flush=True)
    sys.stdin.read()
    for tls in held:
        tls.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
