"""The audit trail: who changed what, when and from where, in the usage database.

Every change an operator or a user makes (keys, blocks, limits, connectors, admin tokens)
goes through ``broker.admin.operations``, which appends one ``AuditEntry`` here. The table
``audit`` lives beside ``usage`` in the same SQLite file (WAL; created, with the file
private, on first use, so databases from before the audit trail gain it). Admin actions are
rare, so each entry is written at once (callers on the event loop run the whole operation
in a worker thread). ``details`` is a JSON object that never holds a secret: key names and
prefixes, token IDs, limit values. With several brokers each writes its own database and
``merged_entries`` reads them in time order (``remotellm-broker audit --db ... --db ...``).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.usage.ledger import prepare_db_file
from broker.usage.query import LedgerMissing, open_read_only, where_clause

MAX_TEXT = 256  # an actor, address, action or target longer than this is cut
MAX_DETAILS = 4096  # bytes of details JSON

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    address TEXT,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    details TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
"""


@dataclass(frozen=True, slots=True)
class AuditEntry:
    ts: float
    actor: str  # "portal:gitlab-42", "cli:alice", "admin-token:at-1a2b3c4d"
    address: str | None  # where the change came from (None: the broker's own host)
    action: str  # "user.block", "key.revoke", "connector.approve", ...
    target: str  # what changed: a username, "alice/laptop", an enrollment ID
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "actor": self.actor,
            "address": self.address,
            "action": self.action,
            "target": self.target,
            "details": self.details,
        }


def _cut(text: str | None) -> str | None:
    return None if text is None else text[:MAX_TEXT]


def _details_text(details: dict[str, Any]) -> str:
    text = json.dumps(details, sort_keys=True, default=str)
    if len(text) > MAX_DETAILS:
        return json.dumps({"truncated": True})
    return text


class AuditLog:
    """The write side: ``append`` writes one entry at once (blocking: run it in a thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._ready = False

    def _connect(self) -> sqlite3.Connection:
        if not self._ready:
            prepare_db_file(self.path)  # private before SQLite opens it
        db = sqlite3.connect(self.path, timeout=10.0)
        if not self._ready:  # the table (and WAL) on first use: old databases gain it
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            self._ready = True
        return db

    def append(self, entry: AuditEntry) -> None:
        row = (
            entry.ts,
            _cut(entry.actor),
            _cut(entry.address),
            _cut(entry.action),
            _cut(entry.target),
            _details_text(entry.details),
        )
        sql = "INSERT INTO audit (ts, actor, address, action, target, details) VALUES (?,?,?,?,?,?)"
        with self._lock, contextlib.closing(self._connect()) as db:
            db.execute(sql, row)
            db.commit()


@dataclass(frozen=True, slots=True)
class AuditFilter:
    since: float | None = None  # Unix seconds, inclusive
    until: float | None = None  # Unix seconds, exclusive
    actor: str | None = None
    action: str | None = None

    def where(self) -> tuple[str, list[object]]:
        return where_clause(
            ("ts >= ?", self.since),
            ("ts < ?", self.until),
            ("actor = ?", self.actor),
            ("action = ?", self.action),
        )


def _entry(row: tuple[Any, ...]) -> AuditEntry:
    ts, actor, address, action, target, details = row
    try:
        parsed = json.loads(details)
    except ValueError:
        parsed = {}
    return AuditEntry(
        ts, actor, address, action, target, parsed if isinstance(parsed, dict) else {}
    )


def entries(
    db: Path, filt: AuditFilter, *, newest_first: bool = False, limit: int = -1, offset: int = 0
) -> list[AuditEntry]:
    """The entries of one database in time order (or newest first), paged.

    A database from before the audit trail (no ``audit`` table) has none.
    """
    where, args = filt.where()
    order = "DESC" if newest_first else "ASC"
    sql = (
        "SELECT ts, actor, address, action, target, details FROM audit"
        f"{where} ORDER BY ts {order}, id {order} LIMIT ? OFFSET ?"
    )
    with open_read_only(db) as conn:
        have = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='audit'")
        if have.fetchone() is None:
            return []
        found = conn.execute(sql, [*args, limit, max(0, offset)]).fetchall()
    return [_entry(row) for row in found]


def merged_entries(dbs: Sequence[Path], filt: AuditFilter) -> list[AuditEntry]:
    """Every entry of several databases (one per broker), oldest first; a database that
    does not exist yet (a broker that never wrote one) has none."""
    found: list[AuditEntry] = []
    for db in dbs:
        with contextlib.suppress(LedgerMissing):
            found.extend(entries(db, filt))
    found.sort(key=lambda e: e.ts)
    return found
