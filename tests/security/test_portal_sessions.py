"""Portal sessions end on the server: logout, block, key revoke, leaving the group.

A real broker with the portal on, logged in through the fake GitLab on loopback. The
attacker holds a copy of a session cookie (a shared computer, a stolen cookie jar, a user
the operator blocked or who left the allowed group) and replays it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.settings import BrokerSettings
from tests.portal.fake_gitlab import CLIENT_ID, CLIENT_SECRET, FakeGitLab, FakeUser
from tests.portal.helpers import csrf_of, login
from tests.support.redis_server import RedisServer, unique_prefix
from tests.support.stack import RunningBroker, start_broker

ALICE = FakeUser(1001, "alice", "Alice", ["acme"])
BOB = FakeUser(2002, "bob", "Bob", ["acme"])
COOKIE = "remotellm_portal"


def fresh(user: FakeUser) -> FakeUser:
    return FakeUser(user.id, user.username, user.name, list(user.groups))


@pytest.fixture
async def gitlab() -> AsyncIterator[FakeGitLab]:
    fake = FakeGitLab(user=fresh(ALICE))
    await fake.start()
    yield fake
    await fake.stop()


async def portal(tmp_path: Path, gitlab: FakeGitLab, **extra: Any) -> RunningBroker:
    values: dict[str, Any] = {
        "gitlab_url": gitlab.url,
        "gitlab_client_id": CLIENT_ID,
        "gitlab_client_secret": CLIENT_SECRET,
        "gitlab_allowed_groups": ["acme"],
        "admin_ids": [ALICE.id],
    }
    values.update(extra)
    return await start_broker(tmp_path / "broker", **values)


async def logged_in(broker: RunningBroker, gitlab: FakeGitLab, user: FakeUser) -> httpx.AsyncClient:
    gitlab.user = fresh(user)
    client = httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False)
    assert (await login(client)).status_code == 303
    return client


async def replay(broker: RunningBroker, cookie: str, path: str = "/portal/keys") -> int:
    """The status a stolen copy of the cookie gets, from another client."""
    async with httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False) as other:
        other.cookies.set(COOKIE, cookie, path="/portal")
        return (await other.get(path)).status_code


async def test_logout_ends_the_session_for_every_copy_of_the_cookie(
    tmp_path: Path, gitlab: FakeGitLab
) -> None:
    broker = await portal(tmp_path, gitlab)
    try:
        client = await logged_in(broker, gitlab, ALICE)
        cookie = client.cookies[COOKIE]
        assert await replay(broker, cookie) == 200
        token = csrf_of((await client.get("/portal/keys")).text)
        assert (await client.post("/portal/logout", data={"csrf_token": token})).status_code == 303
        assert await replay(broker, cookie) == 303  # back to the login page
        await client.aclose()
    finally:
        await broker.stop()


async def test_block_and_key_revoke_by_an_admin_end_the_users_sessions(
    tmp_path: Path, gitlab: FakeGitLab
) -> None:
    broker = await portal(tmp_path, gitlab)
    try:
        bob = await logged_in(broker, gitlab, BOB)
        bob_cookie = bob.cookies[COOKIE]
        admin = await logged_in(broker, gitlab, ALICE)
        token = csrf_of((await admin.get("/portal/admin/users")).text)
        for blocked in ("1", "0"):  # block, then unblock at once
            r = await admin.post(
                "/portal/admin/users/block",
                data={"user": "bob", "blocked": blocked, "csrf_token": token},
            )
            assert r.status_code == 303, r.text
        assert await replay(broker, bob_cookie) == 303
        await bob.aclose()
        bob = await logged_in(broker, gitlab, BOB)
        bob_cookie = bob.cookies[COOKIE]
        r = await admin.post(
            "/portal/admin/users/revoke-key",
            data={"user": "bob", "key": "default", "csrf_token": token},
        )
        assert r.status_code == 303, r.text
        assert await replay(broker, bob_cookie) == 303
        await bob.aclose()
        await admin.aclose()
    finally:
        await broker.stop()


async def test_a_user_who_leaves_the_allowed_group_is_logged_out(
    tmp_path: Path, gitlab: FakeGitLab
) -> None:
    broker = await portal(tmp_path, gitlab, group_check_interval=1.0)
    try:
        client = await logged_in(broker, gitlab, ALICE)
        cookie = client.cookies[COOKIE]
        # GitLab's access tokens expire; the check renews it with the refresh token.
        gitlab.expire_access_tokens()
        await asyncio.sleep(1.2)
        assert await replay(broker, cookie) == 200
        assert gitlab.userinfo_requests >= 3  # login, the 401, the renewed check
        gitlab.user.groups.clear()  # removed from "acme" on GitLab
        await asyncio.sleep(1.2)
        assert await replay(broker, cookie) == 303
        await client.aclose()
    finally:
        await broker.stop()


async def test_admins_are_named_by_numeric_gitlab_id(tmp_path: Path, gitlab: FakeGitLab) -> None:
    broker = await portal(tmp_path, gitlab)
    try:
        admin = await logged_in(broker, gitlab, ALICE)
        assert (await admin.get("/portal/admin/users")).status_code == 200
        # Another account takes the name "alice" (after alice renamed herself): no admin.
        impostor = await logged_in(broker, gitlab, FakeUser(3003, "alice", "Mallory", ["acme"]))
        r = await impostor.get("/portal/admin/users")
        assert r.status_code == 403 and "--admin-id 3003" in r.text
        await admin.aclose()
        await impostor.aclose()
    finally:
        await broker.stop()


def test_a_portal_open_to_every_gitlab_account_must_be_asked_for(tmp_path: Path) -> None:
    base: dict[str, Any] = {"data_dir": tmp_path, "gitlab_client_id": "app"}
    with pytest.raises(ValueError, match="--gitlab-allow-any-user"):
        BrokerSettings(**base)
    assert BrokerSettings(**base, gitlab_allow_any_user=True).gitlab_allow_any_user
    assert BrokerSettings(**base, gitlab_allowed_groups=["acme"]).gitlab_allowed_groups


async def test_with_shared_redis_state_a_logout_or_block_on_one_broker_ends_it_on_all(
    tmp_path: Path, gitlab: FakeGitLab, shared_redis: RedisServer
) -> None:
    shared: dict[str, Any] = {
        "redis_url": shared_redis.url,
        "redis_prefix": unique_prefix(),
        "session_secret": "one-secret-for-both-brokers",
        "users_file": tmp_path / "users.yaml",
    }
    one = await portal(tmp_path / "a", gitlab, **shared)
    two = await portal(tmp_path / "b", gitlab, **shared)
    try:
        alice = await logged_in(one, gitlab, ALICE)
        cookie = alice.cookies[COOKIE]
        for _ in range(50):  # the other broker reads the new user from the file every 2 s
            if await replay(two, cookie) == 200:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the other broker never took the session")
        token = csrf_of((await alice.get("/portal/keys")).text)
        assert (await alice.post("/portal/logout", data={"csrf_token": token})).status_code == 303
        assert await replay(two, cookie) == 303
        bob = await logged_in(one, gitlab, BOB)
        admin = await logged_in(two, gitlab, ALICE)
        token = csrf_of((await admin.get("/portal/admin/users")).text)
        for blocked in ("1", "0"):
            r = await admin.post(
                "/portal/admin/users/block",
                data={"user": "bob", "blocked": blocked, "csrf_token": token},
            )
            assert r.status_code == 303, r.text
        assert await replay(one, bob.cookies[COOKIE]) == 303
        for client in (alice, bob, admin):
            await client.aclose()
    finally:
        await two.stop()
        await one.stop()
