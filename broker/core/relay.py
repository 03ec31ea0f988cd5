"""Sessions, per-model FIFO queues, leases, redispatch, cancels and each request's progress.

Every change to relay state happens here, and nothing here does I/O or reads a clock: the
adapters pass ``now`` and sleep until ``next_deadline()``. What concerns the outside world
(a poll to wake, a request that failed, a notice worth logging) goes to the ``Listener``.
"""

from __future__ import annotations

import itertools
import secrets
from collections import OrderedDict
from collections.abc import Iterable
from typing import Protocol

from broker.core import failures
from broker.core.aliases import fold_routes, is_pinned
from broker.core.errors import (
    LeaseError,
    SessionReplaced,
    TooManySessions,
    UnknownSession,
)
from broker.core.queues import ModelQueue
from broker.core.records import Failure, Pending, Registration, Seen, Session, State, Timings
from broker.core.timers import Deadlines, Kind, Throttle
from shared.protocol import CancelItem, Replaced, RequestItem, WorkItem

REPLACED_REMEMBERED = 4096
# Cancels a session may hold for requests it was refused (frames for IDs it does not
# hold): bounds what a connector earns by uploading frames for made-up request IDs.
MAX_REFUSALS = 1024


class Listener(Protocol):
    """What the adapter does with the core's outcomes. Called synchronously, never awaited."""

    def wake(self, session_id: str) -> None:
        """The session may have work (or must answer its poll): resolve its waiter."""

    def failed(self, pending: Pending, failure: Failure) -> None:
        """The request ended without a response: tell its API handler."""

    def session_dropped(self, session: Session, reason: str) -> None:
        """A session ended (expired, deregistered, replaced)."""

    def slots_busy(self, model: str, capacities: dict[str, int], waiting: int) -> None:
        """Requests wait only because every connector slot for ``model`` is busy."""


def new_session_id() -> str:
    return "ses_" + secrets.token_hex(12)


class RelayCore:
    def __init__(self, timings: Timings, listener: Listener) -> None:
        self.timings = timings
        self._out = listener
        self.sessions: dict[str, Session] = {}
        self._by_name: dict[tuple[str, str], str] = {}
        self._replaced: OrderedDict[str, str] = OrderedDict()  # session id -> owner
        self._serving: dict[str, set[str]] = {}  # model -> ids of sessions serving it
        self._owned: dict[str, set[str]] = {}  # identity -> ids of its live sessions
        # Model no live session serves -> when it is forgotten (until then: 503, not 404).
        self._unserved: dict[str, float] = {}
        self.queues: dict[str, ModelQueue] = {}
        self.requests: dict[str, Pending] = {}
        self._deadlines = Deadlines()
        self._seq = itertools.count()
        self.draining = False
        self.redispatched = 0
        self.slot_waits: dict[str, int] = {}
        self._slots_noticed = Throttle(timings.slots_notice_every)

    # -- sessions -------------------------------------------------------------------------

    def register(self, reg: Registration, now: float) -> tuple[Session, Replaced]:
        """A new session; replaces only the same identity's session of the same name."""
        replaced = Replaced.NONE
        owner, name = reg.owner, reg.name
        old_id = self._by_name.get((owner, name))
        cap = self.timings.max_sessions_per_identity
        if old_id is None and len(self._owned.get(owner, ())) >= cap:
            raise TooManySessions(cap)
        if old_id is not None:
            old = self.sessions[old_id]
            live = old.polling > 0 and old.instance_id != reg.instance_id
            replaced = Replaced.LIVE if live else Replaced.RESTART
            self._drop(old, now, failures.REGISTERED_AGAIN)
            self._replaced[old_id] = owner
            while len(self._replaced) > REPLACED_REMEMBERED:
                self._replaced.popitem(last=False)
        session = reg.session(new_session_id(), now)
        self.sessions[session.id] = session
        self._by_name[(owner, name)] = session.id
        self._owned.setdefault(owner, set()).add(session.id)
        self._route(session)
        self._check_ttl(session, now + self.timings.session_ttl)
        return session, replaced

    def session(self, owner: str, session_id: str) -> Session:
        """The identity's session, or UnknownSession: another identity's looks just as absent."""
        session = self.sessions.get(session_id)
        if session is not None and session.owner == owner:
            return session
        if self._replaced.get(session_id) == owner:
            raise SessionReplaced(session_id)
        raise UnknownSession(session_id)

    def update_models(self, owner: str, session_id: str, models: Iterable[str], now: float) -> None:
        session = self.session(owner, session_id)
        self._unroute(session, now)
        session.models = frozenset(models)
        session.last_seen = now
        self._route(session)
        self._out.wake(session_id)

    def deregister(self, owner: str, session_id: str, now: float) -> None:
        self._drop(self.session(owner, session_id), now, failures.STOPPED)

    def poll_started(self, owner: str, session_id: str, now: float) -> Session:
        session = self.session(owner, session_id)
        session.polling += 1
        session.last_seen = now
        return session

    def poll_ended(self, session_id: str, now: float) -> None:
        session = self.sessions.get(session_id)
        if session is None:
            return
        session.polling -= 1
        session.last_seen = now
        if session.polling == 0 and session.ttl_check is None:
            self._check_ttl(session, now + self.timings.session_ttl)

    def _check_ttl(self, session: Session, when: float) -> None:
        """Schedule the session's one TTL check (a poll's end moves ``last_seen``, not it)."""
        session.ttl_check = when
        self._deadlines.add(when, Kind.SESSION, session.id)

    def take(self, session_id: str, now: float) -> list[WorkItem]:
        """Work for a poll: every pending cancel, then up to the free capacity, oldest first."""
        session = self.sessions.get(session_id)
        if session is None:
            return []
        session.last_seen = now
        items: list[WorkItem] = [CancelItem(request_id=rid) for rid in session.cancels]
        session.cancels.clear()
        if self.draining:
            return items
        free = session.free
        while free > 0:
            pending = self._oldest_for(session)
            if pending is None:
                break
            self.queues[pending.model].pop()
            items.append(self._lease(pending, session, now))
            free -= 1
        return items

    def _lease(self, pending: Pending, session: Session, now: float) -> RequestItem:
        t = self.timings
        pending.state = State.LEASED
        pending.session_id = session.id
        pending.connector = session.name
        pending.dispatches += 1
        pending.leased_at = now
        pending.lease_deadline = now + t.lease
        pending.first_byte_deadline = now + t.first_byte_timeout
        pending.last_activity = now
        self._deadlines.add(pending.lease_deadline, Kind.LEASE, pending.id)
        session.active.add(pending.id)
        session.served += 1
        item = pending.item
        if item.attempt != pending.dispatches or item.upstream_api_key != session.upstream_api_key:
            item = item.model_copy(
                update={"attempt": pending.dispatches, "upstream_api_key": session.upstream_api_key}
            )
            pending.item = item
        return item

    def _oldest_for(self, session: Session) -> Pending | None:
        best: Pending | None = None
        for model in session.models:
            queue = self.queues.get(model)
            head = queue.peek() if queue else None
            if head is not None and (best is None or head.seq < best.seq):
                best = head
        return best

    def _route(self, session: Session) -> None:
        for model in session.models:
            self._serving.setdefault(model, set()).add(session.id)
            self._unserved.pop(model, None)

    def _unroute(self, session: Session, now: float) -> None:
        """Stop routing the session's models; one no session serves any more is known for
        ``model_grace`` (503: its connector may be back), then forgotten (404)."""
        for model in session.models:
            serving = self._serving.get(model)
            if serving is not None:
                serving.discard(session.id)
                if not serving:
                    del self._serving[model]
                    forget_at = now + self.timings.model_grace
                    self._unserved[model] = forget_at
                    self._deadlines.add(forget_at, Kind.MODEL, model)

    @property
    def known_models(self) -> set[str]:
        """Models served now, or within ``model_grace`` of their last session."""
        return set(self._serving) | set(self._unserved)

    def _is_known(self, model: str) -> bool:
        return model in self._serving or model in self._unserved

    def _forget_model(self, model: str) -> None:
        """Nothing serves ``model`` since ``model_grace``: drop every map keyed by it."""
        del self._unserved[model]
        queue = self.queues.get(model)
        if queue is not None and not queue:
            del self.queues[model]
        self.slot_waits.pop(model, None)
        self._slots_noticed.forget(model)

    def _drop(self, session: Session, now: float, reason: str) -> None:
        """Forget a session: requeue what it never acknowledged, fail what it was serving."""
        del self.sessions[session.id]
        if self._by_name.get((session.owner, session.name)) == session.id:
            del self._by_name[(session.owner, session.name)]
        owned = self._owned.get(session.owner)
        if owned is not None:
            owned.discard(session.id)
            if not owned:
                del self._owned[session.owner]
        self._unroute(session, now)
        for rid in list(session.active):
            pending = self.requests.get(rid)
            if pending is None:
                continue
            if pending.state is State.LEASED:
                self._requeue(pending, now)
            else:
                self._fail(pending, failures.connector_gone(reason))
        session.active.clear()
        self._out.wake(session.id)
        self._out.session_dropped(session, reason)

    # -- requests -------------------------------------------------------------------------

    def submit(self, item: RequestItem, now: float, user: str | None = None) -> Pending:
        if self.draining:
            raise failures.refusal("draining")
        model = item.model
        serving = self._serving.get(model)
        if not serving:
            if model in self._unserved:
                raise failures.refusal("noconn", model)
            raise failures.refusal("unknown", model)
        if item.request_id in self.requests:
            raise failures.refusal("dup")
        queue = self.queues.setdefault(model, ModelQueue())
        t = self.timings
        if len(queue) >= t.queue_max:
            raise failures.refusal("full", model)
        pending = Pending(
            item=item,
            created=now,
            queue_deadline=now + t.queue_wait,
            total_deadline=now + t.total_timeout,
            seq=next(self._seq),
            user=user,
            last_activity=now,
        )
        self.requests[item.request_id] = pending
        queue.append(pending)
        self._deadlines.add(pending.queue_deadline, Kind.QUEUE, pending.id)
        self._deadlines.add(pending.total_deadline, Kind.TOTAL, pending.id)
        if not self._wake_model(model):
            self._note_slots_busy(model, serving, len(queue), now)
        return pending

    def ack(self, session_id: str, request_id: str, now: float) -> Pending:
        """The connector started uploading the response: the lease is acknowledged."""
        pending = self.requests.get(request_id)
        if (
            pending is None
            or pending.session_id != session_id
            or pending.state not in (State.LEASED, State.ACTIVE)
            or pending.cancelled
        ):
            raise LeaseError(request_id)
        if pending.state is State.LEASED:
            pending.state = State.ACTIVE
            self._deadlines.add(pending.first_byte_deadline, Kind.FIRST_BYTE, pending.id)
            self._deadlines.add(now + self.timings.idle_timeout, Kind.IDLE, pending.id)
        pending.last_activity = now
        return pending

    @staticmethod
    def progress(pending: Pending, event: Seen, now: float, nbytes: int = 0) -> None:
        """Record what was seen of the request's response (``nbytes``: for ``DELIVERED``).

        The one place a request's progress fields change, for every ``RelayState``.
        """
        if event is Seen.DELIVERED:
            pending.delivered += nbytes
            return
        pending.last_activity = now
        if event is Seen.HEAD:
            pending.head_seen = True

    # -- a record whose request lives in shared state (the Redis mode) -------------------

    @staticmethod
    def mirror_lease(pending: Pending, connector: str, attempt: int, leased_at: float) -> None:
        """The shared state handed the request out (``leased_at`` on this process's clock)."""
        pending.connector = connector
        pending.dispatches = attempt
        pending.leased_at = leased_at

    @staticmethod
    def mirror_state(pending: Pending, state: State, session_id: str | None = None) -> None:
        """The shared state moved the request (requeued, or acknowledged by ``session_id``)."""
        pending.state = state
        if session_id is not None:
            pending.session_id = session_id

    @staticmethod
    def mirror_cancel(pending: Pending) -> None:
        pending.cancelled = True

    def finish(self, request_id: str) -> None:
        """The request is over (answered, failed or cancelled): free its slot."""
        pending = self.requests.pop(request_id, None)
        if pending is None:
            return
        if pending.state is State.QUEUED:
            queue = self.queues.get(pending.model)
            if queue is not None:
                queue.remove(pending)
                if not queue and not self._is_known(pending.model):
                    del self.queues[pending.model]
        pending.state = State.DONE
        session = self.sessions.get(pending.session_id or "")
        if session is not None and request_id in session.active:
            session.active.discard(request_id)
            self._out.wake(session.id)
        live = len(self.requests) + len(self.sessions) + len(self._unserved)
        self._deadlines.sweep(live, self._valid)

    def cancel(self, request_id: str) -> None:
        """The API user went away: stop the work wherever it is."""
        pending = self.requests.get(request_id)
        if pending is None:
            return
        pending.cancelled = True
        session = self.sessions.get(pending.session_id or "")
        if pending.state in (State.LEASED, State.ACTIVE) and session is not None:
            session.cancels[request_id] = None
            self._out.wake(session.id)
        if pending.state is not State.ACTIVE:
            # An active upload ends through its upload handler, which frees the slot.
            self.finish(request_id)

    def refuse(self, session_id: str, request_id: str) -> None:
        """Frames came for a request the session no longer holds (it was re-leased, cancelled
        or is over): a ``cancel`` item in its next poll tells the connector to stop, which is
        what a 409 answer does for a per-request upload."""
        session = self.sessions.get(session_id)
        if session is None or request_id in session.cancels:
            return
        if len(session.cancels) >= MAX_REFUSALS:
            return  # a connector sending frames for many unknown IDs: it gets no more cancels
        session.cancels[request_id] = None
        self._out.wake(session_id)

    def is_cancelled(self, request_id: str) -> bool:
        pending = self.requests.get(request_id)
        return pending is None or pending.cancelled

    def begin_drain(self) -> None:
        """Refuse new requests and release every poll."""
        self.draining = True
        for session_id in list(self.sessions):
            self._out.wake(session_id)

    # -- time -----------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When ``expire`` next has something to do (it may find the entry stale)."""
        return self._deadlines.next()

    def expire(self, now: float) -> None:
        """Apply every deadline due at ``now``: sessions, leases, queue waits, timeouts."""
        for when, kind, key in self._deadlines.due(now):
            if not self._valid(when, kind, key):
                continue
            if kind is Kind.SESSION:
                self._expire_session(self.sessions[key], now)
            elif kind is Kind.MODEL:
                self._forget_model(key)
            else:
                self._expire_request(self.requests[key], kind, now)

    def _expire_session(self, session: Session, now: float) -> None:
        session.ttl_check = None
        if session.polling:
            return  # the poll's end schedules the next check
        expires = session.last_seen + self.timings.session_ttl
        if expires <= now:
            self._drop(session, now, failures.EXPIRED)
        else:
            self._check_ttl(session, expires)

    def _expire_request(self, pending: Pending, kind: Kind, now: float) -> None:
        if pending.cancelled:
            # Its API user is gone and the connector never ended the upload: free the slot.
            self.finish(pending.id)
            return
        if kind is Kind.QUEUE:
            self._fail(pending, failures.QUEUE_TIMEOUT)
        elif kind is Kind.LEASE:
            holder = self.sessions.get(pending.session_id or "")
            if holder is not None:
                holder.active.discard(pending.id)
                holder.cancels[pending.id] = None
            self._requeue(pending, now)
        elif kind is Kind.TOTAL:
            self._fail(pending, failures.TOO_LONG)
        elif kind is Kind.FIRST_BYTE:
            self._fail(pending, failures.NO_HEAD)
        elif kind is Kind.IDLE:
            stalls = pending.last_activity + self.timings.idle_timeout
            if stalls <= now:
                self._fail(pending, failures.STALLED)
            else:
                self._deadlines.add(stalls, Kind.IDLE, pending.id)

    def _valid(self, when: float, kind: Kind, key: str) -> bool:
        """Whether a deadline still applies to its record (else it is dropped unseen)."""
        if kind is Kind.SESSION:
            session = self.sessions.get(key)
            return session is not None and session.ttl_check == when
        if kind is Kind.MODEL:
            return self._unserved.get(key) == when
        pending = self.requests.get(key)
        if pending is None:
            return False
        state = pending.state
        if kind is Kind.QUEUE:
            return state is State.QUEUED and when == pending.queue_deadline
        if kind is Kind.LEASE:
            return state is State.LEASED and when == pending.lease_deadline
        if kind is Kind.FIRST_BYTE:
            return state is State.ACTIVE and not pending.head_seen
        if kind is Kind.IDLE:
            return state is State.ACTIVE
        return True  # TOTAL: any request still in flight

    def _requeue(self, pending: Pending, now: float) -> None:
        if pending.delivered:
            self._fail(pending, failures.LOST_MID_RESPONSE)
            return
        if pending.dispatches > self.timings.max_redispatch:
            self._fail(pending, failures.UNANSWERED)
            return
        session = self.sessions.get(pending.session_id or "")
        if session is not None:
            session.active.discard(pending.id)
        pending.state = State.QUEUED
        pending.session_id = None
        pending.queue_deadline = max(pending.queue_deadline, now + self.timings.lease)
        self._deadlines.add(pending.queue_deadline, Kind.QUEUE, pending.id)
        self.queues.setdefault(pending.model, ModelQueue()).put_back(pending)
        self.redispatched += 1
        self._wake_model(pending.model)

    def _fail(self, pending: Pending, failure: Failure) -> None:
        self.finish(pending.id)
        self._out.failed(pending, failure)

    def _wake_model(self, model: str) -> bool:
        """Wake the polling sessions with a free slot for ``model``; False if there is none."""
        woke = False
        for session_id in self._serving.get(model, ()):
            session = self.sessions[session_id]
            if session.free > 0:
                woke = True
                if session.polling:
                    self._out.wake(session_id)
        return woke

    def _note_slots_busy(self, model: str, serving: set[str], waiting: int, now: float) -> None:
        self.slot_waits[model] = self.slot_waits.get(model, 0) + 1
        if not self._slots_noticed.allow(model, now):
            return
        capacities = {self.sessions[s].name: self.sessions[s].capacity for s in serving}
        self._out.slots_busy(model, capacities, waiting)

    # -- views ----------------------------------------------------------------------------

    def live_models(self) -> dict[str, list[str]]:
        """Model -> names of the live sessions serving it."""
        return {
            model: sorted(self.sessions[s].name for s in ids)
            for model, ids in self._serving.items()
            if not is_pinned(model)
        }

    def queue_depth(self) -> dict[str, int]:
        """Requests waiting per model (a pinned route's count under its model)."""
        return fold_routes({model: len(q) for model, q in self.queues.items() if q})

    def in_flight(self) -> int:
        return len(self.requests)
