"""The relay core as a state machine: every call takes ``now``, nothing sleeps or reads a clock."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

from broker.core import (
    DispatchError,
    Draining,
    DuplicateRequest,
    Failure,
    LeaseError,
    NoConnector,
    Pending,
    QueueFull,
    RelayCore,
    Seen,
    Session,
    SessionReplaced,
    State,
    Timings,
    UnknownModel,
    UnknownSession,
)
from shared.protocol import CancelItem, Replaced, RequestItem
from tests.support.registrations import registration

OWNER = "owner"


@dataclass
class Recorder:
    """The core's listener: records every outcome, in order."""

    woken: list[str] = field(default_factory=list)
    failures: dict[str, list[Failure]] = field(default_factory=dict)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (session name, reason)
    busy: list[tuple[str, dict[str, int], int]] = field(default_factory=list)
    log: list[tuple[object, ...]] = field(default_factory=list)

    def wake(self, session_id: str) -> None:
        self.woken.append(session_id)

    def failed(self, pending: Pending, failure: Failure) -> None:
        self.failures.setdefault(pending.id, []).append(failure)
        self.log.append(("failed", pending.id, failure.status, failure.code))

    def session_dropped(self, session: Session, reason: str) -> None:
        self.dropped.append((session.name, reason))
        self.log.append(("dropped", session.owner, session.name, reason))

    def slots_busy(self, model: str, capacities: dict[str, int], waiting: int) -> None:
        self.busy.append((model, capacities, waiting))
        self.log.append(("slots_busy", model, waiting))


class Harness:
    def __init__(self, **timings: Any) -> None:
        self.out = Recorder()
        self.core = RelayCore(Timings(**timings), self.out)

    def register_full(
        self,
        name: str = "c1",
        models: Iterable[str] = ("m",),
        capacity: int = 1,
        now: float = 0.0,
        key: str | None = None,
        owner: str = OWNER,
        instance_id: str | None = None,
    ) -> tuple[Session, Replaced]:
        reg = registration(
            name,
            owner=owner,
            models=models,
            capacity=capacity,
            upstream_api_key=key,
            instance_id=instance_id or f"inst-{name}",
        )
        return self.core.register(reg, now)

    def register(
        self,
        name: str = "c1",
        models: Iterable[str] = ("m",),
        capacity: int = 1,
        now: float = 0.0,
        key: str | None = None,
        owner: str = OWNER,
    ) -> Session:
        return self.register_full(name, models, capacity, now, key, owner)[0]

    def submit(self, rid: str, model: str = "m", now: float = 0.0) -> Pending:
        item = RequestItem(request_id=rid, model=model, path="/v1/chat/completions", body="{}")
        return self.core.submit(item, now, user="alice")

    def take(self, session: Session, now: float = 0.0) -> list[str]:
        """Request ids handed out; cancels as 'cancel:<id>'."""
        out = []
        for item in self.core.take(session.id, now):
            if isinstance(item, CancelItem):
                out.append(f"cancel:{item.request_id}")
            else:
                out.append(item.request_id)
        return out

    def occupy(self, session: Session, rid: str = "busy", now: float = 0.0) -> None:
        """Fill the session's one slot with an acknowledged request."""
        self.submit(rid, next(iter(session.models)), now=now)
        assert self.take(session, now=now) == [rid]
        self.core.ack(session.id, rid, now=now)

    def poll(self, session: Session, now: float) -> None:
        self.core.poll_started(session.owner, session.id, now)

    def unpoll(self, session: Session, now: float) -> None:
        self.core.poll_ended(session.id, now)

    def failures(self, rid: str) -> list[tuple[int, str]]:
        return [(f.status, f.code) for f in self.out.failures.get(rid, [])]

    def queued(self, model: str = "m") -> list[str]:
        return [p.id for p in self.core.queues.get(model, ())]

    def run_deadlines(self, until: float) -> None:
        """Drive the core the way the adapter does: sleep to ``next_deadline`` and expire."""
        while (when := self.core.next_deadline()) is not None and when <= until:
            self.core.expire(when)

    def snapshot(self) -> tuple[object, ...]:
        core = self.core
        return (
            sorted(
                (s.owner, s.name, s.polling, s.last_seen, len(s.active))
                for s in core.sessions.values()
            ),
            {
                rid: (p.state, p.dispatches, p.queue_deadline, p.cancelled, p.connector)
                for rid, p in core.requests.items()
            },
            {model: [p.id for p in q] for model, q in core.queues.items()},
            sorted((core.sessions[sid].name, list(s.cancels)) for sid, s in core.sessions.items()),
            core.redispatched,
            list(self.out.log),
        )


# -- sessions -----------------------------------------------------------------------------


def test_register_makes_models_live() -> None:
    h = Harness()
    s, replaced = h.register_full("c1", ["a", "b"], capacity=3)
    assert replaced is Replaced.NONE
    assert h.core.session(OWNER, s.id) is s
    assert s.id.startswith("ses_")
    assert s.free == 3
    assert h.core.live_models() == {"a": ["c1"], "b": ["c1"]}
    assert h.core.known_models == {"a", "b"}


def test_register_same_name_replaces_old_session() -> None:
    h = Harness()
    old = h.register("c1", ["a"])
    new = h.register("c1", ["b"])
    assert new.id != old.id
    with pytest.raises(SessionReplaced):
        h.core.session(OWNER, old.id)
    assert list(h.core.sessions) == [new.id]
    assert h.core.live_models() == {"b": ["c1"]}
    assert h.out.dropped == [("c1", "connector registered again")]
    assert old.id in h.out.woken  # its poll is released
    # The old model is still known: asking for it is "no connector", not "unknown model".
    with pytest.raises(NoConnector):
        h.submit("r1", "a")


def test_register_other_name_keeps_first_session() -> None:
    h = Harness()
    a = h.register("c1")
    b = h.register("c2")
    assert set(h.core.sessions) == {a.id, b.id}
    assert h.core.live_models() == {"m": ["c1", "c2"]}


def test_replacing_session_requeues_leased_and_fails_active() -> None:
    h = Harness(lease=10)
    old = h.register("c1", capacity=2)
    h.submit("leased", now=1)
    h.submit("active", now=2)
    h.submit("waiting", now=3)
    assert h.take(old, now=4) == ["leased", "active"]
    h.core.ack(old.id, "active", now=5)

    new = h.register("c1", capacity=2, now=6)

    leased = h.core.requests["leased"]
    assert leased.state is State.QUEUED
    assert leased.session_id is None
    assert h.queued() == ["leased", "waiting"]  # back at the front, before newer work
    assert h.failures("leased") == []
    assert h.failures("active") == [(502, "connector_lost")]
    assert "active" not in h.core.requests
    items = h.core.take(new.id, now=7)
    assert [(i.request_id, i.attempt) for i in items if isinstance(i, RequestItem)] == [
        ("leased", 2),
        ("waiting", 1),
    ]


def test_unknown_session_is_refused_without_side_effects() -> None:
    h = Harness()
    h.register()
    before = h.snapshot()
    with pytest.raises(UnknownSession):
        h.core.deregister(OWNER, "ses_nope", now=0)
    with pytest.raises(UnknownSession):
        h.core.poll_started(OWNER, "ses_nope", now=0)
    h.core.poll_ended("ses_nope", now=0)  # a poll outliving its session: harmless
    assert h.core.take("ses_nope", now=0) == []
    assert h.snapshot() == before
    assert h.out.woken == []


def test_deregister_drops_the_session() -> None:
    h = Harness()
    s = h.register()
    h.core.deregister(OWNER, s.id, now=1)
    assert h.core.sessions == {}
    assert h.out.dropped == [("c1", "connector stopped")]
    with pytest.raises(UnknownSession) as info:
        h.core.session(OWNER, s.id)
    assert type(info.value) is UnknownSession  # not "replaced": nobody took its name


def test_update_models_routes_new_model_and_wakes() -> None:
    h = Harness()
    s = h.register("c1", ["a"])
    with pytest.raises(UnknownModel):
        h.submit("r0", "b")
    h.core.update_models(OWNER, s.id, ["a", "b"], now=5)
    assert s.last_seen == 5
    assert h.out.woken == [s.id]
    h.submit("r1", "b")
    assert h.take(s) == ["r1"]


def test_update_models_drops_old_routes() -> None:
    h = Harness()
    s = h.register("c1", ["a"])
    h.core.update_models(OWNER, s.id, ["b"], now=5)
    assert h.core.live_models() == {"b": ["c1"]}
    with pytest.raises(NoConnector):
        h.submit("r1", "a")


def test_update_models_of_unknown_session() -> None:
    with pytest.raises(UnknownSession):
        Harness().core.update_models(OWNER, "ses_gone", ["a"], now=0)


# -- session identity ---------------------------------------------------------------------


def test_other_owner_same_name_gets_its_own_session() -> None:
    h = Harness()
    mine, r1 = h.register_full("gpu", owner="alice")
    theirs, r2 = h.register_full("gpu", owner="bob")
    assert (r1, r2) == (Replaced.NONE, Replaced.NONE)
    assert set(h.core.sessions) == {mine.id, theirs.id}
    assert h.out.dropped == []
    assert h.core.session("alice", mine.id) is mine
    assert h.core.session("bob", theirs.id) is theirs
    # The first keeps serving.
    h.submit("r1")
    assert h.take(mine, now=1) == ["r1"]
    h.core.ack(mine.id, "r1", now=2)
    assert h.core.requests["r1"].connector == "gpu"


@pytest.mark.parametrize("sid", ["absent", "other-owners"])
def test_other_owners_session_looks_absent(sid: str) -> None:
    h = Harness()
    theirs = h.register("gpu", owner="bob")
    session_id = "ses_nope" if sid == "absent" else theirs.id
    with pytest.raises(UnknownSession) as info:
        h.core.session("alice", session_id)
    assert type(info.value) is UnknownSession
    assert info.value.code == UnknownSession.code
    # The same holds for every call that names a session.
    with pytest.raises(UnknownSession):
        h.core.poll_started("alice", session_id, now=0)
    with pytest.raises(UnknownSession):
        h.core.deregister("alice", session_id, now=0)
    with pytest.raises(UnknownSession):
        h.core.update_models("alice", session_id, ["x"], now=0)
    assert theirs.id in h.core.sessions
    assert theirs.models == {"m"}


def test_replaced_session_id_reports_replacement_only_to_its_owner() -> None:
    h = Harness()
    old = h.register("gpu", owner="alice")
    h.register("gpu", owner="bob")
    h.register("gpu", owner="alice", now=1)
    with pytest.raises(SessionReplaced) as info:
        h.core.session("alice", old.id)
    assert info.value.code == SessionReplaced.code
    with pytest.raises(UnknownSession) as other:
        h.core.session("bob", old.id)
    assert type(other.value) is UnknownSession
    assert h.core.live_models() == {"m": ["gpu", "gpu"]}


@pytest.mark.parametrize(
    ("polling", "same_instance", "expected"),
    [
        (False, False, Replaced.RESTART),  # idle: its process is gone
        (False, True, Replaced.RESTART),
        (True, True, Replaced.RESTART),  # the same process registered again
        (True, False, Replaced.LIVE),  # two processes share one name
    ],
)
def test_replacement_kind(polling: bool, same_instance: bool, expected: Replaced) -> None:
    h = Harness()
    old, _ = h.register_full("gpu", instance_id="first")
    if polling:
        h.poll(old, now=1)
    _, replaced = h.register_full("gpu", now=2, instance_id="first" if same_instance else "second")
    assert replaced is expected


def test_poll_that_ended_makes_replacement_a_restart() -> None:
    h = Harness()
    old, _ = h.register_full("gpu", instance_id="first")
    h.poll(old, now=1)
    h.unpoll(old, now=2)
    assert h.register_full("gpu", now=3, instance_id="second")[1] is Replaced.RESTART


# -- submit -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "model", "error", "status", "code"),
    [
        ("none", "m", UnknownModel, 404, "model_not_found"),
        ("other-model", "m", UnknownModel, 404, "model_not_found"),
        ("dropped", "m", NoConnector, 503, "no_connector"),
        ("full", "m", QueueFull, 503, "queue_full"),
        ("draining", "m", Draining, 503, "shutting_down"),
        ("duplicate", "m", DuplicateRequest, 409, "duplicate_request_id"),
    ],
)
def test_submit_refusals(
    setup: str, model: str, error: type[DispatchError], status: int, code: str
) -> None:
    h = Harness(queue_max=2)
    if setup == "other-model":
        h.register(models=["x"])
    elif setup == "dropped":
        s = h.register(models=["m"])
        h.core.deregister(OWNER, s.id, now=0)
    elif setup == "full":
        h.register(models=["m"])
        h.submit("q1")
        h.submit("q2")
    elif setup == "draining":
        h.register(models=["m"])
        h.core.begin_drain()
    elif setup == "duplicate":
        h.register(models=["m"])
        h.submit("new")
    before = set(h.core.requests)
    with pytest.raises(error) as info:
        h.submit("new", model)
    assert info.value.status == status
    assert info.value.code == code
    assert model in info.value.message or setup in ("draining", "duplicate")
    assert set(h.core.requests) == before


def test_queue_max_is_per_model() -> None:
    h = Harness(queue_max=1)
    h.register(models=["a", "b"])
    h.submit("r1", "a")
    h.submit("r2", "b")
    with pytest.raises(QueueFull):
        h.submit("r3", "a")
    assert h.core.queue_depth() == {"a": 1, "b": 1}


def test_submit_records_user_and_deadlines() -> None:
    h = Harness(queue_wait=30, total_timeout=100)
    h.register()
    p = h.submit("r1", now=5)
    assert (p.user, p.created, p.queue_deadline, p.total_deadline) == ("alice", 5, 35, 105)
    assert p.state is State.QUEUED


def test_submit_wakes_only_polling_sessions_with_room_for_the_model() -> None:
    h = Harness()
    full = h.register("f", ["m"], capacity=1)
    h.occupy(full)
    h.poll(full, now=0)
    polling = h.register("p", ["m"])
    h.poll(polling, now=0)
    idle = h.register("i", ["m"])
    other = h.register("o", ["x"])
    h.poll(other, now=0)
    h.out.woken.clear()
    h.submit("r1")
    assert h.out.woken == [polling.id]
    assert idle.id not in h.out.woken


# -- take: order and capacity --------------------------------------------------------------


def test_fifo_per_model() -> None:
    h = Harness()
    s = h.register(capacity=10)
    for i in range(5):
        h.submit(f"r{i}", now=float(i))
    assert h.take(s, now=10) == ["r0", "r1", "r2", "r3", "r4"]


def test_oldest_first_across_models() -> None:
    h = Harness()
    s = h.register(models=["a", "b", "c"], capacity=1)
    h.submit("b1", "b", now=1)
    h.submit("a1", "a", now=2)
    h.submit("c1", "c", now=3)
    h.submit("b2", "b", now=4)
    h.submit("a2", "a", now=5)
    order = []
    for t in range(10, 15):
        got = h.take(s, now=t)
        order += got
        h.core.finish(got[0])
    assert order == ["b1", "a1", "c1", "b2", "a2"]


def test_same_timestamp_across_models_keeps_arrival_order() -> None:
    # With a coarse clock (Windows' monotonic ticks every ~16 ms) requests for different
    # models often share a timestamp; they must still go out in arrival order. Several
    # model-name pairs so the outcome cannot depend on one lucky frozenset iteration order.
    wrong = []
    for i in range(16):
        h = Harness()
        first, second = f"model-{i}-x", f"model-{i}-y"
        s = h.register(models=[first, second], capacity=1)
        h.submit("early", second, now=1.0)
        h.submit("late", first, now=1.0)
        if h.take(s, now=2.0) != ["early"]:
            wrong.append(i)
    assert wrong == []


def test_take_honours_capacity() -> None:
    h = Harness()
    s = h.register(capacity=2)
    for i in range(4):
        h.submit(f"r{i}", now=float(i))
    assert h.take(s, now=5) == ["r0", "r1"]
    assert s.free == 0
    assert h.take(s, now=6) == []
    assert h.queued() == ["r2", "r3"]
    h.core.finish("r0")
    assert s.free == 1
    assert h.take(s, now=7) == ["r2"]
    assert h.core.queue_depth() == {"m": 1}


def test_take_only_serves_own_models() -> None:
    h = Harness()
    s = h.register("c1", ["a"], capacity=5)
    h.register("c2", ["b"])
    h.submit("rb", "b")
    assert h.take(s) == []
    assert h.queued("b") == ["rb"]


def test_take_marks_lease_and_injects_session_key() -> None:
    h = Harness(lease=15, first_byte_timeout=100)
    s = h.register(key="upstream-secret")
    h.submit("r1", now=1)
    (item,) = h.core.take(s.id, now=3)
    assert isinstance(item, RequestItem)
    assert item.upstream_api_key == "upstream-secret"
    assert item.attempt == 1
    p = h.core.requests["r1"]
    assert (p.state, p.session_id, p.connector, p.dispatches) == (State.LEASED, s.id, "c1", 1)
    assert (p.leased_at, p.lease_deadline, p.first_byte_deadline) == (3, 18, 103)
    assert s.last_seen == 3
    assert s.active == {"r1"}
    assert s.served == 1


def test_take_of_unknown_session_hands_out_nothing() -> None:
    h = Harness()
    h.register()
    h.submit("r1")
    assert h.core.take("ses_gone", now=0) == []
    assert h.queued() == ["r1"]


def test_cancels_go_out_first_even_at_full_capacity() -> None:
    h = Harness()
    s = h.register(capacity=1)
    h.submit("r1", now=0)
    h.submit("r2", now=1)
    assert h.take(s, now=2) == ["r1"]
    h.core.ack(s.id, "r1", now=3)
    h.core.cancel("r1")  # active: the slot stays busy until the upload ends
    assert s.free == 0
    assert h.take(s, now=4) == ["cancel:r1"]
    assert h.take(s, now=5) == []  # a cancel goes out once
    h.core.finish("r1")
    assert h.take(s, now=6) == ["r2"]


def test_cancels_precede_requests_in_one_poll() -> None:
    h = Harness()
    s = h.register(capacity=2)
    h.submit("r1", now=0)
    assert h.take(s, now=1) == ["r1"]
    h.core.ack(s.id, "r1", now=2)
    h.submit("r2", now=3)
    h.core.cancel("r1")
    assert h.take(s, now=4) == ["cancel:r1", "r2"]


# -- ack ------------------------------------------------------------------------------------


def test_ack_moves_leased_to_active() -> None:
    h = Harness(idle_timeout=10)
    s = h.register()
    h.submit("r1")
    h.take(s, now=1)
    p = h.core.ack(s.id, "r1", now=4)
    assert p is h.core.requests["r1"]
    assert p.state is State.ACTIVE
    assert p.last_activity == 4
    assert h.core.ack(s.id, "r1", now=5) is p  # a second upload of the same lease
    assert p.state is State.ACTIVE
    assert p.last_activity == 5


def test_ack_from_other_session_is_refused() -> None:
    h = Harness()
    s1 = h.register("c1")
    s2 = h.register("c2")
    h.submit("r1")
    h.take(s1, now=1)
    with pytest.raises(LeaseError):
        h.core.ack(s2.id, "r1", now=2)
    assert h.core.requests["r1"].state is State.LEASED


@pytest.mark.parametrize(
    "case", ["unknown-request", "unknown-session", "queued", "cancelled", "finished"]
)
def test_ack_refused(case: str) -> None:
    h = Harness()
    s = h.register()
    if case == "queued":
        h.occupy(s)  # no room: r1 stays queued
    h.submit("r1")
    h.take(s, now=1)
    if case == "cancelled":
        h.core.cancel("r1")
    elif case == "finished":
        h.core.finish("r1")
    rid = "nope" if case == "unknown-request" else "r1"
    sid = "ses_nope" if case == "unknown-session" else s.id
    with pytest.raises(LeaseError):
        h.core.ack(sid, rid, now=2)


def test_ack_after_lease_expired_and_requeued_is_refused() -> None:
    h = Harness(lease=5)
    s = h.register()
    h.submit("r1")
    h.take(s, now=0)
    h.core.expire(now=5)
    assert h.core.requests["r1"].state is State.QUEUED
    with pytest.raises(LeaseError):
        h.core.ack(s.id, "r1", now=6)


def test_late_ack_after_release_to_other_connector_is_refused() -> None:
    h = Harness(lease=5)
    s1 = h.register("c1")
    s2 = h.register("c2")
    h.submit("r1")
    h.take(s1, now=0)
    h.core.expire(now=5)
    assert h.take(s2, now=6) == ["r1"]
    with pytest.raises(LeaseError):
        h.core.ack(s1.id, "r1", now=7)
    assert h.core.ack(s2.id, "r1", now=7).state is State.ACTIVE
    assert h.core.requests["r1"].connector == "c2"


# -- leases ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lease", "leased_at", "expire_at", "requeued"),
    [
        (10, 1, 10.9, False),
        (10, 1, 11, True),  # due at the deadline itself
        (10, 1, 500, True),  # however late the tick
        (3, 0, 2.9, False),
        (3, 0, 3, True),
    ],
)
def test_lease_expiry_requeues_at_front(
    lease: float, leased_at: float, expire_at: float, requeued: bool
) -> None:
    h = Harness(lease=lease, queue_wait=1000)
    s = h.register(capacity=1)
    h.submit("r1", now=0)
    assert h.take(s, now=leased_at) == ["r1"]
    h.poll(s, now=leased_at)  # the session stays alive however late the tick
    h.submit("r2", now=leased_at)
    h.core.expire(now=expire_at)
    p = h.core.requests["r1"]
    if not requeued:
        assert p.state is State.LEASED
        assert h.queued() == ["r2"]
        assert h.core.redispatched == 0
        assert s.free == 0
        return
    assert p.state is State.QUEUED
    assert p.session_id is None
    assert h.queued() == ["r1", "r2"]
    assert h.core.redispatched == 1
    assert s.free == 1
    # The old holder is told to stop, then it may take the request again.
    items = h.core.take(s.id, now=expire_at)
    assert items[0] == CancelItem(request_id="r1")
    assert isinstance(items[1], RequestItem)
    assert (items[1].request_id, items[1].attempt) == ("r1", 2)
    assert h.core.requests["r1"].dispatches == 2
    assert h.failures("r1") == []


@pytest.mark.parametrize(
    ("capacity", "submitted", "expire_at", "queue"),
    [
        # Several leases expire in one tick: they go back in arrival order, before newer work.
        (2, ["r1", "r2"], 12, ["r1", "r2"]),
        (2, ["r1", "r2", "r3"], 12, ["r1", "r2", "r3"]),
        (3, ["r1", "r2", "r3", "r4", "r5"], 12, ["r1", "r2", "r3", "r4", "r5"]),
        (4, [f"r{i}" for i in range(9)], 50, [f"r{i}" for i in range(9)]),
    ],
)
def test_lease_expiry_keeps_fifo_when_several_expire_together(
    capacity: int, submitted: list[str], expire_at: float, queue: list[str]
) -> None:
    h = Harness(lease=10)
    s = h.register(capacity=capacity)
    for n, rid in enumerate(submitted):
        h.submit(rid, now=n * 0.1)
    assert h.take(s, now=2) == submitted[:capacity]
    h.core.expire(now=expire_at)
    assert h.queued() == queue


def test_leases_expiring_at_different_times_keep_fifo() -> None:
    h = Harness(lease=10)
    a = h.register("a", capacity=1)
    b = h.register("b", capacity=1)
    h.submit("r1", now=0)
    h.submit("r2", now=0)
    h.submit("r3", now=0)
    assert h.take(b, now=1) == ["r1"]  # expires at 11
    assert h.take(a, now=2) == ["r2"]  # expires at 12
    h.core.expire(now=11)
    h.core.expire(now=12)
    assert h.queued() == ["r1", "r2", "r3"]


def test_dropped_session_requeues_its_leases_in_fifo_order() -> None:
    # Several harnesses: the leases sit in a set, so one run could be right by chance.
    wrong = []
    for i in range(8):
        h = Harness(lease=10)
        s = h.register(capacity=3)
        for n in range(3):
            h.submit(f"r{i}-{n}", now=float(n))
        h.take(s, now=5)
        h.register(capacity=3, now=6)  # same name: replaces s
        if h.queued() != [f"r{i}-0", f"r{i}-1", f"r{i}-2"]:
            wrong.append(h.queued())
    assert wrong == []


def test_lease_expiry_extends_queue_deadline() -> None:
    h = Harness(lease=10, queue_wait=5)
    s = h.register()
    h.submit("r1", now=0)
    h.take(s, now=1)
    h.core.expire(now=11)
    assert h.core.requests["r1"].queue_deadline == 21
    h.core.expire(now=20.9)
    assert h.failures("r1") == []
    h.core.expire(now=21)
    assert h.failures("r1") == [(503, "queue_timeout")]


@pytest.mark.parametrize("max_redispatch", [0, 1, 2, 3])
def test_lease_expiry_fails_after_max_redispatch(max_redispatch: int) -> None:
    h = Harness(lease=10, max_redispatch=max_redispatch)
    s = h.register()
    h.submit("r1", now=0)
    now = 0.0
    for dispatch in range(1, max_redispatch + 2):
        got = [x for x in h.take(s, now=now) if not x.startswith("cancel:")]
        assert got == ["r1"], dispatch
        assert h.core.requests["r1"].dispatches == dispatch
        now += 10
        h.core.expire(now)
        if dispatch <= max_redispatch:
            assert h.failures("r1") == []
    assert h.failures("r1") == [(502, "connector_lost")]
    assert "r1" not in h.core.requests
    assert h.core.queue_depth() == {}
    assert s.free == 1
    assert h.core.redispatched == max_redispatch


def test_acknowledged_request_is_never_redispatched() -> None:
    h = Harness(lease=10)
    s = h.register()
    h.submit("r1", now=0)
    h.take(s, now=0)
    h.core.ack(s.id, "r1", now=1)
    h.poll(s, now=1)
    h.core.expire(now=100)
    assert h.core.requests["r1"].state is State.ACTIVE
    assert h.core.redispatched == 0


@pytest.mark.parametrize(
    ("state", "delivered", "how", "outcome"),
    [
        ("leased", 0, "replaced", "requeued"),
        ("leased", 0, "deregistered", "requeued"),
        ("leased", 0, "session-expired", "requeued"),
        ("leased", 0, "lease-expired", "requeued"),
        ("active", 0, "replaced", "failed"),
        ("active", 0, "session-expired", "failed"),
        ("active", 10, "replaced", "failed"),
        ("active", 10, "lease-expired", "active"),  # an acknowledged lease does not expire
        ("leased", 10, "replaced", "failed"),
        ("leased", 10, "deregistered", "failed"),
        ("leased", 10, "lease-expired", "failed"),
    ],
)
def test_no_redispatch_once_bytes_were_delivered(
    state: str, delivered: int, how: str, outcome: str
) -> None:
    h = Harness(lease=40, session_ttl=30)
    s = h.register()
    p = h.submit("r1", now=0)
    h.take(s, now=0)
    if how == "lease-expired":
        h.poll(s, now=0)  # alive: only the lease can run out
    if state == "active":
        h.core.ack(s.id, "r1", now=1)
    if delivered:
        RelayCore.progress(p, Seen.DELIVERED, 0.0, delivered)
    if how == "replaced":
        h.register(now=2)
    elif how == "deregistered":
        h.core.deregister(OWNER, s.id, now=2)
    elif how == "session-expired":
        h.core.expire(now=31)
        assert s.id not in h.core.sessions
    elif how == "lease-expired":
        h.core.expire(now=40)
    if outcome == "requeued":
        assert p.state is State.QUEUED
        assert h.queued() == ["r1"]
        assert h.failures("r1") == []
    elif outcome == "failed":
        assert h.failures("r1") == [(502, "connector_lost")]
        assert "r1" not in h.core.requests
        assert h.queued() == []
    else:
        assert p.state is State.ACTIVE
        assert h.failures("r1") == []
    assert h.core.redispatched == (1 if outcome == "requeued" else 0)


# -- timeouts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeoutCase:
    timings: dict[str, float]
    active: bool = True  # acknowledged at t=1, else left queued behind a busy slot
    head_at: float | None = None
    activity_at: tuple[float, ...] = ()
    ok_at: float = 0.0
    fail_at: float | None = None  # None: never fails
    status: int = 504
    code: str = "timeout"
    message: str = ""


TIMEOUTS = {
    # queue wait: counted from submission (t=0) while no connector is free
    "queue-wait": TimeoutCase({"queue_wait": 30}, active=False, ok_at=29.9, fail_at=30,
                              status=503, code="queue_timeout", message="no connector"),
    # first byte: counted from hand-out (t=1) to the upstream's head
    "first-byte": TimeoutCase({"first_byte_timeout": 5}, ok_at=5.9, fail_at=6,
                              message="did not answer"),
    "first-byte-after-head": TimeoutCase({"first_byte_timeout": 5}, head_at=2,
                                         activity_at=(50,), ok_at=50),
    # idle: counted from the last frame, not from the ack
    "idle-from-ack": TimeoutCase({"idle_timeout": 10}, head_at=1, ok_at=10.9, fail_at=11,
                                 message="stalled"),
    "idle-from-last-frame": TimeoutCase({"idle_timeout": 10}, head_at=2, activity_at=(3,),
                                        ok_at=12.9, fail_at=13, message="stalled"),
    "idle-many-frames": TimeoutCase({"idle_timeout": 10}, head_at=2,
                                    activity_at=(5, 14, 23, 30), ok_at=39.9, fail_at=40,
                                    message="stalled"),
    "idle-head-is-a-frame": TimeoutCase({"idle_timeout": 10}, head_at=8, ok_at=17.9,
                                        fail_at=18, message="stalled"),
    # total: counted from submission (t=0), however active the upload is
    "total": TimeoutCase({"total_timeout": 20, "idle_timeout": 5}, head_at=1,
                         activity_at=(4, 8, 12, 16, 18), ok_at=19.9, fail_at=20,
                         message="too long"),
}  # fmt: skip


@pytest.mark.parametrize("case", TIMEOUTS.values(), ids=TIMEOUTS.keys())
def test_timeouts(case: TimeoutCase) -> None:
    h = Harness(lease=1000, **case.timings)
    s = h.register()
    if not case.active:
        h.occupy(s)
    p = h.submit("r1", now=0)
    if case.active:
        assert h.take(s, now=1) == ["r1"]
        h.core.ack(s.id, "r1", now=1)
    # Frames arrive in time order, with the core expiring whatever came due in between.
    frames = sorted([(case.head_at, "head")] if case.head_at is not None else [])
    frames += [(t, "data") for t in case.activity_at]
    for when, kind in sorted(frames):
        h.core.expire(now=when)
        if kind == "head":
            RelayCore.progress(p, Seen.HEAD, when)
        else:
            RelayCore.progress(p, Seen.FRAME, when)
    h.core.expire(now=case.ok_at)
    assert h.out.failures.get("r1") is None
    if case.fail_at is None:
        assert "r1" in h.core.requests
        return
    h.core.expire(now=case.fail_at)
    (failure,) = h.out.failures["r1"]
    assert (failure.status, failure.code) == (case.status, case.code)
    assert case.message in failure.message
    assert "r1" not in h.core.requests
    assert h.queued() == []
    if case.active:
        assert s.free == 1


# -- session liveness -----------------------------------------------------------------------


SessionStep = tuple[float, str]  # (time, "poll" | "unpoll" | "take")

SESSION_TTL = {
    # ttl 60 throughout; the session expires at (last sign of life) + 60
    "never-polled": ([], 59.9, 60),
    "take-keeps-alive": ([(50, "take")], 109.9, 110),
    "from-end-of-last-poll": ([(10, "poll"), (30, "unpoll")], 89.9, 90),
    "not-while-polling": ([(0, "poll"), (10_000, "unpoll")], 10_059.9, 10_060),
    "overlapping-polls": (
        [(0, "poll"), (5, "poll"), (10, "unpoll"), (1000, "unpoll")],
        1059.9,
        1060,
    ),
    "polls-in-a-row": (
        [(0, "poll"), (20, "unpoll"), (20, "poll"), (40, "unpoll"), (40, "poll"), (70, "unpoll")],
        129.9,
        130,
    ),
}


@pytest.mark.parametrize(
    ("steps", "alive_at", "gone_at"), SESSION_TTL.values(), ids=SESSION_TTL.keys()
)
def test_session_ttl(steps: list[SessionStep], alive_at: float, gone_at: float) -> None:
    h = Harness(session_ttl=60)
    s = h.register(now=0)
    for when, what in steps:
        h.core.expire(now=when)
        assert s.id in h.core.sessions, when
        if what == "poll":
            h.poll(s, now=when)
        elif what == "unpoll":
            h.unpoll(s, now=when)
        else:
            h.take(s, now=when)
    h.core.expire(now=alive_at)
    assert s.id in h.core.sessions
    h.core.expire(now=gone_at)
    assert s.id not in h.core.sessions
    assert h.out.dropped == [("c1", "session expired")]
    assert h.core.live_models() == {}
    with pytest.raises(UnknownSession):
        h.core.session(OWNER, s.id)


def test_session_ttl_expiry_requeues_leased_and_fails_active() -> None:
    h = Harness(session_ttl=60, lease=1000)
    s = h.register(now=0, capacity=2)
    h.submit("leased", now=0)
    h.submit("active", now=0)
    h.take(s, now=0)
    h.core.ack(s.id, "active", now=0)
    h.core.expire(now=59.9)
    assert s.id in h.core.sessions
    h.core.expire(now=60)
    assert s.id not in h.core.sessions
    assert h.core.live_models() == {}
    assert h.core.requests["leased"].state is State.QUEUED
    assert h.failures("active") == [(502, "connector_lost")]


# -- cancel and finish ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "freed", "cancel_item", "wakes"),
    [
        ("queued", True, False, False),
        ("leased", True, True, True),
        ("active", False, True, True),  # the upload handler frees the slot
        ("finished", True, False, False),
        ("unknown", True, False, False),
    ],
)
def test_cancel_in_each_state(state: str, freed: bool, cancel_item: bool, wakes: bool) -> None:
    h = Harness()
    s = h.register(capacity=1)
    if state == "queued":
        h.occupy(s)
    if state != "unknown":
        h.submit("r1", now=0)
    if state in ("leased", "active", "finished"):
        assert h.take(s, now=1) == ["r1"]
    if state in ("active", "finished"):
        h.core.ack(s.id, "r1", now=2)
    if state == "finished":
        h.core.finish("r1")
    h.out.woken.clear()

    h.core.cancel("r1")

    assert h.core.is_cancelled("r1")
    assert h.out.failures == {}  # a cancel is not a failure
    assert ("r1" not in h.core.requests) is freed
    assert h.queued() == []
    assert (s.id in h.out.woken) is wakes
    assert ("cancel:r1" in h.take(s, now=3)) is cancel_item
    if state == "active":
        assert h.core.requests["r1"].cancelled
        assert s.free == 0
        with pytest.raises(LeaseError):
            h.core.ack(s.id, "r1", now=4)  # a retried upload of a cancelled request
        h.core.finish("r1")
    if state != "queued":
        assert s.free == 1


def test_cancel_leased_frees_slot_for_the_next_request() -> None:
    h = Harness()
    s = h.register()
    h.submit("r1", now=0)
    h.submit("r2", now=1)
    h.take(s, now=2)
    h.core.cancel("r1")
    assert s.free == 1
    assert h.take(s, now=3) == ["cancel:r1", "r2"]


@pytest.mark.parametrize("timeout", ["idle_timeout", "first_byte_timeout", "total_timeout"])
def test_cancelled_active_request_does_not_time_out(timeout: str) -> None:
    h = Harness(lease=1000, **{timeout: 1})
    s = h.register()
    h.submit("r1", now=0)
    h.take(s, now=0)
    h.core.ack(s.id, "r1", now=0)
    h.core.cancel("r1")
    h.poll(s, now=0)
    h.core.expire(now=100)
    # Its user is gone: no failure to report, but a connector that never ends the upload
    # must not hold the slot forever.
    assert h.out.failures == {}
    assert "r1" not in h.core.requests
    assert s.free == 1


def test_finish_frees_slot_and_wakes_session() -> None:
    h = Harness()
    s = h.register()
    h.submit("r1")
    h.take(s)
    h.core.ack(s.id, "r1", now=1)
    h.out.woken.clear()
    h.core.finish("r1")
    assert s.free == 1
    assert h.out.woken == [s.id]
    assert h.core.in_flight() == 0
    h.core.finish("r1")  # twice is harmless
    assert h.out.woken == [s.id]


def test_finish_queued_removes_from_queue_without_waking() -> None:
    h = Harness()
    s = h.register()
    h.occupy(s)
    h.submit("r1")
    h.out.woken.clear()
    h.core.finish("r1")
    assert h.queued() == []
    assert h.out.woken == []


def test_finished_request_leaves_no_deadline_behind() -> None:
    h = Harness(queue_wait=5, lease=5, first_byte_timeout=5, idle_timeout=5, total_timeout=5)
    s = h.register()
    h.submit("r1", now=0)
    h.take(s, now=0)
    h.core.ack(s.id, "r1", now=0)
    h.core.finish("r1")
    h.core.expire(now=1000)
    assert h.out.failures == {}
    assert h.core.redispatched == 0


# -- draining and views ---------------------------------------------------------------------


def test_begin_drain_wakes_every_session() -> None:
    h = Harness()
    a = h.register("a")
    b = h.register("b", ["x"])
    h.poll(a, now=0)
    h.out.woken.clear()
    h.core.begin_drain()
    assert h.core.draining
    assert sorted(h.out.woken) == sorted([a.id, b.id])


def test_draining_hands_out_only_cancels() -> None:
    h = Harness()
    s = h.register(capacity=3)
    h.submit("r1", now=0)
    h.submit("r2", now=1)
    h.take(s, now=2)
    h.core.cancel("r1")
    h.core.begin_drain()
    with pytest.raises(Draining):
        h.submit("r3", now=3)
    assert h.take(s, now=4) == ["cancel:r1"]
    assert h.core.requests["r2"].state is State.LEASED


def test_draining_leaves_queued_work_queued() -> None:
    h = Harness()
    s = h.register(capacity=3)
    h.submit("r1")
    h.core.begin_drain()
    assert h.take(s, now=1) == []
    assert h.queued() == ["r1"]


def test_views() -> None:
    h = Harness()
    busy = h.register("c1", ["a", "b"])
    h.occupy(busy, "x")
    h.register("c2", ["b"])
    assert {k: sorted(v) for k, v in h.core.live_models().items()} == {
        "a": ["c1"],
        "b": ["c1", "c2"],
    }
    assert h.core.queue_depth() == {}
    h.submit("r1", "a")
    h.submit("r2", "a")
    assert h.core.queue_depth() == {"a": 2}
    assert h.core.in_flight() == 3
    h.core.cancel("r1")
    h.core.cancel("r2")
    assert h.core.queue_depth() == {}  # empty queues are not listed
    assert h.core.in_flight() == 1


# -- slots-busy notices ---------------------------------------------------------------------


def test_slots_busy_notice_names_capacities_and_waiting() -> None:
    h = Harness(slots_notice_every=60)
    a = h.register("a", capacity=1)
    b = h.register("b", capacity=1)
    other = h.register("other", ["x"], capacity=4)
    h.occupy(a, "busy-a")
    h.occupy(b, "busy-b")
    assert h.out.busy == []
    h.submit("r1", now=1)
    assert h.core.slot_waits == {"m": 1}
    assert h.out.busy == [("m", {"a": 1, "b": 1}, 1)]
    h.submit("r2", now=2)
    assert h.core.slot_waits == {"m": 2}
    assert len(h.out.busy) == 1  # once per window
    h.submit("x1", "x", now=3)  # other has room
    assert h.core.slot_waits == {"m": 2}
    assert other.free == 4


@pytest.mark.parametrize(
    ("times", "notices"),
    [
        ([1], [1]),
        ([1, 2, 60.9], [1]),
        ([1, 61], [1, 61]),  # the window is [last, last + every)
        ([1, 30, 61, 90, 121.5], [1, 61, 121.5]),
        ([0, 59.999, 60], [0, 60]),
    ],
)
def test_slots_busy_notice_at_most_once_per_window(
    times: list[float], notices: list[float]
) -> None:
    h = Harness(slots_notice_every=60, queue_wait=1000, lease=1000)
    s = h.register(capacity=1)
    h.occupy(s)
    noticed = []
    for n, when in enumerate(times):
        before = len(h.out.busy)
        h.submit(f"r{n}", now=when)
        if len(h.out.busy) > before:
            noticed.append(when)
            assert h.out.busy[-1] == ("m", {"c1": 1}, n + 1)
    assert noticed == notices
    assert h.core.slot_waits == {"m": len(times)}


def test_slots_busy_window_is_per_model() -> None:
    h = Harness(slots_notice_every=60)
    s = h.register(models=["a", "b"], capacity=1)
    h.occupy(s)
    h.submit("r1", "a", now=1)
    h.submit("r2", "b", now=2)
    h.submit("r3", "a", now=3)
    assert [(m, w) for m, _, w in h.out.busy] == [("a", 1), ("b", 1)]
    assert h.core.slot_waits == {"a": 2, "b": 1}


@pytest.mark.parametrize("polling", [False, True])
def test_no_slots_busy_notice_when_a_session_has_a_free_slot(polling: bool) -> None:
    h = Harness()
    full = h.register("full", capacity=1)
    h.occupy(full)
    free = h.register("free", capacity=1)
    if polling:
        h.poll(free, now=0)
    h.submit("r1", now=1)
    assert h.out.busy == []
    assert h.core.slot_waits == {}


# -- deadlines drive everything -------------------------------------------------------------


Action = Callable[[Harness], None]


def _scenario_leases(h: Harness) -> list[tuple[float, Action]]:
    s = h.register("c1", capacity=2)
    h.submit("r1", now=0)
    h.submit("r2", now=0)
    h.submit("r3", now=0)
    h.take(s, now=0)
    return [(12, lambda h: h.take(s, now=12)), (25, lambda h: h.take(s, now=25))]


def _scenario_timeouts(h: Harness) -> list[tuple[float, Action]]:
    s = h.register("c1", capacity=3)
    other = h.register("c2", ["x"], capacity=1)
    h.occupy(other, "busy")
    for rid in ("first-byte", "idle", "total"):
        h.submit(rid, now=0)
    h.submit("queued", "x", now=0)
    h.take(s, now=0)
    for rid in ("first-byte", "idle", "total"):
        h.core.ack(s.id, rid, now=0)

    def frames(at: float) -> Action:
        def apply(h: Harness) -> None:
            for rid in ("idle", "total") if at < 1 else ("total",):
                p = h.core.requests.get(rid)
                if p is not None:
                    RelayCore.progress(p, Seen.HEAD if at < 1 else Seen.FRAME, at)

        return apply

    return [(t, frames(t)) for t in (0.5, 3, 6, 9, 12, 15, 18)]


def _scenario_sessions(h: Harness) -> list[tuple[float, Action]]:
    a = h.register("a", capacity=1)
    b = h.register("b", capacity=1)
    h.submit("r1", now=0)
    h.take(a, now=0)
    return [
        (1, lambda h: h.poll(b, now=1)),
        (30, lambda h: h.take(a, now=30)),  # too late: expired at 20
        (70, lambda h: h.unpoll(b, now=70)),
        (85, lambda h: h.register("b", now=85)),  # a restart: replaces the idle b
    ]


SCENARIOS: dict[str, tuple[dict[str, float], Callable[[Harness], list[tuple[float, Action]]]]] = {
    "leases": ({"lease": 10, "queue_wait": 40, "max_redispatch": 2}, _scenario_leases),
    "timeouts": (
        {"lease": 100, "first_byte_timeout": 5, "idle_timeout": 4, "total_timeout": 20,
         "queue_wait": 8},
        _scenario_timeouts,
    ),
    "sessions": ({"session_ttl": 20, "lease": 50, "queue_wait": 200}, _scenario_sessions),
}  # fmt: skip


def _drive_by_polling(h: Harness, actions: list[tuple[float, Action]], until: float) -> None:
    """The old reaper: tick every half second, whether or not anything is due.

    Every deadline and action in the scenarios falls on that grid, so both drivers see the
    same ``now``; at equal times, what is due fires before the action.
    """
    pending = sorted(actions, key=lambda a: a[0])
    for step in range(int(until * 2) + 1):
        now = step / 2
        while pending and pending[0][0] < now:
            pending.pop(0)[1](h)
        h.core.expire(now)


def _drive_by_deadlines(h: Harness, actions: list[tuple[float, Action]], until: float) -> None:
    """The adapter's way: sleep to ``next_deadline()`` (or the next event) and expire."""
    for at, action in sorted(actions, key=lambda a: a[0]):
        h.run_deadlines(until=at)
        action(h)
    h.run_deadlines(until=until)


@pytest.mark.parametrize("name", SCENARIOS)
def test_next_deadline_reaches_the_polling_reapers_outcomes(name: str) -> None:
    timings, build = SCENARIOS[name]
    polled, driven = Harness(**timings), Harness(**timings)
    _drive_by_polling(polled, build(polled), until=200)
    _drive_by_deadlines(driven, build(driven), until=200)
    assert driven.snapshot() == polled.snapshot()
    assert driven.out.log  # the scenario did something
    assert driven.core.next_deadline() is None or driven.core.next_deadline() > 200


def test_scenarios_cover_every_outcome() -> None:
    seen = set()
    for timings, build in SCENARIOS.values():
        h = Harness(**timings)
        _drive_by_deadlines(h, build(h), until=200)
        seen |= {(e[0], e[2], e[3]) if e[0] == "failed" else (e[0], e[-1]) for e in h.out.log}
    assert seen >= {
        ("failed", 502, "connector_lost"),
        ("failed", 503, "queue_timeout"),
        ("failed", 504, "timeout"),
        ("dropped", "session expired"),
        ("dropped", "connector registered again"),
    }


def _state_after(op: str) -> Harness:
    h = Harness(lease=10, queue_wait=20, idle_timeout=30, first_byte_timeout=40)
    s = h.register(capacity=2)
    if op == "register":
        return h
    h.submit("r1", now=1)
    if op == "submit":
        return h
    h.take(s, now=2)
    if op == "take":
        return h
    h.core.ack(s.id, "r1", now=3)
    if op == "ack":
        return h
    if op == "poll":
        h.poll(s, now=4)
        h.unpoll(s, now=5)
        return h
    RelayCore.progress(h.core.requests["r1"], Seen.HEAD, 4)
    RelayCore.progress(h.core.requests["r1"], Seen.FRAME, 5)
    if op == "frames":
        return h
    h.core.finish("r1")
    return h


OPERATIONS = ["register", "submit", "take", "ack", "poll", "frames", "finish"]


@pytest.mark.parametrize("op", OPERATIONS)
def test_expire_before_the_next_deadline_changes_nothing(op: str) -> None:
    h = _state_after(op)
    when = h.core.next_deadline()
    assert when is not None
    before = h.snapshot()
    woken = list(h.out.woken)
    h.core.expire(when - 0.001)
    assert h.snapshot() == before
    assert h.out.woken == woken
    assert h.core.next_deadline() == when


def test_stale_deadlines_are_dropped_and_heap_stays_bounded() -> None:
    h = Harness(queue_max=100_000)
    s = h.register(capacity=8)
    worst = 0
    now = 0.0
    for n in range(10_000):
        now += 0.001
        h.submit(f"r{n}", now=now)
        h.take(s, now=now)
        h.core.ack(s.id, f"r{n}", now=now)
        RelayCore.progress(h.core.requests[f"r{n}"], Seen.HEAD, now)
        if n >= 4:
            h.core.finish(f"r{n - 4}")
        live = len(h.core.requests) + len(h.core.sessions)
        worst = max(worst, len(h.core._deadlines) - (4 * live + 1024))
    assert worst <= 0
    assert len(h.core._deadlines) <= 4 * 5 + 1024


def test_heap_stays_bounded_when_the_connector_polls_for_every_request() -> None:
    h = Harness(queue_max=100_000)
    s = h.register(capacity=1)
    now = 0.0
    for n in range(10_000):
        now += 0.001
        h.poll(s, now=now)
        h.submit(f"r{n}", now=now)
        assert h.take(s, now=now) == [f"r{n}"]
        h.unpoll(s, now=now)
        h.core.ack(s.id, f"r{n}", now=now)
        h.core.finish(f"r{n}")
    live = len(h.core.requests) + len(h.core.sessions)
    assert len(h.core._deadlines) <= 4 * live + 1024


def test_cost_of_a_tick_does_not_grow_with_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(queue_max=10_000, queue_wait=600, session_ttl=600, lease=1000, idle_timeout=1000)
    s = h.register(capacity=1)
    h.occupy(s)  # every request waits
    for n in range(5_000):
        h.submit(f"r{n}", now=n * 0.001)
    calls = {"valid": 0, "expire_request": 0}

    def counting(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            calls[name] += 1
            return real(*args)

        return wrapper

    monkeypatch.setattr(h.core, "_valid", counting("valid", h.core._valid))
    monkeypatch.setattr(
        h.core, "_expire_request", counting("expire_request", h.core._expire_request)
    )
    for now in (6.0, 10.0, 100.0, 299.0):
        h.core.expire(now)
    assert calls == {"valid": 0, "expire_request": 0}
    assert len(h.core.requests) == 5_001
    # When they do come due, each is examined once.
    h.core.expire(600.0)
    assert calls["expire_request"] >= 1
    assert calls["valid"] <= 5_001 * 3


def test_refuse_sends_one_cancel_item_and_wakes_the_poll() -> None:
    """Frames on the multiplexed upload for a request the session does not hold."""
    h = Harness()
    session = h.register()
    h.out.woken.clear()
    h.core.refuse(session.id, "elsewhere")
    h.core.refuse(session.id, "elsewhere")
    assert h.out.woken == [session.id]
    assert h.take(session) == ["cancel:elsewhere"]
    h.core.refuse("ses_gone", "r")  # an unknown session: nothing to tell
    assert h.take(session) == []
