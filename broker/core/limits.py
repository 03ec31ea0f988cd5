"""Per-subject limits, counted with no I/O: reserve before dispatch, settle after.

A *subject* is what a limit applies to: a user (``gitlab-7``, ``u-1a2b3c4d``) or one of a
user's keys (``gitlab-7/laptop``). A request reserves its worst case on all of its subjects
at once, or on none (``LimitBook.reserve``); when it ends, ``settle`` replaces the
reservation by what the request really used and frees its concurrency slot.

How each limit is counted (docs/limits.md says why):

- requests and tokens per minute: a meter per subject that fills by what is taken and
  drains continuously at ``limit / 60`` per second (GCRA, the token bucket written as one
  level and its time). A request fits when the level plus its amount stays within the
  limit; a burst of a whole minute's budget is allowed, then the rate. One number per
  subject, no window edges where twice the limit gets through, and a correction on settle
  is plain arithmetic.
- concurrency: requests of the subject in flight.
- daily and monthly tokens: used plus held in the current UTC calendar day or month.
  Tokens count in the period in which the request ends (as in the usage records); a
  period rolling over while a request runs drops the old period's holds with it.

A request's amount on one limit is its demand, but never more than the limit itself: a
request bigger than a whole minute's budget (or a whole quota) waits until the meter is
empty and then takes all of it, so no request is refused forever; settling its real usage
may leave the meter above the limit, and later requests wait until it drained.

``now`` is a wall-clock epoch in seconds (calendar periods need one); nothing here reads a
clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

MINUTE = 60.0
DAY = 86400.0
# Tolerance in requests or tokens: epochs near 2e9 carry ~2e-7 s of float error.
EPSILON = 1e-3
# Retry-After for a concurrency refusal: a slot frees when one of the subject's requests
# ends, which nothing here can predict.
CONCURRENCY_RETRY = 1.0


class Reason(StrEnum):
    """Which limit refused a request (also the label of ``remotellm_rate_limited_total``)."""

    RPM = "rpm"
    TPM = "tpm"
    CONCURRENCY = "concurrency"
    DAILY = "daily"
    MONTHLY = "monthly"

    @property
    def retryable(self) -> bool:
        """A used-up quota does not come back by retrying soon."""
        return self not in (Reason.DAILY, Reason.MONTHLY)


@dataclass(frozen=True, slots=True)
class Limits:
    """One subject's limits; ``None`` is unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None

    @property
    def unlimited(self) -> bool:
        return (
            self.rpm is None
            and self.tpm is None
            and self.concurrency is None
            and self.daily_tokens is None
            and self.monthly_tokens is None
        )

    @property
    def counts_tokens(self) -> bool:
        """Whether a request's token demand matters for these limits."""
        return not (self.tpm is None and self.daily_tokens is None and self.monthly_tokens is None)


NO_LIMITS = Limits()
LIMIT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Limits))
UNLIMITED: Literal["unlimited"] = "unlimited"
# One override: a number, "unlimited", or None for "as the defaults say".
Override = int | Literal["unlimited"] | None


@dataclass(frozen=True, slots=True)
class LimitOverrides:
    """Per-user or per-key settings laid over the defaults (users file, admin page)."""

    rpm: Override = None
    tpm: Override = None
    concurrency: Override = None
    daily_tokens: Override = None
    monthly_tokens: Override = None

    def apply(self, base: Limits) -> Limits:
        changes: dict[str, int | None] = {}
        for name in LIMIT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                changes[name] = None if value == UNLIMITED else value
        return replace(base, **changes) if changes else base

    @property
    def empty(self) -> bool:
        return all(getattr(self, name) is None for name in LIMIT_FIELDS)


# -- the answers -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateInfo:
    """What OpenAI's ``x-ratelimit-*`` headers say: the tightest subject per dimension.

    ``reset_*`` is the time in seconds until that budget is whole again. A dimension no
    subject limits stays ``None`` (its headers are left out).
    """

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens: float | None = None


@dataclass(frozen=True, slots=True)
class Hold:
    """What one request holds on one subject until it is settled."""

    subject: str
    limits: Limits
    tokens: int  # taken from the per-minute token meter
    day: int  # held against the daily quota of day ``day_period``
    day_period: int
    month: int
    month_period: int


@dataclass(frozen=True, slots=True)
class Reservation:
    """A granted request: settle it exactly once with what it really used."""

    id: str
    demand: int
    holds: tuple[Hold, ...]
    info: RateInfo


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused request: nothing was taken from any subject."""

    reason: Reason
    subject: str
    limit: int
    used: int  # of the limit, at the time of the refusal
    requested: int
    retry_after: float  # seconds until it could fit (for a quota: until the period resets)
    info: RateInfo

    @property
    def retryable(self) -> bool:
        return self.reason.retryable


@dataclass(frozen=True, slots=True)
class SubjectUsage:
    """A read-only view of one subject's counters (the admin page's "who is limited")."""

    subject: str
    limits: Limits
    in_flight: int
    requests_last_minute: int  # the request meter's level: what the last minute weighs
    tokens_last_minute: int
    tokens_today: int  # used plus held in the current UTC day
    tokens_this_month: int
    refusals: int
    last_refused: float | None
    last_reason: Reason | None


# -- periods -----------------------------------------------------------------------------


def day_of(now: float) -> int:
    """The UTC calendar day of an epoch, as a day number."""
    return int(now // DAY)


def month_of(now: float) -> int:
    """The UTC calendar month of an epoch, as ``year * 12 + month - 1``."""
    when = datetime.fromtimestamp(now, UTC)
    return when.year * 12 + when.month - 1


def day_end(now: float) -> float:
    return (day_of(now) + 1) * DAY


def month_end(now: float) -> float:
    year, month = divmod(month_of(now) + 1, 12)
    return datetime(year, month + 1, 1, tzinfo=UTC).timestamp()


@dataclass(frozen=True, slots=True)
class Periods:
    """The UTC day and month an instant falls in, and when each ends."""

    day: int
    day_end: float
    month: int
    month_end: float

    @classmethod
    def at(cls, now: float) -> Periods:
        return cls(day_of(now), day_end(now), month_of(now), month_end(now))


# -- counters ----------------------------------------------------------------------------


@dataclass(slots=True)
class Meter:
    """A per-minute budget in use: ``level`` at time ``at``, draining at ``limit / 60`` /s."""

    level: float = 0.0
    at: float = 0.0

    # Conditionals rather than max(): this runs a few times per request on the API path.
    def current(self, limit: int, now: float) -> float:
        elapsed = now - self.at
        if elapsed <= 0.0:  # the same instant, or a wall clock that stepped back
            return self.level
        level = self.level - elapsed * limit / MINUTE
        return level if level > 0.0 else 0.0

    def add(self, amount: float, limit: int, now: float) -> None:
        level = self.current(limit, now) + amount
        self.level = level if level > 0.0 else 0.0
        if now > self.at:
            self.at = now

    def wait_for(self, amount: float, limit: int, now: float) -> float:
        """Seconds until ``amount`` fits (0 when it fits now)."""
        over = self.current(limit, now) + amount - limit
        return 0.0 if over <= EPSILON else over * MINUTE / limit


@dataclass(slots=True)
class Quota:
    """Tokens used and held in one calendar period."""

    period: int = -1
    used: int = 0
    held: int = 0

    def roll(self, period: int) -> None:
        if period != self.period:
            self.period, self.used, self.held = period, 0, 0


@dataclass(slots=True)
class Counters:
    limits: Limits = NO_LIMITS
    requests: Meter | None = None
    tokens: Meter | None = None
    in_flight: int = 0
    day: Quota | None = None
    month: Quota | None = None
    refusals: int = 0
    last_refused: float | None = None
    last_reason: Reason | None = None

    def meters(self) -> tuple[Meter, Meter]:
        if self.requests is None or self.tokens is None:
            self.requests, self.tokens = Meter(), Meter()
        return self.requests, self.tokens

    def quotas(self, periods: Periods) -> tuple[Quota, Quota]:
        if self.day is None or self.month is None:
            self.day, self.month = Quota(), Quota()
        self.day.roll(periods.day)
        self.month.roll(periods.month)
        return self.day, self.month


def _amount(demand: int, limit: int | None) -> int:
    return 0 if limit is None else min(demand, limit)


class LimitBook:
    """Every subject's counters; ``reserve`` is all-or-nothing across a request's subjects."""

    def __init__(self) -> None:
        self._subjects: dict[str, Counters] = {}
        self._open: set[str] = set()
        self._seq = 0
        self._periods = Periods.at(0.0)

    def periods(self, now: float) -> Periods:
        """The calendar periods of ``now``, recomputed only when a day has passed."""
        if day_of(now) != self._periods.day:
            self._periods = Periods.at(now)
        return self._periods

    def reserve(
        self, subjects: Sequence[str], demand: int, limits: Sequence[Limits], now: float
    ) -> Reservation | Refusal:
        """Take ``demand`` tokens and one request from every subject, or refuse untouched."""
        if len(subjects) != len(limits):
            raise ValueError("one Limits per subject")
        demand = max(0, demand)
        counters = [self._counters(s, lim) for s, lim in zip(subjects, limits, strict=True)]
        refusals = [
            r
            for s, c in zip(subjects, counters, strict=True)
            if (r := self._check(s, c, demand, now)) is not None
        ]
        if refusals:
            refusal = _worst(refusals)
            refused = self._subjects[refusal.subject]
            refused.refusals += 1
            refused.last_refused, refused.last_reason = now, refusal.reason
            return replace(refusal, info=_info(counters, now))
        pairs = zip(subjects, counters, strict=True)
        holds = tuple(self._take(s, c, demand, now) for s, c in pairs)
        self._seq += 1
        rid = f"r{self._seq}"
        self._open.add(rid)
        return Reservation(id=rid, demand=demand, holds=holds, info=_info(counters, now))

    def settle(self, reservation: Reservation, actual: int, now: float) -> bool:
        """Replace the reservation by ``actual`` tokens and free its slot; once only."""
        if reservation.id not in self._open:
            return False
        self._open.discard(reservation.id)
        actual = max(0, actual)
        for hold in reservation.holds:
            c = self._subjects.get(hold.subject)
            if c is None:
                continue
            c.in_flight = max(0, c.in_flight - 1)
            lim = hold.limits
            if lim.tpm is not None:
                _, tokens = c.meters()
                tokens.add(actual - hold.tokens, lim.tpm, now)
            if lim.daily_tokens is not None or lim.monthly_tokens is not None:
                day, month = c.quotas(self.periods(now))
                _settle_quota(day, hold.day, hold.day_period, actual)
                _settle_quota(month, hold.month, hold.month_period, actual)
        return True

    def snapshot(self, now: float, subjects: Iterable[str] | None = None) -> list[SubjectUsage]:
        names = sorted(self._subjects) if subjects is None else list(subjects)
        return [self._usage(n, self._subjects[n], now) for n in names if n in self._subjects]

    @property
    def open_reservations(self) -> int:
        return len(self._open)

    # -- inside ----------------------------------------------------------------------------

    def _counters(self, subject: str, limits: Limits) -> Counters:
        c = self._subjects.get(subject)
        if c is None:
            c = self._subjects[subject] = Counters()
        c.limits = limits  # the newest settings (an override may have changed since)
        return c

    def _check(self, subject: str, c: Counters, demand: int, now: float) -> Refusal | None:
        lim = c.limits
        if lim.daily_tokens is not None or lim.monthly_tokens is not None:
            periods = self.periods(now)
            day, month = c.quotas(periods)
            for reason, limit, quota, end in (
                (Reason.MONTHLY, lim.monthly_tokens, month, periods.month_end),
                (Reason.DAILY, lim.daily_tokens, day, periods.day_end),
            ):
                if limit is None:
                    continue
                used = quota.used + quota.held
                if used + _amount(demand, limit) > limit:
                    return _refusal(reason, subject, limit, used, demand, end - now)
        if lim.concurrency is not None and c.in_flight + 1 > lim.concurrency:
            return _refusal(
                Reason.CONCURRENCY, subject, lim.concurrency, c.in_flight, 1, CONCURRENCY_RETRY
            )
        requests, tokens = c.meters()
        if lim.rpm is not None:
            wait = requests.wait_for(1, lim.rpm, now)
            if wait > 0:
                used = math.ceil(requests.current(lim.rpm, now) - EPSILON)
                return _refusal(Reason.RPM, subject, lim.rpm, used, 1, wait)
        if lim.tpm is not None:
            wait = tokens.wait_for(_amount(demand, lim.tpm), lim.tpm, now)
            if wait > 0:
                used = math.ceil(tokens.current(lim.tpm, now) - EPSILON)
                return _refusal(Reason.TPM, subject, lim.tpm, used, demand, wait)
        return None

    def _take(self, subject: str, c: Counters, demand: int, now: float) -> Hold:
        lim = c.limits
        c.in_flight += 1
        requests, tokens = c.meters()
        if lim.rpm is not None:
            requests.add(1, lim.rpm, now)
        taken = _amount(demand, lim.tpm)
        if lim.tpm is not None:
            tokens.add(taken, lim.tpm, now)
        day_hold = month_hold = 0
        day_period = month_period = -1
        if lim.daily_tokens is not None or lim.monthly_tokens is not None:
            day, month = c.quotas(self.periods(now))
            day_hold, month_hold = (
                _amount(demand, lim.daily_tokens),
                _amount(demand, lim.monthly_tokens),
            )
            day.held += day_hold
            month.held += month_hold
            day_period, month_period = day.period, month.period
        return Hold(subject, lim, taken, day_hold, day_period, month_hold, month_period)

    def _usage(self, subject: str, c: Counters, now: float) -> SubjectUsage:
        lim = c.limits
        requests, tokens = c.meters()
        day_used = month_used = 0
        if c.day is not None and c.month is not None:
            periods = self.periods(now)
            if c.day.period == periods.day:
                day_used = c.day.used + c.day.held
            if c.month.period == periods.month:
                month_used = c.month.used + c.month.held
        return SubjectUsage(
            subject=subject,
            limits=lim,
            in_flight=c.in_flight,
            requests_last_minute=math.ceil(requests.current(lim.rpm, now) - EPSILON)
            if lim.rpm
            else 0,
            tokens_last_minute=math.ceil(tokens.current(lim.tpm, now) - EPSILON) if lim.tpm else 0,
            tokens_today=day_used,
            tokens_this_month=month_used,
            refusals=c.refusals,
            last_refused=c.last_refused,
            last_reason=c.last_reason,
        )


def _settle_quota(quota: Quota, held: int, period: int, actual: int) -> None:
    if period == quota.period:  # else the period rolled over and took the hold with it
        quota.held = max(0, quota.held - held)
    quota.used += actual


def _refusal(
    reason: Reason, subject: str, limit: int, used: int, requested: int, wait: float
) -> Refusal:
    return Refusal(reason, subject, limit, used, requested, max(0.0, wait), RateInfo())


def _worst(refusals: list[Refusal]) -> Refusal:
    """The refusal to report: a used-up quota first, else the longest wait."""
    return max(refusals, key=lambda r: (not r.retryable, r.retry_after))


def _info(counters: Sequence[Counters], now: float) -> RateInfo:
    """The header values: per dimension, the subject with the least remaining."""
    req: tuple[int, int, float] | None = None
    tok: tuple[int, int, float] | None = None
    for c in counters:
        lim = c.limits
        requests, tokens = c.meters()
        if lim.rpm is not None:
            one = _remaining(requests, lim.rpm, now)
            req = one if req is None or one[1] < req[1] else req
        if lim.tpm is not None:
            one = _remaining(tokens, lim.tpm, now)
            tok = one if tok is None or one[1] < tok[1] else tok
    return RateInfo(
        limit_requests=req[0] if req else None,
        remaining_requests=req[1] if req else None,
        reset_requests=req[2] if req else None,
        limit_tokens=tok[0] if tok else None,
        remaining_tokens=tok[1] if tok else None,
        reset_tokens=tok[2] if tok else None,
    )


def _remaining(meter: Meter, limit: int, now: float) -> tuple[int, int, float]:
    level = meter.current(limit, now)
    remaining = max(0, math.floor(limit - level + EPSILON))
    return limit, remaining, level * MINUTE / limit
