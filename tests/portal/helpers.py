"""Shared steps of the portal tests: log in over plain HTTP, read a page's forms."""

from __future__ import annotations

import re

import httpx
import openai

from tests.support.stack import Stack


def portal_client(stack: Stack) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.broker.url, timeout=15.0)


async def login(
    client: httpx.AsyncClient, next_path: str = "", start_at: str = "/portal/login"
) -> httpx.Response:
    """Follow /portal/login -> fake GitLab (or ``start_at`` /portal/login/<provider> -> fake
    OIDC provider) -> the callback by hand; the callback's answer."""
    query = f"?next={next_path}" if next_path else ""
    start = await client.get(start_at + query)
    assert start.status_code == 302, start.text
    consent = await client.get(start.headers["location"])
    assert consent.status_code == 302, consent.text
    return await client.get(consent.headers["location"])


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([0-9a-f]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def new_key_of(html: str) -> str:
    found = re.search(r'id="new-key" class="secret">(sk-[0-9a-f]{32})<', html)
    assert found, "no new key shown on the page"
    return found.group(1)


def sdk(stack: Stack, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.base_url, api_key=key, max_retries=0)


async def ask(stack: Stack, key: str) -> str:
    """One chat completion with ``key`` through the openai SDK; the answer's text."""
    async with sdk(stack, key) as client:
        reply = await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}]
        )
    return reply.choices[0].message.content or ""
