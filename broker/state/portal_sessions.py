"""Server-side portal sessions: the signed cookie names one, a ``Sessions`` store holds it.

A session ends when its user logs out, is blocked or has a key revoked by an admin, has
been idle for ``--session-idle``, is older than ``--session-lifetime``, or (with allowed
groups) is no longer in one at a check every ``--group-check-interval``. ``SessionStore``
(``broker.state.memory.portal_sessions``) keeps them in this broker process (a restart
logs everyone out); with ``--redis-url``
``broker.state.redis.portal_sessions`` keeps them in Redis, so every broker sees a logout.
"""

from __future__ import annotations

import secrets
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
