"""Portal sessions in this broker process (a restart logs everyone out)."""

from __future__ import annotations

import time
from collections.abc import Callable

from broker.state.portal_sessions import (
    MAX_PER_USER,
    GitLabTokens,
    SessionRecord,
    expired,
    new_record,
)


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
