"""The chat page: ``/portal/chat`` (a new conversation) and ``/portal/chat/<id>``.

One page for both; ``chat.js`` loads the conversation through ``/portal/api/conversations``
(``chat_api``). An ID that is not the viewer's answers the same 404 page as one that never
existed.
"""

from __future__ import annotations

import asyncio

from quart import Response, request

from broker.chat.store import ID_PATTERN
from broker.portal import pages
from broker.portal.chat_common import MAX_SEARCH
from broker.portal.chat_send import MAX_MESSAGE
from broker.portal.common import portal_blueprint, viewer
from broker.portal.context import portal_context

bp = portal_blueprint("portal_chat", __name__)


@bp.get("/portal/chat")
async def chat_new() -> Response:
    return await _page("")


@bp.get("/portal/chat/<cid>")
async def chat_open(cid: str) -> Response:
    return await _page(cid)


async def _page(cid: str) -> Response:
    who = await viewer()
    if isinstance(who, Response):
        return who
    portal = portal_context()
    chat = portal.chat
    if cid and (
        chat is None
        or not ID_PATTERN.fullmatch(cid)
        or await asyncio.to_thread(chat.store.summary, who.user.user_id, cid) is None
    ):
        return pages.page(
            "error",
            404,
            title="No such conversation",
            what="This conversation does not exist, or it is not yours.",
            todo="Open one of your conversations from the chat page.",
            retry=False,
            user=who.user,
            csrf=who.csrf,
        )
    return pages.page(
        "chat",
        user=who.user,
        csrf=who.csrf,
        is_admin=portal.is_admin(who.user),
        models=await pages.live_models(portal.state),
        conversation=cid,
        day=request.args.get("day", "")[:10],
        max_message=MAX_MESSAGE,
        max_search=MAX_SEARCH,
        body_class="chat-body",
    )
