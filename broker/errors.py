"""The one conversion of the broker's errors into OpenAI-shaped answers.

Every route family raises ``BrokerError`` (``broker.core.errors``: status, type, code,
message, headers); ``error_reply`` turns it, or any other exception (a 500 with a fixed
text), into status, headers and the OpenAI envelope. ``send_error`` writes that as ASGI
messages (the relayed API and the relay), ``error_response`` as a Quart response (the
model list, pages' JSON errors and the health port). ``StateUnavailable`` from wherever it
is raised (relay state, limiter, revocation board) is a 503 with ``Retry-After`` so.
"""

from __future__ import annotations

from dataclasses import dataclass

from quart import Response

from broker.asgi import Send
from broker.core.errors import BrokerError

__all__ = ["ErrorReply", "error_reply", "error_response", "send_error"]


@dataclass(frozen=True, slots=True)
class ErrorReply:
    status: int
    headers: dict[str, str]
    body: bytes


def error_reply(exc: BaseException, headers: dict[str, str] | None = None) -> ErrorReply:
    """Status, headers and body for ``exc``; ``headers`` (a request ID, say) are added."""
    error = exc if isinstance(exc, BrokerError) else BrokerError()
    merged = {**error.reply_headers(), **(headers or {})}
    return ErrorReply(error.status, merged, error.envelope())


async def send_error(send: Send, exc: BaseException, headers: dict[str, str] | None = None) -> None:
    """``error_reply`` as ASGI response messages."""
    reply = error_reply(exc, headers)
    fields = {"content-type": "application/json", **reply.headers}
    fields["content-length"] = str(len(reply.body))
    encoded = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in fields.items()]
    await send({"type": "http.response.start", "status": reply.status, "headers": encoded})
    await send({"type": "http.response.body", "body": reply.body, "more_body": False})


def error_response(exc: BaseException, headers: dict[str, str] | None = None) -> Response:
    """``error_reply`` as a Quart response."""
    reply = error_reply(exc, headers)
    response = Response(reply.body, status=reply.status, content_type="application/json")
    response.headers.update(reply.headers)
    return response
