"""The usage ledger on disk: schema migration, the read side (broker.usage.query), prices,
and ``remotellm-broker usage`` (run through click, no server)."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.cli import main as broker_cli
from broker.cli.usage import parse_when
from broker.usage.ledger import UsageRecord, UsageRecorder
from broker.usage.prices import PricesFileError, load_prices, parse_models_file
from broker.usage.query import (
    LedgerMissing,
    UsageFilter,
    daily_tokens,
    grand_total,
    recent_requests,
    totals,
)

pytestmark = pytest.mark.usefixtures("clean_env")

DAY1 = datetime(2026, 11, 30, 10, 0, tzinfo=UTC).timestamp()
DAY2 = datetime(2026, 12, 1, 9, 30, tzinfo=UTC).timestamp()
PRICES = """\
currency: EUR
models:
  big:
    input_per_million: 2.0
    output_per_million: 8.0
"""


def rec(ts: float, rid: str, user: str, model: str, **kw: object) -> UsageRecord:
    values: dict[str, object] = {
        "connector": "gpu-1",
        "status": 200,
        "stream": True,
        "tokens_in": 10,
        "tokens_out": 100,
        "ttfb_ms": 5.0,
        "duration_ms": 50.0,
        "bytes_out": 1000,
        "key_name": "laptop",
    }
    values.update(kw)
    return UsageRecord(ts, rid, user, model, **values)  # type: ignore[arg-type]


ROWS = [
    rec(DAY1, "r1", "alice", "big"),
    rec(DAY1 + 60, "r2", "alice", "small", tokens_in=5, tokens_out=50, estimated=True),
    rec(DAY2, "r3", "bob", "big", connector="gpu-2", tokens_in=1000, tokens_out=2000),
    rec(DAY2 + 1, "r4", "bob", "big", status=499, tokens_out=7, partial=True, estimated=True),
    rec(
        DAY2 + 2, "r5", "bob", "small", status=503, connector=None, tokens_in=None, tokens_out=None
    ),
]


async def write(path: Path, rows: list[UsageRecord]) -> None:
    recorder = UsageRecorder(path, flush_interval=60.0)
    await recorder.start()
    for row in rows:
        recorder.record(row)
    await recorder.stop()


@pytest.fixture
async def ledger(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "usage.sqlite3"
    await write(path, ROWS)
    return path


# -- the write side ------------------------------------------------------------------------


async def test_old_database_gains_the_new_columns_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    with sqlite3.connect(path) as db:  # the first schema, before key_name/estimated/partial
        db.execute(
            "CREATE TABLE usage (ts REAL NOT NULL, request_id TEXT NOT NULL, user_id TEXT NOT "
            "NULL, model TEXT NOT NULL, connector TEXT, status INTEGER NOT NULL, stream INTEGER "
            "NOT NULL, tokens_in INTEGER, tokens_out INTEGER, ttfb_ms REAL, duration_ms REAL "
            "NOT NULL, bytes_out INTEGER NOT NULL)"
        )
        db.execute("INSERT INTO usage VALUES (1.0, 'old', 'u', 'm', 'c', 200, 0, 1, 2, 3, 4, 5)")
    db.close()
    await write(path, [rec(DAY1, "new", "u", "m", estimated=True, partial=True)])
    rows = recent_requests(path)
    assert [(r.request_id, r.key_name, r.estimated, r.partial) for r in rows] == [
        ("new", "laptop", True, True),
        ("old", None, False, False),
    ]
    with sqlite3.connect(path) as db:
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
        indexes = {r[1] for r in db.execute("PRAGMA index_list(usage)")}
    db.close()
    assert mode == "wal"
    assert {"usage_request_id", "usage_ts", "usage_user_ts"} <= indexes


async def test_a_record_after_stop_is_written_at_once(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    recorder = UsageRecorder(path, flush_interval=60.0)
    await recorder.start()
    recorder.record(rec(DAY1, "before", "u", "m"))
    await recorder.stop()
    recorder.record(rec(DAY1 + 1, "late", "u", "m"))  # a request cancelled by the shutdown
    assert {r.request_id for r in recent_requests(path)} == {"before", "late"}
    assert recorder.written == 2


# -- the read side -------------------------------------------------------------------------


async def test_totals_by_user(ledger: Path) -> None:
    rows = totals(ledger, UsageFilter(), "user", None)
    assert [(r.key, r.requests, r.errors, r.tokens_in, r.tokens_out) for r in rows] == [
        ("alice", 2, 0, 15, 150),
        ("bob", 3, 1, 1010, 2007),  # the 499 is partial, not an error; the 503 is
    ]
    assert [(r.estimated, r.partial) for r in rows] == [(1, 0), (1, 1)]
    assert all(r.cost is None for r in rows)


async def test_totals_by_day_model_connector_and_filters(ledger: Path) -> None:
    by_day = totals(ledger, UsageFilter(), "day", None)
    assert [(r.key, r.requests) for r in by_day] == [("2026-11-30", 2), ("2026-12-01", 3)]
    by_connector = totals(ledger, UsageFilter(), "connector", None)
    assert [(r.key, r.requests) for r in by_connector] == [("-", 1), ("gpu-1", 3), ("gpu-2", 1)]
    since = UsageFilter(since=DAY2, model="big")
    assert [(r.key, r.tokens_out) for r in totals(ledger, since, "model", None)] == [("big", 2007)]
    until = UsageFilter(until=DAY2, user="alice")
    assert [(r.key, r.requests) for r in totals(ledger, until, "model", None)] == [
        ("big", 1),
        ("small", 1),
    ]
    assert totals(ledger, UsageFilter(user="nobody"), "user", None) == []


async def test_costs_sum_priced_models_only(ledger: Path) -> None:
    prices = parse_models_file(PRICES, "prices.yaml").prices
    rows = {r.key: r for r in totals(ledger, UsageFilter(), "model", prices)}
    big = rows["big"]  # 1020 in, 2107 out
    assert big.cost_in == pytest.approx(1020 * 2.0 / 1e6)
    assert big.cost_out == pytest.approx(2107 * 8.0 / 1e6)
    assert big.cost == pytest.approx(big.cost_in + big.cost_out)
    assert rows["small"].cost is None  # unpriced: unknown, never 0
    by_user = {r.key: r for r in totals(ledger, UsageFilter(), "user", prices)}
    assert by_user["alice"].cost == pytest.approx((10 * 2.0 + 100 * 8.0) / 1e6)
    total = grand_total(list(rows.values()))
    assert (total.requests, total.tokens_in, total.cost) == (5, 1025, big.cost)


async def test_day_then_model_for_the_users_page(ledger: Path) -> None:
    rows = totals(ledger, UsageFilter(user="bob"), "day", None, then="model")
    assert [(r.key, r.key2, r.requests) for r in rows] == [
        ("2026-12-01", "big", 2),
        ("2026-12-01", "small", 1),
    ]


async def test_daily_tokens_and_request_log(ledger: Path) -> None:
    assert [(d.day, d.tokens_in, d.tokens_out) for d in daily_tokens(ledger, UsageFilter())] == [
        ("2026-11-30", 15, 150),
        ("2026-12-01", 1010, 2007),
    ]
    newest = recent_requests(ledger, limit=2)
    assert [r.request_id for r in newest] == ["r5", "r4"]
    (found,) = recent_requests(ledger, request_id="r3")
    assert found == ROWS[2]
    assert [r.request_id for r in recent_requests(ledger, user="bob", status=499)] == ["r4"]
    assert [r.request_id for r in recent_requests(ledger, model="small")] == ["r5", "r2"]


def test_a_missing_database_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LedgerMissing, match="no usage database at"):
        totals(tmp_path / "none.sqlite3", UsageFilter(), "user", None)


# -- prices --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("currency: EUR\nmodels:\n  m:\n    input_per_million: 1\n", "output_per_million"),
        (
            "currency: EUR\nmodels:\n  m:\n    input_per_million: 1\n    output_per_million: 2\n"
            "    per_request: 3\n",
            "models.m.per_request: Extra inputs are not permitted",
        ),
        (
            "models:\n  m: {input_per_million: 1, output_per_million: 1}\n",
            "`currency` is required",
        ),
        (
            "currency: EUR\nmodels:\n  m: {input_per_million: -1, output_per_million: 1}\n",
            "greater than or equal to 0",
        ),
        ("- a\n- b\n", "expected a mapping"),
        ("currency: [\n", "not valid YAML"),
    ],
)
def test_prices_file_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(PricesFileError, match=message.replace("[", r"\[")):
        parse_models_file(text, "models.yaml")


def test_unreadable_prices_file(tmp_path: Path) -> None:
    with pytest.raises(PricesFileError, match="cannot read the models file"):
        load_prices(tmp_path / "missing.yaml")


# -- the CLI -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", 1_000_000.0 - 7 * 86400),
        ("24h", 1_000_000.0 - 24 * 3600),
        ("30m", 1_000_000.0 - 1800),
        ("2w", 1_000_000.0 - 14 * 86400),
        ("1.5h", 1_000_000.0 - 5400),
        ("2026-12-01", DAY2 - 9.5 * 3600),
        ("2026-12-01T09:30", DAY2),
        ("2026-12-01T09:30:00Z", DAY2),
        ("2026-12-01T10:30+01:00", DAY2),
    ],
)
def test_when_forms(text: str, expected: float) -> None:
    assert parse_when(text, now=1_000_000.0) == pytest.approx(expected)


def usage_cli(ledger: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(broker_cli.main, ["--data-dir", str(ledger.parent), "usage", *args])
    return result.exit_code, result.output


async def test_cli_table_has_a_total_row(ledger: Path) -> None:
    code, out = usage_cli(ledger, "--by", "model")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split() == [
        "MODEL", "REQUESTS", "ERRORS", "TOKENS", "IN", "TOKENS", "OUT", "ESTIMATED", "PARTIAL"
    ]  # fmt: skip
    assert lines[1].split() == ["big", "3", "0", "1020", "2107", "1", "1"]
    assert lines[2].split() == ["small", "2", "1", "5", "50", "1", "0"]
    assert set(lines[3]) <= {"-", " "}
    assert lines[4].split() == ["TOTAL", "5", "1", "1025", "2157", "2", "1"]


async def test_cli_json_with_prices_and_filters(ledger: Path, tmp_path: Path) -> None:
    prices = tmp_path / "models.yaml"
    prices.write_text(PRICES)
    code, out = usage_cli(
        ledger, "--by", "day", "--user", "bob", "--format", "json", "--models-file", str(prices)
    )
    assert code == 0, out
    doc = json.loads(out)
    assert doc["currency"] == "EUR"
    assert doc["filter"]["user"] == "bob"
    assert [(r["day"], r["requests"]) for r in doc["rows"]] == [("2026-12-01", 3)]
    assert doc["total"]["cost"] == pytest.approx((1010 * 2.0 + 2007 * 8.0) / 1e6)


async def test_cli_csv_and_time_window(ledger: Path, tmp_path: Path) -> None:
    prices = tmp_path / "models.yaml"
    prices.write_text(PRICES)
    code, out = usage_cli(
        ledger,
        "--models-file",
        str(prices),
        "--since",
        "2026-11-30",
        "--until",
        "2026-12-01",
        "--format",
        "csv",
    )
    assert code == 0, out
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == [
        "user", "requests", "errors", "tokens_in", "tokens_out", "estimated", "partial",
        "cost_in", "cost_out", "cost",
    ]  # fmt: skip
    assert rows[1][:5] == ["alice", "2", "0", "15", "150"]
    assert float(rows[1][-1]) == pytest.approx((10 * 2.0 + 100 * 8.0) / 1e6)
    assert rows[2][0] == "TOTAL"
    assert len(rows) == 3


async def test_cli_user_by_portal_username(ledger: Path) -> None:
    users = ledger.parent / "users.yaml"
    users.write_text("users:\n- gitlab_id: 7\n  username: bobby\n  keys: []\n")
    await write(ledger, [rec(DAY2, "r6", "gitlab-7", "big", tokens_in=1, tokens_out=2)])
    code, out = usage_cli(ledger, "--user", "bobby", "--format", "json")
    assert code == 0, out
    assert [r["user"] for r in json.loads(out)["rows"]] == ["gitlab-7"]


@pytest.mark.parametrize(
    ("args", "message", "status"),
    [
        (["--since", "last tuesday"], "neither a relative time", 2),
        (["--since", "1d", "--until", "2d"], "--until must be later than --since", 2),
        (["--by", "key"], "Invalid value for '--by'", 2),
    ],
)
async def test_cli_bad_input(ledger: Path, args: list[str], message: str, status: int) -> None:
    code, out = usage_cli(ledger, *args)
    assert code == status
    assert message in out


def test_cli_missing_database(tmp_path: Path) -> None:
    result = CliRunner().invoke(broker_cli.main, ["--data-dir", str(tmp_path), "usage"])
    assert result.exit_code == 1
    assert "no usage database at" in result.output
    assert "Traceback" not in result.output


async def test_cli_bad_models_file(ledger: Path, tmp_path: Path) -> None:
    bad = tmp_path / "models.yaml"
    bad.write_text("currency: EUR\nmodels:\n  big: {input: 1}\n")
    code, out = usage_cli(ledger, "--models-file", str(bad))
    assert code == 2
    assert "models.big.input" in out


async def test_cli_merges_the_ledgers_of_several_brokers(ledger: Path, tmp_path: Path) -> None:
    """Each broker of a scale-out keeps its own SQLite file; --db adds them up."""
    other = tmp_path / "broker-b" / "usage.sqlite3"
    await write(other, [rec(DAY2, "r9", "alice", "big", tokens_in=1, tokens_out=2)])
    result = CliRunner().invoke(
        broker_cli.main, ["usage", "--db", str(ledger), "--db", str(other), "--by", "user"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split()[:4] == ["alice", "3", "0", "16"]  # 10 + 5 here, 1 on broker b
    assert lines[2].split()[:4] == ["bob", "3", "1", "1010"]
    assert lines[-1].split()[:2] == ["TOTAL", "6"]
