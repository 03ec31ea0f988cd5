"""Scoped and expiring keys in headless Chromium: a user limits their key to one model and
a minute, the SDK is refused another model at once and everything after the minute."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from playwright.async_api import Browser, BrowserContext, Page, expect

from tests.portal.helpers import sdk
from tests.support.stack import Stack

HI = [{"role": "user", "content": "hi"}]
DAY = 86400


@pytest.fixture
def llm_models() -> list[str]:
    return ["fake-model", "other-model"]


@pytest.fixture
def portal_overrides() -> dict[str, Any]:
    return {"max_key_lifetime": DAY}


@pytest.fixture
async def page(browser: Browser, portal_stack: Stack) -> AsyncIterator[Page]:
    ctx: BrowserContext = await browser.new_context(base_url=portal_stack.broker.url)
    page = await ctx.new_page()
    page.on("dialog", lambda d: d.accept())
    yield page
    await ctx.close()


async def _scope(page: Page, models: str, expires: str, label: str) -> None:
    key = page.locator("li.key[data-key-name=default]")
    await key.locator("details.scope-edit summary").click()
    await key.locator("input.scope-models").fill(models)
    await key.locator("input.scope-expires").fill(expires)
    await key.locator("input.scope-label").fill(label)
    await key.locator("button.save-scope").click()


async def _chat(stack: Stack, key: str, model: str) -> None:
    async with sdk(stack, key) as client:
        await client.chat.completions.create(model=model, messages=HI, max_tokens=1)


async def test_a_key_scoped_in_the_portal_is_refused_for_another_model_and_after_its_minute(
    page: Page, portal_stack: Stack
) -> None:
    await page.goto("/portal/")
    await page.click("#login")
    await page.wait_for_url("**/portal/keys*")
    key = (await page.text_content("#new-key") or "").strip()
    default = page.locator("li.key[data-key-name=default]")
    # The operator's cap gave the first key an expiry; the page says so.
    await expect(default.locator(".key-expiry")).to_contain_text("expires")
    await expect(page.locator("#allowance")).to_contain_text("keys live at most 1d")

    # Hostile or out-of-bounds input: a page that says what to do, nothing saved.
    await _scope(page, "fake-model", "never", "")
    await expect(page.locator("#error")).to_contain_text("Keys here must expire")
    await _scope(page, "fake-model, <b>x</b>", "1m", "")
    await expect(page.locator("#error")).to_contain_text("list model names")
    await _scope(page, "fake-model", "1 year", "")
    await expect(page.locator("#error")).to_contain_text("90m, 12h, 30d, 2w")
    await expect(default.locator(".key-models")).to_have_text("all models")

    scoped_at = time.time()
    await _scope(page, "fake-model", "1m", "browser test")
    await page.wait_for_url("**/portal/keys")
    await expect(default.locator(".key-models")).to_contain_text("fake-model")
    await expect(default.locator(".key-label")).to_have_text("browser test")

    async def refused_other() -> openai.PermissionDeniedError:
        for _ in range(100):  # the broker reads the users file again within a second
            try:
                await _chat(portal_stack, key, "other-model")
            except openai.PermissionDeniedError as exc:
                return exc
            await asyncio.sleep(0.1)
        raise AssertionError("the scope was not applied")

    refused = await refused_other()
    assert refused.status_code == 403 and refused.code == "model_not_allowed"
    await _chat(portal_stack, key, "fake-model")
    async with sdk(portal_stack, key) as client:
        assert [m.id for m in (await client.models.list()).data] == ["fake-model"]

    deadline = scoped_at + 90
    while True:
        try:
            await _chat(portal_stack, key, "fake-model")
        except openai.AuthenticationError as exc:
            assert exc.code == "key_expired"
            break
        assert time.time() < deadline, "the key still worked after its minute"
        await asyncio.sleep(0.5)
    assert time.time() >= scoped_at + 59
    await page.goto("/portal/keys")
    await expect(default.locator(".key-expiry")).to_contain_text("expired")

    # Regenerated: a fresh secret with the same scope and a minute again, not "never".
    await default.locator("button.regenerate").click()
    await expect(page.locator("#reveal-title")).to_contain_text("default")
    fresh = (await page.text_content("#new-key") or "").strip()
    await expect(default.locator(".key-expiry")).not_to_contain_text("expired")
    await expect(default.locator(".key-models")).to_contain_text("fake-model")
    for _ in range(100):
        try:
            await _chat(portal_stack, fresh, "fake-model")
            break
        except openai.AuthenticationError:
            await asyncio.sleep(0.1)
    with pytest.raises(openai.PermissionDeniedError):
        await _chat(portal_stack, fresh, "other-model")
