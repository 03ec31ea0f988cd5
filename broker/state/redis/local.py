"""What one broker holds for its own connections in the Redis mode, and how it reacts.

The API users' requests it holds (``Home``: their channel, which the inbox feeds), the
uploads it carries (to answer ``cancelled`` when the request ended elsewhere), the polls
it holds (``PollWaiter``). ``on_wake`` turns a pub/sub message into woken, superseded or
ended polls and ended uploads; ``apply`` turns an inbox entry into channel events. No I/O.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from broker.core import Failure, Pending, RelayCore, Seen, State
from broker.state.channel import ResponseChannel
from broker.state.redis import inbox
from shared.protocol import ResponseEnd, ResponseHead

Clock = Callable[[], float]
DROPPED_REMEMBERED = 4096


@dataclass(slots=True, eq=False)
class Home:
    """A request whose API user this broker holds."""

    pending: Pending
    channel: ResponseChannel


def _models(raw: bytes, known: frozenset[str]) -> frozenset[str]:
    """A session's models as an update published them (``known`` if it is not a list)."""
    try:
        models = json.loads(raw)
    except ValueError:
        return known
    if not isinstance(models, list):
        return known
    return frozenset(m for m in models if isinstance(m, str))


@dataclass(slots=True, eq=False)
class PollWaiter:
    token: str
    models: frozenset[str]
    future: asyncio.Future[None] | None = None
    superseded: bool = False
    gone: bool = False

    def arm(self) -> asyncio.Future[None]:
        self.future = asyncio.get_running_loop().create_future()
        return self.future

    def wake(self) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(None)


@dataclass(slots=True)
class LocalState:
    homes: dict[str, Home] = field(default_factory=dict)
    uploads: set[str] = field(default_factory=set)
    ended: set[str] = field(default_factory=set)
    waiters: dict[str, list[PollWaiter]] = field(default_factory=dict)
    # Sessions this process saw end (their multiplexed uploads stop at once).
    dropped_sessions: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def wake_all(self) -> None:
        for waiters in self.waiters.values():
            for waiter in waiters:
                waiter.wake()

    def on_wake(self, name: str, data: bytes) -> None:
        """A message on ``w:<name>``: ``s:<sid>``, ``m:<model>`` or ``e`` (docs/scale-out.md)."""
        if name.startswith("s:"):
            for waiter in self.waiters.get(name[2:], ()):
                if data.startswith(b"p:"):
                    if data[2:].decode() == waiter.token:
                        continue
                    waiter.superseded = True
                elif data == b"x":
                    waiter.gone = True
                elif data.startswith(b"u:"):  # its models changed: wake for the new ones
                    waiter.models = _models(data[2:], waiter.models)
                waiter.wake()
            if data == b"x":
                self.dropped_sessions[name[2:]] = None
                while len(self.dropped_sessions) > DROPPED_REMEMBERED:
                    self.dropped_sessions.popitem(last=False)
        elif name.startswith("m:"):
            model = name[2:]
            for waiters in self.waiters.values():
                for waiter in waiters:
                    if model in waiter.models:
                        waiter.wake()
        elif name == "e":
            rid = data.decode()
            if rid in self.uploads:
                self.ended.add(rid)

    def apply(self, fields: dict[bytes, bytes], clock: Clock, wall: Clock) -> float | None:
        """An inbox entry into its request's channel; a new queue deadline (``clock`` time)
        when the request went back to its queue."""
        rid, frames = inbox.entry_frames(fields)
        home = self.homes.get(rid)
        if home is None:
            return None
        pending, channel = home.pending, home.channel
        RelayCore.progress(pending, Seen.FRAME, clock())
        requeued = None
        for kind, value in frames:
            if kind == inbox.DATA:
                channel.data(value)
            elif kind == inbox.HEAD:
                RelayCore.progress(pending, Seen.HEAD, clock())
                channel.head(ResponseHead.model_validate_json(value))
            elif kind == inbox.END:
                channel.end(ResponseEnd.model_validate_json(value))
            elif kind == inbox.FAIL:
                self.homes.pop(rid, None)
                channel.fail(inbox.decode_failure(value))
            elif kind == inbox.META:
                apply_meta(pending, inbox.Meta.decode(value), clock, wall)
            elif kind == inbox.REQUEUED:
                RelayCore.mirror_state(pending, State.QUEUED)
                requeued = clock() + max(0.0, float(value) - wall())
        return requeued

    def fail_homes(self, failure: Failure) -> None:
        homes, self.homes = self.homes, {}
        for home in homes.values():
            home.channel.fail(failure)


def apply_meta(pending: Pending, meta: inbox.Meta, clock: Clock, wall: Clock) -> None:
    leased_at = clock() - max(0.0, wall() - meta.leased_at)
    RelayCore.mirror_lease(pending, meta.connector, meta.attempt, leased_at)
