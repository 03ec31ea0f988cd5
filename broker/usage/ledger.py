"""Per-request usage records in SQLite (WAL), written off the hot path: the ledger's write side.

``record`` only appends to a list; a background task writes batches from a worker thread
once a second (and at shutdown), so no request waits for the disk. After ``stop`` (the
broker's last step, after the drain) a late record is written at once, so nothing recorded
is lost. Token counts come from the response machine (``broker.core.response``): exact
from the upstream's ``usage``, else estimated; ``partial`` when the answer did not complete.
The read side is ``broker.usage.query``; docs/usage.md says what each column means.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from dataclasses import astuple, dataclass, fields, replace
from pathlib import Path

from broker.core.shape import TAIL_BYTES, extract_tokens
from shared.files import FILE_MODE, private_dir, private_file
from shared.logging import get_logger

__all__ = ["TAIL_BYTES", "UsageRecord", "UsageRecorder", "extract_tokens", "prepare_db_file"]

log = get_logger("broker.usage.ledger")
MAX_MODEL_CHARS = 256  # a model name longer than this is cut in the ledger


@dataclass(frozen=True, slots=True)
class UsageRecord:
    ts: float
    request_id: str
    user_id: str
    model: str
    connector: str | None
    status: int
    stream: bool
    tokens_in: int | None
    tokens_out: int | None
    ttfb_ms: float | None
    duration_ms: float
    bytes_out: int
    key_name: str | None = None  # which of the user's keys (portal keys are named)
    estimated: bool = False  # tokens counted by the broker, not reported by the upstream
    partial: bool = False  # the answer did not complete (client left, or it failed midway)
    # The API user's own x-request-id, a label only (request_id is the broker's UUID).
    client_request_id: str | None = None
    # The alias the API user named, when it named one (``model`` is then the real model
    # that served it, or the alias itself when no target could: docs/aliases.md).
    alias: str | None = None


_COLUMNS = [f.name for f in fields(UsageRecord)]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    ts REAL NOT NULL,
    request_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    model TEXT NOT NULL,
    connector TEXT,
    status INTEGER NOT NULL,
    stream INTEGER NOT NULL,
    tokens_in INTEGER,
    tokens_out INTEGER,
    ttfb_ms REAL,
    duration_ms REAL NOT NULL,
    bytes_out INTEGER NOT NULL,
    key_name TEXT,
    estimated INTEGER NOT NULL DEFAULT 0,
    partial INTEGER NOT NULL DEFAULT 0,
    client_request_id TEXT,
    alias TEXT
);
"""
# Created after the migration below, so old databases get them too.
_INDEXES = """
CREATE INDEX IF NOT EXISTS usage_user_ts ON usage (user_id, ts);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
CREATE INDEX IF NOT EXISTS usage_request_id ON usage (request_id);
"""
# Columns added since the first schema: old databases gain them (old rows get the default).
_ADDED = {
    "key_name": "TEXT",
    "estimated": "INTEGER NOT NULL DEFAULT 0",
    "partial": "INTEGER NOT NULL DEFAULT 0",
    "client_request_id": "TEXT",
    "alias": "TEXT",
}


def prepare_db_file(path: Path) -> None:
    """Create the usage database's file (and its directory) private before SQLite opens it:
    mode 600, which its -wal and -shm files copy. Shared by the ledger and the audit log."""
    private_dir(path.parent)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE))
    for suffix in ("", "-wal", "-shm"):
        private_file(path.with_name(path.name + suffix))


class UsageRecorder:
    def __init__(self, path: Path, flush_interval: float = 1.0) -> None:
        self.path = path
        self.flush_interval = flush_interval
        self._pending: list[UsageRecord] = []
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        # One connection for every batch (opening one per batch cost 2.5x the CPU, measured),
        # used by one worker thread at a time.
        self._db: sqlite3.Connection | None = None
        self._db_lock = threading.Lock()
        self.written = 0

    async def start(self) -> None:
        await asyncio.to_thread(self._create)
        self._task = asyncio.create_task(self._run(), name="usage-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._stopped = True
        await self.flush()
        await asyncio.to_thread(self._close)

    def record(self, record: UsageRecord) -> None:
        if len(record.model) > MAX_MODEL_CHARS:
            # A refused request's model is whatever the client sent, up to the body limit.
            record = replace(record, model=record.model[:MAX_MODEL_CHARS])
        self._pending.append(record)
        if self._stopped:
            # A request that ended after the final flush (cancelled by the server's own
            # shutdown): the loop is about to close, so write it now rather than lose it.
            self._flush_now()

    def _flush_now(self) -> None:
        batch, self._pending = self._pending, []
        try:
            self._write(batch)
            self.written += len(batch)
        except sqlite3.Error as exc:
            log.error("usage_write_failed", error=str(exc), records=len(batch))
        finally:
            self._close()

    async def flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            await asyncio.to_thread(self._write, batch)
            self.written += len(batch)
        except sqlite3.Error as exc:
            log.error("usage_write_failed", error=str(exc), records=len(batch))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            await self.flush()

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10.0, check_same_thread=False)

    def _close(self) -> None:
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _create(self) -> None:
        prepare_db_file(self.path)
        with contextlib.closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(usage)")}
            for name, kind in _ADDED.items():
                if name not in have:
                    db.execute(f"ALTER TABLE usage ADD COLUMN {name} {kind}")
            db.executescript(_INDEXES)
            db.commit()

    def _write(self, batch: list[UsageRecord]) -> None:
        placeholders = ", ".join("?" for _ in _COLUMNS)
        sql = f"INSERT INTO usage ({', '.join(_COLUMNS)}) VALUES ({placeholders})"
        with self._db_lock:
            if self._db is None:
                self._db = self._connect()
            try:
                self._db.executemany(sql, [astuple(r) for r in batch])
                self._db.commit()
            except sqlite3.Error:
                self._db.close()  # a fresh connection next time (the file may have moved)
                self._db = None
                raise
