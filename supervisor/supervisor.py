"""`tlsgate run` with worker processes: the root supervisor's wiring.

What lives here: the shared certificate cache (emptied here at start and CA rotation),
the event hub, the listening sockets, the eBPF steering program, the control socket, the
:class:`~tlsgate.supervisor.arbiter.Arbiter` that keeps the workers alive, and the
:class:`~tlsgate.supervisor.signer_keeper.SignerKeeper` that keeps the signer process
alive. The CA key is not here: only the signer process reads and holds it (it reports
back the CA certificate, its fingerprint and the chain to send). Workers get their socket,
the leaf key, the signer's socket path and the cache path — never the CA key, and they
drop root.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import multiprocess  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from multiprocess.reduction import DupFd  # type: ignore[import-untyped]

from tlsgate import __version__
from tlsgate.errors import OperatorError
from tlsgate.paths import control_socket_path, events_socket_path, runtime_dir
from tlsgate.supervisor.arbiter import STATS_FIELDS, Arbiter, Slot
from tlsgate.supervisor.config import Config
from tlsgate.supervisor.control import ControlServer
from tlsgate.supervisor.eventhub import EventHub
from tlsgate.supervisor.interfaces import access_summary, resolve_access
from tlsgate.supervisor.listeners import banner, make_listener
from tlsgate.supervisor.signer import generate_leaf_key
from tlsgate.supervisor.signer_keeper import SignerInfo, SignerKeeper
from tlsgate.workers.eventpipe import PipeSource
from tlsgate.workers.events import (
    SIGNER_RESTART,
    SUBSCRIBER_CLOSED,
    SUPERVISOR_WORKER_ID,
    EventEmitter,
    EventQueue,
)
from tlsgate.workers.process import WorkerSpec, worker_main

TCP_MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


class Supervisor:
    def __init__(
        self,
        config: Config,
        passphrase: bytes | None,
        out: TextIO = sys.stderr,
        reload_config: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self._reload_config = reload_config
        self.passphrase = passphrase
        self.out = out
        self.mp = multiprocess.get_context("spawn")
        self.sources: dict[int, PipeSource] = {}
        self.steering: Any = None
        self.steering_state = {"state": "kernel-hash", "policy": "hash", "reason": ""}
        self._migrate_saved: str | None = None
        self._bound: tuple[str, int] | None = None
        self.signer: SignerKeeper | None = None
        self.metrics: Any = None
        self._checks: list[Any] = []

    def log(self, message: str) -> None:
        self.out.write(f"tlsgate: {message}\n")
        self.out.flush()

    # -- setup ---------------------------------------------------------------------------
    def _adopt_ca(self, info: SignerInfo) -> None:
        """The CA the signer reported (certificate, fingerprint, chain; never the key)."""
        self.ca, self.chain_pem = info, info.chain_pem

    def run(self) -> int:
        config = self.config = resolve_access(self.config)
        self.run_dir = runtime_dir(config.state_dir)
        self.leaf_key = generate_leaf_key()
        self.leaf_key_pem = self.leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public_pem = self.leaf_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        # first: the signer reads (on the first run: creates) the CA, which creates the
        # state directory 0700, then the runtime directory for its socket
        self.signer = SignerKeeper(self.mp, config.state_dir, self.passphrase, self.run_dir,
                                   public_pem, self.log)  # fmt: skip
        info = self.signer.start(create_ca=True)
        self._adopt_ca(info)
        self.ca_created = info.created
        try:
            return self._run()
        finally:
            self.signer.stop()

    def _run(self) -> int:
        from tlsgate.workers.bypass import LearnedBypass
        from tlsgate.workers.certcache import SharedCertificateCache

        config = self.config
        # management listeners' certificates are checked before anything else starts
        remote = self._remote_listener()
        self.metrics = self._metrics_server()
        self.run_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        # a writer of our own, to empty the cache (entries of an earlier run carry
        # another leaf key) now and at CA rotation
        self.cache = SharedCertificateCache(self.run_dir / "certcache")
        # always there (tiny), so that a reload can switch learning on
        self.learned = LearnedBypass.create(self.run_dir / "learned-bypass", config.learned_bypass)
        self.hub = EventHub(events_socket_path(config.state_dir), file_path=config.events_file,
                            gateway_id=f"{socket.gethostname()}:{os.getpid()}",
                            subscriber_buffer_bytes=config.events_subscriber_buffer,
                            remote=remote,
                            on_subscriber_closed=self._subscriber_closed)  # fmt: skip
        # the supervisor's own events (worker exits, lost subscribers): a source like a worker
        own_events = EventQueue()
        self.emitter = EventEmitter(SUPERVISOR_WORKER_ID, own_events)
        self.hub.add_source(own_events)
        self._create_client_counts()
        self.arbiter = Arbiter(
            config.workers,
            config.limits.drain_timeout,
            self._listener,
            self._spawn,
            self._on_slot_socket,
            self.log,
            report=self.emitter.emit,
            on_exit=self._worker_exited,
        )
        self._check_worker_user()
        self._prepare_pcap_dir()
        self._set_up_steering()
        self.control = ControlServer(control_socket_path(config.state_dir), self._control)
        self.rules: Any = None
        try:
            if config.intercept_ports:
                from tlsgate.supervisor.nftables import TransparentRules

                assert self._bound is not None
                self.rules = TransparentRules(
                    self._bound[1], config.intercept_ports, config.intercept_from
                )
                self.rules.install()
            self.hub.start()
            if config.events_group:
                # the group may traverse the runtime dir (0750) and use the socket (0660)
                gid = grp.getgrnam(config.events_group).gr_gid
                os.chown(self.run_dir, -1, gid)
                os.chown(events_socket_path(config.state_dir), -1, gid)
            self.control.start()
            if self.metrics is not None:
                self.metrics.start()
            self.arbiter.install_signals()
            first = self.arbiter.slots[0].listener
            banner(config, first.getsockname(), self.ca, self.ca_created, self.out)
            self.log(access_summary(config))
            if self.steering_state["reason"]:
                self.log(self.steering_state["reason"])
            self._announce_management()
            self.arbiter.run(on_reload=self._reload, tick=self._keep_signer)
        finally:
            if self.rules is not None:
                self.rules.remove()
            self.control.stop()
            if self.metrics is not None:
                self.metrics.stop()
            if self.steering is not None:
                self.steering.close()
            self._restore_migrate()
            self.hub.stop()
        return 0

    # -- management over TCP (mutual TLS, events CA) -------------------------------------
    def _mtls_context(self, listen: tuple[str, int], role: str, what: str) -> Any:
        from tlsgate.supervisor import mtls
        from tlsgate.supervisor.events_ca import listener_files, read_revoked

        config = self.config
        ca_file, cert, key, issued = listener_files(
            config.state_dir, listen[0], what, ca_file=config.events_remote_ca,
            cert_file=config.events_remote_cert, key_file=config.events_remote_key,
        )  # fmt: skip
        if issued:
            self.log(f"issued the server certificate {cert} from the events CA")
        check = mtls.ClientCheck(role, read_revoked(config.state_dir))
        self._checks.append(check)
        return mtls.server_context(ca_file, cert, key, check), check

    def _remote_listener(self) -> Any:
        from tlsgate.supervisor.eventhub import RemoteListener
        from tlsgate.supervisor.events_ca import ROLE_SUBSCRIBER

        listen = self.config.events_remote_listen
        if listen is None:
            return None
        context, check = self._mtls_context(listen, ROLE_SUBSCRIBER, "the remote events listener")
        return RemoteListener(listen, context, check)

    def _metrics_server(self) -> Any:
        from tlsgate.supervisor.events_ca import ROLE_SCRAPER
        from tlsgate.supervisor.metrics_http import MetricsServer

        listen = self.config.metrics_listen
        if listen is None:
            return None
        context = None
        if self.config.metrics_mtls:
            context, _ = self._mtls_context(listen, ROLE_SCRAPER, "the metrics endpoint")
        return MetricsServer(listen, lambda: prometheus_text(self.status()), context)

    def _announce_management(self) -> None:
        from tlsgate.paths import events_ca_dir

        remote = self.hub.remote_address
        if remote is not None:
            host, port = remote
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            ca_dir = events_ca_dir(self.config.state_dir)
            self.log(f"remote events: mutual TLS on {where} (client certificates: tlsgate "
                     f"events-ca issue-subscriber NAME --out DIR; CA {ca_dir})")  # fmt: skip
        if self.metrics is not None:
            host, port = self.metrics.bound
            scheme = "https" if self.metrics.context is not None else "http"
            self.log(f"metrics: {scheme}://{host}:{port}/metrics")

    def _reload_revocations(self) -> None:
        if not self._checks:
            return
        from tlsgate.supervisor.events_ca import read_revoked

        revoked = read_revoked(self.config.state_dir)
        for check in self._checks:
            check.revoked = revoked
        self.hub.set_revoked(revoked)

    def _prepare_pcap_dir(self) -> None:
        """The capture directory: created 0750, owned by the workers' user (they write it)."""
        path = self.config.pcap_dir
        if path is None:
            return
        path.mkdir(mode=0o750, parents=True, exist_ok=True)
        user = self.config.worker_user
        if user and os.geteuid() == 0:
            entry = pwd.getpwnam(user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _check_worker_user(self) -> None:
        """Fail at startup, not in a respawn loop, if workers could not run as their user."""
        user = self.config.worker_user
        if not user or os.geteuid() != 0:
            return
        entry = pwd.getpwnam(user)
        try:
            subprocess.run(
                [sys.executable, "-c", "import tlsgate.workers.worker"],
                user=entry.pw_uid, group=entry.pw_gid, extra_groups=[], cwd="/",
                capture_output=True, check=True, timeout=60,
            )  # fmt: skip
        except subprocess.CalledProcessError as exc:
            last = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-1:]
            raise OperatorError(
                f"workers cannot run as user {user!r} ({' '.join(last) or 'unknown error'}): "
                f"install tlsgate and its Python where {user!r} can read them (`make run` "
                "does), or choose another user with --worker-user"
            ) from None

    def _set_up_steering(self) -> None:
        from tlsgate.bpf import steering as bpf_steering

        mode, policy = self.config.steering, self.config.steering_policy
        if mode == "kernel":
            ok, reason = False, "disabled by --steering kernel"
        else:
            ok, reason = bpf_steering.availability()
        if ok:
            try:
                self.steering = bpf_steering.Steering.load(len(self.arbiter.slots), policy)
            except OperatorError as exc:
                ok, reason = False, str(exc)
        if not ok:
            if mode == "ebpf":
                raise OperatorError(f"--steering ebpf: eBPF steering is unavailable: {reason}")
            self.steering_state = {
                "state": "kernel-hash", "policy": "kernel-hash",
                "reason": f"warning: eBPF steering unavailable ({reason}); the kernel's "
                "reuseport hash steers connections instead",
            }  # fmt: skip
            self._enable_migrate()
            return
        for slot in self.arbiter.slots:
            self.steering.set_slot(slot.index, slot.listener)
        self.steering.attach(self.arbiter.slots[0].listener)
        self.steering_state = {"state": "ebpf", "policy": policy, "reason": ""}

    def _enable_migrate(self) -> None:
        """Without eBPF, let the kernel migrate queued connections of a closed listener."""
        try:
            self._migrate_saved = TCP_MIGRATE_REQ.read_text().strip()
            TCP_MIGRATE_REQ.write_text("1")
        except OSError:
            self._migrate_saved = None

    def _restore_migrate(self) -> None:
        if self._migrate_saved is not None:
            try:
                TCP_MIGRATE_REQ.write_text(self._migrate_saved)
            except OSError:
                pass  # nothing we can do at exit; the value is harmless
            self._migrate_saved = None

    def _listener(self, k: int) -> socket.socket:
        """Listener k of the reuseport group: all on the address the first one got
        (``--listen ...:0`` picks a free port once)."""
        if self._bound is None:
            sock = make_listener(self.config)
            self._bound = sock.getsockname()[:2]
            return sock
        return make_listener(replace(self.config, listen=self._bound))

    def _on_slot_socket(self, slot: Slot) -> None:
        if self.steering is not None:
            self.steering.set_slot(slot.index, slot.listener)

    # -- workers ------------------------------------------------------------------------------
    def _create_client_counts(self) -> None:
        """The gateway-wide per-client connection table (workers/clientcounts.py): zeroed
        shared memory with a row for each worker process, created before any worker."""
        from tlsgate.workers.clientcounts import (
            ROWS_PER_SLOT,
            ClientCounts,
            RowPool,
            new_key,
            table_words,
        )

        rows = ROWS_PER_SLOT * self.config.workers
        self.client_table = self.mp.Array("I", table_words(rows), lock=False)
        self.client_key = new_key()
        self.client_rows = RowPool(ClientCounts(self.client_table, rows, -1, self.client_key))

    def _worker_exited(self, proc: Any) -> None:
        """A worker process was reaped: its connections are gone, so are their counts."""
        self.client_rows.release(proc.pid)

    def _spawn(self, slot: Slot) -> None:
        row = self.client_rows.take()
        if row < 0:
            self.log(f"warning: worker {slot.index} counts connections per client alone: "
                     "every row of the shared table is held by a draining worker")  # fmt: skip
        mine, theirs = socket.socketpair()
        source = PipeSource(mine)
        source.start()
        self.hub.add_source(source)
        self.sources[slot.index] = source
        slot.stats = self.mp.Array("d", len(STATS_FIELDS), lock=False)
        spec = WorkerSpec(
            worker_id=slot.index,
            config=self.config,
            listener=slot.listener,
            events=theirs,
            signer_socket=self._signer().socket_path,
            signer=self._signer_connection(),
            cache_path=self.run_dir / "certcache",
            learned_path=self.run_dir / "learned-bypass",
            leaf_key_pem=self.leaf_key_pem,
            chain_pem=self.chain_pem,
            stats=slot.stats,
            worker_user=self.config.worker_user,
            load_fd=DupFd(self.steering.load_fd) if self.steering is not None else None,
            client_counts=self.client_table,
            client_rows=self.client_rows.table.rows,
            client_row=row,
            client_key=self.client_key,
        )
        proc = self.mp.Process(
            target=worker_main, args=(spec,), name=f"tlsgate-worker-{slot.index}"
        )
        try:
            proc.start()
        except BaseException:
            self.client_rows.give_back(row)  # no process will write it
            raise
        self.client_rows.assign(proc.pid, row)
        theirs.close()
        spec.signer.close()
        slot.process = proc

    def _signer(self) -> SignerKeeper:
        assert self.signer is not None
        return self.signer

    def _keep_signer(self) -> None:
        """The signer process died: a new one (BootFailure stops the gateway on a crash
        loop), an event, and new workers (who cannot reconnect by path after dropping
        root, and whose signer's path changed); see supervisor/signer_keeper.py."""
        if self.arbiter.stopping:
            return
        restart = self._signer().tick()
        if restart is None:
            return
        self.log(f"the signer restarted (pid {restart.pid}, down {restart.down_for:.1f} s); "
                 "replacing the workers")  # fmt: skip
        self.emitter.emit(SIGNER_RESTART, restart.event())
        for slot in self.arbiter.slots:
            self.arbiter.replace(slot, reason="signer restart")

    def _subscriber_closed(self, reason: str, undelivered: int, undelivered_bytes: int) -> None:
        """An IDS subscriber went away (hub thread): the others learn what it missed."""
        self.emitter.emit(SUBSCRIBER_CLOSED, {
            "reason": reason, "undelivered_events": undelivered,
            "undelivered_bytes": undelivered_bytes, "subscribers": self.hub.stats()["subscribers"],
        })  # fmt: skip

    def _signer_connection(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self._signer().socket_path))
        except OSError:
            # the signer is restarting: the worker gets a closed connection (its mints fail
            # closed) and is replaced once the signer serves again
            sock.close()
            sock, other = socket.socketpair()
            other.close()
        return sock

    def _reload(self) -> None:
        """New configuration and CA; the arbiter then replaces the workers one at a time."""
        if self._reload_config is not None:
            new = resolve_access(self._reload_config())  # a bad file raises: workers stay
            fixed = ("listen", "mode", "workers", "state_dir", "steering", "steering_policy",
                     "events_remote_listen", "events_remote_ca", "events_remote_cert",
                     "events_remote_key", "metrics_listen", "metrics_mtls")  # fmt: skip
            changed = [k for k in fixed if getattr(new, k) != getattr(self.config, k)]
            if changed:
                self.log(f"reload: {', '.join(changed)} cannot change while running; "
                         "restart the gateway for that (other settings apply now)")  # fmt: skip
                new = replace(new, **{k: getattr(self.config, k) for k in changed})
            self.config = new
        # a new signer process with the CA now on disk; the old one serves until it is
        # ready, and a CA that cannot be loaded fails the reload with the old one running
        info = self._signer().rotate()
        self.cache.clear()  # after the old signer stopped: nothing of the old CA stays
        self._adopt_ca(info)
        self._reload_revocations()

    # -- management ----------------------------------------------------------------------------
    def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "metrics":
            return {"ok": True, "text": prometheus_text(self.status())}
        if cmd in ("reload", "drain"):
            import threading

            done = threading.Event()
            box: dict[str, Any] = {}

            def reply(answer: Any) -> None:
                box["answer"] = answer
                done.set()

            self.arbiter.requests.put((cmd, request.get("worker"), reply))
            if not done.wait(120):
                return {"ok": False, "error": "timed out"}
            return dict(box["answer"])
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def _cache_status(self, workers: list[dict[str, Any]]) -> dict[str, Any]:
        """Certificate look-ups across workers: a hit is any look-up that needed no
        signature (this worker's contexts, or the shared cache)."""
        lookups = sum(w["cert_lookups"] for w in workers)
        minted = sum(w["minted"] for w in workers)
        shared = self.cache.stats()
        signer = self._signer().stats()
        return {
            "size": shared.get("size", 0),
            "lookups": lookups,
            "minted": minted,
            "hit_rate": (lookups - minted) / lookups if lookups else 0.0,
            "signatures": signer.get("signed", 0),
            "coalesced": signer.get("coalesced", 0),
        }

    def status(self) -> dict[str, Any]:
        counters = self.steering.counters() if self.steering is not None else None
        workers = []
        for slot in self.arbiter.slots:
            stats = dict(zip(STATS_FIELDS, slot.stats or [0.0] * len(STATS_FIELDS), strict=True))
            workers.append({
                "id": slot.index,
                "pid": slot.process.pid if slot.process is not None else None,
                "alive": bool(slot.process is not None and slot.process.is_alive()),
                "active": int(stats["active"]), "accepted": int(stats["accepted"]),
                "closed": int(stats["closed"]), "refused": int(stats["refused"]),
                "minted": int(stats["minted"]), "restarts": slot.restarts,
                "cert_lookups": int(stats["cert_lookups"]),
                "access_refused": int(stats["access_refused"]),
                "limit_hits": int(stats["limit_hits"]),
                "steered": counters["selected"][slot.index] if counters else None,
                "heartbeat_age": round(time.monotonic() - stats["beat"], 3),
            })  # fmt: skip
        host, port = self.arbiter.slots[0].listener.getsockname()[:2]
        return {
            "version": __version__,
            "mode": self.config.mode,
            "listen": f"{host}:{port}",
            "started": self.arbiter.started,
            "reloads": self.arbiter.reloads,
            "workers": workers,
            "steering": {
                **self.steering_state,
                "counters": counters,
                "prog_id": self.steering.prog_id if self.steering is not None else None,
            },
            "cache": self._cache_status(workers),
            "learned_bypass": {
                "enabled": self.config.learned_bypass.enabled,
                "entries": self.learned.entries(time.time()),
            },
            "events": self.hub.stats(),
            "metrics_endpoint": self.metrics.stats() if self.metrics is not None else None,
            "signer": self._signer().status(),
            "ca": {"fingerprint_sha256": self.ca.fingerprint_sha256},
            "client_counts": self._client_count_status(),
        }

    def _client_count_status(self) -> dict[str, Any]:
        """The shared per-client table: rows in use (one per worker process, draining ones
        included; none free means a new worker counts alone) and connections counted."""
        pool = self.client_rows
        limits = self.config.limits
        return {
            "rows": pool.table.rows,
            "rows_in_use": len(pool.owner),
            "counted": sum(pool.table.row_total(row) for row in pool.owner.values()),
            "max_connections_per_client": limits.max_connections_per_client,
            "client_ipv6_prefix": limits.client_ipv6_prefix,
        }


def prometheus_text(status: dict[str, Any]) -> str:
    """Status as Prometheus text exposition (version 0.0.4)."""
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP tlsgate_{name} {help_}")
        out.append(f"# TYPE tlsgate_{name} {kind}")
        out.extend(f"tlsgate_{name}{labels} {value:g}" for labels, value in samples)

    workers = status["workers"]
    per_worker = [(f'{{worker="{w["id"]}"}}', w) for w in workers]
    metric("connections_active", "gauge", "Open client connections.",
           [(lbl, w["active"]) for lbl, w in per_worker])  # fmt: skip
    metric("connections_accepted_total", "counter", "Client connections accepted.",
           [(lbl, w["accepted"]) for lbl, w in per_worker])  # fmt: skip
    metric("upstream_refused_total", "counter", "Upstreams refused by validation.",
           [(lbl, w["refused"]) for lbl, w in per_worker])  # fmt: skip
    metric("access_refused_total", "counter",
           "Clients refused by the allow-list, and CONNECTs to forbidden destinations.",
           [(lbl, w["access_refused"]) for lbl, w in per_worker])  # fmt: skip
    metric("limit_hits_total", "counter", "Connections that ran into a [limits] bound.",
           [(lbl, w["limit_hits"]) for lbl, w in per_worker])  # fmt: skip
    metric("certificates_minted_total", "counter", "Leaf certificates minted.",
           [(lbl, w["minted"]) for lbl, w in per_worker])  # fmt: skip
    metric("worker_restarts_total", "counter", "Worker restarts.",
           [(lbl, w["restarts"]) for lbl, w in per_worker])  # fmt: skip
    signer = status.get("signer")
    if signer is not None:
        metric("signer_restarts_total", "counter", "Signer process restarts.",
               [("", signer["restarts"])])  # fmt: skip
        metric("signer_up", "gauge", "1 while the signer process serves.",
               [("", 1.0 if signer["alive"] else 0.0)])  # fmt: skip
    if workers and workers[0].get("steered") is not None:
        metric("steered_total", "counter", "New connections the eBPF program sent to a worker.",
               [(lbl, w["steered"]) for lbl, w in per_worker])  # fmt: skip
    metric("steering_ebpf", "gauge", "1 when eBPF steering is active, 0 on the kernel hash.",
           [("", 1.0 if status["steering"]["state"] == "ebpf" else 0.0)])  # fmt: skip
    clients = status.get("client_counts")
    if clients is not None:
        metric("client_table_rows_in_use", "gauge",
               "Rows of the shared per-client table held by worker processes.",
               [("", clients["rows_in_use"])])  # fmt: skip
        metric("client_table_rows", "gauge", "Rows of the shared per-client table.",
               [("", clients["rows"])])  # fmt: skip
        metric("client_table_connections", "gauge",
               "Open connections counted in the shared per-client table.",
               [("", clients["counted"])])  # fmt: skip
    cache = status["cache"]
    metric("cert_cache_entries", "gauge", "Certificates in the shared cache.",
           [("", cache.get("size", 0))])  # fmt: skip
    learned = status.get("learned_bypass", {}).get("entries", [])
    metric("learned_bypass_entries", "gauge", "Names on the learned bypass list.",
           [("", len(learned))])  # fmt: skip
    events = status["events"]
    metric("events_produced_total", "counter", "Events received from workers.",
           [("", events.get("produced", 0))])  # fmt: skip
    metric("events_dropped_total", "counter", "Events dropped, by stage.",
           [(f'{{stage="{k}"}}', v) for k, v in events.get("dropped", {}).items()])  # fmt: skip
    metric("events_delivered_total", "counter", "Events written to subscribers (all).",
           [("", events.get("delivered", 0))])  # fmt: skip
    metric("event_subscribers", "gauge", "Detection stream subscribers (local and remote).",
           [("", events.get("subscribers", 0))])  # fmt: skip
    subs = [(f'{{subscriber="{s["id"]}",name="{_label(s["name"])}",transport="{s["transport"]}"}}',
             s) for s in events.get("per_subscriber", [])]  # fmt: skip
    metric("event_subscriber_delivered_total", "counter", "Events written to this subscriber.",
           [(lbl, s["delivered"]) for lbl, s in subs])  # fmt: skip
    metric("event_subscriber_dropped_total", "counter", "Events this subscriber missed (gaps).",
           [(lbl, s["dropped"]) for lbl, s in subs])  # fmt: skip
    metric("event_subscriber_buffered_bytes", "gauge", "Bytes waiting for this subscriber.",
           [(lbl, s["buffered_bytes"]) for lbl, s in subs])  # fmt: skip
    remote = events.get("remote")
    if remote is not None:
        metric("events_remote_refused_total", "counter",
               "Remote subscriber connections refused, by reason.",
               [(f'{{reason="{k}"}}', v) for k, v in remote["refused"].items()])  # fmt: skip
    endpoint = status.get("metrics_endpoint")
    if endpoint is not None:
        metric("metrics_requests_total", "counter", "Requests to this metrics endpoint.",
               [("", endpoint["requests"])])  # fmt: skip
        metric("metrics_refused_total", "counter", "Metrics connections refused, by reason.",
               [(f'{{reason="{k}"}}', v) for k, v in endpoint["refused"].items()])  # fmt: skip
    return "\n".join(out) + "\n"


def _label(value: str) -> str:
    """``value`` escaped for a Prometheus label value."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def run_supervisor(
    config: Config,
    passphrase: bytes | None,
    reload_config: Callable[[], Config] | None = None,
    out: TextIO = sys.stderr,
) -> int:
    return Supervisor(config, passphrase, out, reload_config).run()
