"""What the relay core refuses, each error carrying the status the adapters answer with.

DispatchError          an API request cannot be accepted (status, code on the class)
  UnknownModel         404 model_not_found
  NoConnector          503: the model is known but no live connector serves it
  QueueFull            503: too many requests already wait for the model
  Draining             503: the broker is shutting down
  StateUnavailable     503: the shared relay state (Redis) cannot be reached
  DuplicateRequest     409: a request with the same x-request-id is in flight
UnknownSession         404 session_unknown: expired, deregistered or not this identity's
  SessionReplaced      404 session_replaced: another process registered the same name
LeaseError             409: the request is not leased to this session
TooManySessions        429: the identity holds --max-sessions-per-identity live sessions
"""

from __future__ import annotations

from shared.protocol import SESSION_REPLACED, SESSION_UNKNOWN


class DispatchError(Exception):
    status = 503
    code = "unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownModel(DispatchError):
    status = 404
    code = "model_not_found"


class NoConnector(DispatchError):
    status = 503
    code = "no_connector"


class QueueFull(DispatchError):
    status = 503
    code = "queue_full"


class Draining(DispatchError):
    status = 503
    code = "shutting_down"


class StateUnavailable(DispatchError):
    """Raised by a shared-state implementation where its store's errors enter."""

    status = 503
    code = "state_unavailable"


class DuplicateRequest(DispatchError):
    """A client-chosen request ID must not take over another request in flight."""

    status = 409
    code = "duplicate_request_id"


class UnknownSession(Exception):
    code = SESSION_UNKNOWN
    message = "unknown session: register again"


class SessionReplaced(UnknownSession):
    code = SESSION_REPLACED
    message = (
        "this session was replaced: another connector process registered the same name "
        "with the same token (give each connector its own --name)"
    )


class LeaseError(Exception):
    """An upload names a request this session does not hold."""


class TooManySessions(Exception):
    """A registration past the identity's cap of live sessions."""

    code = "too_many_sessions"

    def __init__(self, limit: int) -> None:
        self.message = (
            f"this connector token already holds {limit} live sessions (the broker's "
            "--max-sessions-per-identity): stop some connectors or give them their own tokens"
        )
        super().__init__(self.message)


# What an API user is told when a connector ends a request with an error. The connector's
# own text never reaches them: it may name the local LLM's URL (and credentials in it).
CONNECTOR_FAILURES: dict[str, str] = {
    "upstream_unreachable": "the connector cannot reach the local LLM",
    "upstream_timeout": "the local LLM did not answer in time",
    "upstream_error": "the local LLM failed",
    "connector_error": "the connector failed while relaying the answer",
    "cancelled": "the connector stopped this request",
}
CONNECTOR_FAILURE = "connector_failure"  # the code of an error type the broker does not know


def connector_failure(error_type: str | None, status: int | None) -> tuple[int, str, str]:
    """(status, code, message) for a connector's failed END frame: fixed texts only."""
    code = error_type or "upstream_error"
    message = CONNECTOR_FAILURES.get(code)
    if message is None:
        code, message = CONNECTOR_FAILURE, "the connector failed"
    # A failure is a failure: a connector cannot make it look like a success or a 4xx.
    if status is None or not (400 <= status <= 599) or (status < 500 and code != "cancelled"):
        status = 502
    return status, code, message
