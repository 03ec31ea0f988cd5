"""Sending a message: save it, start the broker's reply, stream what arrives to the page.

The user's message is saved before the model is called; the reply is written by
``broker.chat.replies`` (saved as it arrives). The page gets NDJSON lines: first the saved
message and the reply's id, then ``{"delta": text}`` per piece, then ``{"end": ...}``. If
the page goes away (reload, a phone losing its network) the reply is stopped, which
cancels the upstream and leaves what arrived saved and marked ``stopped``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import asdict

from quart import Response, request

from broker.accounts.users import KeyActionRefused, UserEntry, UsersFileError
from broker.chat.replies import Reply, ReplyJob
from broker.chat.store import Conversation
from broker.portal.chat_common import ApiRefusal, Body, chat_of
from broker.portal.common import Viewer
from broker.portal.context import portal_context
from shared.logging import get_logger
from shared.model_names import is_model_name

log = get_logger("broker.portal.chat")

CHAT_KEY = "chat"
MAX_MESSAGE = 32_000  # characters of one message the user writes
MAX_MESSAGES = 1000  # per conversation


async def chat_key_hash(user: UserEntry) -> str:
    """The SHA-256 of the user's key named "chat", made (or renewed when expired) here.

    Its secret is never shown or kept: the broker names the key by its hash in its own
    in-process requests. It carries the user's limits and key scope like any key."""
    portal = portal_context()
    key = user.key(CHAT_KEY)
    if key is None or key.is_expired(time.time()):
        try:
            await asyncio.to_thread(portal.users.regenerate_key, user.gitlab_id, CHAT_KEY, True)
        except (KeyActionRefused, UsersFileError) as exc:
            raise ApiRefusal(409, f"the chat cannot get its key: {exc}") from None
        log.info("portal_key_changed", action="chat", user=user.username)
        fresh = portal.users.user(user.gitlab_id)
        key = fresh.key(CHAT_KEY) if fresh is not None else None
        if key is None:
            raise ApiRefusal(409, "the chat cannot get its key; try again")
    return key.sha256


def history(found: Conversation, content: str) -> list[dict[str, str]]:
    """What the model is sent: the conversation's messages that have content (failed
    replies are left out), then the new message."""
    sent = [
        {"role": m.role, "content": m.content}
        for m in found.messages
        if m.content and m.state != "failed"
    ]
    return [*sent, {"role": "user", "content": content}]


async def send_message(who: Viewer, found: Conversation, body: Body) -> Response:
    chat = chat_of()
    model = body.text("model", 256)
    if not is_model_name(model):
        raise ApiRefusal(400, "model is not a model name")
    content = body.text("content", MAX_MESSAGE)
    cid = found.summary.id
    if len(found.messages) + 2 > MAX_MESSAGES:
        raise ApiRefusal(409, f"a conversation holds at most {MAX_MESSAGES} messages")
    if not chat.replies.claim(cid):
        raise ApiRefusal(409, "a reply is still being written in this conversation; stop it first")
    try:
        return await _send(who, found, model, content)
    finally:
        chat.replies.release(cid)  # a no-op once the reply started


async def _send(who: Viewer, found: Conversation, model: str, content: str) -> Response:
    chat = chat_of()
    cid, user = found.summary.id, who.user.user_id
    key_hash = await chat_key_hash(who.user)
    now = time.time()
    store = chat.store
    asked = await asyncio.to_thread(store.add_message, user, cid, "user", content, model, now)
    answer = await asyncio.to_thread(store.add_message, user, cid, "assistant", "", model, now)
    if asked is None or answer is None:
        raise ApiRefusal(404, "no such conversation")
    client = request.scope.get("client")
    job = ReplyJob(
        user=user,
        conversation=cid,
        message=answer,
        model=model,
        messages=history(found, content),
        key_hash=key_hash,
        client=tuple(client) if client else None,  # type: ignore[arg-type]
        forwarded_for=request.headers.get("X-Forwarded-For"),
    )
    reply = chat.replies.start(job)
    saved = await asyncio.to_thread(store.message, asked)
    first: dict[str, object] = {"user": asdict(saved) if saved else None, "reply": answer}
    response = Response(_lines(reply, first), content_type="application/x-ndjson")
    response.timeout = None  # a long answer is never cut by a framework default
    return response


async def _lines(reply: Reply, first: dict[str, object]) -> AsyncIterator[bytes]:
    try:
        yield _line(first)
        while True:
            event = await reply.events.get()
            yield _line(event)
            if "end" in event:
                return
    finally:
        # The page went away (or the stream ended): nobody reads the reply any more.
        if not reply.done.is_set():
            reply.stop()


def _line(event: dict[str, object]) -> bytes:
    return json.dumps(event).encode() + b"\n"
