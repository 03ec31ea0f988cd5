"""The Quart adapter of the response state machine (``broker.core.response``).

It waits for the request's channel events or the machine's next deadline, feeds them in
with the time, and turns the actions into a Quart ``Response``: whole when the machine
begins and closes at once, else streamed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from quart import Response

from broker.channel import ResponseChannel
from broker.core import Pending
from broker.core.response import Action, Begin, Body, Close, Outcome, ResponseMachine
from broker.hub import RelayHub


class Responder:
    def __init__(
        self,
        *,
        hub: RelayHub,
        pending: Pending,
        channel: ResponseChannel,
        machine: ResponseMachine,
        on_done: Callable[[Outcome], None],
    ) -> None:
        self.hub = hub
        self.pending = pending
        self.channel = channel
        self.machine = machine
        self.on_done = on_done
        self._finished = False

    async def respond(self) -> Response:
        try:
            actions: list[Action] = []
            while not any(type(a) is Begin for a in actions):
                actions += await self._next()
        except BaseException:
            # Cancelled (the API user disconnected) or a bug: never leave work running.
            self._abandon()
            raise
        index = next(i for i, a in enumerate(actions) if type(a) is Begin)
        begin = actions[index]
        assert isinstance(begin, Begin)
        rest = actions[index + 1 :]
        if any(type(a) is Close for a in rest):
            body = b"".join(a.data for a in rest if isinstance(a, Body))
            self._finish()
            response = Response(body, status=begin.status)
        else:
            response = Response(self._stream(rest), status=begin.status)
            response.timeout = None
        response.headers.update(begin.headers)
        return response

    async def _next(self) -> list[Action]:
        """Wait for events or the machine's next deadline, and return what to send."""
        machine = self.machine
        clock = self.hub.clock
        deadline = machine.next_deadline()
        timeout = None if deadline is None else max(0.0, deadline - clock())
        events = await self.channel.get(timeout)
        now = clock()
        actions = machine.feed(events, now) if events else []
        if not machine.done:
            actions += machine.tick(now)
        return actions

    async def _stream(self, actions: list[Action]) -> AsyncIterator[bytes]:
        core = self.hub.core
        pending = self.pending
        try:
            while True:
                for action in actions:
                    if type(action) is Body:
                        if action.upstream:
                            core.delivered(pending, len(action.data))
                        yield action.data
                    elif type(action) is Close:
                        return
                actions = await self._next()
        finally:
            if not self.machine.done:
                self._abandon()
            self._finish()

    def _abandon(self) -> None:
        """The API user went away (or a bug stopped us): cancel the work wherever it is."""
        if not self.machine.done:
            self.machine.abandon()
            self.hub.cancel(self.pending.id)
        self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self.hub.finish(self.pending.id)
        self.on_done(self.machine.outcome)
