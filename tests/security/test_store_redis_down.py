"""Redis going away answers 503 with Retry-After on every API path, never a 500.

Who: any API user, while the shared Redis (``--redis-url``) is down or restarting. Before,
the limiter's ``StateUnavailable`` (a request under a concurrency limit) and the relay
state's under ``GET /v1/models`` escaped their routes and came back as ``500 internal
error``: clients do not retry a 500 the way they retry a 503, and monitoring saw a broker
bug instead of an outage. Now the broker's one error converter answers 503 with
``Retry-After`` and a fixed text (no Redis details), and the broker serves again as soon
as Redis is back. Real processes: a redis-server that is killed and restarted on its
port, and a broker on a real socket.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from broker.core.errors import STATE_UNAVAILABLE
from tests.support.redis_server import RedisServer, unique_prefix
from tests.support.stack import USER_KEY, RunningBroker, start_broker

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
AUTH = {"Authorization": f"Bearer {USER_KEY}"}


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with RedisServer() as server:
        yield server


@pytest.fixture
async def broker(tmp_path: Path, redis: RedisServer) -> AsyncIterator[RunningBroker]:
    running = await start_broker(
        tmp_path / "b",
        redis_url=redis.url,
        redis_prefix=unique_prefix(),
        concurrency_limit=1,
        revocation_max_age=120.0,  # the board stays fresh: the limiter is what meets Redis
    )
    yield running
    await running.stop()


def _unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert int(r.headers["Retry-After"]) >= 1
    error = r.json()["error"]
    assert error["code"] == "state_unavailable" and error["message"] == STATE_UNAVAILABLE
    assert error["type"] == "server_error"


async def test_redis_down_is_503_with_retry_after_and_the_broker_recovers(
    broker: RunningBroker, redis: RedisServer
) -> None:
    async with httpx.AsyncClient(base_url=broker.url, headers=AUTH, timeout=15) as client:
        before = await client.post("/v1/chat/completions", json=CHAT)
        assert before.status_code in (404, 503) and before.status_code != 500
        await redis.stop()
        _unavailable(await client.post("/v1/chat/completions", json=CHAT))
        _unavailable(await client.get("/v1/models"))
        await redis.start()
        deadline = time.monotonic() + 20
        while (r := await client.post("/v1/chat/completions", json=CHAT)).status_code == 503:
            if r.json()["error"]["code"] != "state_unavailable":
                break
            assert time.monotonic() < deadline, "the broker did not serve again after Redis"
            await asyncio.sleep(0.2)
        assert r.status_code != 500
        models = await client.get("/v1/models")
        assert models.status_code == 200
