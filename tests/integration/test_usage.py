"""Usage rows for real relayed requests (in-process broker and connector, the fake LLM):
exact, estimated and partial; the client's bytes untouched by the broker's usage request;
one row per request across redispatch, restarts and a graceful stop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.usage.query import RequestRow, recent_requests
from connector.health import HealthServer
from shared.bench.upstream import FakeLLM
from tests.support.net import wait_for
from tests.support.stack import TOKEN, USER_KEY, RunningBroker, start_broker, start_connector

AUTH = {"Authorization": f"Bearer {USER_KEY}"}


def chat(n: int, *, stream: bool, prompt: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {
        "model": "fake-model",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": n,
        "stream": stream,
        **extra,
    }


async def raw_stream(url: str, body: dict[str, Any], headers: dict[str, str]) -> bytes:
    async with (
        httpx.AsyncClient(timeout=30.0) as client,
        client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r,
    ):
        assert r.status_code == 200
        return b"".join([part async for part in r.aiter_raw()])


def rows(broker: RunningBroker) -> list[RequestRow]:
    return list(reversed(recent_requests(broker.settings.usage_path)))  # oldest first


@pytest.mark.parametrize("style", ["final", "null", "ignore"])
async def test_client_bytes_are_identical_with_and_without_injection(
    tmp_path: Path, style: str
) -> None:
    fake = FakeLLM(usage_style=style)  # type: ignore[arg-type]
    await fake.start()
    broker = await start_broker(tmp_path / "b")
    conn = await start_connector(broker.url, fake.url, name="gpu-1")
    try:
        body = chat(6, stream=True, prompt="hello there, how are you?")
        direct = await raw_stream(fake.url, body, {})  # what the client would get directly
        relayed = await raw_stream(broker.url, body, AUTH)
        assert fake.seen[-1].body["stream_options"] == {"include_usage": True}  # injected
        assert b'"usage"' not in relayed
        assert relayed == direct
        # A client that asks for usage gets it, untouched, as the upstream sent it.
        asked = chat(
            6,
            stream=True,
            prompt="hello there, how are you?",
            stream_options={"include_usage": True},
        )
        direct_asked = await raw_stream(fake.url, asked, {})
        assert await raw_stream(broker.url, asked, AUTH) == direct_asked
    finally:
        await conn.stop()
        await broker.stop()
        await fake.stop()
    recorded = rows(broker)
    assert len(recorded) == 2
    exact = style != "ignore"
    for row in recorded:
        assert (row.status, row.stream, row.connector, row.partial) == (200, True, "gpu-1", False)
        assert row.estimated is not exact
    # exact: the fake's usage chunk (3 in, 6 out); else 6 content deltas and the limits'
    # prompt estimate: 25 bytes / 4, rounded up, + 4 for the one message
    expected = (3, 6) if exact else (7 + 4, 6)
    assert [(r.tokens_in, r.tokens_out) for r in recorded] == [expected, expected]
    assert recorded[0].bytes_out == len(direct)


async def test_non_stream_rows_exact_and_estimated(tmp_path: Path, fake_llm: FakeLLM) -> None:
    broker = await start_broker(tmp_path / "b")
    conn = await start_connector(broker.url, fake_llm.url)
    try:
        async with openai.AsyncOpenAI(
            base_url=broker.url + "/v1", api_key=USER_KEY, max_retries=0
        ) as client:
            reply = await client.chat.completions.create(**chat(4, stream=False))
            assert reply.usage is not None and reply.usage.completion_tokens == 5
            await client.embeddings.create(model="fake-model", input=["a"])
            with pytest.raises(openai.InternalServerError):
                await client.chat.completions.create(**chat(4, stream=False, prompt="fail:500"))
    finally:
        await conn.stop()
        await broker.stop()
    chat_row, emb_row, failed = rows(broker)
    assert (chat_row.tokens_in, chat_row.tokens_out, chat_row.estimated) == (3, 5, False)
    assert (emb_row.tokens_in, emb_row.tokens_out, emb_row.estimated) == (3, 0, False)
    assert (failed.status, failed.tokens_in, failed.tokens_out) == (500, None, None)
    assert not any(r.partial for r in (chat_row, emb_row, failed))


async def test_cancelled_stream_records_what_was_delivered(tmp_path: Path) -> None:
    fake = FakeLLM(chunk_delay=0.05)
    await fake.start()
    broker = await start_broker(tmp_path / "b")
    conn = await start_connector(broker.url, fake.url)
    try:
        async with openai.AsyncOpenAI(
            base_url=broker.url + "/v1", api_key=USER_KEY, max_retries=0
        ) as client:
            stream = await client.chat.completions.create(**chat(200, stream=True))
            received = 0
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    received += 1
                    if received == 5:
                        break
            await stream.close()
        await wait_for(lambda: fake.disconnects == 1, timeout=10)
    finally:
        await conn.stop()
        await broker.stop()
        await fake.stop()
    (row,) = rows(broker)
    assert (row.status, row.partial, row.estimated) == (499, True, True)
    # What reached the client: at least what it read, far less than was asked for.
    assert row.tokens_out is not None and 5 <= row.tokens_out < 50
    assert row.tokens_in == 3 + 4  # "hello there": 11 bytes / 4, rounded up, + 4 per message


async def test_redispatched_stream_is_one_row_with_the_last_attempt(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    broker = await start_broker(tmp_path / "b", lease=0.5)
    base = broker.url + "/relay/v1"
    tok = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with httpx.AsyncClient(timeout=30) as raw:
            reg = await raw.post(
                base + "/sessions",
                json={"name": "lossy", "models": ["fake-model"], "capacity": 1},
                headers=tok,
            )
            sid = reg.json()["session_id"]
            pending = asyncio.create_task(raw_stream(broker.url, chat(4, stream=True), AUTH))
            lost = await raw.post(f"{base}/sessions/{sid}/poll", json={}, headers=tok)
            assert lost.json()["items"][0]["type"] == "request"
            conn = await start_connector(broker.url, fake_llm.url, name="healthy")
            try:
                data = await pending
            finally:
                await conn.stop()
        assert broker.hub.core.redispatched == 1
        assert data.count(b'"content"') == 4
    finally:
        await broker.stop()
    (row,) = rows(broker)
    assert (row.connector, row.status, row.tokens_in, row.tokens_out) == ("healthy", 200, 3, 4)
    assert (row.estimated, row.partial) == (False, False)


async def test_restart_keeps_the_ledger(tmp_path: Path, fake_llm: FakeLLM) -> None:
    for run in range(2):
        broker = await start_broker(tmp_path / "b")
        conn = await start_connector(broker.url, fake_llm.url)
        try:
            async with httpx.AsyncClient(timeout=30.0, headers=AUTH) as client:
                r = await client.post(
                    broker.url + "/v1/chat/completions",
                    json=chat(2, stream=False, prompt=f"run {run}"),
                    headers={"x-request-id": f"run-{run}"},
                )
                assert r.status_code == 200
        finally:
            await conn.stop()
            await broker.stop()
    assert [r.client_request_id for r in rows(broker)] == ["run-0", "run-1"]


async def test_graceful_stop_loses_no_record(tmp_path: Path) -> None:
    fake = FakeLLM(chunk_delay=0.1)
    await fake.start()
    broker = await start_broker(tmp_path / "b", drain_timeout=10.0)
    conn = await start_connector(broker.url, fake.url, capacity=4)
    try:
        streams = [
            asyncio.create_task(raw_stream(broker.url, chat(10, stream=True), AUTH))
            for _ in range(3)
        ]
        await wait_for(lambda: fake.active == 3, timeout=10)
        stopping = asyncio.create_task(broker.stop())  # SIGTERM's path: drain, then flush
        bodies = await asyncio.gather(*streams)
        await stopping
    finally:
        await conn.stop()
        await fake.stop()
    assert all(body.endswith(b"data: [DONE]\n\n") for body in bodies)
    recorded = rows(broker)
    assert len(recorded) == 3
    assert all((r.status, r.tokens_out, r.partial) == (200, 10, False) for r in recorded)
    assert json.loads(bodies[0].split(b"\n\n")[0][6:])["choices"][0]["delta"]["content"]


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(family: Any, suffix: str = "", **labels: str) -> float:
    for s in family.samples:
        if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {family.name}{suffix} {labels}")


async def test_metrics_count_tokens_queue_wait_and_connector_state(tmp_path: Path) -> None:
    fake = FakeLLM(usage_style="ignore")  # one estimated stream, one exact answer
    await fake.start()
    broker = await start_broker(tmp_path / "b")
    conn = await start_connector(broker.url, fake.url)
    health = HealthServer(conn.connector, "127.0.0.1", 0)
    await health.start()
    try:
        await raw_stream(broker.url, chat(6, stream=True, prompt="12345678"), AUTH)
        async with httpx.AsyncClient(timeout=30.0, headers=AUTH) as client:
            r = await client.post(broker.url + "/v1/chat/completions", json=chat(4, stream=False))
            assert r.status_code == 200
            r = await client.post(
                broker.url + "/v1/chat/completions", json=chat(4, stream=False, prompt="fail:503")
            )
            assert r.status_code == 503
            scraped = await client.get(broker.health_url + "/metrics")
            local = await client.get(f"http://127.0.0.1:{health.port}/metrics")
    finally:
        await health.close()
        await conn.stop()
        await broker.stop()
        await fake.stop()
    assert scraped.status_code == 200
    got = families(scraped.text)
    tokens = got["remotellm_tokens"]
    # stream: 2 + 4 estimated prompt tokens, 6 deltas; answer: 3 and 5 from its usage
    assert sample(tokens, "_total", model="fake-model", kind="input") == 6 + 3
    assert sample(tokens, "_total", model="fake-model", kind="output") == 6 + 5
    wait = got["remotellm_queue_wait_seconds"]
    assert sample(wait, "_count", model="fake-model") == 3  # once per request, not per chunk
    assert 0 <= sample(wait, "_sum", model="fake-model") < 5
    assert local.headers["content-type"].startswith("text/plain")
    mine = families(local.text)
    assert sample(mine["remotellm_connector_requests"], "_total", result="served") == 3
    assert sample(mine["remotellm_connector_upstream_errors"], "_total", reason="status_5xx") == 1
    assert sample(mine["remotellm_connector_relay_reconnects"], "_total") == 0
    assert sample(mine["remotellm_connector_connected"]) == 1
    assert sample(mine["remotellm_connector_in_flight"]) == 0


async def test_no_ask_stream_usage_sends_the_body_unchanged(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    broker = await start_broker(tmp_path / "b", ask_stream_usage=False)
    conn = await start_connector(broker.url, fake_llm.url)
    try:
        body = chat(3, stream=True)
        relayed = await raw_stream(broker.url, body, AUTH)
        assert "stream_options" not in fake_llm.seen[-1].body
        assert relayed == await raw_stream(fake_llm.url, body, {})
    finally:
        await conn.stop()
        await broker.stop()
    (row,) = rows(broker)
    assert (row.tokens_out, row.estimated) == (3, True)  # counted, not reported
