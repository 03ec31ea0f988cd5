"""The admin page's usage and request log: query parameters in, what the page shows out.

Every number comes from ``broker.usage.query`` (the ledger's one read side, shared with
``remotellm-broker usage``), run in a thread. Query parameters are checked here; a bad
one raises ``BadQuery`` with a message the page shows.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta

from broker.accounts.users import UsersStore
from broker.broker_state import BrokerState
from broker.portal.admin_views import find_user, usernames
from broker.portal.svg_chart import DayBar, fill_days, tokens_chart
from broker.usage.query import (
    LedgerError,
    LedgerMissing,
    RequestRow,
    TotalRow,
    UsageFilter,
    daily_tokens,
    grand_total,
    recent_requests,
    totals,
)

PERIODS = {"1d": 1, "7d": 7, "30d": 30}
DEFAULT_PERIOD = "7d"
MAX_RANGE_DAYS = 366
LOG_LIMIT = 200
DAY = 86400.0
# A static key's user id (``u-`` and 8 hex) or a portal user's (``gitlab-<n>``).
USER_ID = re.compile(r"^(u-[0-9a-f]{8}|gitlab-\d{1,12})$")


class BadQuery(ValueError):
    """A filter the page cannot use; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Period:
    since: float
    until: float
    first_day: str
    last_day: str
    key: str  # "1d", "7d", "30d" or "range"
    label: str


@dataclass(frozen=True, slots=True)
class UsageView:
    period: Period
    user: str
    model: str
    by_user: list[TotalRow] = field(default_factory=list)  # user x model
    by_model: list[TotalRow] = field(default_factory=list)
    total: TotalRow | None = None
    chart: str = ""
    names: dict[str, str] = field(default_factory=dict)
    priced: bool = False
    currency: str = ""
    note: str = ""  # nothing recorded yet, or the database cannot be read


@dataclass(frozen=True, slots=True)
class LogView:
    user: str
    model: str
    status: str
    request_id: str
    rows: list[RequestRow] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)
    limit: int = LOG_LIMIT
    note: str = ""

    @property
    def filtered(self) -> bool:
        return bool(self.user or self.model or self.status or self.request_id)


def _day(text: str, what: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise BadQuery(f"{what} {text[:40]!r} is not a date like 2026-12-01") from None


def _midnight(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def parse_period(args: Mapping[str, str], now: float) -> Period:
    """``period=1d|7d|30d`` (up to now), or ``from`` and ``to`` (UTC days, both included)."""
    start, end = args.get("from", "").strip(), args.get("to", "").strip()
    if start or end:
        if not (start and end):
            raise BadQuery("give both from and to, or neither")
        first, last = _day(start, "from"), _day(end, "to")
        if last < first:
            raise BadQuery(f"to ({last}) is before from ({first})")
        if (last - first).days >= MAX_RANGE_DAYS:
            raise BadQuery(f"a range is at most {MAX_RANGE_DAYS} days")
        until = _midnight(last + timedelta(days=1))
        return Period(_midnight(first), until, str(first), str(last), "range", f"{first} to {last}")
    key = args.get("period", "").strip() or DEFAULT_PERIOD
    if key not in PERIODS:
        raise BadQuery(f"period {key[:20]!r} is not one of {', '.join(PERIODS)}")
    since = now - PERIODS[key] * DAY
    first = datetime.fromtimestamp(since, UTC).date()
    last = datetime.fromtimestamp(now, UTC).date()
    return Period(since, now + 1.0, str(first), str(last), key, f"last {key}")


def user_id_for(users: UsersStore, value: str) -> str | None:
    """A user filter: a portal username, or a user id as the ledger keeps it."""
    value = value.strip()
    if not value:
        return None
    found = find_user(users.users, value)
    if found is not None:
        return found.user_id
    if USER_ID.match(value):
        return value
    raise BadQuery(f"there is no user {value[:80]!r} (give a username or an id like gitlab-42)")


def _text(args: Mapping[str, str], name: str, limit: int = 200) -> str:
    value = args.get(name, "").strip()
    if len(value) > limit:
        raise BadQuery(f"{name} is longer than {limit} characters")
    return value


async def usage_view(
    state: BrokerState, users: UsersStore, args: Mapping[str, str], now: float | None = None
) -> UsageView:
    period = parse_period(args, time.time() if now is None else now)
    user, model = _text(args, "user", 100), _text(args, "model")
    filt = UsageFilter(period.since, period.until, user_id_for(users, user), model or None)
    names = usernames(users.users)
    currency = state.prices.currency if state.prices is not None else ""
    base = UsageView(period, user, model, names=names, priced=bool(currency), currency=currency)
    if not state.settings.record_usage:
        return replace(base, note="Usage is not recorded on this broker (--no-record-usage).")
    db = state.settings.usage_path

    def read() -> tuple[list[TotalRow], list[TotalRow], list[DayBar]]:
        by_user = totals(db, filt, "user", state.prices, then="model")
        by_model = totals(db, filt, "model", state.prices)
        days = [DayBar(d.day, d.tokens_in, d.tokens_out) for d in daily_tokens(db, filt)]
        return by_user, by_model, days

    try:
        by_user, by_model, days = await asyncio.to_thread(read)
    except LedgerMissing:
        by_user, by_model, days = [], [], []
    except LedgerError as exc:
        return replace(base, note=str(exc))
    bars = fill_days(days, period.first_day, period.last_day)
    title = f"Tokens per day, {period.label}" + (f", {model}" if model else "")
    return UsageView(
        period,
        user,
        model,
        by_user=by_user,
        by_model=by_model,
        total=grand_total(by_model) if by_model else None,
        chart=tokens_chart(bars, title),
        names=names,
        priced=bool(currency),
        currency=currency,
    )


async def request_log(state: BrokerState, users: UsersStore, args: Mapping[str, str]) -> LogView:
    user, model = _text(args, "user", 100), _text(args, "model")
    status, request_id = _text(args, "status", 3), _text(args, "request_id")
    code: int | None = None
    if status:
        if not status.isdigit() or not 100 <= int(status) <= 599:
            raise BadQuery(f"status {status!r} is not an HTTP status such as 200 or 429")
        code = int(status)
    uid = user_id_for(users, user)
    base = LogView(user, model, status, request_id, names=usernames(users.users))
    if not state.settings.record_usage:
        return replace(base, note="Usage is not recorded on this broker (--no-record-usage).")
    db = state.settings.usage_path
    try:
        rows = await asyncio.to_thread(
            recent_requests,
            db,
            user=uid,
            model=model or None,
            status=code,
            request_id=request_id or None,
            limit=LOG_LIMIT,
        )
    except LedgerMissing:
        rows = []
    except LedgerError as exc:
        return replace(base, note=str(exc))
    return replace(base, rows=rows)
