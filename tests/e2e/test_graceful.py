"""SIGTERM with a stream in flight, for real connector and broker processes.

The upstream is the fake LLM, run in the test's own event loop: 15 chunks 0.2 s apart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from broker.usage.query import recent_requests
from shared.bench.upstream import FakeLLM
from tests.support.procs import Broker, Proc, Procs, openai_client

pytestmark = pytest.mark.e2e

KEY = "sk-" + "d" * 32
TOKEN = "ct-e2e-graceful-token"
MODEL = "fake-model"
CHUNKS = 15
CONNECTOR_DRAIN_S = 15.0
BROKER_DRAIN_S = 15.0


@pytest.fixture
async def slow_llm() -> AsyncIterator[FakeLLM]:
    fake = FakeLLM(chunk_delay=0.2)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


async def start_relay(procs: Procs, llm: FakeLLM, data_dir: Path) -> tuple[Broker, Proc]:
    broker = await procs.broker(
        data_dir,
        "--user-api-key",
        KEY,
        "--connector-token",
        TOKEN,
        "--drain-timeout",
        str(BROKER_DRAIN_S),
    )
    connector = await start_connector(procs, broker, llm, "graceful-1")
    return broker, connector


async def start_connector(procs: Procs, broker: Broker, llm: FakeLLM, name: str) -> Proc:
    connector = await procs.connector(
        broker.url, TOKEN, llm.url, name, "--drain-timeout", str(CONNECTOR_DRAIN_S)
    )
    await broker.wait_model(MODEL, timeout=20.0, connector=name, watch=connector)
    return connector


@dataclass
class Streamed:
    pieces: list[str]
    finish: str | None
    signalled_at: float  # time.monotonic() of the SIGTERM
    watch_cpu_at_signal: float  # CPU seconds the watched process had used by then


async def stream_and_signal(
    client: openai.AsyncOpenAI, proc: Proc, watch: Proc | None = None, after_chunks: int = 3
) -> Streamed:
    """Stream CHUNKS tokens; SIGTERM ``proc`` after ``after_chunks``; return what came."""
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "count slowly"}],
        max_tokens=CHUNKS,
        stream=True,
    )
    result = Streamed([], None, 0.0, 0.0)
    async for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta.content:
            result.pieces.append(choice.delta.content)
            if len(result.pieces) == after_chunks:
                if watch is not None:
                    result.watch_cpu_at_signal = watch.cpu_seconds()
                proc.signal()
                result.signalled_at = time.monotonic()
        if choice.finish_reason:
            result.finish = choice.finish_reason
    assert result.signalled_at, f"the stream ended after {len(result.pieces)} chunks, unsignalled"
    return result


def expected_pieces() -> list[str]:
    return [f"tok{i} " for i in range(CHUNKS)]


async def test_connector_sigterm_finishes_stream(
    procs: Procs, slow_llm: FakeLLM, tmp_path: Path
) -> None:
    broker, connector = await start_relay(procs, slow_llm, tmp_path / "data")
    assert broker.proc is not None
    async with openai_client(broker.url, KEY) as client:
        drained = asyncio.create_task(wait_unrouted(broker, "graceful-1"), name="wait-unrouted")
        streamed = await stream_and_signal(client, connector)
        assert streamed.pieces == expected_pieces()
        assert streamed.finish == "stop"
        # While it drained, the connector took no new work: its models were unrouted.
        assert await drained, "the draining connector kept its models"

        code = await connector.wait_exit(CONNECTOR_DRAIN_S + 5.0)
        took = time.monotonic() - streamed.signalled_at
        assert code == 0, connector.tail()
        assert took < CONNECTOR_DRAIN_S, f"connector exited {took:.1f} s after SIGTERM"
        assert connector.events("draining"), connector.tail()
        assert not connector.events("drain_timeout"), connector.tail()
        assert slow_llm.completed == 1 and slow_llm.disconnects == 0

        # No connector left for the model: 503 with Retry-After, at once.
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hello?"}], max_tokens=2
            )
    assert info.value.status_code == 503
    retry_after = info.value.response.headers.get("retry-after")
    assert retry_after is not None and float(retry_after) > 0, dict(info.value.response.headers)
    assert info.value.response.json()["error"]["code"] == "no_connector"
    health = await broker.health()
    assert health["connectors"] == [], health


async def wait_unrouted(broker: Broker, name: str, timeout: float = 10.0) -> bool:
    """True once /health shows connector ``name`` still there but serving no model."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = await broker.health()
        for conn in health["connectors"]:
            if conn["name"] == name and not conn["models"]:
                return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.both_servers  # the drain is ours, the close after it each server's
async def test_broker_sigterm_finishes_stream(
    procs: Procs, slow_llm: FakeLLM, tmp_path: Path
) -> None:
    broker, connector = await start_relay(procs, slow_llm, tmp_path / "data")
    assert broker.proc is not None
    async with openai_client(broker.url, KEY) as client:
        refused = asyncio.create_task(refused_while_draining(client, broker.proc))
        streamed = await stream_and_signal(client, broker.proc, watch=connector)
        connector_cpu = connector.cpu_seconds() - streamed.watch_cpu_at_signal
        assert streamed.pieces == expected_pieces()
        assert streamed.finish == "stop"
        status, retry_after = await refused
    assert status == 503, "a new request during the broker's drain was not refused"
    assert retry_after is not None and float(retry_after) > 0

    code = await broker.proc.wait_exit(BROKER_DRAIN_S + 5.0)
    took = time.monotonic() - streamed.signalled_at
    assert code == 0, broker.proc.tail()
    assert took < BROKER_DRAIN_S, f"broker exited {took:.1f} s after SIGTERM"
    assert not broker.proc.events("drain_timeout"), broker.proc.tail()
    assert slow_llm.completed == 1 and slow_llm.disconnects == 0
    # The stream in flight at SIGTERM is in the ledger, with the upstream's exact usage.
    (row,) = recent_requests(tmp_path / "data" / "usage.sqlite3", status=200)
    assert (row.stream, row.tokens_out, row.estimated, row.partial) == (True, CHUNKS, False, False)

    # The connector outlives its broker: it keeps retrying, and still stops cleanly.
    await connector.wait_event(("broker_unreachable",), timeout=10.0)
    connector.assert_alive()
    connector.signal()
    assert await connector.wait_exit(10.0) == 0

    # Relaying 12 paced chunks costs the connector a few tens of ms of CPU. While the broker
    # drained, every poll was answered at once and re-sent at once: a busy loop.
    assert connector_cpu < 0.5, (
        f"the connector used {connector_cpu:.2f} s of CPU in the broker's "
        f"{time.monotonic() - streamed.signalled_at:.1f} s drain (polls answered at once "
        "while draining are re-sent at once)"
    )


async def refused_while_draining(
    client: openai.AsyncOpenAI, broker: Proc
) -> tuple[int, str | None]:
    """Once the broker logs that it drains, a new request's status and Retry-After."""
    await broker.wait_event(("broker_draining",), timeout=15.0)
    try:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "one more"}], max_tokens=2
        )
    except openai.APIStatusError as exc:
        return exc.status_code, exc.response.headers.get("retry-after")
    return 200, None
