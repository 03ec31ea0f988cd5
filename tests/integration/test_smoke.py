from __future__ import annotations

import asyncio

import openai
import pytest

from shared.bench.upstream import FakeLLM
from tests.support.stack import USER_KEY, Stack

# Relay semantics in memory and in Redis; the server's part (streaming bodies, long polls,
# disconnects) on each HTTP server.
pytestmark = [pytest.mark.both_states, pytest.mark.both_servers]


async def test_non_stream_chat(stack: Stack, fake_llm: FakeLLM) -> None:
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=USER_KEY)
    reply = await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert reply.choices[0].message.content == "tok0 tok1 tok2 "
    await client.close()


async def test_stream_chat(stack: Stack, fake_llm: FakeLLM) -> None:
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=USER_KEY)
    stream = await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    parts = [
        c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content
    ]
    assert parts == ["tok0 ", "tok1 ", "tok2 ", "tok3 "]
    await client.close()


async def test_the_broker_runs_on_the_server_of_this_test(stack: Stack, broker_server: str) -> None:
    """The fixture's server is the one answering: h11 (Hypercorn) sends no reason phrase,
    httptools' writer in uvicorn does."""
    assert stack.broker.settings.server == broker_server
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.broker.settings.port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status_line = (await reader.readline()).rstrip(b"\r\n")
    writer.close()
    expected = {"hypercorn": b"HTTP/1.1 401 ", "uvicorn": b"HTTP/1.1 401 Unauthorized"}
    assert status_line == expected[broker_server]
