"""Several brokers, one Redis: work crosses brokers, and losing a broker or Redis is survived.

Real broker processes (``python -m broker --redis-url ...``), a real redis-server, real
connectors (in this process) and the openai SDK as the API user.
"""

from __future__ import annotations

import asyncio
import signal

import httpx
import openai
import pytest

from shared.bench.upstream import FakeLLM
from tests.scaleout.conftest import Cluster, ready
from tests.support.net import wait_for
from tests.support.procs import Broker, openai_client
from tests.support.roundrobin import RoundRobin
from tests.support.stack import TOKEN, USER_KEY, start_connector

pytestmark = pytest.mark.e2e

MODEL = "fake-model"
TOKENS = [f"tok{i} " for i in range(40)]


async def stream_text(
    sdk: openai.AsyncOpenAI, n: int = 40, first: asyncio.Event | None = None
) -> list[str]:
    stream = await sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=n, stream=True
    )
    parts: list[str] = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            if first is not None:
                first.set()
    return parts


async def health(broker: Broker) -> dict:  # type: ignore[type-arg]
    return await broker.health()


async def wait_until(check, broker: Broker, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check(await health(broker)):
        assert loop.time() < deadline, await health(broker)
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("upload_mode", ["stream", "parts"])
async def test_request_on_one_broker_is_served_through_another(
    cluster: Cluster, fake_llm: FakeLLM, upload_mode: str
) -> None:
    a, b = await cluster.start(2)
    conn = await start_connector(b.url, fake_llm.url, capacity=8, upload_mode=upload_mode)
    cluster.connectors.append(conn)
    await a.wait_model(MODEL)  # A sees B's connector: the session lives in Redis
    fake_llm.chunk_delay = 0.005
    async with openai_client(a.url, USER_KEY) as sdk:
        reply = await sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert reply.choices[0].message.content == "tok0 tok1 tok2 "
        results = await asyncio.gather(*(stream_text(sdk) for _ in range(12)))
    assert all(r == TOKENS for r in results)  # in order, nothing lost or doubled
    assert conn.connector.status.reconnects == 0
    await wait_until(lambda h: h["in_flight"] == 0, a)  # every request ended everywhere


async def test_cancel_on_one_broker_stops_the_upstream_behind_another(
    cluster: Cluster, slow_llm: FakeLLM
) -> None:
    a, b = await cluster.start(2)
    cluster.connectors.append(await start_connector(b.url, slow_llm.url, capacity=1))
    await a.wait_model(MODEL)
    async with httpx.AsyncClient(
        base_url=a.url, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=30
    ) as client:
        body = {"model": MODEL, "stream": True, "max_tokens": 200, "messages": []}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for _ in r.aiter_bytes():
                break  # the first bytes came; now hang up
        await wait_for(lambda: slow_llm.disconnects == 1, timeout=10)
        assert slow_llm.completed == 0
        # The slot is free again: the next request is served at once.
        quick = {"model": MODEL, "max_tokens": 1, "messages": []}
        slow_llm.chunk_delay = 0.0
        r2 = await client.post("/v1/chat/completions", json=quick)
        assert r2.status_code == 200


async def test_a_poll_answer_lost_on_one_broker_is_served_through_another(
    cluster: Cluster, fake_llm: FakeLLM
) -> None:
    """The lease runs out in Redis; whichever broker sweeps first hands it on, once."""
    a, b = await cluster.start(2)
    tok = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(timeout=30, trust_env=False) as raw:
        reg = await raw.post(
            a.url + "/relay/v1/sessions",
            json={"name": "lossy", "models": [MODEL], "capacity": 1},
            headers=tok,
        )
        sid = reg.json()["session_id"]
        async with openai_client(b.url, USER_KEY) as sdk:
            answer = asyncio.create_task(
                sdk.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2
                )
            )
            lost = await raw.post(f"{a.url}/relay/v1/sessions/{sid}/poll", json={}, headers=tok)
            assert lost.json()["items"][0]["type"] == "request"
            cluster.connectors.append(await start_connector(b.url, fake_llm.url))
            reply = await answer
    assert reply.choices[0].message.content == "tok0 tok1 "
    assert (await health(a))["redispatched"] == 1
    assert len(fake_llm.seen) == 1  # exactly once, though two brokers sweep


async def test_killing_a_broker_loses_only_what_it_held(
    cluster: Cluster, slow_llm: FakeLLM
) -> None:
    a, b, c = await cluster.start(3)
    cluster.connectors.append(await start_connector(b.url, slow_llm.url, capacity=32))
    # A second connector, for another model, attached through the balancer: it lands on A.
    other_llm = FakeLLM(models=["other-model"])
    await other_llm.start()
    try:
        async with RoundRobin([a.port]) as lb:
            roaming = await start_connector(lb.url, other_llm.url, name="roaming")
            cluster.connectors.append(roaming)
            assert set(lb.accepted) == {a.port}  # its poll is held by A
            lb.backends = [a.port, b.port, c.port]
            session = roaming.connector.status.session_id
            await c.wait_model(MODEL)
            sdks = {x.port: openai_client(x.url, USER_KEY) for x in (a, b, c)}
            firsts = {p: [asyncio.Event() for _ in range(6)] for p in sdks}
            tasks = {
                p: [asyncio.create_task(stream_text(sdk, first=ev)) for ev in firsts[p]]
                for p, sdk in sdks.items()
            }
            for evs in firsts.values():
                for ev in evs:
                    await asyncio.wait_for(ev.wait(), 15)
            assert a.proc is not None
            a.proc.signal(signal.SIGKILL)
            for port in (b.port, c.port):
                for result in await asyncio.gather(*tasks[port]):
                    assert result == TOKENS  # nothing lost for requests A did not hold
            for outcome in await asyncio.gather(*tasks[a.port], return_exceptions=True):
                assert isinstance(outcome, openai.APIError | httpx.HTTPError)
            # The roaming connector fails over on its next poll, keeping its session.
            async with sdks[c.port] as sdk:
                reply = await asyncio.wait_for(_retry_until_served(sdk, "other-model"), timeout=20)
            assert reply
            assert roaming.connector.status.session_id == session
            for port in (a.port, b.port):
                await sdks[port].close()
    finally:
        await other_llm.stop()


async def _retry_until_served(sdk: openai.AsyncOpenAI, model: str) -> str:
    while True:
        try:
            reply = await sdk.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "x"}], max_tokens=2
            )
        except (openai.APIStatusError, openai.APIConnectionError):
            await asyncio.sleep(0.2)
            continue
        return reply.choices[0].message.content or ""


async def test_redis_restart_answers_503_then_recovers(cluster: Cluster, slow_llm: FakeLLM) -> None:
    a, b = await cluster.start(2)
    cluster.connectors.append(await start_connector(b.url, slow_llm.url, capacity=8))
    await a.wait_model(MODEL)
    async with openai_client(a.url, USER_KEY) as sdk:
        firsts = [asyncio.Event() for _ in range(3)]
        streams = [asyncio.create_task(stream_text(sdk, n=200, first=ev)) for ev in firsts]
        for ev in firsts:
            await asyncio.wait_for(ev.wait(), 15)
        await cluster.redis.stop()
        # Streams in flight end with an error event, never half a stream passed off as whole.
        for outcome in await asyncio.gather(*streams, return_exceptions=True):
            assert isinstance(outcome, openai.APIError), outcome
        for broker in (a, b):
            async with httpx.AsyncClient(
                base_url=broker.url, headers={"Authorization": f"Bearer {USER_KEY}"}
            ) as client:
                r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
            assert r.status_code == 503
            assert r.headers["retry-after"]
            assert r.json()["error"]["code"] == "state_unavailable"
            assert (await ready(broker)).status_code == 503
        await cluster.redis.start()
        for broker in (a, b):
            await wait_for_ready(broker)
        await a.wait_model(MODEL, timeout=20)  # the connector registered again
        slow_llm.chunk_delay = 0.0
        reply = await sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
    assert reply.choices[0].message.content == "tok0 tok1 "


async def wait_for_ready(broker: Broker, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (await ready(broker)).status_code != 200:
        assert loop.time() < deadline, "the broker never became ready again"
        await asyncio.sleep(0.1)


async def test_a_rate_limit_holds_across_brokers(cluster: Cluster, fake_llm: FakeLLM) -> None:
    a, b, c = await cluster.start(3, "--rpm-limit", "4")
    cluster.connectors.append(await start_connector(b.url, fake_llm.url, capacity=8))
    await c.wait_model(MODEL)
    sdks = [openai_client(x.url, USER_KEY) for x in (a, b, c)]
    try:
        for i in range(4):  # the user's whole minute, spread over three brokers
            reply = await sdks[i % 3].chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1
            )
            assert reply.choices[0].message.content == "tok0 "
        for sdk in sdks:  # every broker knows the budget is spent
            with pytest.raises(openai.RateLimitError) as refused:
                await sdk.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1
                )
            headers = refused.value.response.headers
            assert float(headers["retry-after"]) > 0
            assert headers["x-ratelimit-limit-requests"] == "4"
    finally:
        for sdk in sdks:
            await sdk.close()
    assert len(fake_llm.seen) == 4
