"""``/portal/api/conversations``: the chat page's JSON API (docs/chat.md).

Every route answers JSON; every POST needs the session's CSRF token in ``X-CSRF-Token``.
A conversation ID is checked for its shape before anything else, and a conversation of
another user answers exactly like one that does not exist (404). Content is never logged.
"""

from __future__ import annotations

import asyncio
import json
import time

from quart import Response, request
from werkzeug.exceptions import HTTPException

from broker.chat.export import as_markdown, as_openai, filename
from broker.chat.store import ID_PATTERN, Conversation, Summary
from broker.portal.chat_common import (
    MAX_SEARCH,
    ApiRefusal,
    chat_of,
    conversation_json,
    day_span,
    json_body,
    json_viewer,
    reply_json,
    summary_json,
)
from broker.portal.chat_send import send_message
from broker.portal.common import portal_blueprint
from shared.logging import get_logger

log = get_logger("broker.portal.chat")

bp = portal_blueprint("portal_chat_api", __name__, html_errors=False)
NOT_FOUND = "no such conversation"


@bp.errorhandler(ApiRefusal)
async def refused(exc: ApiRefusal) -> Response:
    return reply_json({"error": exc.message}, exc.status)


@bp.errorhandler(Exception)
async def unexpected(exc: Exception) -> Response:
    if isinstance(exc, HTTPException):  # a slow body (408), say: its status, as JSON
        return reply_json({"error": exc.description or exc.name}, exc.code or 500)
    log.exception("chat_api_error", error_type=type(exc).__name__)
    return reply_json({"error": "the portal hit an internal error; it has been logged"}, 500)


def _cid(value: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise ApiRefusal(404, NOT_FOUND)
    return value


async def _owned(user: str, cid: str) -> Conversation:
    found = await asyncio.to_thread(chat_of().store.get, user, _cid(cid))
    if found is None:
        raise ApiRefusal(404, NOT_FOUND)
    return found


@bp.get("/portal/api/conversations")
async def list_conversations() -> Response:
    who = await json_viewer(csrf=False)
    search = request.args.get("q", "")[:MAX_SEARCH]
    day = day_span(request.args.get("day"))
    rows: list[Summary] = await asyncio.to_thread(
        chat_of().store.summaries, who.user.user_id, search, day
    )
    return reply_json({"conversations": [summary_json(s) for s in rows]}, 200)


@bp.post("/portal/api/conversations")
async def create_conversation() -> Response:
    who = await json_viewer()
    body = await json_body()
    model = body.text("model", 256)
    title = body.text("title", 1000, required=False) or "new conversation"
    made = await asyncio.to_thread(
        chat_of().store.create, who.user.user_id, title, model, time.time()
    )
    return reply_json({"conversation": summary_json(made)}, 201)


@bp.post("/portal/api/conversations/delete-all")
async def delete_all() -> Response:
    who = await json_viewer()
    body = await json_body()
    if body.text("confirm", 64) != "delete all":
        raise ApiRefusal(400, 'send {"confirm": "delete all"} to delete every conversation')
    chat = chat_of()
    chat.replies.stop_user(who.user.user_id)
    gone = await asyncio.to_thread(chat.store.delete_all, who.user.user_id)
    log.info("chat_deleted_all", user=who.user.username, conversations=gone)
    return reply_json({"deleted": gone}, 200)


@bp.get("/portal/api/conversations/<cid>")
async def get_conversation(cid: str) -> Response:
    who = await json_viewer(csrf=False)
    found = await _owned(who.user.user_id, cid)
    busy = chat_of().replies.busy(found.summary.id)
    return reply_json(conversation_json(found, busy), 200)


@bp.post("/portal/api/conversations/<cid>/rename")
async def rename(cid: str) -> Response:
    who = await json_viewer()
    body = await json_body()
    title = body.text("title", 1000)
    done = await asyncio.to_thread(chat_of().store.rename, who.user.user_id, _cid(cid), title)
    if done is None:
        raise ApiRefusal(404, NOT_FOUND)
    return reply_json({"conversation": summary_json(done)}, 200)


@bp.post("/portal/api/conversations/<cid>/delete")
async def delete(cid: str) -> Response:
    who = await json_viewer()
    chat = chat_of()
    cid = _cid(cid)
    if not await asyncio.to_thread(chat.store.delete, who.user.user_id, cid, time.time()):
        raise ApiRefusal(404, NOT_FOUND)
    chat.replies.stop(cid)
    return reply_json({"deleted": cid}, 200)


@bp.post("/portal/api/conversations/<cid>/restore")
async def restore(cid: str) -> Response:
    who = await json_viewer()
    store = chat_of().store
    if not await asyncio.to_thread(store.restore, who.user.user_id, _cid(cid), time.time()):
        raise ApiRefusal(404, "nothing to undo: the conversation is gone for good")
    return reply_json({"restored": cid}, 200)


@bp.post("/portal/api/conversations/<cid>/clone")
async def clone(cid: str) -> Response:
    who = await json_viewer()
    body = await json_body()
    upto = body.integer("message")
    store = chat_of().store
    made = await asyncio.to_thread(store.clone, who.user.user_id, _cid(cid), upto, time.time())
    if made is None:
        raise ApiRefusal(404, "no such conversation or message")
    return reply_json({"conversation": summary_json(made)}, 201)


@bp.post("/portal/api/conversations/<cid>/messages")
async def post_message(cid: str) -> Response:
    who = await json_viewer()
    body = await json_body()
    found = await _owned(who.user.user_id, cid)
    return await send_message(who, found, body)


@bp.post("/portal/api/conversations/<cid>/stop")
async def stop(cid: str) -> Response:
    who = await json_viewer()
    found = await _owned(who.user.user_id, cid)
    stopped = chat_of().replies.stop(found.summary.id)
    return reply_json({"stopped": stopped}, 200)


@bp.get("/portal/api/conversations/<cid>/export")
async def export(cid: str) -> Response:
    who = await json_viewer(csrf=False)
    found = await _owned(who.user.user_id, cid)
    kind = request.args.get("format", "json")
    if kind == "md":
        body, media = as_markdown(found), "text/markdown; charset=utf-8"
    elif kind == "json":
        body, media = json.dumps(as_openai(found), indent=2), "application/json"
    else:
        raise ApiRefusal(400, "format is json or md")
    name = filename(found.summary, "md" if kind == "md" else "json")
    return Response(
        body,
        content_type=media,
        headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "Cache-Control": "no-store",  # personal content: never kept by a cache
        },
    )
