"""The portal with real processes: ``python -m broker`` and ``python -m connector``, the
operator's ``remotellm-broker users`` on the same file, and a restart keeping logins."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest

from shared.bench.upstream import FakeLLM
from tests.portal.fake_gitlab import CLIENT_ID, CLIENT_SECRET, FakeGitLab
from tests.portal.helpers import login, new_key_of
from tests.support.procs import Procs, openai_client

pytestmark = pytest.mark.e2e

TOKEN = "ct-portal-e2e"


async def chat(url: str, key: str) -> str:
    async with openai_client(url, key) as client:
        reply = await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}]
        )
    return reply.choices[0].message.content or ""


async def test_operator_blocks_a_portal_user_of_a_running_broker(
    procs: Procs, tmp_path: Path, fake_gitlab: FakeGitLab, fake_llm: FakeLLM
) -> None:
    data = tmp_path / "broker"
    flags = [
        "--gitlab-url", fake_gitlab.url,
        "--gitlab-client-id", CLIENT_ID,
        "--gitlab-client-secret", CLIENT_SECRET,
        "--gitlab-allow-any-user",
        "--connector-token", TOKEN,
        "--log-format", "json",
        "--drain-timeout", "2",
    ]  # fmt: skip
    broker = await procs.broker(data, *flags)
    watch = await procs.connector(broker.url, TOKEN, fake_llm.url, "e2e-portal")
    await broker.wait_model("fake-model", timeout=30, watch=watch)
    async with httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False) as client:
        page = await client.get((await login(client)).headers["location"])
        key = new_key_of(page.text)
        assert await chat(broker.url, key) == "tok0 tok1 tok2 tok3 tok4 "

        cli = await procs.start("users", "-m", "broker", "--data-dir", str(data), "users", "list")
        assert await cli.wait_exit(20) == 0, cli.tail()
        assert "alice" in cli.text()
        cli = await procs.start(
            "users", "-m", "broker", "--data-dir", str(data), "users", "block", "alice"
        )
        assert await cli.wait_exit(20) == 0, cli.tail()
        for _ in range(60):  # the broker re-reads the file every 2 s
            try:
                await chat(broker.url, key)
            except openai.PermissionDeniedError:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the blocked user's key kept working\n" + broker.proc.tail())  # type: ignore[union-attr]
        cli = await procs.start(
            "users", "-m", "broker", "--data-dir", str(data), "users", "unblock", "alice"
        )
        assert await cli.wait_exit(20) == 0, cli.tail()

        # A restart ends the portal session (sessions live in the broker) and keeps the key.
        assert broker.proc is not None
        broker.proc.signal()
        assert await broker.proc.wait_exit(30) == 0, broker.proc.tail()
        for line in broker.proc.lines:
            assert key not in line.text, f"the broker printed a portal key: {line.text}"
        broker = await procs.broker(data, *flags, port=broker.port, name="broker again")
        await broker.wait_model("fake-model", timeout=30)
        assert (await client.get("/portal/keys")).status_code == 303
        keys = await client.get((await login(client)).headers["location"])
        assert keys.status_code == 200 and "alice" in keys.text
        assert await chat(broker.url, key)
