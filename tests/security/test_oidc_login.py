"""OpenID Connect login against fake providers that sign real ID tokens: every forged,
stale or replayed answer is refused with a page that says what to do, and the broker
keeps serving. A real broker, connector and fake LLM; HTTP by hand (the browser test is
tests/portal/test_oidc_browser.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from broker.accounts.identities import oidc_user_id
from broker.accounts.users import UsersStore
from shared.bench.upstream import FakeLLM
from tests.portal.helpers import login, new_key_of
from tests.support.fake_oidc import FakeOidc, OidcUser
from tests.support.net import free_port
from tests.support.oidc_portal import providers_file
from tests.support.stack import Stack, start_broker, start_connector


@pytest.fixture
async def acme() -> AsyncIterator[FakeOidc]:
    fake = FakeOidc(groups_claim="realm_access.roles")  # Keycloak's place for roles
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def other() -> AsyncIterator[FakeOidc]:
    # The same user "sub" as acme's: must become another portal user. Only takes the
    # secret in the form (acme: HTTP Basic, OpenID Connect's default).
    fake = FakeOidc(auth_methods=["client_secret_post"])
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def stack(
    tmp_path: Path, acme: FakeOidc, other: FakeOidc, fake_llm: FakeLLM
) -> AsyncIterator[Stack]:
    dead = FakeOidc(port=free_port())  # never started: its discovery cannot be fetched
    path = providers_file(tmp_path / "conf", {"acme": acme, "other": other, "dead": dead})
    broker = await start_broker(tmp_path / "broker", oidc_providers_file=path)
    conn = await start_connector(broker.url, fake_llm.url)
    yield Stack(broker, [conn])
    await conn.stop()
    await broker.stop()


def client(stack: Stack) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.broker.url, timeout=15.0)


def users(stack: Stack) -> UsersStore:
    return UsersStore(stack.broker.settings.users_path)


async def refused(stack: Stack, provider: str, status: int, title: str) -> httpx.Response:
    async with client(stack) as c:
        answer = await login(c, start_at=f"/portal/login/{provider}")
    assert answer.status_code == status, answer.text
    assert title in answer.text
    assert "Traceback" not in answer.text
    assert "remotellm_portal=" not in answer.headers.get("set-cookie", "")  # no session
    return answer


async def test_a_login_gets_a_working_key_and_sub_is_the_identity(
    stack: Stack, acme: FakeOidc, other: FakeOidc
) -> None:
    async with client(stack) as c:
        page = await c.get("/portal/")
        assert "Log in with Acme SSO" in page.text and "Log in with Other SSO" in page.text
        answer = await login(c, start_at="/portal/login/acme")
        assert answer.status_code == 303 and "/portal/keys?reveal=" in answer.headers["location"]
        key = new_key_of((await c.get(answer.headers["location"])).text)
        models = await c.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert models.status_code == 200 and models.json()["data"][0]["id"] == "fake-model"
    async with client(stack) as c:  # the same sub at another provider: another user
        assert (await login(c, start_at="/portal/login/other")).status_code == 303
    found = {(u.provider, u.subject): u for u in users(stack).users}
    first, second = found[("acme", "u-7f3a")], found[("other", "u-7f3a")]
    assert first.gitlab_id == oidc_user_id("acme", "u-7f3a") < 0
    assert first.gitlab_id != second.gitlab_id and first.user_id != second.user_id
    assert (first.username, first.name) == ("bob", "Bob B.")
    assert acme.discovery_requests == 1  # cached for the next login
    assert (acme.client_auth, other.client_auth) == (["basic"], ["post"])


@pytest.mark.parametrize(
    ("misbehave", "status", "title"),
    [
        ("wrong_key", 502, "answer failed its checks"),
        ("wrong_aud", 502, "answer failed its checks"),
        ("wrong_iss", 502, "answer failed its checks"),
        ("expired", 400, "The login answer has expired"),
    ],
)
async def test_a_forged_or_stale_id_token_is_refused(
    stack: Stack, acme: FakeOidc, misbehave: str, status: int, title: str
) -> None:
    acme.misbehave = misbehave
    await refused(stack, "acme", status, title)
    assert users(stack).users == []
    acme.misbehave = None  # the broker keeps serving: a good token logs in
    async with client(stack) as c:
        assert (await login(c, start_at="/portal/login/acme")).status_code == 303


async def test_a_replayed_nonce_is_refused(stack: Stack, acme: FakeOidc) -> None:
    async with client(stack) as c:
        assert (await login(c, start_at="/portal/login/acme")).status_code == 303
    acme.misbehave = "replay_nonce"  # an ID token of the first login, replayed
    answer = await refused(stack, "acme", 400, "This login answer was used already")
    assert "Start again from the login page" in answer.text


async def test_a_replayed_callback_is_refused_before_the_provider_is_asked(
    stack: Stack, acme: FakeOidc
) -> None:
    async with client(stack) as c:
        start = await c.get("/portal/login/acme")
        flow_cookie = dict(c.cookies)
        back = (await c.get(start.headers["location"])).headers["location"]
        assert (await c.get(back)).status_code == 303
    asked = acme.token_requests
    async with client(stack) as thief:  # the callback URL and flow cookie, captured
        thief.cookies.update(flow_cookie)
        again = await thief.get(back)
    assert again.status_code == 400 and "used already" in again.text
    assert acme.token_requests == asked


async def test_an_answer_for_another_provider_is_refused(stack: Stack) -> None:
    async with client(stack) as c:
        start = await c.get("/portal/login/acme")
        back = (await c.get(start.headers["location"])).headers["location"]
        mixed = await c.get(back.replace("/callback/acme", "/callback/other"))
    assert mixed.status_code == 400 and "This login link has expired" in mixed.text


async def test_a_provider_that_is_down_gets_a_page(stack: Stack, acme: FakeOidc) -> None:
    async with client(stack) as c:
        dead = await c.get("/portal/login/dead")
    assert dead.status_code == 502 and "Dead SSO is not answering" in dead.text
    acme.token_status = 503
    await refused(stack, "acme", 502, "Acme SSO is not answering")


async def test_a_user_outside_the_allowed_groups_is_refused(stack: Stack, acme: FakeOidc) -> None:
    acme.user = OidcUser(groups=["interns"])
    answer = await refused(stack, "acme", 403, "Not allowed here")
    assert "Ask the operator to add you" in answer.text
    assert users(stack).users == []


async def test_an_unknown_provider_and_a_denied_consent(stack: Stack, acme: FakeOidc) -> None:
    async with client(stack) as c:
        missing = await c.get("/portal/login/nope")
    assert missing.status_code == 404 and "No such login" in missing.text
    acme.deny = True
    await refused(stack, "acme", 403, "Login cancelled")
