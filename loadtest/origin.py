"""The origin of the load test: Debian's nginx with a generated config and a test CA.

:func:`make_pki` creates a test CA for the run (tlsgate's own CA code) and a leaf for
``NAME`` and ``*.NAME`` (so a distinct-name storm ``n<i>.NAME`` is served by one
certificate); the gateway trusts that CA through its upstream trust option.
:func:`nginx_config` serves ``/`` (1 KiB) and ``/bulk`` (10 MiB) over TLS 1.2/1.3 and
HTTP/1.1 + HTTP/2 on every listen port, with session tickets and a session cache on (so
resumption is available to whoever asks for it); with ``log_reuse`` each request's
``$ssl_session_reused`` is logged (``r`` resumed, ``.`` full handshake).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

NAME = "bench.test"
SMALL_BYTES = 1024
BULK_BYTES = 10 * 1024 * 1024

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
  {access_log}
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  ssl_certificate {dir}/origin.pem;
  ssl_certificate_key {dir}/origin-key.pem;
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_tickets on;
  ssl_session_cache shared:tls:16m;
  server {{
{listens}
    server_name _;
    root {dir}/www;
    location = / {{ try_files /1k =404; }}
    location = /bulk {{ try_files /10m =404; }}
  }}
}}
"""


def make_pki(d: Path, name: str = NAME) -> Path:
    """Write ``ca.pem``, ``origin.pem`` (leaf + nothing else: the CA is the root) and
    ``origin-key.pem`` into ``d``; returns the CA path."""
    from cryptography.hazmat.primitives import serialization

    from tlsgate.supervisor.ca import init_ca
    from tlsgate.supervisor.signer import LeafRequest, LeafSigner, generate_leaf_key

    ca = init_ca(d / "origin-ca")
    key = generate_leaf_key()
    leaf = LeafSigner(ca, key).sign(
        LeafRequest(
            dns_names=(name, f"*.{name}", "localhost"),
            ip_addresses=("127.0.0.1",),
            not_after=ca.cert.not_valid_after_utc,
        )
    )
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.cert.public_bytes(pem))
    (d / "origin.pem").write_bytes(leaf.public_bytes(pem))
    (d / "origin-key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return d / "ca.pem"


def write_site(d: Path, listens: Sequence[tuple[str, int]], *, log_reuse: bool = False) -> Path:
    """The content and ``nginx.conf`` in ``d``; returns the config path."""
    www = d / "www"
    www.mkdir(exist_ok=True)
    (www / "1k").write_bytes(b"x" * SMALL_BYTES)
    (www / "10m").write_bytes(b"y" * BULK_BYTES)
    access_log = "access_log off;"
    if log_reuse:
        access_log = (
            "log_format reuse '$ssl_session_reused $ssl_server_name';\n"
            f"  access_log {d}/access.log reuse;"
        )
    lines = "\n".join(f"    listen {host}:{port} ssl http2 reuseport;" for host, port in listens)
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=d, listens=lines, access_log=access_log))
    return conf


def nginx_argv(conf: Path) -> list[str]:
    return ["nginx", "-c", str(conf), "-e", str(conf.parent / "nginx-error.log")]


def reuse_counts(access_log: Path) -> dict[str, int]:
    """``{"full": n, "resumed": m}`` from an access log written with ``log_reuse``."""
    counts = {"full": 0, "resumed": 0}
    for line in access_log.read_text().splitlines():
        flag = line.split(" ", 1)[0]
        counts["resumed" if flag == "r" else "full"] += 1
    return counts
