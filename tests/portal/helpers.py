"""Shared steps of the portal tests: log in over plain HTTP, read a page's forms."""

from __future__ import annotations

import re

import httpx

from tests.support.stack import Stack


def portal_client(stack: Stack) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.broker.url, timeout=15.0)


async def login(client: httpx.AsyncClient, next_path: str = "") -> httpx.Response:
    """Follow /portal/login -> fake GitLab -> /portal/callback by hand; the callback's answer."""
    query = f"?next={next_path}" if next_path else ""
    start = await client.get("/portal/login" + query)
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
