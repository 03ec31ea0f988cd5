"""The broker's one exception tree: every error a client is answered with.

Each carries its HTTP status, OpenAI ``type`` and ``code``, the message and the headers
(``Retry-After`` from ``retry_after``); ``broker.errors.error_reply`` turns any of them
into the OpenAI envelope, once, at the edge of each route family.

BrokerError            status, code, type, message, param, headers (500 internal)
  DispatchError        an API request cannot be accepted (status, code on the class)
    UnknownModel       404 model_not_found
    NoConnector        503: the model is known but no live connector serves it
    QueueFull          503: too many requests already wait for the model
    Draining           503: the broker is shutting down
    StateUnavailable   503 + Retry-After: shared state (Redis) cannot be reached, anywhere
    DuplicateRequest   409: a request with the same x-request-id is in flight
  UnknownSession       404 session_unknown: expired, deregistered or not this identity's
    SessionReplaced    404 session_replaced: another process registered the same name
  LeaseError           409 lease_lost: the request is not leased to this session
  TooManySessions      429: the identity holds --max-sessions-per-identity live sessions
"""

from __future__ import annotations

import json
import math

from shared.errors import RemoteLLMError, error_body, type_for_status
from shared.protocol import SESSION_REPLACED, SESSION_UNKNOWN

INTERNAL = "internal error in the broker"
STATE_UNAVAILABLE = "the broker's shared state (Redis) is unavailable; retry shortly"


class BrokerError(RemoteLLMError):
    """An error the broker answers with (API, relay and enrollment routes alike)."""

    status = 500
    code = "internal"

    def __init__(
        self,
        status: int | None = None,
        message: str = INTERNAL,
        code: str | None = None,
        type_: str | None = None,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.message = message
        self.type = type_ or type_for_status(self.status)
        self.param = param
        self.headers = dict(headers or {})
        self.retry_after = retry_after

    def reply_headers(self) -> dict[str, str]:
        """The headers to answer with: the error's own and ``Retry-After`` when it has one."""
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers.setdefault("Retry-After", str(max(1, math.ceil(self.retry_after))))
        return headers

    def envelope(self) -> bytes:
        """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
        body = error_body(self.message, self.type, param=self.param, code=self.code)
        return json.dumps(body).encode()


class DispatchError(BrokerError):
    status = 503
    code = "unavailable"
    param: str | None = None

    def __init__(self, message: str) -> None:
        retry = 2.0 if self.status == 503 else None
        super().__init__(message=message, param=type(self).param, retry_after=retry)
        if self.status < 500:
            self.type = "invalid_request_error"


class UnknownModel(DispatchError):
    status = 404
    code = "model_not_found"
    param = "model"


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
    """Raised by a shared-state implementation where its store's errors enter.

    Whatever the store said, the client is told one fixed text (no Redis details).
    """

    status = 503
    code = "state_unavailable"

    def __init__(self, message: str = STATE_UNAVAILABLE) -> None:
        super().__init__(STATE_UNAVAILABLE)
        self.detail = message


class DuplicateRequest(DispatchError):
    """A client-chosen request ID must not take over another request in flight."""

    status = 409
    code = "duplicate_request_id"


class UnknownSession(BrokerError):
    status = 404
    code = SESSION_UNKNOWN
    text = "unknown session: register again"

    def __init__(self, session_id: str = "") -> None:
        super().__init__(message=self.text, type_="invalid_request_error")
        self.session_id = session_id


class SessionReplaced(UnknownSession):
    code = SESSION_REPLACED
    text = (
        "this session was replaced: another connector process registered the same name "
        "with the same token (give each connector its own --name)"
    )


class LeaseError(BrokerError):
    """An upload names a request this session does not hold."""

    status = 409
    code = "lease_lost"

    def __init__(self, request_id: str = "") -> None:
        super().__init__(
            message="this request is not leased to the session (it expired or was cancelled)",
            type_="invalid_request_error",
        )
        self.request_id = request_id


class TooManySessions(BrokerError):
    """A registration past the identity's cap of live sessions."""

    status = 429
    code = "too_many_sessions"

    def __init__(self, limit: int) -> None:
        super().__init__(
            message=(
                f"this connector token already holds {limit} live sessions (the broker's "
                "--max-sessions-per-identity): stop some connectors or give them their own "
                "tokens"
            )
        )


# What an API user is told when a connector ends a request with an error. The connector's
# own text never reaches them: it may name the local LLM's URL (and credentials in it).
CONNECTOR_FAILURES: dict[str, str] = {
    "upstream_unreachable": "the connector cannot reach the local LLM",
    "upstream_timeout": "the local LLM did not answer in time",
    "upstream_error": "the local LLM failed",
    "connector_error": "the connector failed while relaying the answer",
    "cancelled": "the connector stopped this request",
    # The upload that carried part of the answer was cut (its broker died): bytes may be
    # missing, so the answer ends here, as when the broker notices the cut itself.
    "connector_lost": "the upload carrying the answer was cut",
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
