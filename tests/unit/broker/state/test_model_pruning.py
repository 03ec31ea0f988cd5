"""Known models, session caps and pruning, with a fake clock: the memory core and the Redis
relay state (its Lua scripts against a real redis-server) pass the same table."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from broker.core import NoConnector, Timings, TooManySessions, UnknownModel
from broker.metrics import UNKNOWN_MODEL_LABEL, BrokerMetrics
from broker.state.redis import RedisRelayState, connect
from broker.state.relay import RelayView
from shared.model_names import check_model_names, is_model_name, shown, split_valid
from shared.protocol import RequestItem
from tests.support.redis_server import RedisServer, unique_prefix
from tests.support.registrations import registration
from tests.unit.broker.core.test_relay import Harness

GRACE = 100.0
T0 = 1_000_000.0


def _item(rid: str, model: str) -> RequestItem:
    return RequestItem(request_id=rid, model=model, path="/v1/chat/completions", body="{}")


# -- the memory core --------------------------------------------------------------------


def test_memory_model_is_503_in_grace_then_404_and_its_maps_are_pruned() -> None:
    h = Harness(model_grace=GRACE, queue_wait=5.0)
    s = h.register("c1", ["m"], now=0.0)
    h.occupy(s)
    h.submit("waits", now=0.0)  # queues: slot busy, so slot_waits counts it
    assert h.core.slot_waits == {"m": 1}
    h.core.deregister(s.owner, s.id, now=10.0)
    with pytest.raises(NoConnector):
        h.submit("r1", now=10.0 + GRACE - 1)
    h.run_deadlines(10.0 + GRACE)
    assert h.core.known_models == set()
    assert h.core.slot_waits == {} and h.core.queues == {}
    with pytest.raises(UnknownModel):
        h.submit("r2", now=10.0 + GRACE + 1)


def test_memory_serving_again_in_grace_keeps_the_model() -> None:
    h = Harness(model_grace=GRACE)
    s = h.register("c1", ["m"], now=0.0)
    h.core.update_models(s.owner, s.id, ["n"], now=1.0)
    assert h.core.known_models == {"m", "n"}
    h.register("c2", ["m"], now=50.0)  # served again within the grace: not forgotten
    h.core.update_models(s.owner, s.id, [], now=60.0)
    h.run_deadlines(60.0 + GRACE + 1)
    assert h.core.known_models == {"m"}


def test_memory_sessions_per_identity_are_capped_and_freed_on_drop() -> None:
    h = Harness(max_sessions_per_identity=2)
    a = h.register("a")
    h.register("b")
    h.register("a")  # replaces: not a new one
    with pytest.raises(TooManySessions):
        h.register("c")
    h.register("x", owner="someone-else")
    h.core.deregister(a.owner, h.core._by_name[(a.owner, "a")], now=1.0)
    h.register("c")


# -- the Redis relay state ---------------------------------------------------------------


class Wall:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def redis_state(shared_redis: RedisServer) -> AsyncIterator[RedisRelayState]:
    timings = Timings(model_grace=GRACE, max_sessions_per_identity=2)
    state = RedisRelayState(timings, connect(shared_redis.url), prefix=unique_prefix(), wall=Wall())
    await state._heartbeat()
    yield state
    await state.redis.aclose()


async def _register(state: RedisRelayState, name: str, models: list[str]) -> str:
    session, _ = await state.register(registration(name, models=models))
    return session.id


async def _sweep(state: RedisRelayState) -> None:
    t = state.timings
    await state._run("sweep", repr(state.wall()), t.lease, t.max_redispatch, 256, t.model_grace)


async def test_redis_model_is_503_in_grace_then_404_and_pruned(
    redis_state: RedisRelayState,
) -> None:
    wall = redis_state.wall
    assert isinstance(wall, Wall)
    sid = await _register(redis_state, "c1", ["m", "keep"])
    await redis_state.update_models("o", sid, ["keep"])
    assert (await redis_state.view()).known_models == {"m", "keep"}
    wall.now += GRACE - 1
    await _sweep(redis_state)
    with pytest.raises(NoConnector):
        await redis_state.submit(_item("r1", "m"))
    wall.now += 2
    await _sweep(redis_state)
    with pytest.raises(UnknownModel):
        await redis_state.submit(_item("r2", "m"))
    assert (await redis_state.view()).known_models == {"keep"}
    assert await redis_state.redis.zscore(redis_state.prefix + "kz", "m") is None


async def test_redis_sessions_per_identity_are_capped(redis_state: RedisRelayState) -> None:
    await _register(redis_state, "a", ["m"])
    await _register(redis_state, "b", ["m"])
    await _register(redis_state, "a", ["m"])  # replaces: not a new one
    with pytest.raises(TooManySessions):
        await _register(redis_state, "c", ["m"])
    sids = [s for s, v in (await redis_state.view()).sessions.items() if v.name == "a"]
    await redis_state.deregister("o", sids[0])
    await _register(redis_state, "c", ["m"])


# -- metrics and the name rule -------------------------------------------------------------


def test_metrics_drop_the_series_of_forgotten_models() -> None:
    metrics = BrokerMetrics()
    metrics.request_done("m", 200, 0.1, 0.2)
    metrics.usage_done("m", 3, 4, 0.01)
    metrics.request_done("n", 200, 0.1, 0.2)
    metrics.request_done(UNKNOWN_MODEL_LABEL, 404, None, 0.0)
    text = metrics.render(RelayView(known_models=frozenset({"n"}))).decode()
    assert 'model="m"' not in text
    assert 'model="n"' in text and 'model="(unknown)"' in text


@pytest.mark.parametrize(
    "name",
    ["llama3.2:3b-instruct-q4_K_M", "org/model@rev", "gpt-4o", "a+b", "x" * 200, "7b"],
)
def test_real_engine_names_are_valid(name: str) -> None:
    assert is_model_name(name)


@pytest.mark.parametrize(
    "name", ["", "x" * 201, "-x", "a b", "a'b", 'a"b', "a;b", "$x", "a`b", "a\nb", "é", "a\\b"]
)
def test_names_outside_the_rule_are_not(name: str) -> None:
    assert not is_model_name(name)


def test_checks_dedupe_and_messages_stay_short_and_escaped() -> None:
    assert check_model_names(["a", "b", "a"]) == ["a", "b"]
    valid, problems = split_valid(["ok", "x'\n" + "y" * 500])
    assert valid == ["ok"] and len(problems) == 1
    assert "\n" not in problems[0] and len(problems[0]) < 200
    assert shown("a'b\x1b") == "'a\\'b\\x1b'"
