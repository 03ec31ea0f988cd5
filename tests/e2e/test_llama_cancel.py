"""A real llama.cpp engine behind the relay: a client that leaves stops the generation, and
the engine's own errors reach the client in OpenAI's shape.

The request IDs here are UUIDs on purpose: these tests are about cancellation and errors,
and llama-cpp-python's server refuses any other ``x-request-id`` (the newcomer test covers
IDs of the relay's own making).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import openai
import pytest

from tests.support.llama import LlamaServer
from tests.support.procs import Broker, Proc, Procs, openai_client

pytestmark = pytest.mark.e2e

KEY = "sk-" + "c" * 32
TOKEN = "ct-e2e-cancel-token"
LONG_STREAM_TOKENS = 1000  # ~10 s on the slow model: far longer than any margin below
FREE_WITHIN_S = 3.0


async def relay_to(procs: Procs, llama: LlamaServer, data_dir: Path) -> tuple[Broker, Proc]:
    broker = await procs.broker(data_dir, "--user-api-key", KEY, "--connector-token", TOKEN)
    connector = await procs.connector(broker.url, TOKEN, llama.url, f"llama-{llama.alias}")
    await broker.wait_model(
        llama.alias, timeout=20.0, connector=f"llama-{llama.alias}", watch=connector
    )
    return broker, connector


async def test_client_disconnect_stops_generation(
    procs: Procs, llama_slow_server: LlamaServer, tmp_path: Path
) -> None:
    model = llama_slow_server.alias
    broker, connector = await relay_to(procs, llama_slow_server, tmp_path / "data")
    assert broker.proc is not None
    rid = str(uuid.uuid4())
    async with openai_client(broker.url, KEY) as client:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Write a very long essay."}],
            max_tokens=LONG_STREAM_TOKENS,
            stream=True,
            extra_headers={"x-request-id": rid},
        )
        received = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
                if received == 5:
                    break
        await stream.close()
        assert received == 5

        # llama.cpp serves one request at a time (--interrupt_requests False queues the
        # rest): this one only finishes quickly if the long generation stopped.
        started = time.monotonic()
        short = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Quick one."}],
            max_tokens=8,
            extra_headers={"x-request-id": str(uuid.uuid4())},
            timeout=30.0,
        )
        took = time.monotonic() - started
    assert short.choices[0].message.content
    assert took < FREE_WITHIN_S, (
        f"a short request after the cancelled stream took {took:.1f} s: the engine kept "
        f"generating for the client that left\n{connector.tail()}"
    )

    # Each hop saw the cancel: broker (499), connector (upstream closed), engine.
    # The client's ID is a label; the broker's own UUID is what the connector knows.
    done = await broker.proc.wait_event(("request_done",), timeout=5.0, client_request_id=rid)
    assert done["status"] == 499, done
    await connector.wait_event(
        ("request_cancelled", "request_cancelled_by_broker"),
        timeout=5.0,
        request_id=done["request_id"],
    )
    await wait_text(llama_slow_server, "Disconnected from client", timeout=5.0)


async def wait_text(llama: LlamaServer, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in llama.log_text():
        if time.monotonic() > deadline:
            raise AssertionError(f"llama.cpp never logged {text!r}:\n{llama.log_text()[-2000:]}")
        await asyncio.sleep(0.05)


async def test_engine_error_passes_through(
    procs: Procs, llama_server: LlamaServer, tmp_path: Path
) -> None:
    broker, _ = await relay_to(procs, llama_server, tmp_path / "data")
    too_long = "word " * 600  # ~3000 tokens with the byte-level vocabulary; n_ctx is 512
    async with openai_client(broker.url, KEY) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(
                model=llama_server.alias,
                messages=[{"role": "user", "content": too_long}],
                max_tokens=8,
                extra_headers={"x-request-id": str(uuid.uuid4())},
            )
        # The relay still serves afterwards.
        ok = await client.chat.completions.create(
            model=llama_server.alias,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            extra_headers={"x-request-id": str(uuid.uuid4())},
        )
    assert ok.choices[0].message.content
    err = info.value
    assert err.status_code == 400
    body = err.response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error["code"] is None or isinstance(error["code"], str), error
    assert isinstance(error["message"], str) and "context length" in error["message"], error
    assert isinstance(error["type"], str), error
    assert err.response.headers.get("x-request-id")
