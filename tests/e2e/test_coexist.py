"""Several connectors with default settings on one host all serve (README's multi-connector setup).

Real broker and connector processes, one fake LLM per connector (one model each), the openai
SDK as the client. Before sessions belonged to an identity, every connector registered as
the host name and each registration evicted the previous one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.procs import Broker, Proc, Procs, openai_client
from tests.support.fake_llm import FakeLLM

pytestmark = pytest.mark.e2e

KEY = "sk-" + "c" * 32
TOKENS = ["ct-coexist-one", "ct-coexist-two", "ct-coexist-three"]
MODELS = ["model-a", "model-b", "model-c"]


@pytest.fixture
async def llms() -> AsyncIterator[list[FakeLLM]]:
    fakes = [FakeLLM(models=[m]) for m in MODELS]
    for fake in fakes:
        await fake.start()
    try:
        yield fakes
    finally:
        for fake in fakes:
            await fake.stop()


async def broker_with(procs: Procs, data_dir: Path, tokens: list[str]) -> Broker:
    flags = [arg for token in tokens for arg in ("--connector-token", token)]
    return await procs.broker(data_dir, "--user-api-key", KEY, *flags)


async def serve_each_model(broker: Broker, rounds: int) -> None:
    async with openai_client(broker.url, KEY) as client:
        for _ in range(rounds):
            for model in MODELS:
                reply = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3
                )
                assert reply.choices[0].message.content, reply


async def wait_all_live(broker: Broker, connectors: list[Proc]) -> dict[str, str]:
    """Model -> name of the connector serving it, once every model is live."""
    for model, proc in zip(MODELS, connectors, strict=True):
        await broker.wait_model(model, timeout=20.0, watch=proc)
    health = await broker.health()
    return {m: c["name"] for c in health["connectors"] for m in c["models"]}


@pytest.mark.parametrize("shared_token", [False, True], ids=["three-tokens", "one-token"])
async def test_default_connectors_on_one_host_all_serve(
    procs: Procs, llms: list[FakeLLM], tmp_path: Path, shared_token: bool
) -> None:
    tokens = TOKENS[:1] * 3 if shared_token else TOKENS
    broker = await broker_with(procs, tmp_path / "broker", sorted(set(tokens)))
    connectors = [
        await procs.connector(broker.url, token, llm.url, None)
        for token, llm in zip(tokens, llms, strict=True)
    ]
    names = await wait_all_live(broker, connectors)
    assert len(set(names.values())) == 3, names  # distinct default names

    # Several seconds of traffic to every model: nobody evicts anybody.
    await serve_each_model(broker, rounds=5)
    await asyncio.sleep(3.0)
    await serve_each_model(broker, rounds=2)
    health = await broker.health()
    assert len(health["connectors"]) == 3, health
    assert sorted(c["served"] for c in health["connectors"]) == [7, 7, 7], health
    for proc in connectors:
        assert len(proc.events("registered")) == 1, proc.tail()
        assert not proc.events("connector_name_clash"), proc.tail()
    assert broker.proc is not None
    assert not broker.proc.events("connector_name_clash"), broker.proc.tail()

    # A connector restarted with the same defaults takes its own place back at once.
    first = connectors[1]
    await first.kill()
    again = await procs.connector(broker.url, tokens[1], llms[1].url, None)
    await again.wait_event(("registered",), timeout=20.0)
    await serve_each_model(broker, rounds=2)
    health = await broker.health()
    assert len(health["connectors"]) == 3, health
    assert {m: c["name"] for c in health["connectors"] for m in c["models"]} == names
