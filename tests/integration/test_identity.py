"""Sessions belong to the identity their token maps to: nothing another token does reaches them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest
import structlog

from shared.bench.upstream import FakeLLM
from shared.protocol import RELAY_PREFIX, RegisterRequest, RegisterResponse, Replaced
from tests.support.stack import TOKEN, USER_KEY, start_broker, start_connector

INTRUDER = "ct-intruder-token"

pytestmark = pytest.mark.both_states  # relay semantics: in memory and in Redis


def _register(name: str, models: list[str], instance: str) -> bytes:
    req = RegisterRequest(name=name, models=models, capacity=4, instance_id=instance)
    return req.model_dump_json().encode()


async def test_other_token_cannot_take_over_end_or_read_a_session(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    broker = await start_broker(tmp_path / "b", connector_tokens=[TOKEN, INTRUDER], poll_wait=1.0)
    victim = await start_connector(broker.url, fake_llm.url, name="gpu-box")
    try:
        (victim_sid,) = (await broker.view()).sessions
        relay = httpx.AsyncClient(
            base_url=broker.url + RELAY_PREFIX,
            headers={"Authorization": f"Bearer {INTRUDER}"},
            timeout=10,
        )
        sdk = openai.AsyncOpenAI(base_url=broker.url + "/v1", api_key=USER_KEY, max_retries=0)
        async with relay, sdk:
            # Registering the victim's name makes a second, separate session.
            r = await relay.post("/sessions", content=_register("gpu-box", ["other"], "x1"))
            assert r.status_code == 200, r.text
            mine = RegisterResponse.model_validate_json(r.content)
            assert mine.replaced is Replaced.NONE
            assert set((await broker.view()).sessions) == {victim_sid, mine.session_id}

            # The victim's session looks exactly like one that does not exist.
            absent = "ses_" + "0" * 24
            for sid in (victim_sid, absent):
                calls = [
                    relay.post(f"/sessions/{sid}/poll"),
                    relay.delete(f"/sessions/{sid}"),
                    relay.put(f"/sessions/{sid}/models", json={"models": ["fake-model"]}),
                    relay.post(f"/sessions/{sid}/responses/r1", content=b""),
                    relay.post(f"/sessions/{sid}/responses/r1/parts/0", content=b""),
                ]
                for answer in await asyncio.gather(*calls):
                    assert answer.status_code == 404, answer.text
                    assert answer.json()["error"]["code"] == "session_unknown"

            # ...and it keeps serving throughout, with no re-registration.
            for _ in range(5):
                reply = await sdk.chat.completions.create(
                    model="fake-model", messages=[{"role": "user", "content": "hi"}]
                )
                assert reply.choices[0].message.content
            sessions = (await broker.view()).sessions
            assert victim_sid in sessions
            assert sessions[victim_sid].served == 5
            assert victim.connector.status.reconnects == 0
            # The intruder's own poll holds nothing of the victim's traffic.
            r = await relay.post(f"/sessions/{mine.session_id}/poll")
            assert r.status_code == 200
            assert r.json() == {"items": []}
    finally:
        await victim.stop()
        await broker.stop()


async def test_same_token_same_name_restart_replaces_at_once(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    broker = await start_broker(tmp_path / "b")
    first = await start_connector(broker.url, fake_llm.url, name="box")
    await first.kill()  # dies without deregistering: its session lingers until the TTL
    (old_sid,) = (await broker.view()).sessions
    second = await start_connector(broker.url, fake_llm.url, name="box")
    try:
        sessions = (await broker.view()).sessions
        assert old_sid not in sessions  # replaced at once, not after the TTL
        assert len(sessions) == 1
        async with httpx.AsyncClient(
            base_url=broker.url, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as relay:
            r = await relay.post(f"{RELAY_PREFIX}/sessions/{old_sid}/poll")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "session_replaced"
    finally:
        await second.stop()
        await broker.stop()


async def test_unexpected_error_in_a_relay_route_is_logged_and_answered_500(
    tmp_path: Path, monkeypatch
) -> None:
    """The relay app's catch-all: a JSON 500 and a log line with the request ID, no silence."""
    from broker.relay.app import RelayApp

    async def broken(self: RelayApp, call: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(RelayApp, "probe_upload", broken)
    broker = await start_broker(tmp_path / "b")
    try:
        async with httpx.AsyncClient(
            base_url=broker.url, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as relay:
            with structlog.testing.capture_logs() as logs:
                r = await relay.post(f"{RELAY_PREFIX}/probe", content=b"x")
            assert r.status_code == 500
            assert r.json()["error"]["code"] == "internal"
            assert "boom" not in r.text  # details go to the log, not to the client
            (event,) = [e for e in logs if e["event"] == "relay_unhandled_error"]
            assert event["error_type"] == "RuntimeError"
            assert event["path"] == f"{RELAY_PREFIX}/probe"
            # ...and the broker keeps serving.
            r = await relay.post(f"{RELAY_PREFIX}/sessions", content=_register("c", ["m"], "i"))
            assert r.status_code == 200
    finally:
        await broker.stop()


async def test_relay_routes_answer_wrong_methods_and_paths_in_json(stack) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(
        base_url=stack.broker.url + RELAY_PREFIX, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as relay:
        r = await relay.get("/sessions")
        assert r.status_code == 405
        assert r.json()["error"]["code"] == "method_not_allowed"
        r = await relay.post("/nowhere/at/all")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "unknown_url"
        r = await relay.post("/sessions", content=b"{not json")
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_request"
