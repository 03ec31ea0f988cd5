"""Server-side portal sessions: the signed cookie names one, the broker's memory holds it.

A session ends when its user logs out, is blocked or has a key revoked by an admin, has
been idle for ``--session-idle``, is older than ``--session-lifetime``, or (with allowed
groups) is no longer in one at a check every ``--group-check-interval``. Sessions live in
this broker process: a restart logs everyone out, and behind several brokers the shipped
proxy configuration keeps a browser on one broker (docs/scale-out.md).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

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


class SessionStore:
    """Sessions by id, in memory; the clock is injectable for tests."""

    def __init__(
        self, lifetime: float, idle: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.lifetime = lifetime
        self.idle = idle
        self.clock = clock
        self._by_sid: dict[str, SessionRecord] = {}

    def __len__(self) -> int:
        return len(self._by_sid)

    def create(self, gitlab_id: int, tokens: GitLabTokens | None) -> SessionRecord:
        now = self.clock()
        self._expire(now)
        mine = sorted(
            (r for r in self._by_sid.values() if r.gitlab_id == gitlab_id), key=lambda r: r.created
        )
        for old in mine[: max(0, len(mine) - MAX_PER_USER + 1)]:
            del self._by_sid[old.sid]
        record = SessionRecord(secrets.token_urlsafe(24), gitlab_id, now, now, now, tokens)
        self._by_sid[record.sid] = record
        return record

    def get(self, sid: str, gitlab_id: int) -> SessionRecord | None:
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

    def end(self, sid: str) -> None:
        self._by_sid.pop(sid, None)

    def end_user(self, gitlab_id: int) -> int:
        """End every session of one user; how many there were."""
        gone = [sid for sid, r in self._by_sid.items() if r.gitlab_id == gitlab_id]
        for sid in gone:
            del self._by_sid[sid]
        return len(gone)

    def _expired(self, record: SessionRecord, now: float) -> bool:
        return now - record.created > self.lifetime or now - record.seen > self.idle

    def _expire(self, now: float) -> None:
        for sid in [s for s, r in self._by_sid.items() if self._expired(r, now)]:
            del self._by_sid[sid]
