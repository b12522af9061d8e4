"""The exceptions tlsgate raises, split by who is at fault.

- :class:`OperatorError`: something the operator must fix (configuration, CA files,
  permissions). Its message says what to do; the CLI prints it as one line and exits 2.
- :class:`RemoteProtocolError`: a peer (client or upstream server) sent bytes that break
  the protocol. Parsers raise exactly one subclass of it; the worker turns it into an
  event and closes that one connection, never the gateway.
"""

from __future__ import annotations


class TlsgateError(Exception):
    """Base of every error tlsgate raises on purpose."""


class OperatorError(TlsgateError):
    """The operator must act: the message says what happened and what to do."""


class ConfigError(OperatorError):
    """A configuration value (file or flag) is invalid."""


class CAError(OperatorError):
    """The CA certificate or key is missing, unsafe, or unusable."""


class RemoteProtocolError(TlsgateError):
    """A peer sent bytes that violate the protocol being parsed."""


class ClientHelloError(RemoteProtocolError):
    """The bytes are not a well-formed TLS ClientHello."""


class ConnectRequestError(RemoteProtocolError):
    """The bytes are not an acceptable HTTP CONNECT request."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        #: HTTP status to answer the client with.
        self.status = status


class ConnectLimitExceeded(ConnectRequestError):
    """A CONNECT request went beyond a configured bound (``limit`` names the setting)."""

    def __init__(self, message: str, status: int, limit: str) -> None:
        super().__init__(message, status)
        #: the ``[limits]`` setting that was exceeded, e.g. ``"max_connect_header_bytes"``
        self.limit = limit


class HttpProtocolError(RemoteProtocolError):
    """HTTP/1.1 bytes inside an intercepted connection could not be parsed."""


class HttpLimitExceeded(HttpProtocolError):
    """A peer's HTTP message went beyond a configured bound (``limit`` names the setting)."""

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        #: the ``[limits]`` setting that was exceeded, e.g. ``"max_header_count"``
        self.limit = limit


class UpstreamRefused(TlsgateError):
    """The upstream server failed validation; the client must be refused.

    ``reason`` is one operator-readable line (e.g. the OpenSSL verify error in words),
    ``category`` a stable token for events (``expired``, ``hostname-mismatch``, ...).
    """

    def __init__(self, category: str, reason: str) -> None:
        super().__init__(f"{category}: {reason}")
        self.category = category
        self.reason = reason
