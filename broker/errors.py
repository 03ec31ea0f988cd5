"""The one conversion of the broker's errors into answers, in the route's shape.

Every route family raises ``BrokerError`` (``broker.core.errors``: status, type, code,
message, headers); ``error_reply`` turns it, or any other exception (a 500 with a fixed
text), into status, headers and the OpenAI envelope. ``send_error`` writes that as ASGI
messages (the relayed API and the relay), ``error_response`` as a Quart response (the
model list, pages' JSON errors and the health port). ``StateUnavailable`` from wherever it
is raised (relay state, limiter, revocation board) is a 503 with ``Retry-After`` so.
The body's shape is OpenAI's unless the caller passes its route's
(``broker.core.route_shapes.shape_for``): Anthropic's on ``/v1/messages*``.
"""

from __future__ import annotations

from dataclasses import dataclass

from quart import Response

from broker.asgi import Send
from broker.core.errors import BrokerError
from broker.core.shape import OPENAI, RouteShape
from shared.protocol import REQUEST_ID_HEADER

__all__ = ["ErrorReply", "error_reply", "error_response", "send_error"]


@dataclass(frozen=True, slots=True)
class ErrorReply:
    status: int
    headers: dict[str, str]
    body: bytes


def error_reply(
    exc: BaseException, headers: dict[str, str] | None = None, shape: RouteShape = OPENAI
) -> ErrorReply:
    """Status, headers and body for ``exc``; ``headers`` (a request ID, say) are added."""
    error = exc if isinstance(exc, BrokerError) else BrokerError()
    merged = {**error.reply_headers(), **(headers or {})}
    return ErrorReply(error.status, merged, shape.error_body(error, merged.get(REQUEST_ID_HEADER)))


async def send_error(
    send: Send,
    exc: BaseException,
    headers: dict[str, str] | None = None,
    shape: RouteShape = OPENAI,
) -> None:
    """``error_reply`` as ASGI response messages."""
    reply = error_reply(exc, headers, shape)
    fields = {"content-type": "application/json", **reply.headers}
    fields["content-length"] = str(len(reply.body))
    encoded = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in fields.items()]
    await send({"type": "http.response.start", "status": reply.status, "headers": encoded})
    await send({"type": "http.response.body", "body": reply.body, "more_body": False})


def error_response(
    exc: BaseException, headers: dict[str, str] | None = None, shape: RouteShape = OPENAI
) -> Response:
    """``error_reply`` as a Quart response."""
    reply = error_reply(exc, headers, shape)
    response = Response(reply.body, status=reply.status, content_type="application/json")
    response.headers.update(reply.headers)
    return response
