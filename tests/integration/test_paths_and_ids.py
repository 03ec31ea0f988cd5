"""What the path and request-ID checks (docs/security.md) still let through, unchanged.

The attacks themselves are in tests/security/; these are the ordinary requests beside them.
"""

from __future__ import annotations

import json
import uuid

import pytest

from shared.bench.upstream import FakeLLM
from tests.support.raw_http import raw_request
from tests.support.stack import USER_KEY, Stack

AUTH = {"Authorization": f"Bearer {USER_KEY}", "Content-Type": "application/json"}
CHAT = json.dumps(
    {"model": "fake-model", "messages": [{"role": "user", "content": "echo"}], "max_tokens": 1}
).encode()


async def test_the_openai_routes_are_relayed_as_sent(stack: Stack, fake_llm: FakeLLM) -> None:
    port = stack.broker.settings.port
    r = await raw_request(port, "/v1/chat/completions?x=1", body=CHAT, headers=AUTH)
    assert r.status == 200, r.body
    emb = json.dumps({"model": "fake-model", "input": "a"}).encode()
    r = await raw_request(port, "/v1/embeddings", body=emb, headers=AUTH)
    assert r.status == 200, r.body
    # The query is not relayed: only the checked path is.
    posted = [t for t in fake_llm.targets if t.startswith("POST ")]
    assert posted == ["POST /v1/chat/completions", "POST /v1/embeddings"]


@pytest.mark.parametrize("bad", ["../x", "a b", "x" * 129, "id\u00e9"])
async def test_a_malformed_client_id_is_dropped(stack: Stack, fake_llm: FakeLLM, bad: str) -> None:
    async with stack.client() as client:
        r = await client.post(
            "/v1/chat/completions",
            content=CHAT,
            headers={"x-request-id": bad.encode(), "content-type": "application/json"},
        )
    assert r.status_code == 200, r.text
    rid = r.headers["x-request-id"]
    assert str(uuid.UUID(rid)) == rid
    assert "x-client-request-id" not in r.headers  # dropped: no echo
    seen = {k.lower(): v for k, v in fake_llm.seen[-1].headers.items()}
    assert seen["x-request-id"] == seen["x-remotellm-request-id"] == rid
