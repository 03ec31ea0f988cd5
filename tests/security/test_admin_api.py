"""The admin API refuses what it must: no token, a wrong or revoked one, a read token
writing, a portal login cookie instead of a token, oversized or malformed bodies, IDs of
the wrong shape. Each refusal is OpenAI's error envelope, nothing changes, the broker keeps
serving, and nothing refused reaches the audit trail."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.admin.bodies import MAX_BODY
from tests.portal.fake_gitlab import CLIENT_ID, CLIENT_SECRET, FakeGitLab, FakeUser
from tests.portal.helpers import login
from tests.support.admin import admin_client, cli, create_token, seed_users
from tests.support.stack import RunningBroker, start_broker

ADMIN = FakeUser(1001, "alice", "Alice A.", ["team"])


@pytest.fixture
async def gitlab() -> AsyncIterator[FakeGitLab]:
    fake = FakeGitLab()
    fake.user = ADMIN
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def broker(tmp_path: Path, gitlab: FakeGitLab) -> AsyncIterator[RunningBroker]:
    data = tmp_path / "b"
    seed_users(data / "users.yaml", (1001, "alice"), (7, "bob"))
    running = await start_broker(
        data,
        gitlab_url=gitlab.url,
        gitlab_client_id=CLIENT_ID,
        gitlab_client_secret=CLIENT_SECRET,
        gitlab_allow_any_user=True,
        admin_ids=[1001],
    )
    yield running
    await running.stop()


def _refused(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert "Traceback" not in r.text
    return dict(error)


async def _audited(broker: RunningBroker) -> list[str]:
    done = await asyncio.to_thread(cli, broker.settings.data_dir, "audit", "--format", "csv")
    assert done.returncode == 0, done.stderr
    return [line.split(",")[3] for line in done.stdout.splitlines()[1:]]


async def test_no_token_a_wrong_one_and_a_revoked_one_get_401(broker: RunningBroker) -> None:
    data = broker.settings.data_dir
    token = await create_token(data, "read")
    for header in (None, "Bearer rla-" + "0" * 48, "Basic YWxpY2U6eA==", "Bearer " + "x" * 5000):
        async with httpx.AsyncClient(base_url=broker.url, trust_env=False) as client:
            headers = {"Authorization": header} if header else {}
            r = await client.get("/admin/v1/users", headers=headers)
        error = _refused(r, 401, "invalid_admin_token")
        assert "admin-tokens create" in error["message"]
        assert r.headers["www-authenticate"].startswith("Bearer")
    async with admin_client(broker.url, token) as admin:
        assert (await admin.get("/users")).status_code == 200
        listing = (await asyncio.to_thread(cli, data, "admin-tokens", "list")).stdout
        token_id = re.findall(r"^(at-[0-9a-f]{8}) ", listing, re.MULTILINE)[0]
        done = await asyncio.to_thread(cli, data, "admin-tokens", "revoke", token_id)
        assert done.returncode == 0, done.stderr
        _refused(await admin.get("/users"), 401, "invalid_admin_token")
    listed = (await asyncio.to_thread(cli, data, "admin-tokens", "list")).stdout
    assert token not in listed and token_id in listed  # still listed, as revoked


async def test_a_read_token_cannot_write_and_nothing_changes(broker: RunningBroker) -> None:
    token = await create_token(broker.settings.data_dir, "read")
    async with admin_client(broker.url, token) as admin:
        for method, path, body in (
            ("POST", "/users/bob/block", None),
            ("PUT", "/users/bob/limits", {"limits": {"rpm": 1}}),
            ("DELETE", "/users/bob/keys/default", None),
            ("POST", "/connectors/e-00000000/approve", None),
        ):
            r = await admin.request(method, path, json=body)
            _refused(r, 403, "read_only_token")
    bob = broker.server.state.users.users[1]
    assert not bob.blocked and bob.limits is None and len(bob.keys) == 1
    assert await _audited(broker) == ["admin_token.create"]


async def test_a_portal_admin_cookie_does_not_authenticate_the_admin_api(
    broker: RunningBroker,
) -> None:
    async with httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False) as client:
        done = await login(client)
        assert done.status_code in (302, 303)
        assert (await client.get("/portal/admin/users")).status_code == 200  # a real admin
        _refused(await client.get("/admin/v1/users"), 401, "invalid_admin_token")
        _refused(await client.post("/admin/v1/users/bob/block"), 401, "invalid_admin_token")
    assert not broker.server.state.users.users[1].blocked


async def test_hostile_bodies_and_ids_are_refused_clearly(broker: RunningBroker) -> None:
    token = await create_token(broker.settings.data_dir, "write")
    async with admin_client(broker.url, token) as admin:
        big = b'{"limits": {}, "key": "' + b"x" * MAX_BODY + b'"}'
        _refused(await admin.put("/users/bob/limits", content=big), 413, "request_too_large")

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
            for _ in range(MAX_BODY // 1024 + 2):
                yield b" " * 1024

        _refused(await admin.put("/users/bob/limits", content=chunks()), 413, "request_too_large")
        for body in (b"not json", b"[1]", b'{"limits": {"rpm": 1}, "admin": true}'):
            _refused(await admin.put("/users/bob/limits", content=body), 400, "invalid_value")
        bad_limits = {"limits": {"rpm": 1, "gpu_hours": 3}}
        _refused(await admin.put("/users/bob/limits", json=bad_limits), 400, "invalid_value")
        r = await admin.put("/users/bob/limits", json={"limits": {"rpm": -5}})
        _refused(r, 400, "refused")
        _refused(await admin.get("/users/..%2F..%2Fetc"), 404, "unknown_url")  # no route
        _refused(await admin.get("/users/al%20ice!"), 400, "invalid_value")
        _refused(await admin.get("/users/" + "a" * 300), 400, "invalid_value")
        _refused(await admin.get("/users/nobody"), 404, "not_found")
        _refused(await admin.post("/connectors/..%00/approve"), 400, "invalid_value")
        _refused(await admin.post("/connectors/e-00000000/approve"), 404, "not_found")
        _refused(await admin.delete("/users/bob/keys/<script>"), 400, "invalid_value")
        _refused(await admin.get("/audit", params={"limit": "1e9"}), 400, "invalid_value")
        _refused(await admin.get("/audit", params={"actor": "a\x00b"}), 400, "invalid_value")
        _refused(await admin.get("/nothing-here"), 404, "unknown_url")
        _refused(await admin.delete("/users"), 405, "method_not_allowed")
        assert (await admin.get("/users")).status_code == 200  # still serving
    bob = broker.server.state.users.users[1]
    assert bob.limits is None
    assert await _audited(broker) == ["admin_token.create"]
