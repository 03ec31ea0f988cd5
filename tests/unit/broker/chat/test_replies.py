"""The broker's own reply without sockets: a fake ASGI app stands in for the API relay.

What arrives is saved in batches (by size, or by time on a fake clock), Stop reaches the
relay as a hang-up, and how the reply ended (done, stopped, failed, its tokens and cost)
is saved. The SSE reader is checked on a stream cut at every byte.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from broker.chat.export import as_markdown, as_openai, filename
from broker.chat.replies import Replies, ReplyJob
from broker.chat.sse import StreamReader
from broker.chat.store import ChatStore
from broker.usage.prices import ModelPrice, PriceBook

T0 = 1_800_000_000.0
USER = "gitlab-1"


def sse(*chunks: dict[str, Any]) -> list[bytes]:
    return [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]


def delta(text: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}


class FakeApi:
    """Answers like the relay: a head, then body chunks; with ``hold``, waits for the hang-up."""

    def __init__(self, status: int, chunks: list[bytes], hold: bool = False) -> None:
        self.status, self.chunks, self.hold = status, chunks, hold
        self.scope: dict[str, Any] = {}
        self.body = b""
        self.hung_up = False
        self.sent_one = asyncio.Event()
        self.sent_all = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scope = scope
        self.body = (await receive())["body"]
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        for chunk in self.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            self.sent_one.set()
        self.sent_all.set()
        if self.hold:
            self.hung_up = (await receive())["type"] == "http.disconnect"
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@pytest.fixture
def store(tmp_path: Path) -> ChatStore:
    s = ChatStore(tmp_path / "chat.sqlite3")
    s.open()
    return s


def job(store: ChatStore) -> ReplyJob:
    cid = store.create(USER, "t", "m1", T0).id
    store.add_message(USER, cid, "user", "hi", "m1", T0)
    message = store.add_message(USER, cid, "assistant", "", "m1", T0)
    assert message is not None
    return ReplyJob(USER, cid, message, "m1", [{"role": "user", "content": "hi"}], "ab" * 32)


def prices() -> PriceBook:
    return PriceBook("EUR", {"m1": ModelPrice(input_per_million=1e6, output_per_million=2e6)})


async def test_a_reply_is_saved_with_its_usage_and_cost(store: ChatStore) -> None:
    api = FakeApi(200, sse(delta("hel"), delta("lo"), USAGE))
    replies = Replies(store, api, prices)
    j = job(store)
    reply = replies.start(j)
    await asyncio.wait_for(reply.done.wait(), 5)
    saved = store.message(j.message)
    assert saved is not None
    assert (saved.content, saved.state, saved.tokens_in, saved.tokens_out) == (
        "hello",
        "done",
        7,
        3,
    )
    assert (saved.cost, saved.currency, saved.estimated) == (13.0, "EUR", False)
    # The request the relay saw: the key by its hash in the scope, never in a header.
    assert api.scope["extensions"] == {"remotellm.key_sha256": "ab" * 32}
    assert not any(name == b"authorization" for name, _ in api.scope["headers"])
    body = json.loads(api.body)
    assert body["stream"] is True and body["messages"] == j.messages
    events = [reply.events.get_nowait() for _ in range(reply.events.qsize())]
    assert [e.get("delta") for e in events[:2]] == ["hel", "lo"]
    assert events[-1]["end"]["state"] == "done"  # type: ignore[index]
    assert not replies.busy(j.conversation)


async def test_stop_hangs_up_and_leaves_the_partial_reply_saved_as_stopped(
    store: ChatStore,
) -> None:
    api = FakeApi(200, sse(delta("part"))[:1], hold=True)
    replies = Replies(store, api, lambda: None)
    j = job(store)
    reply = replies.start(j)
    await asyncio.wait_for(api.sent_one.wait(), 5)
    assert replies.busy(j.conversation)
    assert replies.stop(j.conversation)
    await asyncio.wait_for(reply.done.wait(), 5)
    assert api.hung_up
    saved = store.message(j.message)
    assert saved is not None
    assert (saved.content, saved.state, saved.tokens_out, saved.estimated) == (
        "part",
        "stopped",
        1,
        True,
    )
    assert not replies.stop(j.conversation)


async def test_a_refusal_is_saved_as_failed_with_its_message(store: ChatStore) -> None:
    error = json.dumps({"error": {"message": "Rate limit reached", "type": "x"}}).encode()
    replies = Replies(store, FakeApi(429, [error]), lambda: None)
    j = job(store)
    await asyncio.wait_for(replies.start(j).done.wait(), 5)
    saved = store.message(j.message)
    assert saved is not None and (saved.state, saved.error) == ("failed", "Rate limit reached")


async def test_writes_are_batched_by_size_and_by_time(store: ChatStore) -> None:
    now = [0.0]
    api = FakeApi(200, sse(*(delta("x" * 10) for _ in range(10)))[:10], hold=True)
    replies = Replies(
        store, api, lambda: None, flush_every=0.5, flush_bytes=35, clock=lambda: now[0]
    )
    j = job(store)
    reply = replies.start(j)
    await asyncio.wait_for(api.sent_all.wait(), 5)  # each send awaited its flush
    saved = store.message(j.message)
    assert saved is not None and len(saved.content) == 80  # two flushes of 40, 20 pending
    now[0] = 1.0  # the clock moves on: the next piece flushes by time
    replies.stop(j.conversation)
    await asyncio.wait_for(reply.done.wait(), 5)
    final = store.message(j.message)
    assert final is not None and len(final.content) == 100


def test_the_stream_reader_reads_the_same_whatever_the_cuts() -> None:
    raw = b"".join(sse(delta("h\u00e9"), delta("llo"), USAGE)).replace(b"\n", b"\r\n")
    for cut in range(1, len(raw)):
        reader = StreamReader()
        text = reader.feed(raw[:cut]) + reader.feed(raw[cut:])
        assert text == "h\u00e9llo", cut
        assert (reader.tokens_in, reader.tokens_out, reader.deltas) == (7, 3, 2)
    broken = StreamReader()
    broken.feed(b'data: {"error": {"message": "upstream died"}}\n\n')
    assert broken.error == "upstream died"


def test_exports(store: ChatStore) -> None:
    j = job(store)
    store.append(j.message, "**hi** back")
    found = store.get(USER, j.conversation)
    assert found is not None
    doc = as_openai(found)
    assert [(m["role"], m["content"]) for m in doc["messages"]] == [  # type: ignore[attr-defined]
        ("user", "hi"),
        ("assistant", "**hi** back"),
    ]
    md = as_markdown(found)
    assert md.startswith("# t\n") and "## assistant (m1)" in md and "**hi** back" in md
    assert filename(found.summary, "md") == "t.md"
