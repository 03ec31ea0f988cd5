"""Connector errors, converted where httpx errors enter (``broker_client``, ``upstream``).

Exception tree::

    ConnectorError
    ├── BrokerUnavailable   network error, timeout or 5xx: retry with backoff
    ├── BrokerRejected      bad token, protocol mismatch: retry slowly, tell the operator
    │   └── CertificateError    the broker's TLS certificate is not trusted (says by whom)
    ├── EnrollmentRefused   enrollment off, rejected or revoked: say so and exit non-zero
    ├── SessionLost         the broker forgot the session (404): register again
    │   └── SessionReplaced     another process registered our name: warn, register later
    └── LeaseLost           the request is no longer ours (409): stop working on it
"""

from __future__ import annotations


class ConnectorError(Exception):
    pass


class BrokerUnavailable(ConnectorError):
    """``status``: the HTTP status, None when nothing answered; ``from_broker``: the answer
    was the broker's own (its JSON error), not a proxy's or a dropped connection."""

    def __init__(self, message: str, status: int | None = None, from_broker: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.from_broker = from_broker


class BrokerRejected(ConnectorError):
    pass


class CertificateError(BrokerRejected):
    pass


class EnrollmentRefused(ConnectorError):
    pass


class SessionLost(ConnectorError):
    pass


class SessionReplaced(SessionLost):
    pass


class LeaseLost(ConnectorError):
    pass
