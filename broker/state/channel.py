"""The per-request channel that carries a connector's upload to the waiting API handler.

Pushing never blocks and never awaits: the upload handler appends, the API handler takes
everything buffered in one go, so chunks that arrive in the same event-loop tick are
written to the API user as one. ``buffered`` counts the body bytes pushed and not yet
taken, which the multiplexed upload bounds per request (``broker.relay.mux``).
"""

from __future__ import annotations

import asyncio

from broker.core import Failure
from broker.core.response import Event
from shared.protocol import ResponseEnd, ResponseHead


class ResponseChannel:
    __slots__ = ("_closed", "_events", "_loop", "_waiter", "buffered", "bytes_in")

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._waiter: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self.bytes_in = 0
        self.buffered = 0

    def _push(self, event: Event) -> None:
        if self._closed:
            return
        self._events.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def head(self, head: ResponseHead) -> None:
        self._push(head)

    def data(self, chunk: bytes) -> None:
        if not self._closed:
            self.bytes_in += len(chunk)
            self.buffered += len(chunk)
            self._push(chunk)

    def end(self, end: ResponseEnd) -> None:
        self._push(end)
        self._closed = True

    def interrupt(self) -> None:
        """Wake a waiting ``get`` with nothing (its reader has something else to check)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, failure: Failure) -> None:
        self._push(failure)
        self._closed = True

    def touch(self) -> None:
        """A heartbeat frame: the core already recorded the activity."""

    async def flush(self) -> None:
        """Pushing already delivered everything (the API handler is in this process)."""

    async def get(self, timeout: float | None = None) -> list[Event]:
        """Everything pushed so far; waits for something, or returns [] after ``timeout``."""
        if not self._events:
            waiter = self._loop.create_future()
            self._waiter = waiter
            handle = (
                self._loop.call_later(timeout, _expire, waiter) if timeout is not None else None
            )
            try:
                await waiter
            finally:
                self._waiter = None
                if handle is not None:
                    handle.cancel()
        events = self._events
        self._events = []
        self.buffered = 0
        return events


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
