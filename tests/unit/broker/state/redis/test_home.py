"""The home broker's verdicts on its requests' deadlines (pure: fake times, no Redis)."""

from __future__ import annotations

import pytest

from broker.core import Timings
from broker.core.failures import NO_HEAD, QUEUE_TIMEOUT, STALLED, TOO_LONG
from broker.core.timers import Kind
from broker.state.redis.home import Drop, Later, Where, judge, queue_verdict

T = Timings(lease=15.0, first_byte_timeout=600.0, idle_timeout=300.0)


@pytest.mark.parametrize(
    ("kind", "where", "head_seen", "quiet", "verdict"),
    [
        # Gone from the shared state: its end reaches the user another way.
        (Kind.TOTAL, Where(None), False, 0.0, Drop()),
        (Kind.IDLE, Where(None), True, 999.0, Drop()),
        (Kind.TOTAL, Where("a", 5.0), True, 0.0, TOO_LONG),
        # First byte: counted from the latest hand-out, only while no head was seen.
        (Kind.FIRST_BYTE, Where("a", 600.0), False, 0.0, NO_HEAD),
        (Kind.FIRST_BYTE, Where("a", 100.0), False, 0.0, Later(500.0)),
        (Kind.FIRST_BYTE, Where("a", 900.0), True, 0.0, Drop()),
        (Kind.FIRST_BYTE, Where("q"), False, 0.0, Later(600.0)),
        (Kind.FIRST_BYTE, Where("l", 599.0), False, 0.0, Later(15.0)),  # the lease ends first
        # Idle: only an active request stalls; quiet time counts from the hand-out at most.
        (Kind.IDLE, Where("a", 400.0), True, 300.0, STALLED),
        (Kind.IDLE, Where("a", 400.0), True, 100.0, Later(200.0)),
        (Kind.IDLE, Where("a", 50.0), True, 1000.0, Later(250.0)),
        (Kind.IDLE, Where("q"), False, 1000.0, Later(300.0)),
    ],
)
def test_judge(kind: Kind, where: Where, head_seen: bool, quiet: float, verdict: object) -> None:
    assert judge(kind, where, head_seen, quiet, T) == verdict


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        (["failed"], QUEUE_TIMEOUT),
        (["q", "130.5"], Later(30.5)),
        (["q", "90"], Later(0.0)),
        (["gone"], Drop()),
        (["l"], Drop()),
        (["a"], Drop()),
    ],
)
def test_queue_verdict(answer: list[str], verdict: object) -> None:
    assert queue_verdict(answer, now=100.0) == verdict
