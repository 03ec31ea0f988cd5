"""The ledger's alias column: written, migrated into older databases, grouped by."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from broker.usage.ledger import UsageRecord, UsageRecorder
from broker.usage.prices import parse_models_file
from broker.usage.query import UsageFilter, recent_requests, totals

PRICES = "currency: EUR\nmodels:\n  big: {input_per_million: 1.0, output_per_million: 2.0}\n"


def row(rid: str, model: str, alias: str | None, tokens_out: int = 100) -> UsageRecord:
    return UsageRecord(
        ts=1_767_225_000.0,
        request_id=rid,
        user_id="alice",
        model=model,
        connector="gpu-box",
        status=200,
        stream=False,
        tokens_in=10,
        tokens_out=tokens_out,
        ttfb_ms=1.0,
        duration_ms=2.0,
        bytes_out=10,
        alias=alias,
    )


async def write(path: Path, rows: list[UsageRecord]) -> None:
    recorder = UsageRecorder(path, flush_interval=60.0)
    await recorder.start()
    for r in rows:
        recorder.record(r)
    await recorder.stop()


async def test_totals_by_alias_cost_the_served_models(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    await write(
        path, [row("r1", "big", "chat"), row("r2", "small", "chat"), row("r3", "big", None)]
    )
    prices = parse_models_file(PRICES, "models.yaml").prices
    by_alias = {r.key: r for r in totals(path, UsageFilter(), "alias", prices)}
    assert {k: r.requests for k, r in by_alias.items()} == {"-": 1, "chat": 2}
    assert by_alias["chat"].cost_in is not None  # "big" is priced: the served model's price
    assert [r.alias for r in recent_requests(path, request_id="r2")] == ["chat"]


async def test_an_older_database_gains_the_alias_column(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    await write(path, [row("old", "big", None)])
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE usage DROP COLUMN alias")
    db.close()
    await write(path, [row("new", "big", "chat")])
    assert [(r.request_id, r.alias) for r in recent_requests(path)] == [
        ("new", "chat"),
        ("old", None),
    ]
