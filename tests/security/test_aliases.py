"""Aliases' pinned routes (``model#connector``, docs/aliases.md) are the broker's own: an API
user who names one directly is refused like any invalid model name, and nothing reaches
the connector or its engine."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from shared.bench.upstream import FakeLLM
from tests.support.stack import USER_KEY, start_broker, start_connector

pytestmark = pytest.mark.both_states


async def test_a_pinned_route_cannot_be_named_by_an_api_user(tmp_path: Path) -> None:
    fake = FakeLLM(models=["big"])
    await fake.start()
    broker = await start_broker(tmp_path / "b")
    conn = await start_connector(broker.url, fake.url, name="gpu-box")
    try:
        async with httpx.AsyncClient(base_url=broker.url, timeout=10.0) as client:
            headers = {"Authorization": f"Bearer {USER_KEY}"}
            answer = await client.post(
                "/v1/chat/completions",
                headers=headers,
                json={"model": "big#gpu-box", "messages": [{"role": "user", "content": "x"}]},
            )
            listed = (await client.get("/v1/models", headers=headers)).json()
            missing = await client.get("/v1/models/big%23gpu-box", headers=headers)
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "model_not_found"
        assert fake.seen == []
        # The routes a session serves for pinning are never shown as models.
        assert [m["id"] for m in listed["data"]] == ["big"]
        assert missing.status_code == 404
    finally:
        await conn.stop()
        await broker.stop()
        await fake.stop()
