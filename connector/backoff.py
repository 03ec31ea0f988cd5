"""Capped exponential backoff with full jitter (0.5 s doubling to 30 s by default)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable


class Backoff:
    def __init__(
        self,
        base: float = 0.5,
        cap: float = 30.0,
        rand: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rand = rand

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return self._rand(0.0, ceiling)

    def reset(self) -> None:
        self.attempt = 0

    async def sleep(self) -> float:
        delay = self.next_delay()
        await asyncio.sleep(delay)
        return delay
