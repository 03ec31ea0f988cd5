"""Bad input and upstream failures get clear, OpenAI-shaped errors; the broker keeps serving."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from shared.bench.upstream import FakeLLM
from tests.support.stack import TOKEN, USER_KEY, Stack, start_broker, start_connector

pytestmark = pytest.mark.both_servers  # bad bodies and uploads reach the server's parser first


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["code"] is None or isinstance(err["code"], str)
    if code is not None:
        assert err["code"] == code
    assert "Traceback" not in response.text
    return err


AUTH = {"Authorization": f"Bearer {USER_KEY}"}
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer sk-wrong"}, "invalid_api_key"),
        ({"Authorization": "Basic abc"}, "missing_api_key"),
    ],
)
async def test_bad_keys_401(stack: Stack, headers: dict, code: str) -> None:
    async with httpx.AsyncClient(base_url=stack.broker.url) as client:
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
            r = await client.request(method, path, json=CHAT, headers=headers)
            assert_openai_error(r, 401, code)


async def test_sdk_sees_authentication_error(stack: Stack) -> None:
    async with openai.AsyncOpenAI(base_url=stack.base_url, api_key="sk-bad", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            await c.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "x"}]
            )


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b"\xff\xfe", 400, "invalid_json"),
        (json.dumps({"messages": []}).encode(), 400, "missing_model"),
        (json.dumps({"model": 42}).encode(), 400, "missing_model"),
        (json.dumps({"model": "no-such-model", "messages": []}).encode(), 404, "model_not_found"),
    ],
)
async def test_bad_bodies(stack: Stack, content: bytes, status: int, code: str) -> None:
    async with stack.client() as client:
        r = await client.post("/v1/chat/completions", content=content)
        assert_openai_error(r, status, code)
        # ... and the broker keeps serving.
        ok = await client.post("/v1/chat/completions", json=CHAT)
        assert ok.status_code == 200


async def test_oversized_body_413(tmp_path, fake_llm: FakeLLM) -> None:
    broker = await start_broker(tmp_path / "b", max_request_body=64 * 1024)
    conn = await start_connector(broker.url, fake_llm.url)
    try:
        async with httpx.AsyncClient(base_url=broker.url, headers=AUTH) as client:
            big = {"model": "fake-model", "messages": [{"role": "user", "content": "x" * 100_000}]}
            assert_openai_error(await client.post("/v1/chat/completions", json=big), 413)

            async def chunked():  # no Content-Length: the limit holds while reading
                for _ in range(20):
                    yield b"x" * 8192

            r = await client.post("/v1/chat/completions", content=chunked())
            assert_openai_error(r, 413, "request_too_large")
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    finally:
        await conn.stop()
        await broker.stop()


async def test_unknown_routes_and_methods(stack: Stack) -> None:
    async with stack.client() as client:
        # Every /v1 path is relayed by POST: another method is 405 (with Allow), not 404.
        for method, path in [("GET", "/v1/chat/completions"), ("DELETE", "/v1/embeddings")]:
            r = await client.request(method, path)
            assert_openai_error(r, 405, "method_not_allowed")
            assert r.headers["allow"] == "POST"
        assert_openai_error(await client.get("/no-such-page"), 404)


async def test_error_messages_never_echo_much_client_input(stack: Stack) -> None:
    huge = "m" * 100_000
    async with stack.client() as client:
        r = await client.post("/v1/chat/completions", json={**CHAT, "model": huge})
        err = assert_openai_error(r, 404, "model_not_found")
        assert len(err["message"]) < 300
        r = await client.get("/v1/models/" + huge[:8000])
        assert len(assert_openai_error(r, 404, "model_not_found")["message"]) < 300
        r = await client.put("/v1/" + huge[:8000])
        assert len(assert_openai_error(r, 405)["message"]) < 300


async def test_known_model_without_connector_503(stack: Stack) -> None:
    await stack.connectors[0].stop()
    stack.connectors.clear()
    async with stack.client() as client:
        r = await client.post("/v1/chat/completions", json=CHAT)
    assert_openai_error(r, 503, "no_connector")
    assert int(r.headers["retry-after"]) >= 1


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
async def test_upstream_errors_pass_through(stack: Stack, status: int) -> None:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": f"fail:{status}"}]}
    async with stack.client() as client:
        for stream in (False, True):
            r = await client.post("/v1/chat/completions", json={**body, "stream": stream})
            err = assert_openai_error(r, status)
            assert err["message"] == f"fake failure {status}"
            assert err["code"] == str(status)  # llama.cpp's integer code, normalised


async def test_sdk_sees_upstream_error_status(stack: Stack) -> None:
    async with openai.AsyncOpenAI(base_url=stack.base_url, api_key=USER_KEY, max_retries=0) as c:
        with pytest.raises(openai.BadRequestError) as info:
            await c.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "fail:400"}]
            )
    assert "fake failure 400" in str(info.value)


async def test_midstream_upstream_failure_is_an_sse_error(stack: Stack) -> None:
    async with openai.AsyncOpenAI(base_url=stack.base_url, api_key=USER_KEY, max_retries=0) as c:
        stream = await c.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "midstream-fail"}],
            max_tokens=10,
            stream=True,
        )
        got: list[str] = []
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    got.append(chunk.choices[0].delta.content)
    assert got == ["tok0 ", "tok1 ", "tok2 "]
    assert "the local LLM failed" in str(info.value)  # the broker's text, not the connector's


async def test_upstream_unreachable_502(tmp_path) -> None:
    broker = await start_broker(tmp_path / "b")
    from tests.support.net import free_port

    conn = await start_connector(
        broker.url, f"http://127.0.0.1:{free_port()}", models=["ghost"], llm_connect_timeout=2.0
    )
    try:
        async with httpx.AsyncClient(base_url=broker.url, headers=AUTH) as client:
            for stream in (False, True):
                r = await client.post(
                    "/v1/chat/completions", json={**CHAT, "model": "ghost", "stream": stream}
                )
                err = assert_openai_error(r, 502, "upstream_unreachable")
                assert "cannot reach the local LLM" in err["message"]
    finally:
        await conn.stop()
        await broker.stop()


async def test_relay_endpoints_refuse_bad_input(stack: Stack) -> None:
    base = stack.broker.url + "/relay/v1"
    async with httpx.AsyncClient() as client:
        r = await client.post(base + "/sessions", json={"name": "x", "capacity": 1})
        assert_openai_error(r, 401, "invalid_token")
        good = {"Authorization": f"Bearer {TOKEN}"}
        r = await client.post(base + "/sessions", content=b"{oops", headers=good)
        assert_openai_error(r, 400)
        r = await client.post(base + "/sessions", json={"name": "x", "capacity": 0}, headers=good)
        assert_openai_error(r, 400)
        r = await client.post(
            base + "/sessions", json={"name": "x", "capacity": 1, "protocol": 99}, headers=good
        )
        assert_openai_error(r, 400, "protocol_mismatch")
        r = await client.post(base + "/sessions/ses_nope/poll", json={}, headers=good)
        assert_openai_error(r, 404, "session_unknown")
        sid = stack.connectors[0].connector.status.session_id
        r = await client.post(
            f"{base}/sessions/{sid}/responses/req_nope", content=b"", headers=good
        )
        assert_openai_error(r, 409, "lease_lost")
        r = await client.post(f"{base}/sessions/{sid}/poll", json={})  # no token
        assert_openai_error(r, 401)


async def test_blocked_key_403_without_restart(tmp_path, fake_llm: FakeLLM) -> None:
    import yaml

    from broker.accounts.keys import hash_secret

    data = tmp_path / "b"
    data.mkdir()
    key = "sk-" + "a" * 32
    creds = data / "credentials.yaml"
    creds.write_text(
        yaml.safe_dump({"users": [{"id": "u1", "name": "alice", "key_sha256": hash_secret(key)}]})
    )
    broker = await start_broker(data, user_api_keys=[])
    conn = await start_connector(broker.url, fake_llm.url)
    try:
        async with httpx.AsyncClient(base_url=broker.url) as client:
            h = {"Authorization": f"Bearer {key}"}
            assert (
                await client.post("/v1/chat/completions", json=CHAT, headers=h)
            ).status_code == 200
            creds.write_text(
                yaml.safe_dump(
                    {
                        "users": [
                            {
                                "id": "u1",
                                "name": "alice",
                                "key_sha256": hash_secret(key),
                                "blocked": True,
                            }
                        ]
                    }
                )
            )
            broker.server.state.keys.reload()
            r = await client.post("/v1/chat/completions", json=CHAT, headers=h)
            assert_openai_error(r, 403, "key_blocked")
            assert r.headers["x-should-retry"] == "false"
    finally:
        await conn.stop()
        await broker.stop()


async def test_upstream_key_injected_per_connector(tmp_path, fake_llm: FakeLLM) -> None:
    config = tmp_path / "connectors.yaml"
    config.write_text("connectors:\n  - token: ct-with-key\n    llm_api_key: sk-upstream-secret\n")
    broker = await start_broker(tmp_path / "b", connector_config=config)
    conn = await start_connector(broker.url, fake_llm.url, broker_token="ct-with-key")
    try:
        async with httpx.AsyncClient(base_url=broker.url, headers=AUTH) as client:
            r = await client.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200
            assert "sk-upstream-secret" not in r.text
        headers = {k.lower(): v for k, v in fake_llm.seen[-1].headers.items()}
        assert headers["authorization"] == "Bearer sk-upstream-secret"
    finally:
        await conn.stop()
        await broker.stop()


async def test_garbage_upload_fails_the_request_cleanly(tmp_path) -> None:
    """A connector that uploads something that is not frames: 400 to it, 502 to the user."""
    import asyncio

    broker = await start_broker(tmp_path / "b")
    base = broker.url + "/relay/v1"
    tok = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with httpx.AsyncClient(timeout=30) as raw:
            reg = await raw.post(
                base + "/sessions",
                json={"name": "broken", "models": ["fake-model"], "capacity": 1},
                headers=tok,
            )
            sid = reg.json()["session_id"]
            async with httpx.AsyncClient(base_url=broker.url, headers=AUTH, timeout=30) as api:
                pending = asyncio.create_task(api.post("/v1/chat/completions", json=CHAT))
                polled = await raw.post(f"{base}/sessions/{sid}/poll", json={}, headers=tok)
                rid = polled.json()["items"][0]["request_id"]
                bad = await raw.post(
                    f"{base}/sessions/{sid}/responses/{rid}",
                    content=b"\x09\x00\x00\x00\x01x",  # frame type 9 does not exist
                    headers=tok,
                )
                assert_openai_error(bad, 400, "bad_upload")
                r = await pending
            assert_openai_error(r, 502, "bad_upload")
            # A part upload that is not frames either.
            async with httpx.AsyncClient(base_url=broker.url, headers=AUTH, timeout=30) as api:
                pending = asyncio.create_task(api.post("/v1/chat/completions", json=CHAT))
                polled = await raw.post(f"{base}/sessions/{sid}/poll", json={}, headers=tok)
                rid = polled.json()["items"][0]["request_id"]
                bad = await raw.post(
                    f"{base}/sessions/{sid}/responses/{rid}/parts/0",
                    content=b"\x01\x00\x00\x00\x03{x}",  # a HEAD frame with broken JSON
                    headers=tok,
                )
                assert_openai_error(bad, 400, "bad_upload")
                assert_openai_error(await pending, 502, "bad_upload")
    finally:
        await broker.stop()


async def test_silent_upstream_is_a_clear_504(tmp_path, fake_llm: FakeLLM) -> None:
    broker = await start_broker(tmp_path / "b")
    conn = await start_connector(broker.url, fake_llm.url, llm_read_timeout=0.5)
    try:
        slow = {"model": "fake-model", "messages": [{"role": "user", "content": "slow-head:2"}]}
        async with httpx.AsyncClient(base_url=broker.url, headers=AUTH, timeout=30) as client:
            for stream in (False, True):
                r = await client.post("/v1/chat/completions", json={**slow, "stream": stream})
                err = assert_openai_error(r, 504, "upstream_timeout")
                assert "did not answer in time" in err["message"]
            # The connector is still serving.
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    finally:
        await conn.stop()
        await broker.stop()


async def test_unexpected_error_in_the_api_relay_is_logged_and_answered_500(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    import structlog

    from broker.api.relay import ApiRelay

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(ApiRelay, "_item", broken)
    async with stack.client() as client:
        with structlog.testing.capture_logs() as logs:
            r = await client.post("/v1/chat/completions", json=CHAT)
        err = assert_openai_error(r, 500, "internal")
        assert "boom" not in err["message"]
        assert r.headers["x-request-id"]
        (event,) = [e for e in logs if e["event"] == "api_unhandled_error"]
        assert event["error_type"] == "RuntimeError"
        monkeypatch.undo()
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
