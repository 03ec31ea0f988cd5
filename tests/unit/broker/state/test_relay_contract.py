"""The ``RelayState`` contract: one table of scenarios, a fake clock, every implementation.

Each scenario runs against the in-memory state and the Redis state (a real redis-server,
no background tasks): time moves only through ``Relay.advance``, which sets the fake clock
and has the state do at once what its timers would (``run_due``). Polls hold for 0 s. A
new implementation adds itself to ``IMPLEMENTATIONS`` and must pass every scenario; the
failures it reports must be the ones in ``broker.core.failures``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from broker.core import (
    DispatchError,
    Draining,
    DuplicateRequest,
    Failure,
    Pending,
    QueueFull,
    Seen,
    SessionReplaced,
    Timings,
    TooManySessions,
    UnknownModel,
    UnknownSession,
)
from broker.core import failures as rules
from broker.core.aliases import Target, session_routes
from broker.state.channel import ResponseChannel
from broker.state.memory.relay import MemoryRelayState
from broker.state.redis import RedisRelayState, connect
from shared.protocol import CancelItem, Replaced, RequestItem, WorkItem
from tests.support.redis_server import RedisServer, unique_prefix
from tests.support.registrations import registration

IMPLEMENTATIONS = ("memory", "redis")
T0 = 1_767_225_000.0
TIMINGS = Timings(
    lease=5.0,
    session_ttl=60.0,
    queue_wait=20.0,
    queue_max=2,
    first_byte_timeout=20.0,
    idle_timeout=35.0,
    total_timeout=45.0,
    max_redispatch=1,
    max_sessions_per_identity=2,
    model_grace=100.0,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Relay:
    """One implementation under test, and the fake clock it reads."""

    state: MemoryRelayState | RedisRelayState
    clock: FakeClock

    async def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        await self.state.run_due()

    async def register(self, name: str = "c1", capacity: int = 1, owner: str = "o") -> str:
        session, _ = await self.register_as(name, capacity, owner)
        return session

    async def register_as(self, name: str, capacity: int, owner: str) -> tuple[str, Replaced]:
        session, replaced = await self.state.register(
            registration(name, owner=owner, capacity=capacity)
        )
        return session.id, replaced

    async def submit(self, rid: str, user: str | None = None) -> ResponseChannel:
        _, channel = await self.state.submit(item(rid), user=user)
        assert isinstance(channel, ResponseChannel)
        return channel

    async def poll(self, sid: str) -> list[WorkItem]:
        return await self.state.poll("o", sid, 0.0)

    async def handed(self, sid: str) -> list[tuple[str, int]]:
        """The requests a poll hands out, with their attempt numbers."""
        return [(i.request_id, i.attempt) for i in await self.poll(sid) if is_request(i)]

    async def ack(self, sid: str, rid: str) -> Pending:
        pending, _ = await self.state.ack(sid, rid)
        return pending


def item(rid: str, model: str = "m") -> RequestItem:
    return RequestItem(request_id=rid, model=model, path="/v1/chat/completions", body="{}")


def is_request(work: WorkItem) -> bool:
    return isinstance(work, RequestItem)


async def failure_of(channel: ResponseChannel) -> Failure | None:
    events = await channel.get(timeout=0.01)
    found = [e for e in events if isinstance(e, Failure)]
    return found[-1] if found else None


@pytest.fixture(params=IMPLEMENTATIONS)
async def relay(request: pytest.FixtureRequest) -> AsyncIterator[Relay]:
    clock = FakeClock()
    if request.param == "memory":
        state: MemoryRelayState | RedisRelayState = MemoryRelayState(TIMINGS, clock)
    else:
        server: RedisServer = request.getfixturevalue("shared_redis")
        state = RedisRelayState(
            TIMINGS, connect(server.url), prefix=unique_prefix(), clock=clock, wall=clock
        )
    yield Relay(state, clock)
    await state.stop()


Scenario = Callable[[Relay], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(body: Scenario) -> Scenario:
    SCENARIOS[body.__name__] = body
    return body


# -- sessions ------------------------------------------------------------------------------


@scenario
async def sessions_belong_to_their_identity(r: Relay) -> None:
    sid = await r.register()
    assert (await r.state.session("o", sid)).name == "c1"
    with pytest.raises(UnknownSession) as caught:
        await r.state.session("someone-else", sid)
    assert not isinstance(caught.value, SessionReplaced)
    view = await r.state.view()
    assert set(view.sessions) == {sid} and view.live_models == {"m": ["c1"]}


@scenario
async def registering_the_same_name_replaces_the_session(r: Relay) -> None:
    old = await r.register()
    new, replaced = await r.register_as("c1", 1, "o")
    assert replaced is Replaced.RESTART and new != old
    with pytest.raises(SessionReplaced):
        await r.state.session("o", old)
    assert set((await r.state.view()).sessions) == {new}


@scenario
async def an_identity_holds_at_most_its_cap_of_sessions(r: Relay) -> None:
    await r.register("c1")
    await r.register("c2")
    with pytest.raises(TooManySessions):
        await r.register("c3")
    await r.register("c1")  # replacing one is not one more


@scenario
async def an_expired_session_leaves_its_model_known_for_the_grace(r: Relay) -> None:
    sid = await r.register()
    await r.advance(TIMINGS.session_ttl + 1)
    with pytest.raises(UnknownSession):
        await r.state.session("o", sid)
    with pytest.raises(DispatchError) as caught:
        await r.submit("r1")
    assert caught.value.message == rules.refusal("noconn", "m").message
    await r.advance(TIMINGS.model_grace + 1)
    with pytest.raises(UnknownModel):
        await r.submit("r2")


@scenario
async def deregistering_requeues_the_leased_and_fails_the_active(r: Relay) -> None:
    sid = await r.register(capacity=2)
    active = await r.submit("r1")
    await r.submit("r2")
    assert await r.handed(sid) == [("r1", 1), ("r2", 1)]
    await r.ack(sid, "r1")
    await r.state.deregister("o", sid)
    await r.advance(0)
    assert await failure_of(active) == rules.connector_gone(rules.STOPPED)
    assert (await r.state.view()).queue_depth == {"m": 1}


async def register_routes(r: Relay, name: str) -> str:
    """A session as the relay app registers it: each model also pinned to its name."""
    session, _ = await r.state.register(registration(name, models=session_routes(["m"], name)))
    return session.id


@scenario
async def a_pinned_route_reaches_only_the_session_of_its_name(r: Relay) -> None:
    c1 = await register_routes(r, "c1")
    c2 = await register_routes(r, "c2")
    await r.state.submit(item("r1", model=Target("m", "c2").route))
    view = await r.state.view()
    # Views show models only: a pinned route counts under its model.
    assert view.live_models == {"m": ["c1", "c2"]}
    assert {s.models for s in view.sessions.values()} == {frozenset({"m"})}
    assert view.queue_depth == {"m": 1}
    assert await r.handed(c1) == []
    assert await r.handed(c2) == [("r1", 1)]
    with pytest.raises(UnknownModel):
        await r.state.submit(item("r2", model=Target("m", "c3").route))
    await r.state.deregister("o", c2)
    with pytest.raises(DispatchError) as caught:  # known for the grace, like any model
        await r.state.submit(item("r3", model=Target("m", "c2").route))
    assert caught.value.code == "no_connector"


# -- requests ------------------------------------------------------------------------------


@scenario
async def submits_are_refused_with_the_tables_errors(r: Relay) -> None:
    with pytest.raises(UnknownModel) as unknown:
        await r.submit("r0")
    assert unknown.value.message == rules.refusal("unknown", "m").message
    await r.register()
    await r.submit("r1")
    with pytest.raises(DuplicateRequest):
        await r.submit("r1")
    await r.submit("r2")
    with pytest.raises(QueueFull) as full:
        await r.submit("r3")
    assert full.value.message == rules.refusal("full", "m").message


@scenario
async def requests_are_handed_out_oldest_first_and_users_in_turn(r: Relay) -> None:
    sid = await r.register()
    await r.submit("a0", user="alice")
    await r.submit("a1", user="alice")
    with pytest.raises(QueueFull):
        await r.submit("b0", user="bob")
    assert await r.handed(sid) == [("a0", 1)]
    await r.state.finish("a0")
    await r.submit("b0", user="bob")
    assert [w.user for w in (await r.state.waiting())["m"]] == ["alice", "bob"]
    order = []
    for _ in range(2):
        (got,) = await r.handed(sid)
        order.append(got[0])
        await r.state.finish(got[0])
    assert order == ["a1", "b0"]
    assert (await r.state.view()).in_flight == 0


@scenario
async def a_session_gets_no_more_than_its_capacity(r: Relay) -> None:
    sid = await r.register(capacity=1)
    await r.submit("r1")
    await r.submit("r2")
    assert await r.handed(sid) == [("r1", 1)]
    assert await r.handed(sid) == []
    await r.ack(sid, "r1")
    await r.state.finish("r1")
    assert await r.handed(sid) == [("r2", 1)]
    assert (await r.state.view()).sessions[sid].active == 1


@scenario
async def a_request_that_waits_only_for_a_slot_is_counted(r: Relay) -> None:
    sid = await r.register(capacity=1)
    await r.submit("r1")
    assert (await r.state.view()).slot_waits == {}
    await r.handed(sid)
    await r.submit("r2")
    assert (await r.state.view()).slot_waits == {"m": 1}


@scenario
async def draining_refuses_submits_and_holds_the_queue(r: Relay) -> None:
    sid = await r.register()
    await r.submit("r1")
    r.state.begin_drain()
    assert r.state.draining and (await r.state.view()).draining
    with pytest.raises(Draining) as caught:
        await r.submit("r2")
    assert caught.value.message == rules.refusal("draining").message
    assert await r.handed(sid) == []


@scenario
async def an_expired_lease_is_requeued_and_its_holder_told_to_stop(r: Relay) -> None:
    sid = await r.register()
    await r.submit("r1")
    assert await r.handed(sid) == [("r1", 1)]
    await r.advance(TIMINGS.lease + 1)
    items = await r.poll(sid)
    assert items[0] == CancelItem(request_id="r1")
    assert [(i.request_id, i.attempt) for i in items[1:] if isinstance(i, RequestItem)] == [
        ("r1", 2)
    ]
    assert (await r.state.view()).redispatched == 1


@scenario
async def past_max_redispatch_the_request_fails(r: Relay) -> None:
    sid = await r.register()
    channel = await r.submit("r1")
    for attempt in range(1, TIMINGS.max_redispatch + 2):
        assert await r.handed(sid) == [("r1", attempt)]
        await r.advance(TIMINGS.lease + 1)
    assert await failure_of(channel) == rules.UNANSWERED
    assert (await r.state.view()).in_flight == 0


@scenario
async def a_request_nobody_takes_times_out_in_the_queue(r: Relay) -> None:
    await r.register()
    channel = await r.submit("r1")
    await r.advance(TIMINGS.queue_wait - 1)
    assert await failure_of(channel) is None
    await r.advance(2)
    assert await failure_of(channel) == rules.QUEUE_TIMEOUT
    assert (await r.state.view()).queue_depth == {}


@scenario
async def no_head_in_time_fails_the_request(r: Relay) -> None:
    sid = await r.register()
    channel = await r.submit("r1")
    await r.handed(sid)
    await r.ack(sid, "r1")
    await r.advance(TIMINGS.first_byte_timeout + 1)
    assert await failure_of(channel) == rules.NO_HEAD


@scenario
async def a_silent_response_stalls(r: Relay) -> None:
    sid = await r.register()
    channel = await r.submit("r1")
    await r.handed(sid)
    pending = await r.ack(sid, "r1")
    r.state.progress(pending, Seen.HEAD, r.clock())
    await r.advance(TIMINGS.first_byte_timeout + 1)
    assert await failure_of(channel) is None
    await r.advance(TIMINGS.idle_timeout - TIMINGS.first_byte_timeout)
    assert await failure_of(channel) == rules.STALLED


@scenario
async def a_live_response_still_ends_at_the_total_timeout(r: Relay) -> None:
    sid = await r.register()
    channel = await r.submit("r1")
    await r.handed(sid)
    pending = await r.ack(sid, "r1")
    r.state.progress(pending, Seen.HEAD, r.clock())
    for _ in range(4):
        await r.advance(10)
        r.state.progress(pending, Seen.FRAME, r.clock())
    assert await failure_of(channel) is None
    await r.advance(TIMINGS.total_timeout - 40 + 1)
    assert await failure_of(channel) == rules.TOO_LONG


# -- cancels -------------------------------------------------------------------------------


@scenario
async def cancelling_a_queued_request_removes_it(r: Relay) -> None:
    sid = await r.register()
    await r.submit("r1")
    await r.state.cancel("r1")
    view = await r.state.view()
    assert (view.in_flight, view.queue_depth) == (0, {})
    assert await r.handed(sid) == []


@scenario
async def cancelling_an_active_request_tells_its_connector(r: Relay) -> None:
    sid = await r.register()
    await r.submit("r1")
    await r.handed(sid)
    await r.ack(sid, "r1")
    await r.state.cancel("r1")
    assert r.state.is_cancelled("r1")
    assert await r.poll(sid) == [CancelItem(request_id="r1")]


@scenario
async def refused_frames_earn_one_cancel(r: Relay) -> None:
    sid = await r.register()
    await r.state.refuse(sid, "ghost")
    await r.state.refuse(sid, "ghost")
    assert await r.poll(sid) == [CancelItem(request_id="ghost")]
    assert await r.poll(sid) == []


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_relay_state_contract(relay: Relay, name: str) -> None:
    await SCENARIOS[name](relay)
