"""Target mode: load-test any OpenAI-compatible base URL (an operator's real deployment)."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class StreamStats:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    total: float = 0.0
    error: str | None = None


async def _one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> StreamStats:
    stats = StreamStats()
    body = {
        "model": model,
        "stream": True,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt}],
    }
    started = time.perf_counter()
    last = started
    try:
        async with client.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                stats.error = f"HTTP {response.status_code}"
                return stats
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    stats.error = str(event["error"].get("message"))
                    break
                choices = event.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    if stats.ttft is None:
                        stats.ttft = now - started
                    else:
                        stats.gaps.append(now - last)
                    last = now
                    stats.tokens += 1
    except (httpx.HTTPError, ValueError) as exc:
        stats.error = f"{type(exc).__name__}: {exc}"
    stats.total = time.perf_counter() - started
    return stats


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] * 1000.0


async def run_target(
    base_url: str,
    api_key: str,
    model: str,
    requests: int,
    concurrency: int,
    max_tokens: int,
    prompt: str,
    timeout: float,
) -> dict[str, object]:
    results: list[StreamStats] = []
    remaining = requests
    started = time.perf_counter()

    def progress() -> None:
        done = len(results)
        width = 30
        filled = int(width * done / max(1, requests))
        errors = sum(1 for r in results if r.error)
        sys.stderr.write(
            f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{requests} errors {errors}"
        )
        sys.stderr.flush()

    async with httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=httpx.Timeout(timeout, connect=15.0),
        limits=httpx.Limits(max_connections=concurrency + 5),
    ) as client:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                results.append(await _one(client, model, prompt, max_tokens))
                progress()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    sys.stderr.write("\n")
    ok = [r for r in results if not r.error]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    tokens = sum(r.tokens for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "requests": requests,
        "concurrency": concurrency,
        "ok": len(ok),
        "error_rate": (len(results) - len(ok)) / max(1, len(results)),
        "errors": errors,
        "ttft_ms": {"p50": _pct(ttfts, 0.5), "p90": _pct(ttfts, 0.9), "p99": _pct(ttfts, 0.99)},
        "inter_token_ms": {"p50": _pct(gaps, 0.5), "p90": _pct(gaps, 0.9), "p99": _pct(gaps, 0.99)},
        "tokens_per_s": tokens / wall if wall else 0.0,
        "tokens_per_s_per_stream": statistics.median([r.tokens / r.total for r in ok if r.total])
        if ok
        else 0.0,
        "wall_s": wall,
    }


def target_table(summary: dict[str, object]) -> str:
    ttft = summary["ttft_ms"]
    itl = summary["inter_token_ms"]
    assert isinstance(ttft, dict) and isinstance(itl, dict)
    rows = [
        "| metric | p50 | p90 | p99 |",
        "|---|---|---|---|",
        f"| time to first token (ms) | {ttft['p50']:.1f} | {ttft['p90']:.1f} | {ttft['p99']:.1f} |",
        f"| inter-token latency (ms) | {itl['p50']:.1f} | {itl['p90']:.1f} | {itl['p99']:.1f} |",
        "",
        f"requests {summary['requests']} at concurrency {summary['concurrency']}: "
        f"{summary['ok']} ok, error rate {float(summary['error_rate']):.1%} "  # type: ignore[arg-type]
        f"{summary['errors'] or ''}",
        f"tokens/s overall {float(summary['tokens_per_s']):.1f}, "  # type: ignore[arg-type]
        f"per stream (median) {float(summary['tokens_per_s_per_stream']):.1f}",  # type: ignore[arg-type]
    ]
    return "\n".join(rows)
