"""Limits on the API path: what a request counts against, its 429, its headers, its settle.

``ApiRelay`` calls ``admit`` after the key and the body were checked and before the request
is queued, and ``settle`` exactly once when it ended, however it ended. With no limit
configured for the user and key, ``admit`` returns ``None`` at once and nothing is counted.
See docs/limits.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from broker.accounts.keys import UserKey
from broker.api.input import ApiError
from broker.core.demand import Ask, Demand
from broker.core.limits import NO_LIMITS, Limits, Reason, Refusal, Reservation
from broker.core.rate_headers import go_duration, rate_headers
from broker.core.response import Outcome
from broker.core.route_shapes import shape_for
from broker.core.shape import OPENAI, RouteShape
from broker.metrics import BrokerMetrics
from broker.state.limits import LimitState
from shared.logging import get_logger
from shared.protocol import REQUEST_ID_HEADER

__all__ = [
    "LimitGate",
    "Reach",
    "Ticket",
    "actual_tokens",
    "go_duration",
    "key_subject",
    "rate_headers",
    "refusal_error",
]

log = get_logger("broker.limits")

NO_DEMAND = Demand(0, 0)
_DIMENSION = {
    Reason.RPM: "requests per minute (RPM)",
    Reason.TPM: "tokens per minute (TPM)",
}


@dataclass(frozen=True, slots=True)
class Ticket:
    """A granted request's reservation and the headers its response carries."""

    reservation: Reservation
    demand: Demand
    headers: dict[str, str]


def key_subject(user: UserKey) -> str:
    """The subject of one key's own limits: ``<user id>/<key name>``."""
    return f"{user.id}/{user.name}"


def _whose(subject: str) -> str:
    user, _, key = subject.partition("/")
    return f"key {key!r}" if key else f"user {user}"


def _message(refusal: Refusal, demand: Demand) -> str:
    r = refusal
    wait = go_duration(r.retry_after)
    if r.reason is Reason.CONCURRENCY:
        return (
            f"Too many concurrent requests for {_whose(r.subject)}: Limit {r.limit} in "
            "flight. Try again when one of them has finished."
        )
    if r.reason in _DIMENSION:
        requested = f"Requested {r.requested}"
        if r.reason is Reason.TPM:
            requested += f" (prompt ~{demand.prompt} + up to {demand.completion} completion)"
        return (
            f"Rate limit reached for {_DIMENSION[r.reason]} on {_whose(r.subject)}: "
            f"Limit {r.limit}, Used {r.used}, {requested}. Please try again in {wait}."
        )
    period, when = (
        ("daily", "00:00 UTC") if r.reason is Reason.DAILY else ("monthly", "00:00 UTC on the 1st")
    )
    return (
        f"You exceeded the {period} token quota of {_whose(r.subject)}: Limit {r.limit}, "
        f"Used {r.used}, Requested up to {r.requested}. It resets in {wait} (at {when}); "
        "a smaller max_tokens may fit before then."
    )


def refusal_error(
    refusal: Refusal, demand: Demand, rid: str, shape: RouteShape = OPENAI, now: float = 0.0
) -> ApiError:
    """The 429 for a refused request: Retry-After and the route's rate headers (its body
    in the route's shape is made at the error boundary)."""
    headers = {REQUEST_ID_HEADER: rid, **shape.rate_headers(refusal.info, now)}
    headers["Retry-After"] = str(max(1, math.ceil(refusal.retry_after)))
    headers["retry-after-ms"] = str(max(1, math.ceil(refusal.retry_after * 1000)))
    if refusal.retryable:
        type_ = "tokens" if refusal.reason is Reason.TPM else "requests"
        code = "rate_limit_exceeded"
    else:
        headers["x-should-retry"] = "false"  # the SDKs retry a 429 unless told not to
        type_ = code = "insufficient_quota"
    return ApiError(429, _message(refusal, demand), code, type_=type_, headers=headers)


class Reach(Enum):
    """How far a request got: what its settle may assume the upstream spent."""

    NOWHERE = "nowhere"  # refused by the relay, or cancelled while queued
    CONNECTOR = "connector"  # handed to a connector; no answer head came back
    UPSTREAM = "upstream"  # the upstream's answer head arrived


def actual_tokens(demand: Demand, outcome: Outcome | None, reach: Reach) -> int:
    """What a request used, for the settle.

    Nothing when no connector took it; the prompt estimate when one did but no answer
    came (the upstream may have read the prompt); when the upstream answered, its usage
    where the response says it and the estimate where it does not, and nothing for an
    error status without usage.
    """
    if reach is Reach.NOWHERE or outcome is None:
        return 0
    if reach is Reach.CONNECTOR:
        return demand.prompt
    tokens_in, tokens_out = outcome.tokens_in, outcome.tokens_out
    if tokens_in is None and tokens_out is None and outcome.error == "upstream_status":
        return 0
    prompt = demand.prompt if tokens_in is None else tokens_in
    return prompt + (demand.completion if tokens_out is None else tokens_out)


class LimitGate:
    def __init__(
        self,
        state: LimitState,
        defaults: Limits,
        default_max_tokens: int,
        metrics: BrokerMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.defaults = defaults
        self.default_max_tokens = default_max_tokens
        self.metrics = metrics
        self.clock = clock

    def subjects(self, user: UserKey) -> tuple[tuple[str, ...], tuple[Limits, ...]]:
        """The subjects a request of ``user`` counts against, each with its limits."""
        if self.defaults.unlimited and user.limits is None and user.key_limits is None:
            return (), ()
        mine = self.defaults if user.limits is None else user.limits.apply(self.defaults)
        names: list[str] = []
        limits: list[Limits] = []
        if not mine.unlimited:
            names.append(user.id)
            limits.append(mine)
        if user.key_limits is not None:
            key = user.key_limits.apply(NO_LIMITS)
            if not key.unlimited:
                names.append(key_subject(user))
                limits.append(key)
        return tuple(names), tuple(limits)

    async def admit(self, user: UserKey, ask: Ask, path: str, rid: str) -> Ticket | None:
        """Reserve the request's worst case, or raise the 429 (``ApiError``)."""
        names, limits = self.subjects(user)
        if not names:
            return None
        counts_tokens = any(lim.counts_tokens for lim in limits)
        demand = ask.demand(path, self.default_max_tokens) if counts_tokens else NO_DEMAND
        now = self.clock()
        answer = await self.state.reserve(names, demand.total, limits, now)
        if isinstance(answer, Refusal):
            self.metrics.rate_limited(answer.reason.value)
            log.info(
                "request_rate_limited",
                user=user.id,
                subject=answer.subject,
                reason=answer.reason.value,
                limit=answer.limit,
                used=answer.used,
                requested=answer.requested,
                retry_after_s=round(answer.retry_after, 3),
            )
            raise refusal_error(answer, demand, rid, shape_for(path), now)
        return Ticket(answer, demand, shape_for(path).rate_headers(answer.info, now))

    async def settle(self, ticket: Ticket | None, outcome: Outcome | None, reach: Reach) -> None:
        """End the reservation with what the request used; never raises."""
        if ticket is None:
            return
        actual = actual_tokens(ticket.demand, outcome, reach)
        try:
            await self.state.settle(ticket.reservation, actual, self.clock())
        except Exception as exc:  # a lost settle must not break the answer already sent
            log.exception("limit_settle_failed", error_type=type(exc).__name__)
