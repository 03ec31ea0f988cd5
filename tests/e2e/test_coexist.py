"""Connectors that coexist and come back: real broker and connector processes.

- Three connectors on one host with default settings (no --name), each next to its own
  LLM, all serve: their default names differ (host name plus LLM address).
- After a broker restart a connector serves again within seconds of the broker answering:
  its reconnect wait stays short while nothing answers, and the probes' verdict is reused.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from shared.bench.upstream import FakeLLM
from tests.support.procs import Broker, Procs, openai_client

pytestmark = pytest.mark.e2e

KEY = "sk-" + "c" * 32
TOKEN = "ct-e2e-coexist-token"
RECOVERY_LIMIT_S = 3.0


@pytest.fixture
async def llms() -> AsyncIterator[list[FakeLLM]]:
    fakes = [FakeLLM(models=[f"model-{i}"]) for i in range(3)]
    for fake in fakes:
        await fake.start()
    try:
        yield fakes
    finally:
        for fake in fakes:
            await fake.stop()


async def _broker(procs: Procs, data_dir: Path, port: int | None = None) -> Broker:
    return await procs.broker(
        data_dir, "--user-api-key", KEY, "--connector-token", TOKEN, port=port
    )


async def _ask(client: openai.AsyncOpenAI, model: str) -> str:
    answer = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    return answer.choices[0].message.content or ""


async def test_three_default_connectors_on_one_host_all_serve(
    procs: Procs, llms: list[FakeLLM], tmp_path: Path
) -> None:
    broker = await _broker(procs, tmp_path / "data")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    # One with the token in a file, two on the command line; no --name anywhere.
    token_sources: list[str | Path] = [token_file, TOKEN, TOKEN]
    connectors = [
        await procs.connector(broker.url, source, llm.url, None)
        for source, llm in zip(token_sources, llms, strict=True)
    ]
    for i, connector in enumerate(connectors):
        # Generous: three Python processes start at once on a small, busy machine.
        await broker.wait_model(f"model-{i}", timeout=60.0, watch=connector)
    # All three stay registered side by side (none replaced another).
    await asyncio.sleep(1.0)
    health = await broker.health()
    names = sorted(c["name"] for c in health["connectors"])
    host = socket.gethostname()
    assert names == sorted(f"{host}:127.0.0.1-{llm.port}" for llm in llms), health
    async with openai_client(broker.url, KEY) as client:
        answers = await asyncio.gather(*(_ask(client, f"model-{i}") for i in range(3)))
    assert all(answers), answers
    assert [llm.completed for llm in llms] == [1, 1, 1]
    for connector in connectors:
        connector.assert_alive()
        assert not connector.events("connector_name_clash"), connector.tail()
        registered = connector.events("registered")
        assert registered and registered[-1]["capacity_source"].startswith("default"), (
            connector.tail()
        )


async def test_connector_serves_again_soon_after_a_broker_restart(
    procs: Procs, llms: list[FakeLLM], tmp_path: Path
) -> None:
    llm = llms[0]
    data_dir = tmp_path / "data"
    broker = await _broker(procs, data_dir)
    connector = await procs.connector(broker.url, TOKEN, llm.url, "restart-1")
    await broker.wait_model("model-0", timeout=60.0, watch=connector)
    async with openai_client(broker.url, KEY) as client:
        assert await _ask(client, "model-0")

    assert broker.proc is not None
    await broker.proc.kill()
    # Down long enough that an uncapped backoff (0.5 s doubling) would sleep 4-8 s.
    await asyncio.sleep(6.0)
    connector.assert_alive()

    again = await _broker(procs, data_dir, port=broker.port)
    up = time.monotonic()
    served_at = None
    async with openai_client(again.url, KEY, timeout=10.0) as client:
        while time.monotonic() - up < 15.0:
            try:
                await _ask(client, "model-0")
            except openai.APIError:
                await asyncio.sleep(0.05)
                continue
            served_at = time.monotonic()
            break
    assert served_at is not None, connector.tail()
    took = served_at - up
    assert took < RECOVERY_LIMIT_S, f"served again {took:.2f} s after the broker was up"
    registered = connector.events("registered")
    assert len(registered) == 2, connector.tail()
    assert registered[-1]["probes_reused"] is True, connector.tail()
    waits = [e["retry_in_s"] for e in connector.events("broker_unreachable")]
    assert waits and max(waits) <= 1.0, waits


async def test_connectors_with_own_tokens_serve_side_by_side_and_restart_in_place(
    procs: Procs, llms: list[FakeLLM], tmp_path: Path
) -> None:
    """Three tokens, default names: traffic to every model for seconds, nobody evicts
    anybody; a connector killed and started again takes its own place back at once."""
    tokens = ["ct-coexist-one", "ct-coexist-two", "ct-coexist-three"]
    flags = [arg for token in tokens for arg in ("--connector-token", token)]
    broker = await procs.broker(tmp_path / "data", "--user-api-key", KEY, *flags)
    connectors = [
        await procs.connector(broker.url, token, llm.url, None)
        for token, llm in zip(tokens, llms, strict=True)
    ]
    for i, connector in enumerate(connectors):
        await broker.wait_model(f"model-{i}", timeout=60.0, watch=connector)
    health = await broker.health()
    names = {m: c["name"] for c in health["connectors"] for m in c["models"]}
    assert len(set(names.values())) == 3, health

    async with openai_client(broker.url, KEY) as client:
        for _ in range(5):
            assert all([await _ask(client, f"model-{i}") for i in range(3)])
        await asyncio.sleep(3.0)
        for _ in range(2):
            assert all([await _ask(client, f"model-{i}") for i in range(3)])
    health = await broker.health()
    assert sorted(c["served"] for c in health["connectors"]) == [7, 7, 7], health
    assert len({c["identity"] for c in health["connectors"]}) == 3, health
    for connector in connectors:
        assert len(connector.events("registered")) == 1, connector.tail()
    assert broker.proc is not None
    assert not broker.proc.events("connector_name_clash"), broker.proc.tail()

    await connectors[1].kill()
    again = await procs.connector(broker.url, tokens[1], llms[1].url, None)
    await again.wait_event(("registered",), timeout=30.0)
    async with openai_client(broker.url, KEY) as client:
        assert all([await _ask(client, f"model-{i}") for i in range(3)])
    health = await broker.health()
    assert len(health["connectors"]) == 3, health
    assert {m: c["name"] for c in health["connectors"] for m in c["models"]} == names
    registered = [e for e in broker.proc.events("session_registered") if e["replaced"] != "none"]
    assert [e["replaced"] for e in registered] == ["restart"], registered
