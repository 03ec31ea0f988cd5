"""Usage against a real llama.cpp engine (llama-cpp-python's server), for real broker and
connector processes, read back with ``remotellm-broker usage`` after a SIGTERM.

Measured here: the engine ignores ``stream_options.include_usage`` (no usage chunk, no
``usage: null``), so the broker's request for usage changes nothing the client sees, and
streamed usage is the broker's estimate (one token per content delta).
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.usage.query import recent_requests
from tests.support.llama import LlamaServer
from tests.support.procs import Broker, Proc, Procs

pytestmark = pytest.mark.e2e

KEY = "sk-" + "e" * 32
TOKEN = "ct-e2e-usage-token"
# Per response: a random ID and the second it was made. Everything else must be equal.
_VOLATILE = re.compile(rb'"id": "[^"]+"|"created": \d+')


async def relay_to(procs: Procs, llama: LlamaServer, data_dir: Path) -> tuple[Broker, Proc]:
    broker = await procs.broker(data_dir, "--user-api-key", KEY, "--connector-token", TOKEN)
    connector = await procs.connector(broker.url, TOKEN, llama.url, f"llama-{llama.alias}")
    await broker.wait_model(
        llama.alias, timeout=20.0, connector=f"llama-{llama.alias}", watch=connector
    )
    return broker, connector


def body(model: str, *, stream: bool, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Count to three."}],
        "max_tokens": 6,
        "temperature": 0,
        "seed": 7,
        "stream": stream,
        **extra,
    }


async def post(url: str, payload: dict[str, Any], headers: dict[str, str]) -> bytes:
    headers = headers | {"x-request-id": str(uuid.uuid4())}
    async with (
        httpx.AsyncClient(timeout=60.0, trust_env=False) as client,
        client.stream("POST", url + "/v1/chat/completions", json=payload, headers=headers) as r,
    ):
        assert r.status_code == 200, await r.aread()
        return b"".join([part async for part in r.aiter_raw()])


def content_deltas(raw: bytes) -> int:
    count = 0
    for event in raw.split(b"\n\n"):
        if event.startswith(b"data: {"):
            choices = json.loads(event[6:])["choices"]
            if choices and choices[0].get("delta", {}).get("content"):
                count += 1
    return count


async def test_usage_rows_against_llama_cpp(
    procs: Procs, llama_server: LlamaServer, tmp_path: Path
) -> None:
    model = llama_server.alias
    data = tmp_path / "data"
    broker, _ = await relay_to(procs, llama_server, data)
    auth = {"Authorization": f"Bearer {KEY}"}

    # The engine's own stream, with and without include_usage: identical (it ignores it).
    direct = await post(llama_server.url, body(model, stream=True), {})
    direct_usage = await post(
        llama_server.url, body(model, stream=True, stream_options={"include_usage": True}), {}
    )
    assert _VOLATILE.sub(b"", direct_usage) == _VOLATILE.sub(b"", direct)
    assert b'"usage"' not in direct_usage

    # Through the relay (which asks for usage): the same bytes the engine sends directly.
    relayed = await post(broker.url, body(model, stream=True), auth)
    assert _VOLATILE.sub(b"", relayed) == _VOLATILE.sub(b"", direct)
    deltas = content_deltas(relayed)
    assert 0 < deltas <= 6

    whole = json.loads(await post(broker.url, body(model, stream=False), auth))
    assert whole["usage"]["completion_tokens"] > 0

    # SIGTERM: the broker drains, flushes the ledger, exits; the CLI reads it.
    assert broker.proc is not None
    broker.proc.signal()
    assert await broker.proc.wait_exit(20.0) == 0, broker.proc.tail()
    stream_row, whole_row = reversed(recent_requests(data / "usage.sqlite3"))
    assert (stream_row.stream, stream_row.estimated, stream_row.partial) == (True, True, False)
    assert stream_row.tokens_out == deltas  # one token per content delta
    assert stream_row.tokens_in == 4 + 4  # "Count to three.": 15 bytes / 4, + 4 per message
    assert (whole_row.estimated, whole_row.tokens_in, whole_row.tokens_out) == (
        False,
        whole["usage"]["prompt_tokens"],
        whole["usage"]["completion_tokens"],
    )
    assert stream_row.connector == whole_row.connector == f"llama-{model}"

    cli = await procs.start(
        "usage", "-m", "broker", "--data-dir", str(data), "usage", "--by", "model", "--format",
        "json",
    )  # fmt: skip
    assert await cli.wait_exit(30.0) == 0, cli.tail()
    doc = json.loads(cli.text("stdout"))
    (row,) = doc["rows"]
    assert (row["model"], row["requests"], row["estimated"], row["partial"]) == (model, 2, 1, 0)
    assert row["tokens_out"] == deltas + whole["usage"]["completion_tokens"]


async def test_cancelled_llama_stream_is_partial(
    procs: Procs, llama_slow_server: LlamaServer, tmp_path: Path
) -> None:
    model = llama_slow_server.alias
    data = tmp_path / "data"
    broker, _ = await relay_to(procs, llama_slow_server, data)
    payload = body(model, stream=True) | {"max_tokens": 1000}
    headers = {"Authorization": f"Bearer {KEY}", "x-request-id": str(uuid.uuid4())}
    received = 0
    async with (
        httpx.AsyncClient(timeout=60.0, trust_env=False) as client,
        client.stream(
            "POST", broker.url + "/v1/chat/completions", json=payload, headers=headers
        ) as r,
    ):
        async for line in r.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get(
                "content"
            ):
                received += 1
                if received == 5:
                    break
    assert broker.proc is not None
    done = await broker.proc.wait_event(
        ("request_done",), timeout=10.0, client_request_id=headers["x-request-id"]
    )
    assert (done["status"], done["partial"], done["estimated"]) == (499, True, True), done
    assert 5 <= done["tokens_out"] < 1000
    broker.proc.signal()
    assert await broker.proc.wait_exit(20.0) == 0, broker.proc.tail()
    (row,) = recent_requests(data / "usage.sqlite3")
    assert (row.status, row.partial, row.tokens_out) == (499, True, done["tokens_out"])
