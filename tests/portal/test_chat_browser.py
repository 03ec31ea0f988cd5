"""The chat in headless Chromium against a real broker, connector, fake LLM and fake GitLab.

On a phone (360x740): log in, start a conversation, stream a reply, stop one mid-stream,
reload and find the partial reply saved and marked stopped, continue, rename, branch from a
message, delete and undo, export JSON and Markdown; the page never scrolls sideways and the
input stays on screen. On a desktop (1280x800): the sidebar, search by title, the keyboard
only. A second user gets the same 404 for the first user's conversation as for a made-up
one. Every step leaves a screenshot in ``test-artifacts/portal/chat/`` (PORTAL_ARTIFACTS).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext, Page, expect

from shared.bench.upstream import FakeLLM
from tests.portal.fake_gitlab import FakeGitLab, FakeUser
from tests.portal.test_browser import Watch, log_in
from tests.support.stack import Stack

PHONE = {"width": 360, "height": 740}
DESKTOP = {"width": 1280, "height": 800}
BOB = FakeUser(2002, "bob", "Bob B.", ["team"])
HOSTILE = (
    'say:**bold** <img src=x onerror="window.pwned=1"> <script>window.pwned=2</script> '
    "[link](javascript:window.pwned=3)"
)


@pytest.fixture
def llm_models() -> list[str]:
    """Two models, to switch between in one conversation."""
    return ["fake-model", "other-model"]


@pytest.fixture
def shots(artifacts: Path) -> Path:
    folder = artifacts / "chat"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def new_context(browser: Browser, stack: Stack, viewport: dict[str, int]) -> BrowserContext:
    return await browser.new_context(
        base_url=stack.broker.url, viewport=viewport, accept_downloads=True
    )


@pytest.fixture
async def phone(browser: Browser, portal_stack: Stack) -> AsyncIterator[BrowserContext]:
    ctx = await new_context(browser, portal_stack, PHONE)
    yield ctx
    await ctx.close()


class Shots:
    def __init__(self, page: Page, folder: Path, prefix: str) -> None:
        self.page, self.folder, self.prefix, self.n = page, folder, prefix, 0
        for old in folder.glob(f"{prefix}-*.png"):  # only this run's steps are kept
            old.unlink()

    async def __call__(self, name: str) -> None:
        self.n += 1
        path = self.folder / f"{self.prefix}-{self.n:02d}-{name}.png"
        await self.page.screenshot(path=str(path))


async def fits(page: Page, width: int) -> None:
    """No horizontal scroll, and the message box is on screen."""
    scroll = await page.evaluate("document.documentElement.scrollWidth")
    assert scroll <= width, f"the page scrolls sideways: {scroll} > {width}"
    box = await page.locator("#prompt").bounding_box()
    height = page.viewport_size["height"] if page.viewport_size else 0
    assert box is not None and box["y"] + box["height"] <= height, box


async def send(page: Page, text: str) -> None:
    await page.fill("#prompt", text)
    await page.press("#prompt", "Control+Enter")


async def downloaded(page: Page, selector: str) -> str:
    async with page.expect_download() as got:
        await page.click(selector)
    path = await (await got.value).path()
    return await asyncio.to_thread(Path(path).read_text)


def last_reply(page: Page):  # type: ignore[no-untyped-def]
    return page.locator("article.msg.assistant").last


async def test_phone_login_to_a_saved_continued_conversation(
    phone: BrowserContext,
    browser: Browser,
    portal_stack: Stack,
    fake_llm: FakeLLM,
    fake_gitlab: FakeGitLab,
    shots: Path,
) -> None:
    page = await phone.new_page()
    watch = Watch(page)
    shot = Shots(page, shots, "phone")
    await log_in(page)
    await page.goto("/portal/chat")
    await shot("empty")
    await fits(page, PHONE["width"])

    # Start a conversation: the reply streams in, with its model and tokens.
    await send(page, "hello there")
    await page.wait_for_url(re.compile(r".*/portal/chat/[A-Za-z0-9_-]{22}$"))
    await expect(last_reply(page).locator(".meta")).to_contain_text("5 out", timeout=15000)
    await expect(last_reply(page).locator(".body")).to_have_text("tok0 tok1 tok2 tok3 tok4")
    await expect(page.locator("#conv-title")).to_have_text("hello there")
    await expect(page.locator("#totals")).to_contain_text("5 out")
    await shot("first-reply")
    cid = page.url.rsplit("/", 1)[1]

    # A model's HTML and script stay text; a javascript: link is not a link.
    await send(page, HOSTILE)
    await expect(last_reply(page).locator(".body strong")).to_have_text("bold", timeout=15000)
    assert await page.evaluate("window.pwned === undefined")
    assert await last_reply(page).locator("img, script, a").count() == 0
    await expect(last_reply(page).locator(".body")).to_contain_text("<script>")
    await shot("inert-markdown")

    # Stop a reply mid-stream; reload: the partial reply is saved and marked stopped.
    fake_llm.chunk_delay = 0.15
    await send(page, "tokens:80")
    await expect(page.locator("#stop")).to_be_visible()
    await expect(last_reply(page).locator(".body")).to_contain_text("tok2", timeout=15000)
    await shot("streaming")
    await page.click("#stop")
    await expect(last_reply(page).locator(".meta")).to_contain_text("stopped", timeout=15000)
    await shot("stopped")
    await page.reload()
    await expect(last_reply(page).locator(".meta")).to_contain_text("stopped", timeout=15000)
    partial = await last_reply(page).locator(".body").inner_text()
    assert partial.startswith("tok0 tok1 tok2") and "tok79" not in partial, partial
    await expect(page.locator("article.msg.user").last).to_have_text(re.compile("tokens:80"))
    await shot("reloaded-partial")

    # Continue the conversation after the reload, with another model: shown per reply.
    fake_llm.chunk_delay = 0.0
    await page.select_option("#model", "other-model")
    await send(page, "and now the rest")
    await expect(last_reply(page).locator(".meta")).to_contain_text("5 out", timeout=15000)
    await expect(last_reply(page).locator(".meta")).to_contain_text("other-model")
    await expect(page.locator("article.msg.assistant").first.locator(".meta")).to_contain_text(
        "fake-model"
    )
    assert await page.locator("article.msg").count() == 8
    await shot("continued")
    await fits(page, PHONE["width"])
    # The on-screen keyboard takes half the screen: the message box stays above it.
    await page.set_viewport_size({"width": PHONE["width"], "height": 380})
    await page.focus("#prompt")
    await fits(page, PHONE["width"])
    await shot("keyboard-open")
    await page.set_viewport_size(PHONE)

    # Rename.
    await page.click("#rename")
    await page.fill("#rename-input", "Phone chat")
    await page.press("#rename-input", "Enter")
    await expect(page.locator("#conv-title")).to_have_text("Phone chat")
    await shot("renamed")

    # Branch from the first reply: a new conversation with the first two messages.
    await page.locator("article.msg.assistant").first.locator("button.branch").click()
    await expect(page.locator("#conv-title")).to_have_text("branch of Phone chat")
    assert page.url.rsplit("/", 1)[1] != cid
    await expect(page.locator("article.msg")).to_have_count(2)
    await shot("branched")

    # Delete the branch, then undo.
    await page.click("#delete")
    await expect(page.locator("#toast")).to_be_visible()
    await shot("deleted-undo-offered")
    await page.click("#undo")
    await expect(page.locator("#conv-title")).to_have_text("branch of Phone chat")
    await expect(page.locator("article.msg")).to_have_count(2)
    await shot("undone")

    # The list of conversations (the panel on a phone), then export.
    await page.click("#show-list")
    await expect(page.locator(".conv-link")).to_have_count(2)
    await shot("list")
    await page.get_by_role("link", name="Phone chat", exact=True).click()
    await expect(page.locator("#conv-title")).to_have_text("Phone chat")
    exported = json.loads(await downloaded(page, "#export-json"))
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant"] * 4
    assert exported["messages"][0]["content"] == "hello there"
    markdown = await downloaded(page, "#export-md")
    assert markdown.startswith("# Phone chat") and "[stopped]" in markdown
    await fits(page, PHONE["width"])
    assert watch.errors == []

    # Another user: the same 404 for this conversation as for one that never existed.
    fake_gitlab.user = BOB
    other = await new_context(browser, portal_stack, PHONE)
    bob = await other.new_page()
    await log_in(bob)
    for target in (cid, "A" * 22):
        answer = await bob.goto(f"/portal/chat/{target}")
        assert answer is not None and answer.status == 404
        await expect(bob.locator("h1")).to_contain_text("No such conversation")
    await bob.screenshot(path=str(shots / "phone-99-other-user-404.png"))
    await bob.goto("/portal/chat")
    await expect(bob.locator("#list-empty")).to_be_attached()
    assert await bob.locator(".conv-link").count() == 0
    await other.close()


async def test_desktop_sidebar_search_and_keyboard_only(
    browser: Browser, portal_stack: Stack, shots: Path
) -> None:
    ctx = await new_context(browser, portal_stack, DESKTOP)
    page = await ctx.new_page()
    watch = Watch(page)
    shot = Shots(page, shots, "desktop")
    await log_in(page)
    await page.goto("/portal/chat")
    await expect(page.locator("#sidebar")).to_be_visible()
    await expect(page.locator("#show-list")).to_be_hidden()
    for text in ("first topic", "second topic"):
        await page.click("#new-chat")
        await send(page, text)
        await expect(last_reply(page).locator(".meta")).to_contain_text("5 out", timeout=15000)
    await expect(page.locator(".conv-link")).to_have_count(2)
    await shot("sidebar")
    # Search by title.
    await page.fill("#search", "first")
    await expect(page.locator(".conv-link")).to_have_count(1)
    await expect(page.locator(".conv-link")).to_have_text("first topic")
    await shot("search")
    # Keyboard only: from the search box to the conversation, the message box, send.
    await page.press("#search", "Tab")
    await page.keyboard.press("Enter")
    await expect(page.locator("#conv-title")).to_have_text("first topic")
    await page.focus("#prompt")
    await page.keyboard.type("typed without a mouse")
    await page.keyboard.press("Control+Enter")
    await expect(page.locator("article.msg")).to_have_count(4, timeout=15000)
    await expect(last_reply(page).locator(".meta")).to_contain_text("5 out", timeout=15000)
    await shot("keyboard")
    scroll = await page.evaluate("document.documentElement.scrollWidth")
    assert scroll <= DESKTOP["width"]
    # The usage page links each day to the conversations that used it.
    day = page.locator("#usage tbody a").first
    for _ in range(50):  # the ledger writes once a second
        await page.goto("/portal/keys")
        if await day.count():
            break
        await page.wait_for_timeout(200)
    await day.click()
    await page.wait_for_url(re.compile(r".*/portal/chat\?day=\d{4}-\d{2}-\d{2}$"))
    await expect(page.locator(".conv-link")).to_have_count(2)
    await expect(page.locator("#day-filter")).to_contain_text("used on")
    await shot("usage-day")
    assert watch.errors == []
    await ctx.close()
