"""Security issue 16, item 4: a connector token claims a model another connector serves,
holds unbounded sessions, and the models it named are never forgotten.

Real brokers on 127.0.0.1 (both relay states: memory and redis-server) driven over HTTP
the way a hostile connector token holder would.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import yaml

from shared.protocol import RELAY_PREFIX, EnrollRequest, EnrollResponse
from tests.support.stack import USER_KEY, RunningBroker, start_broker

pytestmark = pytest.mark.both_states

OWNER_TOKEN = "ct-owner-" + "a" * 24
EVIL_TOKEN = "ct-evil-" + "b" * 24


def _relay(broker: RunningBroker, token: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=broker.url + RELAY_PREFIX, headers=headers, timeout=10)


def _api(broker: RunningBroker) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    return httpx.AsyncClient(base_url=broker.url, headers=headers, timeout=10)


def _register(models: list[str], name: str = "c") -> bytes:
    return json.dumps({"name": name, "models": models, "capacity": 1}).encode()


async def _owners(broker: RunningBroker, model: str) -> list[str]:
    view = await broker.view()
    return view.live_models.get(model, [])


@pytest.fixture
async def claimed(tmp_path: Path) -> RunningBroker:
    connectors = tmp_path / "connectors.yaml"
    entries = [
        {"token": OWNER_TOKEN, "name": "owner", "models": ["gpt-4o"]},
        {"token": EVIL_TOKEN, "name": "evil", "models": ["llama3:8b"]},
    ]
    connectors.write_text(yaml.safe_dump({"connectors": entries}))
    running = await start_broker(tmp_path / "b", connector_config=connectors)
    yield running  # type: ignore[misc]
    await running.stop()


async def test_a_token_cannot_claim_a_model_it_is_not_allowed(claimed: RunningBroker) -> None:
    async with _relay(claimed, OWNER_TOKEN) as owner, _relay(claimed, EVIL_TOKEN) as evil:
        assert (await owner.post("/sessions", content=_register(["gpt-4o"]))).status_code == 200
        r = await evil.post("/sessions", content=_register(["gpt-4o", "llama3:8b"]))
        assert r.status_code == 200, r.text
        refused = r.json()["refused"]
        assert [x["model"] for x in refused] == ["gpt-4o"]
        assert "may not serve" in refused[0]["reason"]
        # Nor through a models update.
        sid = r.json()["session_id"]
        r = await evil.put(f"/sessions/{sid}/models", json={"models": ["gpt-4o"]})
        assert r.status_code == 200 and [x["model"] for x in r.json()["refused"]] == ["gpt-4o"]
    assert await _owners(claimed, "gpt-4o") == ["owner"]
    assert await _owners(claimed, "llama3:8b") == []


async def test_a_token_without_a_models_list_serves_any_model(tmp_path: Path) -> None:
    broker = await start_broker(tmp_path / "b")  # the stack's static token: no list
    try:
        async with _relay(broker, "ct-test-token") as relay:
            r = await relay.post("/sessions", content=_register(["anything:1"]))
        assert r.status_code == 200 and r.json()["refused"] == []
        assert await _owners(broker, "anything:1") == ["c"]
    finally:
        await broker.stop()


async def test_an_enrolled_connector_serves_only_the_models_approved(tmp_path: Path) -> None:
    broker = await start_broker(tmp_path / "b", allow_enrollment=True)
    store = broker.server.state.enrollment
    assert store is not None
    ask = EnrollRequest(name="box", models=["m1"], secret="e" * 48).model_dump_json()
    try:
        async with _relay(broker, None) as anon:
            await anon.post("/enroll", content=ask)
            store.approve(store.entries[0].id, "root")
            r = await anon.post("/enroll", content=ask)
            token = EnrollResponse.model_validate_json(r.content).token
        async with _relay(broker, token) as relay:
            r = await relay.post("/sessions", content=_register(["m1", "gpt-4o"]))
        assert r.status_code == 200, r.text
        assert [x["model"] for x in r.json()["refused"]] == ["gpt-4o"]
        assert await _owners(broker, "gpt-4o") == []
        assert (await _owners(broker, "m1")) != []
    finally:
        await broker.stop()


async def test_sessions_per_identity_are_capped(tmp_path: Path) -> None:
    broker = await start_broker(tmp_path / "b", max_sessions_per_identity=3)
    try:
        async with _relay(broker, "ct-test-token") as relay:
            for i in range(3):
                r = await relay.post("/sessions", content=_register(["m"], name=f"c{i}"))
                assert r.status_code == 200, r.text
            # The same name replaces its session: still allowed at the cap.
            r = await relay.post("/sessions", content=_register(["m"], name="c0"))
            assert r.status_code == 200, r.text
            r = await relay.post("/sessions", content=_register(["m"], name="c3"))
            assert r.status_code == 429, r.text
            error = r.json()["error"]
            assert error["code"] == "too_many_sessions"
            assert "--max-sessions-per-identity" in error["message"]
        assert len((await broker.view()).sessions) == 3
    finally:
        await broker.stop()


async def test_a_model_nobody_serves_is_forgotten_after_the_grace(tmp_path: Path) -> None:
    broker = await start_broker(tmp_path / "b", model_grace=1.0)
    try:
        async with _relay(broker, "ct-test-token") as relay, _api(broker) as api:
            r = await relay.post("/sessions", content=_register(["gone:1"]))
            sid = r.json()["session_id"]
            assert (await relay.delete(f"/sessions/{sid}")).status_code == 204
            body = {"model": "gone:1", "messages": []}
            r = await api.post("/v1/chat/completions", json=body)
            assert r.status_code == 503 and r.json()["error"]["code"] == "no_connector"
            assert 'model="gone:1"' in (await _metrics(broker))
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                r = await api.post("/v1/chat/completions", json=body)
                if r.status_code == 404 or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "gone:1" not in (await broker.view()).known_models
        assert 'model="gone:1"' not in (await _metrics(broker))
    finally:
        await broker.stop()


async def _metrics(broker: RunningBroker) -> str:
    async with httpx.AsyncClient(base_url=broker.health_url) as health:
        r = await health.get("/metrics")
    assert r.status_code == 200
    return r.text
