"""Anthropic's shape without I/O: usage across any chunking, errors, rate headers, routes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker.core.anthropic import ANTHROPIC, AnthropicUsage, error_type
from broker.core.demand import ask_of
from broker.core.errors import BrokerError
from broker.core.limits import RateInfo
from broker.core.rate_headers import anthropic_rate_headers, rfc3339
from broker.core.records import Failure, Pending, State
from broker.core.response import Begin, Body, Close, ResponseMachine
from broker.core.route_shapes import shape_for
from broker.core.shape import OPENAI
from shared.bench.messages import sse
from shared.protocol import RequestItem, ResponseEnd, ResponseHead

START = sse(
    "message_start",
    {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "usage": {"input_tokens": 9, "cache_read_input_tokens": 4, "output_tokens": 1},
        },
    },
)
DELTAS = [
    sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                "delta": {"type": "text_delta", "text": f"w{i} usage"}})
    for i in range(3)
]  # fmt: skip
END = sse(
    "message_delta",
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}},
) + sse("message_stop", {"type": "message_stop"})
STREAM = START + sse("ping", {"type": "ping"}) + b"".join(DELTAS) + END


def read(chunks: list[bytes]) -> AnthropicUsage:
    usage = AnthropicUsage()
    out = b"".join(usage.feed(chunk) for chunk in chunks) + usage.finish()
    assert out == b"".join(chunks)  # every byte passes unchanged
    return usage


@pytest.mark.parametrize("cut", range(0, len(STREAM), 7))
def test_usage_is_read_wherever_the_stream_is_cut(cut: int) -> None:
    usage = read([STREAM[:cut], STREAM[cut:]])
    assert (usage.tokens_in, usage.tokens_out, usage.exact) == (13, 3, True)  # 9 + 4 cached
    assert usage.deltas == 3


def test_usage_byte_by_byte_and_with_crlf() -> None:
    usage = read([bytes([b]) for b in STREAM])
    assert (usage.tokens_in, usage.tokens_out, usage.deltas) == (13, 3, 3)
    crlf = STREAM.replace(b"\n", b"\r\n")
    usage = read([crlf[:100], crlf[100:]])
    assert (usage.tokens_in, usage.tokens_out) == (13, 3)


def test_a_stream_cut_before_its_message_delta_is_not_exact() -> None:
    usage = read([START, *DELTAS])
    assert (usage.tokens_in, usage.tokens_out, usage.exact, usage.deltas) == (13, None, False, 3)


def test_whole_answers_count_tokens_and_estimates() -> None:
    whole = {
        "type": "message",
        "content": [
            {"type": "text", "text": "abcdefgh"},
            {"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}},
        ],
        "usage": {"input_tokens": 11, "output_tokens": 5},
    }
    raw = json.dumps(whole).encode()
    assert ANTHROPIC.whole_usage(raw) == (11, 5)
    assert ANTHROPIC.whole_usage(b'{"input_tokens": 42}') == (0, 0)  # count_tokens
    assert ANTHROPIC.whole_usage(b"not json") == (None, None)
    del whole["usage"]
    assert ANTHROPIC.whole_usage(json.dumps(whole).encode()) == (None, None)
    # 8 bytes of text + 8 of tool input ('{"a": 1}'): 16 / 4
    assert ANTHROPIC.estimate_completion(json.dumps(whole).encode()) == 4


@pytest.mark.parametrize(
    ("status", "type_"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (405, "invalid_request_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (504, "api_error"),
        (529, "overloaded_error"),
    ],
)
def test_error_types_follow_the_status(status: int, type_: str) -> None:
    assert error_type(status) == type_
    body = json.loads(ANTHROPIC.error_body(BrokerError(status, "no"), "rid-1"))
    assert body == {
        "type": "error",
        "error": {"type": type_, "message": "no"},
        "request_id": "rid-1",
    }


def test_a_stream_error_is_an_error_event_after_a_blank_line() -> None:
    error = BrokerError(502, "the connector failed")
    event = ANTHROPIC.stream_error(error, b'{"partial')
    assert event.startswith(b"\n\nevent: error\ndata: ")
    assert b"[DONE]" not in event
    data = json.loads(event.split(b"data: ", 1)[1])
    assert data["error"] == {"type": "api_error", "message": "the connector failed"}
    assert ANTHROPIC.stream_error(error, b"}\n\n").startswith(b"event: error\n")


@pytest.mark.parametrize(
    ("raw", "status", "expected"),
    [
        (b'{"error": {"code": 500, "message": "boom", "type": "server_error"}}', 500,
         {"type": "api_error", "message": "boom"}),
        (b'{"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}', 529,
         {"type": "overloaded_error", "message": "busy"}),
        (b"plain text", 400, {"type": "invalid_request_error", "message": "plain text"}),
    ],
)  # fmt: skip
def test_upstream_errors_are_normalised(raw: bytes, status: int, expected: dict[str, Any]) -> None:
    assert json.loads(ANTHROPIC.upstream_error(raw, status)) == {"type": "error", "error": expected}


def test_rate_headers_are_anthropics_with_times() -> None:
    info = RateInfo(5, 4, 12.0, 1000, 900, 60.0)
    now = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    assert anthropic_rate_headers(info, now) == {
        "anthropic-ratelimit-requests-limit": "5",
        "anthropic-ratelimit-requests-remaining": "4",
        "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:12Z",
        "anthropic-ratelimit-tokens-limit": "1000",
        "anthropic-ratelimit-tokens-remaining": "900",
        "anthropic-ratelimit-tokens-reset": "2026-01-01T00:01:00Z",
    }
    assert anthropic_rate_headers(RateInfo(), now) == {}
    assert rfc3339(now) == "2026-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/v1/messages", ANTHROPIC),
        ("/v1/messages/count_tokens", ANTHROPIC),
        ("/v1/messages/", ANTHROPIC),
        ("/v1/messagesx", OPENAI),
        ("/v1/chat/completions", OPENAI),
        ("/v1/models", OPENAI),
        ("", OPENAI),
    ],
)
def test_the_route_decides_the_shape(path: str, shape: object) -> None:
    assert shape_for(path) is shape


def _machine() -> ResponseMachine:
    item = RequestItem(request_id="r", model="m", path="/v1/messages", body="{}")
    pending = Pending(item=item, created=0, queue_deadline=60, total_deadline=3600, seq=0,
                      state=State.ACTIVE, leased_at=0)  # fmt: skip
    return ResponseMachine(
        pending=pending, stream=True, started=0, commit_after=10, heartbeat=5, shape=ANTHROPIC
    )


def test_the_machine_ends_a_failed_stream_with_an_error_event_and_counts_usage() -> None:
    m = _machine()
    head = ResponseHead(status=200, headers=[("Content-Type", "text/event-stream")])
    out = m.feed([head, START, DELTAS[0][:20]], 1)
    assert isinstance(out[0], Begin)
    out = m.feed([Failure(502, "connector_lost", "the connector went away")], 2)
    body, close = out
    assert isinstance(body, Body) and isinstance(close, Close)
    assert body.data.startswith(b"\n\nevent: error\ndata: ")
    assert m.outcome.partial and m.outcome.tokens_in == 13 and m.outcome.status == 502


def test_the_machine_reads_a_whole_streams_usage() -> None:
    m = _machine()
    head = ResponseHead(status=200, headers=[("Content-Type", "text/event-stream")])
    m.feed([head, STREAM, ResponseEnd()], 1)
    outcome = m.outcome
    assert (outcome.tokens_in, outcome.tokens_out, outcome.estimated) == (13, 3, False)


def test_the_prompt_estimate_counts_anthropics_system_prompt() -> None:
    body = {
        "system": [{"type": "text", "text": "abcdefgh"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "abcd"}]}],
    }
    assert ask_of(body).prompt == 3 + 4  # 12 bytes / 4, + 4 for the one message
    assert ask_of({**body, "system": "abcdefgh"}).prompt == 3 + 4
