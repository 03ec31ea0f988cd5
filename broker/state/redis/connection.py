"""The one Redis client of a broker: at one address (--redis-url), or the master the
sentinels name (--redis-sentinel), so every user of the client (relay state, limits,
revocation board, portal sessions) follows a failover without a restart.

Both fail fast while Redis is down (one quick retry for a stale socket), and a bursty
broker waits for a pooled connection rather than opening one per request: redis-py's
default pool refuses the 101st concurrent command outright.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff


def _pool_options(max_connections: int) -> dict[str, Any]:
    return {
        "max_connections": max_connections,
        "timeout": 5.0,
        "socket_timeout": 5.0,
        "socket_connect_timeout": 2.0,
        "retry": Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
        "health_check_interval": 10,
    }


def connect(url: str, max_connections: int = 64) -> Redis:
    """A client of the Redis at ``url``."""
    pool = BlockingConnectionPool.from_url(url, **_pool_options(max_connections))
    return Redis.from_pool(pool)  # closing the client closes the pool


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Connections to the master the sentinels name, waited for when all are busy."""


def sentinel_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def url_credentials(url: str | None) -> dict[str, Any]:
    """The password, user name, db and TLS of ``url`` (its host is the sentinels' to name)."""
    if not url:
        return {}
    parts = urlsplit(url)
    found: dict[str, Any] = {"ssl": parts.scheme == "rediss"}
    if parts.password is not None:
        found["password"] = unquote(parts.password)
    if parts.username:
        found["username"] = unquote(parts.username)
    if parts.path.strip("/"):
        found["db"] = int(parts.path.strip("/"))
    return found


def connect_sentinel(
    sentinels: list[str], master: str, url: str | None = None, max_connections: int = 64
) -> Redis:
    """A client of the master ``master`` the ``sentinels`` (host:port) name; on a failover
    its connections drop and reconnect to whichever replica the sentinels promoted."""
    manager = Sentinel(  # type: ignore[no-untyped-call]
        [sentinel_address(a) for a in sentinels],
        sentinel_kwargs={"socket_timeout": 1.0, "socket_connect_timeout": 1.0},
    )
    client: Redis = manager.master_for(
        master,
        connection_pool_class=_BlockingSentinelPool,
        **_pool_options(max_connections),
        **url_credentials(url),
    )
    return client
