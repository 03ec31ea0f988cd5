"""Scenario 5: parts mode when part POSTs fail or arrive twice.

An httpx transport under the connector's broker client plays the unreliable path: a part
that never leaves, a part whose answer is lost (so the connector sends it again), a part
delivered twice, a proxy's 502, and an old part replayed late. The API user's stream must
still carry every byte exactly once, in order.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from connector.broker_client import BrokerClient
from connector.runner import Connector
from shared.bench.upstream import FakeLLM
from tests.proxies.measure import stream_timing
from tests.proxies.relay import connector_settings
from tests.support.stack import RunningConnector, start_broker

pytestmark = pytest.mark.both_servers  # parts uploads cut mid-body

_PART = re.compile(r"/parts/(\d+)$")


class FaultyPath(httpx.AsyncBaseTransport):
    """Injects one fault per planned part sequence number; everything else passes."""

    def __init__(self, plan: dict[int, str]) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.plan = dict(plan)
        self.done: list[tuple[int, str]] = []
        self.answers: list[str] = []
        self.bodies: dict[int, bytes] = {}

    async def _pass(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        body = await response.aread()
        await response.aclose()
        if _PART.search(request.url.path):
            self.answers.append(body.decode(errors="replace"))
        return httpx.Response(
            response.status_code, headers=response.headers, content=body, request=request
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        match = _PART.search(request.url.path)
        if match is None:
            return await self._pass(request)
        seq = int(match.group(1))
        body = request.read()
        self.bodies[seq] = body
        fault = self.plan.pop(seq, None)
        if fault is None:
            return await self._pass(request)
        self.done.append((seq, fault))
        if fault == "never_sent":
            raise httpx.ConnectError("injected: connection refused", request=request)
        if fault == "answer_lost":
            await self._pass(request)
            raise httpx.ReadError("injected: connection reset after sending", request=request)
        if fault == "proxy_502":
            return httpx.Response(502, text="<html>bad gateway</html>", request=request)
        if fault == "delivered_twice":
            await self._pass(request)
            return await self._pass(request)
        if fault == "old_replayed":
            old = seq - 2
            headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
            replay = httpx.Request(
                "POST",
                request.url.copy_with(path=_PART.sub(f"/parts/{old}", request.url.path)),
                headers=headers,
                content=self.bodies[old],
            )
            await self._pass(replay)
            return await self._pass(request)
        raise AssertionError(f"unknown fault {fault}")

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_parts_survive_failed_and_repeated_posts(tmp_path: Path, fake_llm: FakeLLM) -> None:
    broker = await start_broker(tmp_path / "b")
    plan = {
        1: "never_sent",
        2: "answer_lost",
        3: "delivered_twice",
        4: "proxy_502",
        5: "old_replayed",
        6: "answer_lost",
        7: "delivered_twice",
    }
    path = FaultyPath(plan)
    settings = connector_settings(broker.url, fake_llm.url, upload_mode="parts")
    connector = Connector(settings, broker=BrokerClient(settings, transport=path))
    conn = RunningConnector(connector, asyncio.create_task(connector.run()))
    await conn.wait_registered()
    fake_llm.chunk_delay = 0.04
    try:
        # 40 tokens 40 ms apart: about 16 parts of ~100 ms each.
        timing = await stream_timing(
            broker.url, "direct, parts with injected faults", "parts", record=False, tokens=40
        )
        assert timing.tokens == [f"tok{i} " for i in range(40)]
        assert sorted(seq for seq, _ in path.done) == sorted(plan)
        # The broker recognised the repeats and applied nothing twice.
        assert sum('"duplicate"' in a for a in path.answers) >= 5
        assert len(fake_llm.seen) == 1
        await broker.wait_view(lambda v: v.in_flight == 0, timeout=5)
    finally:
        await conn.stop()
        await broker.stop()
