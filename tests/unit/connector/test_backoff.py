from __future__ import annotations

import random

import pytest

from connector.backoff import Backoff


def _ceiling(lo: float, hi: float) -> float:
    assert lo == 0.0
    return hi


@pytest.mark.parametrize(
    ("base", "cap", "expected"),
    [
        (0.5, 30.0, [0.5, 1, 2, 4, 8, 16, 30, 30, 30]),
        (1.0, 5.0, [1, 2, 4, 5, 5]),
        (0.1, 0.1, [0.1, 0.1, 0.1]),
        (2.0, 1.0, [1, 1]),  # the cap wins even over the base
    ],
)
def test_ceilings_double_up_to_cap(base: float, cap: float, expected: list[float]) -> None:
    b = Backoff(base=base, cap=cap, rand=_ceiling)
    assert [b.next_delay() for _ in expected] == pytest.approx(expected)


def test_defaults_are_half_a_second_to_thirty() -> None:
    b = Backoff(rand=_ceiling)
    delays = [b.next_delay() for _ in range(12)]
    assert delays[0] == 0.5
    assert max(delays) == 30.0


@pytest.mark.parametrize("seed", range(5))
def test_full_jitter_within_zero_and_ceiling(seed: int) -> None:
    rng = random.Random(seed)
    calls: list[tuple[float, float]] = []

    def rand(lo: float, hi: float) -> float:
        calls.append((lo, hi))
        return rng.uniform(lo, hi)

    b = Backoff(base=0.5, cap=30.0, rand=rand)
    delays = [b.next_delay() for _ in range(40)]
    for n, (delay, (lo, hi)) in enumerate(zip(delays, calls, strict=True)):
        assert lo == 0.0
        assert hi == min(30.0, 0.5 * 2**n)
        assert 0.0 <= delay <= hi
    # Full jitter really spreads: not every delay sits at its ceiling.
    assert any(d < hi / 2 for d, (_, hi) in zip(delays, calls, strict=True))


def test_reset_starts_over() -> None:
    b = Backoff(base=0.5, cap=30.0, rand=_ceiling)
    for _ in range(5):
        b.next_delay()
    assert b.next_delay() == 16
    b.reset()
    assert b.attempt == 0
    assert b.next_delay() == 0.5
    assert b.next_delay() == 1


def test_many_failures_do_not_overflow() -> None:
    b = Backoff(base=0.5, cap=30.0, rand=_ceiling)
    for _ in range(5000):
        assert b.next_delay() <= 30.0
    assert b.next_delay() == 30.0


async def test_sleep_returns_the_delay() -> None:
    b = Backoff(base=0.002, cap=0.002, rand=_ceiling)
    assert await b.sleep() == 0.002
    assert b.attempt == 1


@pytest.mark.parametrize(
    ("cap", "expected"),
    [
        (1.0, [0.5, 1, 1, 1, 1, 1, 1]),  # nothing answers: at most every second
        (None, [0.5, 1, 2, 4, 8, 16, 30]),  # the broker answered an error: the full backoff
        (0.25, [0.25, 0.25, 0.25]),
    ],
)
def test_a_cap_lowers_the_ceiling_of_one_wait(cap: float | None, expected: list[float]) -> None:
    b = Backoff(base=0.5, cap=30.0, rand=_ceiling)
    assert [b.next_delay(cap=cap) for _ in expected] == pytest.approx(expected)


def test_capped_waits_still_count_attempts() -> None:
    """Once the broker answers again with errors, the backoff continues from where it is."""
    b = Backoff(base=0.5, cap=30.0, rand=_ceiling)
    for _ in range(6):
        assert b.next_delay(cap=1.0) <= 1.0
    assert b.next_delay() == 30.0


@pytest.mark.parametrize("seed", range(3))
def test_capped_waits_are_jittered(seed: int) -> None:
    rng = random.Random(seed)
    b = Backoff(rand=rng.uniform)
    delays = [b.next_delay(cap=1.0) for _ in range(50)]
    assert all(0.0 <= d <= 1.0 for d in delays)
    assert len({round(d, 6) for d in delays}) > 40
