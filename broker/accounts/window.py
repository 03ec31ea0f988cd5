"""A sliding-window counter per key: at most ``limit`` events in any ``window`` seconds.

Pure: every call takes ``now``. Used to bound how often one address may ask to enroll.
Keys that fell out of the window are forgotten, so many addresses cannot grow it forever.
"""

from __future__ import annotations

from collections import deque


class SlidingWindow:
    def __init__(self, limit: int, window: float, max_keys: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._events: dict[str, deque[float]] = {}

    def allow(self, key: str, now: float) -> float:
        """0 if an event for ``key`` is allowed now (and counts it), else seconds to wait."""
        events = self._events.get(key)
        if events is None:
            if len(self._events) >= self.max_keys:
                self._sweep(now)
            if len(self._events) >= self.max_keys:
                return self.window  # flooded by many addresses: everyone waits
            events = self._events[key] = deque()
        while events and events[0] <= now - self.window:
            events.popleft()
        if len(events) >= self.limit:
            return max(0.001, events[0] + self.window - now)
        events.append(now)
        return 0.0

    def _sweep(self, now: float) -> None:
        for key in [k for k, ev in self._events.items() if not ev or ev[-1] <= now - self.window]:
            del self._events[key]
