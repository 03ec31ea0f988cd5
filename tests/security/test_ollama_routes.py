"""Ollama's native API: the routes that change the engine never reach it, however spelled.

Real broker and connector in front of ``FakeLLM(ollama=True)``; request lines written
byte for byte (tests/support/raw_http.py). The broker refuses pull, create, copy, delete,
push and blobs with 403, any non-canonical ``/api`` path with 400, other ``/api`` paths
with 404, all in Ollama's error shape; the connector, handed such a path by a hostile
broker, refuses it too, and calls Ollama's routes only when its engine is Ollama.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.core.records import Failure
from shared.bench.upstream import FakeLLM
from shared.paths import PathRefused, relay_target
from shared.protocol import RequestItem, ResponseEnd
from tests.support.raw_http import raw_request
from tests.support.stack import USER_KEY, Stack, start_broker, start_connector

AUTH = {"Authorization": f"Bearer {USER_KEY}", "Content-Type": "application/json"}
MODEL = "fake-model"
PULL = json.dumps({"model": MODEL, "stream": False}).encode()
CHAT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
DETECTION = ("GET /api/version", "GET /api/tags")


def reached(fake: FakeLLM) -> list[str]:
    """What the engine received under /api beyond the connector's detection."""
    return [t for t in fake.targets if "/api" in t and t not in DETECTION]


@pytest.fixture
async def ollama_stack(tmp_path: Path) -> AsyncIterator[tuple[Stack, FakeLLM]]:
    fake = FakeLLM(ollama=True)
    await fake.start()
    broker = await start_broker(tmp_path / "b")
    conn = await start_connector(broker.url, fake.url)
    try:
        yield Stack(broker, [conn]), fake
    finally:
        await conn.stop()
        await broker.stop()
        await fake.stop()


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("POST", "/api/pull"),
        ("POST", "/api/push"),
        ("POST", "/api/create"),
        ("POST", "/api/copy"),
        ("DELETE", "/api/delete"),
        ("POST", "/api/blobs/sha256:" + "0" * 64),
        ("HEAD", "/api/blobs/sha256:" + "0" * 64),
        ("GET", "/api/pull"),
    ],
)
async def test_engine_changing_routes_get_403(
    ollama_stack: tuple[Stack, FakeLLM], method: str, target: str
) -> None:
    stack, fake = ollama_stack
    r = await raw_request(
        stack.broker.settings.port, target, method=method, body=PULL, headers=AUTH
    )
    assert r.status == 403
    if method != "HEAD":
        assert "never relays" in r.json()["error"]
    assert reached(fake) == []


@pytest.mark.parametrize(
    "target",
    [
        "/api/chat/../pull",
        "/api/./pull",
        "/api//pull",
        "/api/%70ull",
        "/api/pull%2f",
        "/api/chat%2f..%2fpull",
        "/api/chat/",
        "/api/chat\\..\\pull",
        "/api/%2e%2e/v1/chat/completions",
    ],
)
async def test_non_canonical_api_paths_get_400(
    ollama_stack: tuple[Stack, FakeLLM], target: str
) -> None:
    stack, fake = ollama_stack
    r = await raw_request(stack.broker.settings.port, target, body=PULL, headers=AUTH)
    assert r.status == 400, r.body
    assert set(r.json()) == {"error"} and "not canonical" in r.json()["error"]
    assert reached(fake) == []


@pytest.mark.parametrize("target", ["/api/Pull", "/api/chat/x", "/api/slots", "/api/tags/x"])
async def test_other_api_paths_get_404(ollama_stack: tuple[Stack, FakeLLM], target: str) -> None:
    stack, fake = ollama_stack
    r = await raw_request(stack.broker.settings.port, target, body=CHAT, headers=AUTH)
    assert r.status == 404 and set(r.json()) == {"error"}
    assert reached(fake) == []


async def test_bodies_are_checked_as_on_v1(ollama_stack: tuple[Stack, FakeLLM]) -> None:
    stack, fake = ollama_stack
    port = stack.broker.settings.port
    deep = b'{"model": "fake-model", "messages": ' + b"[" * 500 + b"]" * 500 + b"}"
    bad_name = json.dumps({"model": "../../etc", "prompt": "x"}).encode()
    for body, status in ((deep, 400), (b"[1]", 400), (b"{", 400), (bad_name, 404)):
        r = await raw_request(port, "/api/generate", body=body, headers=AUTH)
        assert r.status == status, r.body
        assert set(r.json()) == {"error"}
    assert reached(fake) == []


# -- the connector does not trust the broker with the path -------------------------------


async def _hand_over(stack: Stack, path: str) -> ResponseEnd | Failure:
    """Queue an item as a hostile broker would, and wait for how the connector ended it."""
    item = RequestItem(request_id=str(uuid.uuid4()), model=MODEL, path=path, body=CHAT.decode())
    pending, channel = await stack.broker.hub.submit(item)
    try:
        async with asyncio.timeout(20):
            while True:
                for event in await channel.get(1.0):
                    if isinstance(event, ResponseEnd | Failure):
                        return event
    finally:
        await stack.broker.hub.finish(pending.id)


async def test_the_connector_refuses_engine_changing_routes(
    ollama_stack: tuple[Stack, FakeLLM],
) -> None:
    stack, fake = ollama_stack
    for path in ("/api/pull", "/api/delete", "/api/blobs/sha256:00", "/api/chat/../pull"):
        end = await _hand_over(stack, path)
        assert isinstance(end, ResponseEnd) and (end.ok, end.status) == (False, 400), end
    assert reached(fake) == []
    end = await _hand_over(stack, "/api/chat")  # an allowed route still goes through
    assert isinstance(end, ResponseEnd) and end.ok
    assert reached(fake) == ["POST /api/chat"]


async def test_a_connector_that_is_not_ollama_calls_no_api_route(
    stack: Stack, fake_llm: FakeLLM
) -> None:
    end = await _hand_over(stack, "/api/chat")
    assert isinstance(end, ResponseEnd) and (end.ok, end.status) == (False, 404), end
    assert "does not serve Ollama's API" in (end.error or "")
    assert reached(fake_llm) == []
    assert "GET /api/version" in fake_llm.targets  # its detection, answered 404


def test_the_path_rule() -> None:
    assert relay_target("/api/chat", "ollama/0.6.2") == "/api/chat"
    assert relay_target("/v1/chat/completions", "") == "/v1/chat/completions"
    for path, engine in (
        ("/api/chat", ""),
        ("/api/chat", "llama.cpp"),
        ("/api/pull", "ollama/0.6.2"),
        ("/api/tags", "ollama/0.6.2"),
        ("/api/%63hat", "ollama"),
    ):
        with pytest.raises(PathRefused):
            relay_target(path, engine)
