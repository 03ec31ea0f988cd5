"""Deadlines in one heap, checked lazily.

A record never removes its old deadlines: when one comes due the core checks it against the
record's current fields and drops it if it no longer applies. The cost of a tick is the
number of deadlines due, not the number of requests. Stale entries are swept out when they
outnumber the live ones, so the heap stays proportional to what is in flight.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from enum import Enum


class Kind(Enum):
    QUEUE = 1  # waited too long for a free connector
    LEASE = 2  # handed out, but no upload started
    FIRST_BYTE = 3  # uploading, but no head from the local LLM
    IDLE = 4  # no frame for too long
    TOTAL = 5  # the whole request took too long
    SESSION = 6  # a session that stopped polling
    MODEL = 7  # a model no session serves: forget it after its grace


Entry = tuple[float, int, Kind, str]


class Deadlines:
    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[Entry] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, when: float, kind: Kind, key: str) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), kind, key))

    def next(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> Iterator[tuple[float, Kind, str]]:
        """Pop every entry due at ``now``, earliest first (ties in the order they were added)."""
        # Re-read the heap each time: handling an entry may add entries or sweep the heap.
        while self._heap and self._heap[0][0] <= now:
            when, _, kind, key = heapq.heappop(self._heap)
            yield when, kind, key

    def sweep(self, live: int, valid: Callable[[float, Kind, str], bool]) -> None:
        """Drop stale entries once they clearly outnumber the live ones (amortised O(1))."""
        if len(self._heap) <= 4 * live + 1024:
            return
        self._heap = [e for e in self._heap if valid(e[0], e[2], e[3])]
        heapq.heapify(self._heap)


class Throttle:
    """At most one notice per key in each ``every`` seconds (the slot-wait log)."""

    __slots__ = ("_every", "_last")

    def __init__(self, every: float) -> None:
        self._every = every
        self._last: dict[str, float] = {}

    def allow(self, key: str, now: float) -> bool:
        """Whether a notice for ``key`` may go out at ``now`` (then it is counted)."""
        last = self._last.get(key)
        if last is not None and now - last < self._every:
            return False
        self._last[key] = now
        return True

    def forget(self, key: str) -> None:
        self._last.pop(key, None)
