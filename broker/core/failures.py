"""The relay's one table of outcomes: how a request fails, how a submit is refused, why a
session ends.

The in-memory core (``broker.core.relay``), the Redis state's Python side
(``broker.state.redis``) and its Lua scripts (``broker.state.redis.scripts`` renders these
texts into the script source at import) all take them from here, so a status, code or
text is changed in one place. ``tests/unit/broker/core/test_failures.py`` checks that the
Redis side holds no copy.
"""

from __future__ import annotations

from broker.core.errors import (
    DispatchError,
    Draining,
    DuplicateRequest,
    NoConnector,
    QueueFull,
    UnknownModel,
)
from broker.core.records import Failure
from shared.errors import quote

# -- how a request ends without a response from its connector --------------------------
# name -> (status, code, message); ``{reason}`` is a ``DROP_REASONS`` text.
FAILURES: dict[str, Failure] = {
    "queue_timeout": Failure(503, "queue_timeout", "no connector became free in time"),
    "too_long": Failure(504, "timeout", "the request took too long"),
    "no_head": Failure(504, "timeout", "the local LLM did not answer in time"),
    "stalled": Failure(504, "timeout", "the response stalled"),
    "lost_mid_response": Failure(502, "connector_lost", "the connector went away mid-response"),
    "unanswered": Failure(502, "connector_lost", "no connector answered the request"),
    "connector_gone": Failure(502, "connector_lost", "the connector went away ({reason})"),
    "upload_broker_gone": Failure(
        502, "connector_lost", "the broker carrying the upload went away"
    ),
    # Redis mode: the shared state went away under the requests this broker holds.
    "state_unavailable": Failure(
        503, "state_unavailable", "the relay state (Redis) is unavailable; retry shortly"
    ),
}

QUEUE_TIMEOUT = FAILURES["queue_timeout"]
TOO_LONG = FAILURES["too_long"]
NO_HEAD = FAILURES["no_head"]
STALLED = FAILURES["stalled"]
LOST_MID_RESPONSE = FAILURES["lost_mid_response"]
UNANSWERED = FAILURES["unanswered"]
UPLOAD_BROKER_GONE = FAILURES["upload_broker_gone"]
STATE_UNAVAILABLE = FAILURES["state_unavailable"]

# -- why a session ends (in the "connector_gone" failure and the session_closed log) -----
DROP_REASONS: dict[str, str] = {
    "registered_again": "connector registered again",
    "stopped": "connector stopped",
    "expired": "session expired",
}
REGISTERED_AGAIN = DROP_REASONS["registered_again"]
STOPPED = DROP_REASONS["stopped"]
EXPIRED = DROP_REASONS["expired"]


def connector_gone(reason: str) -> Failure:
    """The connector serving the request went away for ``reason``."""
    template = FAILURES["connector_gone"]
    return Failure(template.status, template.code, template.message.format(reason=reason))


# -- how a submit is refused: name -> (error class, message; ``{model}`` is quoted) -------
REFUSALS: dict[str, tuple[type[DispatchError], str]] = {
    "draining": (Draining, "the broker is shutting down"),
    "unknown": (UnknownModel, "The model '{model}' does not exist"),
    "noconn": (NoConnector, "no connector serving model '{model}' is online"),
    "dup": (
        DuplicateRequest,
        "a request with this x-request-id is in flight: send a unique one, or none",
    ),
    "full": (QueueFull, "too many requests waiting for model '{model}'"),
}


def refusal(name: str, model: str = "") -> DispatchError:
    """The error a refused submit answers with (``name``: a ``REFUSALS`` key)."""
    cls, template = REFUSALS[name]
    return cls(template.format(model=quote(model)))
