"""Scoped and expiring keys against a hostile user and several brokers.

Attacks: a user widens their key beyond what the operator allows them (their groups'
``key_defaults``, ``--max-key-lifetime``), scopes another user's key, regenerates an
expired key into one that never expires, posts without the CSRF token or with hostile
values; and a key narrowed on broker A keeps its old scope on broker B, which has its own
copy of the users file. Real brokers, the fake GitLab, a real redis-server.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.accounts.key_scope import ScopeAsk
from broker.accounts.users import UsersStore
from tests.portal.fake_gitlab import CLIENT_ID, CLIENT_SECRET, FakeGitLab, FakeUser
from tests.portal.helpers import csrf_of, login
from tests.scaleout.conftest import Cluster
from tests.security.test_data_revocations import (
    copies_of_one_users_file,
    status_on,
    users_cli,
    wait_status,
)
from tests.support.procs import Procs
from tests.support.redis_server import RedisServer
from tests.support.stack import RunningBroker, start_broker

ALICE = FakeUser(1001, "alice", "Alice", ["acme"])
GUEST = FakeUser(3003, "guest", "Guest", ["acme", "acme/guests"])
WEEK = 7 * 86400.0


@pytest.fixture
async def gitlab() -> AsyncIterator[FakeGitLab]:
    fake = FakeGitLab(user=ALICE)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def broker(tmp_path: Path, gitlab: FakeGitLab) -> AsyncIterator[RunningBroker]:
    users = UsersStore(tmp_path / "users.yaml")
    users.set_group_defaults("acme/guests", "small", "1d")
    running = await start_broker(
        tmp_path / "broker",
        users_file=users.path,
        gitlab_url=gitlab.url,
        gitlab_client_id=CLIENT_ID,
        gitlab_client_secret=CLIENT_SECRET,
        gitlab_allowed_groups=["acme"],
        max_key_lifetime=WEEK,
    )
    yield running
    await running.stop()


def store(broker: RunningBroker) -> UsersStore:
    settings = broker.settings
    return UsersStore(settings.users_path, max_key_lifetime=settings.max_key_lifetime)


async def session(broker: RunningBroker, gitlab: FakeGitLab, user: FakeUser) -> httpx.AsyncClient:
    gitlab.user = FakeUser(user.id, user.username, user.name, list(user.groups))
    client = httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False)
    assert (await login(client)).status_code == 303
    return client


async def post(client: httpx.AsyncClient, path: str, **form: str) -> httpx.Response:
    token = csrf_of((await client.get("/portal/keys")).text)
    return await client.post(path, data={"csrf_token": token, **form})


def key_of(broker: RunningBroker, username: str, name: str = "default") -> dict[str, Any]:
    user = next(u for u in store(broker).users if u.username == username)
    entry = user.key(name)
    assert entry is not None
    return entry.model_dump()


async def test_a_user_cannot_widen_their_key_beyond_the_operators_allowance(
    broker: RunningBroker, gitlab: FakeGitLab
) -> None:
    guest = await session(broker, gitlab, GUEST)
    first = key_of(broker, "guest")
    assert first["models"] == ["small"]  # the group's default, for the first key too
    assert first["expires"].timestamp() <= time.time() + 86400 + 5
    for form in (
        {"models": "big"},
        {"models": "small, big"},
        {"models": "small", "expires": "never"},
        {"models": "small", "expires": "8d"},
        {"models": "small", "expires": "2099-01-01"},
    ):
        refused = await post(guest, "/portal/keys/scope", name="default", **form)
        assert refused.status_code == 400, form
        assert (
            "may not use big" in refused.text
            or "must expire" in refused.text
            or ("at most 1w" in refused.text)
        )
    created = await post(guest, "/portal/keys", name="wide", models="big")
    assert created.status_code == 400 and "may not use big" in created.text
    # "All models" means all they may use, never more.
    assert (await post(guest, "/portal/keys", name="all", models="")).status_code == 303
    assert key_of(broker, "guest", "all")["models"] == ["small"]
    assert key_of(broker, "guest") == first
    await guest.aclose()


async def test_a_user_cannot_scope_another_users_key_or_use_the_admin_form(
    broker: RunningBroker, gitlab: FakeGitLab
) -> None:
    guest = await session(broker, gitlab, GUEST)
    alice = await session(broker, gitlab, ALICE)
    before = key_of(broker, "guest")
    # The form names a key of the logged-in user only; another user's name or prefix
    # finds nothing, and a smuggled "user" field is not read.
    for name in ("default", before["prefix"]):
        answer = await post(
            alice, "/portal/keys/scope", name=name, user="guest", models="big", expires="never"
        )
        assert answer.status_code in (303, 400)
    admin_form = await post(
        alice,
        "/portal/admin/users/scope-key",
        user="guest",
        key=before["prefix"],
        models="big",
        expires="never",
    )
    assert admin_form.status_code == 403 and "not an admin" in admin_form.text
    assert key_of(broker, "guest") == before
    await guest.aclose()
    await alice.aclose()


async def test_an_expired_key_is_not_regenerated_beyond_the_maximum_lifetime(
    broker: RunningBroker, gitlab: FakeGitLab
) -> None:
    alice = await session(broker, gitlab, ALICE)
    users = store(broker)
    users.set_scope("alice", "default", ScopeAsk(expiry="2020-01-01"))  # an operator's
    users.create_key(1001, "old", ScopeAsk())
    users.set_scope("alice", "old", ScopeAsk(expiry="never"))  # operators are not capped
    for name in ("default", "old"):
        renewed = await post(alice, "/portal/keys/regenerate", name=name)
        assert renewed.status_code == 303
        expires = key_of(broker, "alice", name)["expires"]
        assert expires is not None and expires.timestamp() <= time.time() + WEEK + 5
    await alice.aclose()


async def test_forged_or_hostile_scope_forms_are_refused_with_a_page(
    broker: RunningBroker, gitlab: FakeGitLab
) -> None:
    alice = await session(broker, gitlab, ALICE)
    before = key_of(broker, "alice")
    forged = await alice.post(
        "/portal/keys/scope", data={"name": "default", "models": "x", "expires": "never"}
    )
    assert forged.status_code == 403 and "Reload the page" in forged.text
    for form, says in (
        ({"label": "a\x1b[31m"}, "printable"),
        ({"label": "x" * 500}, "printable"),
        ({"models": ",".join(f"m{i}" for i in range(300))}, "at most 50"),
        ({"models": "qwen;rm$(id)"}, "model names"),
        ({"models": "-rf"}, "model names"),
        ({"expires": "2027-13-45"}, "real date"),
        ({"expires": "1e9d"}, "90m, 12h"),
        ({"expires": "-5m"}, "90m, 12h"),
    ):
        answer = await post(alice, "/portal/keys/scope", name="default", **form)
        assert answer.status_code == 400 and says in answer.text, (form, answer.text[-400:])
        assert "Traceback" not in answer.text
    assert key_of(broker, "alice") == before
    assert (await alice.get("/portal/keys")).status_code == 200  # still serving
    await alice.aclose()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with RedisServer() as redis:
        c = Cluster(Procs(), redis, tmp_path)
        try:
            yield c
        finally:
            await c.close()


@pytest.mark.e2e
async def test_a_scope_change_on_one_broker_reaches_the_other(cluster: Cluster) -> None:
    alice, bob = copies_of_one_users_file(cluster.root)
    a, b = await cluster.start(2)
    for key in (alice, bob):
        assert await status_on(b, key) == 404  # CHAT names a model nobody serves
    await users_cli(cluster.procs, a.data_dir, "scope", "alice", "default", "--models", "other")
    await users_cli(cluster.procs, a.data_dir, "scope", "bob", "default", "--expires", "2020-01-01")
    narrowed_after = await wait_status(b, alice, 403)
    expired_after = await wait_status(b, bob, 401)
    print(f"scope reached B in {narrowed_after:.2f} s, expiry in {expired_after:.2f} s")
    assert await status_on(a, alice) == 403 and await status_on(a, bob) == 401
    # Widened again on A: B follows (the last change any broker saw wins).
    await users_cli(cluster.procs, a.data_dir, "scope", "alice", "default", "--models", "*")
    await wait_status(b, alice, 404)
