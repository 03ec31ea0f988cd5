"""The operator's pages (/portal/admin) in headless Chromium against a real broker, a real
connector, the fake LLM and the fake GitLab; screenshots go to the artifacts directory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from playwright.async_api import Browser, BrowserContext, Page, expect

from connector.enroll import enroll
from connector.errors import EnrollmentRefused
from connector.settings import ConnectorSettings
from shared.bench.upstream import FakeLLM
from tests.portal.fake_gitlab import FakeGitLab, FakeUser
from tests.portal.helpers import ask, csrf_of, login, new_key_of, portal_client
from tests.portal.test_browser import DESKTOP, Watch, shoot
from tests.support.net import wait_for
from tests.support.stack import Stack, start_connector

ADMIN = FakeUser(1001, "alice", "Alice A.", ["team"])
BOB = FakeUser(2002, "bob", "Bob B.", ["team"])


@pytest.fixture
def portal_overrides(tmp_path: Path) -> dict[str, Any]:
    prices = tmp_path / "models.yaml"
    prices.write_text(
        "currency: EUR\nmodels:\n  fake-model:\n"
        "    input_per_million: 1000\n    output_per_million: 2000\n",
        encoding="utf-8",
    )
    return {"admins": ["alice"], "allow_enrollment": True, "models_file": prices}


@pytest.fixture
async def context(browser: Browser, portal_stack: Stack) -> AsyncIterator[BrowserContext]:
    ctx = await browser.new_context(base_url=portal_stack.broker.url, viewport=DESKTOP)
    yield ctx
    await ctx.close()


async def log_in_as(page: Page, gitlab: FakeGitLab, user: FakeUser, path: str) -> None:
    gitlab.user = user
    await page.goto(f"/portal/?next={path}")
    await page.click("#login")
    await page.wait_for_url("**/portal/**")  # a first login shows the new key first
    if not page.url.endswith(path):
        await page.goto(path)


async def bob_key(stack: Stack, gitlab: FakeGitLab) -> str:
    """Bob logs in once (over plain HTTP) and gets his first key."""
    gitlab.user = BOB
    async with portal_client(stack) as client:
        done = await login(client)
        page = await client.get(done.headers["location"])
    gitlab.user = ADMIN
    return new_key_of(page.text)


async def test_admin_sees_every_section_and_non_admins_get_a_403_page(
    context: BrowserContext, portal_stack: Stack, fake_gitlab: FakeGitLab, artifacts: Path
) -> None:
    page = await context.new_page()
    watch = Watch(page)
    await log_in_as(page, fake_gitlab, BOB, "/portal/keys")
    assert await page.locator("nav >> text=admin").count() == 0
    response = await page.goto("/portal/admin")
    assert response is not None and response.status == 403
    await expect(page.locator("h1")).to_have_text("! Only for the broker's operators")
    await expect(page.locator("#todo")).to_contain_text("--admin")
    await page.screenshot(path=str(artifacts / "admin-403.png"))
    await page.context.clear_cookies()

    await log_in_as(page, fake_gitlab, ADMIN, "/portal/keys")
    await page.click("nav >> text=admin")  # admins find the link on their own pages
    await expect(page.locator("#overview")).to_contain_text("fake-model")
    await shoot(page, artifacts, "admin-overview")
    await page.click(".tabs >> text=users")
    await expect(page.locator("#users tr[data-user=bob] .status")).to_have_text("active")
    await expect(page.locator("#users tr[data-user=alice]")).to_contain_text("default")
    await shoot(page, artifacts, "admin-users")
    await page.click(".tabs >> text=connectors")
    (conn,) = portal_stack.connectors
    row = page.locator(f"#sessions tr[data-connector='{conn.connector.settings.name}']")
    await expect(row).to_contain_text("fake-model")
    await expect(row).to_contain_text("stream /")  # upload mode / poll mode
    await expect(row).to_contain_text("token")  # identity: a static connector token
    await shoot(page, artifacts, "admin-connectors")
    response = await page.goto("/portal/admin/queues")
    assert response is not None
    assert "script-src 'self'" in (await response.all_headers())["content-security-policy"]
    await expect(page.locator("#queues tr[data-model=fake-model] .depth")).to_have_text("0")
    await shoot(page, artifacts, "admin-queues")
    assert watch.errors == [] or all("Failed to load resource" in e for e in watch.errors)


async def test_queues_show_waiting_requests_per_user(
    context: BrowserContext,
    portal_stack: Stack,
    fake_gitlab: FakeGitLab,
    fake_llm: FakeLLM,
    artifacts: Path,
) -> None:
    key = await bob_key(portal_stack, fake_gitlab)
    fake_llm.chunk_delay = 0.2
    # The stack's one connector has capacity 4: the fifth and sixth request wait.
    client = openai.AsyncOpenAI(base_url=portal_stack.base_url, api_key=key, max_retries=0)
    calls = [
        asyncio.create_task(
            client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "tokens:30"}]
            )
        )
        for _ in range(6)
    ]
    try:
        core = portal_stack.broker.hub.core
        await wait_for(lambda: sum(core.queue_depth().values()) == 2, timeout=10)
        page = await context.new_page()
        await log_in_as(page, fake_gitlab, ADMIN, "/portal/admin/queues")
        row = page.locator("#queues tr[data-model=fake-model]")
        await expect(row.locator(".depth")).to_have_text("2")
        await expect(row).to_contain_text("bob: 2")
        await shoot(page, artifacts, "admin-queues-busy")
    finally:
        fake_llm.chunk_delay = 0.0
        await asyncio.gather(*calls, return_exceptions=True)
        await client.close()


async def test_block_and_unblock_through_the_forms(
    context: BrowserContext, portal_stack: Stack, fake_gitlab: FakeGitLab
) -> None:
    key = await bob_key(portal_stack, fake_gitlab)
    assert await ask(portal_stack, key)
    page = await context.new_page()
    await log_in_as(page, fake_gitlab, ADMIN, "/portal/admin/users")
    bob = page.locator("#users tr[data-user=bob]")
    await bob.locator("button.block").click()
    await expect(page.locator("#done")).to_contain_text("blocked")
    await expect(bob.locator(".status")).to_have_text("blocked")
    with pytest.raises(openai.PermissionDeniedError):
        await ask(portal_stack, key)
    await bob.locator("button.unblock").click()
    await expect(bob.locator(".status")).to_have_text("active")
    assert await ask(portal_stack, key)

    page.on("dialog", lambda d: d.accept())
    await bob.locator("button.revoke-key").click()
    await expect(page.locator("#done")).to_contain_text("revoked")
    with pytest.raises(openai.AuthenticationError):
        await ask(portal_stack, key)


async def test_bad_admin_input_gets_a_page_that_says_what_to_do(
    context: BrowserContext, portal_stack: Stack, fake_gitlab: FakeGitLab, artifacts: Path
) -> None:
    page = await context.new_page()
    await log_in_as(page, fake_gitlab, ADMIN, "/portal/admin/users")
    html = await page.content()
    csrf = csrf_of(html)
    cookies = {c["name"]: c["value"] for c in await context.cookies()}
    async with httpx.AsyncClient(base_url=portal_stack.broker.url, cookies=cookies) as client:
        cases = [
            ("/portal/admin/users/block", {"user": "nobody", "blocked": "1"}, 404, "No such user"),
            ("/portal/admin/users/block", {"user": "bob", "csrf_token": "f" * 64}, 403, "expired"),
            ("/portal/admin/users/block", {"user": "alice", "blocked": "1"}, 400, "yourself"),
            ("/portal/admin/enrollments/approve", {"id": "e-nothere"}, 404, "no enrollment"),
            ("/portal/admin/enrollments/llm-key", {"id": "e-nothere"}, 404, "no approved"),
        ]
        for path, form, status, words in cases:
            form.setdefault("csrf_token", csrf)
            r = await client.post(path, data=form)
            assert r.status_code == status, (path, r.text)
            assert words in r.text and "What to do" in r.text, r.text
            assert "Traceback" not in r.text
    # The same in the browser: a tampered form names the problem.
    await page.evaluate(
        'document.querySelector(\'#users tr[data-user=alice] form[action$="/block"] '
        "input[name=user]').value = 'ghost'"
    )
    await page.locator("#users tr[data-user=alice] button.block").click()
    await expect(page.locator("h1")).to_have_text("! No such user")
    await page.screenshot(path=str(artifacts / "admin-bad-input.png"))


def _enrolling(stack: Stack, llm: FakeLLM, name: str, data_dir: Path) -> ConnectorSettings:
    return ConnectorSettings(
        broker_url=stack.broker.url, llm_url=llm.url, name=name, data_dir=data_dir
    )


async def test_enrollment_approve_reject_llm_key_and_revoke_through_the_forms(
    context: BrowserContext,
    portal_stack: Stack,
    fake_gitlab: FakeGitLab,
    fake_llm: FakeLLM,
    tmp_path: Path,
    artifacts: Path,
) -> None:
    # Two real connectors ask to join (connector.enroll, as `remotellm-connector enroll`).
    good = _enrolling(portal_stack, fake_llm, "gpu-good", tmp_path / "good")
    bad = _enrolling(portal_stack, fake_llm, "gpu-bad", tmp_path / "bad")
    good_task = asyncio.create_task(enroll(good))
    bad_task = asyncio.create_task(enroll(bad))
    store = portal_stack.broker.server.state.enrollment
    assert store is not None
    await wait_for(lambda: len(store.entries) == 2, timeout=10)

    page = await context.new_page()
    page.on("dialog", lambda d: d.accept())
    await log_in_as(page, fake_gitlab, ADMIN, "/portal/admin")
    await expect(page.locator("#pending-count")).to_have_text("2")
    await page.click("#pending-count")
    pending = page.locator("#pending-list")
    await expect(pending.locator("li[data-name=gpu-good]")).to_contain_text("127.0.0.1")
    await expect(pending.locator("li[data-name=gpu-good]")).to_contain_text("fake-model")
    await shoot(page, artifacts, "admin-enrollment-pending")

    await pending.locator("li[data-name=gpu-bad] button.reject").click()
    await expect(page.locator("#done")).to_contain_text("Rejected")
    with pytest.raises(EnrollmentRefused, match="rejected"):
        await asyncio.wait_for(bad_task, 15)

    await pending.locator("li[data-name=gpu-good] button.approve").click()
    await expect(page.locator("#done")).to_contain_text("Approved")
    token = await asyncio.wait_for(good_task, 15)
    assert token is not None
    assert (tmp_path / "good" / "credentials").read_text().strip() == token

    # The enrolled connector registers with its token and serves.
    enrolled = await start_connector(
        portal_stack.broker.url, fake_llm.url, name="gpu-good", broker_token=token
    )
    portal_stack.connectors.append(enrolled)
    card = page.locator("#approved-list li[data-name=gpu-good]")
    await page.fill(f"#llm-key-{await card.get_attribute('data-enrollment')}", "sk-upstream-9")
    await card.locator("button.set-llm-key").click()
    await expect(page.locator("#done")).to_contain_text("upstream LLM key")
    await expect(card.locator(".llm-key-state")).to_have_text("set")
    assert "sk-upstream-9" not in await page.content()  # a secret is not shown again
    ident = portal_stack.broker.server.state.keys.connector(token)
    assert ident is not None and ident.upstream_api_key == "sk-upstream-9"
    await page.goto("/portal/admin/connectors")
    await expect(page.locator("#sessions tr[data-connector=gpu-good]")).to_contain_text(
        "enrolled: gpu-good"
    )
    await shoot(page, artifacts, "admin-enrollment-approved")

    await card.locator("button.revoke").click()
    await expect(page.locator("#done")).to_contain_text("Revoked")
    await expect(page.locator("#sessions tr[data-connector=gpu-good]")).to_have_count(0)
    assert portal_stack.broker.server.state.keys.connector(token) is None
    await expect(page.locator("#closed")).to_contain_text("revoked")


async def test_usage_chart_and_the_request_log_finds_the_id_a_user_quotes(
    context: BrowserContext, portal_stack: Stack, fake_gitlab: FakeGitLab, artifacts: Path
) -> None:
    key = await bob_key(portal_stack, fake_gitlab)
    async with openai.AsyncOpenAI(
        base_url=portal_stack.base_url, api_key=key, max_retries=0
    ) as client:
        for _ in range(2):
            await client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "tokens:4"}]
            )
        raw = await client.chat.completions.with_raw_response.create(
            model="fake-model", messages=[{"role": "user", "content": "tokens:6"}]
        )
    quoted = raw.headers["x-request-id"]
    usage = portal_stack.broker.server.state.usage
    assert usage is not None
    await wait_for(lambda: usage.written >= 3, timeout=10)

    page = await context.new_page()
    watch = Watch(page)
    await log_in_as(page, fake_gitlab, ADMIN, "/portal/admin/usage")
    chart = page.locator("svg#tokens-chart")
    await expect(chart).to_have_attribute("role", "img")
    await expect(chart.locator("title").first).to_contain_text("Tokens per day, last 7d")
    assert await chart.locator("g.bar rect").count() >= 1
    bob = page.locator("#usage-by-user tr[data-user=bob]")
    await expect(bob).to_contain_text("fake-model")
    await expect(bob.locator("td").nth(2)).to_have_text("3")  # requests
    await expect(page.locator("#usage-by-model thead")).to_contain_text("cost (EUR)")
    await page.select_option("select[name=period]", "30d")
    await page.click("#apply")
    await expect(page.locator("h1")).to_have_text("> usage, last 30d")
    await expect(page.locator("svg#tokens-chart g.bar")).to_have_count(31)
    await shoot(page, artifacts, "admin-usage")
    response = await page.goto("/portal/admin/usage?period=forever")
    assert response is not None and response.status == 400
    await expect(page.locator("#todo")).to_contain_text("1d, 7d or 30d")

    await page.goto("/portal/admin/requests")
    await expect(page.locator("#requests tbody tr")).to_have_count(3)
    await page.fill("#request-id", quoted)
    await page.click("#filter")
    rows = page.locator("#requests tbody tr")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_have_attribute("data-request-id", quoted)
    await expect(rows.first).to_contain_text("bob")
    await expect(rows.first.locator(".status")).to_have_text("200")
    await shoot(page, artifacts, "admin-requests")
    response = await page.goto("/portal/admin/requests?status=abc")
    assert response is not None and response.status == 400
    await expect(page.locator("#todo")).to_contain_text("status as a number")
    assert [e for e in watch.errors if not e.startswith("Failed to load resource")] == []


async def test_limits_edited_on_the_page_hold_and_show_who_is_limited(
    context: BrowserContext, portal_stack: Stack, fake_gitlab: FakeGitLab, artifacts: Path
) -> None:
    key = await bob_key(portal_stack, fake_gitlab)
    page = await context.new_page()
    await log_in_as(page, fake_gitlab, ADMIN, "/portal/admin/users")
    bob = page.locator("#users tr[data-user=bob]")
    await expect(bob.locator("td.limits")).to_contain_text("defaults")
    await bob.locator("details.limits-edit summary").click()
    await bob.locator("input[name=rpm]").fill("1")
    await bob.locator("button.save-limits").click()
    await expect(page.locator("#done")).to_contain_text("limits are saved")
    await expect(bob.locator("td.limits")).to_contain_text("requests / min: 1")

    assert await ask(portal_stack, key)
    with pytest.raises(openai.RateLimitError) as limited:
        await ask(portal_stack, key)
    assert limited.value.response.headers["x-ratelimit-limit-requests"] == "1"
    await page.goto("/portal/admin/users")
    row = page.locator("#limited tr", has_text="bob")
    await expect(row).to_contain_text("limited (rpm)")
    await shoot(page, artifacts, "admin-users-limited")

    await bob.locator("details.limits-edit summary").click()
    await bob.locator("input[name=tpm]").fill("-5")
    await bob.locator("button.save-limits").click()
    await expect(page.locator("h1")).to_have_text("! That cannot be done")
    await expect(page.locator("#what")).to_contain_text("tokens / min")
    await expect(page.locator("#what")).to_contain_text("whole number")
