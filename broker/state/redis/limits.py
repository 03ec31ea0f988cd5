"""``LimitState`` in Redis: the limits hold across every broker sharing it.

Each call is one atomic script (``limit_scripts.py``) doing ``LimitBook``'s arithmetic
on the shared counters, so 20 concurrent requests spread over three brokers are admitted
exactly as one broker would admit them. Errors from Redis enter here and become
``StateUnavailable`` (the API answers 503 with ``Retry-After``).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from broker.core import StateUnavailable
from broker.core.limits import (
    EPSILON,
    Hold,
    Limits,
    Meter,
    RateInfo,
    Reason,
    Refusal,
    Reservation,
    SubjectUsage,
    day_end,
    day_of,
    month_end,
    month_of,
)
from broker.state.redis import limit_scripts

UNAVAILABLE = "the limit counters (Redis) are unavailable; retry shortly"
DEFAULT_LEASE = 3660.0  # seconds: the default --total-timeout and a minute
RECLAIM = 8  # ended leases released by each reserve, at most


def _n(value: int | None) -> int:
    return -1 if value is None else value


def _opt(value: int) -> int | None:
    return None if value < 0 else value


def _info(raw: Sequence[bytes]) -> RateInfo:
    def part(i: int, cast: type) -> Any:
        text = raw[i].decode()
        return cast(float(text)) if text else None

    return RateInfo(
        limit_requests=part(0, int),
        remaining_requests=part(1, int),
        reset_requests=part(2, float),
        limit_tokens=part(3, int),
        remaining_tokens=part(4, int),
        reset_tokens=part(5, float),
    )


class RedisLimitState:
    def __init__(
        self, redis: Redis, prefix: str = "remotellm:", lease: float = DEFAULT_LEASE
    ) -> None:
        """``lease``: seconds after which a reservation no broker settled is released.

        Longer than any request may live (``--total-timeout``), so it only ever releases
        the reservations of a broker that died with requests in flight.
        """
        self.redis = redis
        self.prefix = prefix
        self.lease = lease
        self._reserve: AsyncScript = redis.register_script(
            limit_scripts.COMMON + limit_scripts.RESERVE
        )
        self._settle: AsyncScript = redis.register_script(
            limit_scripts.COMMON + limit_scripts.SETTLE
        )

    async def reserve(
        self, subjects: tuple[str, ...], demand: int, limits: Sequence[Limits], now: float
    ) -> Reservation | Refusal:
        if len(subjects) != len(limits):
            raise ValueError("one Limits per subject")
        demand = max(0, demand)
        rid = "r" + secrets.token_hex(8)
        args: list[Any] = [
            self.prefix,
            rid,
            repr(now),
            demand,
            day_of(now),
            month_of(now),
            repr(day_end(now)),
            repr(month_end(now)),
            len(subjects),
        ]
        for subject, lim in zip(subjects, limits, strict=True):
            args += [
                subject,
                _n(lim.rpm),
                _n(lim.tpm),
                _n(lim.concurrency),
                _n(lim.daily_tokens),
                _n(lim.monthly_tokens),
            ]
        args += [repr(self.lease), RECLAIM]
        try:
            answer = await self._reserve(args=args)
        except RedisError as exc:
            raise StateUnavailable(UNAVAILABLE) from exc
        if answer[0] == b"no":
            return Refusal(
                reason=Reason(answer[1].decode()),
                subject=answer[2].decode(),
                limit=int(answer[3]),
                used=int(answer[4]),
                requested=int(answer[5]),
                retry_after=float(answer[6]),
                info=_info(answer[7:13]),
            )
        holds = []
        for i, (subject, lim) in enumerate(zip(subjects, limits, strict=True)):
            taken, day, day_period, month, month_period = answer[7 + 5 * i : 12 + 5 * i]
            holds.append(
                Hold(
                    subject,
                    lim,
                    int(taken),
                    int(day),
                    int(day_period),
                    int(month),
                    int(month_period),
                )
            )
        return Reservation(id=rid, demand=demand, holds=tuple(holds), info=_info(answer[1:7]))

    async def settle(self, reservation: Reservation, actual: int, now: float) -> None:
        args: list[Any] = [
            self.prefix,
            reservation.id,
            repr(now),
            max(0, actual),
            day_of(now),
            month_of(now),
            len(reservation.holds),
        ]
        for hold in reservation.holds:
            lim = hold.limits
            quota = lim.daily_tokens is not None or lim.monthly_tokens is not None
            args += [
                hold.subject,
                _n(lim.tpm),
                "1" if quota else "0",
                hold.tokens,
                hold.day,
                hold.day_period,
                hold.month,
                hold.month_period,
            ]
        try:
            await self._settle(args=args)
        except RedisError as exc:
            raise StateUnavailable(UNAVAILABLE) from exc

    async def usage_snapshot(
        self, now: float, subjects: Sequence[str] | None = None
    ) -> list[SubjectUsage]:
        p = self.prefix
        try:
            if subjects is None:
                members: Any = await self.redis.smembers(p + "lims")
                names = sorted(m.decode() for m in members)
            else:
                names = list(subjects)
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(p + "lim:" + name)
                found = await pipe.execute()
        except RedisError as exc:
            raise StateUnavailable(UNAVAILABLE) from exc
        return [
            _usage(name, {k.decode(): v.decode() for k, v in raw.items()}, now)
            for name, raw in zip(names, found, strict=True)
            if raw
        ]


def _usage(subject: str, f: dict[str, str], now: float) -> SubjectUsage:
    def i(key: str, default: int = 0) -> int:
        return int(float(f[key])) if key in f else default

    lim = Limits(
        rpm=_opt(i("rpm", -1)),
        tpm=_opt(i("tpm", -1)),
        concurrency=_opt(i("conc", -1)),
        daily_tokens=_opt(i("daily", -1)),
        monthly_tokens=_opt(i("monthly", -1)),
    )
    requests = Meter(float(f.get("rl", 0)), float(f.get("ra", 0)))
    tokens = Meter(float(f.get("tl", 0)), float(f.get("ta", 0)))
    day_used = i("du") + i("dh") if i("dp", -1) == day_of(now) else 0
    month_used = i("mu") + i("mh") if i("mp", -1) == month_of(now) else 0
    reason = f.get("lreason")
    return SubjectUsage(
        subject=subject,
        limits=lim,
        in_flight=i("inf"),
        requests_last_minute=math.ceil(requests.current(lim.rpm, now) - EPSILON) if lim.rpm else 0,
        tokens_last_minute=math.ceil(tokens.current(lim.tpm, now) - EPSILON) if lim.tpm else 0,
        tokens_today=day_used,
        tokens_this_month=month_used,
        refusals=i("refusals"),
        last_refused=float(f["lr"]) if "lr" in f else None,
        last_reason=Reason(reason) if reason else None,
    )
