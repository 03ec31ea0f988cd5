"""The relay state in Redis, shared by several brokers (docs/scale-out.md)."""

from broker.redis_state.state import RedisRelayState, connect

__all__ = ["RedisRelayState", "connect"]
