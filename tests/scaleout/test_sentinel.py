"""Redis with Sentinel: the master dies, a replica is promoted, the broker follows it
without a restart (docs/scale-out.md, "Redis with Sentinel").

Real processes: a master redis-server, a replica, three redis-sentinel, a broker started
with ``--redis-sentinel`` x3 and ``--redis-sentinel-master``; a connector (in this
process) and the fake upstream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from shared.bench.upstream import FakeLLM
from tests.support.procs import Procs
from tests.support.redis_server import RedisServer, Replica, SentinelServer
from tests.support.stack import TOKEN, USER_KEY, start_connector

pytestmark = pytest.mark.e2e

MODEL = "fake-model"
RECOVERY_BOUND = 15.0  # seconds from the master's death to a served request


@dataclass
class Redises:
    master: RedisServer
    replica: Replica
    sentinels: list[SentinelServer]


async def _info(port: int, section: str) -> dict[str, Any]:
    client = Redis(host="127.0.0.1", port=port, decode_responses=True)
    try:
        return dict(await client.info(section))
    finally:
        await client.aclose()


async def _until(check, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.1)


@pytest.fixture
async def redises(tmp_path: Path) -> AsyncIterator[Redises]:
    master = await RedisServer().start()
    replica = await Replica(master_port=master.port).start()
    sentinels = [SentinelServer(tmp_path, master.port) for _ in range(3)]
    try:
        await asyncio.gather(*(s.start() for s in sentinels))

        async def ready() -> bool:
            link = (await _info(replica.port, "replication")).get("master_link_status")
            seen = await asyncio.gather(*(_info(s.port, "sentinel") for s in sentinels))
            # Each sentinel knows the replica and the two other sentinels.
            known = [(i["master0"]["slaves"], i["master0"]["sentinels"]) for i in seen]
            return link == "up" and known == [(1, 3)] * 3

        await _until(ready, timeout=20.0)
        yield Redises(master, replica, sentinels)
    finally:
        await asyncio.gather(*(s.stop() for s in sentinels))
        await replica.stop()
        await master.stop()


async def _served(api: httpx.AsyncClient) -> bool:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    try:
        r = await api.post("/v1/chat/completions", json=body, timeout=3.0)
    except httpx.HTTPError:
        return False
    return r.status_code == 200


async def test_the_broker_follows_a_failover_without_a_restart(
    redises: Redises, tmp_path: Path, fake_llm: FakeLLM, procs: Procs
) -> None:
    sentinel_args = [a for s in redises.sentinels for a in ("--redis-sentinel", s.address)]
    if True:
        broker = await procs.broker(
            tmp_path / "broker",
            "--user-api-key",
            USER_KEY,
            "--connector-token",
            TOKEN,
            *sentinel_args,
            "--redis-sentinel-master",
            redises.sentinels[0].name,
            "--session-ttl",
            "10",
            "--poll-wait",
            "5",
        )
        conn = await start_connector(broker.url, fake_llm.url)
        try:
            headers = {"Authorization": f"Bearer {USER_KEY}"}
            async with httpx.AsyncClient(base_url=broker.url, headers=headers) as api:
                assert await _served(api)
                await redises.master.stop()  # SIGKILL: what a crashed master looks like
                died = time.monotonic()
                await _until(lambda: _served(api), timeout=RECOVERY_BOUND)
                recovered = time.monotonic() - died
                print(f"\nserved again {recovered:.2f} s after the master died")
                role = (await _info(redises.replica.port, "replication"))["role"]
                assert role == "master"  # promoted, and the broker is on it
                assert await _served(api)
            status = conn.connector.status
            print(f"connector re-registrations: {status.reconnects}")
            assert status.session_id is not None
        finally:
            await conn.stop()
