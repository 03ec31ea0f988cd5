"""What several scale-out tests share: the shipped nginx config run in front of broker
processes, and a Sentinel set (a master, a replica, three sentinels) on loopback."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from tests.proxies.servers import NGINX, ProxyProcess, need, open_dir
from tests.support.net import free_port
from tests.support.redis_server import RedisServer, Replica, SentinelServer

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "compose"

# An access log naming, for each request, the client's own x-request-id, every broker
# nginx tried (the last one served it) and the status: which broker served which request.
UPSTREAM_LOG = "log_format upstream '$http_x_request_id $upstream_addr $status';\n"


def nginx_in_front(ports: list[int], log_format: str = "") -> ProxyProcess:
    """The shipped config (deploy/compose/nginx-scale-out.conf) with the compose host names
    swapped for loopback ports; ``log_format`` (e.g. ``UPSTREAM_LOG``) names the access
    log's format ``upstream`` and the log uses it."""
    need(NGINX, "nginx-light")
    workdir = open_dir("nginx-scale-")
    port = free_port()
    site = (COMPOSE / "nginx-scale-out.conf").read_text()
    for name, upstream in zip(("broker-a", "broker-b"), ports, strict=True):
        site = site.replace(f"{name}:8443", f"127.0.0.1:{upstream}")
    site = site.replace("listen 8443;", f"listen 127.0.0.1:{port};")
    user = "user root;" if os.geteuid() == 0 else ""
    access = f"{workdir}/access.log" + (" upstream" if log_format else "")
    conf = (
        f"{user}\nworker_processes 1;\ndaemon off;\npid {workdir}/nginx.pid;\n"
        f"error_log {workdir}/error.log info;\nevents {{ worker_connections 256; }}\n"
        f"http {{\n client_body_temp_path {workdir}/body;\n proxy_temp_path {workdir}/proxy;\n"
        f" {log_format} access_log {access};\n{site}\n}}\n"
    )
    (workdir / "nginx.conf").write_text(conf)
    nginx = ProxyProcess("nginx", port, workdir, config=conf)
    conf_path, error_log = str(workdir / "nginx.conf"), str(workdir / "error.log")
    nginx.start([NGINX, "-p", str(workdir), "-e", error_log, "-c", conf_path])
    return nginx


@dataclass
class Redises:
    master: RedisServer
    replica: Replica
    sentinels: list[SentinelServer]

    def broker_args(self) -> list[str]:
        """``--redis-sentinel`` for each sentinel and ``--redis-sentinel-master``."""
        found = [a for s in self.sentinels for a in ("--redis-sentinel", s.address)]
        return [*found, "--redis-sentinel-master", self.sentinels[0].name]


async def info(port: int, section: str) -> dict[str, Any]:
    client = Redis(host="127.0.0.1", port=port, decode_responses=True)
    try:
        return dict(await client.info(section))
    finally:
        await client.aclose()


async def until(check: Callable[[], Awaitable[bool]], timeout: float) -> float:
    """Seconds until ``check()`` is true; fails after ``timeout``."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout, "not reached in time"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


@asynccontextmanager
async def sentinel_set(folder: Path) -> AsyncIterator[Redises]:
    """A master, its replica and three sentinels that all know each other."""
    master = await RedisServer().start()
    replica = Replica(master_port=master.port)
    await replica.start()
    sentinels = [SentinelServer(folder, master.port) for _ in range(3)]
    try:
        await asyncio.gather(*(s.start() for s in sentinels))

        async def ready() -> bool:
            link = (await info(replica.port, "replication")).get("master_link_status")
            seen = await asyncio.gather(*(info(s.port, "sentinel") for s in sentinels))
            # Each sentinel knows the replica and the two other sentinels.
            known = [(i["master0"]["slaves"], i["master0"]["sentinels"]) for i in seen]
            return link == "up" and known == [(1, 3)] * 3

        await until(ready, timeout=20.0)
        yield Redises(master, replica, sentinels)
    finally:
        await asyncio.gather(*(s.stop() for s in sentinels))
        await replica.stop()
        await master.stop()
