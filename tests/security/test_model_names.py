"""Security issue 16, item 4: a connector token holder registers hostile model names.

A broker on 127.0.0.1 (real sockets) is sent registrations, model updates and enrollment
asks the way a hostile connector would; the names must be refused with a clear error and
never reach ``/v1/models`` (whose names the portal pastes into shell snippets).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from shared.bench.upstream import FakeLLM
from shared.protocol import RELAY_PREFIX
from tests.support.stack import TOKEN, RunningBroker, Stack, start_broker, start_connector

SHELL = "x'; touch pwned; echo '"
LONG = "m" * 10_000
REAL_NAMES = ["llama3.2:3b-instruct-q4_K_M", "org/model@rev", "gpt-4o-mini+ft", "a.b_c"]

pytestmark = pytest.mark.both_states


def _relay(broker: RunningBroker, token: str | None = TOKEN) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=broker.url + RELAY_PREFIX, headers=headers, timeout=10)


def _register(models: list[str], name: str = "evil") -> bytes:
    return json.dumps({"name": name, "models": models, "capacity": 1}).encode()


async def _listed(stack_or_broker: RunningBroker) -> set[str]:
    headers = {"Authorization": "Bearer sk-" + "1" * 32}
    async with httpx.AsyncClient(base_url=stack_or_broker.url, headers=headers) as client:
        r = await client.get("/v1/models")
    assert r.status_code == 200
    return {m["id"] for m in r.json()["data"]}


@pytest.fixture
async def broker(tmp_path: Path) -> RunningBroker:
    running = await start_broker(tmp_path / "b", max_models_per_session=8)
    yield running  # type: ignore[misc]
    await running.stop()


@pytest.mark.parametrize("bad", [SHELL, LONG, "-rf", "a b", "m\nx", "", "$(id)", "a`b`"])
async def test_registration_with_a_bad_model_name_is_refused(
    broker: RunningBroker, bad: str
) -> None:
    async with _relay(broker) as relay:
        r = await relay.post("/sessions", content=_register(["good", bad]))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_model_name"
    assert "model name" in error["message"]
    assert len(error["message"]) < 400  # the 10,000 characters are not echoed
    assert await _listed(broker) == set()


async def test_real_engine_names_register_and_are_listed(broker: RunningBroker) -> None:
    async with _relay(broker) as relay:
        r = await relay.post("/sessions", content=_register(REAL_NAMES))
    assert r.status_code == 200, r.text
    assert await _listed(broker) == set(REAL_NAMES)


async def test_a_models_update_with_a_bad_name_is_refused(broker: RunningBroker) -> None:
    async with _relay(broker) as relay:
        r = await relay.post("/sessions", content=_register(["good"]))
        sid = r.json()["session_id"]
        r = await relay.put(f"/sessions/{sid}/models", json={"models": [SHELL]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_model_name"
        r = await relay.put(f"/sessions/{sid}/models", json={"models": [LONG]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_model_name"
    assert await _listed(broker) == {"good"}


async def test_more_models_than_the_cap_are_refused(broker: RunningBroker) -> None:
    many = [f"m{i}" for i in range(9)]
    async with _relay(broker) as relay:
        r = await relay.post("/sessions", content=_register(many))
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "too_many_models"
        assert "--max-models-per-session" in r.json()["error"]["message"]
    assert await _listed(broker) == set()


async def test_an_enrollment_ask_with_a_bad_model_name_is_refused(tmp_path: Path) -> None:
    running = await start_broker(tmp_path / "b", allow_enrollment=True)
    try:
        ask = {"name": "box", "models": [SHELL], "secret": "s" * 48}
        async with _relay(running, token=None) as relay:
            r = await relay.post("/enroll", json=ask)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_model_name"
        store = running.server.state.enrollment
        assert store is not None and store.entries == []
    finally:
        await running.stop()


async def test_the_api_refuses_a_bad_model_name_like_an_unknown_model(
    broker: RunningBroker,
) -> None:
    headers = {"Authorization": "Bearer sk-" + "1" * 32}
    async with httpx.AsyncClient(base_url=broker.url, headers=headers) as client:
        r = await client.post("/v1/chat/completions", json={"model": LONG, "messages": []})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert len(error["message"]) < 200


async def test_a_connector_leaves_out_a_bad_name_its_engine_lists(tmp_path: Path) -> None:
    llm = FakeLLM(models=["good:1", SHELL])
    await llm.start()
    broker = await start_broker(tmp_path / "b")
    stack = Stack(broker)
    try:
        stack.connectors.append(await start_connector(broker.url, llm.url))
        assert await _listed(broker) == {"good:1"}
    finally:
        for c in stack.connectors:
            await c.stop()
        await broker.stop()
        await llm.stop()
