"""Redis loses its data (a restart without persistence, a failover that lost writes).

A model this broker served a moment ago is then unknown to Redis until its connectors
register again; clients must be told to retry (503), not that the model does not exist
(404: the OpenAI SDKs do not retry it). Against a real redis-server with a fake clock.
"""

from __future__ import annotations

import asyncio

import pytest

from broker.core import NoConnector, Timings, UnknownModel, UnknownSession
from broker.state.redis import RedisRelayState, connect
from shared.protocol import RequestItem
from tests.support.redis_server import RedisServer, unique_prefix
from tests.support.registrations import registration

T0 = 1_767_225_000.0
GRACE = 100.0
TIMINGS = Timings(
    lease=5.0,
    session_ttl=60.0,
    queue_wait=20.0,
    queue_max=8,
    first_byte_timeout=20.0,
    idle_timeout=35.0,
    total_timeout=45.0,
    max_redispatch=1,
    max_sessions_per_identity=2,
    model_grace=GRACE,
)


class Clock:
    now = T0

    def __call__(self) -> float:
        return self.now


def item(rid: str) -> RequestItem:
    return RequestItem(request_id=rid, model="m", path="/v1/chat/completions", body="{}")


async def test_a_model_served_before_redis_lost_its_data_answers_503_then_404(
    shared_redis: RedisServer,
) -> None:
    clock = Clock()
    client = connect(shared_redis.url)
    prefix = unique_prefix()
    state = RedisRelayState(TIMINGS, client, prefix=prefix, clock=clock, wall=clock)
    try:
        await state.register(registration())
        await state.submit(item("r1"))
        async for key in client.scan_iter(match=prefix + "*"):
            await client.delete(key)  # what a restart without persistence leaves
        with pytest.raises(NoConnector) as refused:
            await state.submit(item("r2"))
        assert refused.value.status == 503 and refused.value.retry_after
        clock.now += GRACE + 1  # no connector came back within the grace: it is gone
        with pytest.raises(UnknownModel):
            await state.submit(item("r3"))
        with pytest.raises(UnknownModel):
            await state.submit(RequestItem(request_id="r4", model="never", path="/v1/x", body="{}"))
    finally:
        await state.stop()
        await client.aclose()


async def test_a_held_poll_ends_at_once_when_redis_forgets_its_session(
    shared_redis: RedisServer,
) -> None:
    # The poll's wake-up after Redis is back (or any wake) finds the session gone: 404 at
    # once, so the connector registers again instead of waiting out its 25 s hold.
    client = connect(shared_redis.url)
    prefix = unique_prefix()
    state = RedisRelayState(TIMINGS, client, prefix=prefix)
    await state.start()
    try:
        session, _ = await state.register(registration())
        poll = asyncio.create_task(state.poll("o", session.id, 25.0))
        await asyncio.sleep(0.3)
        assert not poll.done()
        async for key in client.scan_iter(match=prefix + "*"):
            await client.delete(key)
        state._local.wake_all()  # what the listener does when it subscribes again
        with pytest.raises(UnknownSession):
            await asyncio.wait_for(poll, 2.0)
    finally:
        await state.stop()
        await client.aclose()


async def test_a_broker_that_has_not_relayed_yet_learns_the_served_models_from_its_heartbeat(
    shared_redis: RedisServer,
) -> None:
    # Found by the failover soak: a broker restarted a moment before Redis lost its data had
    # neither relayed nor shown the model yet, so it answered 404 model_not_found for it.
    clock = Clock()
    client = connect(shared_redis.url)
    prefix = unique_prefix()
    serving = RedisRelayState(TIMINGS, client, prefix=prefix, clock=clock, wall=clock)
    fresh = RedisRelayState(TIMINGS, client, prefix=prefix, clock=clock, wall=clock)
    try:
        await serving.register(registration())
        await fresh.run_due()  # its first heartbeat (once a second while it runs)
        async for key in client.scan_iter(match=prefix + "*"):
            await client.delete(key)
        with pytest.raises(NoConnector) as refused:
            await fresh.submit(item("r1"))
        assert refused.value.status == 503 and refused.value.retry_after
    finally:
        await fresh.stop()
        await serving.stop()
        await client.aclose()
