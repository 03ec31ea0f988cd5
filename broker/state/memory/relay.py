"""The asyncio adapter over the relay core: poll waiters, response channels, one timer.

The core (``broker.core``) holds every piece of relay state and never sees a clock or a
socket; this module passes it the time, sleeps until its ``next_deadline()`` (one timer
for everything, re-armed only when a nearer deadline appears), and turns its outcomes into
asyncio: a woken poll, a failed request's channel, a log line. It is also the narrow
interface behind which the relay state lives (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import functools
import time

from broker.core import Failure, Pending, Registration, RelayCore, Seen, Session, Timings
from broker.core.aliases import fold_routes
from broker.state.channel import ResponseChannel
from broker.state.relay import (
    Clock,
    RelayView,
    Superseded,
    Waiting,
    log_slots_busy,
    session_view,
)
from shared.logging import get_logger
from shared.protocol import Replaced, RequestItem, WorkItem

log = get_logger("broker.state.memory.relay")

DRAIN_POLL_HOLD = 1.0

__all__ = ["DRAIN_POLL_HOLD", "Clock", "MemoryRelayState", "Superseded"]


class MemoryRelayState:
    def __init__(self, timings: Timings, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.core = RelayCore(timings, self)
        self.channels: dict[str, ResponseChannel] = {}
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- the core's listener --------------------------------------------------------------

    def wake(self, session_id: str) -> None:
        waiter = self._waiters.get(session_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def failed(self, pending: Pending, failure: Failure) -> None:
        channel = self.channels.pop(pending.id, None)
        if channel is not None:
            channel.fail(failure)
        self._update_idle()

    def session_dropped(self, session: Session, reason: str) -> None:
        log.info("session_closed", session=session.id, connector=session.name, reason=reason)

    def slots_busy(self, model: str, capacities: dict[str, int], waiting: int) -> None:
        log_slots_busy(model, capacities, waiting)

    # -- the timer ------------------------------------------------------------------------

    def _schedule(self) -> None:
        """Arm the one timer for the core's next deadline, if it is nearer than the armed one."""
        when = self.core.next_deadline()
        if when is None:
            return
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        delay = max(0.0, when - self.clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        try:
            self.core.expire(self.clock())
        except Exception:  # the timer must survive anything
            log.exception("relay_timer_failed")
        self._schedule()
        self._update_idle()

    async def run_due(self) -> None:
        """Apply at once whatever is due at ``clock()`` (for tests that drive a fake clock)."""
        if self._timer is not None:
            self._timer.cancel()
        self._fire()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._schedule()

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _update_idle(self) -> None:
        if self.core.requests:
            self._idle.clear()
        else:
            self._idle.set()

    @property
    def draining(self) -> bool:
        return self.core.draining

    def local_in_flight(self) -> int:
        return self.core.in_flight()

    async def ready(self) -> bool:
        return True

    def begin_drain(self) -> None:
        """Refuse new API requests and release every poll (connectors see empty answers)."""
        self.core.begin_drain()

    async def wait_idle(self, timeout: float) -> bool:
        self._update_idle()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- sessions -------------------------------------------------------------------------

    async def register(self, reg: Registration) -> tuple[Session, Replaced]:
        result = self.core.register(reg, self.clock())
        self._schedule()
        return result

    async def session(self, owner: str, session_id: str) -> Session:
        return self.core.session(owner, session_id)

    async def update_models(self, owner: str, session_id: str, models: list[str]) -> None:
        self.core.update_models(owner, session_id, models, self.clock())

    async def deregister(self, owner: str, session_id: str) -> None:
        self.core.deregister(owner, session_id, self.clock())
        self._schedule()

    async def poll(
        self,
        owner: str,
        session_id: str,
        hold: float,
        abort: asyncio.Future[object] | None = None,
    ) -> list[WorkItem]:
        """Hold a long-poll until there is work for the session or ``hold`` passes.

        ``abort`` completes when the connector hangs up: the poll then ends without taking
        work, so nothing is handed to a connection that can no longer carry it.
        """
        core = self.core
        loop = asyncio.get_running_loop()
        # A newer poll of the same session supersedes an older one (a proxy retried it).
        self.wake(session_id)
        core.poll_started(owner, session_id, self.clock())
        deadline = self.clock() + hold
        try:
            while True:
                if core.draining:
                    # Shutting down: still deliver cancels, but answer within a second so
                    # the server can close (and the connector does not spin).
                    deadline = min(deadline, self.clock() + DRAIN_POLL_HOLD)
                items = core.take(session_id, self.clock())
                if items:
                    self._schedule()
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
                if session_id not in core.sessions or (abort is not None and abort.done()):
                    return []
                if self._waiters.get(session_id) is not None:
                    raise Superseded(session_id)
        finally:
            core.poll_ended(session_id, self.clock())
            self._schedule()

    # -- requests -------------------------------------------------------------------------

    async def submit(
        self, item: RequestItem, user: str | None = None
    ) -> tuple[Pending, ResponseChannel]:
        pending = self.core.submit(item, self.clock(), user=user)
        channel = ResponseChannel()
        self.channels[item.request_id] = channel
        self._idle.clear()
        self._schedule()
        return pending, channel

    async def ack(self, session_id: str, request_id: str) -> tuple[Pending, ResponseChannel]:
        """The connector's upload for the request began: its lease is acknowledged."""
        pending = self.core.ack(session_id, request_id, self.clock())
        self._schedule()
        return pending, self.channels[request_id]

    def hand_over(self, request_id: str) -> bool:
        # One process: the request stays here (its API user is here) until it ends.
        return False

    async def cancel(self, request_id: str) -> None:
        self.core.cancel(request_id)
        if request_id not in self.core.requests:
            self.channels.pop(request_id, None)
            self._update_idle()

    async def refuse(self, session_id: str, request_id: str) -> None:
        self.core.refuse(session_id, request_id)

    def session_alive(self, session_id: str) -> bool:
        return session_id in self.core.sessions

    async def finish(self, request_id: str) -> None:
        self.core.finish(request_id)
        self.channels.pop(request_id, None)
        self._update_idle()

    def progress(self, pending: Pending, event: Seen, now: float, nbytes: int = 0) -> None:
        self.core.progress(pending, event, now, nbytes)

    def is_cancelled(self, request_id: str) -> bool:
        return self.core.is_cancelled(request_id)

    # -- views ----------------------------------------------------------------------------

    async def view(self) -> RelayView:
        core = self.core
        return RelayView(
            sessions={sid: session_view(s, self.clock()) for sid, s in core.sessions.items()},
            live_models=core.live_models(),
            queue_depth=core.queue_depth(),
            in_flight=core.in_flight(),
            redispatched=core.redispatched,
            slot_waits=fold_routes(core.slot_waits),
            known_models=frozenset(core.known_models),
            draining=core.draining,
        )

    async def waiting(self) -> dict[str, list[Waiting]]:
        now = self.clock()
        return {
            model: [Waiting(p.user, now - p.created) for p in queue]
            for model, queue in self.core.queues.items()
            if queue
        }


def _resolve_on(waiter: asyncio.Future[None], _: object) -> None:
    _resolve(waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
