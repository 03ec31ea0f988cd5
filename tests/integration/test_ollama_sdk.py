"""Ollama's native API through the relay, driven by the ``ollama`` Python package.

A real broker and connector (in process) in front of ``FakeLLM(ollama=True)``, which
speaks Ollama's API as docs/clients.md records it; the connector detects the engine
(``GET /api/version`` and ``/api/tags``) and the broker relays ``/api/*`` to it only.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import ollama
import pytest

from broker.usage.query import RequestRow, recent_requests
from shared.bench.ollama_fake import PROMPT_EVAL_COUNT
from shared.bench.upstream import FakeLLM
from tests.support.net import wait_for
from tests.support.stack import (
    USER_KEY,
    RunningBroker,
    RunningConnector,
    start_broker,
    start_connector,
)

AUTH = {"Authorization": f"Bearer {USER_KEY}"}
MODEL = "llama3.2:latest"
WORDS = "tok0 tok1 tok2 tok3 tok4 "


@dataclass
class OllamaStack:
    fake: FakeLLM
    broker: RunningBroker
    connector: RunningConnector
    clients: list[ollama.AsyncClient] = field(default_factory=list)

    def client(self, headers: dict[str, str] | None = None) -> ollama.AsyncClient:
        made = ollama.AsyncClient(
            host=self.broker.url, headers=AUTH if headers is None else headers, timeout=30.0
        )
        self.clients.append(made)
        return made

    def rows(self) -> list[RequestRow]:
        return list(reversed(recent_requests(self.broker.settings.usage_path)))


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[OllamaStack]:
    fake = FakeLLM(models=[MODEL, "all-minilm"], ollama=True)
    await fake.start()
    broker = await start_broker(tmp_path / "b")
    connector = await start_connector(broker.url, fake.url, name="ollama-box")
    running = OllamaStack(fake, broker, connector)
    try:
        yield running
    finally:
        for client in running.clients:
            await client.close()
        if not connector.task.done():  # a test may have stopped or killed it
            await connector.stop()
        await broker.stop()  # flushes the ledger
        await fake.stop()


@pytest.mark.both_states
async def test_the_connector_reports_its_engine(stack: OllamaStack) -> None:
    view = await stack.broker.view()
    (session,) = view.sessions.values()
    assert session.engine == "ollama/0.6.2"
    listed = await stack.client().list()  # built from the sessions (Redis: their hashes)
    assert sorted(m.model or "" for m in listed.models) == ["all-minilm", MODEL]
    parts = [p async for p in await stack.client().generate(model=MODEL, prompt="hi", stream=True)]
    assert "".join(p.response for p in parts) == WORDS


async def test_chat_generate_embed_and_show(stack: OllamaStack) -> None:
    client = stack.client()
    messages = [{"role": "user", "content": "hello"}]
    parts = [p async for p in await client.chat(model=MODEL, messages=messages, stream=True)]
    assert "".join(p.message.content or "" for p in parts) == WORDS
    assert parts[-1].done and parts[-1].eval_count == 5
    whole = await client.chat(model=MODEL, messages=messages, stream=False)
    assert whole.message.content == WORDS and whole.prompt_eval_count == PROMPT_EVAL_COUNT
    pieces = [p async for p in await client.generate(model=MODEL, prompt="tokens:3", stream=True)]
    assert "".join(p.response for p in pieces) == "tok0 tok1 tok2 "
    generated = await client.generate(model=MODEL, prompt="tokens:4")
    assert generated.response == "tok0 tok1 tok2 tok3 " and generated.eval_count == 4
    embedded = await client.embed(model="all-minilm", input=["a", "b"])
    assert len(embedded.embeddings) == 2
    legacy = await client.embeddings(model="all-minilm", prompt="a")
    assert list(legacy.embedding) == [0.1, 0.2, 0.3]
    shown = await client.show(MODEL)
    assert shown.details is not None and shown.details.family == "fake"
    assert shown.modelinfo is not None
    # What the engine received: Ollama's own paths, the key never passed on.
    paths = [s.path for s in stack.fake.seen]
    assert paths[:3] == ["/api/chat", "/api/chat", "/api/generate"]
    assert all(USER_KEY not in str(s.headers) for s in stack.fake.seen)
    await stack.broker.stop()
    rows = stack.rows()
    assert [r.model for r in rows] == [MODEL] * 4 + ["all-minilm"] * 2 + [MODEL]
    chats = rows[:4]
    assert [(r.tokens_in, r.tokens_out, r.estimated) for r in chats] == [
        (PROMPT_EVAL_COUNT, 5, False),
        (PROMPT_EVAL_COUNT, 5, False),
        (PROMPT_EVAL_COUNT, 3, False),
        (PROMPT_EVAL_COUNT, 4, False),
    ]
    assert [r.stream for r in chats] == [True, False, True, False]
    assert (rows[4].tokens_in, rows[4].tokens_out, rows[4].estimated) == (7, 0, False)
    assert all(r.status == 200 for r in rows)


async def test_tags_ps_and_version_from_live_connectors(stack: OllamaStack) -> None:
    client = stack.client()
    listed = await client.list()
    assert sorted(m.model or "" for m in listed.models) == ["all-minilm", MODEL]
    running = await client.ps()
    assert sorted(m.model or "" for m in running.models) == ["all-minilm", MODEL]
    async with httpx.AsyncClient(base_url=stack.broker.url, headers=AUTH) as raw:
        version = await raw.get("/api/version")
        assert version.json() == {"version": "0.6.2"}
        # The local answers are the broker's own: no /api call reached the engine for them.
        assert not [t for t in stack.fake.targets if "/api/ps" in t]
        await stack.connector.stop()
        await stack.broker.wait_view(lambda v: not v.sessions)
        assert (await raw.get("/api/tags")).json() == {"models": []}
        gone = await raw.get("/api/version")
        assert gone.status_code == 503 and "no Ollama engine" in gone.json()["error"]


async def test_errors_come_in_ollamas_shape(stack: OllamaStack, tmp_path: Path) -> None:
    client = stack.client()
    with pytest.raises(ollama.ResponseError) as missing:
        await client.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert missing.value.status_code == 404 and "no-such-model" in missing.value.error
    with pytest.raises(ollama.ResponseError) as failed:
        await client.generate(model=MODEL, prompt="fail:500", stream=False)
    assert failed.value.status_code == 500 and failed.value.error == "fake failure 500"
    keyless = stack.client(headers={})
    with pytest.raises(ollama.ResponseError) as unauthorized:
        await keyless.list()
    assert unauthorized.value.status_code == 401
    # A model served only by an engine that is not Ollama: never sent there over /api.
    plain = FakeLLM(models=["plain-model"])
    await plain.start()
    other = await start_connector(stack.broker.url, plain.url, name="llama-cpp-box")
    try:
        with pytest.raises(ollama.ResponseError) as not_ollama:
            await client.generate(model="plain-model", prompt="hi")
        assert not_ollama.value.status_code == 404
        assert "not served by an Ollama engine" in not_ollama.value.error
        assert "plain-model" not in [m.model for m in (await client.list()).models]
        assert not plain.seen
    finally:
        await other.stop()
        await plain.stop()


async def test_engine_changing_routes_are_refused(stack: OllamaStack) -> None:
    client = stack.client()
    for call in (
        client.pull("evil"),
        client.delete(MODEL),
        client.copy(MODEL, "other"),
        client.push(MODEL),
        client.create(model="x", from_=MODEL),
    ):
        with pytest.raises(ollama.ResponseError) as refused:
            await call
        assert refused.value.status_code == 403 and "never relays" in refused.value.error
    detection = ("GET /api/version", "GET /api/tags")
    assert not [t for t in stack.fake.targets if "/api/" in t and t not in detection]


async def test_a_stream_is_passed_on_as_it_comes(stack: OllamaStack) -> None:
    stack.fake.chunk_delay = 0.25
    body = {"model": MODEL, "prompt": "tokens:5"}  # no "stream": Ollama streams by default
    arrivals: list[float] = []
    async with (
        httpx.AsyncClient(base_url=stack.broker.url, headers=AUTH, timeout=30.0) as raw,
        raw.stream("POST", "/api/generate", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        async for _ in response.aiter_lines():
            arrivals.append(time.monotonic())
    assert len(arrivals) == 6
    # Unbuffered: the lines arrive spread over the upstream's ~1 s, not all at the end.
    assert arrivals[-1] - arrivals[0] >= 0.6


async def test_abort_stops_the_upstream(stack: OllamaStack) -> None:
    stack.fake.chunk_delay = 0.1
    client = stack.client()
    messages = [{"role": "user", "content": "tokens:200"}]
    stream = await client.chat(model=MODEL, messages=messages, stream=True)
    got = [await anext(stream), await anext(stream)]
    assert got[0].message.content == "tok0 "
    await stream.aclose()
    await wait_for(lambda: stack.fake.disconnects == 1, timeout=15.0)
    assert stack.fake.completed == 0
    await stack.broker.stop()
    (row,) = stack.rows()
    assert row.status == 499 and row.partial and row.tokens_out is not None
    assert 2 <= row.tokens_out < 200 and row.estimated


async def test_a_stream_that_fails_midway_ends_with_an_error_line(stack: OllamaStack) -> None:
    stack.fake.chunk_delay = 0.05
    client = stack.client()
    stream = await client.generate(model=MODEL, prompt="tokens:400", stream=True)
    first = await anext(stream)
    assert first.response == "tok0 "
    await stack.connector.kill()  # the connector dies mid-answer
    with pytest.raises(ollama.ResponseError) as failed:
        async for _ in stream:
            pass
    # An {"error": ...} line, as Ollama ends a failed stream, after the lines delivered.
    assert "connector" in failed.value.error
    await stack.broker.stop()
    (row,) = stack.rows()
    assert row.status == 502 and row.partial and row.estimated  # as recorded for /v1 streams


async def test_limits_and_metrics_as_on_v1(tmp_path: Path) -> None:
    fake = FakeLLM(models=[MODEL], ollama=True)
    await fake.start()
    broker = await start_broker(tmp_path / "b", rpm_limit=2)
    connector = await start_connector(broker.url, fake.url)
    client = ollama.AsyncClient(host=broker.url, headers=AUTH, timeout=30.0)
    try:
        messages = [{"role": "user", "content": "tokens:3"}]
        await client.chat(model=MODEL, messages=messages, stream=False)
        parts = [p async for p in await client.chat(model=MODEL, messages=messages, stream=True)]
        assert parts[-1].eval_count == 3
        with pytest.raises(ollama.ResponseError) as limited:
            await client.chat(model=MODEL, messages=messages)
        assert limited.value.status_code == 429 and "limit" in limited.value.error
        async with httpx.AsyncClient(timeout=10.0) as raw:
            refused = await raw.post(
                broker.url + "/api/chat", json={"model": MODEL, "messages": messages}, headers=AUTH
            )
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
            assert set(refused.json()) == {"error"}
            scraped = (await raw.get(broker.health_url + "/metrics")).text
    finally:
        await client.close()
        await connector.stop()
        await broker.stop()
        await fake.stop()
    tokens = [
        line
        for line in scraped.splitlines()
        if line.startswith("remotellm_tokens_total") and MODEL in line
    ]
    assert any('kind="output"' in t and t.endswith(" 6.0") for t in tokens), tokens
    assert any('kind="input"' in t and t.endswith(f" {2.0 * PROMPT_EVAL_COUNT}") for t in tokens)
