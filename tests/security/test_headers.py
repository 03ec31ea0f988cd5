"""Security issue 16, item 2: an upstream (or a connector owner) setting headers for the broker.

A hostile fake upstream answers with Set-Cookie for the portal, its server's name and
internal addresses; the API user, through a real broker and connector, sees none of it.
"""

from __future__ import annotations

import pytest

from shared.bench.upstream import FakeLLM
from tests.support.stack import Stack

HOSTILE = [
    ("Set-Cookie", "remotellm_portal=attacker-session; Path=/portal; HttpOnly"),
    ("Set-Cookie", "other=1; Path=/"),
    ("Server", "secret-engine/1.2"),
    ("X-Powered-By", "secret-engine"),
    ("Via", "1.1 gpu-box.internal"),
    ("X-Backend-Host", "10.0.0.5:8080"),
    ("Openai-Organization", "connector-owner-org"),
    ("X-Request-Id", "upstream-internal-id"),
    ("x-ratelimit-remaining-requests", "99999"),
    ("Access-Control-Allow-Origin", "*"),
    ("Cache-Control", "no-store"),
]
NEVER = ("set-cookie", "x-powered-by", "via", "x-backend-host", "openai-organization")
SECRETS = ("attacker-session", "secret-engine", "gpu-box", "10.0.0.5", "upstream-internal-id")


def chat(stream: bool, prompt: str = "hi") -> dict[str, object]:
    return {
        "model": "fake-model",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 2,
        "stream": stream,
    }


def assert_clean(headers: list[tuple[str, str]]) -> None:
    names = {k.lower() for k, _ in headers}
    assert not names & set(NEVER), names
    assert "access-control-allow-origin" not in names
    assert "x-ratelimit-remaining-requests" not in names  # the broker's own limits only
    joined = " ".join(f"{k}: {v}" for k, v in headers)
    for secret in SECRETS:
        assert secret not in joined, joined


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_headers_pass_only_by_allowlist(
    stack: Stack, fake_llm: FakeLLM, stream: bool
) -> None:
    fake_llm.answer_headers = list(HOSTILE)
    async with stack.client() as client:
        r = await client.post("/v1/chat/completions", json=chat(stream))
    assert r.status_code == 200, r.text
    assert_clean(list(r.headers.multi_items()))
    assert not client.cookies  # nothing was set for the broker's origin
    if stream:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
    else:
        assert r.headers["content-type"] == "application/json"
        assert r.headers["cache-control"] == "no-store"  # on the allowlist: passed


async def test_upstream_error_answers_are_filtered_too(stack: Stack, fake_llm: FakeLLM) -> None:
    """An upstream error passes Retry-After only, and only as a number of seconds."""
    fake_llm.answer_headers = [*HOSTILE, ("Retry-After", "7; secret-engine")]
    async with stack.client() as client:
        r = await client.post("/v1/chat/completions", json=chat(False, "fail:429"))
    assert r.status_code == 429
    assert_clean(list(r.headers.multi_items()))
    assert "retry-after" not in r.headers


async def test_header_values_with_odd_bytes_are_dropped(stack: Stack, fake_llm: FakeLLM) -> None:
    fake_llm.answer_headers = [("Cache-Control", "x" * 5000)]
    async with stack.client() as client:
        r = await client.post("/v1/chat/completions", json=chat(False))
    assert r.status_code == 200
    assert "cache-control" not in r.headers
