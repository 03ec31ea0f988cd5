"""Fair queueing: FIFO per user, round-robin between users (broker.core.queues)."""

from __future__ import annotations

import pytest

from broker.core import Pending, RelayCore, Timings
from broker.core.queues import ModelQueue
from shared.protocol import RequestItem
from tests.support.registrations import registration


def _pending(rid: str, user: str | None, seq: int) -> Pending:
    item = RequestItem(request_id=rid, model="m", path="/v1/chat/completions", body="{}")
    return Pending(
        item=item, created=0.0, queue_deadline=1e9, total_deadline=1e9, seq=seq, user=user
    )


def _drain(queue: ModelQueue) -> list[str]:
    out = []
    while queue:
        out.append(queue.pop().id)
    return out


@pytest.mark.parametrize(
    ("arrivals", "served"),
    [
        ([("a1", "A"), ("a2", "A"), ("a3", "A")], ["a1", "a2", "a3"]),  # one user: FIFO
        ([("a1", "A"), ("a2", "A"), ("b1", "B"), ("a3", "A")], ["a1", "b1", "a2", "a3"]),
        (
            [("a1", "A"), ("a2", "A"), ("b1", "B"), ("b2", "B"), ("c1", "C")],
            ["a1", "b1", "c1", "a2", "b2"],
        ),
        ([("x1", None), ("a1", "A"), ("x2", None)], ["x1", "a1", "x2"]),  # no user: one lane
    ],
)
def test_round_robin_between_users(
    arrivals: list[tuple[str, str | None]], served: list[str]
) -> None:
    queue = ModelQueue()
    for seq, (rid, user) in enumerate(arrivals):
        queue.append(_pending(rid, user, seq))
    assert len(queue) == len(arrivals)
    assert [p.id for p in queue] == served  # iteration shows the serving order
    assert _drain(queue) == served
    assert queue.peek() is None


def test_put_back_returns_to_its_place_and_its_user_goes_next() -> None:
    queue = ModelQueue()
    a = [_pending(f"a{i}", "A", i) for i in range(3)]
    b = _pending("b0", "B", 3)
    for p in [*a, b]:
        queue.append(p)
    assert queue.pop() is a[0]
    assert queue.pop() is b
    queue.put_back(a[0])  # its lease expired
    assert _drain(queue) == ["a0", "a1", "a2"]


def test_remove() -> None:
    queue = ModelQueue()
    a, b = _pending("a", "A", 0), _pending("b", "B", 1)
    queue.append(a)
    queue.append(b)
    assert queue.remove(a)
    assert not queue.remove(a)
    assert _drain(queue) == ["b"]


def test_one_users_burst_does_not_push_another_user_back() -> None:
    """User A queues 50 requests; user B's one request is served within two dispatches."""
    core = RelayCore(Timings(queue_max=1000), _Quiet())
    session, _ = core.register(registration("gpu"), now=0.0)
    for i in range(50):
        core.submit(_item(f"a{i}"), now=1.0, user="A")
    core.submit(_item("b0"), now=2.0, user="B")
    served = []
    for now in range(3, 6):
        (item,) = core.take(session.id, float(now))
        served.append(item.request_id)
        core.ack(session.id, item.request_id, float(now))
        core.finish(item.request_id)
    assert "b0" in served[:2], served
    assert served == ["a0", "b0", "a1"]


def _item(rid: str) -> RequestItem:
    return RequestItem(request_id=rid, model="m", path="/v1/chat/completions", body="{}")


class _Quiet:
    def wake(self, session_id: str) -> None: ...
    def failed(self, pending: object, failure: object) -> None: ...
    def session_dropped(self, session: object, reason: str) -> None: ...
    def slots_busy(self, model: str, capacities: object, waiting: int) -> None: ...
