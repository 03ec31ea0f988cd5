"""A user's own usage per day and model (last 30 days), read through ``broker.usage.query``."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from broker.usage.prices import PriceBook
from broker.usage.query import LedgerError, LedgerMissing, TotalRow, UsageFilter, totals
from shared.logging import get_logger

log = get_logger("broker.portal.usage")

DAYS = 30


def _read(path: Path, user_id: str, since: float, prices: PriceBook | None) -> list[TotalRow]:
    rows = totals(path, UsageFilter(since=since, user=user_id), "day", prices, then="model")
    return sorted(rows, key=lambda r: r.key, reverse=True)  # newest day first


async def usage_for(
    path: Path | None, user_id: str, prices: PriceBook | None = None, days: int = DAYS
) -> list[TotalRow]:
    """Rows (``key`` the day, ``key2`` the model) newest first; empty when none recorded."""
    if path is None:
        return []
    since = time.time() - days * 86400
    try:
        return await asyncio.to_thread(_read, path, user_id, since, prices)
    except LedgerMissing:
        return []
    except LedgerError as exc:
        log.warning("usage_read_failed", error=str(exc))
        return []
