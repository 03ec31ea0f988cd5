"""The one long-poll the connector keeps outstanding, and what it hands on.

A classic poll returns a list of items; a streaming poll delivers batches as they come.
Either way the items go to ``dispatch`` (the ``Serving`` of requests). A streaming poll that
a proxy answers, or one cut short while the broker is still there (the next poll of the
session gets its answer), makes the path be probed again at the next registration.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from connector.broker_client import BrokerClient
from connector.errors import BrokerRejected, BrokerUnavailable, SessionLost
from connector.probing import PathProbe
from connector.session import SessionKeeper
from connector.status import Emit, PollAnswered, WorkReceived
from connector.trouble import by_proxy
from shared.protocol import RegisterResponse, WorkItem

Dispatch = Callable[[list[WorkItem], RegisterResponse], None]

DRAIN_POLL_RETRY = 1.0  # seconds between polls that failed while draining


class Poller:
    def __init__(
        self,
        broker: BrokerClient,
        keeper: SessionKeeper,
        probe: PathProbe,
        emit: Emit,
        dispatch: Dispatch,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._broker = broker
        self._keeper = keeper
        self._probe = probe
        self._emit = emit
        self._dispatch = dispatch
        self._clock = clock
        self._task: asyncio.Task[object] | None = None
        self._cut_in: RegisterResponse | None = None  # the session whose last poll was cut

    def cancel(self) -> None:
        """End the outstanding poll (its caller sees ``CancelledError``)."""
        if self._task is not None:
            self._task.cancel()

    async def poll_once(self) -> None:
        session = self._keeper.session
        assert session is not None
        if self._keeper.stream_polls:
            await self._poll_stream(session)
        else:
            await self._poll_classic(session)

    async def poll_while_draining(self) -> None:
        """Keep polling (for the cancels of running requests) until stopped."""
        while self._keeper.session is not None:
            try:
                await self.poll_once()
            except (BrokerUnavailable, BrokerRejected, SessionLost):
                await asyncio.sleep(DRAIN_POLL_RETRY)

    async def _poll_classic(self, session: RegisterResponse) -> None:
        self._task = asyncio.create_task(self._broker.poll(session.session_id, session.poll_wait_s))
        try:
            items = await self._task
        finally:
            self._task = None
        self._emit(PollAnswered(self._clock()))
        assert isinstance(items, list)
        self._dispatch(items, session)

    async def _poll_stream(self, session: RegisterResponse) -> None:
        def dispatch(items: list[WorkItem]) -> None:
            self._emit(WorkReceived(self._clock()))
            self._dispatch(items, session)

        cuts = self._broker.poll_cuts
        self._task = asyncio.create_task(
            self._broker.poll_stream(session.session_id, session.poll_wait_s, dispatch)
        )
        try:
            await self._task
        except BrokerUnavailable as exc:
            if by_proxy(exc):
                self._probe.forget(f"a proxy answered a streaming poll: {exc}")
            self._cut_in = None
            raise
        finally:
            self._task = None
        if self._cut_in is session:
            # Cut, and the broker is still there: something on the path ends streamed
            # answers. (A cut followed by a refused connection was the broker going.)
            self._probe.forget("streaming polls are cut short")
        self._cut_in = session if self._broker.poll_cuts != cuts else None
        self._emit(PollAnswered(self._clock()))
