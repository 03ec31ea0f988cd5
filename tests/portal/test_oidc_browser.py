"""Headless Chromium logs in through a fake OpenID Connect provider next to the fake
GitLab, gets a key, creates another and uses it with the openai SDK; a refused login
shows its page under the strict CSP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext, expect

from broker.accounts.users import UsersStore
from shared.bench.upstream import FakeLLM
from tests.portal.conftest import portal_settings
from tests.portal.fake_gitlab import FakeGitLab
from tests.portal.helpers import ask, sdk
from tests.portal.test_browser import DESKTOP, Watch, shoot
from tests.support.fake_oidc import FakeOidc
from tests.support.oidc_portal import providers_file
from tests.support.stack import Stack, start_broker, start_connector


@pytest.fixture
async def acme() -> AsyncIterator[FakeOidc]:
    fake = FakeOidc()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def stack(
    tmp_path: Path, fake_gitlab: FakeGitLab, acme: FakeOidc, fake_llm: FakeLLM
) -> AsyncIterator[Stack]:
    path = providers_file(tmp_path / "conf", {"acme": acme})
    settings = portal_settings(fake_gitlab, oidc_providers_file=path)
    broker = await start_broker(tmp_path / "broker", **settings)
    conn = await start_connector(broker.url, fake_llm.url)
    yield Stack(broker, [conn])
    await conn.stop()
    await broker.stop()


@pytest.fixture
async def context(browser: Browser, stack: Stack) -> AsyncIterator[BrowserContext]:
    ctx = await browser.new_context(base_url=stack.broker.url, viewport=DESKTOP)
    yield ctx
    await ctx.close()


async def test_oidc_login_gets_a_key_that_works_with_the_sdk(
    context: BrowserContext, stack: Stack, artifacts: Path
) -> None:
    page = await context.new_page()
    watch = Watch(page)
    await page.goto("/portal/")
    await expect(page.locator("#login")).to_have_text("Log in with GitLab")
    await expect(page.locator("#login-acme")).to_have_text("Log in with Acme SSO")
    await shoot(page, artifacts, "login-oidc")
    await page.click("#login-acme")
    await page.wait_for_url("**/portal/keys*")
    first = (await page.text_content("#new-key") or "").strip()
    assert first.startswith("sk-")
    await page.fill("#key-name", "sdk")
    await page.click("#create-key")
    await expect(page.locator("#reveal-title")).to_contain_text("sdk")
    key = (await page.text_content("#new-key") or "").strip()
    async with sdk(stack, key) as client:
        assert [m.id async for m in client.models.list()] == ["fake-model"]
    assert await ask(stack, key) == "tok0 tok1 tok2 tok3 tok4 "
    assert watch.errors == []

    # GitLab still logs in as before, as its own user with GitLab's numeric id.
    await page.click("nav >> text=log out")
    await page.wait_for_url("**/portal/")
    await page.click("#login")
    await page.wait_for_url("**/portal/keys*")
    found = {u.username: u for u in UsersStore(stack.broker.settings.users_path).users}
    assert found["alice"].gitlab_id == 1001 and found["alice"].provider is None
    assert found["bob"].provider == "acme" and found["bob"].gitlab_id < 0


async def test_a_forged_token_shows_what_to_do(
    context: BrowserContext, acme: FakeOidc, artifacts: Path
) -> None:
    acme.misbehave = "wrong_key"
    page = await context.new_page()
    watch = Watch(page)
    await page.goto("/portal/")
    await page.click("#login-acme")
    await expect(page.locator("h1")).to_contain_text("Acme SSO's answer failed its checks")
    await expect(page.locator("main")).to_contain_text("Start again from the login page")
    await shoot(page, artifacts, "oidc-refused")
    # Chromium reports the page's own 502; nothing else (no CSP violation, no script error).
    assert [e for e in watch.errors if "status of 502" not in e] == []
