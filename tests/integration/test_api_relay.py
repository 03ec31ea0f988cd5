"""The OpenAI API through broker and connector, driven by the openai SDK."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import openai
import pytest

from broker.accounts.keys import hash_secret, user_id
from shared.bench.upstream import FakeLLM
from tests.support.stack import USER_KEY, Stack, start_broker, start_connector

# Relay semantics in memory and in Redis; the server's part (streaming bodies, long polls,
# disconnects) on each HTTP server.
pytestmark = [pytest.mark.both_states, pytest.mark.both_servers]


def sdk(stack: Stack, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.base_url, api_key=USER_KEY, max_retries=0, **kw)


async def test_non_stream_chat(stack: Stack) -> None:
    async with sdk(stack) as client:
        reply = await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
    assert reply.choices[0].message.content == "tok0 tok1 tok2 "


async def test_stream_is_incremental(stack: Stack, fake_llm: FakeLLM) -> None:
    fake_llm.chunk_delay = 0.1
    arrivals: list[float] = []
    parts: list[str] = []
    async with sdk(stack) as client:
        started = time.perf_counter()
        stream = await client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=10,
            stream=True,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.perf_counter() - started)
                parts.append(chunk.choices[0].delta.content)
    assert parts == [f"tok{i} " for i in range(10)]
    # Nine gaps of 100 ms upstream: the first chunk must not wait for the last.
    assert arrivals[-1] - arrivals[0] > 0.6


async def test_completions_and_embeddings(stack: Stack) -> None:
    async with sdk(stack) as client:
        done = await client.completions.create(model="fake-model", prompt="hi", max_tokens=2)
        emb = await client.embeddings.create(model="fake-model", input=["a", "b"])
    assert done.choices[0]
    assert [d.index for d in emb.data] == [0, 1]
    assert emb.data[1].embedding[0] == pytest.approx(0.2)


async def test_models_listing(stack: Stack) -> None:
    async with sdk(stack) as client:
        models = await client.models.list()
        one = await client.models.retrieve("fake-model")
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("nope")
    assert [m.id for m in models.data] == ["fake-model"]
    assert one.id == "fake-model"


async def test_request_id_headers_and_key_injection(stack: Stack, fake_llm: FakeLLM) -> None:
    async with sdk(stack) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="fake-model",
            messages=[{"role": "user", "content": "echo"}],
            extra_headers={"x-request-id": "my-req-42"},
        )
        fresh = await client.chat.completions.with_raw_response.create(
            model="fake-model", messages=[{"role": "user", "content": "echo"}]
        )
    # The client's own ID is a label, echoed; the broker's UUID is the request's key.
    assert raw.headers["x-client-request-id"] == "my-req-42"
    own_id = raw.headers["x-request-id"]
    assert str(uuid.UUID(own_id)) == own_id
    assert float(raw.headers["x-remotellm-overhead-ms"]) >= 0.0
    first = {k.lower(): v for k, v in fake_llm.seen[-2].headers.items()}
    assert first["x-remotellm-request-id"] == first["x-request-id"] == own_id
    new_id = fresh.headers["x-request-id"]
    assert str(uuid.UUID(new_id)) == new_id
    seen = fake_llm.seen[-1]
    headers = {k.lower(): v for k, v in seen.headers.items()}
    assert headers["x-request-id"] == new_id
    # The user's key never leaves the broker; no upstream key is configured here.
    assert USER_KEY not in json.dumps(seen.headers)
    assert "authorization" not in headers


async def test_two_connectors_routed_by_model(tmp_path, stack: Stack) -> None:
    other = FakeLLM(models=["other-model"])
    await other.start()
    conn = await start_connector(stack.broker.url, other.url)
    stack.connectors.append(conn)
    try:
        async with sdk(stack) as client:
            a = await client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "x"}], max_tokens=1
            )
            b = await client.chat.completions.create(
                model="other-model", messages=[{"role": "user", "content": "x"}], max_tokens=1
            )
            listed = sorted(m.id for m in (await client.models.list()).data)
        assert a.model == "fake-model" and b.model == "other-model"
        assert listed == ["fake-model", "other-model"]
        assert len(other.seen) == 1
    finally:
        await conn.stop()
        stack.connectors.remove(conn)
        await other.stop()


async def test_same_model_on_two_connectors_shares_load(stack: Stack, fake_llm: FakeLLM) -> None:
    second_llm = FakeLLM()
    await second_llm.start()
    conn = await start_connector(stack.broker.url, second_llm.url, capacity=2)
    stack.connectors.append(conn)
    fake_llm.chunk_delay = second_llm.chunk_delay = 0.05
    try:
        async with sdk(stack) as client:

            async def one() -> str:
                r = await client.chat.completions.create(
                    model="fake-model", messages=[{"role": "user", "content": "x"}], max_tokens=4
                )
                return r.choices[0].message.content or ""

            results = await asyncio.gather(*(one() for _ in range(12)))
        assert all(r == "tok0 tok1 tok2 tok3 " for r in results)
        # Both connectors took work.
        assert len(second_llm.seen) >= 1
        assert len(fake_llm.seen) >= 1
        assert len(second_llm.seen) + len(fake_llm.seen) == 12
    finally:
        await conn.stop()
        stack.connectors.remove(conn)
        await second_llm.stop()


async def test_large_request_and_response_intact(stack: Stack, fake_llm: FakeLLM) -> None:
    big_prompt = "x" * (1024 * 1024)
    async with sdk(stack, timeout=60) as client:
        r = await client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "echo"}, {"role": "user", "content": big_prompt}],
        )
    # The fake saw the whole 1 MB body.
    assert fake_llm.seen[-1].body["messages"][1]["content"] == big_prompt
    size = 5 * 1024 * 1024
    async with sdk(stack, timeout=60) as client:
        r = await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": f"big:{size}"}]
        )
    content = r.choices[0].message.content or ""
    assert len(content) == size
    assert content == ("0123456789abcdef" * (size // 16 + 1))[:size]


async def test_utf8_split_across_writes(stack: Stack) -> None:
    async with sdk(stack) as client:
        stream = await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "utf8"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "héllo wörld 你好 🙂 ✓"


# One key with a hundred requests in flight: over the default per-user concurrency limit.
@pytest.mark.parametrize("broker_overrides", [{"concurrency_limit": 100}])
async def test_hundred_concurrent_streams_in_order(stack: Stack, fake_llm: FakeLLM) -> None:
    # The default connector has capacity 4; give it more so all run at once.
    conn = await start_connector(stack.broker.url, fake_llm.url, capacity=100)
    stack.connectors.append(conn)
    fake_llm.chunk_delay = 0.01
    async with sdk(stack, timeout=60, http_client=None) as client:

        async def one(i: int) -> list[str]:
            stream = await client.chat.completions.create(
                model="fake-model",
                messages=[{"role": "user", "content": f"n{i}"}],
                max_tokens=20,
                stream=True,
            )
            return [
                c.choices[0].delta.content
                async for c in stream
                if c.choices and c.choices[0].delta.content
            ]

        results = await asyncio.gather(*(one(i) for i in range(100)))
    expected = [f"tok{i} " for i in range(20)]
    assert all(r == expected for r in results)


async def test_stream_commits_and_heartbeats_while_upstream_is_slow(
    tmp_path, fake_llm: FakeLLM
) -> None:
    broker = await start_broker(tmp_path / "b", stream_commit_after=0.2, heartbeat=0.2)
    conn = await start_connector(broker.url, fake_llm.url)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            body = {
                "model": "fake-model",
                "stream": True,
                "max_tokens": 2,
                "messages": [{"role": "user", "content": "slow-head:1.0"}],
            }
            async with client.stream(
                "POST",
                broker.url + "/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {USER_KEY}"},
            ) as response:
                first_at = None
                started = time.perf_counter()
                chunks = []
                async for chunk in response.aiter_text():
                    if first_at is None:
                        first_at = time.perf_counter() - started
                    chunks.append(chunk)
            text = "".join(chunks)
        assert response.status_code == 200
        assert response.headers["x-accel-buffering"] == "no"
        assert first_at is not None and first_at < 0.9  # committed before the head came
        assert ": keepalive" in text
        assert "tok1 " in text and text.rstrip().endswith("data: [DONE]")
    finally:
        await conn.stop()
        await broker.stop()


async def test_parts_mode_relays_a_stream(tmp_path, fake_llm: FakeLLM) -> None:
    broker = await start_broker(tmp_path / "b")
    conn = await start_connector(broker.url, fake_llm.url, upload_mode="parts")
    fake_llm.chunk_delay = 0.03
    try:
        assert conn.connector.status.upload_mode == "parts"
        async with openai.AsyncOpenAI(base_url=broker.url + "/v1", api_key=USER_KEY) as client:
            stream = await client.chat.completions.create(
                model="fake-model",
                messages=[{"role": "user", "content": "x"}],
                max_tokens=12,
                stream=True,
            )
            parts = [
                c.choices[0].delta.content
                async for c in stream
                if c.choices and c.choices[0].delta.content
            ]
            whole = await client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "x"}], max_tokens=3
            )
        assert parts == [f"tok{i} " for i in range(12)]
        assert whole.choices[0].message.content == "tok0 tok1 tok2 "
    finally:
        await conn.stop()
        await broker.stop()


async def test_auto_mode_picks_mux_on_a_direct_path(tmp_path, fake_llm: FakeLLM) -> None:
    broker = await start_broker(tmp_path / "b")
    conn = await start_connector(broker.url, fake_llm.url, upload_mode="auto")
    try:
        # The path streams bodies: the multiplexed upload (stream mode on the wire).
        assert conn.connector.status.upload_mode == "mux"
    finally:
        await conn.stop()
        await broker.stop()


async def test_landing_page_lists_live_models(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.broker.url) as client:
        r = await client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "<li>fake-model</li>" in r.text
    assert stack.broker.url + "/v1" in r.text


async def test_health_ready_and_metrics(stack: Stack) -> None:
    async with stack.client() as client:
        ok = await client.post(
            "/v1/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": "x"}]},
        )
        assert ok.status_code == 200
        missing = await client.post("/v1/chat/completions", json={"model": "nope", "messages": []})
        assert missing.status_code == 404
    async with httpx.AsyncClient(base_url=stack.broker.health_url) as health:
        h = (await health.get("/health")).json()
        assert h["status"] == "ok"
        assert h["models"] == ["fake-model"]
        assert h["connectors"][0]["upload_mode"] == "stream"
        assert (await health.get("/ready")).status_code == 200
        text = (await health.get("/metrics")).text
    assert 'remotellm_requests_total{model="fake-model",status="200"} 1.0' in text
    assert 'remotellm_requests_total{model="(unknown)",status="404"} 1.0' in text
    assert 'remotellm_model_connectors{model="fake-model"} 1.0' in text
    assert "remotellm_time_to_first_byte_seconds_bucket" in text
    assert "remotellm_connector_registrations_total 1.0" in text


@pytest.mark.parametrize("poll_mode", ["classic", "stream"])
async def test_both_poll_modes_relay(tmp_path, fake_llm: FakeLLM, poll_mode: str) -> None:
    broker = await start_broker(tmp_path / "b")
    conn = await start_connector(broker.url, fake_llm.url, poll_mode=poll_mode)
    fake_llm.chunk_delay = 0.01
    try:
        assert conn.connector.status.poll_mode == poll_mode
        async with openai.AsyncOpenAI(base_url=broker.url + "/v1", api_key=USER_KEY) as client:

            async def one() -> list[str]:
                stream = await client.chat.completions.create(
                    model="fake-model",
                    messages=[{"role": "user", "content": "x"}],
                    max_tokens=5,
                    stream=True,
                )
                return [
                    c.choices[0].delta.content
                    async for c in stream
                    if c.choices and c.choices[0].delta.content
                ]

            results = await asyncio.gather(*(one() for _ in range(10)))
        assert all(r == [f"tok{i} " for i in range(5)] for r in results)
        assert len(fake_llm.seen) == 10
    finally:
        await conn.stop()
        await broker.stop()


async def test_auto_poll_mode_streams_on_a_direct_path(tmp_path, fake_llm: FakeLLM) -> None:
    broker = await start_broker(tmp_path / "broker")
    conn = await start_connector(broker.url, fake_llm.url, upload_mode="auto", poll_mode="auto")
    try:
        status = conn.connector.status
        assert status.upload_mode == "mux"  # the probe found a path that streams uploads
        assert status.poll_mode == "stream"
    finally:
        await conn.stop()
        await broker.stop()


async def test_superseded_stream_poll_ends(tmp_path) -> None:
    """Two streaming polls of one session: the older one ends instead of fighting."""
    from tests.support.stack import TOKEN, start_broker

    broker = await start_broker(tmp_path / "b", poll_wait=3.0)
    base = broker.url + "/relay/v1"
    tok = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with httpx.AsyncClient(timeout=30) as raw:
            reg = await raw.post(
                base + "/sessions",
                json={"name": "twice", "models": ["m"], "capacity": 1},
                headers=tok,
            )
            sid = reg.json()["session_id"]
            url = f"{base}/sessions/{sid}/poll?stream=1"
            first = asyncio.create_task(raw.post(url, json={}, headers=tok))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            second = asyncio.create_task(raw.post(url, json={}, headers=tok))
            r1 = await first
            ended_after = time.monotonic() - started
            r2 = await second
        assert r1.status_code == 200 and r2.status_code == 200
        assert ended_after < 1.0  # the older poll gave way at once
        assert r1.headers["content-type"] == "application/x-ndjson"
    finally:
        await broker.stop()


async def test_usage_is_recorded_in_sqlite(tmp_path, fake_llm: FakeLLM) -> None:
    import sqlite3

    broker = await start_broker(tmp_path / "b")
    conn = await start_connector(broker.url, fake_llm.url, name="gpu-box")
    try:
        async with openai.AsyncOpenAI(base_url=broker.url + "/v1", api_key=USER_KEY) as client:
            await client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "x"}], max_tokens=4
            )
            stream = await client.chat.completions.create(
                model="fake-model",
                messages=[{"role": "user", "content": "x"}],
                max_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for _ in stream:
                pass
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(
                    model="fake-model-nope", messages=[{"role": "user", "content": "x"}]
                )
    finally:
        await conn.stop()
        await broker.stop()  # flushes the usage writer
    db = sqlite3.connect(tmp_path / "b" / "usage.sqlite3")
    rows = db.execute(
        "SELECT user_id, model, connector, status, stream, tokens_in, tokens_out, ttfb_ms "
        "FROM usage ORDER BY ts"
    ).fetchall()
    db.close()
    user = user_id(hash_secret(USER_KEY))  # stable: derived from the key, not its position
    assert [r[:7] for r in rows] == [
        (user, "fake-model", "gpu-box", 200, 0, 3, 5),
        (user, "fake-model", "gpu-box", 200, 1, 3, 6),
        (user, "fake-model-nope", None, 404, 0, None, None),
    ]
    assert all(r[7] is not None and r[7] > 0 for r in rows[:2])


async def test_a_client_request_id_in_flight_is_only_a_label(
    stack: Stack, fake_llm: FakeLLM
) -> None:
    """x-request-id is the client's to choose: a label, so reusing it takes nothing over."""
    fake_llm.chunk_delay = 0.05
    headers = {"x-request-id": "same-id-" + uuid.uuid4().hex}
    body = {"model": "fake-model", "max_tokens": 10, "messages": []}
    async with stack.client() as client:
        first = asyncio.create_task(client.post("/v1/chat/completions", json=body, headers=headers))
        await asyncio.sleep(0.2)  # the first one is being answered
        second = await client.post("/v1/chat/completions", json=body, headers=headers)
        done = await first
    assert (done.status_code, second.status_code) == (200, 200)
    assert done.headers["x-request-id"] != second.headers["x-request-id"]
    label = headers["x-request-id"]
    assert done.headers["x-client-request-id"] == second.headers["x-client-request-id"] == label
