"""``remotellm-broker usage``: totals from the usage ledger, as a table, JSON or CSV.

It reads the same settings as the broker (``--config``, env, the group's flags), so it
finds the very database the running broker writes (``<data-dir>/usage.sqlite3`` or
``--usage-db``), read-only, while the broker keeps writing.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from broker.accounts.users import UsersFileError, parse_users
from broker.cli.program import BROKER
from broker.settings import BrokerSettings
from broker.usage.prices import PriceBook, load_prices
from broker.usage.query import (
    GROUPS,
    Group,
    LedgerError,
    TotalRow,
    UsageFilter,
    grand_total,
    merged_totals,
)
from shared.errors import ConfigError

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
FORMATS = ("table", "json", "csv")


def parse_when(text: str, now: float) -> float:
    """Unix seconds for ``7d``/``24h``/``30m``/``2w`` (that long before ``now``) or an ISO
    date or time (``2026-12-01``, ``2026-12-01T08:00``, with an offset or UTC when none)."""
    value = text.strip()
    relative = _RELATIVE.match(value.lower())
    if relative:
        return now - float(relative.group(1)) * _UNIT_SECONDS[relative.group(2)]
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a relative time (7d, 24h, 30m, 2w) nor an ISO date or "
            "time (2026-12-01, 2026-12-01T08:00, 2026-12-01T08:00+01:00)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class WhenType(click.ParamType):  # type: ignore[type-arg]
    name = "WHEN"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_when(str(value), time.time())
        except ValueError as exc:
            self.fail(str(exc), param, ctx)  # raises click's BadParameter: exit 2


def _settings(ctx: click.Context, models_file: Path | None) -> BrokerSettings:
    return BROKER.load_sub(ctx, options={"models_file": models_file})


_fail = BROKER.fail


def _user_id(settings: BrokerSettings, user: str | None) -> str | None:
    """A portal username (or GitLab id) means that user's ID; anything else is an ID."""
    if user is None or not settings.users_path.is_file():
        return user
    try:  # parsed here, not through UsersStore: its log lines would mix into the output
        users = parse_users(settings.users_path.read_text(encoding="utf-8"), settings.users_path)
    except (OSError, UsersFileError) as exc:
        _fail(f"--user {user}: cannot read the users file to look the name up: {exc}")
    entry = users.find(user)
    return entry.user_id if entry is not None else user


def _money(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value >= 100 else f"{value:.6f}"  # cents of a cent show


def _columns(by: str, prices: PriceBook | None) -> list[str]:
    names = [by, "requests", "errors", "tokens_in", "tokens_out", "estimated", "partial"]
    if prices is not None:
        names += ["cost_in", "cost_out", "cost"]
    return names


def _cells(row: TotalRow, prices: PriceBook | None) -> list[str]:
    cells = [
        row.key,
        str(row.requests),
        str(row.errors),
        str(row.tokens_in),
        str(row.tokens_out),
        str(row.estimated),
        str(row.partial),
    ]
    if prices is not None:
        cells += [_money(row.cost_in), _money(row.cost_out), _money(row.cost)]
    return cells


def render_table(rows: Sequence[TotalRow], by: str, prices: PriceBook | None) -> str:
    header = [c.replace("_", " ").upper() for c in _columns(by, prices)]
    if prices is not None:
        header[-3:] = [f"{h} ({prices.currency})" for h in header[-3:]]
    body = [_cells(r, prices) for r in rows]
    total = _cells(grand_total(list(rows)), prices)
    table = [header, *body, total]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    numeric = range(1, len(header))

    def line(cells: list[str]) -> str:
        out = [
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), *(line(r) for r in body), rule, line(total)]) + "\n"


def render_csv(rows: Sequence[TotalRow], by: str, prices: PriceBook | None) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_columns(by, prices))
    for row in [*rows, grand_total(list(rows))]:
        cells = _cells(row, prices)
        if prices is not None:  # plain numbers in CSV: empty when unpriced
            cells[-3:] = [
                "" if v is None else repr(v) for v in (row.cost_in, row.cost_out, row.cost)
            ]
        writer.writerow(cells)
    return out.getvalue()


def _json_row(row: TotalRow, by: str, prices: PriceBook | None) -> dict[str, object]:
    data = asdict(row)
    data.pop("key2")
    data[by] = data.pop("key")
    if prices is None:
        for name in ("cost_in", "cost_out", "cost"):
            data.pop(name)
    return data


def render_json(
    rows: Sequence[TotalRow], by: str, prices: PriceBook | None, filt: UsageFilter
) -> str:
    doc = {
        "by": by,
        "filter": asdict(filt),
        "currency": prices.currency if prices else None,
        "rows": [_json_row(r, by, prices) for r in rows],
        "total": _json_row(grand_total(list(rows)), by, prices),
    }
    return json.dumps(doc, indent=2) + "\n"


F = TypeVar("F", bound=Callable[..., Any])


def period_options(func: F) -> F:
    """``--since`` and ``--until``, as every ledger command reads a period."""
    func = click.option(
        "--until", type=WhenType(), default=None, help="Up to, exclusive (same forms as --since)."
    )(func)
    return click.option(
        "--since", type=WhenType(), default=None, help="From (7d, 24h, or ISO date/time)."
    )(func)


def db_option(merged: str) -> Callable[[F], F]:
    """``--db`` (repeatable): other brokers' usage databases, ``merged`` as said."""
    return click.option(
        "--db",
        "dbs",
        multiple=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help="A usage database to read instead of this broker's (repeatable: one per broker "
        f"when several share a Redis; {merged}).",
    )


@click.command("usage")
@period_options
@click.option("--user", default=None, help="One user: user ID, or portal username.")
@click.option("--model", default=None, help="One model.")
@click.option(
    "--by",
    type=click.Choice(GROUPS),
    default="user",
    show_default=True,
    help="One row per user, model, UTC day, connector or alias.",
)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option(
    "--models-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Prices per model (as the broker's --models-file): adds cost columns.",
)
@db_option("their totals are merged")
@click.pass_context
def usage_command(
    ctx: click.Context,
    since: float | None,
    until: float | None,
    user: str | None,
    model: str | None,
    by: str,
    fmt: str,
    models_file: Path | None,
    dbs: tuple[Path, ...],
) -> None:
    """Totals of requests and tokens from the usage ledger, with a total row.

    Examples: `remotellm-broker usage --since 7d --by model`,
    `remotellm-broker usage --since 2026-11-01 --until 2026-12-01 --format csv`,
    `remotellm-broker usage --db a/usage.sqlite3 --db b/usage.sqlite3` (several brokers).
    """
    settings = _settings(ctx, models_file)
    try:
        prices = load_prices(settings.models_file) if settings.models_file else None
    except ConfigError as exc:
        _fail(str(exc), 2)
    if since is not None and until is not None and until <= since:
        _fail("--until must be later than --since", 2)
    filt = UsageFilter(since=since, until=until, user=_user_id(settings, user), model=model)
    group = cast(Group, by)
    try:
        rows = merged_totals(list(dbs) or [settings.usage_path], filt, group, prices)
    except LedgerError as exc:
        _fail(str(exc))
    if fmt == "json":
        click.echo(render_json(rows, by, prices, filt), nl=False)
    elif fmt == "csv":
        click.echo(render_csv(rows, by, prices), nl=False)
    else:
        click.echo(render_table(rows, by, prices), nl=False)


__all__ = ["parse_when", "usage_command"]
