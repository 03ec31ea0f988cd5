"""Serve the broker: the public port and the health port, one drain and shutdown path.

The HTTP server itself (Hypercorn or uvicorn, ``--server``) sits behind broker/serving.
"""

from __future__ import annotations

import asyncio
import signal

from broker.broker_state import BrokerState
from broker.composition import build_state, create_app, create_health_app
from broker.serving import listen_for, server_named
from broker.settings import BrokerSettings
from shared.logging import get_logger
from shared.loop import run

log = get_logger("broker.server")


class BrokerServer:
    """start / wait / drain / close around the two servers (one per port)."""

    def __init__(self, settings: BrokerSettings, state: BrokerState | None = None) -> None:
        self.settings = settings
        self.state = state or build_state(settings)
        self.app = create_app(settings, self.state)
        self._stop = asyncio.Event()
        self._servers_stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        s = self.settings
        serve = server_named(s.server)
        trigger = self._servers_stop.wait
        tasks = [
            asyncio.create_task(serve(self.app, listen_for(s.host, s.port, s, tls=True), trigger))
        ]
        if s.health_port:
            health = listen_for(s.health_host, s.health_port, s, tls=False)
            tasks.append(asyncio.create_task(serve(create_health_app(self.state), health, trigger)))
        log.info(
            "broker_started",
            url=s.advertised_url,
            health_port=s.health_port or None,
            server=s.server,
        )
        stopper = asyncio.create_task(self._drain_on_stop())
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a bind failure surfaces here
        finally:
            self._servers_stop.set()
            stopper.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        log.info("broker_stopped")

    async def _drain_on_stop(self) -> None:
        await self._stop.wait()
        hub = self.state.relay
        log.info("broker_draining", in_flight=hub.local_in_flight())
        hub.begin_drain()
        finished = await hub.wait_idle(self.settings.drain_timeout)
        if not finished:
            log.warning("drain_timeout", in_flight=hub.local_in_flight())
        self._servers_stop.set()


def serve(settings: BrokerSettings, state: BrokerState | None = None) -> None:
    async def main() -> None:
        server = BrokerServer(settings, state)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.request_stop)
        await server.run()

    run(main())
