"""The Redis limit scripts answer exactly as the pure ``LimitBook`` does.

Random sequences of reserve and settle, at times the test chooses, go to both; every
answer (grants with their holds and header values, refusals with their reason, numbers and
wait) and the final counters must agree. Against a real redis-server.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import AsyncIterator

import pytest

from broker.core.limits import LimitBook, Limits, Refusal, Reservation
from broker.state.redis import connect
from broker.state.redis.limits import RedisLimitState
from tests.support.redis_server import RedisServer, unique_prefix

T0 = 1_767_225_000.0  # 2025-12-31 23:50 UTC: the runs cross a day and a month boundary

LIMITS = [
    Limits(rpm=5),
    Limits(tpm=1000),
    Limits(concurrency=2),
    Limits(daily_tokens=3000, monthly_tokens=5000),
    Limits(rpm=10, tpm=2000, concurrency=3, daily_tokens=4000),
]


@pytest.fixture
async def redis_limits(shared_redis: RedisServer) -> AsyncIterator[RedisLimitState]:
    client = connect(shared_redis.url)
    # LimitBook has no lease (a dead process takes its counts with it): none ends here.
    yield RedisLimitState(client, prefix=unique_prefix(), lease=1e9)
    await client.aclose()


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


def same_info(a: object, b: object) -> bool:
    return all(
        close(getattr(a, f.name), getattr(b, f.name))
        for f in dataclasses.fields(a)  # type: ignore[arg-type]
    )


def same(a: Reservation | Refusal, b: Reservation | Refusal) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, Refusal) and isinstance(b, Refusal):
        return (
            (a.reason, a.subject, a.limit, a.used, a.requested)
            == (b.reason, b.subject, b.limit, b.used, b.requested)
            and close(a.retry_after, b.retry_after)
            and same_info(a.info, b.info)
        )
    assert isinstance(a, Reservation) and isinstance(b, Reservation)
    return a.demand == b.demand and a.holds == b.holds and same_info(a.info, b.info)


@pytest.mark.parametrize("seed", range(6))
async def test_redis_limits_answer_like_the_limit_book(
    redis_limits: RedisLimitState, seed: int
) -> None:
    rng = random.Random(seed)
    book = LimitBook()
    now = T0
    open_: list[tuple[Reservation, Reservation]] = []
    for _ in range(120):
        now += rng.choice([0.0, 0.05, 0.5, 3.0, 20.0, 200.0])
        if open_ and rng.random() < 0.4:
            mine, theirs = open_.pop(rng.randrange(len(open_)))
            actual = rng.randrange(0, 900)
            book.settle(mine, actual, now)
            await redis_limits.settle(theirs, actual, now)
            continue
        n = rng.choice([1, 1, 2])
        picks = rng.sample(range(len(LIMITS)), n)
        subjects = tuple(f"user{i}" for i in picks)
        limits = [LIMITS[i] for i in picks]
        demand = rng.choice([0, 10, 300, 900, 2500])
        expected = book.reserve(subjects, demand, limits, now)
        got = await redis_limits.reserve(subjects, demand, limits, now)
        assert same(expected, got), (expected, got)
        if isinstance(expected, Reservation):
            assert isinstance(got, Reservation)
            open_.append((expected, got))
    want = book.snapshot(now)
    have = await redis_limits.usage_snapshot(now)
    assert [u.subject for u in want] == [u.subject for u in have]
    for a, b in zip(want, have, strict=True):
        assert dataclasses.replace(a, last_refused=None) == dataclasses.replace(
            b, last_refused=None
        )
        assert close(a.last_refused, b.last_refused)


async def test_settling_twice_counts_once(redis_limits: RedisLimitState) -> None:
    lim = [Limits(concurrency=1, tpm=100)]
    granted = await redis_limits.reserve(("u",), 50, lim, T0)
    assert isinstance(granted, Reservation)
    await redis_limits.settle(granted, 10, T0)
    await redis_limits.settle(granted, 10, T0)
    (usage,) = await redis_limits.usage_snapshot(T0)
    assert usage.in_flight == 0
    assert usage.tokens_last_minute == 10


async def test_a_dead_brokers_reservations_are_released_when_their_lease_ends(
    shared_redis: RedisServer,
) -> None:
    # A broker killed with requests in flight never settles them: without the lease, its
    # users would stay at their concurrency limit (and their quota holds) for good.
    client = connect(shared_redis.url)
    prefix = unique_prefix()
    dead = RedisLimitState(client, prefix=prefix, lease=100.0)
    alive = RedisLimitState(client, prefix=prefix, lease=100.0)
    lim = [Limits(concurrency=2, daily_tokens=1000)]
    for _ in range(2):
        assert isinstance(await dead.reserve(("u",), 400, lim, T0), Reservation)
    refused = await alive.reserve(("u",), 100, lim, T0 + 99.0)
    assert isinstance(refused, Refusal) and refused.reason.value == "concurrency"
    granted = await alive.reserve(("u",), 100, lim, T0 + 101.0)
    assert isinstance(granted, Reservation)
    (usage,) = await alive.usage_snapshot(T0 + 101.0)
    assert usage.in_flight == 1
    await alive.settle(granted, 30, T0 + 102.0)
    (usage,) = await alive.usage_snapshot(T0 + 102.0)
    assert usage.in_flight == 0
    assert usage.tokens_today == 30  # the dead requests' 800 held tokens were given back
    assert await client.zcard(prefix + "resz") == 0
    await client.aclose()
