"""A user's own usage per day and model, read from the usage records (SQLite)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from shared.logging import get_logger

log = get_logger("broker.portal.usage")

DAYS = 30
_QUERY = """
SELECT date(ts, 'unixepoch') AS day, model, count(*), sum(tokens_in), sum(tokens_out),
       sum(CASE WHEN status >= 400 THEN 1 ELSE 0 END)
FROM usage WHERE user_id = ? AND ts >= ?
GROUP BY day, model ORDER BY day DESC, model
"""


@dataclass(frozen=True, slots=True)
class UsageRow:
    day: str
    model: str
    requests: int
    tokens_in: int
    tokens_out: int
    errors: int


def _read(path: Path, user_id: str, since: float) -> list[UsageRow]:
    if not path.exists():
        return []
    uri = f"file:{path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5.0)) as db:
        rows = db.execute(_QUERY, (user_id, since)).fetchall()
    return [
        UsageRow(str(d), str(m), int(n), int(i or 0), int(o or 0), int(e or 0))
        for d, m, n, i, o, e in rows
    ]


async def usage_for(path: Path | None, user_id: str, days: int = DAYS) -> list[UsageRow]:
    """Rows of the last ``days`` days, newest first; empty when nothing is recorded."""
    if path is None:
        return []
    since = time.time() - days * 86400
    try:
        return await asyncio.to_thread(_read, path, user_id, since)
    except sqlite3.Error as exc:
        log.warning("usage_read_failed", error=str(exc))
        return []
