"""The relay state interface: everything the API relay, the relay app, uploads, health,
metrics and the portal ask of the relay state, and nothing more.

Two implementations: ``broker.state.memory.relay.MemoryRelayState`` (in memory, one broker
process) and
``broker.state.redis.RedisRelayState`` (several brokers share one Redis, docs/scale-out.md).
Calls that may need a round trip to shared state are ``async``; calls on the hot path of
every chunk (``progress``, ``is_cancelled``) are plain calls
that only touch what this process holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from broker.core import Failure, Pending, Registration, Seen, Session
from broker.core.aliases import public_models
from broker.core.response import Event
from shared.logging import get_logger
from shared.protocol import Replaced, RequestItem, ResponseEnd, ResponseHead, UploadMode, WorkItem

Clock = Callable[[], float]
log = get_logger("broker.state.relay")


class Superseded(Exception):
    """A newer poll of the same session took over (a proxy or the connector retried)."""


class FrameSink(Protocol):
    """Where an upload's frames go: the API handler's channel, here or on another broker."""

    def head(self, head: ResponseHead) -> None: ...
    def data(self, chunk: bytes) -> None: ...
    def end(self, end: ResponseEnd) -> None: ...
    def fail(self, failure: Failure) -> None: ...
    def touch(self) -> None:
        """A heartbeat: nothing to deliver, but the request is alive."""

    @property
    def buffered(self) -> int:
        """Body bytes pushed and not yet taken by the API handler (0 when handed on)."""

    async def flush(self) -> None:
        """Hand over what was pushed since the last flush (a no-op in one process)."""


class ResponseSource(Protocol):
    """The API handler's side of a request's response (``broker.state.channel.ResponseChannel``)."""

    def interrupt(self) -> None: ...
    async def get(self, timeout: float | None = None) -> list[Event]: ...


@dataclass(frozen=True, slots=True)
class SessionView:
    """One live session as health, metrics and the admin views show it."""

    id: str
    name: str
    owner: str
    models: frozenset[str]
    capacity: int
    capacity_source: str
    active: int
    upload_mode: UploadMode
    version: str
    served: int
    polling: bool = False  # a poll of it is held right now
    idle_s: float = 0.0  # seconds since its last poll ended
    engine: str = ""  # what its LLM is ("ollama/0.6.2"; "" OpenAI-only)

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.active)


@dataclass(frozen=True, slots=True)
class Waiting:
    """One queued request, for the admin page's queues."""

    user: str | None
    waited_s: float


@dataclass(frozen=True, slots=True)
class RelayView:
    """A snapshot of the relay state (for every broker sharing it, in the Redis mode)."""

    sessions: dict[str, SessionView] = field(default_factory=dict)
    live_models: dict[str, list[str]] = field(default_factory=dict)
    queue_depth: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    redispatched: int = 0
    slot_waits: dict[str, int] = field(default_factory=dict)
    # Served models and those within --model-grace of their last session (metrics keep
    # series for these only).
    known_models: frozenset[str] = frozenset()
    draining: bool = False


def log_slots_busy(model: str, capacities: dict[str, int], waiting: int) -> None:
    """The slot-wait notice (at most one per model per ``slots_notice_every``)."""
    log.warning(
        "requests_wait_for_connector_slots",
        model=model,
        waiting=waiting,
        capacities=capacities,
        hint="every connector slot for this model is busy: raise --capacity where the "
        "engine can take more, or add connectors",
    )


def session_view(session: Session, now: float) -> SessionView:
    return SessionView(
        id=session.id,
        name=session.name,
        owner=session.owner,
        models=public_models(session.models),
        capacity=session.capacity,
        capacity_source=session.capacity_source,
        active=len(session.active),
        upload_mode=session.upload_mode,
        version=session.version,
        served=session.served,
        polling=session.polling > 0,
        idle_s=max(0.0, now - session.last_seen),
        engine=session.engine,
    )


class RelayState(Protocol):
    """The narrow interface behind which the relay state lives (docs/architecture.md)."""

    clock: Clock

    @property
    def draining(self) -> bool: ...

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def begin_drain(self) -> None: ...
    async def wait_idle(self, timeout: float) -> bool: ...
    def local_in_flight(self) -> int:
        """Requests this process holds (its API users', its uploads)."""

    async def ready(self) -> bool:
        """Whether this broker can serve (its shared state is reachable)."""

    # -- sessions
    async def register(self, reg: Registration) -> tuple[Session, Replaced]: ...
    async def session(self, owner: str, session_id: str) -> Session:
        """The identity's session; UnknownSession (or SessionReplaced) otherwise."""

    async def update_models(self, owner: str, session_id: str, models: list[str]) -> None: ...
    async def deregister(self, owner: str, session_id: str) -> None: ...
    def session_alive(self, session_id: str) -> bool:
        """False once this process knows the session ended (no round trip)."""

    async def poll(
        self,
        owner: str,
        session_id: str,
        hold: float,
        abort: asyncio.Future[object] | None = None,
    ) -> list[WorkItem]: ...

    # -- requests
    async def submit(
        self, item: RequestItem, user: str | None = None
    ) -> tuple[Pending, ResponseSource]: ...
    async def ack(self, session_id: str, request_id: str) -> tuple[Pending, FrameSink]:
        """The connector's upload began: its lease is acknowledged (LeaseError if not held)."""

    def hand_over(self, request_id: str) -> bool:
        """The multiplexed upload that carried the request here ended cleanly: its next
        upload (on this broker or another) continues it. True: this process no longer holds
        it for that upload (it stops counting it; the next upload acknowledges it again)."""

    async def cancel(self, request_id: str) -> None: ...
    async def refuse(self, session_id: str, request_id: str) -> None:
        """Frames came for a request the session no longer holds: send it a cancel item."""

    async def finish(self, request_id: str) -> None: ...
    def progress(self, pending: Pending, event: Seen, now: float, nbytes: int = 0) -> None:
        """What was seen of the response (``RelayCore.progress`` records it)."""

    def is_cancelled(self, request_id: str) -> bool:
        """For an upload in this process: was its request cancelled or ended elsewhere?"""

    # -- views
    async def view(self) -> RelayView: ...
    async def waiting(self) -> dict[str, list[Waiting]]:
        """Model -> its queued requests in the order they would be served."""
