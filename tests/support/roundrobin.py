"""A tiny TCP round-robin load balancer on loopback, in front of several brokers.

Each accepted connection goes to the next backend in turn; a backend that refuses the
connection is skipped (what a load balancer's health check does, only faster). Bytes are
copied both ways untouched, so keep-alive connections stay on one backend, as behind an
L4 balancer, and a backend that dies takes its connections with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass, field

from tests.support.net import free_port


@dataclass
class RoundRobin:
    backends: list[int]
    port: int = field(default_factory=free_port)
    accepted: dict[int, int] = field(default_factory=dict)  # backend port -> connections
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _turn: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RoundRobin:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> RoundRobin:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        for _ in range(len(self.backends)):
            port = self.backends[next(self._turn) % len(self.backends)]
            try:
                upstream = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue
            self.accepted[port] = self.accepted.get(port, 0) + 1
            return upstream
        return None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            upstream = await self._connect()
            if upstream is None:
                return
            up_reader, up_writer = upstream
            try:
                await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            writer.close()
            self._tasks.discard(task)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, asyncio.CancelledError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(ConnectionError, OSError, RuntimeError):
        if writer.can_write_eof():
            writer.write_eof()
