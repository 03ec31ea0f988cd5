"""The baseline for the latency table: connector and API user straight to the broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.bench.upstream import FakeLLM
from tests.proxies.measure import CHUNK_DELAY, expected_tokens, stream_timing
from tests.support.stack import start_broker, start_connector

pytestmark = pytest.mark.both_servers  # the path without a proxy, as the others' baseline


async def test_direct_baseline_both_modes(tmp_path: Path, fake_llm: FakeLLM) -> None:
    broker = await start_broker(tmp_path / "b")
    fake_llm.chunk_delay = CHUNK_DELAY
    try:
        for mode in ("auto", "parts"):
            conn = await start_connector(broker.url, fake_llm.url, upload_mode=mode)
            try:
                chosen = conn.connector.status.upload_mode
                assert chosen == ("mux" if mode == "auto" else "parts")
                timing = await stream_timing(broker.url, "direct (no proxy)", chosen)
                assert timing.tokens == expected_tokens()
                assert timing.incremental, timing
            finally:
                await conn.stop()
    finally:
        await broker.stop()
