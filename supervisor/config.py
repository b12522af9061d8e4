"""Gateway configuration: a TOML file, overridden by command-line flags, checked once.

Rules:
- Every value is validated when the configuration is built; a bad value is a
  :class:`~tlsgate.errors.ConfigError` whose message names the setting, the bad value and
  what a good one looks like. Nothing is checked lazily at connection time.
- Unknown keys are errors (a typo must not silently fall back to a default).
- :class:`Config` is immutable; workers receive it whole.

File layout (every key optional)::

    listen = "127.0.0.1:8080"
    mode = "explicit"                 # or "transparent"
    workers = 1
    state_dir = "/var/lib/tlsgate"
    upstream_ca_bundle = "/etc/ssl/certs/ca-certificates.crt"
    ca_passphrase_file = "/etc/tlsgate/ca.pass"

    [events]
    file = "/var/log/tlsgate/events.msgpack"
    subscriber_buffer = 8388608       # bytes per subscriber before it gets gap events
    group = "ids"                     # may read the detection socket (mode 0660)
    remote_listen = "198.18.0.1:57100" # off unless set: the same stream over TCP, mutual TLS
    remote_ca = "/var/lib/tlsgate/events-ca/cert.pem"          # default: the events CA
    remote_cert = "/var/lib/tlsgate/events-ca/server-cert.pem" # default: issued on start
    remote_key = "/var/lib/tlsgate/events-ca/server-key.pem"

    [metrics]                         # off unless listen is set
    listen = "127.0.0.1:9464"         # Prometheus text at /metrics
    mtls = false                      # required (true) for any non-loopback address

    [capture]                         # off unless pcap_dir is set
    pcap_dir = "/var/lib/tlsgate/pcap"
    cap_bytes = 1048576               # plaintext bytes per connection, then truncated
    rotate_bytes = 67108864
    keep = 16                         # files per worker
    pcap_over_ip = "127.0.0.1:57012"  # worker k streams on port 57012 + k (no auth: local only)

    [policy]
    bypass_domains = ["*.bank.example"]
    bypass_clients = ["10.0.5.0/24"]
    block_domains = []
    block_clients = []

    [http]
    record_headers = ["host", "user-agent", "content-type"]
    redact_headers = ["authorization", "cookie"]

    [mail]                            # transparent mode: STARTTLS on these ports
    smtp_ports = [25, 587]
    imap_ports = [143]
    pop3_ports = [110]
    max_line = 8192                   # longest command/reply line in the clear-text phase
    negotiation_timeout = 30.0        # until STARTTLS is accepted, refused or not offered
    starttls_required = []            # server networks that must do STARTTLS (else refused)

    [learned_bypass]                  # off by default
    enabled = false
    threshold = 3                     # client certificate rejections of one name ...
    window = 300.0                    # ... within this many seconds
    ttl = 3600.0                      # seconds a learned name is spliced
    max_entries = 1024                # least recently used names are evicted beyond this

    [access]
    # clients served; absent: loopback plus the private networks (RFC 1918, 100.64.0.0/10,
    # fc00::/7) the host's own interfaces are on (in transparent mode: intercept_from if set)
    allow_clients = ["10.0.0.0/8"]
    # CONNECT destinations otherwise refused (loopback, link-local/metadata, own addresses)
    allow_destinations = []

    [limits]
    max_connections = 10000           # per worker
    max_connections_per_client = 256  # per client address, all workers together
    client_ipv6_prefix = 64           # an IPv6 client is its /64 (one host holds a whole /64)
    handshake_timeout = 10.0          # accept to relay (upstream validated, leaf served)
    header_timeout = 10.0             # CONNECT request / ClientHello, and each HTTP request head
    connect_timeout = 10.0
    idle_timeout = 300.0
    drain_timeout = 25.0
    upstream_sessions = 1024          # validated upstream TLS sessions kept per worker; 0 = off
    max_request_line = 8192           # HTTP request line (method, target, version), CONNECT's too
    max_connect_header_bytes = 8192   # explicit mode: the CONNECT request, headers included
    max_header_bytes = 65536          # one HTTP header section
    max_header_count = 128            # header lines in one HTTP header section (and CONNECT)
    socket_buffer = 0                 # bytes per socket and direction; 0: kernel autotuning

    steering = "auto"                 # or "ebpf" (required), "kernel" (never eBPF)
    steering_policy = "least-loaded"  # or "hash"
    worker_user = "nobody"            # default when started as root
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tlsgate.errors import ConfigError
from tlsgate.paths import resolve_state_dir
from tlsgate.workers.access import LOOPBACK_NETWORKS, AccessPolicy, parse_networks
from tlsgate.workers.http1 import DEFAULT_RECORD_HEADERS, DEFAULT_REDACT_HEADERS
from tlsgate.workers.policy import Policy

MODES = ("explicit", "transparent")
DEFAULT_LISTEN = ("127.0.0.1", 8080)
MAX_WORKERS = 256


@dataclass(frozen=True)
class Limits:
    """Bounds that keep one worker alive under load and hostile peers."""

    max_connections: int = 10000
    #: Open connections of one client address in the whole gateway (all workers count in
    #: one shared table: workers/clientcounts.py).
    max_connections_per_client: int = 256
    #: IPv6 clients are counted per network of this prefix length: one host usually holds a
    #: whole /64 and can pick a new source address per connection (RFC 8981). IPv4 clients
    #: are counted per address.
    client_ipv6_prefix: int = 64
    #: From accept until the relay runs (upstream connected and validated, client handshake).
    handshake_timeout: float = 10.0
    #: For the CONNECT request, the ClientHello, and each HTTP request head in a tunnel
    #: (slowloris: bytes trickling in slowly enough to dodge the idle timeout).
    header_timeout: float = 10.0
    connect_timeout: float = 10.0
    idle_timeout: float = 300.0
    #: On SIGTERM or when a worker is replaced: how long in-flight connections may finish.
    drain_timeout: float = 25.0
    #: Validated upstream TLS sessions a worker keeps to resume (0 turns reuse off).
    upstream_sessions: int = 1024
    #: HTTP request line inside a tunnel, and the CONNECT request line (414).
    max_request_line: int = 8192
    max_header_bytes: int = 65536
    #: Header lines of one HTTP header section, and of a CONNECT request (431).
    max_header_count: int = 128
    #: Explicit mode: the whole CONNECT request, request line and headers (431). At most
    #: MAX_CONNECT_HEADER_LIMIT: the worker peeks at it in one read of that size.
    max_connect_header_bytes: int = 8192
    #: SO_RCVBUF/SO_SNDBUF of client and upstream sockets (0: the kernel's autotuning,
    #: bounded by net.ipv4.tcp_rmem/tcp_wmem). Bounds the kernel memory of a connection.
    socket_buffer: int = 0


@dataclass(frozen=True)
class LearnedBypassSettings:
    """When a client keeps rejecting our certificate for a name, splice that name for a while."""

    enabled: bool = False
    threshold: int = 3
    window: float = 300.0
    ttl: float = 3600.0
    max_entries: int = 1024


@dataclass(frozen=True)
class Config:
    """Everything `tlsgate run` needs, validated."""

    listen: tuple[str, int] = DEFAULT_LISTEN
    mode: str = "explicit"
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    state_dir: Path = field(default_factory=lambda: resolve_state_dir(None))
    upstream_ca_bundle: Path | None = None
    ca_passphrase_file: Path | None = None
    events_file: Path | None = None
    #: Per detection-socket subscriber: events buffered for a slow reader before it gets gaps.
    events_subscriber_buffer: int = 8 * 1024 * 1024
    #: Group that may subscribe to the detection socket (mode 0660); "" = root's group.
    events_group: str = ""
    #: Remote subscribers over TCP with mutual TLS (off when None).
    events_remote_listen: tuple[str, int] | None = None
    #: Trust anchor for remote subscribers' certificates, and the server's pair; None =
    #: the events CA of the state dir and the server certificate issued from it on start.
    events_remote_ca: Path | None = None
    events_remote_cert: Path | None = None
    events_remote_key: Path | None = None
    #: Prometheus endpoint (off when None); ``metrics_mtls`` requires client certificates.
    metrics_listen: tuple[str, int] | None = None
    metrics_mtls: bool = False
    #: Opt-in decrypted-traffic export: rotated pcap files per worker in this directory.
    pcap_dir: Path | None = None
    #: Plaintext bytes captured per connection (both directions) before truncation.
    capture_cap: int = 1024 * 1024
    pcap_rotate_bytes: int = 64 * 1024 * 1024
    #: Opt-in PCAP-over-IP: worker k streams its records on port + k of this address.
    pcap_over_ip: tuple[str, int] | None = None
    pcap_keep: int = 16
    bypass_domains: tuple[str, ...] = ()
    bypass_clients: tuple[str, ...] = ()
    block_domains: tuple[str, ...] = ()
    block_clients: tuple[str, ...] = ()
    record_headers: tuple[str, ...] = tuple(sorted(DEFAULT_RECORD_HEADERS))
    redact_headers: tuple[str, ...] = tuple(sorted(DEFAULT_REDACT_HEADERS))
    limits: Limits = Limits()
    #: Clients served (CIDRs); None: the default computed at startup (see
    #: :func:`~tlsgate.supervisor.interfaces.resolve_access`).
    allow_clients: tuple[str, ...] | None = None
    #: CONNECT destinations allowed although loopback, link-local or the gateway's own.
    allow_destinations: tuple[str, ...] = ()
    #: The host's own addresses (computed at startup, not configurable).
    own_addresses: tuple[str, ...] = ()
    #: "auto": eBPF if possible, else the kernel's reuseport hash (one warning line);
    #: "ebpf": eBPF or refuse to start; "kernel": never load eBPF.
    steering: str = "auto"
    #: Transparent mode: ports whose forwarded traffic tlsgate TPROXYs to itself (its own
    #: nftables table); empty: install nothing, serve what the operator's rules send.
    intercept_ports: tuple[int, ...] = ()
    intercept_from: tuple[str, ...] = ()
    steering_policy: str = "least-loaded"
    #: Workers drop root to this user after receiving their sockets ("" = stay as started).
    worker_user: str = field(default_factory=lambda: default_worker_user())
    #: Transparent mode: destination ports whose connections start with a clear-text mail
    #: dialogue (STARTTLS); implicit-TLS ports (465, 993, 995) need nothing: they are TLS.
    smtp_ports: tuple[int, ...] = (25, 587)
    imap_ports: tuple[int, ...] = (143,)
    pop3_ports: tuple[int, ...] = (110,)
    mail_max_line: int = 8192
    #: Seconds the clear-text phase may take to show whether STARTTLS will be used.
    mail_negotiation_timeout: float = 30.0
    #: Server networks STARTTLS is required from: a stripped capability or a refusal is a
    #: downgrade and the connection is refused.
    starttls_required: tuple[str, ...] = ()
    learned_bypass: LearnedBypassSettings = LearnedBypassSettings()

    def access(self) -> AccessPolicy:
        return AccessPolicy.build(
            self.allow_clients if self.allow_clients is not None else LOOPBACK_NETWORKS,
            self.allow_destinations,
            self.own_addresses,
        )

    def policy(self) -> Policy:
        return Policy(
            bypass_domains=self.bypass_domains,
            bypass_clients=self.bypass_clients,
            block_domains=self.block_domains,
            block_clients=self.block_clients,
        )


def default_worker_user() -> str:
    """``nobody`` when started as root (workers parse hostile bytes: they must not be root),
    else nothing to drop."""
    if os.geteuid() != 0:
        return ""
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return ""
    return "nobody"


def parse_listen(value: object, setting: str = "listen") -> tuple[str, int]:
    """``"127.0.0.1:8080"`` or ``"[::1]:8080"`` → (address, port)."""
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(
            f"{setting} = {value!r} is not ADDRESS:PORT; use e.g. 127.0.0.1:8080 or [::1]:8080"
        )
    host, _, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{setting} = {value!r}: {host!r} is not an IP address; tlsgate listens on "
            "addresses, not names (use e.g. 127.0.0.1:8080)"
        ) from None
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ConfigError(
            f"{setting} = {value!r}: port must be a number from 1 to 65535 "
            "(or 0 for any free port, shown in the startup banner)"
        )
    return host, int(port_text)


def _str_list(value: object, setting: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{setting} must be a list of strings, got {value!r}")
    return tuple(value)


def _positive(value: object, setting: str, kind: type) -> Any:
    ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
    if not ok or isinstance(value, bool) or value <= 0:  # type: ignore[operator]
        raise ConfigError(f"{setting} must be a positive {kind.__name__}, got {value!r}")
    return kind(value)


def _path(value: object, setting: str, must_exist: bool) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{setting} must be a file path, got {value!r}")
    path = Path(value).expanduser()
    if must_exist and not path.is_file():
        raise ConfigError(f"{setting} = {value!r}: no such file; give the path of an existing file")
    return path


def _reject_unknown(table: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"unknown setting {unknown[0]!r} in {where}; valid settings are: "
            + ", ".join(sorted(known))
        )


_TOP = {
    "listen", "mode", "workers", "state_dir", "upstream_ca_bundle", "ca_passphrase_file",
    "events", "policy", "http", "limits", "worker_user", "steering", "steering_policy",
    "intercept_ports", "intercept_from", "capture", "mail", "learned_bypass", "metrics",
    "access",
}  # fmt: skip
_EVENTS = {
    "file", "subscriber_buffer", "group", "remote_listen", "remote_ca", "remote_cert",
    "remote_key",
}  # fmt: skip
_MAIL = {"smtp_ports", "imap_ports", "pop3_ports", "max_line", "starttls_required",
         "negotiation_timeout"}  # fmt: skip
_LEARNED = {"enabled", "threshold", "window", "ttl", "max_entries"}
_POLICY = {"bypass_domains", "bypass_clients", "block_domains", "block_clients"}
_HTTP = {"record_headers", "redact_headers"}
_LIMITS = {
    "max_connections", "handshake_timeout", "connect_timeout", "idle_timeout", "drain_timeout",
    "upstream_sessions",
    "max_connections_per_client", "header_timeout", "max_request_line", "max_header_bytes",
    "max_header_count", "socket_buffer", "max_connect_header_bytes", "client_ipv6_prefix",
}  # fmt: skip
_LIMIT_INTS = ("max_connections", "max_connections_per_client", "max_request_line",
               "max_header_bytes", "max_header_count", "max_connect_header_bytes")  # fmt: skip
#: Bounds of max_connect_header_bytes: room for a request line and a few headers, and the
#: worker's single peek (workers/intercept.py MAX_PEEK).
MIN_CONNECT_HEADER_LIMIT = 256
MAX_CONNECT_HEADER_LIMIT = 65536
_LIMIT_FLOATS = ("handshake_timeout", "header_timeout", "connect_timeout", "idle_timeout",
                 "drain_timeout")  # fmt: skip
#: Smallest socket_buffer accepted (the kernel doubles and floors what is set anyway).
MIN_SOCKET_BUFFER = 4096
#: Bounds of client_ipv6_prefix: from a /32 (a whole provider allocation) to single addresses.
MIN_CLIENT_IPV6_PREFIX = 32
MAX_CLIENT_IPV6_PREFIX = 128
STEERING = ("auto", "ebpf", "kernel")
STEERING_POLICIES = ("least-loaded", "hash")


def load_file(path: Path) -> dict[str, Any]:
    """Read a TOML config file; every problem is a ConfigError naming the file."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; check the --config path") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None


def build_config(data: Mapping[str, Any], where: str = "the configuration") -> Config:
    """Validate a parsed mapping (file contents with flag overrides applied) into a Config."""
    _reject_unknown(data, _TOP, where)
    kw: dict[str, Any] = {}
    if "listen" in data:
        kw["listen"] = parse_listen(data["listen"])
    if "mode" in data:
        if data["mode"] not in MODES:
            raise ConfigError(f"mode = {data['mode']!r}; choose one of: {', '.join(MODES)}")
        kw["mode"] = data["mode"]
    if "workers" in data:
        workers = _positive(data["workers"], "workers", int)
        if workers > MAX_WORKERS:
            raise ConfigError(f"workers = {workers} is more than {MAX_WORKERS}")
        kw["workers"] = workers
    if "state_dir" in data:
        if not isinstance(data["state_dir"], str) or not data["state_dir"]:
            raise ConfigError(f"state_dir must be a directory path, got {data['state_dir']!r}")
        kw["state_dir"] = resolve_state_dir(data["state_dir"])
    if data.get("upstream_ca_bundle") is not None:
        kw["upstream_ca_bundle"] = _path(
            data["upstream_ca_bundle"], "upstream_ca_bundle", must_exist=True
        )
    if data.get("ca_passphrase_file") is not None:
        kw["ca_passphrase_file"] = _path(
            data["ca_passphrase_file"], "ca_passphrase_file", must_exist=True
        )
    for key, choices in (("steering", STEERING), ("steering_policy", STEERING_POLICIES)):
        if key in data:
            if data[key] not in choices:
                raise ConfigError(f"{key} = {data[key]!r}; choose one of: {', '.join(choices)}")
            kw[key] = data[key]
    if "intercept_ports" in data:
        kw["intercept_ports"] = _ports(data["intercept_ports"], "intercept_ports")
    if "intercept_from" in data:
        nets = _str_list(data["intercept_from"], "intercept_from")
        for net in nets:
            try:
                ipaddress.IPv4Network(net, strict=False)
            except ValueError:
                raise ConfigError(
                    f"intercept_from: {net!r} is not an IPv4 network (e.g. 10.0.0.0/8)"
                ) from None
        kw["intercept_from"] = nets
    if "worker_user" in data:
        user = data["worker_user"]
        if not isinstance(user, str):
            raise ConfigError(f'worker_user must be a user name (or ""), got {user!r}')
        if user:
            try:
                pwd.getpwnam(user)
            except KeyError:
                raise ConfigError(
                    f"worker_user = {user!r}: no such user; create it or choose another"
                ) from None
        kw["worker_user"] = user
    events = _table(data, "events", where)
    _reject_unknown(events, _EVENTS, f"[events] of {where}")
    if events.get("file") is not None:
        kw["events_file"] = _path(events["file"], "events.file", must_exist=False)
    if "subscriber_buffer" in events:
        size = _positive(events["subscriber_buffer"], "events.subscriber_buffer", int)
        if size < 65536:
            raise ConfigError(f"events.subscriber_buffer = {size}: use at least 65536 bytes")
        kw["events_subscriber_buffer"] = size
    if "group" in events:
        group = events["group"]
        if not isinstance(group, str):
            raise ConfigError(f"events.group must be a group name, got {group!r}")
        if group:
            try:
                grp.getgrnam(group)
            except KeyError:
                raise ConfigError(f"events.group = {group!r}: no such group") from None
        kw["events_group"] = group
    if events.get("remote_listen") is not None:
        kw["events_remote_listen"] = parse_listen(events["remote_listen"], "events.remote_listen")
    for key in ("remote_ca", "remote_cert", "remote_key"):
        if events.get(key) is not None:
            kw[f"events_{key}"] = _path(events[key], f"events.{key}", must_exist=False)
    if ("events_remote_cert" in kw) != ("events_remote_key" in kw):
        raise ConfigError(
            "events.remote_cert and events.remote_key go together: set both (a certificate"
            " and its key from the events CA) or neither (the gateway issues its own)"
        )
    metrics = _table(data, "metrics", where)
    _reject_unknown(metrics, {"listen", "mtls"}, f"[metrics] of {where}")
    if metrics.get("listen") is not None:
        kw["metrics_listen"] = parse_listen(metrics["listen"], "metrics.listen")
    if "mtls" in metrics:
        if not isinstance(metrics["mtls"], bool):
            raise ConfigError(f"metrics.mtls must be true or false, got {metrics['mtls']!r}")
        kw["metrics_mtls"] = metrics["mtls"]
    listen = kw.get("metrics_listen")
    if listen is not None and not kw.get("metrics_mtls") and not _is_loopback(listen[0]):
        raise ConfigError(
            f"metrics.listen = {listen[0]}:{listen[1]} is reachable from the network, so it"
            " must use mutual TLS: set [metrics] mtls = true (scrapers then need a"
            " certificate from `tlsgate events-ca issue-subscriber NAME --role"
            " metrics-scraper`), or listen on 127.0.0.1"
        )
    capture = _table(data, "capture", where)
    _reject_unknown(capture, {"pcap_dir", "cap_bytes", "rotate_bytes", "keep", "pcap_over_ip"},
                    f"[capture] of {where}")  # fmt: skip
    if capture.get("pcap_over_ip") is not None:
        kw["pcap_over_ip"] = parse_listen(capture["pcap_over_ip"], "capture.pcap_over_ip")
    if capture.get("pcap_dir") is not None:
        kw["pcap_dir"] = _path(capture["pcap_dir"], "capture.pcap_dir", must_exist=False)
    for key, field_name in (("cap_bytes", "capture_cap"), ("rotate_bytes", "pcap_rotate_bytes"),
                            ("keep", "pcap_keep")):  # fmt: skip
        if key in capture:
            kw[field_name] = _positive(capture[key], f"capture.{key}", int)
    policy = _table(data, "policy", where)
    _reject_unknown(policy, _POLICY, f"[policy] of {where}")
    for key in _POLICY:
        if key in policy:
            kw[key] = _str_list(policy[key], f"policy.{key}")
    http = _table(data, "http", where)
    _reject_unknown(http, _HTTP, f"[http] of {where}")
    for key in _HTTP:
        if key in http:
            kw[key] = tuple(h.lower() for h in _str_list(http[key], f"http.{key}"))
    kw.update(_mail(_table(data, "mail", where), where))
    kw.update(_learned(_table(data, "learned_bypass", where), where))
    limits = _table(data, "limits", where)
    _reject_unknown(limits, _LIMITS, f"[limits] of {where}")
    lim: dict[str, Any] = {}
    for key in _LIMIT_INTS:
        if key in limits:
            lim[key] = _positive(limits[key], f"limits.{key}", int)
    for key in _LIMIT_FLOATS:
        if key in limits:
            lim[key] = _positive(limits[key], f"limits.{key}", float)
    size = lim.get("max_connect_header_bytes")
    if size is not None and not MIN_CONNECT_HEADER_LIMIT <= size <= MAX_CONNECT_HEADER_LIMIT:
        raise ConfigError(
            f"limits.max_connect_header_bytes = {size}: use {MIN_CONNECT_HEADER_LIMIT} to "
            f"{MAX_CONNECT_HEADER_LIMIT} bytes (a CONNECT request is read in one peek)"
        )
    if "upstream_sessions" in limits:
        value = limits["upstream_sessions"]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(
                f"limits.upstream_sessions must be a whole number ≥ 0 (0 turns upstream "
                f"session reuse off), got {value!r}"
            )
        lim["upstream_sessions"] = value
    if "client_ipv6_prefix" in limits:
        bits = limits["client_ipv6_prefix"]
        if (
            not isinstance(bits, int)
            or isinstance(bits, bool)
            or not MIN_CLIENT_IPV6_PREFIX <= bits <= MAX_CLIENT_IPV6_PREFIX
        ):
            raise ConfigError(
                f"limits.client_ipv6_prefix = {bits!r}: use a prefix length from "
                f"{MIN_CLIENT_IPV6_PREFIX} to {MAX_CLIENT_IPV6_PREFIX} (64: one client per /64; "
                "128: per address)"
            )
        lim["client_ipv6_prefix"] = bits
    if "socket_buffer" in limits:
        size = limits["socket_buffer"]
        if size != 0:
            size = _positive(size, "limits.socket_buffer", int)
        if isinstance(size, bool) or not isinstance(size, int) or 0 < size < MIN_SOCKET_BUFFER:
            raise ConfigError(
                f"limits.socket_buffer = {size!r}: use 0 (kernel autotuning) or at least "
                f"{MIN_SOCKET_BUFFER} bytes"
            )
        lim["socket_buffer"] = size
    access = _table(data, "access", where)
    _reject_unknown(access, {"allow_clients", "allow_destinations"}, f"[access] of {where}")
    for key in ("allow_clients", "allow_destinations"):
        if key in access:
            nets = _str_list(access[key], f"access.{key}")
            parse_networks(nets, f"access.{key}")
            if key == "allow_clients" and not nets:
                raise ConfigError(
                    "access.allow_clients is empty: it would refuse every client; list the "
                    "client networks (or leave it out for the default)"
                )
            kw[key] = nets
    if lim:
        kw["limits"] = replace(Limits(), **lim)
    config = Config(**kw)
    if config.intercept_ports and config.mode != "transparent":
        raise ConfigError("intercept_ports only applies to --mode transparent")
    config.policy()  # compile once so bad globs/CIDRs fail here, at startup
    return config


def _is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def _ports(ports: object, setting: str) -> tuple[int, ...]:
    if not isinstance(ports, list) or not all(
        isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in ports
    ):
        raise ConfigError(f"{setting} must be a list of ports (1-65535), got {ports!r}")
    return tuple(ports)


def _mail(mail: Mapping[str, Any], where: str) -> dict[str, Any]:
    _reject_unknown(mail, _MAIL, f"[mail] of {where}")
    kw: dict[str, Any] = {}
    seen: dict[int, str] = {}
    for key in ("smtp_ports", "imap_ports", "pop3_ports"):
        if key in mail:
            kw[key] = _ports(mail[key], f"mail.{key}")
        for port in kw.get(key, Config.__dataclass_fields__[key].default):
            if port in seen:
                raise ConfigError(
                    f"mail.{key}: port {port} is also in mail.{seen[port]}; a port speaks "
                    "one protocol"
                )
            seen[port] = key
    if "max_line" in mail:
        size = _positive(mail["max_line"], "mail.max_line", int)
        if size < 512:
            raise ConfigError(f"mail.max_line = {size}: use at least 512 (RFC 5321's minimum)")
        kw["mail_max_line"] = size
    if "negotiation_timeout" in mail:
        kw["mail_negotiation_timeout"] = _positive(
            mail["negotiation_timeout"], "mail.negotiation_timeout", float
        )
    if "starttls_required" in mail:
        nets = _str_list(mail["starttls_required"], "mail.starttls_required")
        for net in nets:
            try:
                ipaddress.ip_network(net)
            except ValueError:
                raise ConfigError(
                    f"mail.starttls_required: {net!r} is not a network (e.g. 192.0.2.0/24)"
                ) from None
        kw["starttls_required"] = nets
    return kw


def _learned(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    _reject_unknown(table, _LEARNED, f"[learned_bypass] of {where}")
    kw: dict[str, Any] = {}
    if "enabled" in table:
        if not isinstance(table["enabled"], bool):
            raise ConfigError(
                f"learned_bypass.enabled must be true or false, got {table['enabled']!r}"
            )
        kw["enabled"] = table["enabled"]
    for key in ("threshold", "max_entries"):
        if key in table:
            kw[key] = _positive(table[key], f"learned_bypass.{key}", int)
    for key in ("window", "ttl"):
        if key in table:
            kw[key] = _positive(table[key], f"learned_bypass.{key}", float)
    return {"learned_bypass": LearnedBypassSettings(**kw)} if kw else {}


def _table(data: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} in {where} must be a table ([{name}]), got {value!r}")
    return value


def load_config(path: Path | None, overrides: Mapping[str, Any]) -> Config:
    """The file's settings (if any), then each non-None flag override on top."""
    data: dict[str, Any] = dict(load_file(path)) if path is not None else {}
    where = str(path) if path is not None else "the command line"
    for key, value in overrides.items():
        if value is None:
            continue
        if "." in key:
            table, _, sub = key.partition(".")
            merged = dict(_table(data, table, where))
            merged[sub] = value
            data[table] = merged
        else:
            data[key] = value
    return build_config(data, where)
