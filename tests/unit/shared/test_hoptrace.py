"""Per-request hop marks (--trace-hops): first mark wins, one line per request, bounded."""

from __future__ import annotations

import structlog

from shared import hoptrace
from shared.hoptrace import HopTrace


def test_a_hop_keeps_its_first_time_and_the_line_is_logged_once() -> None:
    trace = HopTrace("broker")
    trace.mark("r1", "api_in")
    trace.mark("r1", "user_write")
    first = trace._open["r1"]["user_write"]
    trace.mark("r1", "user_write")  # a later chunk: ignored
    assert trace._open["r1"]["user_write"] == first
    assert trace._open["r1"]["api_in"] <= first
    with structlog.testing.capture_logs() as logs:
        trace.done("r1")
        trace.done("r1")  # already written: nothing
    assert [(e["event"], e["request_id"], e["side"]) for e in logs] == [
        ("hop_trace", "r1", "broker")
    ]
    assert list(logs[0]["marks"]) == ["api_in", "user_write"]


def test_first_marks_once_and_passes_every_value_on() -> None:
    trace = HopTrace("connector")
    seen: list[bytes] = []
    data = trace.first("r", "upstream_first_byte", seen.append)
    data(b"a")
    marked = trace._open["r"]["upstream_first_byte"]
    data(b"b")
    assert seen == [b"a", b"b"]
    assert trace._open["r"]["upstream_first_byte"] == marked


def test_requests_that_never_finish_are_bounded(monkeypatch) -> None:
    monkeypatch.setattr(hoptrace, "MAX_OPEN", 3)
    trace = HopTrace("connector")
    for i in range(5):
        trace.mark(f"r{i}", "poll_read")
    assert list(trace._open) == ["r2", "r3", "r4"]  # the oldest dropped
