"""The audit table: beside the ledger in old and new databases, read in order, merged."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

from broker.usage.audit import (
    MAX_DETAILS,
    AuditEntry,
    AuditFilter,
    AuditLog,
    entries,
    merged_entries,
)


def _entry(ts: float, action: str, **details: object) -> AuditEntry:
    return AuditEntry(ts, "cli:root", None, action, "alice", dict(details))


def test_an_old_database_gains_the_table_and_keeps_its_rows(tmp_path: Path) -> None:
    db = tmp_path / "usage.sqlite3"
    with sqlite3.connect(db) as conn:  # a ledger from before the audit trail
        conn.execute("CREATE TABLE usage (ts REAL, request_id TEXT)")
        conn.execute("INSERT INTO usage VALUES (1.0, 'r1')")
    assert entries(db, AuditFilter()) == []  # read-only: no table is no entries
    AuditLog(db).append(_entry(5.0, "user.block", gitlab_id=42))
    assert [e.action for e in entries(db, AuditFilter())] == ["user.block"]
    assert entries(db, AuditFilter())[0].details == {"gitlab_id": 42}
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM usage").fetchone() == (1,)


def test_a_new_database_is_private_and_filters_and_pages_work(tmp_path: Path) -> None:
    db = tmp_path / "data" / "usage.sqlite3"
    log = AuditLog(db)
    for ts, action in ((1.0, "a"), (2.0, "b"), (3.0, "c")):
        log.append(_entry(ts, action))
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert [e.action for e in entries(db, AuditFilter(since=2.0))] == ["b", "c"]
    assert [e.action for e in entries(db, AuditFilter(until=2.0))] == ["a"]
    newest = entries(db, AuditFilter(), newest_first=True, limit=1, offset=1)
    assert [e.action for e in newest] == ["b"]


def test_oversized_details_are_replaced_not_stored(tmp_path: Path) -> None:
    db = tmp_path / "usage.sqlite3"
    AuditLog(db).append(_entry(1.0, "x", blob="y" * (MAX_DETAILS + 1)))
    assert entries(db, AuditFilter())[0].details == {"truncated": True}


def test_several_brokers_merge_in_time_order_and_a_missing_one_has_none(tmp_path: Path) -> None:
    a, b = tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"
    AuditLog(a).append(_entry(1.0, "first"))
    AuditLog(b).append(_entry(2.0, "second"))
    AuditLog(a).append(_entry(3.0, "third"))
    merged = merged_entries([a, b, tmp_path / "never.sqlite3"], AuditFilter())
    assert [e.action for e in merged] == ["first", "second", "third"]
