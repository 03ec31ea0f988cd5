"""Connector errors, converted where httpx errors enter (``broker_client``, ``upstream``).

Exception tree::

    ConnectorError
    ├── BrokerUnavailable   network error, timeout or 5xx: retry with backoff
    ├── BrokerRejected      bad token, protocol mismatch: retry slowly, tell the operator
    │   └── CertificateError    the broker's TLS certificate is not trusted (says by whom)
    ├── SessionLost         the broker forgot the session (404): register again
    └── LeaseLost           the request is no longer ours (409): stop working on it
"""

from __future__ import annotations


class ConnectorError(Exception):
    pass


class BrokerUnavailable(ConnectorError):
    pass


class BrokerRejected(ConnectorError):
    pass


class CertificateError(BrokerRejected):
    pass


class SessionLost(ConnectorError):
    pass


class LeaseLost(ConnectorError):
    pass
