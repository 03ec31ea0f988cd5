"""Redis with Sentinel: the master dies, a replica is promoted, the broker follows it
without a restart (docs/scale-out.md, "Redis with Sentinel").

Real processes: a master redis-server, a replica, three redis-sentinel, a broker started
with ``--redis-sentinel`` x3 and ``--redis-sentinel-master``; a connector (in this
process) and the fake upstream.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from shared.bench.upstream import FakeLLM
from tests.scaleout.fixtures import Redises, info, until
from tests.support.procs import Procs
from tests.support.stack import TOKEN, USER_KEY, start_connector

pytestmark = pytest.mark.e2e

MODEL = "fake-model"
RECOVERY_BOUND = 15.0  # seconds from the master's death to a served request


async def _served(api: httpx.AsyncClient) -> bool:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    try:
        r = await api.post("/v1/chat/completions", json=body, timeout=3.0)
    except httpx.HTTPError:
        return False
    return r.status_code == 200


async def test_the_broker_follows_a_failover_without_a_restart(
    redises: Redises, tmp_path: Path, fake_llm: FakeLLM, procs: Procs
) -> None:
    broker = await procs.broker(
        tmp_path / "broker",
        "--user-api-key",
        USER_KEY,
        "--connector-token",
        TOKEN,
        *redises.broker_args(),
        "--session-ttl",
        "10",
        "--poll-wait",
        "5",
    )
    conn = await start_connector(broker.url, fake_llm.url)
    try:
        headers = {"Authorization": f"Bearer {USER_KEY}"}
        async with httpx.AsyncClient(base_url=broker.url, headers=headers) as api:
            assert await _served(api)
            await redises.master.stop()  # SIGKILL: what a crashed master looks like
            died = time.monotonic()
            await until(lambda: _served(api), timeout=RECOVERY_BOUND)
            recovered = time.monotonic() - died
            print(f"\nserved again {recovered:.2f} s after the master died")
            role = (await info(redises.replica.port, "replication"))["role"]
            assert role == "master"  # promoted, and the broker is on it
            assert await _served(api)
        status = conn.connector.status
        print(f"connector re-registrations: {status.reconnects}")
        assert status.session_id is not None
    finally:
        await conn.stop()
