"""The async layer over the dispatcher: poll waiting, the reaper, shutdown.

This is the narrow interface behind which the relay state lives (DESIGN.md section 5);
the in-memory ``Dispatcher`` is the default implementation.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable

from broker.channel import ResponseChannel
from broker.dispatch import Dispatcher, Pending, Session, Timings
from shared.logging import get_logger
from shared.protocol import RequestItem, UploadMode, WorkItem

log = get_logger("broker.hub")

Clock = Callable[[], float]


class Superseded(Exception):
    """A newer poll of the same session took over (a proxy or the connector retried)."""


DRAIN_POLL_HOLD = 1.0


class RelayHub:
    def __init__(self, timings: Timings, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.dispatcher = Dispatcher(timings, self._wake)
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.tick_interval = 0.25

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap(), name="relay-reaper")

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            try:
                self.dispatcher.tick(self.clock())
            except Exception:  # the reaper must survive anything
                log.exception("reaper_failed")
            self._update_idle()

    def _update_idle(self) -> None:
        if self.dispatcher.requests:
            self._idle.clear()
        else:
            self._idle.set()

    def begin_drain(self) -> None:
        """Refuse new API requests and release every poll (connectors see empty answers)."""
        self.dispatcher.draining = True
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_result(None)

    async def wait_idle(self, timeout: float) -> bool:
        self._update_idle()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- sessions -------------------------------------------------------------------------

    def register(
        self,
        *,
        name: str,
        models: list[str],
        capacity: int,
        version: str,
        upload_mode: UploadMode,
        upstream_api_key: str | None,
        owner: str,
    ) -> Session:
        return self.dispatcher.register(
            owner=owner,
            name=name,
            models=models,
            capacity=capacity,
            version=version,
            upload_mode=upload_mode,
            upstream_api_key=upstream_api_key,
            now=self.clock(),
        )

    def deregister(self, session_id: str) -> None:
        self.dispatcher.drop_session(session_id, self.clock(), reason="connector stopped")

    def _wake(self, session_id: str) -> None:
        waiter = self._waiters.get(session_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def poll(
        self, session_id: str, hold: float, abort: asyncio.Future[object] | None = None
    ) -> list[WorkItem]:
        """Hold a long-poll until there is work for the session or ``hold`` passes.

        ``abort`` completes when the connector hangs up: the poll then ends without taking
        work, so nothing is handed to a connection that can no longer carry it.
        """
        d = self.dispatcher
        session = d.session(session_id)
        loop = asyncio.get_running_loop()
        # A newer poll of the same session supersedes an older one (a proxy retried it).
        self._wake(session_id)
        session.polling += 1
        deadline = self.clock() + hold
        try:
            while True:
                if d.draining:
                    # Shutting down: still deliver cancels, but answer within a second so
                    # the server can close (and the connector does not spin).
                    deadline = min(deadline, self.clock() + DRAIN_POLL_HOLD)
                items = d.take(session_id, self.clock())
                if items:
                    return items
                remaining = deadline - self.clock()
                if remaining <= 0:
                    return []
                waiter = loop.create_future()
                self._waiters[session_id] = waiter
                handle = loop.call_later(remaining, _resolve, waiter)
                if abort is not None:
                    abort.add_done_callback(functools.partial(_resolve_on, waiter))
                try:
                    await waiter
                finally:
                    handle.cancel()
                    if self._waiters.get(session_id) is waiter:
                        del self._waiters[session_id]
                if session_id not in d.sessions or (abort is not None and abort.done()):
                    return []
                if self._waiters.get(session_id) is not None:
                    raise Superseded(session_id)
        finally:
            session.polling -= 1
            session.last_seen = self.clock()

    # -- requests -------------------------------------------------------------------------

    def submit(self, item: RequestItem) -> tuple[Pending, ResponseChannel]:
        channel = ResponseChannel()
        pending = self.dispatcher.submit(item, channel, self.clock())
        self._idle.clear()
        return pending, channel

    def ack(self, session_id: str, request_id: str) -> Pending:
        return self.dispatcher.ack(session_id, request_id, self.clock())

    def cancel(self, request_id: str) -> None:
        self.dispatcher.cancel(request_id)

    def finish(self, request_id: str) -> None:
        self.dispatcher.finish(request_id)
        if not self.dispatcher.requests:
            self._idle.set()


def _resolve_on(waiter: asyncio.Future[None], _: object) -> None:
    _resolve(waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
