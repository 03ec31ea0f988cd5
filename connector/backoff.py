"""Capped exponential backoff with full jitter (0.5 s doubling to 30 s by default).

``next_delay(cap=...)`` lowers the ceiling for one wait: while nothing answers at all (the
broker is down or restarting) a refused connection costs nothing, so the connector tries
about every second and serves again soon after the broker is back, instead of sleeping
up to 30 s. Errors the broker answers with keep the full backoff.
"""

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

    def next_delay(self, cap: float | None = None) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        if cap is not None:
            ceiling = min(ceiling, cap)
        self.attempt = min(self.attempt + 1, 30)
        return self._rand(0.0, ceiling)

    def reset(self) -> None:
        self.attempt = 0

    async def sleep(self) -> float:
        delay = self.next_delay()
        await asyncio.sleep(delay)
        return delay
