from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support.fake_llm import FakeLLM
from tests.support.stack import Stack, start_broker, start_connector


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeLLM]:
    fake = FakeLLM()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
def broker_overrides() -> dict[str, Any]:
    """Broker settings for the ``stack`` fixture (parametrize it to change them per test)."""
    return {}


@pytest.fixture
async def stack(
    tmp_path, fake_llm: FakeLLM, broker_overrides: dict[str, Any]
) -> AsyncIterator[Stack]:
    broker = await start_broker(tmp_path / "broker", **broker_overrides)
    conn = await start_connector(broker.url, fake_llm.url)
    s = Stack(broker, [conn])
    yield s
    for c in s.connectors:
        await c.stop()
    await broker.stop()
