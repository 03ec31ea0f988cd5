from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest

from broker.dispatch import (
    Dispatcher,
    DispatchError,
    Draining,
    LeaseError,
    NoConnector,
    Pending,
    QueueFull,
    Session,
    State,
    Timings,
    UnknownModel,
    UnknownSession,
)
from shared.protocol import CancelItem, RequestItem, UploadMode


@dataclass
class FakeSink:
    failures: list[tuple[int, str, str]] = field(default_factory=list)

    def fail(self, status: int, code: str, message: str) -> None:
        self.failures.append((status, code, message))


class Harness:
    def __init__(self, **timings: float) -> None:
        self.woken: list[str] = []
        self.d = Dispatcher(Timings(**timings), self.woken.append)  # type: ignore[arg-type]
        self.sinks: dict[str, FakeSink] = {}

    def register(
        self,
        name: str = "c1",
        models: Iterable[str] = ("m",),
        capacity: int = 1,
        now: float = 0.0,
        key: str | None = None,
    ) -> Session:
        return self.d.register(
            name=name,
            models=list(models),
            capacity=capacity,
            version="test",
            upload_mode=UploadMode.STREAM,
            upstream_api_key=key,
            owner="owner",
            now=now,
        )

    def submit(self, rid: str, model: str = "m", now: float = 0.0) -> Pending:
        sink = FakeSink()
        self.sinks[rid] = sink
        item = RequestItem(request_id=rid, model=model, path="/v1/chat/completions", body="{}")
        return self.d.submit(item, sink, now)

    def take(self, session: Session, now: float = 0.0) -> list[str]:
        """Request ids handed out; cancels as 'cancel:<id>'."""
        out = []
        for item in self.d.take(session.id, now):
            if isinstance(item, CancelItem):
                out.append(f"cancel:{item.request_id}")
            else:
                out.append(item.request_id)
        return out

    def failures(self, rid: str) -> list[tuple[int, str]]:
        return [(status, code) for status, code, _ in self.sinks[rid].failures]

    def queued(self, model: str = "m") -> list[str]:
        return [p.id for p in self.d.queues.get(model, ())]


# -- sessions -----------------------------------------------------------------------------


def test_register_makes_models_live() -> None:
    h = Harness()
    s = h.register("c1", ["a", "b"], capacity=3)
    assert h.d.session(s.id) is s
    assert s.id.startswith("ses_")
    assert s.free == 3
    assert h.d.live_models() == {"a": ["c1"], "b": ["c1"]}
    assert h.d.known_models == {"a", "b"}


def test_register_same_name_replaces_old_session() -> None:
    h = Harness()
    old = h.register("c1", ["a"])
    new = h.register("c1", ["b"])
    assert new.id != old.id
    with pytest.raises(UnknownSession):
        h.d.session(old.id)
    assert list(h.d.sessions) == [new.id]
    assert h.d.live_models() == {"b": ["c1"]}
    # The old model is still known: asking for it is "no connector", not "unknown model".
    with pytest.raises(NoConnector):
        h.submit("r1", "a")


def test_register_other_name_keeps_first_session() -> None:
    h = Harness()
    a = h.register("c1")
    b = h.register("c2")
    assert set(h.d.sessions) == {a.id, b.id}
    assert h.d.live_models() == {"m": ["c1", "c2"]}


def test_replacing_session_requeues_leased_and_fails_active() -> None:
    h = Harness(lease=10)
    old = h.register("c1", capacity=2)
    h.submit("leased", now=1)
    h.submit("active", now=2)
    h.submit("waiting", now=3)
    assert h.take(old, now=4) == ["leased", "active"]
    h.d.ack(old.id, "active", now=5)

    new = h.register("c1", capacity=2, now=6)

    leased = h.d.requests["leased"]
    assert leased.state is State.QUEUED
    assert leased.session_id is None
    assert h.queued() == ["leased", "waiting"]  # back at the front, before newer work
    assert h.failures("leased") == []
    assert h.failures("active") == [(502, "connector_lost")]
    assert "active" not in h.d.requests
    items = h.d.take(new.id, now=7)
    assert [(i.request_id, i.attempt) for i in items if isinstance(i, RequestItem)] == [
        ("leased", 2),
        ("waiting", 1),
    ]


def test_drop_unknown_session_is_a_no_op() -> None:
    h = Harness()
    h.d.drop_session("ses_nope", now=0, reason="test")
    assert h.d.sessions == {}


def test_update_models_routes_new_model_and_wakes() -> None:
    h = Harness()
    s = h.register("c1", ["a"])
    with pytest.raises(UnknownModel):
        h.submit("r0", "b")
    h.d.update_models(s.id, ["a", "b"], now=5)
    assert s.last_seen == 5
    assert h.woken == [s.id]
    h.submit("r1", "b")
    assert h.take(s) == ["r1"]


def test_update_models_of_unknown_session() -> None:
    with pytest.raises(UnknownSession):
        Harness().d.update_models("ses_gone", ["a"], now=0)


# -- submit -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "model", "error", "status", "code"),
    [
        ("none", "m", UnknownModel, 404, "model_not_found"),
        ("other-model", "m", UnknownModel, 404, "model_not_found"),
        ("dropped", "m", NoConnector, 503, "no_connector"),
        ("full", "m", QueueFull, 503, "queue_full"),
        ("draining", "m", Draining, 503, "shutting_down"),
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
        h.d.drop_session(s.id, now=0, reason="test")
    elif setup == "full":
        h.register(models=["m"])
        h.submit("q1")
        h.submit("q2")
    elif setup == "draining":
        h.register(models=["m"])
        h.d.draining = True
    before = set(h.d.requests)
    with pytest.raises(error) as info:
        h.submit("new", model)
    assert info.value.status == status
    assert info.value.code == code
    assert model in info.value.message or setup == "draining"
    assert set(h.d.requests) == before


def test_queue_max_is_per_model() -> None:
    h = Harness(queue_max=1)
    h.register(models=["a", "b"])
    h.submit("r1", "a")
    h.submit("r2", "b")
    with pytest.raises(QueueFull):
        h.submit("r3", "a")
    assert h.d.queue_depth() == {"a": 1, "b": 1}


def test_submit_wakes_only_polling_sessions_with_room_for_the_model() -> None:
    h = Harness()
    polling = h.register("p", ["m"])
    polling.polling = 1
    idle = h.register("i", ["m"])
    other = h.register("o", ["x"])
    other.polling = 1
    full = h.register("f", ["m"], capacity=1)
    full.polling = 1
    full.active.add("busy")
    h.submit("r1")
    assert h.woken == [polling.id]
    assert idle.id not in h.woken


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
        h.d.finish(got[0])
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
    h.d.finish("r0")
    assert s.free == 1
    assert h.take(s, now=7) == ["r2"]
    assert h.d.queue_depth() == {"m": 1}


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
    (item,) = h.d.take(s.id, now=3)
    assert isinstance(item, RequestItem)
    assert item.upstream_api_key == "upstream-secret"
    assert item.attempt == 1
    p = h.d.requests["r1"]
    assert (p.state, p.session_id, p.dispatches) == (State.LEASED, s.id, 1)
    assert p.lease_deadline == 18
    assert p.first_byte_deadline == 103
    assert s.last_seen == 3
    assert s.active == {"r1"}
    assert s.served == 1


def test_take_of_unknown_session() -> None:
    with pytest.raises(UnknownSession):
        Harness().d.take("ses_gone", now=0)


def test_cancels_go_out_first_even_at_full_capacity() -> None:
    h = Harness()
    s = h.register(capacity=1)
    h.submit("r1", now=0)
    h.submit("r2", now=1)
    assert h.take(s, now=2) == ["r1"]
    h.d.ack(s.id, "r1", now=3)
    h.d.cancel("r1")  # active: the slot stays busy until the upload ends
    assert s.free == 0
    assert h.take(s, now=4) == ["cancel:r1"]
    assert h.take(s, now=5) == []  # a cancel goes out once
    h.d.finish("r1")
    assert h.take(s, now=6) == ["r2"]


def test_cancels_precede_requests_in_one_poll() -> None:
    h = Harness()
    s = h.register(capacity=2)
    h.submit("r1", now=0)
    assert h.take(s, now=1) == ["r1"]
    h.d.ack(s.id, "r1", now=2)
    h.submit("r2", now=3)
    h.d.cancel("r1")
    assert h.take(s, now=4) == ["cancel:r1", "r2"]


# -- ack ------------------------------------------------------------------------------------


def test_ack_moves_leased_to_active() -> None:
    h = Harness()
    s = h.register()
    h.submit("r1")
    h.take(s, now=1)
    p = h.d.ack(s.id, "r1", now=4)
    assert p is h.d.requests["r1"]
    assert p.state is State.ACTIVE
    assert p.last_activity == 4
    assert s.last_seen == 4


def test_ack_from_other_session_is_refused() -> None:
    h = Harness()
    s1 = h.register("c1")
    s2 = h.register("c2")
    h.submit("r1")
    h.take(s1, now=1)
    with pytest.raises(LeaseError):
        h.d.ack(s2.id, "r1", now=2)
    assert h.d.requests["r1"].state is State.LEASED


@pytest.mark.parametrize("case", ["unknown-request", "queued", "cancelled", "finished"])
def test_ack_refused(case: str) -> None:
    h = Harness()
    s = h.register()
    if case == "queued":
        s.active.add("busy")  # no room: r1 stays queued
    h.submit("r1")
    h.take(s, now=1)
    if case == "cancelled":
        h.d.cancel("r1")
    elif case == "finished":
        h.d.finish("r1")
    with pytest.raises(LeaseError):
        h.d.ack(s.id, "nope" if case == "unknown-request" else "r1", now=2)


def test_ack_after_lease_expired_and_requeued_is_refused() -> None:
    h = Harness(lease=5)
    s = h.register()
    h.submit("r1")
    h.take(s, now=0)
    h.d.tick(now=5)
    assert h.d.requests["r1"].state is State.QUEUED
    with pytest.raises(LeaseError):
        h.d.ack(s.id, "r1", now=6)


def test_late_ack_after_release_to_other_connector_is_refused() -> None:
    h = Harness(lease=5)
    s1 = h.register("c1")
    s2 = h.register("c2")
    h.submit("r1")
    h.take(s1, now=0)
    h.d.tick(now=5)
    assert h.take(s2, now=6) == ["r1"]
    with pytest.raises(LeaseError):
        h.d.ack(s1.id, "r1", now=7)
    assert h.d.ack(s2.id, "r1", now=7).state is State.ACTIVE


def test_ack_from_unknown_session() -> None:
    h = Harness()
    s = h.register()
    h.submit("r1")
    h.take(s)
    with pytest.raises(UnknownSession):
        h.d.ack("ses_nope", "r1", now=1)


# -- leases ---------------------------------------------------------------------------------


def test_lease_expiry_requeues_at_front() -> None:
    h = Harness(lease=10)
    s = h.register(capacity=1)
    h.submit("r1", now=0)
    assert h.take(s, now=1) == ["r1"]
    h.submit("r2", now=2)
    h.d.tick(now=10.9)
    assert h.d.requests["r1"].state is State.LEASED
    h.d.tick(now=11)
    p = h.d.requests["r1"]
    assert p.state is State.QUEUED
    assert p.session_id is None
    assert h.queued() == ["r1", "r2"]
    assert h.d.redispatched == 1
    assert s.free == 1
    # The old holder is told to stop, then it may take the request again.
    items = h.d.take(s.id, now=12)
    assert items[0] == CancelItem(request_id="r1")
    assert isinstance(items[1], RequestItem)
    assert (items[1].request_id, items[1].attempt) == ("r1", 2)
    assert h.d.requests["r1"].dispatches == 2
    assert h.failures("r1") == []


def test_lease_expiry_keeps_fifo_when_several_expire_together() -> None:
    h = Harness(lease=10)
    s = h.register(capacity=2)
    h.submit("r1", now=0)
    h.submit("r2", now=1)
    assert h.take(s, now=2) == ["r1", "r2"]
    h.d.tick(now=12)
    assert h.queued() == ["r1", "r2"]


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
    h.d.tick(now=11)
    assert h.d.requests["r1"].queue_deadline == 21
    h.d.tick(now=20.9)
    assert h.failures("r1") == []
    h.d.tick(now=21)
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
        assert h.d.requests["r1"].dispatches == dispatch
        now += 10
        h.d.tick(now)
        if dispatch <= max_redispatch:
            assert h.failures("r1") == []
    assert h.failures("r1") == [(502, "connector_lost")]
    assert "r1" not in h.d.requests
    assert h.d.queue_depth() == {}
    assert s.free == 1
    assert h.d.redispatched == max_redispatch


def test_acknowledged_request_is_never_redispatched() -> None:
    h = Harness(lease=10)
    s = h.register()
    h.submit("r1", now=0)
    h.take(s, now=0)
    h.d.ack(s.id, "r1", now=1)
    s.polling = 1
    h.d.tick(now=100)
    assert h.d.requests["r1"].state is State.ACTIVE
    assert h.d.redispatched == 0


# -- timeouts -------------------------------------------------------------------------------


def test_queue_wait_expiry_fails_with_503() -> None:
    h = Harness(queue_wait=30)
    s = h.register(capacity=1)
    s.active.add("busy")
    h.submit("r1", now=0)
    h.d.tick(now=29.9)
    assert h.failures("r1") == []
    h.d.tick(now=30)
    assert h.failures("r1") == [(503, "queue_timeout")]
    assert "r1" not in h.d.requests
    assert h.queued() == []


@pytest.mark.parametrize(
    ("timings", "head", "activity_at", "ok_at", "fail_at", "message"),
    [
        # first byte: counted from hand-out (t=1) to the upstream's head
        ({"first_byte_timeout": 5}, False, None, 5.9, 6, "did not answer"),
        # idle: counted from the last upload activity
        ({"idle_timeout": 10}, True, 3, 12.9, 13, "stalled"),
        # total: counted from submission (t=0), however active the upload is
        ({"total_timeout": 20, "idle_timeout": 5}, True, 18, 19.9, 20, "too long"),
    ],
)
def test_active_timeouts_fail_with_504(
    timings: dict[str, float],
    head: bool,
    activity_at: float | None,
    ok_at: float,
    fail_at: float,
    message: str,
) -> None:
    h = Harness(lease=1000, **timings)
    s = h.register()
    p = h.submit("r1", now=0)
    h.take(s, now=1)
    h.d.ack(s.id, "r1", now=1)
    p.head_received = head
    if activity_at is not None:
        p.last_activity = activity_at
    h.d.tick(now=ok_at)
    assert h.sinks["r1"].failures == []
    h.d.tick(now=fail_at)
    ((status, code, msg),) = h.sinks["r1"].failures
    assert (status, code) == (504, "timeout")
    assert message in msg
    assert "r1" not in h.d.requests
    assert s.free == 1


def test_first_byte_timeout_does_not_apply_once_head_arrived() -> None:
    h = Harness(first_byte_timeout=5, lease=1000)
    s = h.register()
    p = h.submit("r1", now=0)
    h.take(s, now=0)
    h.d.ack(s.id, "r1", now=1)
    p.head_received = True
    p.last_activity = 50
    h.d.tick(now=50)
    assert h.sinks["r1"].failures == []


# -- session liveness -----------------------------------------------------------------------


def test_session_ttl_expiry_when_not_polling() -> None:
    h = Harness(session_ttl=60, lease=1000)
    s = h.register(now=0, capacity=2)
    h.submit("leased", now=0)
    h.submit("active", now=0)
    h.take(s, now=0)
    h.d.ack(s.id, "active", now=0)
    h.d.tick(now=60)
    assert s.id in h.d.sessions
    h.d.tick(now=60.5)
    assert s.id not in h.d.sessions
    assert h.d.live_models() == {}
    assert h.d.requests["leased"].state is State.QUEUED
    assert h.failures("active") == [(502, "connector_lost")]


def test_polling_session_never_expires() -> None:
    h = Harness(session_ttl=60)
    s = h.register(now=0)
    s.polling = 1
    h.d.tick(now=10_000)
    assert s.id in h.d.sessions
    s.polling = 0
    h.d.tick(now=10_001)
    assert s.id not in h.d.sessions


def test_take_keeps_session_alive() -> None:
    h = Harness(session_ttl=60)
    s = h.register(now=0)
    h.take(s, now=50)
    h.d.tick(now=100)
    assert s.id in h.d.sessions
    h.d.tick(now=111)
    assert s.id not in h.d.sessions


# -- cancel and finish ----------------------------------------------------------------------


def test_cancel_queued_removes_it() -> None:
    h = Harness()
    s = h.register()
    s.active.add("busy")
    h.submit("r1", now=0)
    h.submit("r2", now=1)
    h.woken.clear()
    h.d.cancel("r1")
    assert h.queued() == ["r2"]
    assert "r1" not in h.d.requests
    assert h.d.is_cancelled("r1")
    assert s.cancels == []
    assert h.sinks["r1"].failures == []


def test_cancel_leased_frees_slot_and_queues_cancel_item() -> None:
    h = Harness()
    s = h.register()
    h.submit("r1", now=0)
    h.submit("r2", now=1)
    h.take(s, now=2)
    h.woken.clear()
    h.d.cancel("r1")
    assert s.free == 1
    assert "r1" not in h.d.requests
    assert s.id in h.woken
    assert h.take(s, now=3) == ["cancel:r1", "r2"]


def test_cancel_active_marks_done_and_sends_cancel() -> None:
    h = Harness()
    s = h.register()
    h.submit("r1", now=0)
    h.take(s, now=1)
    h.d.ack(s.id, "r1", now=2)
    assert not h.d.is_cancelled("r1")
    h.woken.clear()
    h.d.cancel("r1")
    assert h.d.is_cancelled("r1")
    assert h.d.requests["r1"].state is State.DONE
    assert s.free == 0  # the upload handler frees the slot when it sees the cancel
    assert h.woken == [s.id]
    assert h.take(s, now=3) == ["cancel:r1"]
    h.d.finish("r1")
    assert s.free == 1
    assert "r1" not in h.d.requests


def test_cancelled_active_request_does_not_time_out() -> None:
    h = Harness(idle_timeout=1)
    s = h.register()
    h.submit("r1", now=0)
    h.take(s, now=0)
    h.d.ack(s.id, "r1", now=0)
    h.d.cancel("r1")
    s.polling = 1
    h.d.tick(now=100)
    assert h.sinks["r1"].failures == []
    assert h.d.requests["r1"].state is State.DONE


def test_cancel_unknown_is_a_no_op() -> None:
    h = Harness()
    h.d.cancel("nope")
    assert h.d.is_cancelled("nope")
    assert h.woken == []


def test_finish_frees_slot_and_wakes_session() -> None:
    h = Harness()
    s = h.register()
    h.submit("r1")
    h.take(s)
    h.d.ack(s.id, "r1", now=1)
    h.woken.clear()
    h.d.finish("r1")
    assert s.free == 1
    assert h.woken == [s.id]
    assert h.d.in_flight() == 0
    h.d.finish("r1")  # twice is harmless
    assert h.woken == [s.id]


def test_finish_queued_removes_from_queue_without_waking() -> None:
    h = Harness()
    s = h.register()
    s.active.add("busy")
    h.submit("r1")
    h.woken.clear()
    h.d.finish("r1")
    assert h.queued() == []
    assert h.woken == []


# -- draining and views ---------------------------------------------------------------------


def test_draining_hands_out_only_cancels() -> None:
    h = Harness()
    s = h.register(capacity=3)
    h.submit("r1", now=0)
    h.submit("r2", now=1)
    h.take(s, now=2)
    h.d.cancel("r1")
    h.d.draining = True
    with pytest.raises(Draining):
        h.submit("r3", now=3)
    assert h.take(s, now=4) == ["cancel:r1"]
    assert h.d.requests["r2"].state is State.LEASED


def test_draining_leaves_queued_work_queued() -> None:
    h = Harness()
    s = h.register(capacity=3)
    h.submit("r1")
    h.d.draining = True
    assert h.take(s, now=1) == []
    assert h.queued() == ["r1"]


def test_views() -> None:
    h = Harness()
    busy = h.register("c1", ["a", "b"])
    busy.active.add("x")
    h.register("c2", ["b"])
    assert {k: sorted(v) for k, v in h.d.live_models().items()} == {
        "a": ["c1"],
        "b": ["c1", "c2"],
    }
    assert h.d.queue_depth() == {}
    h.submit("r1", "a")
    h.submit("r2", "a")
    assert h.d.queue_depth() == {"a": 2}
    assert h.d.in_flight() == 2
    h.d.cancel("r1")
    h.d.cancel("r2")
    assert h.d.queue_depth() == {}  # empty queues are not listed
    assert h.d.in_flight() == 0
