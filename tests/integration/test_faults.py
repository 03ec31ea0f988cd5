"""Faults: disconnects, dead connectors, broker restarts, lost poll answers."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from shared.bench.upstream import FakeLLM
from tests.support.net import wait_for
from tests.support.stack import TOKEN, USER_KEY, Stack, start_broker, start_connector

AUTH = {"Authorization": f"Bearer {USER_KEY}"}

# Relay semantics in memory and in Redis; the server's part (streaming bodies, long polls,
# disconnects) on each HTTP server.
pytestmark = [pytest.mark.both_states, pytest.mark.both_servers]


def body(stream: bool, n: int = 200, content: str = "x") -> dict:
    return {
        "model": "fake-model",
        "stream": stream,
        "max_tokens": n,
        "messages": [{"role": "user", "content": content}],
    }


async def test_client_disconnect_mid_stream_stops_upstream(stack: Stack, fake_llm: FakeLLM) -> None:
    fake_llm.chunk_delay = 0.05
    async with stack.client() as client:
        async with client.stream("POST", "/v1/chat/completions", json=body(True)) as r:
            assert r.status_code == 200
            async for _ in r.aiter_bytes():
                break  # got the first bytes; now hang up
    await wait_for(lambda: fake_llm.disconnects == 1, timeout=5)
    assert fake_llm.completed == 0
    await stack.broker.wait_view(lambda v: v.in_flight == 0, timeout=5)
    await wait_for(lambda: not stack.connectors[0].connector.tasks, timeout=5)


async def test_client_disconnect_before_head_cancels(stack: Stack, fake_llm: FakeLLM) -> None:
    """A non-streaming request abandoned while the upstream works is cancelled there too."""
    fake_llm.chunk_delay = 0.05
    async with stack.client(timeout=0.5) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/chat/completions", json=body(False, n=100))
    await stack.broker.wait_view(lambda v: v.in_flight == 0, timeout=5)
    await wait_for(lambda: not stack.connectors[0].connector.tasks, timeout=5)


async def test_client_disconnect_while_queued(tmp_path, fake_llm: FakeLLM) -> None:
    broker = await start_broker(tmp_path / "b")
    conn = await start_connector(broker.url, fake_llm.url, capacity=1)
    fake_llm.chunk_delay = 0.05
    try:
        async with httpx.AsyncClient(base_url=broker.url, headers=AUTH, timeout=30) as client:
            busy = asyncio.create_task(client.post("/v1/chat/completions", json=body(False, n=20)))
            await wait_for(lambda: len(fake_llm.seen) == 1)
            queued = asyncio.create_task(client.post("/v1/chat/completions", json=body(False, 5)))
            await broker.wait_view(lambda v: v.queue_depth.get("fake-model") == 1)
            queued.cancel()
            await broker.wait_view(lambda v: not v.queue_depth)
            assert (await busy).status_code == 200
        # The abandoned request never reached the LLM.
        assert len(fake_llm.seen) == 1
    finally:
        await conn.stop()
        await broker.stop()


async def test_connector_killed_mid_stream(stack: Stack, fake_llm: FakeLLM) -> None:
    other_llm = FakeLLM()
    await other_llm.start()
    fake_llm.chunk_delay = 0.05
    first = stack.connectors[0]
    try:
        async with openai.AsyncOpenAI(
            base_url=stack.base_url, api_key=USER_KEY, max_retries=0
        ) as c:
            stream = await c.chat.completions.create(
                model="fake-model",
                messages=[{"role": "user", "content": "x"}],
                max_tokens=200,
                stream=True,
            )
            got = 0
            with pytest.raises(openai.APIError):
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        got += 1
                        if got == 3:
                            await first.kill()
            assert got >= 3
            stack.connectors.remove(first)
            # The next request goes to another connector.
            second = await start_connector(stack.broker.url, other_llm.url)
            stack.connectors.append(second)
            reply = await c.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "x"}], max_tokens=2
            )
        assert reply.choices[0].message.content == "tok0 tok1 "
        assert len(other_llm.seen) == 1
    finally:
        await other_llm.stop()


async def test_broker_restart_connectors_come_back(tmp_path, fake_llm: FakeLLM) -> None:
    broker = await start_broker(tmp_path / "b")
    port = broker.settings.port
    conn = await start_connector(broker.url, fake_llm.url)
    try:
        old_session = conn.connector.status.session_id
        await broker.stop()
        await asyncio.sleep(0.5)
        broker = await start_broker(tmp_path / "b", port=port)
        started = time.monotonic()
        # In memory the broker forgot the session and the connector registers again; in
        # Redis the session outlives the broker process and the connector keeps it.
        await broker.wait_view(lambda v: bool(v.sessions), timeout=15)
        if not broker.redis_mode:
            await wait_for(
                lambda: conn.connector.status.session_id not in (None, old_session), timeout=15
            )
        took = time.monotonic() - started
        async with openai.AsyncOpenAI(base_url=broker.url + "/v1", api_key=USER_KEY) as c:
            r = await c.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "x"}], max_tokens=1
            )
        assert r.choices[0].message.content == "tok0 "
        assert took < 10
    finally:
        await conn.stop()
        await broker.stop()


async def test_lost_poll_answer_is_redispatched(tmp_path, fake_llm: FakeLLM) -> None:
    """A poll answer that never reaches its connector: the lease expires, another serves it."""
    broker = await start_broker(tmp_path / "b", lease=0.5)
    base = broker.url + "/relay/v1"
    tok = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with httpx.AsyncClient(timeout=30) as raw:
            # A "connector" that polls once and then loses the answer.
            reg = await raw.post(
                base + "/sessions",
                json={"name": "lossy", "models": ["fake-model"], "capacity": 1},
                headers=tok,
            )
            sid = reg.json()["session_id"]
            async with httpx.AsyncClient(base_url=broker.url, headers=AUTH, timeout=30) as api:
                pending = asyncio.create_task(
                    api.post("/v1/chat/completions", json=body(False, n=2))
                )
                lost = await raw.post(f"{base}/sessions/{sid}/poll", json={}, headers=tok)
                assert lost.json()["items"][0]["type"] == "request"
                # Now a healthy connector joins; after the lease the request goes to it.
                conn = await start_connector(broker.url, fake_llm.url)
                try:
                    r = await pending
                finally:
                    await conn.stop()
            assert r.status_code == 200
            assert r.json()["choices"][0]["message"]["content"] == "tok0 tok1 "
            assert (await broker.view()).redispatched == 1
            # The lossy connector's late upload is refused.
            rid = lost.json()["items"][0]["request_id"]
            late = await raw.post(
                f"{base}/sessions/{sid}/responses/{rid}", content=b"", headers=tok
            )
            assert late.status_code in (404, 409)
    finally:
        await broker.stop()


async def test_request_fails_after_max_redispatch(tmp_path) -> None:
    broker = await start_broker(tmp_path / "b", lease=0.3, max_redispatch=1)
    base = broker.url + "/relay/v1"
    tok = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with httpx.AsyncClient(timeout=30) as raw:
            reg = await raw.post(
                base + "/sessions",
                json={"name": "blackhole", "models": ["fake-model"], "capacity": 1},
                headers=tok,
            )
            sid = reg.json()["session_id"]

            async def black_hole() -> None:
                while True:
                    await raw.post(f"{base}/sessions/{sid}/poll", json={}, headers=tok)

            hole = asyncio.create_task(black_hole())
            try:
                async with httpx.AsyncClient(base_url=broker.url, headers=AUTH, timeout=30) as api:
                    r = await api.post("/v1/chat/completions", json=body(False, n=2))
            finally:
                hole.cancel()
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "connector_lost"
    finally:
        await broker.stop()


async def test_session_expiry_unroutes_models(tmp_path) -> None:
    broker = await start_broker(tmp_path / "b", session_ttl=0.5)
    base = broker.url + "/relay/v1"
    tok = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with httpx.AsyncClient(timeout=30) as raw:
            await raw.post(
                base + "/sessions",
                json={"name": "silent", "models": ["m1"], "capacity": 1},
                headers=tok,
            )
            assert "m1" in (await broker.view()).live_models
            await broker.wait_view(lambda v: not v.sessions, timeout=5)
            async with httpx.AsyncClient(base_url=broker.url, headers=AUTH) as api:
                r = await api.post("/v1/chat/completions", json={**body(False), "model": "m1"})
        assert r.status_code == 503
    finally:
        await broker.stop()


async def test_queue_wait_timeout_503(tmp_path, fake_llm: FakeLLM) -> None:
    broker = await start_broker(tmp_path / "b", queue_wait=0.5)
    conn = await start_connector(broker.url, fake_llm.url, capacity=1)
    fake_llm.chunk_delay = 0.1
    try:
        async with httpx.AsyncClient(base_url=broker.url, headers=AUTH, timeout=30) as api:
            busy = asyncio.create_task(api.post("/v1/chat/completions", json=body(False, n=15)))
            await wait_for(lambda: len(fake_llm.seen) == 1)
            r = await api.post("/v1/chat/completions", json=body(False, n=1))
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "queue_timeout"
            assert "retry-after" in r.headers
            assert (await busy).status_code == 200
    finally:
        await conn.stop()
        await broker.stop()


async def test_connector_started_before_the_llm_serves_once_it_is_up(tmp_path) -> None:
    from tests.support.net import free_port

    broker = await start_broker(tmp_path / "b")
    port = free_port()
    conn = await start_connector(broker.url, f"http://127.0.0.1:{port}")  # nothing there yet
    llm = FakeLLM(models=["late-model"])
    try:
        assert conn.connector.status.models == []
        await llm.start(port=port)
        await broker.wait_view(lambda v: "late-model" in v.live_models, timeout=10)
        asked = time.monotonic()
        async with httpx.AsyncClient(base_url=broker.url, headers=AUTH, timeout=30) as api:
            r = await api.post(
                "/v1/chat/completions", json={**body(False, 2), "model": "late-model"}
            )
        assert r.status_code == 200
        # Served by the poll already held, not after it ran out (Redis mode waited it out).
        assert time.monotonic() - asked < broker.settings.poll_wait / 2
    finally:
        await conn.stop()
        await llm.stop()
        await broker.stop()
