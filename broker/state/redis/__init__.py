"""The relay state in Redis, shared by several brokers (docs/scale-out.md)."""

from broker.state.redis.relay import RedisRelayState, connect

__all__ = ["RedisRelayState", "connect"]
