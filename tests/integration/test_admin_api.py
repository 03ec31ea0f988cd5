"""The admin API (/admin/v1) driven over real HTTP against a real broker: every endpoint,
each change visible in the stores, the audit trail and ``remotellm-broker audit``."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx

from shared.protocol import RELAY_PREFIX, EnrollRequest
from tests.support.admin import admin_client, cli, create_token, seed_users
from tests.support.stack import USER_KEY, RunningBroker, start_broker


async def _enroll(broker: RunningBroker, secret: str) -> str:
    ask = EnrollRequest(name="gpu-box:llm", models=["m1"], secret=secret)
    async with httpx.AsyncClient(base_url=broker.url + RELAY_PREFIX, trust_env=False) as relay:
        r = await relay.post("/enroll", content=ask.model_dump_json().encode())
    assert r.status_code == 202, r.text
    enrollment_id = r.json()["enrollment_id"]
    assert isinstance(enrollment_id, str)
    return enrollment_id


async def _users(admin: httpx.AsyncClient) -> None:
    r = await admin.get("/users")
    assert r.status_code == 200, r.text
    assert {u["username"] for u in r.json()["users"]} == {"alice", "bob"}
    assert r.headers["cache-control"] == "no-store"
    r = await admin.get("/users", params={"q": "ali"})
    assert [u["username"] for u in r.json()["users"]] == ["alice"]
    r = await admin.get("/overview")
    assert r.json()["users"] == 2 and r.json()["blocked"] == 0
    r = await admin.get("/limited")
    assert r.status_code == 200 and r.json()["limited"] == []
    r = await admin.get("/users/42")
    assert r.json()["username"] == "alice" and r.json()["blocked"] is False

    r = await admin.post("/users/bob/block")
    assert r.status_code == 200 and r.json()["blocked"] is True
    r = await admin.post("/users/bob/unblock")
    assert r.status_code == 200 and r.json()["blocked"] is False


async def _keys_and_limits(broker: RunningBroker, admin: httpx.AsyncClient) -> None:
    r = await admin.get("/users/alice/keys")
    keys = r.json()["keys"]
    assert [k["name"] for k in keys] == ["default"]
    fields = {"name", "prefix", "created", "last_used", "models", "expires", "expired", "label"}
    assert set(keys[0]) == fields  # never a hash
    scoped = {"models": ["m1", "m2"], "expires": "30d", "label": "ci"}
    r = await admin.post(f"/users/alice/keys/{keys[0]['prefix']}/scope", json=scoped)
    assert r.status_code == 200, r.text
    key = r.json()["key"]
    assert (key["models"], key["label"], key["expired"]) == (["m1", "m2"], "ci", False)
    assert key["expires"] is not None
    r = await admin.post(f"/users/alice/keys/{keys[0]['prefix']}/scope", json={"expires": "x"})
    assert r.status_code == 400, r.text
    r = await admin.post(f"/users/alice/keys/{keys[0]['prefix']}/scope", json={"models": "m1"})
    assert r.status_code == 400, r.text
    r = await admin.put(
        "/users/alice/limits", json={"limits": {"rpm": 30, "daily_tokens": "unlimited"}}
    )
    assert r.status_code == 200, r.text
    assert r.json()["limits"] == {"rpm": 30, "daily_tokens": "unlimited"}
    r = await admin.get("/users/alice/limits")
    assert r.json()["limits"]["rpm"] == 30 and "defaults" in r.json()
    prefix = keys[0]["prefix"]
    r = await admin.delete(f"/users/alice/keys/{prefix}")
    assert r.status_code == 200 and r.json()["revoked"]["prefix"] == prefix
    assert broker.server.state.users.users[0].keys == []
    r = await admin.delete(f"/users/alice/keys/{prefix}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def _connectors(broker: RunningBroker, admin: httpx.AsyncClient) -> list[str]:
    first, second = await _enroll(broker, "a" * 48), await _enroll(broker, "b" * 48)
    r = await admin.get("/connectors")
    listed = {e["id"]: e for e in r.json()["enrollments"]}
    assert listed[first]["status"] == "pending" and listed[first]["fingerprint"]
    assert "token_sha256" not in listed[first] and "secret_sha256" not in listed[first]
    r = await admin.post(f"/connectors/{first}/approve")
    assert r.status_code == 200 and r.json()["status"] == "approved"
    r = await admin.put(f"/connectors/{first}/llm-key", json={"llm_api_key": "sk-up"})
    assert r.json()["llm_api_key_set"] is True and "sk-up" not in r.text
    r = await admin.post(f"/connectors/{second}/reject")
    assert r.json()["status"] == "rejected"
    r = await admin.post(f"/connectors/{first}/revoke")
    assert r.json()["status"] == "revoked"
    r = await admin.get("/queues")
    assert r.status_code == 200 and r.json()["queues"] == []
    return [first, second]


async def _reports(broker: RunningBroker, admin: httpx.AsyncClient) -> None:
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    body = {"model": "nobody-serves-this", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(trust_env=False) as client:
        r = await client.post(f"{broker.url}/v1/chat/completions", json=body, headers=headers)
    assert r.status_code >= 400
    found: list[dict[str, Any]] = []

    async def logged() -> bool:
        found[:] = (await admin.get("/requests")).json()["requests"]
        return bool(found)

    deadline = time.monotonic() + 15
    while not await logged():
        assert time.monotonic() < deadline, "the request never reached the request log"
        await asyncio.sleep(0.2)
    assert found[0]["model"] == "nobody-serves-this" and found[0]["status"] == r.status_code
    r = await admin.get("/limited")
    assert any(row["subject"].startswith("u-") for row in r.json()["limited"])
    r = await admin.get("/usage", params={"period": "1d"})
    assert r.status_code == 200 and r.json()["total"]["requests"] == 1
    r = await admin.get("/usage", params={"period": "2y"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value"


EXPECTED = [
    "admin_token.create",
    "admin_token.create",
    "user.block",
    "user.unblock",
    "key.scope",
    "limits.set",
    "key.revoke",
    "connector.approve",
    "connector.llm_key",
    "connector.reject",
    "connector.revoke",
]


async def test_every_endpoint_changes_and_reports_and_each_change_is_audited(
    tmp_path: Path,
) -> None:
    data = tmp_path / "b"
    seed_users(data / "users.yaml", (42, "alice"), (7, "bob"))
    write = await create_token(data, "write", "ops")
    read = await create_token(data, "read", "dashboards")
    broker = await start_broker(data, allow_enrollment=True)
    try:
        async with admin_client(broker.url, write) as admin:
            await _users(admin)
            await _keys_and_limits(broker, admin)
            ids = await _connectors(broker, admin)
            await _reports(broker, admin)
        async with admin_client(broker.url, read) as reader:
            r = await reader.get("/audit", params={"limit": 100})
            paged = await reader.get("/audit", params={"limit": 2, "offset": 1})
        assert r.status_code == 200
        newest_first = r.json()["entries"]
        assert [e["action"] for e in reversed(newest_first)] == EXPECTED
        write_id = newest_first[-1]["target"]
        assert newest_first[0]["actor"] == f"admin-token:{write_id}"
        assert newest_first[0]["address"] == "127.0.0.1"
        assert newest_first[0]["target"] == ids[0]
        assert write not in r.text and read not in r.text  # never a secret
        assert paged.json()["entries"] == newest_first[1:3]
    finally:
        await broker.stop()
    # It survives the restart: the CLI reads the same database, oldest first.
    done = await asyncio.to_thread(cli, data, "audit", "--format", "json")
    assert done.returncode == 0, done.stderr
    actions = [e["action"] for e in json.loads(done.stdout)["entries"]]
    assert actions == EXPECTED


async def test_the_openapi_document_is_served_and_lists_the_routes(tmp_path: Path) -> None:
    broker = await start_broker(tmp_path / "b")
    try:
        async with admin_client(broker.url, None) as anyone:
            r = await anyone.get("/openapi.json")
        assert r.status_code == 200
        doc = r.json()
        assert doc["openapi"] == "3.1.0"
        assert "/admin/v1/users/{user}/limits" in doc["paths"]
        assert doc["paths"]["/admin/v1/users/{user}/block"]["post"]["x-scope"] == "write"
    finally:
        await broker.stop()
