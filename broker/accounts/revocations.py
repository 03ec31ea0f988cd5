"""Key revocations and user blocks shared by brokers that keep their own users file.

With ``--redis-url`` every broker reports what it saw change in its users file (a key
gone, a user blocked or unblocked: the portal, ``remotellm-broker users`` or an operator's
edit) to a board in Redis, and reads the board back every ``--users-reload-interval``:

- ``P rv:keys``  hash  key SHA-256 -> when it was revoked (a revoked key never returns)
- ``P rv:users`` hash  user ID -> when it was blocked (removed when a broker sees the
  user unblocked)
- ``P rv:scopes`` hash  key SHA-256 -> its latest scope, JSON ``{"models": [...] | null,
  "expires": epoch | null, "at": epoch}``: written when a broker sees a key's models or
  expiry change; every broker applies it over its own copy of the file (the last change
  seen anywhere wins), so a narrowed key is refused everywhere as fast as a revoked one

A key on the board is refused as unknown (401) and a blocked user's keys as blocked
(403) on every broker, whatever its own copy of the file says. A broker that could not
read the board for ``--revocation-max-age`` seconds refuses API requests with 503 rather
than serve keys that may have been revoked meanwhile (docs/scale-out.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import RedisError

from broker.accounts.users_change import BoardScope, UsersChange, parse_scope
from shared.logging import get_logger

log = get_logger("broker.accounts.revocations")


@dataclass(slots=True)
class RevocationBoard:
    """This broker's copy of the shared board, and the changes it has yet to publish."""

    redis: Redis
    prefix: str
    max_age: float
    clock: Callable[[], float] = time.monotonic
    keys: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()
    scopes: Mapping[str, BoardScope] = field(default_factory=dict)
    synced_at: float | None = None
    _pending: list[UsersChange] = field(default_factory=list)

    def note(self, change: UsersChange) -> None:
        """Called by the users store (any thread) when a reload changed access."""
        if not change.empty:
            self._pending.append(change)

    def stale(self) -> bool:
        """True when the board was not read for ``max_age``: the API then answers 503."""
        last = self.synced_at
        return last is None or self.clock() - last > self.max_age

    def revoked(self, key_hash: str) -> bool:
        return key_hash in self.keys

    def blocked(self, user_id: str) -> bool:
        return user_id in self.users

    def scope(self, key_hash: str) -> BoardScope | None:
        return self.scopes.get(key_hash)

    async def sync(self) -> None:
        """Publish what this broker saw change, then read the whole board."""
        try:
            await self._publish()
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hkeys(self.prefix + "rv:keys")
                pipe.hkeys(self.prefix + "rv:users")
                pipe.hgetall(self.prefix + "rv:scopes")
                keys, users, scopes = await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("revocations_unreadable", error=str(exc))
            return
        self.keys = frozenset(_text(k) for k in keys)
        self.users = frozenset(_text(u) for u in users)
        read = {_text(k): parse_scope(v) for k, v in scopes.items()}
        self.scopes = {k: v for k, v in read.items() if v is not None}
        self.synced_at = self.clock()

    async def _publish(self) -> None:
        while self._pending:
            change = self._pending[0]
            now = str(time.time())
            keys, users = self.prefix + "rv:keys", self.prefix + "rv:users"
            async with self.redis.pipeline(transaction=True) as pipe:
                if change.revoked_keys:
                    pipe.hset(keys, mapping=dict.fromkeys(change.revoked_keys, now))
                if change.blocked:
                    pipe.hset(users, mapping=dict.fromkeys(change.blocked, now))
                if change.unblocked:
                    pipe.hdel(users, *change.unblocked)
                if change.scopes:
                    pipe.hset(
                        self.prefix + "rv:scopes",
                        mapping={d: s.dumps(float(now)) for d, s in change.scopes.items()},
                    )
                await pipe.execute()
            self._pending.pop(0)  # only once written: a Redis outage keeps it for next time
            log.info(
                "revocations_published",
                keys=len(change.revoked_keys),
                blocked=sorted(change.blocked),
                unblocked=sorted(change.unblocked),
                scopes=len(change.scopes),
            )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
