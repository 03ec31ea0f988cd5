"""The portal in headless Chromium (Playwright) against a real broker, connector, fake LLM
and the fake GitLab: what a person does, start to finish."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from playwright.async_api import Browser, BrowserContext, Page, expect

from broker.accounts.users import UsersStore
from shared.bench.upstream import FakeLLM
from tests.portal.fake_gitlab import FakeGitLab, FakeUser
from tests.portal.helpers import ask
from tests.support.net import wait_for
from tests.support.stack import Stack

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}


@pytest.fixture
async def context(browser: Browser, portal_stack: Stack) -> AsyncIterator[BrowserContext]:
    ctx = await browser.new_context(
        base_url=portal_stack.broker.url,
        viewport=DESKTOP,
        permissions=["clipboard-read", "clipboard-write"],
    )
    yield ctx
    await ctx.close()


class Watch:
    """Console errors and CSP violations a page reports."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))


async def log_in(page: Page) -> None:
    await page.goto("/portal/")
    await page.click("#login")
    await page.wait_for_url("**/portal/keys*")


async def shoot(page: Page, artifacts: Path, name: str) -> None:
    for label, size in (("phone", PHONE), ("desktop", DESKTOP)):
        await page.set_viewport_size(size)
        await page.screenshot(path=str(artifacts / f"{name}-{label}.png"), full_page=True)
    await page.set_viewport_size(DESKTOP)


async def test_landing_page_renders_without_errors_and_leads_to_the_portal(
    context: BrowserContext, artifacts: Path
) -> None:
    page = await context.new_page()
    watch = Watch(page)
    await page.goto("/")
    assert await page.locator("h1").inner_text() == "RemoteLLM broker"
    assert await page.locator(".models li").all_inner_texts() == ["fake-model"]
    # The stylesheet loaded under the strict CSP (no inline style): the body is styled.
    font = await page.evaluate("getComputedStyle(document.body).fontFamily")
    assert "mono" in font.lower(), font
    await shoot(page, artifacts, "landing")
    await page.click("text=Log in to the key portal")
    await page.wait_for_url("**/portal/")
    assert watch.errors == []


async def test_newcomer_gets_a_working_key_in_under_a_minute(
    context: BrowserContext, portal_stack: Stack, artifacts: Path
) -> None:
    started = time.monotonic()
    page = await context.new_page()
    watch = Watch(page)
    await page.goto("/portal/")
    await shoot(page, artifacts, "login")
    await page.click("#login")
    await page.wait_for_url("**/portal/keys*")
    key = (await page.text_content("#new-key") or "").strip()
    assert key.startswith("sk-") and len(key) == 35
    await page.click("button[data-copy=new-key]")
    await expect(page.locator("button[data-copy=new-key]")).to_have_text("copied")
    assert await page.evaluate("navigator.clipboard.readText()") == key
    assert await ask(portal_stack, key) == "tok0 tok1 tok2 tok3 tok4 "
    assert time.monotonic() - started < 60
    await shoot(page, artifacts, "keys-first-login")

    # Shown once: afterwards only the prefix (and the usage, once the recorder wrote it).
    usage = portal_stack.broker.server.state.usage
    assert usage is not None
    await wait_for(lambda: usage.written >= 1, timeout=10)
    await page.goto("/portal/keys")
    assert await page.locator("#new-key").count() == 0
    assert key not in await page.content()
    await expect(page.locator("li.key[data-key-name=default] .prefix")).to_have_text(key[:9] + "…")
    await expect(page.locator("li.key[data-key-name=default]")).to_contain_text("last used")
    await expect(page.locator("#usage")).to_contain_text("fake-model")
    await shoot(page, artifacts, "keys")
    await page.click("nav >> text=connect")
    await expect(page.locator("#connect-command")).to_contain_text(
        f"--broker-url {portal_stack.broker.url}"
    )
    await shoot(page, artifacts, "connect")
    assert watch.errors == []


async def test_create_regenerate_and_delete_keys(
    context: BrowserContext, portal_stack: Stack
) -> None:
    page = await context.new_page()
    page.on("dialog", lambda d: d.accept())
    await log_in(page)
    await page.fill("#key-name", "laptop")
    await page.click("#create-key")
    await expect(page.locator("#reveal-title")).to_contain_text("laptop")
    laptop = (await page.text_content("#new-key") or "").strip()
    assert await ask(portal_stack, laptop)

    await page.click("li.key[data-key-name=laptop] button.regenerate")
    await expect(page.locator("#reveal-title")).to_contain_text("laptop")
    fresh = (await page.text_content("#new-key") or "").strip()
    assert fresh != laptop
    with pytest.raises(openai.AuthenticationError):
        await ask(portal_stack, laptop)  # the very next call with the old secret
    assert await ask(portal_stack, fresh)

    await page.fill("#key-name", "laptop")
    await page.click("#create-key")
    await expect(page.locator("#error")).to_contain_text("already have a key named")

    await page.click("li.key[data-key-name=laptop] button.delete")
    await page.wait_for_url("**/portal/keys")
    assert await page.locator("li.key[data-key-name=laptop]").count() == 0
    with pytest.raises(openai.AuthenticationError):
        await ask(portal_stack, fresh)


async def test_playground_streams_stops_and_copies(
    context: BrowserContext, portal_stack: Stack, fake_llm: FakeLLM, artifacts: Path
) -> None:
    page = await context.new_page()
    watch = Watch(page)
    await log_in(page)
    await page.goto("/portal/playground")
    html = await page.content()
    await page.click("#get-key")
    await expect(page.locator("#key-status")).to_contain_text("playground")
    key = await page.input_value("#api-key")
    assert key.startswith("sk-") and key not in html and key not in await page.content()

    # A normal answer streams in.
    await page.fill("#prompt", "tokens:8")
    await page.click("#send")
    await expect(page.locator("#status")).to_have_text("done")
    await expect(page.locator(".msg.assistant .body").last).to_have_text(
        "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"
    )

    # A long one: tokens arrive one by one, Stop aborts, the upstream sees the disconnect.
    fake_llm.chunk_delay = 0.1
    disconnects = fake_llm.disconnects
    await page.fill("#prompt", "tokens:400")
    await page.click("#send")
    answer = page.locator(".msg.assistant .body").last
    await expect(answer).to_contain_text("tok3")
    assert "tok399" not in (await answer.text_content() or "")
    await page.click("#stop")
    await expect(page.locator("#status")).to_have_text("stopped")
    await wait_for(lambda: fake_llm.disconnects > disconnects, timeout=10)
    assert fake_llm.active == 0
    fake_llm.chunk_delay = 0.0

    # Markdown is rendered; HTML and script in an answer stay text.
    evil = (
        "say:# Title\n\n**bold** and `code` <script>window.pwned=1</script>"
        '<img src=x onerror="window.pwned=2"> [x](javascript:alert(1))\n\n- one\n- two'
    )
    await page.fill("#prompt", evil)
    await page.click("#send")
    await expect(page.locator("#status")).to_have_text("done")
    body = page.locator(".msg.assistant .body").last
    await expect(body.locator("strong")).to_have_text("bold")
    await expect(body.locator("code")).to_have_text("code")
    await expect(body.locator("li")).to_have_count(2)
    await expect(body).to_contain_text("<script>window.pwned=1</script>")
    assert await body.locator("script, img, a").count() == 0
    assert await page.evaluate("window.pwned === undefined")

    await page.click("#copy-json")
    copied = json.loads(await page.evaluate("navigator.clipboard.readText()"))
    roles = [m["role"] for m in copied["messages"]]
    assert roles == ["user", "assistant"] * 3 and copied["model"] == "fake-model"
    assert copied["messages"][-1]["content"] == evil[4:]  # the raw answer, as JSON
    assert copied["messages"][3]["content"].startswith("tok0 tok1 tok2 tok3")  # the stopped one
    await shoot(page, artifacts, "playground")
    assert watch.errors == []


async def test_blocked_user_sees_the_blocked_page_and_the_key_is_refused(
    context: BrowserContext, portal_stack: Stack, artifacts: Path
) -> None:
    page = await context.new_page()
    await log_in(page)
    key = (await page.text_content("#new-key") or "").strip()
    UsersStore(portal_stack.broker.settings.users_path).set_blocked("alice", True)
    for _ in range(50):
        await page.goto("/portal/keys")
        if await page.locator("h1").text_content() == "! Your account is blocked":
            break
        await page.wait_for_timeout(100)
    await expect(page.locator("h1")).to_have_text("! Your account is blocked")
    with pytest.raises(openai.PermissionDeniedError):
        await ask(portal_stack, key)
    await page.screenshot(path=str(artifacts / "blocked.png"))


@pytest.mark.parametrize("portal_overrides", [{"gitlab_allowed_groups": ["acme"]}])
async def test_error_pages(
    context: BrowserContext, fake_gitlab: FakeGitLab, artifacts: Path
) -> None:
    page = await context.new_page()
    watch = Watch(page)
    cases = [
        ("group", "Not allowed here"),
        ("deny", "Login cancelled"),
        ("down", "GitLab is not answering"),
    ]
    for case, title in cases:
        fake_gitlab.deny = case == "deny"
        fake_gitlab.token_status = 503 if case == "down" else None
        await page.goto("/portal/")
        await page.click("#login")
        await expect(page.locator("h1")).to_have_text("! " + title)
        await expect(page.locator("#todo")).to_contain_text("What to do")
        await page.screenshot(path=str(artifacts / f"error-{case}.png"))
    response = await page.goto("/portal/callback?code=stolen&state=guess")
    assert response is not None and response.status == 400
    await expect(page.locator("h1")).to_have_text("! This login link has expired")
    csp = (await response.all_headers())["content-security-policy"]
    assert "script-src 'self'" in csp
    # A member of the allowed group gets in, and next= only ever stays inside the portal.
    fake_gitlab.deny, fake_gitlab.token_status = False, None
    fake_gitlab.user = FakeUser(3003, "dave", "Dave", ["acme"])
    await page.goto("/portal/")
    await page.click("#login")
    await page.wait_for_url("**/portal/keys?reveal=*")
    await page.context.clear_cookies()
    await page.goto("/portal/login?next=https://example.org/")
    await page.wait_for_url("**/portal/keys")
    await page.context.clear_cookies()
    await page.goto("/portal/?next=/portal/playground")
    await page.click("#login")
    await page.wait_for_url("**/portal/playground")
    # The error pages answer 4xx/5xx (Chromium logs that); nothing else may go wrong.
    assert [e for e in watch.errors if not e.startswith("Failed to load resource")] == []
