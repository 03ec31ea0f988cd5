"""``remotellm-bench local --trace``: where a relayed request's first byte spends its time.

The broker and connectors run with ``--trace-hops``: each logs one ``hop_trace`` line per
request with the wall-clock time (``time.time_ns``, one clock on one host) each hop was
reached. The client adds when it sent the request and when the first body byte came; the
broker's ``x-request-id`` joins the three. Each row is the median time from the hop
before it, over the scenario's relayed requests.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from shared.bench.client import Result

# The first byte's path, in order: (hop, who marks it, what it means).
PATH: list[tuple[str, str, str]] = [
    ("client_sent", "client", "the benchmark writes the request"),
    ("api_in", "broker", "the API handler starts (request head parsed)"),
    ("submitted", "broker", "body read and checked, limits taken, queued"),
    ("poll_written", "broker", "the work item handed to the server for the held poll"),
    ("poll_read", "connector", "the connector decoded the poll line"),
    ("upstream_sent", "connector", "the upstream call starts"),
    ("llm_received", "fake LLM", "the fake LLM read the request"),
    ("llm_head", "fake LLM", "the fake LLM wrote its response head"),
    ("upstream_head", "connector", "the upstream's response head arrived"),
    ("upstream_first_byte", "connector", "the upstream's first body bytes arrived"),
    ("upload_data", "connector", "the first DATA frame handed to the mux upload"),
    ("demux_data", "broker", "the broker decoded that frame"),
    ("user_took", "broker", "the API handler took the frames from its channel"),
    ("user_write", "broker", "the response machine's first write handed to the server"),
    ("client_first_byte", "client", "the benchmark read the first body byte"),
]
# Beside the path: the lease's ACK (the request's first frame) travels in parallel.
BESIDE: list[tuple[str, str, str]] = [
    ("upload_ack", "poll_read", "the ACK frame handed to the upload (after poll_read)"),
    ("demux_ack", "poll_read", "the broker decoded the ACK (after poll_read)"),
]


def read_traces(log: Path) -> dict[str, dict[str, int]]:
    """Every request's marks from the processes' JSON log lines, by request ID."""
    traces: dict[str, dict[str, int]] = {}
    with log.open("rb") as handle:
        for raw in handle:
            if b'"hop_trace"' not in raw:
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            marks = line.get("marks")
            rid = line.get("request_id")
            if isinstance(marks, dict) and isinstance(rid, str):
                traces.setdefault(rid, {}).update(marks)
    return traces


async def collect(
    log: Path, results: Sequence[Result], timeout: float = 5.0
) -> list[dict[str, int]]:
    """The full marks of each traced request (the last log lines may lag the answers)."""
    wanted = [r for r in results if r.ok and r.request_id]
    deadline = time.monotonic() + timeout
    while True:
        traces = read_traces(log)
        ready = [r for r in wanted if "user_write" in traces.get(r.request_id or "", {})]
        if len(ready) == len(wanted) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    out = []
    for r in ready:
        marks = dict(traces[r.request_id or ""])
        marks["client_sent"] = r.sent_ns
        marks["client_first_byte"] = r.first_ns
        out.append(marks)
    return out


def _median_ms(values: list[int]) -> float:
    return statistics.median(values) / 1e6 if values else float("nan")


def hop_rows(traces: list[dict[str, int]]) -> list[tuple[str, str, float, str]]:
    """(hop, who, median ms since the hop before, meaning) along the path, then beside it."""
    rows = []
    for (prev, _, _), (hop, who, meaning) in itertools.pairwise(PATH):
        deltas = [m[hop] - m[prev] for m in traces if hop in m and prev in m]
        rows.append((hop, who, _median_ms(deltas), meaning))
    totals = [m["client_first_byte"] - m["client_sent"] for m in traces]
    rows.append(("total", "client", _median_ms(totals), "request sent to first byte"))
    for hop, after, meaning in BESIDE:
        deltas = [m[hop] - m[after] for m in traces if hop in m and after in m]
        rows.append((hop, "beside", _median_ms(deltas), meaning))
    return rows


def hop_table(name: str, traces: list[dict[str, int]], direct_ttfb_ms: float) -> str:
    lines = [
        f"Hops of the first byte, {name}: median ms from the hop before, "
        f"{len(traces)} requests (direct TTFB p50 {direct_ttfb_ms:.2f} ms)",
        "",
        "| hop | marked by | ms | what |",
        "|---|---|---|---|",
    ]
    for hop, who, ms, meaning in hop_rows(traces):
        lines.append(f"| {hop} | {who} | {ms:.3f} | {meaning} |")
    return "\n".join(lines)
