"""The API user's side of a relayed request: events and times in, Begin/Body/Close out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker.core import Failure, Pending, State
from broker.core.response import (
    DONE_EVENT,
    KEEPALIVE_COMMENT,
    WAITING_COMMENT,
    Action,
    Begin,
    Body,
    Close,
    Event,
    Phase,
    ResponseMachine,
)
from shared.protocol import (
    OVERHEAD_HEADER,
    REQUEST_ID_HEADER,
    RequestItem,
    ResponseEnd,
    ResponseHead,
)

RID = "req_1"
USAGE = b'{"usage": {"prompt_tokens": 3, "completion_tokens": 7}}'
USAGE_EVENT = b"data: " + USAGE + b"\n\n"
JSON_HEAD = ResponseHead(
    status=200,
    headers=[
        ("Content-Type", "application/json"),
        ("Content-Length", "999"),
        ("Transfer-Encoding", "chunked"),
        ("x-request-id", "upstream-id"),
        ("X-Upstream", "kept"),
    ],
)
SSE_HEAD = ResponseHead(status=200, headers=[("Content-Type", "text/event-stream")])


def pending(created: float = 0.0, leased_at: float = 0.0) -> Pending:
    item = RequestItem(request_id=RID, model="m", path="/v1/chat/completions", body="{}")
    return Pending(
        item=item,
        created=created,
        queue_deadline=created + 60,
        total_deadline=created + 3600,
        seq=0,
        state=State.ACTIVE,
        leased_at=leased_at,
    )


def machine(
    stream: bool,
    *,
    started: float = 0.0,
    commit_after: float = 10.0,
    heartbeat: float = 5.0,
    created: float | None = None,
    leased_at: float = 0.0,
) -> ResponseMachine:
    return ResponseMachine(
        pending=pending(started if created is None else created, leased_at),
        stream=stream,
        started=started,
        commit_after=commit_after,
        heartbeat=heartbeat,
    )


def error_of(data: bytes) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(data)
    return parsed["error"]  # type: ignore[no-any-return]


def sse_error_of(data: bytes) -> dict[str, Any]:
    """The error of an in-band ``data: {"error": ...}`` event followed by [DONE]."""
    assert data.endswith(b"\n\n" + DONE_EVENT)
    events = [e for e in data.split(b"\n\n") if e]
    assert events[-1] == DONE_EVENT.strip()
    assert events[-2].startswith(b"data: ")
    return error_of(events[-2][len(b"data: ") :])


# -- non-streaming ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "feeds",
    [
        # (time, events) per feed: however the frames arrive, the answer comes at the end
        [(5, [JSON_HEAD]), (6, [b'{"a": 1, ', USAGE[1:]]), (7, [ResponseEnd()])],
        [(5, [JSON_HEAD, b'{"a": 1, ']), (6, [USAGE[1:]]), (7, [ResponseEnd()])],
        [(7, [JSON_HEAD, b'{"a": 1, ', USAGE[1:], ResponseEnd()])],
        [(5, [JSON_HEAD]), (6, [b'{"a": 1, ']), (6.5, [USAGE[1:]]), (7, [ResponseEnd()])],
    ],
    ids=["head-body-end", "split", "one-feed", "many-feeds"],
)
def test_non_streaming_ok_is_answered_whole_at_the_end(
    feeds: list[tuple[float, list[Event]]],
) -> None:
    m = machine(stream=False)
    out: list[Action] = []
    for when, events in feeds[:-1]:
        assert m.feed(events, when) == []
        assert m.next_deadline() is None  # no heartbeats: nothing is sent before the end
    when, events = feeds[-1]
    out = m.feed(events, when)
    raw = b'{"a": 1, ' + USAGE[1:]
    assert len(out) == 3
    begin, body, close = out
    assert isinstance(begin, Begin)
    assert begin.status == 200
    assert begin.headers[REQUEST_ID_HEADER] == RID  # ours, not the upstream's
    assert OVERHEAD_HEADER in begin.headers
    assert begin.headers["Content-Type"] == "application/json"
    assert "X-Upstream" not in begin.headers  # not on the allowlist
    lowered = {k.lower() for k in begin.headers}
    assert not lowered & {"content-length", "transfer-encoding"}
    assert "Cache-Control" not in begin.headers
    assert body == Body(raw)
    assert close == Close()
    assert m.done
    o = m.outcome
    assert (o.status, o.tokens_in, o.tokens_out, o.bytes_out) == (200, 3, 7, len(raw))
    assert o.ttfb_ms == 7000.0
    assert (o.error, o.cancelled) == (None, False)
    assert m.feed([b"late"], 8) == []  # after the end, nothing more


@pytest.mark.parametrize(
    ("raw", "tokens", "estimated"),
    [
        (USAGE, (3, 7), False),
        # no usage: the prompt estimate and the answer's characters / 4
        (b'{"choices": []}', (None, 0), True),
        (b'{"choices": [{"message": {"content": "123456789"}}]}', (None, 3), True),
        (b'{"usage": {"prompt_tokens": 12}}', (12, 0), False),  # embeddings: nothing out
        # the last usage object wins
        (
            b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "x": '
            b'{"prompt_tokens": 5, "completion_tokens": 6}}',
            (5, 6),
            False,
        ),
    ],
)
def test_tokens_from_the_usage_object(
    raw: bytes, tokens: tuple[int | None, int | None], estimated: bool
) -> None:
    m = machine(stream=False)
    m.feed([JSON_HEAD, raw, ResponseEnd()], 1)
    assert (m.outcome.tokens_in, m.outcome.tokens_out) == tokens
    assert (m.outcome.estimated, m.outcome.partial) == (estimated, False)


# -- streaming ----------------------------------------------------------------------------


def test_streaming_begins_at_the_head_with_sse_headers() -> None:
    m = machine(stream=True)
    (begin,) = m.feed([SSE_HEAD], 2)
    assert isinstance(begin, Begin)
    assert begin.status == 200
    assert begin.headers["Cache-Control"] == "no-cache"
    assert begin.headers["X-Accel-Buffering"] == "no"
    assert begin.headers["Content-Type"] == "text/event-stream"
    assert begin.headers[REQUEST_ID_HEADER] == RID
    assert OVERHEAD_HEADER in begin.headers
    assert m.begun
    assert m.next_deadline() is None  # streaming: no broker heartbeats


@pytest.mark.parametrize(
    ("feeds", "bodies"),
    [
        # consecutive bytes in one feed go out as one Body
        ([[b"data: 1\n\n", b"data: 2\n\n"]], [b"data: 1\n\ndata: 2\n\n"]),
        ([[b"data: 1\n\n"], [b"data: 2\n\n"]], [b"data: 1\n\n", b"data: 2\n\n"]),
        ([[b"da", b"ta: 1", b"\n\n"], [b"data: 2\n\n"]], [b"data: 1\n\n", b"data: 2\n\n"]),
        ([[b"data: 1\n\n"]], [b"data: 1\n\n"]),
    ],
)
def test_streaming_passes_each_batch_as_one_body(
    feeds: list[list[bytes]], bodies: list[bytes]
) -> None:
    m = machine(stream=True)
    m.feed([SSE_HEAD], 1)
    out: list[Action] = []
    for n, batch in enumerate(feeds):
        got = m.feed(list(batch), 2 + n)
        assert len(got) == 1
        out += got
    assert out == [Body(b) for b in bodies]
    assert all(isinstance(a, Body) and a.upstream for a in out)
    assert m.feed([USAGE_EVENT, DONE_EVENT, ResponseEnd()], 9) == [
        Body(USAGE_EVENT + DONE_EVENT),
        Close(),
    ]
    o = m.outcome
    assert (o.status, o.tokens_in, o.tokens_out) == (200, 3, 7)
    assert o.bytes_out == sum(map(len, bodies)) + len(USAGE_EVENT + DONE_EVENT)
    assert o.ttfb_ms == 2000.0  # the first body, not the head
    assert m.done


def test_streaming_in_one_feed() -> None:
    m = machine(stream=True)
    out = m.feed([SSE_HEAD, b"data: 1\n\n", b"data: 2\n\n", ResponseEnd()], 3)
    assert [type(a) for a in out] == [Begin, Body, Close]
    assert out[1] == Body(b"data: 1\n\ndata: 2\n\n")


def test_streaming_keeps_the_upstream_status() -> None:
    m = machine(stream=True)
    (begin,) = m.feed([ResponseHead(status=201, headers=[])], 1)
    assert isinstance(begin, Begin)
    assert begin.status == 201
    m.feed([b"data: x\n\n", ResponseEnd()], 2)
    assert m.outcome.status == 201


def test_a_second_head_is_ignored() -> None:
    m = machine(stream=True)
    m.feed([SSE_HEAD], 1)
    assert m.feed([ResponseHead(status=500)], 2) == []
    assert m.phase is Phase.STREAMING


# -- commit after -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("started", "commit_after", "heartbeat", "ticks", "expected"),
    [
        # (tick time, what it sends): "begin" = Begin + waiting comment, "beat" = keepalive
        (0, 10, 5, [(9.9, None), (10, "begin"), (14.9, None), (15, "beat"), (20, "beat")], 25),
        (100, 2, 1, [(101, None), (102.5, "begin"), (103, None), (103.5, "beat")], 104.5),
        # a late tick moves the next beat from when it ran
        (0, 1, 3, [(1, "begin"), (10, "beat"), (12.9, None), (13, "beat")], 16),
    ],
)
def test_commit_after_then_heartbeats(
    started: float,
    commit_after: float,
    heartbeat: float,
    ticks: list[tuple[float, str | None]],
    expected: float,
) -> None:
    m = machine(True, started=started, commit_after=commit_after, heartbeat=heartbeat)
    assert m.next_deadline() == started + commit_after
    for when, sends in ticks:
        out = m.tick(when)
        if sends is None:
            assert out == [], when
        elif sends == "begin":
            begin, comment = out
            assert isinstance(begin, Begin)
            assert begin.status == 200
            assert begin.headers["Content-Type"] == "text/event-stream"
            assert begin.headers["Cache-Control"] == "no-cache"
            assert begin.headers["X-Accel-Buffering"] == "no"
            assert begin.headers[REQUEST_ID_HEADER] == RID
            assert comment == Body(WAITING_COMMENT, upstream=False)
            assert comment.data.startswith(b": waiting")
            assert m.begun
        else:
            assert out == [Body(KEEPALIVE_COMMENT, upstream=False)], when
    assert m.next_deadline() == expected
    # The head then streams without a second Begin.
    last = ticks[-1][0]
    assert m.feed([SSE_HEAD, b"data: 1\n\n"], last + 0.5) == [Body(b"data: 1\n\n")]
    assert m.next_deadline() is None
    assert m.feed([ResponseEnd()], last + 1) == [Close()]
    assert m.outcome.status == 200


def test_non_streaming_never_commits() -> None:
    m = machine(stream=False, commit_after=1)
    assert m.next_deadline() is None
    assert m.tick(1000) == []
    assert not m.begun


def test_head_in_time_means_no_commit() -> None:
    m = machine(stream=True, commit_after=10)
    m.feed([SSE_HEAD], 9)
    assert m.tick(10) == []


# -- upstream errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "raw", "headers", "message", "code"),
    [
        (429, b'{"error": {"message": "slow down", "code": 42}}', [("Retry-After", "7")],
         "slow down", "42"),
        (400, b'{"error": "bad prompt"}', [], "bad prompt", None),
        (500, b"plain text crash", [], "plain text crash", None),
        (503, b"", [("retry-after", "30")], "upstream returned HTTP 503", None),
        (404, b'{"detail": "no such model"}', [], "no such model", None),
    ],
)  # fmt: skip
@pytest.mark.parametrize("mode", ["non-streaming", "streaming", "committed"])
def test_upstream_error_is_normalised(
    mode: str, status: int, raw: bytes, headers: list[tuple[str, str]], message: str, code: str
) -> None:
    m = machine(stream=mode != "non-streaming", commit_after=1)
    if mode == "committed":
        assert len(m.tick(1)) == 2
    head = ResponseHead(status=status, headers=[("Content-Type", "text/plain"), *headers])
    assert m.feed([head, raw[:3]], 2) == []  # collected: an error is answered whole
    out = m.feed([raw[3:], ResponseEnd()], 3)
    if mode == "committed":
        body, close = out
        assert isinstance(body, Body)
        assert not body.upstream
        error = sse_error_of(body.data)
    else:
        begin, body, close = out
        assert isinstance(begin, Begin)
        assert isinstance(body, Body)
        assert begin.status == status
        assert begin.headers["Content-Type"] == "application/json"
        assert begin.headers[REQUEST_ID_HEADER] == RID
        retry = dict((k.lower(), v) for k, v in headers).get("retry-after")
        assert begin.headers.get("Retry-After") == retry
        error = error_of(body.data)
    assert close == Close()
    assert error["message"] == message
    assert error["code"] == code
    assert set(error) == {"message", "type", "param", "code"}
    assert (m.outcome.status, m.outcome.error) == (status, "upstream_status")


# -- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "after_head", "failure", "retry_after"),
    [
        (False, False, Failure(503, "queue_timeout", "no connector became free"), "1"),
        (False, False, Failure(504, "timeout", "the request took too long"), None),
        (False, True, Failure(502, "connector_lost", "the connector went away"), None),
        (True, False, Failure(503, "no_connector", "gone"), "1"),
        (True, False, Failure(504, "timeout", "the local LLM did not answer"), None),
    ],
)
def test_failure_before_begin_is_a_json_error(
    stream: bool, after_head: bool, failure: Failure, retry_after: str | None
) -> None:
    m = machine(stream=stream)
    if after_head:
        m.feed([JSON_HEAD, b'{"partial": '], 1)
    begin, body, close = m.feed([failure], 2)
    assert isinstance(begin, Begin)
    assert isinstance(body, Body)
    assert begin.status == failure.status
    assert begin.headers["Content-Type"] == "application/json"
    assert begin.headers[REQUEST_ID_HEADER] == RID
    assert begin.headers.get("Retry-After") == retry_after
    assert not body.upstream
    error = error_of(body.data)
    assert (error["message"], error["code"]) == (failure.message, failure.code)
    assert close == Close()
    assert (m.outcome.status, m.outcome.error) == (failure.status, failure.code)


@pytest.mark.parametrize(
    ("sent", "blank_line_first"),
    [
        ([b"data: 1\n\n"], False),
        ([b'data: 1\n\ndata: {"par'], True),  # stopped mid-event
        ([b"data: 1\n"], True),
        ([b"data: 1\n\n", b"data: 2"], True),
        ([], False),  # committed, only comments sent
    ],
)
def test_failure_after_the_stream_began_is_an_sse_error(
    sent: list[bytes], blank_line_first: bool
) -> None:
    m = machine(stream=True, commit_after=1)
    if sent:
        m.feed([SSE_HEAD], 0.5)
        for n, chunk in enumerate(sent):
            m.feed([chunk], 0.6 + n / 10)
    else:
        m.tick(1)
    body, close = m.feed([Failure(504, "timeout", "the response stalled")], 5)
    assert isinstance(body, Body)
    assert not body.upstream
    assert body.data.startswith(b"\n\n") is blank_line_first
    error = sse_error_of(body.data.lstrip(b"\n"))
    assert (error["message"], error["code"]) == ("the response stalled", "timeout")
    assert error["type"] == "server_error"
    assert close == Close()
    assert (m.outcome.status, m.outcome.error) == (504, "timeout")
    assert m.feed([b"more", ResponseEnd()], 6) == []


@pytest.mark.parametrize(
    ("events", "status", "code"),
    [
        ([ResponseEnd()], 502, "bad_upload"),  # ended without a head
        ([ResponseEnd(ok=False, error="boom", status=503)], 503, "upstream_error"),
        ([ResponseEnd(ok=False, error="boom", error_type="upstream_timeout")], 502,
         "upstream_timeout"),
        ([JSON_HEAD, b"{", ResponseEnd(ok=False, error="cut", status=502)], 502,
         "upstream_error"),
    ],
)  # fmt: skip
def test_bad_end_before_begin(events: list[Event], status: int, code: str) -> None:
    m = machine(stream=False)
    begin, body, close = m.feed(events, 1)
    assert isinstance(begin, Begin)
    assert isinstance(body, Body)
    assert close == Close()
    assert begin.status == status
    assert error_of(body.data)["code"] == code
    assert (m.outcome.status, m.outcome.error) == (status, code)


def test_bad_end_while_streaming_is_an_sse_error() -> None:
    m = machine(stream=True)
    m.feed([SSE_HEAD, b"data: 1\n\n"], 1)
    body, close = m.feed([ResponseEnd(ok=False, error="connection reset", status=502)], 2)
    assert isinstance(body, Body)
    # The broker's own text, never the connector's.
    assert sse_error_of(body.data)["message"] == "the local LLM failed"
    assert close == Close()
    assert m.outcome.status == 502


# -- abandon ------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["waiting", "committed", "streaming", "collecting"])
def test_abandon_is_499_cancelled(stage: str) -> None:
    m = machine(stream=stage != "collecting", commit_after=1)
    if stage == "committed":
        m.tick(1)
    elif stage == "streaming":
        m.feed([SSE_HEAD, b"data: 1\n\n"], 0.5)
    elif stage == "collecting":
        m.feed([JSON_HEAD, b"{"], 0.5)
    m.abandon()
    assert m.done
    o = m.outcome
    assert (o.status, o.cancelled, o.error) == (499, True, "client_disconnected")
    assert m.feed([ResponseEnd()], 2) == []
    assert m.tick(100) == []


def test_abandon_after_the_end_changes_nothing() -> None:
    m = machine(stream=False)
    m.feed([JSON_HEAD, b"{}", ResponseEnd()], 1)
    m.abandon()
    assert (m.outcome.status, m.outcome.cancelled) == (200, False)


# -- timing figures -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("created", "leased_at", "head_at", "upstream_ms", "overhead"),
    [
        # overhead = elapsed - queue time (leased_at - created) - upstream_ms
        (0, 2, 5, 2500, 500.0),
        (0, 0, 5, 5000, 0.0),
        (10, 13, 14.5, 1000, 500.0),
        (0, 2, 5, 9000, 0.0),  # never negative
    ],
)
def test_overhead_on_a_stream(
    created: float, leased_at: float, head_at: float, upstream_ms: float, overhead: float
) -> None:
    m = machine(True, started=created, created=created, leased_at=leased_at, commit_after=100)
    (begin,) = m.feed([ResponseHead(status=200, upstream_ms=upstream_ms)], head_at)
    assert isinstance(begin, Begin)
    assert m.outcome.overhead_ms == overhead
    assert begin.headers[OVERHEAD_HEADER] == f"{overhead:.3f}"
    m.feed([b"data: 1\n\n"], head_at + 1.5)
    assert m.outcome.ttfb_ms == (head_at + 1.5 - created) * 1000


@pytest.mark.parametrize(
    ("end_at", "end_ms", "head_ms", "overhead"),
    [
        (7, 4000, 0, 1000.0),  # (7 - 2) s less 4 s upstream
        (7, 0, 4500, 500.0),  # the head's figure when the end has none
        (3, 1000, 0, 0.0),
    ],
)
def test_overhead_non_streaming_uses_the_end_frame(
    end_at: float, end_ms: float, head_ms: float, overhead: float
) -> None:
    m = machine(False, leased_at=2)
    m.feed([ResponseHead(status=200, upstream_ms=head_ms), b"{}"], 2.5)
    begin, _, _ = m.feed([ResponseEnd(upstream_ms=end_ms)], end_at)
    assert isinstance(begin, Begin)
    assert begin.headers[OVERHEAD_HEADER] == f"{overhead:.3f}"
    assert m.outcome.overhead_ms == overhead
    assert m.outcome.ttfb_ms == end_at * 1000


# -- extra headers (the rate-limit headers) -----------------------------------------------

LIMIT_HEADERS = {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59"}


def _begins(m: ResponseMachine, feeds: list[tuple[float, list[Event]]]) -> list[Begin]:
    out: list[Action] = []
    for now, events in feeds:
        out += m.feed(events, now)
        out += m.tick(now)
    return [a for a in out if isinstance(a, Begin)]


@pytest.mark.parametrize(
    ("stream", "feeds"),
    [
        (False, [(1, [JSON_HEAD, b"{}", ResponseEnd()])]),  # whole answer
        (True, [(1, [SSE_HEAD, b"data: x\n\n", ResponseEnd()])]),  # stream
        (True, [(11, [])]),  # committed to 200 before the head
        (False, [(1, [Failure(503, "queue_timeout", "no connector")])]),  # the relay's error
        (False, [(1, [ResponseHead(status=500, headers=[]), b"{}", ResponseEnd()])]),  # upstream's
    ],
    ids=["whole", "stream", "committed", "failure", "upstream-error"],
)
def test_extra_headers_go_on_every_status(
    stream: bool, feeds: list[tuple[float, list[Event]]]
) -> None:
    m = ResponseMachine(
        pending=pending(),
        stream=stream,
        started=0.0,
        commit_after=10.0,
        heartbeat=5.0,
        extra_headers=LIMIT_HEADERS,
    )
    (begin,) = _begins(m, feeds)
    assert begin.headers[REQUEST_ID_HEADER] == RID
    assert {k: begin.headers[k] for k in LIMIT_HEADERS} == LIMIT_HEADERS
