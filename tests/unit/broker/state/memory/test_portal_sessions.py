"""The in-memory portal session store: expiry by idle time and lifetime, the per-user cap."""

from __future__ import annotations

from broker.state.memory.portal_sessions import SessionStore
from broker.state.portal_sessions import MAX_PER_USER, GitLabTokens


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_idle_and_lifetime_end_a_session() -> None:
    clock = Clock()
    store = SessionStore(lifetime=100.0, idle=30.0, clock=clock)
    record = await store.create(7, GitLabTokens("a", "r"))
    clock.now += 25
    assert await store.get(record.sid, 7) is record  # seen: the idle time starts again
    assert await store.get(record.sid, 8) is None  # another user's cookie cannot name it
    clock.now += 29
    assert await store.get(record.sid, 7) is record
    clock.now += 31
    assert await store.get(record.sid, 7) is None
    other = await store.create(7, None)
    for _ in range(4):
        clock.now += 25
        assert await store.get(other.sid, 7) is not None
    clock.now += 1  # 101 s after login: past the lifetime though never idle
    assert await store.get(other.sid, 7) is None


async def test_end_and_end_user_and_the_cap_per_user() -> None:
    clock = Clock()
    store = SessionStore(lifetime=100.0, idle=30.0, clock=clock)
    first = await store.create(7, None)
    for _ in range(MAX_PER_USER):
        clock.now += 0.1
        await store.create(7, None)
    assert len(store) == MAX_PER_USER and await store.get(first.sid, 7) is None
    bob = await store.create(8, None)
    await store.end(bob.sid, 7)  # only with the owner's id
    assert await store.get(bob.sid, 8) is bob
    assert await store.end_user(7) == MAX_PER_USER
    await store.end(bob.sid, 8)
    assert len(store) == 0
