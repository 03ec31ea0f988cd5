"""The user's usage table on the keys page: read through broker.usage.query, with costs
when the broker has --models-file, and the estimated mark."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.usage.query import recent_requests
from shared.bench.upstream import FakeLLM
from tests.portal.helpers import ask, login, new_key_of, portal_client
from tests.support.net import wait_for
from tests.support.stack import Stack

PRICES = """\
currency: EUR
models:
  fake-model:
    input_per_million: 1000
    output_per_million: 2000
"""


@pytest.fixture
def portal_overrides(tmp_path: Path) -> dict[str, Any]:
    prices = tmp_path / "models.yaml"
    prices.write_text(PRICES)
    return {"models_file": prices}


async def test_usage_table_shows_cost_and_estimates(portal_stack: Stack, fake_llm: FakeLLM) -> None:
    async with portal_client(portal_stack) as client:
        callback = await login(client)
        key = new_key_of((await client.get(callback.headers["location"])).text)
        assert await ask(portal_stack, key)  # exact: 3 prompt and 5 completion tokens
        async with httpx.AsyncClient(base_url=portal_stack.broker.url, timeout=30.0) as api:
            reply = await api.post(  # a stream with the usage chunk: exact (3 and 1)
                "/v1/chat/completions",
                json={
                    "model": "fake-model",
                    "messages": [{"role": "user", "content": "say:hi"}],
                    "stream": True,
                },
                headers={"Authorization": f"Bearer {key}"},
            )
        fake_llm.usage_style = "ignore"  # as llama-cpp-python: no usage chunk
        async with httpx.AsyncClient(base_url=portal_stack.broker.url, timeout=30.0) as api:
            reply = await api.post(  # a stream without usage: estimated
                "/v1/chat/completions",
                json={
                    "model": "fake-model",
                    "messages": [{"role": "user", "content": "say:hi"}],
                    "stream": True,
                },
                headers={"Authorization": f"Bearer {key}"},
            )
            assert reply.status_code == 200
        usage = portal_stack.broker.settings.usage_path
        await wait_for(lambda: usage.exists() and len(recent_requests(usage)) >= 3, timeout=10)
        page = (await client.get("/portal/keys")).text
    assert "cost (EUR)" in page
    row = re.search(r"<code>fake-model</code></td>(.*?)</tr>", page, re.S)
    assert row is not None, page
    cells = re.findall(r'<td class="num">(.*?)</td>', row.group(1), re.S)
    assert cells[0] == "3"  # requests
    # in: 3 + 3 exact, 2 + 4 estimated ("say:hi": 6 bytes / 4, + 4 per message); out: 5 + 1 + 1
    assert re.sub(r"<.*", "", cells[1], flags=re.S) == "12"
    assert "title=" in cells[1]  # the mark: some of these were estimated
    assert cells[-1] == f"{(12 * 1000 + 7 * 2000) / 1e6:.6f}"
    assert "some token counts are estimated" in page
