"""The chat's housekeeping: deleted conversations purged after their undo window, and with
``--chat-retention-days`` those not written to for that long."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from broker.chat.store import ChatStore
from shared.logging import get_logger

log = get_logger("broker.chat")

SWEEP_EVERY = 60.0
DAY = 86400.0


def sweep(store: ChatStore, now: float, retention_days: float | None) -> int:
    """One pass: how many conversations went (logged as a count, never what they held)."""
    retention = retention_days * DAY if retention_days is not None else None
    gone = store.purge(now, retention)
    if gone:
        log.info("chat_conversations_purged", conversations=gone)
    return gone


async def keep_tidy(
    store: ChatStore,
    retention_days: float | None,
    every: float = SWEEP_EVERY,
    clock: Callable[[], float] = time.time,
) -> None:
    while True:
        await asyncio.sleep(every)
        await asyncio.to_thread(sweep, store, clock(), retention_days)
