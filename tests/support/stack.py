"""Start real brokers and connectors in-process (127.0.0.1, free ports; the broker on the
HTTP server the test runs on, tests/conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from broker.server import BrokerServer
from broker.settings import BrokerSettings
from broker.state.relay import RelayView
from connector.runner import Connector
from connector.settings import ConnectorSettings
from tests.support.net import free_port, free_ports, wait_for, wait_port

USER_KEY = "sk-" + "1" * 32
TOKEN = "ct-test-token"

# Settings every broker of the running test starts with: tests/conftest.py puts the Redis
# relay state here for tests marked ``both_states`` when they run in the "redis" mode.
BROKER_DEFAULTS: dict[str, Any] = {}


@dataclass
class RunningBroker:
    settings: BrokerSettings
    server: BrokerServer
    task: asyncio.Task[None]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.health_port}"

    @property
    def hub(self):  # type: ignore[no-untyped-def]
        return self.server.state.relay

    @property
    def redis_mode(self) -> bool:
        return self.settings.redis_configured

    async def view(self) -> RelayView:
        """The relay state as this broker sees it (shared by all brokers in the Redis mode)."""
        view: RelayView = await self.server.state.relay.view()
        return view

    async def wait_view(
        self, check: Callable[[RelayView], bool], timeout: float = 10.0
    ) -> RelayView:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            view = await self.view()
            if check(view):
                return view
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"relay state never matched: {view}")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.server.request_stop()
        await asyncio.wait_for(self.task, 20)


async def start_broker(data_dir: Path, port: int | None = None, **overrides: Any) -> RunningBroker:
    main, health = free_ports(2)
    if port is not None:  # a restart in place: the health port must differ from it
        main, health = port, health if health != port else main
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": main,
        "health_port": health,
        "data_dir": data_dir,
        "user_api_keys": [USER_KEY],
        "connector_tokens": [TOKEN],
        "generate_credentials": False,
        "drain_timeout": 5.0,
    }
    values.update(BROKER_DEFAULTS)
    values.update(overrides)
    settings = BrokerSettings(**values)
    server = BrokerServer(settings)
    task = asyncio.create_task(server.run())
    await wait_port(settings.port)
    return RunningBroker(settings, server, task)


@dataclass
class RunningConnector:
    connector: Connector
    task: asyncio.Task[None]

    async def wait_registered(self, timeout: float = 20.0) -> None:
        await wait_for(lambda: self.connector.status.session_id is not None, timeout)

    async def stop(self) -> None:
        self.connector.request_stop()
        await asyncio.wait_for(self.task, 30)

    async def kill(self) -> None:
        """Die without a goodbye: every task cancelled, connections dropped."""
        for task in list(self.connector.tasks.values()):
            task.cancel()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task


async def start_connector(broker_url: str, llm_url: str, **overrides: Any) -> RunningConnector:
    values: dict[str, Any] = {
        "broker_url": broker_url,
        "broker_token": TOKEN,
        "llm_url": llm_url,
        "name": "conn-" + str(free_port()),
        "capacity": 4,
        "upload_mode": "stream",
        "drain_timeout": 5.0,
    }
    # Straight to the broker on loopback, unless the test chose a path (a proxy, an upload
    # mode): streaming polls without the probe. The download probe (three pieces 300 ms
    # apart) would add 0.6 s to each connector's start, minutes over the suite; behind a
    # proxy it decides, as in production (mitmproxy, for one, holds answers back).
    direct = "proxy" not in overrides and "upload_mode" not in overrides
    values["poll_mode"] = "stream" if direct else "auto"
    values.update(overrides)
    connector = Connector(ConnectorSettings(**values))
    running = RunningConnector(connector, asyncio.create_task(connector.run()))
    await running.wait_registered()
    return running


@dataclass
class Stack:
    broker: RunningBroker
    connectors: list[RunningConnector] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return self.broker.url + "/v1"

    def client(self, **kw: Any) -> httpx.AsyncClient:
        kw.setdefault("timeout", 30.0)
        return httpx.AsyncClient(
            base_url=self.broker.url, headers={"Authorization": f"Bearer {USER_KEY}"}, **kw
        )
