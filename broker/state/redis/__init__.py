"""The relay state in Redis, shared by several brokers (docs/scale-out.md)."""

from broker.state.redis.connection import connect, connect_sentinel
from broker.state.redis.relay import RedisRelayState

__all__ = ["RedisRelayState", "connect", "connect_sentinel"]
