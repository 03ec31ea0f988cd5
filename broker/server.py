"""Serve the broker with Hypercorn: the public port and the health port, one shutdown path."""

from __future__ import annotations

import asyncio
import signal

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from broker.broker_state import BrokerState
from broker.composition import build_state, create_app, create_health_app
from broker.settings import BrokerSettings
from shared.logging import get_logger
from shared.loop import run

log = get_logger("broker.server")


def hypercorn_config(host: str, port: int, settings: BrokerSettings, tls: bool) -> Config:
    """The API/relay port (``tls=True``) or the health port (``tls=False``).

    Hypercorn closes a connection whose request head is not complete within
    ``keep_alive_timeout`` (its idle timer runs from accept and between requests and is not
    reset by bytes of a partial head), so that is ``--header-timeout``: a slow-loris head
    holds a socket that long at most. ``read_timeout`` bounds the silence of a connection
    with a request in flight: on the health port a request is answered at once; on the API
    port a client legitimately sends nothing while it waits up to ``--total-timeout`` for
    its answer.
    """
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.include_server_header = False
    config.keep_alive_timeout = settings.header_timeout
    silence = settings.total_timeout + settings.header_timeout if tls else settings.header_timeout
    config.read_timeout = int(silence) + 1
    config.graceful_timeout = 5.0
    # A burst of 1,000 new API clients overflows Hypercorn's default backlog of 100.
    config.backlog = settings.backlog
    if tls and settings.certfile and settings.keyfile:
        config.certfile = str(settings.certfile)
        config.keyfile = str(settings.keyfile)
    return config


class BrokerServer:
    """start / wait / close around the two Hypercorn servers."""

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
        tasks = [
            asyncio.create_task(
                hypercorn_serve(
                    self.app,
                    hypercorn_config(s.host, s.port, s, tls=True),
                    shutdown_trigger=self._servers_stop.wait,
                )
            )
        ]
        if s.health_port:
            tasks.append(
                asyncio.create_task(
                    hypercorn_serve(
                        create_health_app(self.state),
                        hypercorn_config(s.health_host, s.health_port, s, tls=False),
                        shutdown_trigger=self._servers_stop.wait,
                    )
                )
            )
        log.info("broker_started", url=s.advertised_url, health_port=s.health_port or None)
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
