from __future__ import annotations

import openai
import pytest

from shared.bench.upstream import FakeLLM
from tests.support.stack import USER_KEY, Stack

pytestmark = pytest.mark.both_states  # relay semantics: in memory and in Redis


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
