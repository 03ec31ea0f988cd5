"""The ``x-api-key`` header (Anthropic's clients): one more way in, held to the Bearer rules.

Real broker and connector, the fake upstream. Two different keys in one request are
refused, a key in either header never reaches the engine, a key is never echoed, and odd
values (empty, blank, huge, control characters) are a clean 401 while the service keeps
serving. docs/security.md, "The x-api-key header".
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from shared.bench.upstream import FakeLLM
from tests.support.stack import USER_KEY, Stack

OTHER_KEY = "sk-" + "7" * 32
BODY: dict[str, Any] = {
    "model": "fake-model",
    "max_tokens": 2,
    "messages": [{"role": "user", "content": "hi"}],
}
ROUTES = ("/v1/messages", "/v1/chat/completions")


async def post(stack: Stack, path: str, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=stack.broker.url, timeout=30) as http:
        return await http.post(path, json=BODY, headers=headers)


@pytest.mark.parametrize("path", ROUTES)
async def test_two_different_keys_are_refused_whichever_is_valid(stack: Stack, path: str) -> None:
    for bearer, api_key in ((USER_KEY, OTHER_KEY), (OTHER_KEY, USER_KEY)):
        answer = await post(
            stack, path, {"Authorization": f"Bearer {bearer}", "x-api-key": api_key}
        )
        assert answer.status_code == 401
        assert USER_KEY not in answer.text and OTHER_KEY not in answer.text
        if path == "/v1/messages":
            assert answer.json()["error"]["type"] == "authentication_error"
        else:
            assert answer.json()["error"]["code"] == "conflicting_api_keys"
    same = await post(stack, path, {"Authorization": f"Bearer {USER_KEY}", "x-api-key": USER_KEY})
    assert same.status_code == 200


@pytest.mark.parametrize("path", ROUTES)
async def test_no_key_header_reaches_the_engine(stack: Stack, fake_llm: FakeLLM, path: str) -> None:
    for headers in ({"x-api-key": USER_KEY}, {"Authorization": f"Bearer {USER_KEY}"}):
        assert (await post(stack, path, headers)).status_code == 200
        seen = {name.lower(): value for name, value in fake_llm.seen[-1].headers.items()}
        assert "x-api-key" not in seen
        assert USER_KEY not in " ".join(seen.values())


@pytest.mark.parametrize(
    "value",
    ["", "sk-" + "a" * 8000, "sk-\x01\x7fbad", USER_KEY + "x", "Bearer " + USER_KEY, OTHER_KEY],
)
async def test_odd_values_are_a_clean_401(stack: Stack, value: str) -> None:
    answer = await post(stack, "/v1/messages", {"x-api-key": value})
    assert answer.status_code in (400, 401, 431)  # h11 may refuse a huge header itself
    if answer.status_code == 401:
        body = answer.json()
        assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
        assert value.strip() == "" or value.strip() not in answer.text
    ok = await post(stack, "/v1/messages", {"x-api-key": USER_KEY})  # still serving
    assert ok.status_code == 200


async def test_an_empty_x_api_key_beside_a_bearer_key_is_no_conflict(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {USER_KEY}", "x-api-key": ""}
    assert (await post(stack, "/v1/messages", headers)).status_code == 200


async def test_a_non_bearer_authorization_carries_no_key(stack: Stack) -> None:
    # Basic credentials are not a key here (as before): x-api-key decides alone.
    basic = {"Authorization": "Basic dXNlcjpwYXNz"}
    refused = await post(stack, "/v1/messages", basic)
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"
    answer = await post(stack, "/v1/messages", {**basic, "x-api-key": USER_KEY})
    assert answer.status_code == 200
