"""The connector's status from its events (``connector.status``), and the waits and warnings
after failures (``connector.trouble``): no sockets, times passed in or from a fake clock."""

from __future__ import annotations

from dataclasses import FrozenInstanceError

import pytest
import structlog

from connector.errors import BrokerRejected, BrokerUnavailable
from connector.health import HealthServer
from connector.runner import Connector
from connector.settings import ConnectorSettings
from connector.status import (
    BrokerFailed,
    CapacityChanged,
    Event,
    LlmChecked,
    ModelsChanged,
    MuxGaveUp,
    PollAnswered,
    Registered,
    RequestFailed,
    RequestServed,
    SessionEnded,
    Status,
    StatusBoard,
    WorkReceived,
)
from connector.trouble import ClashWarner, Retries

REGISTERED = Registered("s-1", "mux", "stream", ("m1", "m2"))


def _fold(events: list[Event]) -> Status:
    status = Status()
    for event in events:
        status = status.apply(event)
    return status


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ([], {"session_id": None, "reconnects": 0, "served": 0, "models": []}),
        (
            [BrokerFailed("refused"), REGISTERED],
            {
                "session_id": "s-1",
                "upload_mode": "mux",
                "poll_mode": "stream",
                "models": ["m1", "m2"],
                "broker_error": None,
            },
        ),
        (
            [REGISTERED, SessionEnded()],
            {"session_id": None, "reconnects": 1, "poll_mode": "stream"},
        ),
        ([REGISTERED, SessionEnded(), SessionEnded()], {"reconnects": 2}),
        # Items from a streaming poll show the broker answers, but do not clear its error.
        ([BrokerFailed("cut"), WorkReceived(7.0)], {"last_poll_ok": 7.0, "broker_error": "cut"}),
        ([BrokerFailed("cut"), PollAnswered(9.5)], {"last_poll_ok": 9.5, "broker_error": None}),
        ([CapacityChanged(3, "props")], {"capacity": 3, "capacity_source": "props"}),
        ([REGISTERED, ModelsChanged(("m3",))], {"models": ["m3"], "session_id": "s-1"}),
        (
            [LlmChecked(False, "refused", 4.0)],
            {"llm_ok": False, "llm_error": "refused", "llm_checked": 4.0},
        ),
        (
            [LlmChecked(False, "x", 1.0), LlmChecked(True, None, 2.0)],
            {"llm_ok": True, "llm_error": None},
        ),
        ([REGISTERED, MuxGaveUp()], {"upload_mode": "stream"}),
        (
            [RequestServed(), RequestFailed(), RequestServed(), RequestServed()],
            {"served": 3, "failed": 1},
        ),
    ],
)
def test_events_fold_into_the_status(events: list[Event], expected: dict[str, object]) -> None:
    status = _fold(events)
    assert {name: getattr(status, name) for name in expected} == expected


def test_apply_leaves_the_old_status_alone() -> None:
    before = Status()
    after = before.apply(RequestServed())
    assert (before.served, after.served) == (0, 1)
    with pytest.raises(FrozenInstanceError):
        before.served = 2  # type: ignore[misc]


def test_the_board_keeps_the_latest_status() -> None:
    board = StatusBoard()
    for event in (REGISTERED, RequestServed(), SessionEnded()):
        board.emit(event)
    assert board.current == _fold([REGISTERED, RequestServed(), SessionEnded()])


async def test_health_json_is_read_from_the_status() -> None:
    settings = ConnectorSettings(broker_url="http://b", broker_token="t", name="box", capacity=2)
    connector = Connector(settings)
    try:
        for event in (REGISTERED, LlmChecked(True, None, 1.0), RequestFailed()):
            connector.board.emit(event)
        snap = HealthServer(connector, "127.0.0.1", 0).snapshot()
    finally:
        await connector.broker.aclose()
        await connector.upstream.aclose()
    assert snap["status"] == "ok"
    assert snap["relay"] == {
        "broker_url": "http://b",
        "connected": True,
        "session": "s-1",
        "upload_mode": "mux",
        "poll_mode": "stream",
        "last_poll_age_s": None,
        "error": None,
        "reconnects": 0,
    }
    assert (snap["models"], snap["capacity"], snap["capacity_source"]) == (
        ["m1", "m2"],
        2,
        "--capacity",
    )
    assert (snap["in_flight"], snap["served"], snap["failed"]) == (0, 0, 1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_unreachable_warns_for_the_first_tries_then_every_30_s() -> None:
    clock, board = FakeClock(), StatusBoard()
    retries = Retries(board.emit, clock)
    with structlog.testing.capture_logs() as logs:
        for _ in range(40):
            assert retries.after(BrokerUnavailable("ConnectError: refused")) <= 1.0
            clock.now += 1.0
    loud = [e["tries"] for e in logs if e["log_level"] == "warning"]
    assert loud == [1, 2, 3, 30]
    assert board.current.broker_error == "ConnectError: refused"


def test_a_rejected_token_waits_at_least_five_seconds() -> None:
    board = StatusBoard()
    retries = Retries(board.emit, FakeClock())
    with structlog.testing.capture_logs() as logs:
        assert retries.after(BrokerRejected("HTTP 401")) >= 5.0
    assert [e["event"] for e in logs] == ["broker_rejected"]


def test_a_lasting_clash_warns_once_a_minute() -> None:
    clock = FakeClock()
    clashes = ClashWarner("box:llm", clock)
    with structlog.testing.capture_logs() as logs:
        for where in ("registration", "poll", "upload", "poll"):
            clashes.warn(where)
            clock.now += 25.0
    assert [(e["seen_in"], e["clashes"]) for e in logs] == [("registration", 1), ("poll", 4)]
