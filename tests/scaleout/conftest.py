"""Several real broker processes sharing one real redis-server (tests/support/redis_server.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from shared.bench.upstream import FakeLLM
from tests.scaleout.fixtures import Redises, sentinel_set
from tests.support.net import free_ports
from tests.support.procs import Broker, Procs
from tests.support.redis_server import RedisServer
from tests.support.stack import TOKEN, USER_KEY, RunningConnector

# Short relay timings so leases and failures show within seconds.
BROKER_ARGS = ("--lease", "2", "--session-ttl", "10", "--poll-wait", "10")


@dataclass
class Cluster:
    procs: Procs
    redis: RedisServer
    root: Path
    brokers: list[Broker] = field(default_factory=list)
    connectors: list[RunningConnector] = field(default_factory=list)

    async def start(self, n: int, *extra: str) -> list[Broker]:
        """``n`` more broker processes on the one Redis, started side by side."""
        started = []
        ports = free_ports(2 * n)
        for _ in range(n):
            i = len(self.brokers)
            broker = Broker(ports.pop(), ports.pop(), self.root / f"broker{i}")
            broker.proc = await self.procs.start(
                f"broker{i}",
                "-m",
                "broker",
                *broker.base_args(),
                "--user-api-key",
                USER_KEY,
                "--connector-token",
                TOKEN,
                "--redis-url",
                self.redis.url,
                "--log-format",
                "json",
                *BROKER_ARGS,
                *extra,
            )
            self.brokers.append(broker)
            started.append(broker)
        # Several interpreters starting at once on a busy 2-core machine take a while.
        await asyncio.gather(*(b.wait_listening(timeout=90.0) for b in started))
        return started

    async def restart(self, broker: Broker) -> None:
        """Start ``broker`` again, same ports and arguments (after it was killed)."""
        assert broker.proc is not None
        await broker.proc.kill()
        broker.proc = await self.procs.start(broker.proc.name, *broker.proc.args)
        await broker.wait_listening(timeout=60.0)

    async def close(self) -> None:
        for conn in self.connectors:
            await conn.kill()
        await self.procs.close()


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with RedisServer() as server:
        yield server


@pytest.fixture
async def redises(tmp_path: Path) -> AsyncIterator[Redises]:
    """A master, a replica and three sentinels (tests/scaleout/fixtures.py)."""
    async with sentinel_set(tmp_path) as found:
        yield found


@pytest.fixture
async def cluster(tmp_path: Path, redis: RedisServer) -> AsyncIterator[Cluster]:
    c = Cluster(Procs(), redis, tmp_path)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def slow_llm() -> AsyncIterator[FakeLLM]:
    fake = FakeLLM(chunk_delay=0.05)
    await fake.start()
    yield fake
    await fake.stop()


async def ready(broker: Broker) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
        return await client.get(f"http://127.0.0.1:{broker.health_port}/ready")
