"""Anthropic's Messages API through the relay, with the ``anthropic`` SDK as the client.

Real broker and connector in-process, the fake upstream speaking ``/v1/messages``
(``shared.bench.messages``): answers streamed and whole, tool use passed through byte for
byte, the broker's own errors in Anthropic's shape (a limit's 429, a wrong key, an
unknown model), a stream failing mid-way, an abort that reaches the upstream, and the
usage the upstream reported in the ledger, the limits and the metrics.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import anthropic
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.usage.query import RequestRow, recent_requests
from shared.bench import messages
from shared.bench.upstream import FakeLLM
from tests.support.net import wait_for
from tests.support.stack import USER_KEY, Stack

HI = [{"role": "user", "content": "hello there"}]
TOOLS: list[Any] = [
    {
        "name": "get_weather",
        "description": "The weather in a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
WRONG_KEY = "sk-" + "9" * 32


def sdk(stack: Stack, **kw: Any) -> anthropic.AsyncAnthropic:
    kw.setdefault("max_retries", 0)
    kw.setdefault("api_key", USER_KEY)
    return anthropic.AsyncAnthropic(base_url=stack.broker.url, **kw)


def x_api_key_sdk(stack: Stack, key: str) -> anthropic.AsyncAnthropic:
    """A client that sends its key only as ``x-api-key`` (as Claude Code with an API key)."""
    return anthropic.AsyncAnthropic(
        base_url=stack.broker.url, api_key=None, max_retries=0, default_headers={"x-api-key": key}
    )


def rows(stack: Stack) -> list[RequestRow]:
    return list(reversed(recent_requests(stack.broker.settings.usage_path)))  # oldest first


async def wait_rows(stack: Stack, n: int) -> list[RequestRow]:
    await wait_for(lambda: len(rows(stack)) >= n, timeout=10)
    return rows(stack)


async def token_metrics(stack: Stack) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=stack.broker.health_url) as health:
        text = (await health.get("/metrics")).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "remotellm_tokens":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    found[sample.labels["kind"]] = sample.value
    return found


async def test_whole_answer_and_count_tokens_with_their_usage(stack: Stack) -> None:
    async with sdk(stack) as client:
        answer = await client.messages.create(model="fake-model", max_tokens=4, messages=HI)
        counted = await client.messages.count_tokens(model="fake-model", messages=HI)
    assert answer.type == "message" and answer.stop_reason == "end_turn"
    assert answer.content[0].type == "text" and answer.content[0].text == "tok0 tok1 tok2 tok3 "
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (messages.INPUT_TOKENS, 4)
    assert counted.input_tokens == messages.INPUT_TOKENS
    whole, count = await wait_rows(stack, 2)
    assert (whole.status, whole.tokens_in, whole.tokens_out) == (200, messages.INPUT_TOKENS, 4)
    assert not whole.estimated and not whole.stream
    assert (count.status, count.tokens_in, count.tokens_out, count.estimated) == (200, 0, 0, False)
    assert await token_metrics(stack) == {"input": messages.INPUT_TOKENS, "output": 4}


async def test_streamed_answer_and_its_usage(stack: Stack) -> None:
    async with sdk(stack) as client:
        async with client.messages.stream(model="fake-model", max_tokens=6, messages=HI) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
    assert text == "".join(f"tok{i} " for i in range(6))
    assert (final.usage.input_tokens, final.usage.output_tokens) == (messages.INPUT_TOKENS, 6)
    (row,) = await wait_rows(stack, 1)
    assert (row.status, row.tokens_in, row.tokens_out) == (200, messages.INPUT_TOKENS, 6)
    assert row.stream and not row.estimated and not row.partial


async def test_tool_use_blocks_pass_unchanged(stack: Stack, fake_llm: FakeLLM) -> None:
    body = {"model": "fake-model", "max_tokens": 50, "messages": HI, "tools": TOOLS}
    async with sdk(stack) as client:
        whole = await client.messages.create(**body)
        async with client.messages.stream(**body) as stream:
            streamed = await stream.get_final_message()
    for answer in (whole, streamed):
        assert answer.stop_reason == "tool_use"
        call = answer.content[1]
        assert call.type == "tool_use"
        assert (call.id, call.name) == ("toolu_fake", "get_weather")
        assert call.input == messages.TOOL_INPUT
    assert fake_llm.seen[-1].body["tools"] == TOOLS  # the request's tools reached the engine
    # The stream's bytes are the upstream's, byte for byte.
    streaming = {**body, "stream": True}
    auth = {"x-api-key": USER_KEY, "anthropic-version": "2023-06-01"}
    async with httpx.AsyncClient(timeout=30) as http:
        direct = (await http.post(fake_llm.url + "/v1/messages", json=streaming)).content
        relayed = await http.post(stack.broker.url + "/v1/messages", json=streaming, headers=auth)
    assert relayed.status_code == 200 and relayed.content == direct
    assert fake_llm.seen[-1].headers["Anthropic-Version"] == "2023-06-01"


@pytest.mark.parametrize("broker_overrides", [{"rpm_limit": 1}])
async def test_a_limit_is_a_rate_limit_error_with_anthropics_headers(stack: Stack) -> None:
    async with sdk(stack) as client:
        first = await client.messages.with_raw_response.create(
            model="fake-model", max_tokens=2, messages=HI
        )
        with pytest.raises(anthropic.RateLimitError) as caught:
            await client.messages.create(model="fake-model", max_tokens=2, messages=HI)
    assert first.headers["anthropic-ratelimit-requests-limit"] == "1"
    assert first.headers["anthropic-ratelimit-requests-remaining"] == "0"
    reset = first.headers["anthropic-ratelimit-requests-reset"]
    assert RFC3339.match(reset)
    assert datetime.fromisoformat(reset) > datetime.now(UTC)  # when the budget is whole again
    assert "x-ratelimit-limit-requests" not in first.headers  # OpenAI's set is not sent here
    err = caught.value
    assert err.status_code == 429
    body = err.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"
    assert "requests per minute (RPM)" in body["error"]["message"]
    assert body["request_id"] == err.response.headers["x-request-id"]
    assert 1 <= int(err.response.headers["retry-after"]) <= 60
    assert err.response.headers["anthropic-ratelimit-requests-remaining"] == "0"


async def test_x_api_key_is_a_key_and_a_wrong_one_is_refused(stack: Stack) -> None:
    async with x_api_key_sdk(stack, USER_KEY) as client:
        answer = await client.messages.create(model="fake-model", max_tokens=2, messages=HI)
    assert answer.content[0].type == "text" and answer.content[0].text == "tok0 tok1 "
    async with x_api_key_sdk(stack, WRONG_KEY) as client:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await client.messages.create(model="fake-model", max_tokens=2, messages=HI)
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert body["error"]["message"] == "Incorrect API key provided."
    assert WRONG_KEY not in caught.value.response.text
    async with httpx.AsyncClient(base_url=stack.broker.url) as http:
        models = await http.get("/v1/models", headers={"x-api-key": USER_KEY})
    assert models.status_code == 200 and models.json()["data"][0]["id"] == "fake-model"


async def test_the_brokers_own_errors_are_in_anthropics_shape(stack: Stack) -> None:
    async with sdk(stack) as client:
        with pytest.raises(anthropic.NotFoundError) as unknown:
            await client.messages.create(model="no-such-model", max_tokens=2, messages=HI)
        with pytest.raises(anthropic.InternalServerError) as upstream:
            await client.messages.create(
                model="fake-model", max_tokens=2, messages=[{"role": "user", "content": "fail:500"}]
            )
    assert isinstance(unknown.value.body, dict)
    assert unknown.value.body["error"]["type"] == "not_found_error"
    assert "no-such-model" in unknown.value.body["error"]["message"]
    # The upstream's own error is normalised to the route's shape, its message kept.
    assert upstream.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "fake failure 500"},
    }
    async with httpx.AsyncClient(base_url=stack.broker.url) as http:
        bad = await http.post("/v1/messages", content=b"{not json", headers={"x-api-key": USER_KEY})
    assert bad.status_code == 400
    assert bad.json()["type"] == "error"
    assert bad.json()["error"]["type"] == "invalid_request_error"


async def test_a_stream_that_fails_midway_ends_with_an_error_event(stack: Stack) -> None:
    failing = [{"role": "user", "content": "midstream-fail"}]
    received: list[str] = []
    async with sdk(stack) as client:
        with pytest.raises(anthropic.APIStatusError) as caught:
            async with client.messages.stream(
                model="fake-model", max_tokens=8, messages=failing
            ) as stream:
                async for piece in stream.text_stream:
                    received.append(piece)
    assert received == ["tok0 ", "tok1 ", "tok2 "]
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "api_error"
    (row,) = await wait_rows(stack, 1)
    assert row.status == 502 and row.partial
    assert row.tokens_in == messages.INPUT_TOKENS  # message_start's usage was read
    assert row.tokens_out == 3 and row.estimated  # the deltas delivered, counted


async def test_an_abort_stops_the_upstream(stack: Stack, fake_llm: FakeLLM) -> None:
    fake_llm.chunk_delay = 0.05
    many = [{"role": "user", "content": "tokens:400"}]
    async with sdk(stack) as client:
        async with client.messages.stream(
            model="fake-model", max_tokens=400, messages=many
        ) as stream:
            received = 0
            async for _ in stream.text_stream:
                received += 1
                if received == 5:
                    break
    await wait_for(lambda: fake_llm.disconnects == 1, timeout=10)
    assert fake_llm.completed == 0
    (row,) = await wait_rows(stack, 1)
    assert (row.status, row.partial, row.tokens_in) == (499, True, messages.INPUT_TOKENS)
    assert row.tokens_out is not None and 5 <= row.tokens_out < 400 and row.estimated
