"""Keeping the signer service alive.

The signer service (:class:`~tlsgate.supervisor.signer_service.SignerServer`) runs on a
thread of the supervisor. If that thread dies (its ``failure`` is set and logged),
:func:`revive` — called by the supervisor's loop every turn, about five times a second —
stops what is left of it and starts a new service with the same signer, cache and socket
path (the dead one's socket file is replaced). The supervisor then reports a
``signer_restart`` event and replaces the workers one at a time (no connection lost):
workers that dropped root cannot reconnect to the socket by path.

Meanwhile nothing hangs: a worker's signature request fails at once with
``SignerUnavailable`` (its connection to the dead service is closed), and the client of
that connection is refused with a TLS alert (``close_reason`` ``signer-unavailable``) —
fail closed, never a certificate from anywhere else. Cached certificates keep working.
"""

from __future__ import annotations

from tlsgate.supervisor.signer_service import SignerServer


def revive(server: SignerServer) -> tuple[SignerServer, str] | None:
    """A new running service in place of ``server`` if its thread died, and why it died;
    ``None`` while it runs. Raises OperatorError if the new one cannot start."""
    if server.running:
        return None
    failure = server.failure
    reason = f"{type(failure).__name__}: {failure}" if failure is not None else "its thread ended"
    server.stop()
    new = SignerServer(
        server.signer,
        server.cache,
        server.socket_path,
        socket_mode=server.socket_mode,
        owner_uid=server.owner_uid,
        owner_gid=server.owner_gid,
    )
    new.start()
    return new, reason
