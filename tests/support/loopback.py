"""A test's own Quart app on 127.0.0.1 (the fake LLM, the fake GitLab): start / stop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from hypercorn.asyncio import serve
from hypercorn.config import Config
from quart import Quart

from tests.support.net import free_port, wait_port


@dataclass
class LoopbackApp:
    """Subclasses build their routes in ``app()``; ``start`` serves it on a free port."""

    port: int = 0
    _stop: asyncio.Event | None = None
    _task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> Quart:
        raise NotImplementedError

    async def start(self, port: int | None = None) -> None:
        self.port = port or free_port()
        config = Config()
        config.bind = [f"127.0.0.1:{self.port}"]
        config.accesslog = None
        config.errorlog = None
        config.graceful_timeout = 0.5
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(
            serve(self.app(), config, shutdown_trigger=self._stop.wait)
        )
        await wait_port(self.port)

    async def stop(self) -> None:
        assert self._stop is not None and self._task is not None
        self._stop.set()
        await asyncio.wait_for(self._task, 10)
