"""Memory held per queued request, and the JSON shape limits, on real broker processes.

The attack (security issue 16, item 5): an API user queues large JSON bodies behind a busy
connector slot. Each queued request must cost the broker about its body's bytes, not the
bytes plus their text plus the parsed tree. The upstream is a fake LLM in the test's event
loop whose first request holds the connector's one slot until the test releases it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from shared.bench.upstream import FakeLLM
from tests.support.procs import Broker, Procs

pytestmark = pytest.mark.e2e

KEY = "sk-" + "m" * 32
TOKEN = "ct-security-memory-token"
MODEL = "fake-model"
MIB = 1024 * 1024
BODY_LIMIT = 8 * MIB  # the default --max-request-body
QUEUED = 10
# Numbers of nine bytes each ("12345678,"): under a million elements in 8 MiB, so the
# bodies are within the default element limit and are relayed, not refused.
ELEMENT = b"12345678,"


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLM]:
    """The fake LLM, whose ``hold`` prompt keeps its answer until ``release`` is set."""
    fake = FakeLLM()
    await fake.start()
    try:
        yield fake
    finally:
        fake.release.set()
        await fake.stop()


async def start_relay(procs: Procs, llm: FakeLLM, data_dir: Path, *extra: str) -> Broker:
    broker = await procs.broker(
        data_dir, "--user-api-key", KEY, "--connector-token", TOKEN, "--log-level", "warning"
    )
    connector = await procs.connector(broker.url, TOKEN, llm.url, "mem-1", "--capacity", "1")
    await broker.wait_model(MODEL, timeout=20.0, connector="mem-1", watch=connector)
    return broker


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def array_body(size: int, tag: int) -> bytes:
    """A chat request of exactly ``size`` bytes whose bulk is one JSON array of numbers."""
    head = (
        json.dumps(
            {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": f"q{tag}"}]}
        ).encode()[:-1]
        + b',"x":['
    )
    tail = b"1]}"
    room = size - len(head) - len(tail)
    count, pad = divmod(room, len(ELEMENT))
    return head + ELEMENT * count + b" " * pad + tail


def client(broker: Broker) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=broker.url,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120.0,
        trust_env=False,
    )


async def queued(broker: Broker) -> int:
    health = await broker.health()
    return int(sum(health.get("queued", {}).values()))


async def wait_queued(broker: Broker, count: int, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await queued(broker) < count:
        assert loop.time() < deadline, f"only {await queued(broker)} of {count} queued"
        await asyncio.sleep(0.1)


async def settled_rss(pid: int) -> int:
    """RSS once it stopped moving (the last body's read and parse are done)."""
    last = rss_bytes(pid)
    for _ in range(20):
        await asyncio.sleep(0.25)
        now = rss_bytes(pid)
        if abs(now - last) < MIB:
            return now
        last = now
    return last


async def test_queued_bodies_cost_less_than_three_times_their_bytes(
    procs: Procs, llm: FakeLLM, tmp_path: Path
) -> None:
    broker = await start_relay(procs, llm, tmp_path)
    assert broker.proc is not None
    pid = broker.proc.pid
    async with client(broker) as api:
        hold = {"model": MODEL, "messages": [{"role": "user", "content": "hold"}]}
        busy = asyncio.create_task(api.post("/v1/chat/completions", json=hold))
        await asyncio.wait_for(llm.held.wait(), 20)
        # A first round of large bodies warms the allocator and the parser's caches up.
        warm = await api.post(
            "/v1/chat/completions",
            content=b'{"model": "nope", "x": [' + b"1," * 1000 + b"1]}",
            headers={"content-type": "application/json"},
        )
        assert warm.status_code == 404
        before = await settled_rss(pid)
        bodies = [array_body(BODY_LIMIT, i) for i in range(QUEUED)]
        held_bytes = sum(len(b) for b in bodies)
        sends = [
            asyncio.create_task(
                api.post(
                    "/v1/chat/completions",
                    content=body,
                    headers={"content-type": "application/json"},
                )
            )
            for body in bodies
        ]
        del bodies
        await wait_queued(broker, QUEUED)
        during = await settled_rss(pid)
        growth = during - before
        print(
            f"broker RSS {before / MIB:.0f} MiB -> {during / MIB:.0f} MiB with {QUEUED} "
            f"queued bodies of {held_bytes / QUEUED / MIB:.0f} MiB: growth "
            f"{growth / MIB:.0f} MiB = {growth / held_bytes:.2f}x the bytes held"
        )
        llm.release.set()
        answers = await asyncio.gather(busy, *sends)
        after = await settled_rss(pid)
        print(f"broker RSS {after / MIB:.0f} MiB once all {QUEUED + 1} were answered")
    assert [a.status_code for a in answers] == [200] * (QUEUED + 1), [
        a.text[:200] for a in answers if a.status_code != 200
    ]
    assert growth < 3 * held_bytes, f"{growth / MIB:.0f} MiB for {held_bytes / MIB:.0f} MiB"


async def test_too_deep_and_too_many_elements_are_refused(
    procs: Procs, llm: FakeLLM, tmp_path: Path
) -> None:
    broker = await start_relay(procs, llm, tmp_path)
    head = b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "x": '
    deep = head + b"[" * 100_000 + b"]" * 100_000 + b"}"
    deep_objects = head + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}"
    many = head + b"[" + b"0," * 2_000_000 + b"0]}"
    async with client(broker) as api:
        for body, code in ((deep, "json_too_deep"), (deep_objects, "json_too_deep")):
            answer = await api.post(
                "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
            )
            assert answer.status_code == 400, answer.text[:300]
            assert answer.json()["error"]["code"] == code
        answer = await api.post(
            "/v1/chat/completions", content=many, headers={"content-type": "application/json"}
        )
        assert answer.status_code == 400, answer.text[:300]
        assert answer.json()["error"]["code"] == "json_too_large"
        fine = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        ok = await api.post("/v1/chat/completions", json=fine)
        assert ok.status_code == 200, ok.text[:300]
