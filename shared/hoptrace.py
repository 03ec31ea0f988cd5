"""Per-request hop timestamps: where a relayed request's first byte spends its time.

Off by default (``--trace-hops`` on the broker and the connector; ``remotellm-bench local
--trace`` turns it on and prints the median per hop). Off, the hot path pays one
``is not None`` test per hop and nothing else: no clock read, no dictionary, no log line.
On, each process records the first time each hop is reached for each request and logs one
``hop_trace`` line (info level) per request: ``{"hop": unix nanoseconds, ...}``.

The clock is ``time.time_ns()`` (CLOCK_REALTIME): one clock for every process on a host,
so the broker's, the connector's and the benchmark client's marks of one request can be
subtracted. (``perf_counter`` and ``monotonic`` are per-process on some platforms and not
comparable across processes.) Across hosts the marks are only as good as the hosts' clock
sync; compare within one process there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from shared.logging import get_logger

log = get_logger("shared.hoptrace")

# Requests whose line was not written yet (a request that never reached its last hop):
# beyond this many, the oldest are dropped, so a long trace run stays bounded.
MAX_OPEN = 4096

T = TypeVar("T")


class HopTrace:
    """One process's marks, by request ID; ``side`` names the process in the log line."""

    __slots__ = ("_open", "side")

    def __init__(self, side: str) -> None:
        self.side = side
        self._open: dict[str, dict[str, int]] = {}

    def mark(self, request_id: str, hop: str) -> None:
        """The first time ``request_id`` reached ``hop`` (a later mark of it is ignored)."""
        marks = self._open.get(request_id)
        if marks is None:
            marks = self._open[request_id] = {}
            while len(self._open) > MAX_OPEN:
                del self._open[next(iter(self._open))]
        if hop not in marks:
            marks[hop] = time.time_ns()

    def first(self, request_id: str, hop: str, call: Callable[[T], None]) -> Callable[[T], None]:
        """``call``, marking ``hop`` the first time it is called (a per-chunk callback)."""

        def traced(value: T) -> None:
            self.mark(request_id, hop)
            call(value)

        return traced

    def done(self, request_id: str) -> None:
        """The request's last hop here: log its marks once and forget them."""
        marks = self._open.pop(request_id, None)
        if marks:
            log.info("hop_trace", request_id=request_id, side=self.side, marks=marks)
