"""Security issue 16, item 1: an API user or a broker steering the connector off its routes.

Real broker, connector and fake upstream on 127.0.0.1; the request line is written byte
for byte (tests/support/raw_http.py), since HTTP clients resolve ``..`` before sending.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from broker.core.records import Failure
from shared.bench.upstream import FakeLLM
from shared.protocol import RequestItem, ResponseEnd
from tests.support.raw_http import raw_request
from tests.support.stack import USER_KEY, Stack, start_broker, start_connector

AUTH = {"Authorization": f"Bearer {USER_KEY}", "Content-Type": "application/json"}
CHAT = json.dumps(
    {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
).encode()


def posted(fake: FakeLLM) -> list[str]:
    """Every POST the upstream received (the connector's model discovery is a GET)."""
    return [t for t in fake.targets if t.startswith("POST ")]


@pytest.mark.parametrize(
    "target",
    [
        "/v1/%2e%2e/api/create",
        "/v1/../api/copy",
        "/v1/./..%2fapi/create",
        "/v1/%2E%2E/slots/0%3Faction=erase",
        "/v1//api/delete",
        "/v1/chat/completions/",
        "/v1/chat%2fcompletions",
        "/v1/chat/./completions",
        "/v1/chat%5Ccompletions",
        "/v1/chat\\..\\completions",
        "/v1/chat/completions%23x",
    ],
)
async def test_non_canonical_paths_get_400_and_never_reach_the_upstream(
    stack: Stack, fake_llm: FakeLLM, target: str
) -> None:
    r = await raw_request(stack.broker.settings.port, target, body=CHAT, headers=AUTH)
    assert r.status == 400, r.body
    error = r.json()["error"]
    assert error["code"] == "invalid_path"
    assert error["type"] == "invalid_request_error"
    assert posted(fake_llm) == []


@pytest.mark.parametrize(
    "target", ["/v1/api/create", "/v1/models", "/v1/slots/0", "/v1/chat/completions/x"]
)
async def test_routes_off_the_allowlist_get_404_and_never_reach_the_upstream(
    stack: Stack, fake_llm: FakeLLM, target: str
) -> None:
    r = await raw_request(stack.broker.settings.port, target, body=CHAT, headers=AUTH)
    assert r.status == 404, r.body
    assert r.json()["error"]["code"] == "unknown_url"
    assert posted(fake_llm) == []


async def test_an_operator_adds_routes(tmp_path: Path, fake_llm: FakeLLM) -> None:
    broker = await start_broker(tmp_path / "b", extra_api_routes=["tokenize", "/v1/extras/*/run"])
    conn = await start_connector(broker.url, fake_llm.url)
    try:
        port = broker.settings.port
        for target in ("/v1/tokenize", "/v1/extras/a1/run"):
            r = await raw_request(port, target, body=CHAT, headers=AUTH)
            assert "stray" in r.json()["error"]["message"]  # relayed: the fake's 404 body
        r = await raw_request(port, "/v1/extras/a1/b2/run", body=CHAT, headers=AUTH)
        assert r.status == 404
        assert posted(fake_llm) == ["POST /v1/tokenize", "POST /v1/extras/a1/run"]
    finally:
        await conn.stop()
        await broker.stop()


def test_a_bad_extra_route_is_a_settings_error(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from broker.settings import BrokerSettings

    for bad in ("../api/create", "a//b", "a/%2e%2e"):
        with pytest.raises(ValidationError):
            BrokerSettings(data_dir=tmp_path, extra_api_routes=[bad])


# -- the connector does not trust the broker with the URL --------------------------------


async def _hand_over(stack: Stack, path: str, method: str = "POST") -> ResponseEnd | Failure:
    """Queue an item as a hostile broker would, and wait for how the connector ended it."""
    item = RequestItem(
        request_id=str(uuid.uuid4()), model="fake-model", path=path, body=CHAT.decode()
    )
    item = item.model_copy(update={"method": method})
    pending, channel = await stack.broker.hub.submit(item)
    try:
        async with asyncio.timeout(20):
            while True:
                for event in await channel.get(1.0):
                    if isinstance(event, ResponseEnd | Failure):
                        return event
    finally:
        await stack.broker.hub.finish(pending.id)


async def test_the_connector_calls_only_its_llm_url(stack: Stack, fake_llm: FakeLLM) -> None:
    victim = FakeLLM()
    await victim.start()
    try:
        hostile = [
            (f"http://127.0.0.1:{victim.port}/v1/chat/completions", "POST"),
            (f"//127.0.0.1:{victim.port}/v1/chat/completions", "POST"),
            ("/v1/../api/create", "POST"),
            ("/v1/%2e%2e/api/create", "POST"),
            ("/api/create", "POST"),
            ("/v1/chat/completions", "DELETE"),
        ]
        for path, method in hostile:
            end = await _hand_over(stack, path, method)
            assert isinstance(end, ResponseEnd), end
            assert (end.ok, end.status) == (False, 400), end
        assert victim.targets == []
        assert posted(fake_llm) == []
        # A canonical path still goes through, to the --llm-url.
        end = await _hand_over(stack, "/v1/chat/completions")
        assert isinstance(end, ResponseEnd) and end.ok
        assert posted(fake_llm) == ["POST /v1/chat/completions"]
    finally:
        await victim.stop()
