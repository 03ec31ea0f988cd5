"""Scoped and expiring keys over real HTTP: the openai and anthropic SDKs as clients.

A key scoped to one model and given a minute: refused for another model at once (403
``model_not_allowed``, in Anthropic's shape on /v1/messages), listed models cut to its
scope, and refused for everything once its time is over (401 ``key_expired``), with
``remotellm-broker users keys`` listing it as expired rather than deleting it. Here an
operator then shortens its expiry to a few seconds in the file: the browser test
(tests/portal/test_key_scope_browser.py) waits out the whole minute, once in the suite.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anthropic
import openai
import pytest
from click.testing import CliRunner

from broker.accounts.key_scope import ScopeAsk
from broker.accounts.users import UsersStore
from broker.cli import main as broker_cli
from shared.bench.upstream import FakeLLM
from tests.support.stack import Stack, start_broker, start_connector
from tests.support.users_file import expire_in_file

HI = [{"role": "user", "content": "hi"}]
MINUTE = 60.0
SHORT = 4.0  # seconds: the expiry the operator writes into the file


@pytest.fixture
async def two_models() -> AsyncIterator[FakeLLM]:
    fake = FakeLLM(models=["model-a", "model-b"])
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def scoped(tmp_path: Path, two_models: FakeLLM) -> AsyncIterator[tuple[Stack, UsersStore]]:
    users = UsersStore(tmp_path / "users.yaml")
    users.login(7, "alice", "Alice")
    models_file = tmp_path / "models.yaml"
    models_file.write_text("aliases:\n  fast: [model-a]\n")
    broker = await start_broker(tmp_path / "broker", users_file=users.path, models_file=models_file)
    conn = await start_connector(broker.url, two_models.url)
    stack = Stack(broker, [conn])
    yield stack, users
    await conn.stop()
    await broker.stop()


async def _until_known(client: openai.AsyncOpenAI) -> list[str]:
    """The model list once the broker has read the new key (it reloads within a second)."""
    deadline = time.time() + 30
    while True:
        try:
            return [m.id for m in (await client.models.list()).data]
        except openai.AuthenticationError:
            if time.time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _until_expired(client: openai.AsyncOpenAI, deadline: float) -> openai.APIStatusError:
    """Use the key until it is refused as expired (bounded by ``deadline``)."""
    while time.time() < deadline:
        try:
            await client.chat.completions.create(model="model-a", messages=HI, max_tokens=1)
        except openai.AuthenticationError as exc:
            return exc
        await asyncio.sleep(0.5)
    raise AssertionError("the key still worked after its expiry")


async def test_a_scoped_minute_key_is_refused_for_other_models_then_for_everything(
    scoped: tuple[Stack, UsersStore],
) -> None:
    stack, users = scoped
    created = time.time()
    key = users.create_key(7, "ci", ScopeAsk(models="model-a", expiry="1m", label="CI job"))
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=key, max_retries=0)
    claude = anthropic.AsyncAnthropic(base_url=stack.broker.url, api_key=key, max_retries=0)
    async with client, claude:
        assert await _until_known(client) == ["model-a"]
        ok = await client.chat.completions.create(model="model-a", messages=HI, max_tokens=1)
        assert ok.choices
        with pytest.raises(openai.PermissionDeniedError) as other:
            await client.chat.completions.create(model="model-b", messages=HI, max_tokens=1)
        assert other.value.status_code == 403 and other.value.code == "model_not_allowed"
        assert "model-b" in other.value.message
        with pytest.raises(openai.PermissionDeniedError):
            await client.models.retrieve("model-b")
        with pytest.raises(anthropic.PermissionDeniedError) as shaped:
            await claude.messages.create(model="model-b", max_tokens=1, messages=HI)
        body = shaped.value.body
        assert isinstance(body, dict) and body["type"] == "error"
        assert body["error"]["type"] == "permission_error"
        assert "may not use the model 'model-b'" in body["error"]["message"]

        assert created + MINUTE - time.time() > SHORT  # the minute is not over yet
        until = expire_in_file(users.path, "ci", SHORT)
        expired = await _until_expired(client, until + 30)
        assert time.time() >= until - 1  # not before its time was over
        assert expired.status_code == 401 and expired.code == "key_expired"
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
        with pytest.raises(anthropic.AuthenticationError) as late:
            await claude.messages.create(model="model-a", max_tokens=1, messages=HI)
        assert isinstance(late.value.body, dict)
        assert late.value.body["error"]["type"] == "authentication_error"
    base = ["--data-dir", str(stack.broker.settings.data_dir), "--users-file", str(users.path)]
    listed_keys = CliRunner().invoke(broker_cli.main, [*base, "users", "keys", "alice"])
    assert listed_keys.exit_code == 0, listed_keys.output
    line = next(x for x in listed_keys.output.splitlines() if x.startswith("ci "))
    assert "model-a" in line and "expired" in line and "CI job" in line


async def test_an_operator_scope_change_applies_without_a_restart(
    scoped: tuple[Stack, UsersStore],
) -> None:
    stack, users = scoped
    key = users.create_key(7, "laptop")
    base = ["--data-dir", str(stack.broker.settings.data_dir), "--users-file", str(users.path)]
    async with openai.AsyncOpenAI(base_url=stack.base_url, api_key=key, max_retries=0) as client:
        assert await _until_known(client) == ["fast", "model-a", "model-b"]
        run = CliRunner().invoke
        done = run(
            broker_cli.main, [*base, "users", "scope", "alice", "laptop", "--models", "model-b"]
        )
        assert done.exit_code == 0 and "models model-b" in done.output, done.output
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                await client.chat.completions.create(model="model-a", messages=HI, max_tokens=1)
            except openai.PermissionDeniedError as exc:
                assert exc.code == "model_not_allowed"
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the broker did not apply the operator's scope")
        assert [m.id for m in (await client.models.list()).data] == ["model-b"]
        ok = await client.chat.completions.create(model="model-b", messages=HI, max_tokens=1)
        assert ok.choices


async def test_a_key_scoped_to_an_alias_uses_the_alias_only(
    scoped: tuple[Stack, UsersStore],
) -> None:
    stack, users = scoped
    key = users.create_key(7, "alias", ScopeAsk(models="fast"))
    async with openai.AsyncOpenAI(base_url=stack.base_url, api_key=key, max_retries=0) as client:
        assert await _until_known(client) == ["fast"]
        raw = await client.chat.completions.with_raw_response.create(
            model="fast", messages=HI, max_tokens=1
        )
        assert raw.headers["x-remotellm-served-model"] == "model-a"  # served by the alias's target
        with pytest.raises(openai.PermissionDeniedError):  # not the target by its own name
            await client.chat.completions.create(model="model-a", messages=HI, max_tokens=1)
