from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from shared.bench.upstream import FakeLLM
from tests.support import procs as procs_module
from tests.support import stack as stack_module
from tests.support.procs import Procs
from tests.support.redis_server import RedisServer, redis_server_running, unique_prefix
from tests.support.stack import Stack, start_broker, start_connector

RELAY_MODES = ("memory", "redis")
# A test marked ``both_servers`` runs once per HTTP server (--server), every broker it
# starts (in-process or ``procs.broker``) on that server: the relay and API modules whose
# behaviour is the server's (streaming bodies, long polls, disconnects, bad input), the
# proxy paths, slow heads and the SIGTERM drain. REMOTELLM_TEST_SERVERS=uvicorn (or
# hypercorn) runs one of them only.
SERVERS = tuple(os.environ.get("REMOTELLM_TEST_SERVERS", "hypercorn,uvicorn").split(","))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``both_states`` run once per relay-state implementation, ``both_servers``
    once per HTTP server. The server and the state are independent, so a test
    that runs on both does the Redis state on the default server only."""
    states = metafunc.definition.get_closest_marker("both_states") is not None
    servers = metafunc.definition.get_closest_marker("both_servers") is not None
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
def llm_models() -> list[str]:
    """The models ``fake_llm`` lists (override it in a module to serve others)."""
    return ["fake-model"]


@pytest.fixture
async def fake_llm(llm_models: list[str]) -> AsyncIterator[FakeLLM]:
    fake = FakeLLM(models=llm_models)
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
