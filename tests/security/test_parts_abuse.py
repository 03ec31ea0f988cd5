"""A connector token holder making the broker hold parts it cannot apply yet.

Who: anyone with a connector token. What: parts-mode uploads that skip part 0 and send
many large later parts, which the broker must keep until part 0 comes (up to 256 parts of
16 MiB each per request before the fix). The fix: what a request holds out of order is
capped in bytes (--parts-buffer-limit, 4 MiB by default); past it the request fails.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from shared.protocol import RELAY_PREFIX, RegisterRequest
from tests.support.stack import TOKEN, USER_KEY, RunningBroker, start_broker

pytestmark = pytest.mark.both_states  # relay semantics: in memory and in Redis
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MIB = 1024 * 1024


async def _leased(
    http: httpx.AsyncClient, broker: RunningBroker
) -> tuple[str, str, asyncio.Task[httpx.Response]]:
    """A parts-mode session holding one API request: its URL, the request ID, the API call."""
    req = RegisterRequest(name="parts", models=["fake-model"], capacity=2, upload_mode="parts")
    r = await http.post(f"{broker.url}{RELAY_PREFIX}/sessions", content=req.model_dump_json())
    base = f"{broker.url}{RELAY_PREFIX}/sessions/{r.json()['session_id']}"
    payload = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}
    api = asyncio.create_task(
        http.post(
            broker.url + "/v1/chat/completions",
            json=payload,
            headers={"Authorization": f"Bearer {USER_KEY}"},
        )
    )
    poll = await http.post(base + "/poll", content=b"{}")
    return base, str(poll.json()["items"][0]["request_id"]), api


async def test_parts_held_out_of_order_are_capped_in_bytes(tmp_path) -> None:
    broker = await start_broker(tmp_path / "b")
    try:
        async with httpx.AsyncClient(timeout=30, headers=AUTH) as http:
            base, rid, api = await _leased(http, broker)
            statuses = []
            for seq in range(1, 9):  # never part 0: every part waits for it
                part = await http.post(f"{base}/responses/{rid}/parts/{seq}", content=b"\0" * MIB)
                statuses.append(part.status_code)
                if part.status_code != 200:
                    assert part.json()["error"]["code"] == "bad_upload"
                    assert "exceed" in part.json()["error"]["message"]
                    break
            # 4 MiB held (the default limit); the fifth MiB is refused.
            assert statuses == [200, 200, 200, 200, 400]
            answer = await asyncio.wait_for(api, 10)
            assert answer.status_code == 502
            assert answer.json()["error"]["code"] == "bad_upload"
    finally:
        await broker.stop()


async def test_the_parts_buffer_limit_is_a_setting(tmp_path) -> None:
    broker = await start_broker(tmp_path / "b", parts_buffer_limit=MIB)
    try:
        async with httpx.AsyncClient(timeout=30, headers=AUTH) as http:
            base, rid, api = await _leased(http, broker)
            first = await http.post(f"{base}/responses/{rid}/parts/1", content=b"\0" * (MIB // 2))
            second = await http.post(f"{base}/responses/{rid}/parts/2", content=b"\0" * MIB)
            assert (first.status_code, second.status_code) == (200, 400)
            assert (await asyncio.wait_for(api, 10)).status_code == 502
    finally:
        await broker.stop()
