"""Fixtures for the portal: the fake GitLab, a real broker + connector + fake LLM, Chromium."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, async_playwright

from shared.bench.upstream import FakeLLM
from tests.portal.fake_gitlab import CLIENT_ID, CLIENT_SECRET, FakeGitLab
from tests.support.stack import Stack, start_broker, start_connector
from tests.unit.conftest import clean_env

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("PORTAL_ARTIFACTS", "test-artifacts/portal"))


def portal_settings(gitlab: FakeGitLab, **extra: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "gitlab_url": gitlab.url,
        "gitlab_client_id": CLIENT_ID,
        "gitlab_client_secret": CLIENT_SECRET,
    }
    if not extra.get("gitlab_allowed_groups"):
        values["gitlab_allow_any_user"] = True
    values.update(extra)
    return values


@pytest.fixture
async def fake_gitlab() -> AsyncIterator[FakeGitLab]:
    fake = FakeGitLab()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
def portal_overrides() -> dict[str, Any]:
    """Extra broker settings a test module wants (override the fixture)."""
    return {}


@pytest.fixture
async def portal_stack(
    tmp_path: Path, fake_gitlab: FakeGitLab, fake_llm: FakeLLM, portal_overrides: dict[str, Any]
) -> AsyncIterator[Stack]:
    broker = await start_broker(
        tmp_path / "broker", **portal_settings(fake_gitlab, **portal_overrides)
    )
    conn = await start_connector(broker.url, fake_llm.url)
    stack = Stack(broker, [conn])
    yield stack
    for c in stack.connectors:
        await c.stop()
    await broker.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


__all__ = ["clean_env"]
