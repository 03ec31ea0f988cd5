"""The broker writes a chat reply itself: one in-process request through the API relay.

A ``Reply`` is one assistant message being written. It calls the same ASGI handler that
serves ``POST /v1/chat/completions`` (so the key's checks, limits, ledger, metrics,
aliases and cancel are the API's own), with the user's ``chat`` key named by its hash in
the scope's extensions, which no network request can set (docs/chat.md). What arrives is
appended to the store in batches (every ``flush_every`` seconds or ``flush_bytes``) and
passed to whoever watches (the page's request). ``stop()`` ends the request the way a
hung-up API user does: the relay cancels the upstream, so the GPU stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from broker.accounts.keys import INTERNAL_KEY_HASH
from broker.chat.sse import StreamReader, error_message
from broker.chat.store import ChatStore, ReplyEnd
from broker.usage.prices import PriceBook
from shared.logging import get_logger

log = get_logger("broker.chat")

Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[Message]],
        Callable[[Message], Awaitable[None]],
    ],
    Awaitable[None],
]
SERVED_MODEL_HEADER = b"x-remotellm-served-model"
MAX_ERROR_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class ReplyJob:
    user: str  # the conversation's owner (the ledger's user id)
    conversation: str
    message: int  # the assistant message being written
    model: str
    messages: list[dict[str, str]]  # the OpenAI messages sent
    key_hash: str  # the user's chat key, by its SHA-256
    client: tuple[str, int] | None = None  # the browser's address, for the ledger
    forwarded_for: str | None = None


@dataclass(slots=True)
class Reply:
    job: ReplyJob
    events: asyncio.Queue[dict[str, object]] = field(default_factory=asyncio.Queue)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    status: int = 0
    served: str | None = None
    reader: StreamReader = field(default_factory=StreamReader)
    error_body: bytearray = field(default_factory=bytearray)

    def stop(self) -> None:
        self.stopped.set()


class Replies:
    """The replies this broker is writing, by conversation (one at a time per conversation)."""

    def __init__(
        self,
        store: ChatStore,
        api: ASGIApp,
        prices: Callable[[], PriceBook | None],
        *,
        flush_every: float = 0.5,
        flush_bytes: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.api = api
        self.prices = prices
        self.flush_every = flush_every
        self.flush_bytes = flush_bytes
        self.clock = clock
        self._running: dict[str, Reply] = {}
        self._claimed: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def busy(self, conversation: str) -> bool:
        return conversation in self._running or conversation in self._claimed

    def claim(self, conversation: str) -> bool:
        """Reserve the conversation for one reply (False if one is on its way already);
        ``start`` takes the claim over, ``release`` gives it back."""
        if self.busy(conversation):
            return False
        self._claimed.add(conversation)
        return True

    def release(self, conversation: str) -> None:
        self._claimed.discard(conversation)

    def start(self, job: ReplyJob) -> Reply:
        reply = Reply(job)
        self._claimed.discard(job.conversation)
        self._running[job.conversation] = reply
        task = asyncio.create_task(self._run(reply), name="chat-reply")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return reply

    def stop(self, conversation: str) -> bool:
        reply = self._running.get(conversation)
        if reply is None:
            return False
        reply.stop()
        return True

    def stop_user(self, user: str) -> int:
        """Stop every reply of ``user`` (they deleted all their conversations)."""
        mine = [r for r in self._running.values() if r.job.user == user]
        for reply in mine:
            reply.stop()
        return len(mine)

    async def close(self) -> None:
        """At shutdown: every reply stopped (saved as ``stopped``) and waited for."""
        for reply in list(self._running.values()):
            reply.stop()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10.0)

    async def _run(self, reply: Reply) -> None:
        job = reply.job
        writer = _Writer(self.store, job.message, self.flush_every, self.flush_bytes, self.clock)
        try:
            await self.api(_scope(job), _receiver(job, reply), _sender(reply, writer))
        except Exception as exc:  # the relay answers its own errors; this is a bug
            log.exception("chat_reply_failed", error_type=type(exc).__name__)
            reply.reader.error = "the broker failed writing this reply"
        finally:
            end = self._end(reply)
            with contextlib.suppress(Exception):
                await writer.flush()
                await asyncio.to_thread(self.store.finish, job.message, end)
            self._running.pop(job.conversation, None)
            reply.done.set()
            reply.events.put_nowait({"end": _end_event(end)})

    def _end(self, reply: Reply) -> ReplyEnd:
        reader, job = reply.reader, reply.job
        if reply.status and reply.status != 200:
            return ReplyEnd("failed", error=error_message(bytes(reply.error_body)))
        state = "done"
        if reply.stopped.is_set():
            state = "stopped"
        elif reader.error is not None or not reply.status:
            state = "failed"
        model = reply.served or job.model
        estimated = reader.tokens_out is None
        tokens_out = reader.tokens_out if reader.tokens_out is not None else reader.deltas
        cost, currency = None, None
        prices = self.prices()
        if prices is not None and reader.tokens_in is not None:
            priced = prices.cost(model, reader.tokens_in, tokens_out)
            if priced is not None:
                cost, currency = priced.total, prices.currency
        return ReplyEnd(
            state, model, reader.tokens_in, tokens_out, estimated, cost, currency, reader.error
        )


class _Writer:
    """Appends what arrived to the store, in batches."""

    def __init__(
        self,
        store: ChatStore,
        message: int,
        every: float,
        size: int,
        clock: Callable[[], float],
    ) -> None:
        self.store, self.message, self.every, self.size, self.clock = (
            store,
            message,
            every,
            size,
            clock,
        )
        self.pending: list[str] = []
        self.pending_bytes = 0
        self.last = clock()

    async def add(self, text: str) -> None:
        self.pending.append(text)
        self.pending_bytes += len(text)
        if self.pending_bytes >= self.size or self.clock() - self.last >= self.every:
            await self.flush()

    async def flush(self) -> None:
        self.last = self.clock()
        if not self.pending:
            return
        text = "".join(self.pending)
        self.pending, self.pending_bytes = [], 0
        await asyncio.to_thread(self.store.append, self.message, text)


def _scope(job: ReplyJob) -> dict[str, Any]:
    body_len = str(len(_body(job))).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", body_len)]
    if job.forwarded_for:
        headers.append((b"x-forwarded-for", job.forwarded_for.encode("latin-1", "replace")))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": job.client,
        "server": None,
        "extensions": {INTERNAL_KEY_HASH: job.key_hash},
    }


def _body(job: ReplyJob) -> bytes:
    return json.dumps(
        {
            "model": job.model,
            "messages": job.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


def _receiver(job: ReplyJob, reply: Reply) -> Callable[[], Awaitable[Message]]:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": _body(job), "more_body": False}
        await reply.stopped.wait()  # Stop, or the page went away: like an API user hanging up
        return {"type": "http.disconnect"}

    return receive


def _sender(reply: Reply, writer: _Writer) -> Callable[[Message], Awaitable[None]]:
    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            reply.status = int(message["status"])
            for name, value in message.get("headers", []):
                if name == SERVED_MODEL_HEADER:
                    reply.served = bytes(value).decode("latin-1")
            return
        if message["type"] != "http.response.body":
            return
        body: bytes = message.get("body", b"")
        if reply.status != 200:
            if len(reply.error_body) < MAX_ERROR_BODY:
                reply.error_body += body[:MAX_ERROR_BODY]
            return
        text = reply.reader.feed(body)
        if text:
            await writer.add(text)
            reply.events.put_nowait({"delta": text})

    return send


def _end_event(end: ReplyEnd) -> dict[str, object]:
    return {
        "state": end.state,
        "model": end.model,
        "tokens_in": end.tokens_in,
        "tokens_out": end.tokens_out,
        "estimated": end.estimated,
        "cost": end.cost,
        "currency": end.currency,
        "error": end.error,
    }
