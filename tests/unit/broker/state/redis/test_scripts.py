"""The Redis relay state's Lua scripts against a real redis-server, with the clock passed in.

No background task runs here (no ``start()``): each test calls the state's operations and
the sweeper script itself, at the times it chooses. Two ``RedisRelayState`` objects on one
prefix are two brokers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from broker.core import DuplicateRequest, LeaseError, Timings, UnknownModel, UnknownSession
from broker.state.redis import RedisRelayState, connect
from broker.state.redis.inbox import decode_failure, entry_frames
from shared.protocol import CancelItem, RequestItem
from tests.support.redis_server import RedisServer, unique_prefix
from tests.support.registrations import registration

T0 = 1_000_000.0
TIMINGS = Timings(lease=15.0, session_ttl=60.0, max_redispatch=1)


class Wall:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def brokers(shared_redis: RedisServer) -> AsyncIterator[tuple[RedisRelayState, ...]]:
    prefix = unique_prefix()
    wall = Wall()
    pair = tuple(
        RedisRelayState(TIMINGS, connect(shared_redis.url), prefix=prefix, wall=wall)
        for _ in range(2)
    )
    for b in pair:
        await b._heartbeat()
    yield pair
    for b in pair:
        await b.redis.aclose()


async def advance(brokers: tuple[RedisRelayState, ...], seconds: float) -> None:
    """Move the shared clock; the brokers' heartbeats (not running here) keep up with it."""
    wall = brokers[0].wall
    assert isinstance(wall, Wall)
    wall.now += seconds
    for b in brokers:
        await b._heartbeat()


async def register(state: RedisRelayState, name: str = "c1", capacity: int = 10) -> str:
    session, _ = await state.register(registration(name, capacity=capacity))
    return session.id


def item(rid: str) -> RequestItem:
    return RequestItem(request_id=rid, model="m", path="/v1/chat/completions", body="{}")


async def taken(state: RedisRelayState, sid: str) -> list[str]:
    return [i.request_id for i in await state._take("o", sid) if not isinstance(i, CancelItem)]


async def sweep(state: RedisRelayState) -> int:
    handled, _ = await state._run(
        "sweep", repr(state.wall()), TIMINGS.lease, 1, 256, TIMINGS.model_grace
    )
    return int(handled)


async def test_fifo_per_user_and_users_in_turn(brokers: tuple[RedisRelayState, ...]) -> None:
    a, b = brokers
    sid = await register(a, capacity=1)
    for n in range(5):
        await a.submit(item(f"a{n}"), user="alice")
    await b.submit(item("b0"), user="bob")  # another broker, another user, one request
    order = []
    for _ in range(6):
        got = await taken(b, sid)
        order += got
        for broker in brokers:  # the one holding it (its API user) frees the slot
            await broker.finish(got[0])
    assert order == ["a0", "b0", "a1", "a2", "a3", "a4"]


async def test_unknown_model_and_unknown_session(brokers: tuple[RedisRelayState, ...]) -> None:
    a, _ = brokers
    with pytest.raises(UnknownModel):
        await a.submit(item("r1"))
    sid = await register(a)
    with pytest.raises(UnknownSession):
        await a.session("someone-else", sid)


async def test_expired_lease_is_redispatched_once_by_two_sweepers(
    brokers: tuple[RedisRelayState, ...],
) -> None:
    a, b = brokers
    sid = await register(a)
    await a.submit(item("r1"))
    assert await taken(b, sid) == ["r1"]
    await advance(brokers, TIMINGS.lease + 1)
    assert [await sweep(a), await sweep(b)] == [1, 0]
    view = await a.view()
    assert view.redispatched == 1
    assert view.queue_depth == {"m": 1}
    # The holder gets a cancel for it; the next hand-out is attempt 2.
    items = await a._take("o", sid)
    assert items[0] == CancelItem(request_id="r1")
    assert [(i.request_id, getattr(i, "attempt", None)) for i in items[1:]] == [("r1", 2)]
    # A session that does not hold it cannot upload for it (409 at the relay).
    other = await register(b, name="c2")
    with pytest.raises(LeaseError):
        await b.ack(other, "r1")


async def test_past_max_redispatch_the_home_broker_gets_a_502(
    brokers: tuple[RedisRelayState, ...],
) -> None:
    a, b = brokers
    sid = await register(a)
    await a.submit(item("r1"))
    for _ in range(TIMINGS.max_redispatch + 1):
        assert await taken(b, sid) == ["r1"]
        await advance(brokers, TIMINGS.lease + 1)
        await sweep(b)
    assert (await a.view()).in_flight == 0
    answer = await a.redis.xread({a._inbox(a.broker_id): "0-0"})
    (_, entries), *_ = answer
    rid, frames = entry_frames(entries[-1][1])
    assert rid == "r1"
    assert frames[0][0] == b"f"
    assert decode_failure(frames[0][1]).status == 502


async def test_session_expiry_requeues_leased_and_unroutes(
    brokers: tuple[RedisRelayState, ...],
) -> None:
    a, b = brokers
    sid = await register(a)
    await a.submit(item("r1"))
    assert await taken(a, sid) == ["r1"]
    await advance(brokers, TIMINGS.session_ttl + 1)
    await sweep(b)
    view = await b.view()
    assert view.sessions == {}
    assert view.live_models == {}
    assert view.queue_depth == {"m": 1}  # back in the queue for the next connector


async def test_cancel_while_queued_and_after_hand_out(
    brokers: tuple[RedisRelayState, ...],
) -> None:
    a, b = brokers
    sid = await register(a, capacity=1)
    await a.submit(item("r1"))
    await a.submit(item("r2"))
    await a.cancel("r2")  # queued: simply gone
    assert (await a.view()).queue_depth == {"m": 1}
    assert await taken(b, sid) == ["r1"]
    await a.cancel("r1")  # leased: its connector is told, its upload is refused
    assert await b._take("o", sid) == [CancelItem(request_id="r1")]
    with pytest.raises(LeaseError):
        await b.ack(sid, "r1")
    assert (await a.view()).in_flight == 0


async def test_requests_of_a_dead_home_broker_are_dropped_not_served(
    brokers: tuple[RedisRelayState, ...],
) -> None:
    a, b = brokers
    sid = await register(b)
    await a.submit(item("r1"))
    await a.redis.zrem(a.prefix + "b", a.broker_id)  # a's heartbeat stopped
    assert await taken(b, sid) == []
    assert (await b.view()).in_flight == 0


async def test_waiting_lists_each_queue_in_serving_order(
    brokers: tuple[RedisRelayState, ...],
) -> None:
    a, b = brokers
    await register(a)
    for rid, user in (("a0", "alice"), ("a1", "alice"), ("b0", "bob")):
        await a.submit(item(rid), user=user)
    await advance(brokers, 2.0)
    queued = await b.waiting()
    assert [w.user for w in queued["m"]] == ["alice", "bob", "alice"]
    assert all(w.waited_s == 2.0 for w in queued["m"])


async def test_a_request_id_in_flight_is_refused(brokers: tuple[RedisRelayState, ...]) -> None:
    a = brokers[0]
    await register(a)
    await a.submit(item("r1"))
    for broker in brokers:
        with pytest.raises(DuplicateRequest):
            await broker.submit(item("r1"))
    assert (await a.view()).queue_depth == {"m": 1}


async def test_a_second_acknowledgement_moves_the_carrier(
    brokers: tuple[RedisRelayState, ...],
) -> None:
    # A rotated upload reached the other broker: that broker now carries the request, so
    # the first one's death (its bu: set is failed by the sweeper) must not fail it.
    a, b = brokers
    sid = await register(a)
    await a.submit(item("r1"))
    assert await taken(a, sid) == ["r1"]
    await a.ack(sid, "r1")
    await b.ack(sid, "r1")
    p = a.prefix
    assert await a.redis.smembers(p + "bu:" + a.broker_id) == set()
    assert await a.redis.smembers(p + "bu:" + b.broker_id) == {b"r1"}
    assert await a.redis.hget(p + "r:r1", "via") == b.broker_id.encode()
