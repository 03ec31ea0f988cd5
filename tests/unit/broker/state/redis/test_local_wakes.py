"""The Redis state's wake-ups on this broker: a held poll wakes for what its session serves.

Found by the suite's slowest test: a connector that registered before its LLM was up had
no models; when they arrived (a model update) its held poll still waited for none, so a
request for the new model waited out the whole poll hold (20 s) in the Redis mode.
"""

from __future__ import annotations

import asyncio

from broker.state.redis.local import LocalState, PollWaiter


async def test_a_model_update_makes_the_held_poll_wake_for_the_new_models() -> None:
    local = LocalState()
    waiter = PollWaiter("t1", frozenset())
    local.waiters["s1"] = [waiter]
    future = waiter.arm()
    local.on_wake("m:late-model", b"")
    assert not future.done()  # before the update: not this session's model
    local.on_wake("s:s1", b'u:["late-model", "other"]')
    assert future.done() and waiter.models == {"late-model", "other"}
    assert not waiter.gone and not waiter.superseded
    future = waiter.arm()
    local.on_wake("m:late-model", b"")
    assert future.done()
    await asyncio.sleep(0)


async def test_a_malformed_update_keeps_the_models_it_had() -> None:
    local = LocalState()
    waiter = PollWaiter("t1", frozenset({"m"}))
    local.waiters["s1"] = [waiter]
    for junk in (b"u:not json", b'u:{"a": 1}', b"u:"):
        local.on_wake("s:s1", junk)
        assert waiter.models == {"m"}
