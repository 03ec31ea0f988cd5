"""Model aliases through a real broker, two connectors and two fake LLMs, the openai SDK as
the client: the pinned target, the fallback when its connector stops and the move back
when it returns, the rewritten model the upstream receives, /v1/models, reload on edit,
the ledger's rows and the metrics (docs/aliases.md)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from broker.usage.query import recent_requests
from shared.bench.upstream import FakeLLM
from tests.support.stack import (
    USER_KEY,
    RunningBroker,
    RunningConnector,
    start_broker,
    start_connector,
)

pytestmark = pytest.mark.both_states  # routing is the relay state's: in memory and in Redis

MODELS_FILE = """\
aliases:
  chat:
    - {model: big, connector: gpu-box}
    - small
"""
AUTH = {"Authorization": f"Bearer {USER_KEY}"}


@dataclass
class Site:
    broker: RunningBroker
    box: FakeLLM  # behind the connector "gpu-box": serves big
    laptop: FakeLLM  # behind the connector "laptop": serves big and small
    connectors: dict[str, RunningConnector]
    models_file: Path

    async def start_box(self) -> None:
        self.connectors["gpu-box"] = await start_connector(
            self.broker.url, self.box.url, name="gpu-box"
        )


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    models_file = tmp_path / "models.yaml"
    models_file.write_text(MODELS_FILE)
    box, laptop = FakeLLM(models=["big"]), FakeLLM(models=["big", "small"])
    await box.start()
    await laptop.start()
    broker = await start_broker(tmp_path / "b", models_file=models_file)
    s = Site(broker, box, laptop, {}, models_file)
    s.connectors["laptop"] = await start_connector(broker.url, laptop.url, name="laptop")
    await s.start_box()
    await broker.wait_view(lambda v: v.live_models.get("big") == ["gpu-box", "laptop"])
    try:
        yield s
    finally:
        for conn in s.connectors.values():
            await conn.stop()
        await broker.stop()
        await box.stop()
        await laptop.stop()


def sdk(site: Site) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=site.broker.url + "/v1", api_key=USER_KEY, max_retries=0)


async def ask(site: Site, model: str = "chat", **extra: Any) -> tuple[str, str, str]:
    """(the served-model header, the answer's model, its text) for one chat request."""
    async with sdk(site) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            **extra,
        )
    reply = raw.parse()
    return raw.headers["x-remotellm-served-model"], reply.model, reply.choices[0].message.content


async def models_list(site: Site) -> dict[str, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=10.0) as client:
        answer = await client.get(site.broker.url + "/v1/models", headers=AUTH)
    assert answer.status_code == 200
    listed = answer.json()
    assert listed["object"] == "list"
    return {m["id"]: m for m in listed["data"]}


async def test_pinned_target_then_fallback_then_back(site: Site) -> None:
    # Pinned: every request goes to gpu-box, though laptop serves "big" too.
    for _ in range(3):
        assert await ask(site) == ("big", "big", "tok0 tok1 tok2 ")
    assert [s.body["model"] for s in site.box.seen] == ["big"] * 3
    assert site.laptop.seen == []
    listed = await models_list(site)
    assert listed["chat"]["served_by"] == {"model": "big", "connector": "gpu-box"}
    assert listed["chat"]["alias_for"] == [
        {"model": "big", "connector": "gpu-box"},
        {"model": "small", "connector": None},
    ]
    assert {"big", "small", "chat"} <= set(listed)

    # gpu-box stops: the next target serves, on laptop, named as the upstream knows it.
    await site.connectors.pop("gpu-box").stop()
    await site.broker.wait_view(lambda v: v.live_models.get("big") == ["laptop"])
    assert await ask(site) == ("small", "small", "tok0 tok1 tok2 ")
    assert site.laptop.seen[-1].body["model"] == "small"
    assert (await models_list(site))["chat"]["served_by"] == {"model": "small", "connector": None}
    async with sdk(site) as client:  # streamed too
        stream = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True
        )
        chunks = [c async for c in stream]
    assert {c.model for c in chunks} == {"small"}

    # gpu-box is back: the alias moves back to it.
    await site.start_box()
    await site.broker.wait_view(lambda v: v.live_models.get("big") == ["gpu-box", "laptop"])
    assert await ask(site) == ("big", "big", "tok0 tok1 tok2 ")
    assert len(site.box.seen) == 4

    await site.broker.stop()  # flushes the ledger
    site.connectors.clear()  # their sessions ended with the broker
    rows = list(reversed(recent_requests(site.broker.settings.usage_path)))
    assert [(r.alias, r.model, r.connector, r.status) for r in rows] == [
        *[("chat", "big", "gpu-box", 200)] * 3,
        ("chat", "small", "laptop", 200),
        ("chat", "small", "laptop", 200),
        ("chat", "big", "gpu-box", 200),
    ]
    assert all(r.tokens_out for r in rows)


async def test_a_model_named_directly_is_not_an_alias(site: Site) -> None:
    async with sdk(site) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="small", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
    assert "x-remotellm-served-model" not in raw.headers
    await site.broker.stop()
    site.connectors.clear()
    (row,) = recent_requests(site.broker.settings.usage_path)
    assert (row.model, row.alias) == ("small", None)


async def test_no_live_target_is_503_and_recorded_under_the_alias(site: Site) -> None:
    site.models_file.write_text("aliases:\n  gone: [absent, {model: big, connector: nobody}]\n")
    os.utime(site.models_file, ns=(1, 1))  # a new stamp, whatever the clock's resolution
    await wait_for_alias(site, "gone")
    assert (await models_list(site))["gone"]["served_by"] is None
    async with httpx.AsyncClient(timeout=10.0) as client:
        answer = await client.post(
            site.broker.url + "/v1/chat/completions",
            headers=AUTH,
            json={"model": "gone", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert answer.status_code == 503
    error = answer.json()["error"]
    assert error["code"] == "no_connector"
    assert "absent, big on nobody" in error["message"]
    assert "chat" not in await models_list(site)  # the edit removed it
    async with httpx.AsyncClient(timeout=10.0) as client:
        metrics = (await client.get(site.broker.health_url + "/metrics")).text
    assert 'remotellm_requests_total{model="gone",status="503"} 1.0' in metrics
    await site.broker.stop()
    site.connectors.clear()
    (row,) = recent_requests(site.broker.settings.usage_path)
    assert (row.model, row.alias, row.status, row.connector) == ("gone", "gone", 503, None)


async def test_alias_metrics_name_alias_and_model(site: Site) -> None:
    await ask(site)
    async with httpx.AsyncClient(timeout=10.0) as client:
        metrics = (await client.get(site.broker.health_url + "/metrics")).text
    assert 'remotellm_alias_requests_total{alias="chat",model="big",status="200"} 1.0' in metrics
    assert 'remotellm_requests_total{model="big",status="200"} 1.0' in metrics


async def wait_for_alias(site: Site, name: str) -> None:
    async def listed() -> bool:
        return name in await models_list(site)

    deadline = asyncio.get_running_loop().time() + 15.0
    while not await listed():
        assert asyncio.get_running_loop().time() < deadline, f"alias {name} never listed"
        await asyncio.sleep(0.1)
