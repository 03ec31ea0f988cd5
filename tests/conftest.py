from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from shared.bench.upstream import FakeLLM
from tests.support import stack as stack_module
from tests.support.procs import Procs
from tests.support.redis_server import RedisServer, redis_server_running, unique_prefix
from tests.support.stack import Stack, start_broker, start_connector

RELAY_MODES = ("memory", "redis")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``both_states`` run once per relay-state implementation."""
    if metafunc.definition.get_closest_marker("both_states") is not None:
        if "relay_mode" not in metafunc.fixturenames:
            metafunc.fixturenames.append("relay_mode")
        metafunc.parametrize("relay_mode", RELAY_MODES)


@pytest.fixture
def relay_mode(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "memory"))


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisServer]:
    """One redis-server for the whole run; each test gets its own key prefix."""
    with redis_server_running() as server:
        yield server


@pytest.fixture(autouse=True)
def _relay_state_for_brokers(request: pytest.FixtureRequest) -> Iterator[None]:
    """In a ``both_states`` test, every broker ``start_broker`` starts uses that state."""
    options: dict[str, Any] = {}
    if request.node.get_closest_marker("both_states") is not None:
        if request.getfixturevalue("relay_mode") == "redis":
            server: RedisServer = request.getfixturevalue("shared_redis")
            options = {"redis_url": server.url, "redis_prefix": unique_prefix()}
    stack_module.BROKER_DEFAULTS.clear()
    stack_module.BROKER_DEFAULTS.update(options)
    yield
    stack_module.BROKER_DEFAULTS.clear()


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeLLM]:
    fake = FakeLLM()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def procs() -> AsyncIterator[Procs]:
    """Broker and connector processes of one test, killed at teardown if still running."""
    running = Procs()
    try:
        yield running
    finally:
        await running.close()


@pytest.fixture
def broker_overrides() -> dict[str, Any]:
    """Broker settings for the ``stack`` fixture (parametrize it to change them per test)."""
    return {}


@pytest.fixture
async def stack(
    tmp_path, fake_llm: FakeLLM, broker_overrides: dict[str, Any]
) -> AsyncIterator[Stack]:
    broker = await start_broker(tmp_path / "broker", **broker_overrides)
    conn = await start_connector(broker.url, fake_llm.url)
    s = Stack(broker, [conn])
    yield s
    for c in s.connectors:
        await c.stop()
    await broker.stop()
