"""What the API user sees of a stream: when the first and last token arrive.

``LATENCIES`` collects one row per (path, upload mode): the median of a few streams, with
the spread of the first token; the conftest prints them as a table at the end of the run
(the numbers the issue's closing note asks for).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.support.stack import USER_KEY

TOKENS = 10
CHUNK_DELAY = 0.05  # the fake LLM's gap between tokens: a stream lasts ~0.45 s
SAMPLES = 3


@dataclass
class StreamTiming:
    path: str
    mode: str
    first_ms: float
    last_ms: float
    tokens: list[str]
    firsts: list[float] = field(default_factory=list)

    @property
    def incremental(self) -> bool:
        """First token well before the last (the upstream spreads them over ~0.45 s)."""
        spread = (len(self.tokens) - 1) * CHUNK_DELAY * 1000.0
        return self.last_ms - self.first_ms > 0.5 * spread


LATENCIES: list[StreamTiming] = []


async def stream_timing(
    base_url: str,
    path: str,
    mode: str,
    record: bool = True,
    verify: Any = True,
    tokens: int = TOKENS,
) -> StreamTiming:
    """Streamed chat completions through ``base_url`` (``SAMPLES`` of them when recorded).

    Returns the sample with the median first-token time; every sample must carry every
    token in order and end with ``data: [DONE]``.
    """
    runs = [
        await _one(base_url, path, mode, verify, tokens) for _ in range(SAMPLES if record else 1)
    ]
    runs.sort(key=lambda t: t.first_ms)
    for run in runs:
        assert run.tokens == runs[0].tokens, (run.tokens, runs[0].tokens)
    median = runs[len(runs) // 2]
    median.firsts = [t.first_ms for t in runs]
    median.last_ms = round(statistics.median(t.last_ms for t in runs), 1)
    if record:
        LATENCIES.append(median)
    return median


async def _one(base_url: str, path: str, mode: str, verify: Any, tokens: int) -> StreamTiming:
    body = {
        "model": "fake-model",
        "stream": True,
        "max_tokens": tokens,
        "messages": [{"role": "user", "content": "count"}],
    }
    received: list[str] = []
    done = False
    first = last = 0.0
    async with httpx.AsyncClient(timeout=30.0, trust_env=False, verify=verify) as client:
        started = time.perf_counter()
        async with client.stream(
            "POST",
            base_url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {USER_KEY}"},
        ) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                done = done or line == "data: [DONE]"
                if not line.startswith("data: {"):
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    now = (time.perf_counter() - started) * 1000.0
                    first = first or now
                    last = now
                    received.append(delta)
    assert done, f"the stream did not end with [DONE]: {received}"
    return StreamTiming(path, mode, round(first, 1), round(last, 1), received)


def expected_tokens() -> list[str]:
    return [f"tok{i} " for i in range(TOKENS)]


def latency_table() -> list[str]:
    if not LATENCIES:
        return []
    rows = [
        f"stream latency seen by the API user: {TOKENS} tokens {CHUNK_DELAY * 1000:.0f} ms apart,"
        f" ms from sending the request, median of {SAMPLES} (first token: min-max)",
        f"{'path':<52} {'mode':<7} {'first':>7} {'min-max':>13} {'last':>7}",
    ]
    for t in LATENCIES:
        spread = f"{min(t.firsts):.0f}-{max(t.firsts):.0f}"
        rows.append(f"{t.path:<52} {t.mode:<7} {t.first_ms:>7.1f} {spread:>13} {t.last_ms:>7.1f}")
    return rows
