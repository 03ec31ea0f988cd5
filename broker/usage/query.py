"""The read side of the usage ledger: totals, tokens per day, the request log.

One module for every reader (``remotellm-broker usage``, the user's usage page, the admin
page), so they all count the same way. Connections are read-only (``mode=ro``) and every
value is a bound parameter. Days are UTC dates. An "error" is a status of 400 or more
other than 499 (the client hung up: that request is marked ``partial`` instead).
Functions here block on the disk: async callers run them in a thread.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import quote

from broker.usage.ledger import UsageRecord
from broker.usage.prices import PriceBook
from shared.errors import RemoteLLMError

Group = Literal["user", "model", "day", "connector", "alias"]
GROUPS: tuple[str, ...] = get_args(Group)
TOTAL_KEY = "TOTAL"
CLIENT_GONE = 499

_KEY_SQL: dict[str, str] = {
    "user": "user_id",
    "model": "model",
    "day": "date(ts, 'unixepoch')",
    "connector": "coalesce(connector, '-')",
    "alias": "coalesce(alias, '-')",  # the alias a request named (docs/aliases.md)
}
_ERROR_SQL = f"CASE WHEN status >= 400 AND status != {CLIENT_GONE} THEN 1 ELSE 0 END"

RequestRow = UsageRecord  # one row of the ledger, every column
_ROW_COLUMNS = ", ".join(f.name for f in fields(UsageRecord))


class LedgerError(RemoteLLMError):
    """The usage database cannot be read (the message says which file and why)."""


class LedgerMissing(LedgerError):
    """No usage database at that path (nothing recorded yet, or another data dir)."""


def where_clause(*conditions: tuple[str, object | None]) -> tuple[str, list[object]]:
    """`` WHERE`` and the conditions whose value is given, ANDed, with their arguments."""
    given = [(clause, value) for clause, value in conditions if value is not None]
    if not given:
        return "", []
    return " WHERE " + " AND ".join(c for c, _ in given), [v for _, v in given]


@dataclass(frozen=True, slots=True)
class UsageFilter:
    since: float | None = None  # Unix seconds, inclusive
    until: float | None = None  # Unix seconds, exclusive
    user: str | None = None
    model: str | None = None

    def where(self) -> tuple[str, list[object]]:
        return where_clause(
            ("ts >= ?", self.since),
            ("ts < ?", self.until),
            ("user_id = ?", self.user),
            ("model = ?", self.model),
        )


@dataclass(frozen=True, slots=True)
class TotalRow:
    key: str
    requests: int
    errors: int
    tokens_in: int
    tokens_out: int
    estimated: int  # requests whose tokens the broker counted itself
    partial: int  # requests whose answer did not complete
    cost_in: float | None = None  # None: no prices, or none of these models has one
    cost_out: float | None = None
    cost: float | None = None
    key2: str | None = None  # the second grouping's value, with ``then=``

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out


@dataclass(frozen=True, slots=True)
class DayTokens:
    day: str  # YYYY-MM-DD, UTC
    tokens_in: int
    tokens_out: int


@contextlib.contextmanager
def _reader(db: Path) -> Iterator[sqlite3.Connection]:
    if not db.is_file():
        raise LedgerMissing(
            f"no usage database at {db} (nothing recorded yet, or another --data-dir)"
        )
    uri = f"file:{quote(str(db.resolve()))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot open the usage database {db}: {exc}") from exc
    try:
        yield conn
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot read the usage database {db}: {exc}") from exc
    finally:
        conn.close()


def _add_cost(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else a + b


def _merge(a: TotalRow, b: TotalRow) -> TotalRow:
    return replace(
        a,
        requests=a.requests + b.requests,
        errors=a.errors + b.errors,
        tokens_in=a.tokens_in + b.tokens_in,
        tokens_out=a.tokens_out + b.tokens_out,
        estimated=a.estimated + b.estimated,
        partial=a.partial + b.partial,
        cost_in=_add_cost(a.cost_in, b.cost_in),
        cost_out=_add_cost(a.cost_out, b.cost_out),
        cost=_add_cost(a.cost, b.cost),
    )


def totals(
    db: Path,
    filt: UsageFilter,
    by: Group,
    prices: PriceBook | None,
    *,
    then: Group | None = None,
) -> list[TotalRow]:
    """Requests, errors, tokens and marks per ``by`` (and per ``then`` within it), with costs.

    Rows come ordered by key (days oldest first), then by ``then``. Costs are summed over
    the priced models of each row; a row with no priced model has ``None``.
    """
    if by not in _KEY_SQL or (then is not None and then not in _KEY_SQL):
        raise ValueError(f"group by one of {', '.join(GROUPS)}")
    second = _KEY_SQL[then] if then else "''"
    where, args = filt.where()
    sql = (
        f"SELECT {_KEY_SQL[by]} AS k, {second} AS k2, model, count(*), sum({_ERROR_SQL}), "
        "coalesce(sum(tokens_in), 0), coalesce(sum(tokens_out), 0), sum(estimated), "
        f"sum(partial) FROM usage{where} GROUP BY k, k2, model ORDER BY k, k2, model"
    )
    with _reader(db) as conn:
        found = conn.execute(sql, args).fetchall()
    rows: dict[tuple[str, str], TotalRow] = {}
    for key, key2, model, n, errors, t_in, t_out, estimated, partial in found:
        cost = prices.cost(model, t_in, t_out) if prices else None
        row = TotalRow(
            key=str(key),
            key2=str(key2) if then else None,
            requests=n,
            errors=errors,
            tokens_in=t_in,
            tokens_out=t_out,
            estimated=estimated,
            partial=partial,
            cost_in=cost.input if cost else None,
            cost_out=cost.output if cost else None,
            cost=cost.total if cost else None,
        )
        slot = (row.key, key2)
        rows[slot] = _merge(rows[slot], row) if slot in rows else row
    return list(rows.values())


def merged_totals(
    dbs: Sequence[Path], filt: UsageFilter, by: Group, prices: PriceBook | None
) -> list[TotalRow]:
    """``totals`` over several ledgers, one per broker (docs/scale-out.md), row by row.

    Brokers record different requests (each its own API users'), so summing the rows of
    the same key is the whole answer; rows come ordered by key as ``totals`` orders them.
    """
    rows: dict[tuple[str, str | None], TotalRow] = {}
    for db in dbs:
        for row in totals(db, filt, by, prices):
            slot = (row.key, row.key2)
            rows[slot] = _merge(rows[slot], row) if slot in rows else row
    return [rows[slot] for slot in sorted(rows, key=lambda s: (s[0], s[1] or ""))]


def grand_total(rows: list[TotalRow]) -> TotalRow:
    """One row summing ``rows`` (key ``TOTAL``)."""
    total = TotalRow(TOTAL_KEY, 0, 0, 0, 0, 0, 0)
    for row in rows:
        total = _merge(total, replace(row, key=TOTAL_KEY, key2=None))
    return total


def daily_tokens(db: Path, filt: UsageFilter) -> list[DayTokens]:
    """Tokens in and out per UTC day, oldest first (days without requests are absent)."""
    where, args = filt.where()
    sql = (
        "SELECT date(ts, 'unixepoch') AS day, coalesce(sum(tokens_in), 0), "
        f"coalesce(sum(tokens_out), 0) FROM usage{where} GROUP BY day ORDER BY day"
    )
    with _reader(db) as conn:
        return [DayTokens(str(d), i, o) for d, i, o in conn.execute(sql, args)]


def recent_requests(
    db: Path,
    *,
    user: str | None = None,
    model: str | None = None,
    status: int | None = None,
    request_id: str | None = None,
    limit: int = 100,
) -> list[RequestRow]:
    """The newest requests first, every column, filtered by any of the arguments."""
    clauses: list[str] = []
    args: list[object] = []
    for clause, value in (
        ("user_id = ?", user),
        ("model = ?", model),
        ("status = ?", status),
        ("request_id = ?", request_id),
    ):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    sql = f"SELECT {_ROW_COLUMNS} FROM usage{where} ORDER BY ts DESC LIMIT ?"
    args.append(max(0, limit))
    with _reader(db) as conn:
        found = conn.execute(sql, args).fetchall()
    return [_request_row(row) for row in found]


def _request_row(row: tuple[object, ...]) -> RequestRow:
    record = UsageRecord(*row)  # type: ignore[arg-type]
    # SQLite keeps booleans as integers.
    return replace(
        record,
        stream=bool(record.stream),
        estimated=bool(record.estimated),
        partial=bool(record.partial),
    )


open_read_only = _reader  # the same read-only connection for the audit log's readers
