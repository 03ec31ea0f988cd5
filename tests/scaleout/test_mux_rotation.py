"""The multiplexed upload rotating across brokers: a load balancer sends each new upload
wherever it likes, and no answer is lost, cut or held (issue 18, item 1).

Two real broker processes on one redis-server behind the shipped nginx config (which
balances every request, so a connector's uploads alternate between the brokers), a real
connector rotating its upload every 16 KiB, and the openai SDK as the API user.
"""

from __future__ import annotations

import asyncio
import functools
import signal

import openai
import pytest

import connector.session
from connector.mux import MuxUploader
from shared.bench.upstream import FakeLLM
from tests.scaleout.conftest import Cluster
from tests.scaleout.fixtures import nginx_in_front
from tests.support.procs import Broker
from tests.support.stack import USER_KEY, start_connector

pytestmark = pytest.mark.e2e

MODEL = "fake-model"
TOKENS = 300  # ~60 KiB of SSE per answer: every answer spans several uploads
ROTATE = 16 * 1024
DRAIN = 20.0


async def _answer(sdk: openai.AsyncOpenAI) -> str:
    stream = await sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=TOKENS,
        stream=True,
    )
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def _idle(broker: Broker, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (health := await broker.health())["in_flight"]:
        assert loop.time() < deadline, f"still in flight on {broker.url}: {health}"
        await asyncio.sleep(0.1)


async def test_rotations_across_brokers_lose_nothing_and_drain_completes(
    cluster: Cluster, fake_llm: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        connector.session, "MuxUploader", functools.partial(MuxUploader, rotate_bytes=ROTATE)
    )
    a, b = await cluster.start(2, "--drain-timeout", str(DRAIN))
    nginx = nginx_in_front([a.port, b.port])
    try:
        conn = await start_connector(nginx.url, fake_llm.url, capacity=8, upload_mode="mux")
        cluster.connectors.append(conn)
        await a.wait_model(MODEL)
        fake_llm.chunk_delay = 0.002
        async with openai.AsyncOpenAI(
            base_url=nginx.url + "/v1", api_key=USER_KEY, max_retries=0, timeout=30.0
        ) as sdk:
            results = await asyncio.gather(*(_answer(sdk) for _ in range(8)))
        expected = "".join(f"tok{i} " for i in range(TOKENS))
        assert results == [expected] * 8  # byte-exact, none failed
        assert conn.connector.status.reconnects == 0
        uploads = [r for p in (a, b) for r in p.proc.events("mux_upload_opened")]  # type: ignore[union-attr]
        assert len(uploads) >= 10  # it rotated many times, on both brokers
        assert all(p.proc.events("mux_upload_opened") for p in (a, b))  # type: ignore[union-attr]
        await asyncio.gather(_idle(a, 10.0), _idle(b, 10.0))  # every request ended
        await conn.stop()
        cluster.connectors.remove(conn)
        # Neither broker keeps counting a request whose upload moved away: both drain.
        for broker in (a, b):
            assert broker.proc is not None
            broker.proc.signal(signal.SIGTERM)
        for broker in (a, b):
            assert broker.proc is not None
            draining = await broker.proc.wait_event(("broker_draining",))
            assert draining["in_flight"] == 0, broker.proc.tail()
            await broker.proc.wait_exit(DRAIN - 5)
            assert broker.proc.events("broker_stopped")
            assert not broker.proc.events("drain_timeout")
    finally:
        nginx.stop()
