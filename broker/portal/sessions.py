"""Server-side portal sessions: the signed cookie names one, the broker's memory holds it.

A session ends when its user logs out, is blocked or has a key revoked by an admin, has
been idle for ``--session-idle``, is older than ``--session-lifetime``, or (with allowed
groups) is no longer in one at a check every ``--group-check-interval``. ``SessionStore``
keeps them in this broker process (a restart logs everyone out); with ``--redis-url``
``broker.portal.redis_sessions`` keeps them in Redis, so every broker sees a logout.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

MAX_PER_USER = 16  # logins kept per user; the oldest ends when one more starts


@dataclass(frozen=True, slots=True)
class GitLabTokens:
    """The user's GitLab OAuth tokens, kept only to re-check group membership."""

    access: str
    refresh: str


@dataclass(slots=True)
class SessionRecord:
    sid: str
    gitlab_id: int
    created: float
    seen: float
    checked: float  # last time GitLab confirmed an allowed group
    tokens: GitLabTokens | None
    retry_at: float = 0.0  # no group check before this (one in flight, or GitLab was down)


class Sessions(Protocol):
    """Where sessions live; ``clock`` is the time base of the records' fields."""

    clock: Callable[[], float]

    async def create(self, gitlab_id: int, tokens: GitLabTokens | None) -> SessionRecord: ...

    async def get(self, sid: str, gitlab_id: int) -> SessionRecord | None: ...

    async def save(self, record: SessionRecord) -> None: ...

    async def end(self, sid: str, gitlab_id: int) -> None: ...

    async def end_user(self, gitlab_id: int) -> int: ...


def expired(record: SessionRecord, now: float, lifetime: float, idle: float) -> bool:
    return now - record.created > lifetime or now - record.seen > idle


def new_record(gitlab_id: int, tokens: GitLabTokens | None, now: float) -> SessionRecord:
    return SessionRecord(secrets.token_urlsafe(24), gitlab_id, now, now, now, tokens)


class SessionStore:
    """Sessions by id, in this process; the clock is injectable for tests."""

    def __init__(
        self, lifetime: float, idle: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.lifetime = lifetime
        self.idle = idle
        self.clock = clock
        self._by_sid: dict[str, SessionRecord] = {}

    def __len__(self) -> int:
        return len(self._by_sid)

    async def create(self, gitlab_id: int, tokens: GitLabTokens | None) -> SessionRecord:
        now = self.clock()
        self._expire(now)
        mine = sorted(
            (r for r in self._by_sid.values() if r.gitlab_id == gitlab_id), key=lambda r: r.created
        )
        for old in mine[: max(0, len(mine) - MAX_PER_USER + 1)]:
            del self._by_sid[old.sid]
        record = new_record(gitlab_id, tokens, now)
        self._by_sid[record.sid] = record
        return record

    async def get(self, sid: str, gitlab_id: int) -> SessionRecord | None:
        """The live session ``sid`` of ``gitlab_id`` (marked as seen now), else None."""
        record = self._by_sid.get(sid)
        if record is None or record.gitlab_id != gitlab_id:
            return None
        now = self.clock()
        if self._expired(record, now):
            del self._by_sid[sid]
            return None
        record.seen = now
        return record

    async def save(self, record: SessionRecord) -> None:
        """Nothing to do: the caller changed the record kept here."""

    async def end(self, sid: str, gitlab_id: int) -> None:
        record = self._by_sid.get(sid)
        if record is not None and record.gitlab_id == gitlab_id:
            del self._by_sid[sid]

    async def end_user(self, gitlab_id: int) -> int:
        """End every session of one user; how many there were."""
        gone = [sid for sid, r in self._by_sid.items() if r.gitlab_id == gitlab_id]
        for sid in gone:
            del self._by_sid[sid]
        return len(gone)

    def _expired(self, record: SessionRecord, now: float) -> bool:
        return expired(record, now, self.lifetime, self.idle)

    def _expire(self, now: float) -> None:
        for sid in [s for s, r in self._by_sid.items() if self._expired(r, now)]:
            del self._by_sid[sid]
