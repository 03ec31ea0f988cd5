"""Portal sessions in Redis, for brokers that share state (``--redis-url``).

One JSON value per session, ``<prefix>portal:s:<sid>``, expiring after ``--session-idle``
without a request (never beyond ``--session-lifetime``), and one set per user,
``<prefix>portal:u:<gitlab id>``, of their session ids, so a logout, a block or a key
revoke on any broker ends them everywhere. Times are wall-clock seconds: brokers share them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from broker.state.portal_sessions import (
    MAX_PER_USER,
    GitLabTokens,
    SessionRecord,
    expired,
    new_record,
)


class RedisSessions:
    def __init__(
        self,
        redis: Redis,
        prefix: str,
        lifetime: float,
        idle: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.prefix = prefix + "portal:"
        self.lifetime = lifetime
        self.idle = idle
        self.clock = clock

    def _skey(self, sid: str) -> str:
        return f"{self.prefix}s:{sid}"

    def _ukey(self, gitlab_id: int) -> str:
        return f"{self.prefix}u:{gitlab_id}"

    async def create(self, gitlab_id: int, tokens: GitLabTokens | None) -> SessionRecord:
        record = new_record(gitlab_id, tokens, self.clock())
        await self.save(record)
        ukey = self._ukey(gitlab_id)
        await self.redis.sadd(ukey, record.sid)
        await self.redis.expire(ukey, math.ceil(self.lifetime))
        await self._trim(gitlab_id)
        return record

    async def get(self, sid: str, gitlab_id: int) -> SessionRecord | None:
        record = _decode(await self.redis.get(self._skey(sid)), sid)
        if record is None or record.gitlab_id != gitlab_id:
            return None
        now = self.clock()
        if expired(record, now, self.lifetime, self.idle):
            await self.end(sid, gitlab_id)
            return None
        record.seen = now
        await self.save(record)
        return record

    async def save(self, record: SessionRecord) -> None:
        left = min(self.idle, self.lifetime - (record.seen - record.created))
        await self.redis.set(self._skey(record.sid), _encode(record), ex=max(1, math.ceil(left)))

    async def end(self, sid: str, gitlab_id: int) -> None:
        await self.redis.delete(self._skey(sid))
        await self.redis.srem(self._ukey(gitlab_id), sid)

    async def end_user(self, gitlab_id: int) -> int:
        ukey = self._ukey(gitlab_id)
        sids = [_text(s) for s in await self.redis.smembers(ukey)]
        ended = await self.redis.delete(*[self._skey(s) for s in sids]) if sids else 0
        await self.redis.delete(ukey)
        return int(ended)

    async def _trim(self, gitlab_id: int) -> None:
        """Keep the newest MAX_PER_USER sessions of a user; forget ids that expired."""
        ukey = self._ukey(gitlab_id)
        sids = [_text(s) for s in await self.redis.smembers(ukey)]
        if len(sids) <= MAX_PER_USER:
            return
        values = await self.redis.mget([self._skey(s) for s in sids])
        live = [r for s, v in zip(sids, values, strict=True) if (r := _decode(v, s)) is not None]
        live.sort(key=lambda r: r.created)
        keep = {r.sid for r in live[-MAX_PER_USER:]}
        for sid in sids:
            if sid not in keep:
                await self.end(sid, gitlab_id)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _encode(record: SessionRecord) -> str:
    tokens = record.tokens
    return json.dumps(
        {
            "u": record.gitlab_id,
            "c": record.created,
            "s": record.seen,
            "k": record.checked,
            "r": record.retry_at,
            "a": tokens.access if tokens else None,
            "f": tokens.refresh if tokens else None,
        }
    )


def _decode(raw: Any, sid: str) -> SessionRecord | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        tokens = GitLabTokens(str(data["a"]), str(data["f"] or "")) if data["a"] else None
        return SessionRecord(
            sid,
            int(data["u"]),
            float(data["c"]),
            float(data["s"]),
            float(data["k"]),
            tokens,
            float(data["r"]),
        )
    except (ValueError, KeyError, TypeError):
        return None
