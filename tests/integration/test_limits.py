"""Limits over real HTTP: real broker and connector, the fake LLM, the openai SDK as client."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.accounts.users import UsersStore
from broker.state.memory.limits import MemoryLimitState
from shared.bench.upstream import FakeLLM
from tests.support.net import wait_for
from tests.support.stack import TOKEN, USER_KEY, Stack, start_broker, start_connector

RESET = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")
HI = [{"role": "user", "content": "hi"}]  # 2 bytes: 1 token + 4 for the message


def sdk(stack: Stack, key: str = USER_KEY, **kw: Any) -> openai.AsyncOpenAI:
    kw.setdefault("max_retries", 0)
    return openai.AsyncOpenAI(base_url=stack.base_url, api_key=key, **kw)


def limiter(stack: Stack) -> MemoryLimitState:
    state = stack.broker.server.state.limiter
    assert isinstance(state, MemoryLimitState)
    return state


async def counters(stack: Stack, name: str, label: str) -> dict[str, float]:
    """A counter's ``_total`` samples from /metrics, by the value of one label."""
    async with httpx.AsyncClient(base_url=stack.broker.health_url) as health:
        text = (await health.get("/metrics")).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for sample in family.samples:
                if sample.name == name + "_total":
                    found[sample.labels[label]] = sample.value
    return found


async def rate_limited(stack: Stack) -> dict[str, float]:
    return await counters(stack, "remotellm_rate_limited", "reason")


@pytest.mark.parametrize("broker_overrides", [{"rpm_limit": 2}])
async def test_the_sdk_sees_a_rate_limit_error_with_openais_headers(stack: Stack) -> None:
    async with sdk(stack) as client:
        first = await client.chat.completions.with_raw_response.create(
            model="fake-model", messages=HI, max_tokens=2
        )
        stream = await client.chat.completions.with_raw_response.create(
            model="fake-model", messages=HI, max_tokens=2, stream=True
        )
        async for _ in stream.parse():
            pass
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="fake-model", messages=HI, max_tokens=2)
    for raw, remaining in ((first, "1"), (stream, "0")):
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
        assert raw.headers["x-ratelimit-remaining-requests"] == remaining
        assert RESET.match(raw.headers["x-ratelimit-reset-requests"])
        assert "x-ratelimit-limit-tokens" not in raw.headers  # no token limit set
    err = caught.value
    assert err.status_code == 429
    assert err.code == "rate_limit_exceeded" and err.type == "requests"
    assert "requests per minute (RPM)" in err.message and "Limit 2, Used 2" in err.message
    headers = err.response.headers
    assert 1 <= int(headers["retry-after"]) <= 30  # one request drains in 30 s
    assert 0 < int(headers["retry-after-ms"]) <= 30_000
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert RESET.match(headers["x-ratelimit-reset-requests"])
    assert "x-should-retry" not in headers
    assert err.response.headers["x-request-id"]
    assert await rate_limited(stack) == {"rpm": 1.0}
    # Counted with the requests, like the relay's own refusals.
    assert (await counters(stack, "remotellm_requests", "status"))["429"] == 1.0


@pytest.mark.parametrize("broker_overrides", [{"daily_token_quota": 60}])
async def test_a_used_up_quota_is_not_retried_by_the_sdk(stack: Stack) -> None:
    # With retries on: x-should-retry: false must stop the SDK from trying again.
    async with sdk(stack, max_retries=2) as client:
        await client.chat.completions.create(model="fake-model", messages=HI, max_tokens=3)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="fake-model", messages=HI, max_tokens=100)
        # 8 used (the fake's usage), 5 + 20 fit in the 52 left: a smaller request still runs.
        small = await client.chat.completions.create(model="fake-model", messages=HI, max_tokens=20)
    assert small.choices[0].message.content
    err = caught.value
    assert err.code == "insufficient_quota" and err.type == "insufficient_quota"
    assert "daily token quota" in err.message and "Used 8" in err.message
    assert err.response.headers["x-should-retry"] == "false"
    assert int(err.response.headers["retry-after"]) > 0
    assert await rate_limited(stack) == {"daily": 1.0}  # one refusal: no retry
    (usage,) = await limiter(stack).usage_snapshot(time.time())
    assert usage.tokens_today == 16  # two requests at the fake's 8 tokens each


TPM = 1000
MAX_TOKENS = 200
DEMAND = 5 + MAX_TOKENS  # "hi" is 1 token + 4 for the message


@pytest.mark.parametrize("broker_overrides", [{"tpm_limit": TPM}])
async def test_a_concurrent_burst_stays_within_the_token_limit(
    stack: Stack, fake_llm: FakeLLM
) -> None:
    """Counting after the response would let all 20 through; reserving lets 4 (4 x 205)."""
    fake_llm.chunk_delay = 0.01  # each answer takes 2 s: every admission happens first
    async with sdk(stack) as client:
        results = await asyncio.gather(
            *(
                client.chat.completions.with_raw_response.create(
                    model="fake-model", messages=HI, max_tokens=MAX_TOKENS
                )
                for _ in range(20)
            ),
            return_exceptions=True,
        )
    ok = [r for r in results if not isinstance(r, BaseException)]
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(ok) + len(limited) == 20, [r for r in results if isinstance(r, BaseException)]
    assert len(ok) * DEMAND <= TPM + DEMAND  # the bound: at most one reservation over
    assert len(ok) == TPM // DEMAND  # and here exactly what fits
    remaining = sorted(int(r.headers["x-ratelimit-remaining-tokens"]) for r in ok)
    assert remaining[0] == TPM - len(ok) * DEMAND
    assert all(r.headers["x-ratelimit-limit-tokens"] == str(TPM) for r in ok)
    for err in limited:
        assert err.type == "tokens" and f"Requested {DEMAND}" in err.message
        assert int(err.response.headers["retry-after"]) >= 1
        assert RESET.match(err.response.headers["x-ratelimit-reset-tokens"])
    await wait_for(lambda: limiter(stack).book.open_reservations == 0)
    (usage,) = await limiter(stack).usage_snapshot(time.time())
    # Settled to the fake's real usage (8 tokens each), less what drained since.
    assert usage.tokens_last_minute <= 8 * len(ok)


@pytest.mark.parametrize("broker_overrides", [{"rpm_limit": 100, "tpm_limit": 100_000}])
async def test_every_response_carries_the_rate_headers(stack: Stack) -> None:
    chat = {"model": "fake-model", "messages": HI, "max_tokens": 2}
    async with stack.client() as http:
        whole = await http.post("/v1/chat/completions", json=chat)
        async with http.stream(
            "POST", "/v1/chat/completions", json=chat | {"stream": True}
        ) as streamed:
            await streamed.aread()
        unknown = await http.post("/v1/chat/completions", json=chat | {"model": "nope"})
        failed = await http.post(
            "/v1/chat/completions",
            json=chat | {"messages": [{"role": "user", "content": "fail:500"}]},
        )
    statuses = [r.status_code for r in (whole, streamed, unknown, failed)]
    assert statuses == [200, 200, 404, 500]
    for i, response in enumerate((whole, streamed, unknown, failed)):
        assert response.headers["x-ratelimit-limit-requests"] == "100"
        assert response.headers["x-ratelimit-remaining-requests"] == str(99 - i)
        assert response.headers["x-ratelimit-limit-tokens"] == "100000"
        assert int(response.headers["x-ratelimit-remaining-tokens"]) < 100_000
        assert RESET.match(response.headers["x-ratelimit-reset-tokens"])


# The default per-user concurrency limit (32) is lifted: no limit at all.
@pytest.mark.parametrize("broker_overrides", [{"concurrency_limit": None}])
async def test_no_limit_configured_no_headers(stack: Stack) -> None:
    async with stack.client() as http:
        reply = await http.post(
            "/v1/chat/completions", json={"model": "fake-model", "messages": HI, "max_tokens": 1}
        )
    assert reply.status_code == 200
    assert not any(h.startswith("x-ratelimit") for h in reply.headers)
    assert limiter(stack).book.snapshot(0.0) == []  # nothing was counted


@pytest.mark.parametrize("broker_overrides", [{"concurrency_limit": 1}])
async def test_every_way_a_request_ends_frees_its_slot(stack: Stack, fake_llm: FakeLLM) -> None:
    chat = {"model": "fake-model", "messages": HI, "max_tokens": 2}
    book = limiter(stack).book

    async def settled() -> None:
        await wait_for(lambda: book.open_reservations == 0, timeout=10)

    async with stack.client() as http:
        assert (await http.post("/v1/chat/completions", json=chat)).status_code == 200
        await settled()
        # Refused by the relay (unknown model), and an upstream error.
        assert (
            await http.post("/v1/chat/completions", json=chat | {"model": "x"})
        ).status_code == 404
        await settled()
        failing = chat | {"messages": [{"role": "user", "content": "fail:503"}]}
        assert (await http.post("/v1/chat/completions", json=failing)).status_code == 503
        await settled()
        # Cancelled mid-stream by the client.
        fake_llm.chunk_delay = 0.2
        async with http.stream(
            "POST", "/v1/chat/completions", json=chat | {"stream": True, "max_tokens": 50}
        ) as streaming:
            async for _ in streaming.aiter_bytes():
                break
            # While it runs, a second request is over the concurrency limit.
            second = await http.post("/v1/chat/completions", json=chat)
            assert second.status_code == 429 and "concurrent" in second.text
        await settled()
        # Cancelled while waiting for the upstream's head.
        slow = chat | {"messages": [{"role": "user", "content": "slow-head:5"}]}
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/chat/completions", json=slow, timeout=0.5)
        await settled()
        fake_llm.chunk_delay = 0.0
        assert (await http.post("/v1/chat/completions", json=chat)).status_code == 200
    await settled()
    (usage,) = book.snapshot(time.time())
    assert usage.in_flight == 0 and usage.refusals == 1


async def test_users_file_overrides_apply_without_a_restart(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    users = UsersStore(tmp_path / "users.yaml")
    key = users.login(7, "alice", "Alice").first_key
    assert key is not None
    broker = await start_broker(tmp_path / "broker", users_file=users.path)
    conn = await start_connector(broker.url, fake_llm.url)

    chat: dict[str, Any] = {"model": "fake-model", "messages": HI, "max_tokens": 1}
    headers = {"Authorization": f"Bearer {key}"}
    try:
        async with httpx.AsyncClient(base_url=broker.url, headers=headers, timeout=30) as http:
            first = await http.post("/v1/chat/completions", json=chat)
            assert first.status_code == 200 and "x-ratelimit-limit-requests" not in first.headers

            async def until(check: Any) -> httpx.Response:
                for _ in range(60):
                    reply = await http.post("/v1/chat/completions", json=chat)
                    if check(reply):
                        return reply
                    await asyncio.sleep(0.2)
                raise AssertionError(f"the broker did not apply the change: {reply.text}")

            # 1. A user override (the users CLI and the admin page call set_limits).
            users.set_limits("alice", {"rpm": 1})
            took = await until(lambda r: "x-ratelimit-limit-requests" in r.headers)
            assert took.headers["x-ratelimit-remaining-requests"] == "0"
            over = await http.post("/v1/chat/completions", json=chat)
            assert over.status_code == 429 and "user gitlab-7" in over.json()["error"]["message"]

            # 2. Lift it for the user, limit the key alone.
            users.set_limits("alice", {"rpm": "unlimited"})
            users.set_limits("alice", {"rpm": 1}, key="default")
            await until(lambda r: r.status_code == 200)
            over = await http.post("/v1/chat/completions", json=chat)
            assert over.status_code == 429
            assert "key 'default'" in over.json()["error"]["message"]

            # 3. A blocked user: 403, and the SDKs are told not to retry.
            users.set_blocked("alice", True)
            blocked = await until(lambda r: r.status_code == 403)
            assert blocked.headers["x-should-retry"] == "false"
            assert json.loads(blocked.text)["error"]["code"] == "key_blocked"
    finally:
        await conn.stop()
        await broker.stop()


async def test_a_redispatched_request_is_settled_once(tmp_path: Path, fake_llm: FakeLLM) -> None:
    """A poll answer lost on the way: the lease runs out, another connector serves it."""
    broker = await start_broker(
        tmp_path / "b", lease=0.5, daily_token_quota=1_000_000, concurrency_limit=1
    )
    base = broker.url + "/relay/v1"
    tok = {"Authorization": f"Bearer {TOKEN}"}
    book = broker.server.state.limiter.book  # type: ignore[attr-defined]
    try:
        async with httpx.AsyncClient(timeout=30) as raw:
            reg = await raw.post(
                base + "/sessions",
                json={"name": "lossy", "models": ["fake-model"], "capacity": 1},
                headers=tok,
            )
            sid = reg.json()["session_id"]
            auth = {"Authorization": f"Bearer {USER_KEY}"}
            async with httpx.AsyncClient(base_url=broker.url, headers=auth, timeout=30) as api:
                chat = {"model": "fake-model", "messages": HI, "max_tokens": 2}
                answer = asyncio.create_task(api.post("/v1/chat/completions", json=chat))
                lost = await raw.post(f"{base}/sessions/{sid}/poll", json={}, headers=tok)
                assert lost.json()["items"][0]["type"] == "request"
                conn = await start_connector(broker.url, fake_llm.url)
                try:
                    reply = await answer
                    assert reply.status_code == 200
                    assert broker.hub.core.redispatched == 1
                    await wait_for(lambda: book.open_reservations == 0)
                    # The slot is free again, and the tokens were counted once, as used.
                    again = await api.post("/v1/chat/completions", json=chat)
                    assert again.status_code == 200
                finally:
                    await conn.stop()
        await wait_for(lambda: book.open_reservations == 0)
        (usage,) = book.snapshot(time.time())
        assert usage.tokens_today == 2 * 8  # the fake's usage, each request once
        assert usage.in_flight == 0
    finally:
        await broker.stop()
