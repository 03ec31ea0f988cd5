"""The ``LimitState`` contract: one table, with a fake clock, every implementation.

Every test here runs against each implementation in ``LIMIT_STATES`` (the fixture
``limits``): in memory, and in Redis against a real redis-server (its lease is set past
every test: the table has no crashed process). ``now`` is a wall-clock epoch; nothing
sleeps. A new implementation adds itself to ``LIMIT_STATES`` and must pass the table.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from broker.core.limits import (
    Limits,
    Reason,
    Refusal,
    Reservation,
    day_end,
)
from broker.state.limits import LimitState
from broker.state.memory.limits import MemoryLimitState
from broker.state.redis import connect
from broker.state.redis.limits import RedisLimitState
from tests.support.redis_server import RedisServer, unique_prefix

LIMIT_STATES = ("memory", "redis")

NOON = datetime(2026, 12, 1, 12, 0, tzinfo=UTC).timestamp()
BEFORE_MIDNIGHT = datetime(2026, 12, 1, 23, 59, tzinfo=UTC).timestamp()
MONTH_LAST_MINUTE = datetime(2026, 12, 31, 23, 59, tzinfo=UTC).timestamp()


@pytest.fixture(params=LIMIT_STATES)
async def limits(request: pytest.FixtureRequest) -> AsyncIterator[LimitState]:
    if request.param == "memory":
        yield MemoryLimitState()
        return
    server: RedisServer = request.getfixturevalue("shared_redis")
    client = connect(server.url)
    yield RedisLimitState(client, prefix=unique_prefix(), lease=1e9)
    await client.aclose()


def granted(answer: Reservation | Refusal) -> Reservation:
    assert isinstance(answer, Reservation), answer
    return answer


def refused(answer: Reservation | Refusal) -> Refusal:
    assert isinstance(answer, Refusal), answer
    return answer


async def one(
    state: LimitState, lim: Limits, demand: int = 0, now: float = NOON, subject: str = "u"
) -> Reservation | Refusal:
    return await state.reserve((subject,), demand, [lim], now)


# -- requests per minute -----------------------------------------------------------------


async def test_rpm_allows_the_minute_then_the_rate(limits: LimitState) -> None:
    lim = Limits(rpm=3)
    first = granted(await one(limits, lim))
    assert first.info.limit_requests == 3 and first.info.remaining_requests == 2
    assert first.info.reset_requests == pytest.approx(20.0)
    granted(await one(limits, lim))
    third = granted(await one(limits, lim))
    assert third.info.remaining_requests == 0
    no = refused(await one(limits, lim))
    assert (no.reason, no.limit, no.used, no.requested) == (Reason.RPM, 3, 3, 1)
    assert no.retry_after == pytest.approx(20.0)  # one request drains in 60 / 3 s
    assert no.retryable
    assert no.info.remaining_requests == 0
    refused(await one(limits, lim, now=NOON + 19.9))
    granted(await one(limits, lim, now=NOON + 20.0))


async def test_no_window_edge_lets_twice_the_limit_through(limits: LimitState) -> None:
    """A fixed window would allow 10 at 0:59 and 10 more at 1:00; the meter does not."""
    lim = Limits(rpm=10)
    for _ in range(10):
        granted(await one(limits, lim, now=NOON + 59.0))
    allowed = 0
    for _ in range(10):
        if isinstance(await one(limits, lim, now=NOON + 61.0), Reservation):
            allowed += 1
    assert allowed == 0


# -- tokens per minute: reserve, settle ----------------------------------------------------


async def test_tpm_reserves_the_worst_case(limits: LimitState) -> None:
    lim = Limits(tpm=1000)
    granted(await one(limits, lim, 400))
    second = granted(await one(limits, lim, 400))
    assert second.info.limit_tokens == 1000 and second.info.remaining_tokens == 200
    assert second.info.reset_tokens == pytest.approx(48.0)
    no = refused(await one(limits, lim, 400))
    assert (no.reason, no.limit, no.used, no.requested) == (Reason.TPM, 1000, 800, 400)
    assert no.retry_after == pytest.approx(12.0)  # 200 tokens over, 1000 / 60 per second
    granted(await one(limits, lim, 400, now=NOON + 12.0))


async def test_settle_returns_what_was_not_used(limits: LimitState) -> None:
    lim = Limits(tpm=1000)
    res = granted(await one(limits, lim, 900))
    refused(await one(limits, lim, 500))
    await limits.settle(res, 100, NOON)
    after = granted(await one(limits, lim, 500))
    assert after.info.remaining_tokens == 400  # 100 used + 500 held


async def test_settle_charges_an_overrun_and_later_requests_wait(limits: LimitState) -> None:
    lim = Limits(tpm=1000)
    res = granted(await one(limits, lim, 100))
    await limits.settle(res, 1500, NOON)
    no = refused(await one(limits, lim, 1))
    assert no.used == 1500
    assert no.retry_after == pytest.approx(501 * 60 / 1000)
    granted(await one(limits, lim, 1, now=NOON + 30.06))


async def test_a_request_bigger_than_the_limit_waits_for_an_empty_meter(
    limits: LimitState,
) -> None:
    lim = Limits(tpm=1000)
    small = granted(await one(limits, lim, 10))
    no = refused(await one(limits, lim, 5000))
    assert no.retry_after == pytest.approx(0.6)  # until the 10 tokens drained
    await limits.settle(small, 10, NOON)
    big = granted(await one(limits, lim, 5000, now=NOON + 0.6))
    assert big.info.remaining_tokens == 0
    refused(await one(limits, lim, 1, now=NOON + 0.6))


async def test_twenty_at_once_never_exceed_the_limit(limits: LimitState) -> None:
    lim = Limits(tpm=1000)
    answers = [await one(limits, lim, 250) for _ in range(20)]
    grants = [a for a in answers if isinstance(a, Reservation)]
    assert len(grants) == 4
    assert all(a.reason is Reason.TPM for a in answers if isinstance(a, Refusal))


# -- concurrency ---------------------------------------------------------------------------


async def test_concurrency_slot_frees_on_settle_once(limits: LimitState) -> None:
    lim = Limits(concurrency=2)
    a = granted(await one(limits, lim))
    granted(await one(limits, lim))
    no = refused(await one(limits, lim))
    assert (no.reason, no.limit, no.used) == (Reason.CONCURRENCY, 2, 2)
    assert no.retry_after == pytest.approx(1.0)
    await limits.settle(a, 0, NOON)
    await limits.settle(a, 0, NOON)  # a repeat frees nothing more
    granted(await one(limits, lim))
    refused(await one(limits, lim))
    (usage,) = await limits.usage_snapshot(NOON, ["u"])
    assert usage.in_flight == 2


# -- quotas across midnight and month end --------------------------------------------------


async def test_daily_quota_is_refused_without_retry_until_midnight(limits: LimitState) -> None:
    lim = Limits(daily_tokens=1000)
    res = granted(await one(limits, lim, 800, now=BEFORE_MIDNIGHT))
    no = refused(await one(limits, lim, 300, now=BEFORE_MIDNIGHT))
    assert (no.reason, no.limit, no.used, no.requested) == (Reason.DAILY, 1000, 800, 300)
    assert not no.retryable
    assert no.retry_after == pytest.approx(60.0)
    await limits.settle(res, 500, BEFORE_MIDNIGHT + 10)
    granted(await one(limits, lim, 500, now=BEFORE_MIDNIGHT + 10))  # 500 used: 500 fit
    refused(await one(limits, lim, 1, now=BEFORE_MIDNIGHT + 10))
    granted(await one(limits, lim, 1000, now=BEFORE_MIDNIGHT + 60))  # a new day


async def test_tokens_count_on_the_day_the_request_ends(limits: LimitState) -> None:
    lim = Limits(daily_tokens=1000)
    res = granted(await one(limits, lim, 800, now=BEFORE_MIDNIGHT))
    after = BEFORE_MIDNIGHT + 90  # 00:00:30 the next day
    assert after > day_end(BEFORE_MIDNIGHT)
    granted(await one(limits, lim, 300, now=after))  # yesterday's hold is gone
    await limits.settle(res, 700, after)
    no = refused(await one(limits, lim, 1, now=after))
    assert no.used == 1000  # 300 held today + 700 used by the request that ended today
    (usage,) = await limits.usage_snapshot(after, ["u"])
    assert usage.tokens_today == 1000


async def test_monthly_quota_resets_on_the_first(limits: LimitState) -> None:
    lim = Limits(monthly_tokens=100)
    granted(await one(limits, lim, 100, now=MONTH_LAST_MINUTE))
    no = refused(await one(limits, lim, 1, now=MONTH_LAST_MINUTE))
    assert no.reason is Reason.MONTHLY and not no.retryable
    assert no.retry_after == pytest.approx(60.0)
    granted(await one(limits, lim, 100, now=MONTH_LAST_MINUTE + 60))


async def test_a_used_up_quota_wins_over_a_short_wait(limits: LimitState) -> None:
    lim = Limits(rpm=1, daily_tokens=10)
    granted(await one(limits, lim, 10))
    no = refused(await one(limits, lim, 5))
    assert no.reason is Reason.DAILY  # retrying after the rpm wait would not help


# -- several subjects: all or nothing --------------------------------------------------------


async def test_reserve_is_atomic_across_user_and_key(limits: LimitState) -> None:
    user, key = Limits(tpm=1000), Limits(rpm=2)
    subjects = ("gitlab-7", "gitlab-7/laptop")
    first = granted(await limits.reserve(subjects, 300, [user, key], NOON))
    assert first.info.remaining_tokens == 700 and first.info.remaining_requests == 1
    no = refused(await limits.reserve(subjects, 800, [user, key], NOON))
    assert (no.reason, no.subject) == (Reason.TPM, "gitlab-7")
    # The user's refusal took nothing from the key: its second request still fits.
    second = granted(await limits.reserve(subjects, 300, [user, key], NOON))
    assert second.info.remaining_requests == 0
    no = refused(await limits.reserve(subjects, 1, [user, key], NOON))
    assert (no.reason, no.subject) == (Reason.RPM, "gitlab-7/laptop")
    # ...and the key's refusal took nothing from the user: 400 tokens are still there.
    other_key = granted(await limits.reserve(("gitlab-7",), 400, [user], NOON))
    assert other_key.info.remaining_tokens == 0


async def test_headers_report_the_tightest_subject(limits: LimitState) -> None:
    subjects = ("a", "a/k")
    res = granted(
        await limits.reserve(subjects, 10, [Limits(rpm=100, tpm=50), Limits(rpm=5)], NOON)
    )
    assert (res.info.limit_requests, res.info.remaining_requests) == (5, 4)
    assert (res.info.limit_tokens, res.info.remaining_tokens) == (50, 40)


async def test_unlimited_dimensions_give_no_header_values(limits: LimitState) -> None:
    res = granted(await one(limits, Limits(concurrency=3), 10))
    assert res.info.limit_requests is None and res.info.limit_tokens is None


async def test_usage_snapshot_shows_who_is_limited(limits: LimitState) -> None:
    lim = Limits(rpm=1, tpm=100, daily_tokens=1000, monthly_tokens=5000)
    res = granted(await one(limits, lim, 40, subject="alice"))
    refused(await one(limits, lim, 40, subject="alice"))
    granted(await one(limits, lim, 10, subject="bob"))
    alice, bob = await limits.usage_snapshot(NOON)
    assert alice.subject == "alice" and bob.subject == "bob"
    assert (alice.in_flight, alice.requests_last_minute, alice.tokens_last_minute) == (1, 1, 40)
    assert (alice.tokens_today, alice.tokens_this_month) == (40, 40)
    assert (alice.refusals, alice.last_reason, alice.last_refused) == (1, Reason.RPM, NOON)
    assert alice.limits == lim
    assert bob.refusals == 0 and bob.last_reason is None
    await limits.settle(res, 25, NOON + 6)
    (alice,) = await limits.usage_snapshot(NOON + 6, ["alice", "nobody"])
    assert alice.in_flight == 0 and alice.tokens_today == 25
    assert alice.tokens_last_minute == 15  # 25 used, 10 drained in 6 s
