"""The audit trail in headless Chromium: a user's own key actions and an admin's forms
appear on /portal/admin/audit newest first, under the strict CSP, and
``remotellm-broker audit`` shows the same actions oldest first."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, expect

from tests.portal.fake_gitlab import FakeGitLab
from tests.portal.test_admin_browser import ADMIN, bob_key, log_in_as
from tests.portal.test_browser import DESKTOP, Watch, shoot
from tests.support.admin import cli
from tests.support.stack import Stack

EXPECTED = ["key.create", "key.regenerate", "key.delete", "user.block", "user.unblock"]


@pytest.fixture
def portal_overrides() -> dict[str, Any]:
    return {"admins": ["alice"]}


@pytest.fixture
async def context(browser: Browser, portal_stack: Stack) -> AsyncIterator[BrowserContext]:
    ctx = await browser.new_context(base_url=portal_stack.broker.url, viewport=DESKTOP)
    yield ctx
    await ctx.close()


async def test_the_audit_page_and_the_cli_show_the_actions_in_order(
    context: BrowserContext, portal_stack: Stack, fake_gitlab: FakeGitLab, artifacts: Path
) -> None:
    await bob_key(portal_stack, fake_gitlab)  # bob exists, to be blocked
    page = await context.new_page()
    watch = Watch(page)
    page.on("dialog", lambda d: d.accept())
    await log_in_as(page, fake_gitlab, ADMIN, "/portal/keys")
    await page.fill("#key-name", "ci")
    await page.click("#create-key")
    await expect(page.locator("#new-key")).to_be_visible()
    await page.goto("/portal/keys")
    ci = page.locator("li.key[data-key-name=ci]")
    await ci.locator("button.regenerate").click()
    await expect(page.locator("#new-key")).to_be_visible()
    await page.goto("/portal/keys")
    await page.locator("li.key[data-key-name=ci] button.delete").click()
    await expect(page.locator("li.key[data-key-name=ci]")).to_have_count(0)

    await page.goto("/portal/admin/users")
    bob = page.locator("#users tr[data-user=bob]")
    await bob.locator("button.block").click()
    await expect(bob.locator(".status")).to_have_text("blocked")
    await bob.locator("button.unblock").click()
    await expect(bob.locator(".status")).to_have_text("active")

    response = await page.goto("/portal/admin/audit")
    assert response is not None and response.status == 200
    assert "script-src" in response.headers["content-security-policy"]
    actions = await page.locator("#audit tbody tr code.action").all_inner_texts()
    assert actions == list(reversed(EXPECTED))
    row = page.locator("#audit tbody tr").first
    await expect(row).to_contain_text("portal:gitlab-1001")
    await expect(row).to_contain_text("127.0.0.1")
    assert not re.search(r"sk-[0-9a-f]{32}", await page.content())  # prefixes only, no secret
    await expect(page.locator("nav.tabs a[aria-current=page]")).to_have_text("audit")
    await shoot(page, artifacts, "admin-audit")
    bad = await page.goto("/portal/admin/audit?page=0")
    assert bad is not None and bad.status == 400
    assert watch.errors == [] or all("Failed to load resource" in e for e in watch.errors)

    done = await asyncio.to_thread(
        cli, portal_stack.broker.settings.data_dir, "audit", "--format", "json"
    )
    assert done.returncode == 0, done.stderr
    assert [e["action"] for e in json.loads(done.stdout)["entries"]] == EXPECTED
