"""The operator's upstream LLM key for an enrolled connector reaches the LLM, in memory
and in Redis (the Redis mode looks it up when it hands a request over)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from shared.bench.upstream import FakeLLM
from shared.protocol import RELAY_PREFIX, EnrollRequest
from tests.support.stack import USER_KEY, RunningBroker, start_broker, start_connector

pytestmark = pytest.mark.both_states

OPERATOR_KEY = "sk-operator-upstream-1"


async def _enrolled_token(broker: RunningBroker) -> str:
    ask = EnrollRequest(name="gpu-box:llm", models=["fake-model"], secret="e" * 48)
    store = broker.server.state.enrollment
    assert store is not None
    async with httpx.AsyncClient(base_url=broker.url + RELAY_PREFIX, timeout=10) as relay:
        r = await relay.post("/enroll", content=ask.model_dump_json().encode())
        entry_id = r.json()["enrollment_id"]
        store.approve(entry_id, "root")
        store.set_llm_key(entry_id, OPERATOR_KEY)
        r = await relay.post("/enroll", content=ask.model_dump_json().encode())
        token = r.json()["token"]
    assert isinstance(token, str)
    return token


async def test_the_operators_key_reaches_the_upstream(tmp_path: Path, fake_llm: FakeLLM) -> None:
    broker = await start_broker(tmp_path / "b", allow_enrollment=True)
    try:
        token = await _enrolled_token(broker)
        conn = await start_connector(broker.url, fake_llm.url, broker_token=token)
        try:
            async with httpx.AsyncClient(
                base_url=broker.url, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=30
            ) as api:
                body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
                r = await api.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
            assert fake_llm.seen[-1].headers["Authorization"] == f"Bearer {OPERATOR_KEY}"
        finally:
            await conn.stop()
    finally:
        await broker.stop()
