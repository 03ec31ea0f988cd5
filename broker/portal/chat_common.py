"""What the chat's API routes share: who is asking, the checked JSON body, the JSON shapes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime

from quart import Response, request

from broker.chat import Chat
from broker.chat.store import Conversation, Summary
from broker.portal.common import Viewer
from broker.portal.context import portal_context
from broker.portal.csrf import HEADER, csrf_ok, csrf_token

MAX_SEARCH = 200


class ApiRefusal(Exception):
    """A refused API call: its status and the message the page shows."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def chat_of() -> Chat:
    chat = portal_context().chat
    if chat is None:
        raise ApiRefusal(404, "the chat is not available on this broker")
    return chat


async def json_viewer(*, csrf: bool = True) -> Viewer:
    """The logged-in, unblocked user; with ``csrf``, only with this session's token."""
    portal = portal_context()
    session = await portal.session()
    user = portal.users.user(session.gitlab_id) if session else None
    if session is None or user is None:
        raise ApiRefusal(401, "not logged in; reload the page")
    if user.blocked:
        raise ApiRefusal(403, "this user is blocked")
    secret = portal.cookies.secret
    if csrf and not csrf_ok(secret, session, request.headers.get(HEADER)):
        raise ApiRefusal(403, "bad CSRF token; reload the page")
    return Viewer(session, user, csrf_token(secret, session))


@dataclass(frozen=True, slots=True)
class Body:
    """A JSON object sent by the page, read field by field with bounds."""

    data: dict[str, object]

    def text(self, name: str, limit: int, *, required: bool = True) -> str:
        value = self.data.get(name)
        if value is None and not required:
            return ""
        if not isinstance(value, str) or (required and not value.strip()):
            raise ApiRefusal(400, f"{name} must be a non-empty string")
        if len(value) > limit:
            raise ApiRefusal(413, f"{name} is too long ({len(value)} characters; at most {limit})")
        return value

    def integer(self, name: str) -> int:
        value = self.data.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**62:
            raise ApiRefusal(400, f"{name} must be a message id")
        return value


async def json_body() -> Body:
    raw = await request.get_data(cache=True)
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise ApiRefusal(400, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise ApiRefusal(400, "the body must be a JSON object")
    return Body(data)


def day_span(value: str | None) -> tuple[float, float] | None:
    """A UTC day ``YYYY-MM-DD`` as (start, end) in epoch seconds; None when not given."""
    if not value:
        return None
    try:
        day = date.fromisoformat(value[:10])
    except ValueError:
        raise ApiRefusal(400, "day is YYYY-MM-DD") from None
    start = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
    return start, start + 86400


def reply_json(body: dict[str, object], status: int) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def summary_json(summary: Summary) -> dict[str, object]:
    return asdict(summary)


def conversation_json(found: Conversation, busy: bool) -> dict[str, object]:
    messages = [asdict(m) for m in found.messages]
    replies = [m for m in found.messages if m.role == "assistant"]
    costs = [m.cost for m in replies if m.cost is not None]
    currencies = {m.currency for m in replies if m.currency}
    totals = {
        "tokens_in": sum(m.tokens_in or 0 for m in replies),
        "tokens_out": sum(m.tokens_out or 0 for m in replies),
        "cost": sum(costs) if costs else None,
        "currency": currencies.pop() if len(currencies) == 1 else None,
    }
    return {
        "conversation": summary_json(found.summary),
        "messages": messages,
        "totals": totals,
        "busy": busy,
    }
