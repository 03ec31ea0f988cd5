"""A real redis-server on a free loopback port, for the Redis mode of the relay state.

No persistence (``--save '' --appendonly no``), so a restart is a Redis that lost
everything: the worst case the brokers must survive. ``stop`` and ``start`` keep the port,
so a test can take Redis away and bring it back under running brokers.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.net import free_port, wait_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@dataclass
class RedisServer:
    port: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def args(self) -> list[str]:
        return [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ]

    async def start(self) -> RedisServer:
        self.process = await asyncio.create_subprocess_exec(
            *self.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await wait_port(self.port)
        return self

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.kill()  # abrupt on purpose: what a crashed Redis looks like
        await process.wait()

    async def __aenter__(self) -> RedisServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@contextmanager
def redis_server_running() -> Iterator[RedisServer]:
    """The same, without an event loop (for a session-scoped fixture)."""
    server = RedisServer()
    process = subprocess.Popen(
        server.args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10.0
        while True:
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=1.0).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on {server.port}") from None
                time.sleep(0.02)
        yield server
    finally:
        process.kill()
        process.wait()


def unique_prefix() -> str:
    """One key prefix per test: tests sharing one redis-server never see each other."""
    return "t" + secrets.token_hex(4) + ":"


REDIS_SENTINEL = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"


@dataclass
class Replica(RedisServer):
    """A redis-server replicating ``master_port`` (the sentinels may promote it)."""

    master_port: int = 0

    @property
    def args(self) -> list[str]:
        # Loads the master's data from the socket: no dump.rdb left in the working dir.
        sync = ["--replicaof", "127.0.0.1", str(self.master_port), "--repl-diskless-load", "swapdb"]
        return [*super().args, *sync]


@dataclass
class SentinelServer:
    """A redis-sentinel watching the master at ``master_port`` under ``name``: it decides
    the master is down after ``down_after_ms`` and, with a quorum of two, promotes a replica.
    Its config file lives in ``folder`` (Sentinel rewrites it as it learns)."""

    folder: Path
    master_port: int
    name: str = "remotellm"
    down_after_ms: int = 1000
    port: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _config(self) -> Path:
        path = self.folder / f"sentinel-{self.port}.conf"
        path.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.folder}\n"
            f"sentinel monitor {self.name} 127.0.0.1 {self.master_port} 2\n"
            f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.name} 3000\n"
            f"sentinel parallel-syncs {self.name} 1\n"
        )
        return path

    async def start(self) -> SentinelServer:
        self.process = await asyncio.create_subprocess_exec(
            REDIS_SENTINEL,
            str(self._config()),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await wait_port(self.port)
        return self

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
