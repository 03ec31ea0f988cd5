"""What the home broker decides when one of its requests' deadlines comes due.

The home broker is the one holding the API user's connection. It alone sees the response
frames arrive, so it alone can tell a stalled response (idle) or a missing head (first
byte); the shared state says where the request is (queued, leased, active). This module
turns (kind of deadline, where the request is, what the home saw, now) into a verdict,
without I/O: ``tests/unit/broker/state/redis/test_home.py`` drives it with a fake clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.core import Failure, Timings
from broker.core.failures import NO_HEAD, QUEUE_TIMEOUT, STALLED, TOO_LONG
from broker.core.timers import Kind

QUEUED, LEASED, ACTIVE = "q", "l", "a"


@dataclass(frozen=True, slots=True)
class Where:
    """The request as the shared state has it; ``state`` None: it is gone from there."""

    state: str | None
    leased_ago: float = 0.0  # seconds since its latest hand-out


@dataclass(frozen=True, slots=True)
class Later:
    """Check again after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True, slots=True)
class Drop:
    """Nothing to do: the deadline no longer applies (the end reaches the user otherwise)."""


Verdict = Failure | Later | Drop


def judge(kind: Kind, where: Where, head_seen: bool, quiet_for: float, t: Timings) -> Verdict:
    """The verdict for a due deadline of ``kind``.

    ``quiet_for``: seconds since the home last saw a frame of the request (or since it was
    submitted). The idle clock of a request runs from its hand-out at the earliest.
    """
    if where.state is None:
        return Drop()
    if kind is Kind.TOTAL:
        return TOO_LONG
    if kind is Kind.FIRST_BYTE:
        if head_seen:
            return Drop()
        if where.state == QUEUED:
            return Later(t.first_byte_timeout)
        left = t.first_byte_timeout - where.leased_ago
        if where.state == ACTIVE and left <= 0:
            return NO_HEAD
        return Later(max(left, t.lease))
    if kind is Kind.IDLE:
        if where.state != ACTIVE:
            return Later(t.idle_timeout)
        left = t.idle_timeout - min(quiet_for, where.leased_ago)
        return STALLED if left <= 0 else Later(left)
    return Drop()


def queue_verdict(result: list[str], now: float) -> Verdict:
    """The verdict from ``EXPIRE_QUEUED``'s answer (the script already removed a failed one)."""
    if result[0] == "failed":
        return QUEUE_TIMEOUT
    if result[0] == QUEUED:
        return Later(max(0.0, float(result[1]) - now))
    return Drop()  # gone, or handed out: a requeue sends the new queue deadline
