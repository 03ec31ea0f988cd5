"""The limiter's pure rules: calendar periods and overrides (the ``LimitState`` table runs
against every implementation in tests/unit/broker/state/test_limits_contract.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from broker.core.limits import DAY, LimitOverrides, Limits, day_end, month_end, month_of

NOON = datetime(2026, 12, 1, 12, 0, tzinfo=UTC).timestamp()
MONTH_LAST_MINUTE = datetime(2026, 12, 31, 23, 59, tzinfo=UTC).timestamp()


def test_calendar_periods() -> None:
    assert month_end(MONTH_LAST_MINUTE) == datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    feb = datetime(2028, 2, 29, 12, tzinfo=UTC).timestamp()
    assert month_end(feb) == datetime(2028, 3, 1, tzinfo=UTC).timestamp()
    assert month_of(feb) == 2028 * 12 + 1
    assert day_end(NOON) - NOON == DAY / 2


def test_overrides_inherit_replace_or_lift_a_default() -> None:
    defaults = Limits(rpm=60, tpm=10_000, daily_tokens=100_000)
    mine = LimitOverrides(rpm=600, daily_tokens="unlimited")
    assert mine.apply(defaults) == Limits(rpm=600, tpm=10_000, daily_tokens=None)
    assert LimitOverrides().apply(defaults) is defaults
    assert LimitOverrides().empty and not mine.empty
    assert Limits().unlimited and not Limits(concurrency=1).unlimited
    assert not Limits(rpm=1, concurrency=1).counts_tokens
    assert Limits(monthly_tokens=1).counts_tokens
