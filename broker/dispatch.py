"""Relay state: sessions, per-model FIFO queues, leases, redispatch, expiry.

Pure logic with no I/O and no clock of its own: every call takes ``now`` and the async
layer (``broker.hub``) drives it. Outcomes that concern a waiting API handler go to the
request's ``Sink``; a session with new work is announced through ``wake``.
"""

from __future__ import annotations

import itertools
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from shared.protocol import CancelItem, RequestItem, UploadMode, WorkItem


class Sink(Protocol):
    """Where the dispatcher reports a request's failure to its API handler."""

    def fail(self, status: int, code: str, message: str) -> None: ...


class DispatchError(Exception):
    """A request could not be accepted; carries the HTTP status to answer with."""

    status = 503
    code = "unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownModel(DispatchError):
    status = 404
    code = "model_not_found"


class NoConnector(DispatchError):
    status = 503
    code = "no_connector"


class QueueFull(DispatchError):
    status = 503
    code = "queue_full"


class Draining(DispatchError):
    status = 503
    code = "shutting_down"


class LeaseError(Exception):
    """An upload names a request this session does not hold (409)."""


class UnknownSession(Exception):
    """The session expired or was replaced: the connector must register again (404)."""


class State(Enum):
    QUEUED = "queued"
    LEASED = "leased"
    ACTIVE = "active"
    DONE = "done"


@dataclass(slots=True, eq=False)
class Pending:
    """A relayed request as the dispatcher tracks it."""

    item: RequestItem
    sink: Sink
    created: float
    queue_deadline: float
    total_deadline: float
    state: State = State.QUEUED
    session_id: str | None = None
    lease_deadline: float = 0.0
    first_byte_deadline: float = 0.0
    last_activity: float = 0.0
    dispatches: int = 0
    user_saw_bytes: bool = False
    head_received: bool = False
    user_key_id: str | None = None
    leased_at: float = 0.0
    seq: int = 0

    @property
    def id(self) -> str:
        return self.item.request_id

    @property
    def model(self) -> str:
        return self.item.model


@dataclass(slots=True, eq=False)
class Session:
    id: str
    name: str
    models: frozenset[str]
    capacity: int
    version: str
    upload_mode: UploadMode
    upstream_api_key: str | None
    owner: str
    created: float
    last_seen: float
    polling: int = 0
    active: set[str] = field(default_factory=set)
    cancels: list[str] = field(default_factory=list)
    served: int = 0

    @property
    def free(self) -> int:
        return max(0, self.capacity - len(self.active))


@dataclass(frozen=True, slots=True)
class Timings:
    lease: float = 15.0
    session_ttl: float = 60.0
    queue_wait: float = 60.0
    queue_max: int = 256
    first_byte_timeout: float = 600.0
    idle_timeout: float = 300.0
    total_timeout: float = 3600.0
    max_redispatch: int = 2


def new_session_id() -> str:
    return "ses_" + secrets.token_hex(12)


class Dispatcher:
    def __init__(self, timings: Timings, wake: Callable[[str], None]) -> None:
        self.timings = timings
        self._wake = wake
        self.sessions: dict[str, Session] = {}
        self._by_name: dict[str, str] = {}
        self.queues: dict[str, deque[Pending]] = {}
        self.requests: dict[str, Pending] = {}
        self.known_models: set[str] = set()
        self._seq = itertools.count()
        self.draining = False
        self.redispatched = 0

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
        now: float,
    ) -> Session:
        old = self._by_name.get(name)
        if old is not None:
            self.drop_session(old, now, reason="connector registered again")
        session = Session(
            id=new_session_id(),
            name=name,
            models=frozenset(models),
            capacity=capacity,
            version=version,
            upload_mode=upload_mode,
            upstream_api_key=upstream_api_key,
            owner=owner,
            created=now,
            last_seen=now,
        )
        self.sessions[session.id] = session
        self._by_name[name] = session.id
        self.known_models.update(models)
        return session

    def session(self, session_id: str) -> Session:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise UnknownSession(session_id) from None

    def update_models(self, session_id: str, models: list[str], now: float) -> None:
        session = self.session(session_id)
        session.models = frozenset(models)
        session.last_seen = now
        self.known_models.update(models)
        self._wake(session_id)

    def drop_session(self, session_id: str, now: float, reason: str) -> None:
        """Forget a session: requeue what it never acknowledged, fail what it was serving."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        if self._by_name.get(session.name) == session_id:
            del self._by_name[session.name]
        # Newest first, each to the front of its queue: the oldest ends up first again.
        held = [self.requests[rid] for rid in session.active if rid in self.requests]
        for pending in sorted(held, key=lambda p: p.seq, reverse=True):
            if pending.state is State.LEASED and not pending.user_saw_bytes:
                self._requeue(pending, now)
            else:
                self._fail(pending, 502, "connector_lost", f"the connector went away ({reason})")
        session.active.clear()
        self._wake(session_id)

    def live_models(self) -> dict[str, list[str]]:
        """Model -> names of the live sessions serving it."""
        out: dict[str, list[str]] = {}
        for session in self.sessions.values():
            for model in session.models:
                out.setdefault(model, []).append(session.name)
        return out

    # -- requests -------------------------------------------------------------------------

    def submit(self, item: RequestItem, sink: Sink, now: float) -> Pending:
        if self.draining:
            raise Draining("the broker is shutting down")
        model = item.model
        if not any(model in s.models for s in self.sessions.values()):
            if model in self.known_models:
                raise NoConnector(f"no connector serving model '{model}' is online")
            raise UnknownModel(f"The model '{model}' does not exist")
        queue = self.queues.setdefault(model, deque())
        if len(queue) >= self.timings.queue_max:
            raise QueueFull(f"too many requests waiting for model '{model}'")
        t = self.timings
        pending = Pending(
            item=item,
            sink=sink,
            created=now,
            queue_deadline=now + t.queue_wait,
            total_deadline=now + t.total_timeout,
            last_activity=now,
            seq=next(self._seq),
        )
        self.requests[item.request_id] = pending
        queue.append(pending)
        self._wake_model(model)
        return pending

    def take(self, session_id: str, now: float) -> list[WorkItem]:
        """Work for a poll: every pending cancel, then up to the free capacity, oldest first."""
        session = self.session(session_id)
        session.last_seen = now
        items: list[WorkItem] = [CancelItem(request_id=rid) for rid in session.cancels]
        session.cancels.clear()
        free = session.free
        if self.draining:
            return items
        while free > 0:
            pending = self._oldest_for(session)
            if pending is None:
                break
            self.queues[pending.model].popleft()
            pending.state = State.LEASED
            pending.session_id = session_id
            pending.dispatches += 1
            pending.lease_deadline = now + self.timings.lease
            pending.leased_at = now
            pending.first_byte_deadline = now + self.timings.first_byte_timeout
            pending.last_activity = now
            session.active.add(pending.id)
            session.served += 1
            item = pending.item
            if item.attempt != pending.dispatches or item.upstream_api_key != (
                session.upstream_api_key
            ):
                item = item.model_copy(
                    update={
                        "attempt": pending.dispatches,
                        "upstream_api_key": session.upstream_api_key,
                    }
                )
                pending.item = item
            items.append(item)
            free -= 1
        return items

    def _oldest_for(self, session: Session) -> Pending | None:
        best: Pending | None = None
        for model in session.models:
            queue = self.queues.get(model)
            if queue and (best is None or queue[0].seq < best.seq):
                best = queue[0]
        return best

    def ack(self, session_id: str, request_id: str, now: float) -> Pending:
        """The connector started uploading the response: the lease is acknowledged."""
        session = self.session(session_id)
        session.last_seen = now
        pending = self.requests.get(request_id)
        if pending is None or pending.session_id != session_id or pending.state is State.DONE:
            raise LeaseError(request_id)
        if pending.state is State.QUEUED:
            raise LeaseError(request_id)
        pending.state = State.ACTIVE
        pending.last_activity = now
        return pending

    def finish(self, request_id: str) -> None:
        """The request is over (answered, failed or cancelled): free its slot."""
        pending = self.requests.pop(request_id, None)
        if pending is None:
            return
        was_queued = pending.state is State.QUEUED
        pending.state = State.DONE
        if was_queued:
            queue = self.queues.get(pending.model)
            if queue is not None:
                try:
                    queue.remove(pending)
                except ValueError:
                    pass
        if pending.session_id is not None:
            session = self.sessions.get(pending.session_id)
            if session is not None and request_id in session.active:
                session.active.discard(request_id)
                self._wake(session.id)

    def cancel(self, request_id: str) -> None:
        """The API user went away: stop the work wherever it is."""
        pending = self.requests.get(request_id)
        if pending is None:
            return
        session_id = pending.session_id
        state = pending.state
        if state in (State.LEASED, State.ACTIVE) and session_id in self.sessions:
            session = self.sessions[session_id]
            session.cancels.append(request_id)
            self._wake(session_id)
        if state is not State.ACTIVE:
            # An active upload ends through the upload handler, which frees the slot.
            self.finish(request_id)
        else:
            pending.state = State.DONE

    def is_cancelled(self, request_id: str) -> bool:
        pending = self.requests.get(request_id)
        return pending is None or pending.state is State.DONE

    # -- time -----------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Expire sessions, leases, queue waits and request timeouts."""
        t = self.timings
        for session in list(self.sessions.values()):
            if session.polling == 0 and now - session.last_seen > t.session_ttl:
                self.drop_session(session.id, now, reason="session expired")
        # Newest first, so requeued requests keep their FIFO order at the front of a queue.
        for pending in sorted(self.requests.values(), key=lambda p: p.seq, reverse=True):
            state = pending.state
            if state is State.QUEUED:
                if now >= pending.queue_deadline:
                    self._fail(pending, 503, "queue_timeout", "no connector became free in time")
            elif state is State.LEASED:
                if now >= pending.lease_deadline:
                    holder = self.sessions.get(pending.session_id or "")
                    if holder is not None:
                        holder.active.discard(pending.id)
                        holder.cancels.append(pending.id)
                    self._requeue(pending, now)
            elif state is State.ACTIVE:
                if now >= pending.total_deadline:
                    self._fail(pending, 504, "timeout", "the request took too long")
                elif not pending.head_received and now >= pending.first_byte_deadline:
                    self._fail(pending, 504, "timeout", "the local LLM did not answer in time")
                elif now - pending.last_activity >= t.idle_timeout:
                    self._fail(pending, 504, "timeout", "the response stalled")

    def _requeue(self, pending: Pending, now: float) -> None:
        if pending.dispatches > self.timings.max_redispatch:
            self._fail(pending, 502, "connector_lost", "no connector answered the request")
            return
        if pending.session_id is not None:
            session = self.sessions.get(pending.session_id)
            if session is not None:
                session.active.discard(pending.id)
        pending.state = State.QUEUED
        pending.session_id = None
        pending.queue_deadline = max(pending.queue_deadline, now + self.timings.lease)
        self.queues.setdefault(pending.model, deque()).appendleft(pending)
        self.redispatched += 1
        self._wake_model(pending.model)

    def _fail(self, pending: Pending, status: int, code: str, message: str) -> None:
        self.finish(pending.id)
        pending.sink.fail(status, code, message)

    def _wake_model(self, model: str) -> None:
        for session in self.sessions.values():
            if session.polling and model in session.models and session.free > 0:
                self._wake(session.id)

    # -- views ----------------------------------------------------------------------------

    def queue_depth(self) -> dict[str, int]:
        return {model: len(q) for model, q in self.queues.items() if q}

    def in_flight(self) -> int:
        return len(self.requests)
