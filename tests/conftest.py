from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.bench.upstream import FakeLLM
from tests.support import procs as procs_module
from tests.support import stack as stack_module
from tests.support.procs import Procs
from tests.support.redis_server import RedisServer, redis_server_running, unique_prefix
from tests.support.stack import Stack, start_broker, start_connector

RELAY_MODES = ("memory", "redis")
# Every broker these tests start is served by each HTTP server in turn (--server): the
# relay, API and proxy tests, and tests marked ``both_servers`` (slow heads, drain).
# REMOTELLM_TEST_SERVERS=hypercorn (or uvicorn) runs one of them only.
SERVERS = tuple(os.environ.get("REMOTELLM_TEST_SERVERS", "hypercorn,uvicorn").split(","))
BOTH_SERVERS_DIRS = ("integration", "proxies")
TESTS = Path(__file__).resolve().parent


def _on_both_servers(metafunc: pytest.Metafunc) -> bool:
    if metafunc.definition.get_closest_marker("both_servers") is not None:
        return True
    parts = Path(metafunc.definition.path).resolve().relative_to(TESTS).parts
    return parts[0] in BOTH_SERVERS_DIRS


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``both_states`` run once per relay-state implementation; relay, API and
    proxy tests once per HTTP server. The server and the state are independent, so a test
    that runs on both does the Redis state on the default server only."""
    states = metafunc.definition.get_closest_marker("both_states") is not None
    servers = _on_both_servers(metafunc)
    names = ("relay_mode",) * states + ("broker_server",) * servers
    for name in names:
        if name not in metafunc.fixturenames:
            metafunc.fixturenames.append(name)
    if states and servers:
        combos = [(mode, SERVERS[0]) for mode in RELAY_MODES]
        combos += [("memory", server) for server in SERVERS[1:]]
        ids = [f"{mode}-{server}" for mode, server in combos]
        metafunc.parametrize(("relay_mode", "broker_server"), combos, ids=ids)
    elif states:
        metafunc.parametrize("relay_mode", RELAY_MODES)
    elif servers:
        metafunc.parametrize("broker_server", SERVERS)


@pytest.fixture
def relay_mode(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "memory"))


@pytest.fixture
def broker_server(request: pytest.FixtureRequest) -> str:
    """The broker's --server in this test (the default unless the test runs on both)."""
    return str(getattr(request, "param", SERVERS[0]))


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisServer]:
    """One redis-server for the whole run; each test gets its own key prefix."""
    with redis_server_running() as server:
        yield server


@pytest.fixture(autouse=True)
def _relay_state_for_brokers(request: pytest.FixtureRequest) -> Iterator[None]:
    """In a ``both_states`` test, every broker ``start_broker`` starts uses that state; in a
    test on both servers, every broker (in-process or ``procs.broker``) that server."""
    options: dict[str, Any] = {}
    if request.node.get_closest_marker("both_states") is not None:
        if request.getfixturevalue("relay_mode") == "redis":
            server: RedisServer = request.getfixturevalue("shared_redis")
            options = {"redis_url": server.url, "redis_prefix": unique_prefix()}
    if "broker_server" in request.fixturenames:
        options["server"] = request.getfixturevalue("broker_server")
    stack_module.BROKER_DEFAULTS.clear()
    stack_module.BROKER_DEFAULTS.update(options)
    procs_module.BROKER_SERVER[:] = ["--server", options["server"]] if "server" in options else []
    yield
    stack_module.BROKER_DEFAULTS.clear()
    procs_module.BROKER_SERVER.clear()


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
